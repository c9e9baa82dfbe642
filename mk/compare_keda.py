#!/usr/bin/env python3
"""KEDA and warren side by side on the local cluster (issue 10): `make compare-keda`.

`run` (one mode, on the cluster `make local-up` started with the chart): installs KEDA from the
module `make keda-build` compiled (CRDs, operator, metrics apiserver, the external-metrics
APIService), then runs the same workloads under a KEDA ScaledObject (rabbitmq trigger, http
protocol, QueueLength mode) and under a QueueScaler, with the same min/max/target per replica:
  - burst from zero (min 0) and burst from one (min 1), COMPARE_REPS times each: reaction
    (burst -> first write to the worker's scale subresource by the scaler, from the apiserver's
    audit log), burst -> its count shown by the management API (read every 0.2 s: the lag KEDA
    waits for) and the reaction after that (the scaler's own part), burst -> first job acked by
    a pod created after the burst (worker logs), drain time (burst -> last job acked) against the
    ideal (the desired replicas from t=0);
  - a steady stream of long jobs, then quiet: scale-in while jobs run: worker pods stopped while
    holding a job (their SIGTERM log line), jobs redelivered or dead-lettered (the broker);
  - an idle minute per scaler (queue empty, min 1) and one with neither scaler: broker requests
    (RabbitMQ management access log + AMQP frames of the controller's connection) and
    apiserver requests (apiserver_request_total) per minute above that baseline.
  Results go to $COMPARE_OUT/<mode>.json.
`table`: one table from every $COMPARE_OUT/*.json.

Settings (environment): COMPARE_MODE (defaults|1s), HPA_SYNC_SECONDS (the cluster's HPA sync
period), KEDA_VERSION, KEDA_BIN_DIR, COMPARE_OUT, COMPARE_REPS (3), BURST_JOBS (40), BURST_DOTS (3),
STREAM_JOBS (20), STREAM_DOTS (30; the sender takes at most 5 dots, or exactly 30 or 40), IDLE_SECONDS (60),
COMPARE_SCALERS ("keda warren"), COMPARE_PHASE (stratified|random: the bursts' phase in the scalers'
polling periods); plus those of mk/local_e2e.py.
"""
import base64
import concurrent.futures
import glob
import itertools
import json
import math
import os
import random
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import local_e2e as e2e  # noqa: E402  (kubectl helpers, port-forward, sender and broker calls)
from local_e2e import fail, k, kjson, log, wait  # noqa: E402

import yaml  # noqa: E402  (PyYAML: KEDA's kustomize output)

MODE = os.environ.get("COMPARE_MODE", "defaults")
HPA_SYNC = float(os.environ.get("HPA_SYNC_SECONDS", "15"))
KEDA_VERSION = os.environ.get("KEDA_VERSION", "v2.19.0").lstrip("v")
OUT = os.environ.get("COMPARE_OUT", ".local/compare-keda")
REPS = int(os.environ.get("COMPARE_REPS", "3"))
BURST_JOBS = int(os.environ.get("BURST_JOBS", "40"))
BURST_DOTS = int(os.environ.get("BURST_DOTS", "3"))
STREAM_JOBS = int(os.environ.get("STREAM_JOBS", "20"))
STREAM_DOTS = int(os.environ.get("STREAM_DOTS", "30"))
IDLE_SECONDS = int(os.environ.get("IDLE_SECONDS", "60"))
SCALERS = os.environ.get("COMPARE_SCALERS", "keda warren").split()  # a subset, to debug one side
PHASE = os.environ.get("COMPARE_PHASE", "stratified")  # or random: when in the loop's period a burst comes
MAX_REPLICAS, PER_REPLICA = 10, 5
STATS_LAG = 5  # RabbitMQ's collect_statistics_interval (5 s, not changed by the chart): the management API's lag
SCALE_DOWN_WINDOW = 30  # both scalers, stream scenario only (the defaults, 300 s, would take 5 min)
NS, RELEASE, STATE = e2e.NS, e2e.RELEASE, e2e.STATE
WORKER = e2e.WORKER
KEDA_NS = "keda"
IDENTITIES = {
    "keda": {f"system:serviceaccount:{KEDA_NS}:keda-operator",
             "system:serviceaccount:kube-system:horizontal-pod-autoscaler"},
    "warren": {f"system:serviceaccount:{NS}:{RELEASE}-controller"},
}
# KEDA's polling: the operator's loop (pollingInterval, activation 0 <-> 1) and the HPA's sync.
KEDA_POLL = 1 if MODE == "1s" else 30
WARREN_POLL = 1 if MODE == "1s" else 5
SEP = "-" * 100


# ---------------------------------------------------------------- KEDA install

