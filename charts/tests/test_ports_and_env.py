"""Ports as values and extraEnv: each warren component's HTTP port is one value that moves
its listener, container port, probes, Services, scrape annotations, the chart's own
Prometheus and NOTES together; each component's extraEnv lands after the chart's own
variables, in that component only; the probes are one definition shared by all."""

from __future__ import annotations

import pytest
import yaml

from conftest import CHART, RELEASE, env_of, helm_template, run

COMPONENTS = ["sender", "worker", "controller", "admin"]
DEFAULT_PORTS = {"sender": 8080, "worker": 9090, "controller": 8080, "admin": 8080}
MOVED = {"sender": 18080, "worker": 19090, "controller": 18081, "admin": 18082}


def container(rendered, name: str) -> dict:
    return rendered.one("Deployment", name)["spec"]["template"]["spec"]["containers"][0]


def pod_template(rendered, name: str) -> dict:
    return rendered.one("Deployment", name)["spec"]["template"]


def http_port(c: dict) -> int:
    (port,) = [p["containerPort"] for p in c["ports"] if p["name"] == "http"]
    return port


def prometheus_jobs(rendered) -> dict[str, dict]:
    config = yaml.safe_load(rendered.one("ConfigMap", "warren-prometheus")["data"]["prometheus.yml"])
    return {job["job_name"]: job for job in config["scrape_configs"]}


def test_every_warren_container_has_the_same_probes_on_its_http_port(defaults):
    probes = {}
    for component in COMPONENTS:
        c = container(defaults, f"warren-{component}")
        probes[component] = (c["readinessProbe"], c["livenessProbe"])
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert len({repr(p) for p in probes.values()}) == 1, probes


@pytest.mark.parametrize("component", COMPONENTS)
def test_the_default_ports_are_the_binaries_listeners(component, defaults):
    c = container(defaults, f"warren-{component}")
    port = DEFAULT_PORTS[component]
    assert http_port(c) == port
    assert env_of(c)["WARREN_LISTEN_ADDR"]["value"] == f"0.0.0.0:{port}"
    assert pod_template(defaults, f"warren-{component}")["metadata"]["annotations"]["prometheus.io/port"] == str(port)


@pytest.mark.parametrize("component", COMPONENTS)
def test_one_port_value_moves_listener_container_port_probes_services_and_scrapes(component, render):
    rendered = render(["--set", f"{component}.ports.http={MOVED[component]}",
                       "--set", "metrics.prometheus.deploy=true"])
    moved = MOVED[component]
    c = container(rendered, f"warren-{component}")
    assert http_port(c) == moved
    assert env_of(c)["WARREN_LISTEN_ADDR"]["value"] == f"0.0.0.0:{moved}"
    # The probes name the port, so they follow it.
    assert c["readinessProbe"]["httpGet"]["port"] == "http"
    assert c["livenessProbe"]["httpGet"]["port"] == "http"
    assert pod_template(rendered, f"warren-{component}")["metadata"]["annotations"]["prometheus.io/port"] == str(moved)
    # The client Service (sender, admin) targets the named port; the headless one for
    # the chart's Prometheus exposes the port itself, and Prometheus scrapes it.
    if component in ("sender", "admin"):
        (svc_port,) = rendered.one("Service", f"warren-{component}")["spec"]["ports"]
        assert svc_port == {"name": "http", "port": 80, "targetPort": "http"}
    (metrics_port,) = rendered.one("Service", f"warren-{component}-metrics")["spec"]["ports"]
    assert metrics_port == {"name": "http", "port": moved, "targetPort": "http"}
    assert prometheus_jobs(rendered)[component]["dns_sd_configs"][0]["port"] == moved
    # Every other component keeps its port.
    for other in COMPONENTS:
        if other != component:
            assert http_port(container(rendered, f"warren-{other}")) == DEFAULT_PORTS[other], other


def test_the_worker_port_applies_to_every_pool(render):
    rendered = render("ports-and-env")
    for name in ("warren-worker", "warren-worker-sms"):
        c = container(rendered, name)
        assert http_port(c) == 19090, name
        assert env_of(c)["WARREN_LISTEN_ADDR"]["value"] == "0.0.0.0:19090"


def test_the_prometheus_port_moves_its_listener_container_and_service(render):
    rendered = render(["--set", "metrics.prometheus.ports.http=19099", "--set", "metrics.prometheus.deploy=true"])
    c = container(rendered, "warren-prometheus")
    assert "--web.listen-address=:19099" in c["args"]
    assert http_port(c) == 19099
    assert rendered.one("Service", "warren-prometheus")["spec"]["ports"] == [
        {"name": "http", "port": 19099, "targetPort": "http"}]


