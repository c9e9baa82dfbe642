"""Worker pools: one Deployment (and, when scaled by the chart, one QueueScaler) per pool,
per-pool settings, disjoint selectors, pools of several queues, and the refusal to render
a queue the sender accepts but no pool consumes."""

from __future__ import annotations

import pytest

from conftest import CHART, RELEASE, VARIATIONS, env_of, helm_template, run


def pools_of(rendered) -> dict[str, dict]:
    """Worker Deployments by name."""
    return {d["metadata"]["name"]: d for d in rendered.kinds("Deployment")
            if d["metadata"].get("labels", {}).get("warren.dev/role") == "worker"}


def env(deployment: dict) -> dict[str, dict]:
    return env_of(deployment["spec"]["template"]["spec"]["containers"][0])


def consumed_queues(deployment: dict) -> set[str]:
    e = env(deployment)
    queues = {e["WARREN_QUEUE"]["value"]}
    if "WARREN_QUEUES" in e:
        queues |= {q for q in e["WARREN_QUEUES"]["value"].split(",") if q}
    return queues


def accepted_queues(rendered) -> set[str]:
    e = env(rendered.one("Deployment", "warren-sender"))
    queues = {e["WARREN_QUEUE"]["value"]}
    if "WARREN_QUEUES" in e:
        queues |= {q for q in e["WARREN_QUEUES"]["value"].split(",") if q}
    return queues


def test_defaults_keep_the_single_tasks_pool_and_its_names(defaults):
    pools = pools_of(defaults)
    assert list(pools) == ["warren-worker"]
    worker = pools["warren-worker"]
    assert consumed_queues(worker) == {"tasks"}
    assert worker["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "warren", "app.kubernetes.io/instance": "warren",
        "app.kubernetes.io/component": "worker"}


@pytest.mark.parametrize("variation", sorted(VARIATIONS))
def test_every_queue_the_sender_accepts_has_a_consuming_pool(variation, render):
    rendered = render(variation)
    consumed = set().union(*(consumed_queues(d) for d in pools_of(rendered).values()))
    assert accepted_queues(rendered) <= consumed, variation


