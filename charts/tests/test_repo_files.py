"""Shell scripts, YAML files, kind-config.yaml and the e2e-kind workflow."""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from conftest import REPO, find_tool, run

YAML_FILES = [".github/workflows/e2e-kind.yaml", "kind-config.yaml", "charts/warren/Chart.yaml",
              "charts/warren/values.yaml"]
YAMLLINT_CONFIG = ("{extends: default, rules: {line-length: {max: 120}, document-start: disable, "
                   "truthy: {check-keys: false}}}")
WORKFLOW = REPO / ".github" / "workflows" / "e2e-kind.yaml"


def shell_scripts() -> list[str]:
    """Every tracked file that is a shell script: *.sh, or a sh/bash shebang."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    scripts = []
    for name in files:
        path = REPO / name
        if not path.is_file():
            continue
        with path.open("rb") as f:
            first = f.readline()
        if name.endswith(".sh") or re.match(rb"#!\s*(/usr)?/bin/(env\s+)?(ba)?sh\b", first):
            scripts.append(name)
    return scripts


def test_every_shell_script_passes_shellcheck(shellcheck):
    scripts = shell_scripts()
    assert {"mk/kind-flow.sh", "mk/image-tag.sh", ".ci/install-tools.sh", ".ci/run"} <= set(scripts)
    proc = run([shellcheck, "-x", "--severity=style", *scripts], cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def actionlint() -> str:
    return find_tool("actionlint")


def workflow_files() -> list:
    return sorted((REPO / ".github" / "workflows").glob("*.y*ml"))


def run_actionlint(actionlint, shellcheck, files):
    # actionlint also runs shellcheck over every `run:` script when it finds it on PATH.
    env = {"PATH": f"{REPO / 'bin'}:{shellcheck.rsplit('/', 1)[0]}:/usr/bin:/bin"}
    return subprocess.run([actionlint, "-no-color", *map(str, files)], capture_output=True, text=True,
                          timeout=120, env=env)


def test_workflows_pass_actionlint(actionlint, shellcheck):
    files = workflow_files()
    assert files
    proc = run_actionlint(actionlint, shellcheck, files)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_actionlint_catches_a_bad_workflow(actionlint, shellcheck, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("on: push\njobs:\n  a:\n    runs-on: ubuntu-24.04\n    steps:\n"
                   "      - run: echo ${{ matrix.nope }}\n      - run: rm -rf $DIR/*\n")
    proc = run_actionlint(actionlint, shellcheck, [bad])
    assert proc.returncode != 0
    assert "matrix" in proc.stdout and "SC2086" in proc.stdout, proc.stdout


# A write into these system directories needs root, which a hosted runner's user is not.
ROOT_OWNED = re.compile(r"(?<![\w$./-])/(usr|opt|etc|bin|sbin|lib)(/|\b)")
WRITERS = re.compile(r"\b(curl|wget|cp|mv|install|chmod|chown|tee|ln|mkdir|rm|tar|unzip)\b|>")


def unprivileged_system_writes(script: str) -> list[str]:
    bad = []
    for line in script.splitlines():
        stripped = line.strip()
        if ROOT_OWNED.search(stripped) and WRITERS.search(stripped) and not stripped.startswith("sudo "):
            bad.append(stripped)
    return bad


def test_workflow_writes_system_directories_only_with_sudo():
    """The hosted runner already has a root-owned /usr/local/bin/kind: `curl -o` there
    without sudo exits 23 before anything else runs."""
    for path in workflow_files():
        data = yaml.safe_load(path.read_text())
        for job in data["jobs"].values():
            for step in job["steps"]:
                assert unprivileged_system_writes(step.get("run", "")) == [], (path.name, step.get("name"))
    old_step = 'curl -fsSLo /usr/local/bin/kind "https://kind.sigs.k8s.io/dl/v0.29.0/kind-linux-amd64"\n' \
               "chmod +x /usr/local/bin/kind\nkind version\n"
    assert len(unprivileged_system_writes(old_step)) == 2  # the check catches the old step


def test_helm_test_script_passes_shellcheck_as_posix_sh(shellcheck, defaults, tmp_path):
    """The helm test pod runs its script with the curl image's sh, not bash."""
    (pod,) = defaults.kinds("Pod")
    (container,) = pod["spec"]["containers"]
    assert container["command"][:2] == ["sh", "-c"]
    script = tmp_path / "send-job.sh"
    script.write_text("#!/bin/sh\n" + container["command"][2])
    proc = run([shellcheck, "--shell=sh", "--severity=style", str(script)])
    assert proc.returncode == 0, proc.stdout


