"""Rules of the workloads: worker replicas, downward API, grace period, AMQP_URL from the
Secret, probes, the sender Service, RabbitMQ's StatefulSet, services and configuration."""

from __future__ import annotations

import re

import pytest

from conftest import USER_ENV, VARIATIONS, env_of, helm_template


def deployment(rendered, component: str) -> dict:
    return rendered.one("Deployment", f"warren-{component}")


def container(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]["containers"][0]


# --- worker ---------------------------------------------------------------------------

def test_managed_worker_has_no_replicas(defaults):
    worker = deployment(defaults, "worker")
    assert "replicas" not in worker["spec"], "helm upgrade would undo the QueueScaler"


@pytest.mark.parametrize("variation", [v for v in VARIATIONS if v != "fixed-workers"])
def test_worker_has_no_replicas_whenever_a_scaler_manages_it(variation, render):
    worker = deployment(render(variation), "worker")
    assert "replicas" not in worker["spec"]
    assert worker["metadata"]["annotations"]["warren.dev/replicas-managed-by"] == "QueueScaler"


def test_unmanaged_worker_has_the_replicas_value(render):
    rendered = render("fixed-workers")
    assert deployment(rendered, "worker")["spec"]["replicas"] == 3
    assert rendered.kinds("QueueScaler") == []


def test_the_other_workloads_always_set_replicas(render):
    rendered = render("ha")
    assert deployment(rendered, "sender")["spec"]["replicas"] == 2
    assert deployment(rendered, "controller")["spec"]["replicas"] == 2
    assert rendered.one("StatefulSet", "warren-rabbitmq")["spec"]["replicas"] == 3


def test_scaler_without_managed_worker_is_refused(helm):
    proc = helm_template(helm, ["--set", "worker.managedByQueueScaler=false", "--set", "queueScaler.enabled=true"])
    assert proc.returncode != 0
    assert "managedByQueueScaler" in proc.stderr


def test_worker_pod_name_from_the_downward_api(defaults):
    env = env_of(container(deployment(defaults, "worker")))
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}


@pytest.mark.parametrize("variation", sorted(VARIATIONS))
def test_grace_period_outlasts_the_longest_job(variation, render):
    worker = deployment(render(variation), "worker")
    grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    env = env_of(container(worker))
    seconds_per_dot = float(env["WARREN_SECONDS_PER_DOT"]["value"])
    # The sender's default dot rule accepts at most 40 dots.
    assert grace > 40 * seconds_per_dot, (grace, seconds_per_dot)


@pytest.mark.parametrize("args", [
    ["--set", "worker.longestJobSeconds=60", "--set", "worker.terminationGracePeriodSeconds=60"],
    ["--set", "worker.terminationGracePeriodSeconds=30"],
    # 40 dots x 2 s = 80 s, above the default grace of 60 s, whatever longestJobSeconds says.
    ["--set", "worker.secondsPerDot=2"],
    ["--set", "worker.secondsPerDot=1.5", "--set", "worker.terminationGracePeriodSeconds=60"],
])
def test_grace_period_not_above_longest_job_is_refused(args, helm):
    proc = helm_template(helm, args)
    assert proc.returncode != 0
    assert "must be above the longest job" in proc.stderr


def test_grace_period_just_above_the_longest_job_is_accepted(render):
    rendered = render(["--set", "worker.secondsPerDot=1.5", "--set", "worker.terminationGracePeriodSeconds=61"])
    worker = deployment(rendered, "worker")
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 61
    assert env_of(container(worker))["WARREN_SECONDS_PER_DOT"]["value"] == "1.5"


def test_worker_settings_reach_the_environment(render):
    env = env_of(container(deployment(render("long-jobs"), "worker")))
    assert env["WARREN_SECONDS_PER_DOT"]["value"] == "10"
    assert env["WARREN_CONCURRENCY"]["value"] == "1"
    assert env["WARREN_PREFETCH"]["value"] == "1"
    assert env["WARREN_LISTEN_ADDR"]["value"] == "0.0.0.0:9090"


