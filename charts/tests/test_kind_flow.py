"""mk/kind-flow.sh (`make demo`, `make kind-e2e`) against stand-ins for kubectl and curl.

The real flow needs a kind cluster (the e2e-kind workflow runs it). Here a fake
kubectl plays a cluster whose workers scale up on a burst, drain the queue and
scale in, and the script must pass; when the cluster misbehaves it must fail and
say why.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO

FAKE_KUBECTL = """#!{python}
import json, os, sys, time
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(" ".join(args) + "\\n")
assert args[:4] == ["--context", "kind-warren", "-n", "default"], args
args = args[4:]
state_path = os.environ["FAKE_STATE"]
state = json.load(open(state_path)) if os.path.exists(state_path) else {{"replicas": 0, "queues": 0}}
scenario = os.environ["FAKE_SCENARIO"]

def save():
    json.dump(state, open(state_path, "w"))

release = os.environ.get("RELEASE", "warren")
drained = state["queues"] >= 4
if args[:2] == ["apply", "-f"]:
    assert args[2] == "-", args
    with open(os.environ["FAKE_LOG"] + ".applied", "w") as applied:
        applied.write(sys.stdin.read())
    print("queuescaler.warren.dev/warren-worker created")
elif args == ["get", "qs", "-o", "name"]:
    print("queuescaler.warren.dev/warren-worker")
elif args[:3] == ["get", "deploy", release + "-worker"] and "jsonpath={{.spec.replicas}}" in args[-1]:
    state["replicas"] += 1
    save()
    if scenario == "api-down" or (scenario == "flaky" and state["replicas"] % 3 == 0):
        sys.exit("Error from server (InternalError): etcdserver: request timed out")
    if scenario == "never-scales":
        print(1, end="")
    elif drained and scenario != "never-scales-in":
        print(1, end="")
    else:
        print(3 if state["replicas"] >= 3 else 1, end="")
elif args[:1] == ["port-forward"]:
    assert args[1:] == ["svc/" + release + "-sender", "18080:80"], args
    time.sleep(600)
elif args[:2] == ["exec", release + "-rabbitmq-0"]:
    assert args[2:7] == ["-c", "rabbitmq", "--", "rabbitmqctl", "list_queues"], args
    state["queues"] += 1
    save()
    print("tasks", max(0, 40 - 10 * state["queues"]))
    print("tasks.dead", 2 if scenario == "dead-letters" else 0)
elif args[:2] == ["get", "qs"]:
    print("NAME            TARGET          QUEUE   MESSAGES   REPLICAS   DESIRED   AGE")
    print("warren-worker   warren-worker   tasks   0          1          1         1m")
elif args[:1] in (["get"], ["logs"]):
    pass
else:
    sys.exit("fake kubectl: unexpected " + " ".join(args))
"""

FAKE_CURL = """#!/bin/sh
echo "curl $*" >> "$FAKE_LOG"
case "$*" in
  *"-w %{http_code}"*) printf '%s' "${FAKE_CODE:-202}" ;;