def test_three_pools_with_their_own_settings(render):
    rendered = render("pools")
    pools = pools_of(rendered)
    assert set(pools) == {"warren-worker", "warren-worker-sms", "warren-worker-email"}
    assert {name: consumed_queues(d) for name, d in pools.items()} == {
        "warren-worker": {"tasks"}, "warren-worker-sms": {"sms"}, "warren-worker-email": {"email"}}

    sms = pools["warren-worker-sms"]
    assert env(sms)["WARREN_SECONDS_PER_DOT"]["value"] == "0.1"
    assert env(sms)["WARREN_PREFETCH"]["value"] == "2"
    assert env(sms)["WARREN_CONCURRENCY"]["value"] == "2"
    assert sms["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 45
    assert sms["spec"]["template"]["spec"]["containers"][0]["resources"] == {
        "requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"cpu": "200m", "memory": "32Mi"}}
    assert "replicas" not in sms["spec"]

    # Unset keys come from `worker`.
    tasks = pools["warren-worker"]
    assert env(tasks)["WARREN_SECONDS_PER_DOT"]["value"] == "1"
    assert env(tasks)["WARREN_PREFETCH"]["value"] == "1"
    assert tasks["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 60

    email = pools["warren-worker-email"]
    assert email["spec"]["replicas"] == 2
    assert "annotations" not in email["metadata"]


def test_pool_selectors_select_only_their_own_pods(render):
    pools = pools_of(render("pools"))
    for name, deployment in pools.items():
        selector = deployment["spec"]["selector"]["matchLabels"]
        for other_name, other in pools.items():
            labels = other["spec"]["template"]["metadata"]["labels"]
            selected = all(labels.get(k) == v for k, v in selector.items())
            assert selected == (name == other_name), f"{name} selects the pods of {other_name}"


def test_each_scaled_pool_gets_its_own_queuescaler(render):
    rendered = render("pools")
    scalers = {s["metadata"]["name"]: s["spec"] for s in rendered.kinds("QueueScaler")}
    assert set(scalers) == {"warren-worker", "warren-worker-sms"}  # email has enabled=false
    assert scalers["warren-worker"]["scaleTargetRef"]["name"] == "warren-worker"
    assert scalers["warren-worker"]["queue"] == {"name": "tasks", "vhost": "/"}
    sms = scalers["warren-worker-sms"]
    assert sms["scaleTargetRef"]["name"] == "warren-worker-sms"
    assert sms["queue"] == {"name": "sms", "vhost": "/"}
    assert (sms["maxReplicas"], sms["messagesPerReplica"]) == (4, 20)
    # Keys the pool does not set come from the top-level queueScaler.
    assert sms["minReplicas"] == scalers["warren-worker"]["minReplicas"] == 0
    assert sms["pollingIntervalSeconds"] == 5


def test_a_pool_of_several_queues_consumes_them_all_and_is_scaled_over_them(render):
    rendered = render("multi-queue-pool")
    pools = pools_of(rendered)
    assert set(pools) == {"warren-worker", "warren-worker-notify"}
    notify = pools["warren-worker-notify"]
    # WARREN_QUEUE is the first, WARREN_QUEUES the others (the worker takes them in turn).
    assert env(notify)["WARREN_QUEUE"]["value"] == "sms"
    assert env(notify)["WARREN_QUEUES"]["value"] == "email"
    assert "WARREN_QUEUES" not in env(pools["warren-worker"])
    assert notify["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 90

    scalers = {s["metadata"]["name"]: s["spec"] for s in rendered.kinds("QueueScaler")}
    assert set(scalers) == {"warren-worker", "warren-worker-notify"}
    scaler = scalers["warren-worker-notify"]
    assert scaler["scaleTargetRef"]["name"] == "warren-worker-notify"
    assert scaler["queue"] == {"names": ["sms", "email"], "operation": "max", "vhost": "/"}
    assert scaler["maxReplicas"] == 3
    # The one-queue pool's scaler keeps the single-queue form.
    assert scalers["warren-worker"]["queue"] == {"name": "tasks", "vhost": "/"}


@pytest.mark.parametrize("queues, concurrency, prefetch, grace, accepted", [
    # 40 s jobs (40 dots x 1 s). One job per queue may be held: 2 queues -> 2 rounds.
    (["sms", "email"], 1, 1, 81, True),
    (["sms", "email"], 1, 1, 80, False),
    (["sms", "email", "push"], 1, 1, 121, True),
    # Concurrency 2 runs both queues' jobs side by side: one round.
    (["sms", "email"], 2, 2, 41, False),  # prefetch 2 per queue: 4 jobs, 2 rounds
    (["sms", "email"], 2, 2, 81, True),
    (["sms", "email"], 2, 1, 41, False),  # prefetch raised to 2: still 2 rounds
])
def test_grace_period_counts_the_jobs_held_from_every_queue(queues, concurrency, prefetch, grace,
                                                            accepted, helm):
    extra = "{" + ",".join(q for q in queues if q != "tasks") + "}"
    pools = ('[{"name":"worker"},{"name":"worker-notify","queues":%s,"concurrency":%d,"prefetch":%d,'
             '"terminationGracePeriodSeconds":%d}]' % (
                 "[" + ",".join(f'"{q}"' for q in queues) + "]", concurrency, prefetch, grace))
    proc = helm_template(helm, ["--set", f"queue.extra={extra}", "--set-json", f"worker.pools={pools}"],
                         include_crds=False)
    if accepted:
        assert proc.returncode == 0, proc.stderr
    else:
        assert proc.returncode != 0, "accepted"
        assert "ceil(prefetch x queues / concurrency)" in proc.stderr, proc.stderr
        assert f"{len(queues)} queue(s)" in proc.stderr, proc.stderr
        assert 'worker pool "worker-notify"' in proc.stderr, proc.stderr


def test_network_policy_admits_every_pool(render):
    rendered = render("pools")
    policy = rendered.one("NetworkPolicy", "warren-rabbitmq")
    (expression,) = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchExpressions"]
    components = {d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
                  for d in pools_of(rendered).values()}
    assert components == {"worker", "worker-sms", "worker-email"}
    assert set(expression["values"]) == {"sender", "controller"} | components


def test_notes_list_every_pool_and_its_scaler(helm):
    args = VARIATIONS["pools"]
    proc = run([helm, "install", "--dry-run=client", RELEASE, str(CHART), "--namespace", "demo", *args])
    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout.split("NOTES:", 1)[1]
    for expected in (
        "Deployment warren-worker consumes tasks (replicas owned by QueueScaler warren-worker)",
        "Deployment warren-worker-sms consumes sms (replicas owned by QueueScaler warren-worker-sms)",
        "Deployment warren-worker-email consumes email (2 replicas)",
        "kubectl describe queuescaler -n demo warren-worker-sms",
    ):
        assert expected in notes, f"NOTES lack {expected!r}:\n{notes}"
    proc = run([helm, "install", "--dry-run=client", RELEASE, str(CHART), "--namespace", "demo",
                *VARIATIONS["multi-queue-pool"]])
    assert proc.returncode == 0, proc.stderr
    assert ("Deployment warren-worker-notify consumes sms, email "
            "(replicas owned by QueueScaler warren-worker-notify)") in proc.stdout


REFUSED = {
    "extra queue without a pool": (
        ["--set", "queue.extra={sms,email}"],
        'the sender accepts queue "sms" (queue.name / queue.extra) but no worker pool consumes it'),
    "a pool list that forgets the default queue": (
        ["--set-json", 'worker.pools=[{"name":"worker","queues":["sms"]}]'],
        'the sender accepts queue "tasks"'),
    "renamed default queue without a pool": (
        ["--set", "queue.name=jobs", "--set-json", 'worker.pools=[{"name":"worker","queues":["tasks"]}]'],
        'the sender accepts queue "jobs"'),
    "two pools with one name": (
        ["--set-json", 'worker.pools=[{"name":"worker"},{"name":"worker","queues":["sms"]}]'],
        'two pools are named "worker"'),
    "two scalers with one name": (
        ["--set", "queueScaler.enabled=true", "--set-json",
         'worker.pools=[{"name":"worker"},{"name":"worker-sms","queues":["sms"],'
         '"queueScaler":{"name":"warren-worker"}}]'],
        'two QueueScalers would be named "warren-worker"'),
    "a pool name outside worker-*": (
        ["--set-json", 'worker.pools=[{"name":"sms"}]'],
        "/worker/pools/0/name"),
    "no pool at all": (
        ["--set-json", "worker.pools=[]"],
        "/worker/pools"),
    "a pool's grace period below its longest job": (
        ["--set-json", 'worker.pools=[{"name":"worker","secondsPerDot":2}]'],
        'terminationGracePeriodSeconds (60) must be above the longest job'),
    "a pool's scaler on a fixed-size pool": (
        ["--set-json", 'worker.pools=[{"name":"worker","managedByQueueScaler":false,'
         '"queueScaler":{"enabled":true}}]'],
        "queueScaler.enabled needs worker.managedByQueueScaler=true (worker pool \"worker\""),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_pool_mistakes_are_refused_with_a_clear_message(case, helm):
    args, message = REFUSED[case]
    proc = helm_template(helm, args, include_crds=False)
    assert proc.returncode != 0, f"{case}: accepted"
    assert message in proc.stderr, proc.stderr