def test_concurrency_raises_a_lower_prefetch_to_it(render):
    env = env_of(container(deployment(render(["--set", "worker.concurrency=10"]), "worker")))
    assert env["WARREN_CONCURRENCY"]["value"] == "10"
    assert env["WARREN_PREFETCH"]["value"] == "10"
    env = env_of(container(deployment(
        render(["--set", "worker.concurrency=4", "--set", "worker.prefetch=8",
                "--set", "worker.terminationGracePeriodSeconds=100"]), "worker")))
    assert env["WARREN_CONCURRENCY"]["value"] == "4"
    assert env["WARREN_PREFETCH"]["value"] == "8"


def test_grace_period_covers_every_job_handed_to_a_worker(helm):
    """prefetch 8 at concurrency 4: two rounds of the longest job (40 s) after SIGTERM."""
    proc = helm_template(helm, ["--set", "worker.concurrency=4", "--set", "worker.prefetch=8"])
    assert proc.returncode != 0
    assert "must be above the longest job times ceil(prefetch x queues / concurrency)" in proc.stderr


# --- AMQP credentials -----------------------------------------------------------------

@pytest.mark.parametrize("component", ["sender", "worker"])
def test_amqp_url_is_built_from_the_secret(component, defaults):
    env = env_of(container(deployment(defaults, component)))
    for var, key in (("RABBITMQ_USERNAME", "username"), ("RABBITMQ_PASSWORD", "password")):
        assert env[var]["valueFrom"]["secretKeyRef"] == {"name": "warren-rabbitmq", "key": key}
        assert "value" not in env[var]
    assert env["AMQP_URL"]["value"] == \
        "amqp://$(RABBITMQ_USERNAME):$(RABBITMQ_PASSWORD)@warren-rabbitmq:5672/%2f"
    names = [e["name"] for e in container(deployment(defaults, component))["env"]]
    # Dependent variables must be defined before the one that uses them.
    assert names.index("RABBITMQ_PASSWORD") < names.index("AMQP_URL")


def test_no_password_appears_outside_the_secrets(render):
    password = "Sup3rSecretPassw0rd"
    rendered = render(["--set", f"rabbitmq.auth.password={password}"])
    holders = [d for d in rendered.docs if password in str(d)]
    assert holders == []  # base64 in the Secret, nowhere in clear text
    secret = rendered.one("Secret", "warren-rabbitmq")
    import base64

    assert base64.b64decode(secret["data"]["password"]).decode() == password
    for name, pod in rendered.pod_specs():
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            for e in c.get("env", []):
                assert "guest" not in str(e.get("value", "")), f"{name}/{e['name']}"


def test_queue_settings_reach_sender_and_worker(render):
    rendered = render("classic-queue")
    for component in ("sender", "worker"):
        env = env_of(container(deployment(rendered, component)))
        assert env["WARREN_QUEUE"]["value"] == "tasks"
        assert env["WARREN_QUEUE_TYPE"]["value"] == "classic"
    assert env_of(container(deployment(rendered, "sender")))["WARREN_QUEUES"]["value"] == "sms,email"
    assert env_of(container(deployment(render("defaults"), "worker")))["WARREN_QUEUE_TYPE"]["value"] == "quorum"


# --- probes and ports -----------------------------------------------------------------

@pytest.mark.parametrize("component,port", [("sender", 8080), ("worker", 9090), ("controller", 8080)])
def test_warren_probes(component, port, defaults):
    c = container(deployment(defaults, component))
    assert c["ports"] == [{"name": "http", "containerPort": port}]
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert env_of(c)["WARREN_LISTEN_ADDR"]["value"] == f"0.0.0.0:{port}"


def test_sender_service_port_80_to_8080(defaults):
    svc = defaults.one("Service", "warren-sender")
    assert svc["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http"}]
    assert svc["spec"]["selector"]["app.kubernetes.io/component"] == "sender"