def keda_manifests():
    """KEDA's own `config/minimal` (CRDs, RBAC, operator, metrics apiserver, APIService; no
    admission webhooks), rendered from the module `make keda-build` compiled, with the release's
    image tags. The pods' `command` (/keda, /keda-adapter: paths inside the images) is dropped so
    the node agent runs the image's entrypoint, which localcluster/images.yaml maps to the binary."""
    moddir = subprocess.run(["go", "list", "-m", "-f", "{{.Dir}}", "github.com/kedacore/keda/v2"],
                            cwd="compare/keda", capture_output=True, text=True, check=True).stdout.strip()
    out = subprocess.run([e2e.KUBECTL, "kustomize", os.path.join(moddir, "config", "minimal")],
                         capture_output=True, text=True, check=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    images = {"keda-operator": "keda", "keda-metrics-apiserver": "keda-metrics-apiserver"}
    for d in docs:
        if d["kind"] == "Deployment":
            for c in d["spec"]["template"]["spec"]["containers"]:
                c.pop("command", None)
                if d["metadata"]["name"] == "keda-operator":
                    # no admission webhooks here (config/minimal), as KEDA's chart does without them
                    c["args"].append("--enable-webhook-patching=false")
                c["image"] = f"ghcr.io/kedacore/{images[d['metadata']['name']]}:{KEDA_VERSION}"
                c["imagePullPolicy"] = "IfNotPresent"
    return docs


def install_keda():
    docs = keda_manifests()
    p = subprocess.run([e2e.KUBECTL, "apply", "--server-side", "-f", "-"], input=yaml.safe_dump_all(docs),
                       capture_output=True, text=True)
    if p.returncode != 0:
        fail(f"kubectl apply KEDA: {p.stderr}")
    log(f"KEDA {KEDA_VERSION}: {len(docs)} objects applied (config/minimal)")
    kk = ["-n", KEDA_NS]
    def certs():
        p = k(*kk, "get", "secret", "kedaorg-certs", "-o", "json", check=False)
        return p.returncode == 0 and "tls.crt" in (json.loads(p.stdout).get("data") or {})
    wait("KEDA's operator to write its certificates (Secret kedaorg-certs)", certs, timeout=240, every=3)
    # Secret volumes are written when a pod starts: restart the pods that started before it.
    k(*kk, "delete", "pod", "-l", "app in (keda-operator,keda-metrics-apiserver)", "--wait=false")
    for dep in ("keda-operator", "keda-metrics-apiserver"):
        k(*kk, "rollout", "status", f"deployment/{dep}", "--timeout=240s")

    def available():
        api = kjson("get", "apiservice", "v1beta1.external.metrics.k8s.io")
        return any(c["type"] == "Available" and c["status"] == "True" for c in api["status"].get("conditions", []))
    wait("APIService v1beta1.external.metrics.k8s.io Available", available, timeout=180)
    log("KEDA operator and metrics apiserver Ready; external metrics APIService Available")


# ---------------------------------------------------------------- scaler objects

def broker_credentials():
    sec = kjson("get", "secret", f"{RELEASE}-rabbitmq")["data"]
    return tuple(base64.b64decode(sec[x]).decode() for x in ("username", "password"))


def scaled_object_name(seq):
    """Each arming gets a ScaledObject (and so an HPA, `keda-hpa-<name>`) of its own name. The HPA
    controller keeps its scale recommendations per HPA name in memory and drops them only when it
    next syncs that name and finds it gone: an HPA of the same name created within one sync period
    (15 s) of the last one's deletion took over the last burst's recommendation and, with the
    downscale stabilization (the max over 5 min), scaled the idle worker back to 8 before the next
    burst. A QueueScaler does not carry over: warren's controller keys its memory by the object's uid."""
    return f"{WORKER}-{seq}"


def keda_hpas(hpas):
    """The names of KEDA's HPAs among `kubectl get hpa -o json`'s items."""
    return [h["metadata"]["name"] for h in hpas if h["metadata"]["name"].startswith("keda-hpa-")]


SCALED_OBJECTS = itertools.count(1)
scaled_object = WORKER  # the ScaledObject armed last


def keda_objects(min_replicas, scale_down_window=None):
    global scaled_object
    scaled_object = scaled_object_name(next(SCALED_OBJECTS))
    user, password = broker_credentials()
    host = f"http://{user}:{password}@{RELEASE}-rabbitmq.{NS}.svc.cluster.local:15672/"
    so = {
        "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": scaled_object},
        "spec": {
            "scaleTargetRef": {"name": WORKER},
            "minReplicaCount": min_replicas, "maxReplicaCount": MAX_REPLICAS,
            "triggers": [{"type": "rabbitmq", "authenticationRef": {"name": "compare-rabbitmq"},
                          "metadata": {"protocol": "http", "queueName": "tasks", "vhostName": "/",
                                       "mode": "QueueLength", "value": str(PER_REPLICA),
                                       "activationValue": "0"}}],
        },
    }
    if MODE == "1s":
        so["spec"]["pollingInterval"] = 1
    if scale_down_window is not None:
        so["spec"]["advanced"] = {"horizontalPodAutoscalerConfig": {"behavior": {
            "scaleDown": {"stabilizationWindowSeconds": scale_down_window}}}}
    return [
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "compare-rabbitmq"}, "stringData": {"host": host}},
        {"apiVersion": "keda.sh/v1alpha1", "kind": "TriggerAuthentication", "metadata": {"name": "compare-rabbitmq"},
         "spec": {"secretTargetRef": [{"parameter": "host", "name": "compare-rabbitmq", "key": "host"}]}},
        so,
    ]


def warren_objects(min_replicas, scale_down_window=None):
    spec = {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": WORKER},
        "queue": {"name": "tasks", "vhost": "/"},
        "broker": {"managementUrl": f"http://{RELEASE}-rabbitmq:15672", "amqpUrl": f"amqp://{RELEASE}-rabbitmq:5672",
                   "credentialsSecretRef": {"name": f"{RELEASE}-rabbitmq"}},
        "minReplicas": min_replicas, "maxReplicas": MAX_REPLICAS, "messagesPerReplica": PER_REPLICA,
        "activationMessages": 0, "countUnacked": True,
    }
    if MODE == "1s":
        spec["pollingIntervalSeconds"] = 1
    if scale_down_window is not None:
        spec["behavior"] = {"scaleDown": {"stabilizationWindowSeconds": scale_down_window}}
    return [{"apiVersion": "warren.dev/v1alpha1", "kind": "QueueScaler", "metadata": {"name": WORKER}, "spec": spec}]


