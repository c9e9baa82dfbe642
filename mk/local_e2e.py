#!/usr/bin/env python3
"""The README flow on the local cluster (`make local-up`), asserted end to end.

Run by `make local-test` (part of `make test`). Uses only kubectl, helm, curl and the
apiserver's audit log. Asserts:
  1. every workload of the chart is Ready (StatefulSet + three Deployments, all pods);
  2. the apiserver accepts manifests/queuescaler.yaml and rejects invalid QueueScalers
     (min > max via the CRD's CEL rule, a bad enum), evaluated by the real apiserver;
  3. a job POSTed through `kubectl port-forward svc/<release>-sender` gets 202 and a
     worker pod logs it as done;
  4. a burst scales the worker Deployment up; the scale writes come from the chart's
     controller ServiceAccount (audit log), which has no admin rights (`auth can-i`);
  5. `kubectl get qs` shows every printer column filled;
  6. on scale-in the ReplicaSet controller deletes the lowest pod-deletion-cost pods
     first, and no job is interrupted: no message redelivered, none dead-lettered;
  7. `helm test <release>` passes.
Settings (environment): KUBECONFIG, KUBECTL, HELM, RELEASE, NAMESPACE, LOCAL_STATE,
JOBS (40), DOTS (seconds of work per job, 3), E2E_TIMEOUT (seconds per phase, 300).
"""
import base64
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

KUBECTL = os.environ.get("KUBECTL", "kubectl")
HELM = os.environ.get("HELM", "helm")
RELEASE = os.environ.get("RELEASE", "warren")
NS = os.environ.get("NAMESPACE", "default")
STATE = os.environ["LOCAL_STATE"]
JOBS = int(os.environ.get("JOBS", "40"))
DOTS = int(os.environ.get("DOTS", "3"))
TIMEOUT = int(os.environ.get("E2E_TIMEOUT", "300"))
WORKER = f"{RELEASE}-worker"
CONTROLLER_SA = f"system:serviceaccount:{NS}:{RELEASE}-controller"
COST = "controller.kubernetes.io/pod-deletion-cost"
T0 = time.time()


def log(msg):
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr, flush=True)
    for args in (["get", "qs,deploy,sts,pods", "-o", "wide"],
                 ["get", "events", "--sort-by=.lastTimestamp"]):
        subprocess.run([KUBECTL, "-n", NS, *args], check=False)
    sys.exit(1)


def k(*args, check=True, input=None):
    p = subprocess.run([KUBECTL, "-n", NS, *args], capture_output=True, text=True, input=input)
    if check and p.returncode != 0:
        fail(f"kubectl {' '.join(args)}: {p.stderr.strip()}")
    return p


def kjson(*args):
    return json.loads(k(*args, "-o", "json").stdout)