def test_controller_environment(render):
    env = env_of(container(deployment(render("defaults"), "controller")))
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["WARREN_WATCH_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["WARREN_LEADER_ELECTION"]["value"] == "true"
    assert env["WARREN_LEASE_NAME"]["value"] == "warren-controller"
    assert "AMQP_URL" not in env  # the broker comes from each QueueScaler
    cluster_env = env_of(container(deployment(render("cluster-rbac"), "controller")))
    assert "WARREN_WATCH_NAMESPACE" not in cluster_env


def test_every_selector_matches_its_pod_template(render):
    for variation in VARIATIONS:
        for w in render(variation).workloads():
            selector = w["spec"]["selector"]["matchLabels"]
            labels = w["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items(), w["metadata"]["name"]


# --- RabbitMQ -------------------------------------------------------------------------

def rabbit(rendered) -> dict:
    return rendered.one("StatefulSet", "warren-rabbitmq")


def test_rabbitmq_image_is_4x(defaults):
    image = container(rabbit(defaults))["image"]
    assert re.fullmatch(r"rabbitmq:4\.\d+(\.\d+)?-management", image), image


def test_rabbitmq_probes_are_exec_probes(defaults):
    """No TCP/HTTP probe: kindnet dropped kubelet probes behind a NetworkPolicy (kind issue
    3875), and `make local-up`'s node agent runs exec probes as the same commands.
    charts/tests/test_rabbitmq_probes.py runs these commands against a real node."""
    c = container(rabbit(defaults))
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["amqp"] == 5672
    assert c["startupProbe"]["exec"]["command"] == ["rabbitmq-diagnostics", "-q", "check_running"]
    assert c["readinessProbe"]["exec"]["command"] == ["rabbitmq-diagnostics", "-q", "check_port_connectivity"]
    assert c["livenessProbe"]["exec"]["command"][0] == "rabbitmq-diagnostics"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert set(c[probe]) & {"tcpSocket", "httpGet", "grpc"} == set(), probe
        assert c[probe]["timeoutSeconds"] >= 10, probe  # the CLI boots an Erlang VM


def test_rabbitmq_data_on_a_pvc(render):
    sts = rabbit(render("defaults"))
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    mounts = {m["name"]: m["mountPath"] for m in container(sts)["volumeMounts"]}
    assert mounts["data"] == "/var/lib/rabbitmq/mnesia"
    volumes = {v["name"] for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert "data" not in volumes  # the claim template provides it
    ephemeral = rabbit(render("no-persistence-registry"))
    assert "volumeClaimTemplates" not in ephemeral["spec"]
    assert {"name": "data", "emptyDir": {}} in ephemeral["spec"]["template"]["spec"]["volumes"]


def test_rabbitmq_headless_service_publishes_not_ready_addresses(defaults):
    sts = rabbit(defaults)
    headless = defaults.one("Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True


def test_rabbitmq_client_service_ports(defaults):
    svc = defaults.one("Service", "warren-rabbitmq")
    ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
    assert ports == {"amqp": 5672, "management": 15672, "prometheus": 15692}


def rabbit_config(rendered) -> dict:
    return rendered.one("ConfigMap", "warren-rabbitmq-config")["data"]


def test_rabbitmq_plugins_management_and_prometheus(defaults):
    data = rabbit_config(defaults)
    plugins = re.fullmatch(r"\[(.*)\]\.\s*", data["enabled_plugins"]).group(1).split(",")
    assert {"rabbitmq_management", "rabbitmq_prometheus"} <= {p.strip() for p in plugins}
    env = env_of(container(rabbit(defaults)))
    assert env["RABBITMQ_ENABLED_PLUGINS_FILE"]["value"] == "/etc/rabbitmq/conf.d/enabled_plugins"


def test_guest_is_not_usable_over_the_network(defaults):
    config = rabbit_config(defaults)["10-warren.conf"]
    settings = dict(
        line.split("=", 1) for line in config.splitlines() if "=" in line and not line.strip().startswith("#")
    )
    settings = {k.strip(): v.strip() for k, v in settings.items()}
    assert settings["loopback_users.guest"] == "true"
    assert "loopback_users" not in settings  # would replace the list (e.g. "none")
    # The config directory is mounted over the image's conf.d, whose defaults say
    # loopback_users.guest = false.
    c = container(rabbit(defaults))
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/etc/rabbitmq/conf.d"]["name"] == "config"
    # The first-boot user comes from the Secret, so guest is never created.
    env = env_of(c)
    assert env["RABBITMQ_DEFAULT_USER"]["valueFrom"]["secretKeyRef"]["name"] == "warren-rabbitmq"
    assert env["RABBITMQ_DEFAULT_PASS"]["valueFrom"]["secretKeyRef"]["key"] == "password"


def test_schema_refuses_a_weak_password(helm):
    # A password is generated when empty; one given must be 12+ URL-safe characters.
    proc = helm_template(helm, ["--set", "rabbitmq.auth.password=guest"])
    assert proc.returncode != 0


def test_rabbitmq_nodes_form_a_cluster_by_classic_config(render):
    config = rabbit_config(render("ha"))["10-warren.conf"]
    nodes = re.findall(r"cluster_formation\.classic_config\.nodes\.(\d+) = (\S+)", config)
    assert [n for n, _ in nodes] == ["1", "2", "3"]
    assert nodes[2][1] == "rabbit@warren-rabbitmq-2.warren-rabbitmq-headless.warren-test.svc.cluster.local"
    env = env_of(container(rabbit(render("ha"))))
    assert env["RABBITMQ_USE_LONGNAME"]["value"] == "true"
    assert env["RABBITMQ_NODENAME"]["value"] == \
        "rabbit@$(MY_POD_NAME).warren-rabbitmq-headless.$(MY_POD_NAMESPACE).svc.cluster.local"


def test_erlang_cookie_is_copied_owner_only(defaults):
    pod = rabbit(defaults)["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    script = " ".join(init["command"])
    assert "chmod 0400 /var/lib/rabbitmq/.erlang.cookie" in script
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["erlang-cookie"]["secret"]["secretName"] == "warren-rabbitmq-erlang-cookie"


def test_images_follow_registry_and_tag(render):
    rendered = render("no-persistence-registry")
    for component in ("sender", "worker", "controller"):
        assert container(deployment(rendered, component))["image"] == f"ghcr.io/acme/warren-{component}:1.2.3"
    for component in ("sender", "worker", "controller"):
        assert container(deployment(render("defaults"), component))["image"] == f"warren-{component}:0.1.0"


# --- the environment contract (shared/contracts.md) -----------------------------------

LOG_ENV = {"WARREN_LOG_FORMAT", "WARREN_LOG"}
# The sender's limits against hostile and overloaded clients (chart values sender.*).
SENDER_LIMITS_ENV = {
    "WARREN_HEADER_READ_TIMEOUT_MS": "headerReadTimeoutMs",
    "WARREN_BODY_READ_TIMEOUT_MS": "bodyReadTimeoutMs",
    "WARREN_IDLE_TIMEOUT_MS": "idleTimeoutMs",
    "WARREN_MAX_CONNECTIONS": "maxConnections",
    "WARREN_MAX_BODY_BYTES": "maxBodyBytes",
    "WARREN_MAX_IN_FLIGHT": "maxInFlight",
    "WARREN_CONFIRM_TIMEOUT_MS": "confirmTimeoutMs",
    "WARREN_RETRY_AFTER_SECONDS": "retryAfterSeconds",
}
# The events log retention (warren_broker::EventsLogArgs), in every process that declares it.
EVENTS_ENV = {"WARREN_EVENTS_MAX_AGE", "WARREN_EVENTS_MAX_BYTES"}
# The batching of the sender's `message.accepted` audit events (chart values sender.audit.*).
SENDER_AUDIT_ENV = {
    "WARREN_AUDIT_BATCH": "audit.batch",
    "WARREN_AUDIT_LINGER_MS": "audit.lingerMs",
}
# Every sender variable set from a value of the same meaning, name -> key under sender.
SENDER_VALUES_ENV = SENDER_LIMITS_ENV | SENDER_AUDIT_ENV
# Variables each binary reads (clap `env = ...`), per the contract between the components.
# RABBITMQ_USERNAME / RABBITMQ_PASSWORD exist only so that AMQP_URL can expand them.
CONTRACT_ENV = {
    "sender": {"AMQP_URL", "WARREN_QUEUE", "WARREN_QUEUES", "WARREN_QUEUE_TYPE", "WARREN_LISTEN_ADDR",
               "WARREN_AUTH", "WARREN_DATABASE_URL"} | LOG_ENV | EVENTS_ENV | set(SENDER_VALUES_ENV),
    "worker": {"AMQP_URL", "WARREN_QUEUE", "WARREN_QUEUES", "WARREN_QUEUE_TYPE", "WARREN_LISTEN_ADDR",
               "WARREN_SECONDS_PER_DOT", "WARREN_CONCURRENCY", "WARREN_PREFETCH", "POD_NAME"} | LOG_ENV | EVENTS_ENV,
    "controller": {"WARREN_LISTEN_ADDR", "WARREN_LEADER_ELECTION", "WARREN_LEASE_NAME", "POD_NAMESPACE",
                   "POD_NAME", "WARREN_WATCH_NAMESPACE"} | LOG_ENV | EVENTS_ENV,
}
EXPANSION_ONLY = {"RABBITMQ_USERNAME", "RABBITMQ_PASSWORD"}
REQUIRED_ENV = {
    "sender": {"AMQP_URL", "WARREN_QUEUE", "WARREN_QUEUE_TYPE", "WARREN_LISTEN_ADDR", "WARREN_AUTH"} | LOG_ENV | EVENTS_ENV
              | set(SENDER_VALUES_ENV),
    "worker": {"AMQP_URL", "WARREN_QUEUE", "WARREN_QUEUE_TYPE", "WARREN_LISTEN_ADDR", "WARREN_SECONDS_PER_DOT",
               "WARREN_CONCURRENCY", "WARREN_PREFETCH", "POD_NAME"} | LOG_ENV | EVENTS_ENV,
    "controller": {"WARREN_LISTEN_ADDR", "WARREN_LEADER_ELECTION", "WARREN_LEASE_NAME", "POD_NAMESPACE",
                   "POD_NAME"} | LOG_ENV | EVENTS_ENV,
}


@pytest.mark.parametrize("variation", sorted(VARIATIONS))
@pytest.mark.parametrize("component", sorted(CONTRACT_ENV))
def test_environment_follows_the_contract(component, variation, render):
    names = [e["name"] for e in container(deployment(render(variation), component))["env"]]
    assert len(names) == len(set(names)), names  # no variable set twice
    assert REQUIRED_ENV[component] <= set(names)
    own = set(names) - USER_ENV  # those a variation adds through extraEnv are the user's
    assert own - EXPANSION_ONLY <= CONTRACT_ENV[component], own - CONTRACT_ENV[component]


def test_log_settings_reach_every_component(render):
    rendered = render(["--set", "log.format=text", "--set-json", "log.filter=\"warren=debug,info\""])
    for component in CONTRACT_ENV:
        env = env_of(container(deployment(rendered, component)))
        assert env["WARREN_LOG_FORMAT"]["value"] == "text"
        assert env["WARREN_LOG"]["value"] == "warren=debug,info"


def test_rabbitmq_config_replaces_the_image_defaults(defaults):
    """The image's conf.d disables the management metrics collector and opens guest to
    the network; the chart's conf.d replaces it, so queue depths reach the management
    API that the controller reads, and guest stays on loopback."""
    config = rabbit_config(defaults)["10-warren.conf"]
    assert "disable_metrics_collector" not in config
    assert "loopback_users.guest = false" not in config
    (config_volume,) = [v for v in rabbit(defaults)["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"]
    assert config_volume["configMap"]["name"] == "warren-rabbitmq-config"
    assert "items" not in config_volume["configMap"]  # the whole directory is ours


def test_every_variable_the_chart_sets_is_read_by_warren(defaults):
    """Each variable in the chart's pods is declared by a clap `env = "..."` somewhere in
    warren's crates (a typo here would be silently ignored by the binary)."""
    from conftest import REPO

    declared = set()
    for source in (REPO / "crates").glob("*/src/**/*.rs"):
        declared.update(re.findall(r'env\s*=\s*"([A-Z0-9_]+)"', source.read_text()))
    for component in CONTRACT_ENV:
        names = {e["name"] for e in container(deployment(defaults, component))["env"]}
        assert names - EXPANSION_ONLY <= declared, (component, sorted(names - EXPANSION_ONLY - declared))


# --- the audit events log ---------------------------------------------------------------

def test_every_process_gets_the_events_log_retention(render):
    """Whichever process declares warren.events.log first applies the retention, so all
    three get it; large byte counts stay integers (not 1e+10)."""
    for args, age, size in ((VARIATIONS["defaults"], "7D", "100000000"),
                            (["--set", "events.maxAge=36h", "--set", "events.maxBytes=10000000000"],
                             "36h", "10000000000")):
        rendered = render(args)
        for component in ("sender", "worker", "controller"):
            env = env_of(container(deployment(rendered, component)))
            assert env["WARREN_EVENTS_MAX_AGE"]["value"] == age, component
            assert env["WARREN_EVENTS_MAX_BYTES"]["value"] == size, component


# --- the sender's limits against hostile and overloaded clients -----------------------

def binary_defaults(source: str) -> dict[str, int]:
    """`env = "NAME", default_value_t = EXPR` of a clap struct, EXPR an integer expression."""
    found = {}
    for name, expr in re.findall(r'env\s*=\s*"([A-Z0-9_]+)",\s*default_value_t\s*=\s*([0-9_ *+]+)[,)]', source):
        found[name] = eval(expr.replace("_", ""), {"__builtins__": {}})  # digits and * + only
    return found


def test_sender_values_default_to_the_binary_defaults(defaults):
    """The chart's values are the binary's defaults: a default changed in the code and
    not in values.yaml (or the other way round) fails here."""
    from conftest import CHART, REPO
    import yaml

    source = (REPO / "crates" / "warren-sender" / "src" / "lib.rs").read_text()
    in_binary = binary_defaults(source)
    values = yaml.safe_load((CHART / "values.yaml").read_text())["sender"]
    env = env_of(container(deployment(defaults, "sender")))
    for name, key in SENDER_VALUES_ENV.items():
        assert name in in_binary, f"{name}: no default_value_t found in the sender's flags"
        value = values
        for part in key.split("."):
            value = value[part]
        assert value == in_binary[name], (key, value, name, in_binary[name])
        assert env[name]["value"] == str(in_binary[name]), name


def memory_bytes(quantity: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(quantity[: -len(suffix)]) * factor
    return int(quantity)


def test_sender_memory_limit_fits_its_connection_and_body_bounds(defaults):
    """With the default values the sender cannot be OOM-killed by clients it lets in: every
    allowed connection (~16 KiB each, make bench-hostile) reading a body of maxBodyBytes,
    plus 64 MiB for the rest, stays within its memory limit."""
    env = env_of(container(deployment(defaults, "sender")))
    connections = int(env["WARREN_MAX_CONNECTIONS"]["value"])
    body = int(env["WARREN_MAX_BODY_BYTES"]["value"])
    limit = memory_bytes(container(deployment(defaults, "sender"))["resources"]["limits"]["memory"])
    worst = connections * (16 * 1024 + body) + (64 << 20)
    assert limit >= worst, (limit >> 20, worst >> 20)


def test_sender_limits_reach_the_pod(render):
    """Other values become the pod's variables; large numbers stay integers (not 1e+07)."""
    given = {
        "headerReadTimeoutMs": 4000, "bodyReadTimeoutMs": 7000, "idleTimeoutMs": 30000,
        "maxConnections": 1024, "maxBodyBytes": 10000000, "maxInFlight": 256,
        "confirmTimeoutMs": 2500, "retryAfterSeconds": 5, "audit.batch": 1, "audit.lingerMs": 250,
    }
    args = [a for key, value in given.items() for a in ("--set", f"sender.{key}={value}")]
    env = env_of(container(deployment(render(args), "sender")))
    for name, key in SENDER_VALUES_ENV.items():
        assert env[name]["value"] == str(given[key]), name