def delete_scalers():
    if "keda" in SCALERS:
        k("delete", "scaledobject", "--all", "--wait=true", "--timeout=120s")
        wait("KEDA's HPAs gone", lambda: not keda_hpas(kjson("get", "hpa")["items"]), timeout=120)
    k("delete", "queuescaler", WORKER, "--ignore-not-found", "--wait=true", "--timeout=120s")


def apply_objects(objs):
    p = subprocess.run([e2e.KUBECTL, "-n", NS, "apply", "-f", "-"], input=yaml.safe_dump_all(objs),
                       capture_output=True, text=True)
    if p.returncode != 0:
        fail(f"kubectl apply: {p.stderr}")


def worker_pods():
    return kjson("get", "pods", "-l", "app.kubernetes.io/component=worker")["items"]


def settle(replicas, broker):
    """No scaler; the worker Deployment at `replicas`, every pod Ready, none terminating; and the
    management API showing the queue empty. Its counts lag the queue by up to 9 s: a scaler armed
    while it still showed the last burst's jobs scaled up on them before the next burst."""
    delete_scalers()
    k("scale", f"deployment/{WORKER}", f"--replicas={replicas}")

    def settled():
        pods = worker_pods()
        return len(pods) == replicas and all(e2e.is_ready(p) and not p["metadata"].get("deletionTimestamp")
                                             for p in pods)
    wait(f"{WORKER} settled at {replicas}", settled, timeout=240)
    wait("the management API showing the queue empty", lambda: shows_empty(broker), timeout=60, every=0.5)


def shows_empty(broker):
    try:
        return broker.queue().get("messages", 1) == 0
    except (OSError, ValueError):  # as CountWatch: a dropped port-forward or a cut-off reply, read again
        return False


def arm(scaler, min_replicas, scale_down_window=None):
    objs = (keda_objects if scaler == "keda" else warren_objects)(min_replicas, scale_down_window)
    apply_objects(objs)
    if scaler == "keda":
        def ready():
            so = kjson("get", "scaledobject", scaled_object)
            ok = any(c["type"] == "Ready" and c["status"] == "True" for c in so.get("status", {}).get("conditions", []))
            return ok and k("get", "hpa", f"keda-hpa-{scaled_object}", check=False).returncode == 0
        wait("ScaledObject Ready and its HPA created", ready, timeout=120, every=0.2)
    else:
        def observed():
            return kjson("get", "queuescaler", WORKER).get("status", {}).get("observedGeneration")
        wait("QueueScaler observed", observed, timeout=120, every=0.2)


# ---------------------------------------------------------------- observations

class Broker:
    """The management API through port-forward (its requests come from 127.0.0.1 in the pod,
    which the access-log count leaves out)."""

    def __init__(self):
        self.user, self.password = broker_credentials()
        self.pf = e2e.PortForward(f"svc/{RELEASE}-rabbitmq", 15672)

    def get(self, path):
        req = urllib.request.Request(f"http://127.0.0.1:{self.pf.port}{path}")
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode())
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def queue(self, name="tasks"):
        return self.get(f"/api/queues/%2F/{name}")

    def acks(self):
        return self.queue().get("message_stats", {}).get("ack", 0)

    def controller_frames(self):
        """AMQP frames received from warren-controller's connection (its passive declares)."""
        return sum(c.get("recv_cnt", 0) for c in self.get("/api/connections")
                   if c.get("client_properties", {}).get("connection_name") == "warren-controller")


def access_log_requests():
    """HTTP requests to RabbitMQ's management API so far, except those from 127.0.0.1 (ours)."""
    p = k("exec", f"{RELEASE}-rabbitmq-0", "--", "sh", "-c", "cat /var/log/rabbitmq/access.log*", check=False)
    return sum(1 for line in p.stdout.splitlines() if line.strip() and not line.startswith("127.0.0.1"))


def apiserver_requests(text=None):
    """apiserver_request_total by verb and resource (group/resource/subresource)."""
    if text is None:
        text = k("get", "--raw", "/metrics").stdout
    out = {}
    for line in text.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels, value = line.rsplit(" ", 1)
        lab = dict(kv.split("=", 1) for kv in labels[len("apiserver_request_total{"):-1].split(",") if "=" in kv)
        lab = {key: v.strip('"') for key, v in lab.items()}
        res = "/".join(x for x in (lab.get("group"), lab.get("resource"), lab.get("subresource")) if x)
        key = f"{lab.get('verb', '?')} {res or '-'}"
        out[key] = out.get(key, 0) + float(value)
    return out


def delta_by_key(after, before, minutes):
    return {key: (v - before.get(key, 0)) / minutes for key, v in after.items() if v - before.get(key, 0) > 0}


def measure_idle(label):
    """Requests per minute with the queue empty and nothing scaling."""
    b = Broker()
    try:
        http0, amqp0, api0 = access_log_requests(), b.controller_frames(), apiserver_requests()
        t0 = time.time()
        time.sleep(IDLE_SECONDS)
        http1, api1 = access_log_requests(), apiserver_requests()
        time.sleep(6)  # connection stats are collected every 5 s
        amqp1 = b.controller_frames()
        minutes = (time.time() - t0 - 6) / 60
    finally:
        b.pf.close()
    # the exec + /metrics calls of the two snapshots are the same in every window (the baseline too)
    by_key = delta_by_key(api1, api0, minutes)
    r = {"broker_http_per_min": (http1 - http0) / minutes, "broker_amqp_per_min": (amqp1 - amqp0) / minutes,
         "apiserver_per_min": sum(by_key.values()), "apiserver_by_request": by_key}
    log(f"idle {label}: broker HTTP {r['broker_http_per_min']:.1f}/min, "
        f"AMQP frames {r['broker_amqp_per_min']:.1f}/min, apiserver {r['apiserver_per_min']:.1f}/min")
    top = sorted(by_key.items(), key=lambda kv: -kv[1])[:12]
    log("  apiserver requests/min by verb and resource: " + ", ".join(f"{key} {v:.1f}" for key, v in top))
    return r