esac
exit 0
"""


@pytest.fixture
def cluster(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tools = {"kubectl": FAKE_KUBECTL.format(python=sys.executable), "curl": FAKE_CURL,
             "sleep": "#!/bin/sh\nexit 0\n"}  # no waiting between polls
    for name, text in tools.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    scaler = tmp_path / "queuescaler.yaml"
    scaler.write_text((REPO / "manifests" / "queuescaler.yaml").read_text())
    log = tmp_path / "calls.log"

    def run(mode: str, scenario: str = "good", **extra: str) -> tuple[subprocess.CompletedProcess, list[str]]:
        env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "FAKE_LOG": str(log),
               "FAKE_STATE": str(tmp_path / "state.json"), "FAKE_SCENARIO": scenario,
               "KUBECTL": "kubectl", "SCALER_MANIFEST": str(scaler), "JOBS": "5",
               # Every fake kubectl call is a Python start (slow on a loaded machine): a
               # step that should pass gets room; a test that wants one to time out sets it low.
               "SCALE_UP_TIMEOUT": "30", "DRAIN_TIMEOUT": "30", "SCALE_IN_TIMEOUT": "30", **extra}
        proc = subprocess.run(["bash", str(REPO / "mk" / "kind-flow.sh"), mode], env=env,
                              capture_output=True, text=True, timeout=60)
        return proc, log.read_text().splitlines() if log.exists() else []

    return run


def test_e2e_passes_on_scale_up_drain_and_scale_in(cluster, tmp_path):
    proc, calls = cluster("e2e")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "scaled up to 3 workers" in proc.stdout
    assert "queue tasks drained" in proc.stdout
    assert "scaled in to 1 workers" in proc.stdout
    assert "e2e passed: 5 jobs accepted" in proc.stdout
    assert any(c.endswith(" apply -f -") for c in calls)
    assert (tmp_path / "calls.log.applied").read_text() == (tmp_path / "queuescaler.yaml").read_text()
    sends = [c for c in calls if c.startswith("curl") and "/send" in c]
    assert len(sends) == 5
    assert all("-X POST http://127.0.0.1:18080/send" in c and "Content-Type: application/json" in c for c in sends)


@pytest.mark.parametrize("scenario,code,expires,message", [
    ("never-scales", "202", "SCALE_UP_TIMEOUT", "workers stayed at 1"),
    ("never-scales-in", "202", "SCALE_IN_TIMEOUT", "workers stayed at 3"),
    ("dead-letters", "202", None, "2 jobs were dead-lettered into tasks.dead"),
    ("good", "503", None, "only 0 of 5 jobs were accepted with 202"),
])
def test_e2e_fails_loudly(scenario, code, expires, message, cluster):
    short = {expires: "2"} if expires else {}
    proc, _ = cluster("e2e", scenario, FAKE_CODE=code, **short)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"FAIL: {message}" in proc.stderr
    assert "--- diagnostics" in proc.stderr
    assert proc.stderr.count("FAIL:") == 1, proc.stderr  # reported once, by the script itself


def test_e2e_rides_out_transient_kubectl_errors(cluster):
    """A kubectl read that fails now and then is retried; the run still passes."""
    proc, _ = cluster("e2e", "flaky")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "reading deployment/warren-worker: attempt 1 of 5 failed" in proc.stderr
    assert "e2e passed" in proc.stdout


def test_e2e_names_a_kubectl_that_keeps_failing(cluster):
    """Before: `start="$(worker_replicas)"` under set -e exited silently on the first error.
    Now the run fails with the script's own message and diagnostics, once."""
    proc, _ = cluster("e2e", "api-down")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL: reading deployment/warren-worker failed 5 times in a row" in proc.stderr
    assert proc.stderr.count("FAIL:") == 1, proc.stderr
    assert proc.stderr.count("--- diagnostics") == 1, proc.stderr


def test_an_unexpected_failure_still_gets_diagnostics(cluster, tmp_path):
    """A command outside `try` that fails is reported by the ERR trap, not a silent exit."""
    proc, _ = cluster("e2e", SCALER_MANIFEST=str(tmp_path))  # a directory: sed cannot read it
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL:" in proc.stderr and "--- diagnostics" in proc.stderr


def test_another_release_name_is_applied_to_the_example_scaler(cluster, tmp_path):
    proc, calls = cluster("e2e", RELEASE="shop")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    applied = (tmp_path / "calls.log.applied").read_text()
    assert "name: shop-worker" in applied  # scaleTargetRef
    assert "managementUrl: http://shop-rabbitmq:15672" in applied
    assert "name: shop-rabbitmq" in applied  # the credentials Secret
    assert "warren-worker" not in applied.replace("name: warren-worker\nspec", "")  # only the scaler's own name
    assert "apiVersion: warren.dev/v1alpha1" in applied


def test_e2e_refuses_a_missing_scaler_manifest(cluster, tmp_path):
    proc, _ = cluster("e2e", SCALER_MANIFEST=str(tmp_path / "absent.yaml"))
    assert proc.returncode == 1
    assert "not found" in proc.stderr


def test_demo_sends_a_burst_and_shows_the_scaler(cluster):
    proc, calls = cluster("demo", DEMO_ROUNDS="2", JOBS="7")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "accepted: 7/7" in proc.stdout
    assert proc.stdout.count("warren-worker   warren-worker   tasks") >= 3  # once after apply, then each round
    assert sum(1 for c in calls if c.startswith("curl") and "/send" in c) == 7


def test_usage(cluster):
    proc, _ = cluster("bogus")
    assert proc.returncode == 2
    assert "usage:" in proc.stderr

