"""Shared fixtures for the chart tests: tool lookup and cached `helm template` renders.

The tests need helm, kubernetes-validate and hadolint (`bash .ci/install-tools.sh`
installs all of them); a missing tool is a failure, never a skip.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "warren"
RELEASE = "warren"
NAMESPACE = "warren-test"
# The Kubernetes version of the pinned kind node image (mk/versions.env): what `make kind-up` runs.
KUBE_VERSION = re.search(r"^KIND_NODE_IMAGE=kindest/node:v(\d+\.\d+\.\d+)@", (REPO / "mk" / "versions.env").read_text(),
                         re.MULTILINE).group(1)

TOOL_DIRS = [
    Path(os.environ.get("WARREN_TOOLS_BIN", Path.home() / ".cache/warren-tools/bin")),
    Path(os.environ.get("WARREN_VENV", Path.home() / ".cache/warren-venv")) / "bin",
]

# Named values variations rendered by several test modules. Each one changes a
# behaviour the chart has to get right.
VARIATIONS: dict[str, list[str]] = {
    "defaults": [],
    # Seed 004's per-purpose queues, each consumed by its own pool.
    "classic-queue": [
        "--set", "queue.type=classic", "--set", "queue.extra={sms,email}",
        "--set-json", 'worker.pools=[{"name":"worker"},{"name":"worker-sms","queues":["sms"]},'
                      '{"name":"worker-email","queues":["email"]}]',
    ],
    # Three pools, each with its own settings and its own chart QueueScaler.
    "pools": [
        "--set", "queue.extra={sms,email}",
        "--set", "queueScaler.enabled=true",
        "--set-json", 'worker.pools=[{"name":"worker"},'
                      '{"name":"worker-sms","queues":["sms"],"secondsPerDot":0.1,"prefetch":2,"concurrency":2,'
                      '"terminationGracePeriodSeconds":45,'
                      '"resources":{"requests":{"cpu":"10m","memory":"16Mi"},"limits":{"cpu":"200m","memory":"32Mi"}},'
                      '"queueScaler":{"maxReplicas":4,"messagesPerReplica":20}},'
                      '{"name":"worker-email","queues":["email"],"managedByQueueScaler":false,"replicas":2,'
                      '"queueScaler":{"enabled":false}}]',
    ],
    # One pool consuming two queues (in turn), scaled by one QueueScaler over both.
    "multi-queue-pool": [
        "--set", "queue.extra={sms,email}",
        "--set", "queueScaler.enabled=true",
        "--set-json", 'worker.pools=[{"name":"worker"},'
                      '{"name":"worker-notify","queues":["sms","email"],"terminationGracePeriodSeconds":90,'
                      '"queueScaler":{"operation":"max","maxReplicas":3}}]',
    ],
    # The chart's own QueueScaler, with scaling rules passed through to the CRD.
    "chart-scaler": [
        "--set", "queueScaler.enabled=true",
        "--set", "queueScaler.minReplicas=1",
        "--set", "queueScaler.maxReplicas=20",
        "--set-json", 'queueScaler.behavior={"scaleUp":{"stabilizationWindowSeconds":0,'
                      '"policies":[{"type":"Pods","value":4,"periodSeconds":15}],"selectPolicy":"Max"},'
                      '"scaleDown":{"stabilizationWindowSeconds":120,'
                      '"policies":[{"type":"Percent","value":50,"periodSeconds":60}]},"cooldownSeconds":30}',
    ],
    # No autoscaling: a fixed worker count in spec.replicas.
    "fixed-workers": [
        "--set", "worker.managedByQueueScaler=false",
        "--set", "worker.replicas=3",
    ],
    "no-networkpolicy": ["--set", "networkPolicy.enabled=false"],
    "cluster-rbac": ["--set", "controller.rbac.scope=cluster"],
    "ha": [
        "--set", "rabbitmq.replicas=3",
        "--set", "controller.replicas=2",
        "--set", "sender.replicas=2",
    ],
    "no-persistence-registry": [
        "--set", "rabbitmq.persistence.enabled=false",
        "--set", "image.registry=ghcr.io/acme",
        "--set", "image.tag=1.2.3",
        "--set", "rabbitmq.readOnlyRootFilesystem=false",
        "--set", "postgres.persistence.enabled=false",
    ],
    # Tokens off: no warren-admin, no PostgreSQL, the sender runs WARREN_AUTH=off.
    "no-auth": ["--set", "auth.enabled=false"],
    # Tokens against an external PostgreSQL named by an existing Secret.
    "external-db": [
        "--set", "auth.database.existingSecret=tokens-db",
        "--set", "auth.database.urlKey=DATABASE_URL",
        "--set", "auth.adminToken=a-given-admin-token-1234",
    ],
    # Every warren port moved, and extra environment variables in every component
    # (a pool's own extraEnv replacing worker.extraEnv; names in USER_ENV).
    "ports-and-env": [
        "--set", "sender.ports.http=18080", "--set", "worker.ports.http=19090",
        "--set", "controller.ports.http=18081", "--set", "admin.ports.http=18082",
        "--set", "queue.extra={sms}",
        "--set-json", 'sender.extraEnv=[{"name":"HTTP_PROXY","value":"http://proxy:3128"},'
                      '{"name":"SENDER_QUEUE_COPY","value":"$(WARREN_QUEUE)"}]',
        "--set-json", 'worker.extraEnv=[{"name":"TZ","value":"UTC"}]',
        "--set-json", 'worker.pools=[{"name":"worker"},{"name":"worker-sms","queues":["sms"],'
                      '"extraEnv":[{"name":"SMS_GATEWAY_TOKEN","valueFrom":{"secretKeyRef":{"name":"sms","key":"token"}}}]}]',
        "--set-json", 'controller.extraEnv=[{"name":"RUST_BACKTRACE","value":"1"}]',
        "--set-json", 'admin.extraEnv=[{"name":"NODE_NAME","valueFrom":{"fieldRef":{"fieldPath":"spec.nodeName"}}}]',
    ],
    "long-jobs": [
        "--set", "queueScaler.enabled=true",
        "--set", "worker.longestJobSeconds=400",
        "--set", "worker.terminationGracePeriodSeconds=430",
        "--set", "worker.secondsPerDot=10",
        "--set", "queueScaler.targetDrainSeconds=120",
        "--set", "queueScaler.fallback.failureThreshold=3",
        "--set", "queueScaler.fallback.replicas=2",
    ],
}

# The variables the variations add through extraEnv: a user's, outside the chart's contract.
USER_ENV = {"HTTP_PROXY", "SENDER_QUEUE_COPY", "TZ", "SMS_GATEWAY_TOKEN", "RUST_BACKTRACE", "NODE_NAME"}



def find_tool(name: str) -> str:
    for directory in TOOL_DIRS:
        candidate = directory / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    pytest.fail(f"{name} not found: run `bash .ci/install-tools.sh` (looked in {TOOL_DIRS} and PATH)")


@pytest.fixture(scope="session")
def helm() -> str:
    return find_tool("helm")


@pytest.fixture(scope="session")
def kubernetes_validate() -> str:
    return find_tool("kubernetes-validate")


@pytest.fixture(scope="session")
def hadolint() -> str:
    return find_tool("hadolint")


@pytest.fixture(scope="session")
def shellcheck() -> str:
    return find_tool("shellcheck")


@pytest.fixture(scope="session")
def yamllint() -> str:
    return find_tool("yamllint")


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)


@dataclass
class Rendered:
    """One `helm template` output: the YAML text and its parsed documents."""

    text: str
    docs: list[dict]

    def kinds(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d.get("kind") == kind]

    def one(self, kind: str, name: str) -> dict:
        matches = [d for d in self.docs if d.get("kind") == kind and d["metadata"]["name"] == name]
        assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
        return matches[0]

    def workloads(self) -> list[dict]:
        return [d for d in self.docs if d.get("kind") in ("Deployment", "StatefulSet")]

    def pod_specs(self) -> list[tuple[str, dict]]:
        """(name, pod spec) of every workload's template and every bare Pod (helm test)."""
        specs = [(d["metadata"]["name"], d["spec"]["template"]["spec"]) for d in self.workloads()]
        specs += [(d["metadata"]["name"], d["spec"]) for d in self.kinds("Pod")]
        return specs


def helm_template(helm: str, args: list[str], include_crds: bool = True) -> subprocess.CompletedProcess:
    cmd = [helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
           "--kube-version", KUBE_VERSION]
    if include_crds:
        cmd.append("--include-crds")
    return run(cmd + args)


@functools.lru_cache(maxsize=None)
def _render_cached(helm: str, args: tuple[str, ...]) -> Rendered:
    proc = helm_template(helm, list(args))
    assert proc.returncode == 0, f"helm template {' '.join(args)} failed:\n{proc.stderr}"
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return Rendered(text=proc.stdout, docs=docs)


@pytest.fixture(scope="session")
def render(helm):
    """render(variation_name_or_args) -> Rendered, cached per argument list."""

    def _render(variation: str | list[str] = "defaults") -> Rendered:
        args = VARIATIONS[variation] if isinstance(variation, str) else variation
        return _render_cached(helm, tuple(args))

    return _render


@pytest.fixture(scope="session")
def defaults(render) -> Rendered:
    return render("defaults")


def containers_of(pod_spec: dict, include_init: bool = True) -> list[dict]:
    containers = list(pod_spec.get("containers", []))
    if include_init:
        containers += pod_spec.get("initContainers", [])
    return containers


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def load_yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]