def wait(what, pred, timeout=TIMEOUT, every=1.0):
    deadline = time.time() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.time() > deadline:
            fail(f"{what}: not reached after {timeout}s")
        time.sleep(every)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PortForward:
    def __init__(self, target, remote):
        self.port = free_port()
        self.proc = subprocess.Popen([KUBECTL, "-n", NS, "port-forward", target, f"{self.port}:{remote}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

        def up():
            if self.proc.poll() is not None:
                fail(f"port-forward {target} exited: {self.proc.stderr.read()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            except OSError:
                return False
        wait(f"port-forward {target}", up, timeout=60)

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


SEND_HEADERS = {"Content-Type": "application/json"}


def admin_call(port, admin_token, path, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="POST", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {admin_token}"})
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, {}


def sender_token():
    """With auth.enabled (the chart's default) the sender wants a Bearer token: ask warren-admin
    for one, through port-forward, with the admin token from the chart's Secret."""
    if k("get", "deployment", f"{RELEASE}-admin", check=False).returncode != 0:
        return None
    admin_token = base64.b64decode(kjson("get", "secret", f"{RELEASE}-admin")["data"]["token"]).decode()
    admin = PortForward(f"svc/{RELEASE}-admin", 80)
    try:
        admin_call(admin.port, admin_token, "/api/applications", {"name": "local-e2e"})
        code, body = admin_call(admin.port, admin_token, "/api/tokens",
                                {"subject": {"kind": "application", "name": "local-e2e"},
                                 "limit": {"kind": "max_uses", "value": 10000}})
        if code >= 300 or not body.get("token"):
            fail(f"warren-admin POST /api/tokens: HTTP {code} {body}")
        return body["token"]
    finally:
        admin.close()


def post_job(port, message):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/send", method="POST",
                                 data=json.dumps({"message": message}).encode(), headers=SEND_HEADERS)
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def is_ready(pod):
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


def ready_pods(selector):
    pods = kjson("get", "pods", "-l", selector)["items"]
    return [p for p in pods if not p["metadata"].get("deletionTimestamp") and is_ready(p)]


def check_workloads_ready():
    selector = f"app.kubernetes.io/instance={RELEASE}"
    workloads = kjson("get", "statefulsets,deployments", "-l", selector)["items"]
    names = sorted(f"{w['kind']}/{w['metadata']['name']}" for w in workloads)
    for must in (f"StatefulSet/{RELEASE}-rabbitmq", f"Deployment/{RELEASE}-sender",
                 f"Deployment/{RELEASE}-worker", f"Deployment/{RELEASE}-controller"):
        if must not in names:
            fail(f"{must} missing from the release: {names}")
    for w in workloads:
        want = w["spec"].get("replicas", 1)
        if w["status"].get("readyReplicas", 0) != want:
            fail(f"{w['kind']}/{w['metadata']['name']}: {w['status'].get('readyReplicas', 0)}/{want} ready")
    pods = kjson("get", "pods", "-l", f"app.kubernetes.io/instance={RELEASE}")["items"]
    not_ready = [p["metadata"]["name"] for p in pods if p["status"].get("phase") == "Running" and not is_ready(p)]
    if not_ready:
        fail(f"pods not Ready: {not_ready}")
    log(f"1. workloads Ready: {', '.join(names)}; {len(pods)} pods")


def check_crd_validation():
    manifest = open("manifests/queuescaler.yaml").read()
    bad = {
        "minReplicas > maxReplicas (CEL rule)": (
            manifest.replace("minReplicas: 0", "minReplicas: 11"), "maxReplicas must be greater than or equal to minReplicas"),
        "bad enum selectPolicy": (
            manifest.replace("selectPolicy: Max            # at most half", "selectPolicy: Sometimes  # at most half"),
            "Unsupported value"),
    }
    for what, (doc, expected) in bad.items():
        if doc == manifest:
            fail(f"could not build the invalid QueueScaler for {what}")
        p = k("apply", "--dry-run=server", "-f", "-", input=doc, check=False)
        if p.returncode == 0 or expected not in p.stderr:
            fail(f"apiserver accepted an invalid QueueScaler ({what}): rc={p.returncode} {p.stderr.strip()}")
        line = next(ln for ln in p.stderr.splitlines() if expected in ln)
        log(f"2. apiserver rejected {what}: {line.strip()[:200]}")
    k("apply", "-f", "manifests/queuescaler.yaml")
    log("2. apiserver accepted manifests/queuescaler.yaml")


def worker_replicas():
    return kjson("get", "deployment", WORKER)["spec"].get("replicas", 0)


def check_rbac():
    yes = [("patch", "deployments.apps", "--subresource=scale", "-n", NS), ("get", "queuescalers.warren.dev", "-n", NS)]
    no = [("create", "clusterrolebindings"), ("delete", "nodes"), ("get", "secrets", "-n", "kube-system"),
          ("patch", "deployments.apps", "-n", NS)]
    for check in yes + no:
        p = subprocess.run([KUBECTL, "auth", "can-i", *check, "--as", CONTROLLER_SA], capture_output=True, text=True)
        allowed = p.stdout.strip() == "yes"
        if allowed != (check in yes):
            fail(f"{CONTROLLER_SA} can-i {' '.join(check)}: {p.stdout.strip()}")
    pod = kjson("get", "pods", "-l", "app.kubernetes.io/component=controller")["items"][0]
    if pod["spec"].get("serviceAccountName") != f"{RELEASE}-controller":
        fail(f"controller pod runs as {pod['spec'].get('serviceAccountName')}")
    log(f"4. controller runs as {CONTROLLER_SA}; RBAC lets it scale, not administer")


def audit_scalers():
    """Identities that wrote the worker Deployment's scale subresource, from the audit log."""
    users = set()
    with open(os.path.join(STATE, "logs", "audit.log")) as f:
        for line in f:
            ev = json.loads(line)
            ref = ev.get("objectRef", {})
            if ref.get("resource") == "deployments" and ref.get("subresource") == "scale" \
                    and ref.get("name") == WORKER and ev.get("verb") in ("patch", "update") \
                    and ev.get("stage") == "ResponseComplete" and ev.get("responseStatus", {}).get("code", 0) < 300:
                users.add(ev["user"]["username"])
    return users


def check_printer_columns():
    out = k("get", "qs").stdout.splitlines()
    header = re.split(r"\s{2,}", out[0].strip())
    row = re.split(r"\s{2,}", out[1].strip())
    if len(row) != len(header) or any(c in ("", "<none>") for c in row):
        fail(f"kubectl get qs: columns not all filled:\n" + "\n".join(out))
    log(f"5. kubectl get qs: {dict(zip(header, row))}")


def rabbit_queue(port, user, password, name):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/queues/%2F/{name}")
    req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise


def main():
    check_workloads_ready()
    check_crd_validation()
    check_rbac()

    token = sender_token()
    if token:
        SEND_HEADERS["Authorization"] = f"Bearer {token}"
        log("3. token for the sender created through warren-admin's API")
    sender = PortForward(f"svc/{RELEASE}-sender", 80)
    marker = f"local-e2e marker {int(time.time())}."
    code = post_job(sender.port, marker)
    if code != 202:
        fail(f"POST /send through port-forward: HTTP {code}")

    def marker_done():
        for p in ready_pods("app.kubernetes.io/component=worker"):
            logs = k("logs", p["metadata"]["name"], check=False).stdout
            if marker in logs and "job done" in logs:
                return p["metadata"]["name"]
        return None
    pod = wait("the marker job processed by a worker", marker_done, every=2)
    log(f"3. job POSTed through port-forward (202) done by worker pod {pod}")

    sec = kjson("get", "secret", f"{RELEASE}-rabbitmq")["data"]
    user, password = (base64.b64decode(sec[x]).decode() for x in ("username", "password"))
    mgmt = PortForward(f"svc/{RELEASE}-rabbitmq", 15672)
    before = (rabbit_queue(mgmt.port, user, password, "tasks") or {}).get("message_stats", {}).get("redeliver", 0)

    suffix = "." * DOTS
    codes = [post_job(sender.port, f"burst job {i}{suffix}") for i in range(JOBS)]
    if codes.count(202) != JOBS:
        fail(f"burst: {codes.count(202)} of {JOBS} accepted with 202")
    log(f"sent {JOBS} jobs of {DOTS}s, all 202")

    peak = wait("worker scale-up above 1", lambda: (r := worker_replicas()) > 1 and r)
    log(f"4. workers scaled up to {peak}")
    users = audit_scalers()
    if users != {CONTROLLER_SA}:
        fail(f"worker Deployment's scale written by {users}, expected only {CONTROLLER_SA}")
    log(f"4. audit log: deployments/{WORKER}/scale written only by {CONTROLLER_SA}")
    check_printer_columns()

    # Scale-in: every time a worker pod starts terminating, its deletion cost must
    # not exceed the cost of any pod the ReplicaSet kept.
    # An idle worker exits at once on SIGTERM, so its pod may be gone before a poll sees
    # it terminating: a pod of the previous poll missing from this one was deleted too
    # (judged with its cost and readiness as of that poll).
    seen, decisions, last_ready, prev = set(), [], {}, {}
    deadline = time.time() + 2 * TIMEOUT

    def cost_of(p):
        return int(p["metadata"].get("annotations", {}).get(COST, "0"))
    while True:
        pods = kjson("get", "pods", "-l", "app.kubernetes.io/component=worker")["items"]
        live = {p["metadata"]["name"]: p for p in pods if not p["metadata"].get("deletionTimestamp")}
        present = {p["metadata"]["name"] for p in pods}
        deleted = [p for p in pods if p["metadata"].get("deletionTimestamp")]
        deleted += [p for n, p in prev.items() if n not in present]
        for p in deleted:
            name = p["metadata"]["name"]
            if name not in seen:
                seen.add(name)
                # The ReplicaSet ranks not-Ready pods before Ready ones and only then
                # by deletion cost: compare with the kept pods of the same readiness.
                # (Readiness as of the previous poll: a terminating pod turns not Ready.)
                was_ready = last_ready.get(name, is_ready(p))
                kept = {n: cost_of(q) for n, q in live.items() if is_ready(q) == was_ready}
                decisions.append((name, cost_of(prev.get(name, p)), kept))
        last_ready = {p["metadata"]["name"]: is_ready(p) for p in pods}
        prev = live
        q = rabbit_queue(mgmt.port, user, password, "tasks") or {}
        peak = max(peak, worker_replicas())
        if q.get("messages", 1) == 0 and worker_replicas() < peak and len(live) <= worker_replicas():
            break
        if time.time() > deadline:
            fail(f"no scale-in below {peak} with an empty queue after {2 * TIMEOUT}s")
        time.sleep(0.5)
    log(f"6. scaled in to {worker_replicas()} from a peak of {peak}; {len(decisions)} pod deletions observed")
    for name, cost, kept in decisions:
        cheaper_kept = {n: c for n, c in kept.items() if c < cost}
        if cheaper_kept:
            fail(f"ReplicaSet deleted {name} (cost {cost}) but kept cheaper pods {cheaper_kept}")
        log(f"6. deleted {name} (deletion cost {cost}); kept {kept}")
    if not decisions:
        fail("no worker pod deletion observed during the scale-in")

    wait("the terminating workers gone", lambda: not any(
        p["metadata"].get("deletionTimestamp")
        for p in kjson("get", "pods", "-l", "app.kubernetes.io/component=worker")["items"]))
    q = rabbit_queue(mgmt.port, user, password, "tasks") or {}
    redelivered = q.get("message_stats", {}).get("redeliver", 0) - before
    dead = (rabbit_queue(mgmt.port, user, password, "tasks.dead") or {}).get("messages", 0)
    if redelivered or dead:
        fail(f"jobs interrupted: {redelivered} redelivered, {dead} dead-lettered")
    log("6. no job interrupted: 0 redelivered, 0 dead-lettered")
    mgmt.close()
    sender.close()

    p = subprocess.run([HELM, "test", RELEASE, "-n", NS, "--timeout", "3m"], capture_output=True, text=True)
    if p.returncode != 0:
        fail(f"helm test {RELEASE}: {p.stdout}{p.stderr}")
    log(f"7. helm test {RELEASE} passed")
    log("local e2e passed")


if __name__ == "__main__":
    main()
