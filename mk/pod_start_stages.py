#!/usr/bin/env python3
"""The stages of the worker pods' starts on the local cluster, after each /scale patch.

Run it on the state directory of a cluster that `make local-up` started, after a run that
scaled workers up (`make e2e-bench`, the scenarios) and before `make local-down` removes it:

    python3 mk/pod_start_stages.py .local/cluster

For every scale-up of a `warren-worker` Deployment by warren's controller (in the e2e-*
namespaces the end-to-end harness creates), one line per new pod with the milliseconds after
the apiserver received the /scale patch at which:
  C   the ReplicaSet controller's pod create was received (Cd: answered),
  B   the scheduler's binding was received (Bd: answered),
  S   the node agent saw the bound pod ("starting pod"),
  V   the pod's network namespace and volumes were ready,
  K   the container process was started ("Started container"),
  W   the worker wrote its first log line ("warren-worker starting"),
  N   the worker's AMQP connection was open ("connected"),
  R   it consumed ("waiting for jobs"),
  J   it started its first job;
then the median and 90th percentile of each stage. Sources: the apiserver's audit log (its
policy records pod creates, bindings and status writes with microsecond timestamps), the node
agent's log lines in logs/localcluster.log, and the worker logs the node agent keeps
(nodeagent/logs/pods/). Standard library only.
"""

import datetime as dt
import glob
import json
import os
import re
import statistics
import sys

STAGES = ["C", "Cd", "B", "Bd", "S", "V", "K", "W", "N", "R", "J"]
SPANS = [
    ("C", "patch -> pod create received (deployment + ReplicaSet controllers)"),
    (("C", "Bd"), "pod create received -> bound (apiserver, scheduler)"),
    (("Bd", "S"), "bound -> node agent sees it (watch)"),
    (("S", "K"), "node agent: pod seen -> container process started"),
    (("S", "V"), "  of which the network namespace and volumes"),
    (("V", "K"), "  of which the container launch (env, fork)"),
    (("K", "W"), "container init, exec, worker main up to its first log line"),
    (("W", "N"), "worker: AMQP connection"),
    (("N", "R"), "worker: declare, qos, consume"),
    (("R", "J"), "consuming -> first job"),
    (("S", "J"), "node agent sees the pod -> first job"),
    ("J", "patch -> first job"),
]
KLOG = re.compile(
    r'^I(\d\d)(\d\d) (\d\d:\d\d:\d\d\.\d+)\s+\d+ \S+\] '
    r'"(starting pod|Started: Started container worker|pod sandbox and volumes ready)[^"]*" pod="[^/"]+/([^"]+)"'
)
WORKER_LINES = {"warren-worker starting": "W", "connected": "N", "waiting for jobs": "R", "job started": "J"}


def stamp(text):
    """RFC 3339 (any fraction) to epoch seconds."""
    text = text.rstrip("Z")
    whole, _, frac = text.partition(".")
    return dt.datetime.strptime(f"{whole}.{(frac + '000000')[:6]}", "%Y-%m-%dT%H:%M:%S.%f").replace(
        tzinfo=dt.timezone.utc).timestamp()


def read_audit(path):
    patches, creates, binds = [], [], {}
    with open(path) as f:
        for line in f:
            e = json.loads(line)
            ref = e.get("objectRef", {})
            if not ref.get("namespace", "").startswith("e2e-"):
                continue
            user = e["user"]["username"]
            times = (stamp(e["requestReceivedTimestamp"]), stamp(e["stageTimestamp"]))
            if ref.get("resource") == "deployments" and ref.get("subresource") == "scale" \
                    and ref.get("name") == "warren-worker" and user.endswith(":warren-controller"):
                patches.append(times)
            elif ref.get("resource") == "pods" and e["verb"] == "create" and ref.get("subresource") is None \
                    and user.endswith(":replicaset-controller"):
                creates.append(times)
            elif ref.get("resource") == "pods" and ref.get("subresource") == "binding":
                binds[ref["name"]] = times
    return patches, creates, binds


def read_agent(path, year):
    seen = {}
    with open(path, errors="replace") as f:
        for line in f:
            m = KLOG.match(line)
            if m:
                key = {"starting pod": "S", "pod sandbox and volumes ready": "V"}.get(m.group(4), "K")
                seen.setdefault(m.group(5), {}).setdefault(
                    key, stamp(f"{year}-{m.group(1)}-{m.group(2)}T{m.group(3)}"))
    return seen


def read_workers(pattern):
    seen = {}
    for path in glob.glob(pattern):
        pod = os.path.basename(os.path.dirname(os.path.dirname(path))).split("_")[1]
        with open(path, errors="replace") as f:
            for line in f:
                try:
                    e = json.loads(line)
                except ValueError:
                    continue
                key = WORKER_LINES.get(e.get("message"))
                if key:
                    seen.setdefault(pod, {}).setdefault(key, stamp(e["timestamp"]))
    return seen


def main():
    state = sys.argv[1] if len(sys.argv) > 1 else ".local/cluster"
    patches, creates, binds = read_audit(os.path.join(state, "logs", "audit.log"))
    year = dt.datetime.now(dt.timezone.utc).year
    agent = read_agent(os.path.join(state, "logs", "localcluster.log"), year)
    workers = read_workers(os.path.join(state, "nodeagent", "logs", "pods", "e2e-*_warren-worker-*", "worker", "0.log"))
    pods = sorted(binds.items(), key=lambda kv: kv[1][0])
    rows = []
    for i, (patched, _) in enumerate(patches):
        until = min(patches[i + 1][0] if i + 1 < len(patches) else float("inf"), patched + 15)
        made = [c for c in creates if patched <= c[0] < until]
        if not made:
            continue
        bound = [(name, b) for name, b in pods if patched <= b[0] < until]
        print(f"\n/scale patch at {dt.datetime.fromtimestamp(patched, dt.timezone.utc):%H:%M:%S.%f}: {len(made)} pods created")
        for k, (name, b) in enumerate(bound):
            c = made[k] if k < len(made) else (None, None)
            seen = {**agent.get(name, {}), **workers.get(name, {})}
            at = dict(zip(STAGES, [c[0], c[1], b[0], b[1]] + [seen.get(s) for s in STAGES[4:]]))
            row = {s: (t - patched) * 1000 for s, t in at.items() if t is not None}
            rows.append(row)
            print(f"  {name}: " + " ".join(f"{s} {row[s]:.0f}" if s in row else f"{s} -" for s in STAGES))
    if not rows:
        print("no scale-up of a warren-worker Deployment by warren's controller found")
        return
    print(f"\nstage (ms; {len(rows)} pods)  median  p90")
    for span, what in SPANS:
        a, b = span if isinstance(span, tuple) else (None, span)
        xs = sorted(r[b] - (r[a] if a else 0) for r in rows if b in r and (a is None or a in r))
        if xs:
            print(f"  {what}: {statistics.median(xs):.0f}  {xs[int(0.9 * (len(xs) - 1))]:.0f}")


if __name__ == "__main__":
    main()