class Audit:
    """Writes to the worker Deployment's scale subresource, from the apiserver's audit log."""

    def __init__(self):
        self.path = os.path.join(STATE, "logs", "audit.log")

    def scale_writes(self, identities, since):
        out = []
        with open(self.path) as f:
            for line in f:
                if '"scale"' not in line or WORKER not in line:
                    continue
                ev = json.loads(line)
                ref = ev.get("objectRef", {})
                if ref.get("resource") == "deployments" and ref.get("subresource") == "scale" \
                        and ref.get("name") == WORKER and ev.get("verb") in ("patch", "update") \
                        and ev.get("stage") == "ResponseComplete" \
                        and ev.get("responseStatus", {}).get("code", 0) < 300 \
                        and ev["user"]["username"] in identities:
                    t = parse_ts(ev["requestReceivedTimestamp"])
                    if t >= since:
                        out.append((t, ev["user"]["username"]))
        return sorted(out)


class ReplicaWatch:
    """spec.replicas of the worker Deployment as the apiserver's watch delivers it: (time, replicas)."""

    def __init__(self):
        self.events = []
        self.proc = subprocess.Popen([e2e.KUBECTL, "-n", NS, "get", "deployment", WORKER, "--watch",
                                      "-o", "jsonpath={.spec.replicas}{\"\\n\"}"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            if line.strip().isdigit():
                self.events.append((time.time(), int(line)))

    def first_above(self, replicas, since):
        return next((t for t, r in list(self.events) if t >= since and r > replicas), None)

    def close(self):
        self.proc.terminate()


class HpaSyncs:
    """When the HPA controller syncs KEDA's HPA. Each sync GETs the target's scale subresource
    (nothing else here GETs deployments/scale: KEDA's operator reads the Deployment from its cache,
    warren's controller from its watch), so a step of apiserver_request_total{verb="GET",
    resource="deployments",subresource="scale"} is a sync. The apiserver's /metrics is read
    directly (TLS with the kubeconfig's client certificate) every POLL seconds; a sync's time is
    the midpoint between the last read without the step and the first with it."""
    KEY = "GET apps/deployments/scale"
    POLL = 0.2

    def __init__(self):
        cfg = yaml.safe_load(open(os.environ["KUBECONFIG"]))
        cluster, user = cfg["clusters"][0]["cluster"], cfg["users"][0]["user"]
        self.url = cluster["server"].rstrip("/") + "/metrics"
        self.tmp = tempfile.mkdtemp(prefix="compare-keda-")
        paths = {}
        for key in ("certificate-authority", "client-certificate", "client-key"):
            if f"{key}-data" in (cluster if key.startswith("cert") else user):
                paths[key] = os.path.join(self.tmp, key)
                with open(paths[key], "wb") as f:
                    f.write(base64.b64decode((cluster if key.startswith("cert") else user)[f"{key}-data"]))
            else:
                paths[key] = (cluster if key.startswith("cert") else user)[key]
        self.ctx = ssl.create_default_context(cafile=paths["certificate-authority"])
        self.ctx.load_cert_chain(paths["client-certificate"], paths["client-key"])

    def count(self):
        with urllib.request.urlopen(self.url, context=self.ctx, timeout=10) as r:
            return apiserver_requests(r.read().decode()).get(self.KEY, 0)

    def next_sync(self, timeout):
        """The time of the next sync (None if none within timeout)."""
        t_prev = time.time()
        c0 = self.count()
        t_prev = (t_prev + time.time()) / 2
        deadline = time.time() + timeout
        while time.time() < deadline:
            time.sleep(self.POLL)
            t = time.time()
            c = self.count()
            t = (t + time.time()) / 2
            if c > c0:
                return (t_prev + t) / 2
            t_prev = t
        return None


def first_visible(samples, base):
    """When the management API first showed a burst: `samples` are (time, messages) reads of the
    queue in order, the first taken before the burst; `base` the count then. The burst shows in the
    first read with more than `base`; its time is the midpoint between that read and the one
    before it. Returns (time, count), or None when no read showed it."""
    prev = None
    for t, n in samples:
        if n is not None and n > base:
            return ((t if prev is None else prev) + t) / 2, n
        prev = t
    return None


class CountWatch:
    """The queue's `messages` (ready + unacked, what KEDA's rabbitmq trigger reads in QueueLength
    mode) in the management API, read every POLL seconds from just before a burst until the burst
    shows: the management API's lag (RabbitMQ publishes queue counts every 5 s, after the queue's
    own tick has written them), which KEDA waits for and warren's AMQP passive declare does not."""
    POLL = 0.2

    def __init__(self, broker, timeout=60):
        self.broker, self.samples, self.errors = broker, [], 0
        self.base = self._read()[1] or 0
        self.deadline = time.time() + timeout
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _read(self):
        t = time.time()
        try:
            n = self.broker.queue().get("messages")
        except (OSError, ValueError):
            self.errors += 1
            n = None
        sample = ((t + time.time()) / 2, n)
        self.samples.append(sample)
        return sample

    def _run(self):
        while not self.stopped.is_set() and time.time() < self.deadline:
            _, n = self._read()
            if n is not None and n > self.base:
                return
            self.stopped.wait(self.POLL)

    def shown(self):
        """(time, count) when the burst showed, None if it did not before the timeout or stop()."""
        self.stopped.set()
        self.thread.join(timeout=15)
        return first_visible(list(self.samples), self.base)


def parse_ts(s):
    s = s.rstrip("Z")
    if "." in s:
        head, frac = s.split(".", 1)
        s = f"{head}.{frac[:6]}"
    return datetime.fromisoformat(s + "+00:00").timestamp()


def job_acks(run_id, pods):
    """(pod, ack time) of every job of this run, from the worker pods' logs ("job done")."""
    out = []
    for p in pods:
        name = p["metadata"]["name"]
        for line in k("logs", name, check=False).stdout.splitlines():
            if run_id not in line or "job done" not in line:
                continue
            try:
                out.append((name, parse_ts(json.loads(line)["timestamp"])))
            except (ValueError, KeyError):
                continue
    return out


def post_burst(port, run_id, n, dots, workers=8):
    msg = "." * dots
    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
        codes = list(ex.map(lambda i: e2e.post_job(port, f"{run_id} {i}{msg}"), range(n)))
    if codes.count(202) != n:
        fail(f"burst {run_id}: {codes.count(202)} of {n} accepted")


def ideal_drain(n, dots):
    replicas = min(MAX_REPLICAS, math.ceil(n / PER_REPLICA))
    return math.ceil(n / replicas) * dots


# ---------------------------------------------------------------- workloads

def burst(scaler, start_replicas, rep, *args):
    """One rep; armed afresh and redone (at most twice) when the worker was scaled before its burst."""
    for attempt in range(3):
        r = burst_once(scaler, start_replicas, rep, *args)
        if r is not None:
            r["redone"] = attempt
            return r
    fail(f"{scaler} from {start_replicas}, rep {rep}: the worker scaled before the burst in 3 attempts")


def scaled_before_burst(start_replicas):
    """The worker's replicas when they are not `start_replicas` just before a burst, else None."""
    replicas = kjson("get", "deployment", WORKER).get("spec", {}).get("replicas")
    return replicas if replicas != start_replicas else None


def burst_once(scaler, start_replicas, rep, sender, broker, audit, watch, syncs=None):
    settle(start_replicas, broker)
    arm(scaler, start_replicas)
    # The burst's phase against the loop that makes the first scale decision: from zero KEDA's
    # operator loop (pollingInterval: activation 0 -> 1), from one the HPA controller's sync,
    # warren's tick. Each starts when its object is armed (the ScaledObject Ready, its HPA created,
    # the QueueScaler observed): rep i of REPS waits (i + 0.5) / REPS of that period after arming
    # (stratified phases), so the reps sample the same points of the period in every run. With a
    # random phase (COMPARE_PHASE=random) KEDA's p50 from zero was 6.8 s in one run, 21.1 s in the next.
    # KEDA reads the management API, whose counts lag up to STATS_LAG: a burst less than that
    # before a poll may be missed by it (one more period). So for KEDA's loops longer than the lag
    # the phases spread over period - STATS_LAG: every burst is seen by the next poll, and the
    # reaction is the time to that poll (the lag's extra period left out: in KEDA's favour).
    # The operator's loop and warren's tick start when armed (their reactions matched the phases:
    # KEDA 24.9/17.0/8.0 s for 25.8/17.5/9.2 expected, warren 4.0/2.2/0.4 for 4.2/2.5/0.8), but the
    # HPA controller's sync does not (KEDA from one 4.0/9.6/5.7 s for 13.3/10/6.7 expected: the HPA
    # is queued again on its updates and on the informer's resync): so from one with a sync period
    # longer than 2 x STATS_LAG, the burst is aligned to an observed sync (HpaSyncs): rep i comes
    # (i + 0.5) / REPS x (period - STATS_LAG) after one; its expected reaction is period - that.
    if scaler == "keda":
        period = KEDA_POLL if start_replicas == 0 else HPA_SYNC
        span = period - STATS_LAG if period > 2 * STATS_LAG else period
    else:
        period = span = WARREN_POLL
    offset = random.uniform(0, period) if PHASE == "random" else (rep + 0.5) / REPS * span
    aligned = None
    if PHASE != "random" and scaler == "keda" and start_replicas > 0 and period > 2 * STATS_LAG and syncs:
        try:
            aligned = syncs.next_sync(timeout=2 * period + 5)
        except (OSError, ValueError) as e:
            log(f"reading the apiserver's /metrics for the HPA's syncs failed: {e}")
        if aligned is None:
            log("no HPA sync seen: this burst's phase is counted from arming, not from a sync")
    if aligned is not None:
        target = aligned + offset
        while target < time.time() + 0.05:
            target += period
        log(f"HPA sync seen at {time.strftime('%H:%M:%S', time.gmtime(aligned))}"
            f".{int(aligned % 1 * 10)}; burst {offset:.1f}s after a sync, expected reaction ~{period - offset:.1f}s")
        time.sleep(target - time.time())
    else:
        time.sleep(offset)
    early = scaled_before_burst(start_replicas)
    if early is not None:
        log(f"{scaler} from {start_replicas}, rep {rep}: the worker at {early} replicas before the burst "
            f"(armed at {start_replicas}): not counted, armed again")
        return None
    before = {p["metadata"]["name"] for p in worker_pods()}
    acks0 = broker.acks()
    run_id = f"cmp-{scaler}-{start_replicas}-{rep}-{int(time.time())}"
    counts = CountWatch(broker)
    t0 = time.time()
    post_burst(sender.port, run_id, BURST_JOBS, BURST_DOTS)
    sent = time.time() - t0
    wait(f"{run_id}: {BURST_JOBS} jobs acked", lambda: broker.acks() - acks0 >= BURST_JOBS, timeout=600, every=1)
    shown = counts.shown()
    pods = worker_pods()
    acks = job_acks(run_id, pods)
    if len(acks) < BURST_JOBS:
        fail(f"{run_id}: {len(acks)} 'job done' lines for {BURST_JOBS} jobs")
    # The scale decision: the first write of the scale subresource by the scaler's identity
    # (audit log), or, when the audit log has not got it, the watch seeing spec.replicas rise.
    writes = audit.scale_writes(IDENTITIES[scaler], t0)
    seen = watch.first_above(start_replicas, t0)
    if writes:
        first, who = writes[0][0], writes[0][1].rsplit(":", 1)[-1]
    elif seen:
        first, who = seen, "watch"
    else:
        fail(f"{run_id}: no scale write by {IDENTITIES[scaler]} after the burst")
    new_acks = [t for name, t in acks if name not in before]
    r = {
        "reaction": first - t0,
        "first_new_ack": (min(new_acks) - t0) if new_acks else None,
        "drain": max(t for _, t in acks) - t0,
        "ideal": ideal_drain(BURST_JOBS, BURST_DOTS),
        "peak": max(len(pods), len(before)),
        "send_seconds": sent,
        "phase": offset, "aligned_to_sync": aligned is not None,
        # burst -> its count shown by the management API (None: not within the watch's timeout)
        "visible": (shown[0] - t0) if shown else None, "visible_count": shown[1] if shown else None,
        "base_count": counts.base,
    }
    fna = f"{r['first_new_ack']:.1f}s" if r["first_new_ack"] is not None else "none"
    vis = (f"count {shown[1]} in the management API at {r['visible']:.2f}s, scale write "
           f"{r['reaction'] - r['visible']:+.2f}s after it" if shown else
           f"count not seen in the management API ({counts.errors} failed reads)")
    log(f"{run_id}: first scale write {r['reaction']:.2f}s ({who}), {vis}, "
        f"first ack by a new pod {fna}, drain {r['drain']:.1f}s (ideal {r['ideal']}s), {len(pods)} pods")
    return r


def stream_then_quiet(scaler, sender, broker):
    """A steady stream of long jobs, then nothing: the scaler scales in while jobs run."""
    settle(1, broker)
    arm(scaler, 1, scale_down_window=SCALE_DOWN_WINDOW)
    q0 = broker.queue()
    redeliver0 = q0.get("message_stats", {}).get("redeliver", 0)
    dead0 = (broker.queue("tasks.dead") or {}).get("messages", 0)
    run_id = f"cmp-stream-{scaler}-{int(time.time())}"
    stopped, seen, peak = {}, set(), 1
    t_end = time.time() + STREAM_JOBS
    i = 0

    def watch():
        nonlocal peak
        pods = worker_pods()
        peak = max(peak, len(pods))
        for p in pods:
            name = p["metadata"]["name"]
            if p["metadata"].get("deletionTimestamp") and name not in seen:
                seen.add(name)
                stopped[name] = sigterm_in_hand(name)
        return pods
    while i < STREAM_JOBS:
        if e2e.post_job(sender.port, f"{run_id} {i}{'.' * STREAM_DOTS}") != 202:
            fail(f"{run_id}: job {i} refused")
        i += 1
        if i % 5 == 0:
            watch()
        time.sleep(max(0.0, (t_end - STREAM_JOBS + i) - time.time()))
    log(f"{run_id}: {STREAM_JOBS} jobs of {STREAM_DOTS}s sent over {STREAM_JOBS}s; waiting for the scale-in to 1")
    deadline = time.time() + 600
    while True:
        pods = watch()
        q = broker.queue()
        if q.get("messages", 1) == 0 and len(pods) == 1 and not pods[0]["metadata"].get("deletionTimestamp") \
                and peak > 1:
            break
        if time.time() > deadline:
            fail(f"{run_id}: no scale-in to 1 within 600 s (pods {len(pods)}, queue {q.get('messages')})")
        time.sleep(1)
    time.sleep(6)  # queue stats are collected every 5 s
    redelivered = broker.queue().get("message_stats", {}).get("redeliver", 0) - redeliver0
    dead = (broker.queue("tasks.dead") or {}).get("messages", 0) - dead0
    busy = sum(1 for v in stopped.values() if v)
    r = {"peak": peak, "stopped": len(stopped), "stopped_busy": busy, "redelivered": redelivered, "dead": dead}
    log(f"{run_id}: peak {peak} pods, {len(stopped)} stopped by the scale-in ({busy} holding a job), "
        f"{redelivered} redelivered, {dead} dead-lettered")
    return r


def sigterm_in_hand(pod):
    """Jobs in hand when the worker got SIGTERM (its log line), 0 if not logged yet."""
    for _ in range(3):
        for line in k("logs", pod, check=False).stdout.splitlines():
            if "SIGTERM" in line:
                try:
                    obj = json.loads(line)
                    return int(obj.get("fields", obj).get("in_hand", 0))
                except (ValueError, KeyError):
                    return 0
        time.sleep(0.3)
    return 0


# ---------------------------------------------------------------- run and table

def run():
    random.seed()
    if "keda" in SCALERS:
        install_keda()
    sender = e2e.PortForward(f"svc/{RELEASE}-sender", 80)
    broker = Broker()
    audit = Audit()
    watch = ReplicaWatch()
    syncs = None
    if "keda" in SCALERS:
        try:
            syncs = HpaSyncs()
        except (OSError, KeyError, IndexError, ValueError, ssl.SSLError) as e:
            log(f"cannot read the apiserver's /metrics directly ({e}): KEDA's bursts from one not aligned to its syncs")
    result = {"mode": MODE, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "keda_version": KEDA_VERSION, "hpa_sync": HPA_SYNC, "keda_poll": KEDA_POLL,
              "warren_poll": WARREN_POLL, "reps": REPS, "phase": PHASE,
              "k8s": json.loads(k("version", "-o", "json").stdout)["serverVersion"]["gitVersion"],
              "rabbitmq": broker.get("/api/overview").get("rabbitmq_version"),
              "burst": [BURST_JOBS, BURST_DOTS], "stream": [STREAM_JOBS, STREAM_DOTS]}
    os.makedirs(OUT, exist_ok=True)

    def save():  # after each workload: a run stopped half-way keeps what it measured
        with open(os.path.join(OUT, f"{MODE}.json"), "w") as f:
            json.dump(result, f, indent=1)
    try:
        settle(1, broker)
        result["idle_baseline"] = measure_idle("baseline (no scaler)")
        for scaler in SCALERS:
            s = result[scaler] = {}
            arm(scaler, 1)
            s["idle"] = measure_idle(scaler)
            save()
            s["from_zero"] = [burst(scaler, 0, i, sender, broker, audit, watch) for i in range(REPS)]
            save()
            s["from_one"] = [burst(scaler, 1, i, sender, broker, audit, watch, syncs) for i in range(REPS)]
            save()
            s["scale_in"] = stream_then_quiet(scaler, sender, broker)
            save()
            delete_scalers()
    finally:
        watch.close()
        sender.close()
        broker.pf.close()
    log(f"results in {OUT}/{MODE}.json")


def pct(xs, q):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


def f1(v):
    return "-" if v is None else (str(v) if isinstance(v, int) else f"{v:.1f}")


def aligned_note(r):
    reps = (r.get("keda") or {}).get("from_one") or []
    n = sum(1 for x in reps if x.get("aligned_to_sync"))
    return f"; KEDA from one: {n} of {len(reps)} aligned to an observed HPA sync" if n else ""


def header(r):
    return (f"mode {r['mode']} ({r['date']}): KEDA {r['keda_version']} (pollingInterval {r['keda_poll']}s, HPA sync "
            f"{r['hpa_sync']:g}s) vs QueueScaler (pollingIntervalSeconds {r['warren_poll']});\n  "
            f"{r['reps']} reps ({r.get('phase', 'random')} phases{aligned_note(r)}); burst {r['burst'][0]} jobs x {r['burst'][1]}s; "
            f"min/max 0|1/{MAX_REPLICAS}, {PER_REPLICA} msgs/replica; Kubernetes {r['k8s']}, RabbitMQ {r['rabbitmq']}")


def footer(r):
    peak = {s: r.get(s, {}).get("scale_in", {}).get("peak", "-") for s in ("keda", "warren")}
    missing = [f"{s} {w}" for s in ("keda", "warren") for w in ("idle", "from_zero", "from_one", "scale_in")
               if w not in r.get(s, {})]
    return (f"scale-in: stream of {r['stream'][0]} jobs x {r['stream'][1]}s, scale-down window "
            f"{SCALE_DOWN_WINDOW}s for both; peak KEDA {peak['keda']}, warren {peak['warren']} pods; "
            f"apiserver baseline {r['idle_baseline']['apiserver_per_min']:.1f}/min"
            + (f"\nNOT MEASURED (the run stopped first): {', '.join(missing)}" if missing else ""))


def rows(r):
    """The table's rows of one mode's results: (label, KEDA, warren); None where a run stopped
    before that workload."""
    base = r["idle_baseline"]
    side = ("keda", "warren")

    def each(workload, f):
        return tuple(f(r[s][workload]) if workload in r.get(s, {}) else None for s in side)
    out = []
    ideal = ideal_drain(*r["burst"])
    for start in ("from_zero", "from_one"):
        label = "zero" if start == "from_zero" else "one"
        for key, what in (("reaction", "burst -> first scale write"),
                          ("visible", "burst -> count in management API"),
                          ("after_visible", "count shown -> first scale write"),
                          ("first_new_ack", "burst -> first ack, new pod")):
            for q in (50, 95):
                out.append((f"from {label}: {what} p{q} (s)",
                            *each(start, lambda xs: pct([burst_figure(x, key) for x in xs], q))))
        out.append((f"from {label}: drain / ideal p50 (ideal {ideal}s)",
                    *each(start, lambda xs: pct([x["drain"] / x["ideal"] for x in xs], 50))))
    for key, what in (("stopped_busy", "scale-in: pods stopped holding a job"),
                      ("redelivered", "scale-in: jobs redelivered"), ("dead", "scale-in: jobs dead-lettered")):
        out.append((what, *each("scale_in", lambda x: x[key])))
    for key, what in (("broker_http_per_min", "idle: broker HTTP requests / min"),
                      ("broker_amqp_per_min", "idle: broker AMQP frames / min"),
                      ("apiserver_per_min", "idle: apiserver requests / min (- baseline)")):
        b = base[key] if key == "apiserver_per_min" else 0
        out.append((what, *each("idle", lambda x: x[key] - b)))
    # The same without WATCH: a watch is counted when it is (re)opened, and every component's
    # informers reopen theirs every 5-10 min, at the same times since they started together: a
    # minute's WATCH count says when the window fell, not what the scaler costs.
    out.append(("idle: apiserver requests / min (- baseline), no WATCH",
                *each("idle", lambda x: no_watch(x) - no_watch(base)
                      if "apiserver_by_request" in x and "apiserver_by_request" in base else None)))
    polls = {"keda": r["keda_poll"], "warren": r["warren_poll"]}
    out.append((f"idle: broker requests per poll ({r['keda_poll']}s / {r['warren_poll']}s)",
                *[(r[s]["idle"]["broker_http_per_min"] + r[s]["idle"]["broker_amqp_per_min"]) * polls[s] / 60
                  if "idle" in r.get(s, {}) else None for s in side]))
    return out


def burst_figure(x, key):
    """One figure of one burst; `after_visible` is the scale write's time after the management
    API showed the burst's count (the scaler's own part; negative when it wrote before). None
    when not measured (runs before the count watch have no `visible`)."""
    if key == "after_visible":
        return x["reaction"] - x["visible"] if x.get("visible") is not None else None
    return x.get(key)


def no_watch(idle):
    return sum(v for key, v in idle["apiserver_by_request"].items() if not key.startswith("WATCH "))


def ratio(a, b):
    num = isinstance(a, (int, float)) and isinstance(b, (int, float))
    return a / b if num and b else None


def complete(path):
    """The results in `path`, None (said) when the run stopped before its baseline."""
    r = json.load(open(path))
    if "idle_baseline" not in r:
        print(f"{path}: the run stopped before measuring anything, not tabled")
        return None
    return r


def table():
    files = sorted(glob.glob(os.path.join(OUT, "*.json")))
    if not files:
        print(f"no results in {OUT}", file=sys.stderr)
        sys.exit(1)
    print(SEP)
    for path in files:
        r = complete(path)
        if r is None:
            continue
        print(header(r))
        print(f"{'':52} {'KEDA':>10} {'warren':>10} {'KEDA/warren':>12}")
        for what, kv, wv in rows(r):
            q = ratio(kv, wv) if min(kv or 0, wv or 0) >= 0 else None  # a negative time: no ratio
            print(f"{what:52} {f1(kv):>10} {f1(wv):>10} {'-' if q is None else f'{q:.2f}':>12}")
        print(footer(r))
        print(SEP)


TOLERANCE = 0.20  # the issue's bar: a run repeats within +-20 %


def off(a, b):
    """'' when b repeats a within TOLERANCE (0 and 0 repeat), '?' when one is missing, else '!'."""
    if a is None or b is None:
        return "" if a == b else "?"
    if a == b:
        return ""
    return "" if a and abs(b / a - 1) <= TOLERANCE else "!"


def compare(path_a, path_b):
    """Run A and run B of one mode side by side: each row of both, B/A, '!' outside +-20 %;
    then rep to rep within each run: every rep of a burst figure against that run's median."""
    a, b = complete(path_a), complete(path_b)
    if a is None or b is None:
        sys.exit(1)
    if a["mode"] != b["mode"]:
        fail(f"{path_a} is mode {a['mode']}, {path_b} mode {b['mode']}")
    print(SEP)
    print(f"A: {path_a}\n   {header(a)}\nB: {path_b}\n   {header(b)}")
    print(f"{'':52} {'KEDA A':>8} {'KEDA B':>8} {'B/A':>6}  {'warren A':>8} {'warren B':>8} {'B/A':>6}")
    flagged = unmeasured = 0
    for (what, ka, wa), (what_b, kb, wb) in zip(rows(a), rows(b)):
        if what != what_b:  # the ideal drain or the poll periods differ: not the same row
            fail(f"rows differ: {what!r} vs {what_b!r}")
        cells = []
        for x, y in ((ka, kb), (wa, wb)):
            q = ratio(y, x)
            flag = off(x, y)
            flagged += flag == "!"
            unmeasured += flag == "?"
            cells.append(f"{f1(x):>8} {f1(y):>8} {('-' if q is None else f'{q:.2f}') + flag:>6}")
        print(f"{what:52} {cells[0]}  {cells[1]}")
    print(f"{flagged} figures outside +-{TOLERANCE:.0%} (!) between A and B"
          + (f"; {unmeasured} measured in one run only (?)" if unmeasured else ""))
    print("rep to rep (each rep's figure / the run's median; ! outside +-20 %):")
    for name, r in (("A", a), ("B", b)):
        for scaler in ("keda", "warren"):
            for start in ("from_zero", "from_one"):
                for key in ("reaction", "visible", "after_visible", "first_new_ack", "drain"):
                    if start not in r.get(scaler, {}):
                        continue
                    xs = [burst_figure(x, key) for x in r[scaler][start]]
                    if all(x is None for x in xs):  # a run before the count watch
                        continue
                    med = statistics.median([x for x in xs if x is not None] or [0])
                    cells = " ".join(f"{f1(x)}{'' if med and x is not None and abs(x / med - 1) <= TOLERANCE else '!'}"
                                     for x in xs)
                    phases = [x.get("phase") for x in r[scaler][start]]
                    if key == "reaction" and None not in phases:  # when in its period each burst came
                        seen = any(x.get("aligned_to_sync") for x in r[scaler][start])
                        cells += (f"   (bursts {'/'.join(f'{p:.1f}' for p in phases)}s after "
                                  f"{'an observed HPA sync' if seen else 'arming'})")
                    print(f"  {name} {scaler:6} {start:9} {key:13} median {f1(med):>5}: {cells}")
    print(SEP)


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else "run"
    if cmd == "compare" and len(sys.argv) == 4:
        compare(sys.argv[2], sys.argv[3])
    elif cmd in ("run", "table"):
        {"run": run, "table": table}[cmd]()
    else:
        print("usage: compare_keda.py run | table | compare A.json B.json", file=sys.stderr)
        sys.exit(2)