def test_notes_name_the_sender_port(helm):
    proc = run([helm, "install", "--dry-run=client", RELEASE, str(CHART), "--namespace", "demo",
                "--set", "sender.ports.http=18080"])
    assert proc.returncode == 0, proc.stderr
    assert "Service warren-sender (port 80 -> 18080)" in proc.stdout.split("NOTES:", 1)[1]


# --- extraEnv -------------------------------------------------------------------------

EXPECTED_EXTRA = {
    "warren-sender": [{"name": "HTTP_PROXY", "value": "http://proxy:3128"},
                      {"name": "SENDER_QUEUE_COPY", "value": "$(WARREN_QUEUE)"}],
    "warren-worker": [{"name": "TZ", "value": "UTC"}],
    "warren-worker-sms": [{"name": "SMS_GATEWAY_TOKEN", "valueFrom": {"secretKeyRef": {"name": "sms", "key": "token"}}}],
    "warren-controller": [{"name": "RUST_BACKTRACE", "value": "1"}],
    "warren-admin": [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
}


@pytest.mark.parametrize("name", sorted(EXPECTED_EXTRA))
def test_extra_env_comes_after_the_charts_own_in_its_component_only(name, render, defaults):
    rendered = render("ports-and-env")
    env = container(rendered, name)["env"]
    extra = EXPECTED_EXTRA[name]
    assert env[-len(extra):] == extra
    own = [e["name"] for e in env[:-len(extra)]]
    # The chart's own variables are all still there, unchanged in order, before the extra ones.
    default_name = name if name != "warren-worker-sms" else "warren-worker"
    default_names = [e["name"] for e in container(defaults, default_name)["env"]]
    assert [n for n in own if n in default_names] == default_names
    assert "WARREN_LISTEN_ADDR" in own
    # No other component got them.
    for other, other_extra in EXPECTED_EXTRA.items():
        if other != name:
            names = {e["name"] for e in container(rendered, other)["env"]}
            assert not names & {e["name"] for e in extra}, (other, names)


def test_a_pool_without_its_own_extra_env_takes_the_workers(render):
    rendered = render(["--set", "queue.extra={sms}",
                       "--set-json", 'worker.extraEnv=[{"name":"TZ","value":"UTC"}]',
                       "--set-json", 'worker.pools=[{"name":"worker"},{"name":"worker-sms","queues":["sms"]}]'])
    for name in ("warren-worker", "warren-worker-sms"):
        assert container(rendered, name)["env"][-1] == {"name": "TZ", "value": "UTC"}, name


def test_no_extra_env_by_default(defaults):
    for component in COMPONENTS:
        names = [e["name"] for e in container(defaults, f"warren-{component}")["env"]]
        assert len(names) == len(set(names)), names
        assert all(n.startswith(("WARREN_", "AMQP_URL", "RABBITMQ_", "POD_")) for n in names), names


@pytest.mark.parametrize("component,variable", [("sender", "WARREN_QUEUE"), ("worker", "WARREN_LISTEN_ADDR"),
                                                ("controller", "POD_NAME"), ("admin", "WARREN_ADMIN_TOKEN")])
def test_extra_env_may_not_set_a_variable_of_the_chart(component, variable, helm):
    proc = helm_template(helm, ["--set-json", f'{component}.extraEnv=[{{"name":"{variable}","value":"x"}}]'],
                         include_crds=False)
    assert proc.returncode != 0, f"{component}.extraEnv {variable}: accepted"
    assert f"the variable {variable} is set twice" in proc.stderr, proc.stderr


def test_extra_env_may_not_repeat_a_name(helm):
    proc = helm_template(helm, ["--set-json", 'controller.extraEnv=[{"name":"A","value":"1"},{"name":"A","value":"2"}]'],
                         include_crds=False)
    assert proc.returncode != 0
    assert "controller.extraEnv: the variable A is set twice" in proc.stderr, proc.stderr


def test_a_pools_extra_env_is_checked_too(helm):
    proc = helm_template(helm, ["--set-json", 'worker.pools=[{"name":"worker","extraEnv":[{"name":"WARREN_PREFETCH","value":"9"}]}]'],
                         include_crds=False)
    assert proc.returncode != 0
    assert 'extraEnv of worker pool "worker": the variable WARREN_PREFETCH is set twice' in proc.stderr, proc.stderr



# --- RabbitMQ's listeners -------------------------------------------------------------

RABBIT_MOVED = {"amqp": 5673, "management": 15673, "prometheus": 15693}


def test_rabbitmq_ports_move_its_config_container_services_and_every_client(render):
    rendered = render(["--set", "rabbitmq.ports.amqp=5673", "--set", "rabbitmq.ports.management=15673",
                       "--set", "rabbitmq.ports.prometheus=15693", "--set", "queueScaler.enabled=true",
                       "--set", "metrics.prometheus.deploy=true"])
    conf = rendered.one("ConfigMap", "warren-rabbitmq-config")["data"]["10-warren.conf"].splitlines()
    assert {"listeners.tcp.default = 5673", "management.tcp.port = 15673", "prometheus.tcp.port = 15693"} <= set(conf)
    sts = rendered.one("StatefulSet", "warren-rabbitmq")
    (rabbit,) = [c for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] == "rabbitmq"]
    ports = {p["name"]: p["containerPort"] for p in rabbit["ports"]}
    assert {name: ports[name] for name in RABBIT_MOVED} == RABBIT_MOVED
    assert ports["dist"] == 25672 and ports["epmd"] == 4369  # the node's own stay
    assert sts["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "15693"
    client = {p["name"]: (p["port"], p["targetPort"]) for p in rendered.one("Service", "warren-rabbitmq")["spec"]["ports"]}
    assert client == {name: (port, name) for name, port in RABBIT_MOVED.items()}
    headless = {p["name"]: p["port"] for p in rendered.one("Service", "warren-rabbitmq-headless")["spec"]["ports"]}
    assert headless == {"epmd": 4369, "amqp": 5673, "dist": 25672}
    for name in ("warren-sender", "warren-worker"):
        assert env_of(container(rendered, name))["AMQP_URL"]["value"].endswith("@warren-rabbitmq:5673/%2f"), name
    broker = rendered.one("QueueScaler", "warren-worker")["spec"]["broker"]
    assert broker["managementUrl"] == "http://warren-rabbitmq:15673"
    assert broker["amqpUrl"] == "amqp://warren-rabbitmq:5673"
    jobs = prometheus_jobs(rendered)
    assert jobs["rabbitmq"]["dns_sd_configs"][0]["port"] == 15693
    assert jobs["rabbitmq-queues"]["dns_sd_configs"][0]["port"] == 15693


def test_the_default_rabbitmq_ports(defaults):
    client = {p["name"]: p["port"] for p in defaults.one("Service", "warren-rabbitmq")["spec"]["ports"]}
    assert client == {"amqp": 5672, "management": 15672, "prometheus": 15692}
    assert env_of(container(defaults, "warren-sender"))["AMQP_URL"]["value"].endswith("@warren-rabbitmq:5672/%2f")


@pytest.mark.parametrize("args,message", [
    (["--set", "rabbitmq.ports.management=5672"], "amqp, management and prometheus must differ"),
    (["--set", "rabbitmq.ports.amqp=25672"], "25672 is one of the node's own ports"),
    (["--set", "rabbitmq.ports.prometheus=35680"], "35680 is one of the node's own ports"),
    (["--set", "rabbitmq.ports.management=4369"], "4369 is one of the node's own ports"),
])
def test_rabbitmq_ports_may_not_collide(args, message, helm):
    proc = helm_template(helm, args, include_crds=False)
    assert proc.returncode != 0, args
    assert message in proc.stderr, proc.stderr


def test_the_postgres_port_moves_its_server_service_probe_and_url(render):
    import base64

    rendered = render(["--set", "postgres.ports.postgres=6543"])
    sts = rendered.one("StatefulSet", "warren-postgres")
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    assert env_of(c)["PGPORT"]["value"] == "6543"
    assert c["ports"] == [{"name": "postgres", "containerPort": 6543}]
    probe = c["readinessProbe"]["exec"]["command"]
    assert probe[probe.index("-p") + 1] == "6543"
    assert c["livenessProbe"]["tcpSocket"]["port"] == "postgres"
    assert rendered.one("Service", "warren-postgres")["spec"]["ports"] == [
        {"name": "postgres", "port": 6543, "targetPort": "postgres"}]
    url = base64.b64decode(rendered.one("Secret", "warren-postgres")["data"]["url"]).decode()
    assert url.startswith("postgres://warren:") and url.endswith("@warren-postgres:6543/warren"), url
    default_url = base64.b64decode(render("defaults").one("Secret", "warren-postgres")["data"]["url"]).decode()
    assert default_url.endswith("@warren-postgres:5432/warren")