def test_shellcheck_catches_a_bad_script(shellcheck, tmp_path):
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/bin/bash\nrm -rf $DIR/*\n")
    proc = run([shellcheck, str(bad)])
    assert proc.returncode != 0
    assert "SC2086" in proc.stdout


def test_yaml_files_pass_yamllint(yamllint):
    proc = run([yamllint, "--strict", "-d", YAMLLINT_CONFIG, *[str(REPO / f) for f in YAML_FILES]])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_kind_config_is_the_cluster_make_expects():
    config = yaml.safe_load((REPO / "kind-config.yaml").read_text())
    assert config["kind"] == "Cluster"
    assert config["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    make = (REPO / "mk" / "deploy.mk").read_text()
    assert re.search(r"^KIND_CLUSTER \?= (\S+)$", make, re.MULTILINE).group(1) == config["name"]
    roles = [n["role"] for n in config["nodes"]]
    assert roles.count("control-plane") == 1 and "worker" in roles
    # kind's own CNI (kindnet, kind >= v0.24) enforces the chart's NetworkPolicy; it must stay on.
    networking = config.get("networking", {})
    assert not networking.get("disableDefaultCNI", False)
    assert not networking.get("disableNetworkPolicies", False)


def workflow() -> dict:
    data = yaml.safe_load(WORKFLOW.read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as true
    return data


def steps_of(job: dict) -> list[str]:
    return [step.get("run", step.get("uses", "")) for step in job["steps"]]


def test_workflow_runs_the_real_flow_on_kind():
    wf = workflow()
    assert {"push", "pull_request"} <= set(wf["on"])
    job = wf["jobs"]["e2e-kind"]
    assert job["runs-on"].startswith("ubuntu-")
    steps = steps_of(job)
    order = ["mk/versions.env", "bash .ci/install-tools.sh", "kind-linux-amd64", "make kind-up", "helm test warren",
             "make kind-e2e", "make kind-down"]
    positions = [next(i for i, s in enumerate(steps) if needle in s) for needle in order]
    assert positions == sorted(positions), steps
    # kind-up twice: the second run must succeed and reuse the cluster.
    assert sum(1 for s in steps if s.strip() == "make kind-up") == 2
    teardown = job["steps"][positions[-1]]
    assert teardown["if"] == "always()"
    kind_step = next(s for s in steps if "kind-linux-amd64" in s)
    assert '"${KIND_VERSION}"' in kind_step or "${KIND_VERSION}" in kind_step
    assert 'sudo install -m 0755 "$RUNNER_TEMP/kind" /usr/local/bin/kind' in kind_step
    assert 'grep -F "kind ${KIND_VERSION} "' in kind_step  # the pinned kind, not the runner's
    # `helm test --logs` reads the test pod's log after it passed: the pod must survive it.
    assert any(re.search(r"helm test warren .*--logs", s) for s in steps)
    # Images must land in Docker's image store for `kind load docker-image`.
    assert not any("setup-buildx-action" in s for s in steps)
    # helm/kubectl from install-tools come first on PATH (the runner has its own helm 3).
    assert any('warren-tools/bin" >> "$GITHUB_PATH"' in s for s in steps)


def test_workflow_e2e_script_asserts_scale_up_drain_and_no_dead_letters():
    flow = (REPO / "mk" / "kind-flow.sh").read_text()
    e2e = flow[flow.index("\ne2e() {"):]
    for needle in ("apply_scaler", "send_burst", "waiting for the scale-up", "waiting for the queue to drain",
                   "dead-lettered", "waiting for the scale-in"):
        assert needle in e2e, needle
    make = (REPO / "mk" / "deploy.mk").read_text()
    assert re.search(r"^kind-e2e:.*\n\t\$\(KIND_FLOW\) e2e$", make, re.MULTILINE)
    assert re.search(r"^demo:.*\n\t\$\(KIND_FLOW\) demo$", make, re.MULTILINE)


def test_workflow_also_runs_chart_test():
    steps = steps_of(workflow()["jobs"]["chart-test"])
    assert "bash .ci/install-tools.sh" in steps and "make chart-test" in steps
