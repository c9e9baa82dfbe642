"""Monitors, alerts and dashboards (metrics.*, dashboards.*): off by default, rendered
as kube-prometheus-stack expects when on, and the alerts checked by Debian's promtool
(`promtool check rules` and the unit tests in prometheus/alerts_test.yaml) on the rules
exactly as the chart renders them."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import CHART, KUBE_VERSION, NAMESPACE, find_tool, helm_template, run

HERE = Path(__file__).resolve().parent
ALERTS_TEST = HERE / "prometheus" / "alerts_test.yaml"
RULES_FILE = CHART / "files" / "prometheus-rules.yaml"
DASHBOARDS = sorted((CHART / "dashboards").glob("*.json"))

ALL_ON = [
    "--set", "metrics.serviceMonitor.enabled=true",
    "--set", "metrics.prometheusRule.enabled=true",
    "--set", "dashboards.enabled=true",
]
MONITOR_KINDS = ("PodMonitor", "ServiceMonitor", "PrometheusRule")


@pytest.fixture(scope="module")
def promtool() -> str:
    return find_tool("promtool")


@pytest.fixture(scope="module")
def observability(render):
    return render(ALL_ON)


def rendered_rules(rendered) -> dict:
    (rule,) = rendered.kinds("PrometheusRule")
    return rule["spec"]


def alerts_of(spec: dict) -> dict[str, dict]:
    return {r["alert"]: r for g in spec["groups"] for r in g["rules"] if "alert" in r}


def test_off_by_default(defaults):
    assert not [d for d in defaults.docs if d["kind"] in MONITOR_KINDS]
    assert not [d for d in defaults.kinds("ConfigMap") if "grafana_dashboard" in d["metadata"].get("labels", {})]
    policy = defaults.one("NetworkPolicy", "warren-rabbitmq")
    peers = [p for rule in policy["spec"]["ingress"] for p in rule.get("from", [])]
    assert not [p for p in peers if "namespaceSelector" in p]


def test_pod_monitors_scrape_every_component_on_a_named_port(observability):
    monitors = {m["metadata"]["name"]: m for m in observability.kinds("PodMonitor")}
    # warren-admin too: tokens (auth.enabled) are on by default
    assert set(monitors) == {"warren-sender", "warren-worker", "warren-controller", "warren-admin", "warren-rabbitmq"}
    pods = {w["metadata"]["labels"]["app.kubernetes.io/component"]: w["spec"]["template"]
            for w in observability.workloads()}
    for name, monitor in monitors.items():
        component = name.removeprefix("warren-")
        selector = monitor["spec"]["selector"]["matchLabels"]
        template = pods[component]
        assert selector.items() <= template["metadata"]["labels"].items(), name
        ports = {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert endpoint["port"] in ports, (name, endpoint["port"], ports)
            relabel = endpoint["relabelings"][0]
            assert relabel["targetLabel"] == "warren_component"
            assert relabel["replacement"].startswith(component)
    controller = monitors["warren-controller"]["spec"]["podMetricsEndpoints"][0]
    assert controller["honorLabels"] is True, "the QueueScaler's namespace label must survive"


def test_rabbitmq_is_scraped_for_node_health_and_per_queue_counts(observability):
    monitor = observability.one("PodMonitor", "warren-rabbitmq")
    endpoints = {e["path"]: e for e in monitor["spec"]["podMetricsEndpoints"]}
    assert set(endpoints) == {"/metrics", "/metrics/detailed"}
    assert endpoints["/metrics/detailed"]["params"] == {"family": ["queue_coarse_metrics"]}
    # Two targets on one pod must not collide: each has its own component label.
    components = {e["relabelings"][0]["replacement"] for e in endpoints.values()}
    assert components == {"rabbitmq", "rabbitmq-queues"}
    config = observability.one("ConfigMap", "warren-rabbitmq-config")
    assert "rabbitmq_prometheus" in config["data"]["enabled_plugins"]
    assert "return_per_object_metrics" not in json.dumps(config["data"])


def test_selector_labels_and_scrape_settings_pass_through(render):
    rendered = render(ALL_ON + [
        "--set", "metrics.serviceMonitor.labels.release=kube-prometheus-stack",
        "--set", "metrics.serviceMonitor.interval=15s",
        "--set", "metrics.prometheusRule.labels.role=alert-rules",
    ])
    for monitor in rendered.kinds("PodMonitor"):
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        assert all(e["interval"] == "15s" for e in monitor["spec"]["podMetricsEndpoints"])
    (rule,) = rendered.kinds("PrometheusRule")
    assert rule["metadata"]["labels"]["role"] == "alert-rules"


def test_networkpolicy_lets_the_prometheus_namespace_scrape_rabbitmq(render):
    rendered = render(ALL_ON + [
        "--set", "metrics.prometheus.namespace=observability",
        "--set", "metrics.prometheus.podSelector.app\\.kubernetes\\.io/name=prometheus",
    ])
    policy = rendered.one("NetworkPolicy", "warren-rabbitmq")
    rules = [r for r in policy["spec"]["ingress"]
             if any("namespaceSelector" in p for p in r.get("from", []))]
    assert len(rules) == 1
    (peer,) = rules[0]["from"]
    assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "observability"}
    assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
    assert rules[0]["ports"] == [{"port": "prometheus", "protocol": "TCP"}]


def test_rendered_rules_pass_promtool_check(observability, promtool, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(rendered_rules(observability)))
    proc = run([promtool, "check", "rules", str(rules)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    alerts = alerts_of(rendered_rules(observability))
    assert f"SUCCESS: {len(alerts)} rules found" in proc.stdout, proc.stdout


def test_promtool_unit_tests_fire_and_spare_every_alert(observability, promtool, tmp_path):
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rendered_rules(observability)))
    shutil.copy(ALERTS_TEST, tmp_path / "alerts_test.yaml")
    proc = run([promtool, "test", "rules", str(tmp_path / "alerts_test.yaml")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout, proc.stdout


def test_promtool_unit_tests_catch_a_broken_threshold(observability, promtool, tmp_path):
    """The unit tests are meaningful: a rule with a changed threshold fails them."""
    spec = rendered_rules(observability)
    for group in spec["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == "WarrenSenderErrors":
                rule["expr"] = rule["expr"].replace("> 0.05", "> 0.5")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(spec))
    shutil.copy(ALERTS_TEST, tmp_path / "alerts_test.yaml")
    proc = run([promtool, "test", "rules", str(tmp_path / "alerts_test.yaml")])
    assert proc.returncode != 0
    assert "WarrenSenderErrors" in proc.stdout + proc.stderr


def test_every_alert_has_a_firing_and_a_silent_case():
    alerts = set(alerts_of(yaml.safe_load(RULES_FILE.read_text())))
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    fires, silent = set(), set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    assert alerts, "no alerts"
    assert alerts <= fires, f"never shown firing: {alerts - fires}"
    assert alerts <= silent, f"never shown silent: {alerts - silent}"
    # The list of alerts.
    assert {"WarrenBacklogGrowing", "WarrenDeadLetterQueueNotEmpty", "WarrenQueueScalerFallback",
            "WarrenQueueScalerNotReady", "WarrenSenderErrors", "WarrenTokenRefusalsSpiking",
            "WarrenRabbitMQDown", "WarrenWorkersRestarting"} <= alerts


def test_alerts_can_be_disabled_labelled_and_extended(render):
    rendered = render(ALL_ON + [
        "--set", "metrics.prometheusRule.disabledAlerts={WarrenTokenRefusalsSpiking}",
        "--set", "metrics.prometheusRule.alertLabels.team=payments",
        "--set", "metrics.prometheusRule.alertLabels.severity=page",
        "--set-json", 'metrics.prometheusRule.extraGroups=[{"name":"mine","rules":'
                      '[{"alert":"MyAlert","expr":"vector(1) > 0"}]}]',
    ])
    spec = rendered_rules(rendered)
    alerts = alerts_of(spec)
    assert "WarrenTokenRefusalsSpiking" not in alerts
    assert "MyAlert" in alerts
    for name, alert in alerts.items():
        if name.startswith("Warren"):
            assert alert["labels"]["team"] == "payments"
            # An alert's own severity wins over alertLabels.
            assert alert["labels"]["severity"] in ("warning", "critical")
    # Annotations keep Prometheus' templates, untouched by Helm.
    assert "{{ $labels.queue }}" in alerts["WarrenBacklogGrowing"]["annotations"]["summary"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboards_are_grafana_json_with_a_datasource_variable(path):
    dashboard = json.loads(path.read_text())
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] and len(dashboard["uid"]) <= 40
    assert dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids {ids}"
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            # Only variables the dashboard defines (or Grafana's own) are used.
            for used in re.findall(r"\$(\w+)", target["expr"]):
                assert used in variables or used.startswith("__"), (panel["title"], used)
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"]["uid"] == "${datasource}"
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            assert annotation["datasource"]["uid"] == "${datasource}"


def test_dashboards_ship_as_configmaps_for_the_grafana_sidecar(observability, render):
    maps = [c for c in observability.kinds("ConfigMap")
            if c["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    shipped = {}
    for config in maps:
        assert config["metadata"]["namespace"] == NAMESPACE
        (key, text), = config["data"].items()
        shipped[key] = json.loads(text)
    assert set(shipped) == {p.name for p in DASHBOARDS}
    assert {d["uid"] for d in shipped.values()} == {"warren-overview", "warren-queuescaler"}
    elsewhere = render(ALL_ON + ["--set", "dashboards.namespace=grafana",
                                 "--set", "dashboards.annotations.grafana_folder=warren"])
    for config in elsewhere.kinds("ConfigMap"):
        if "grafana_dashboard" in config["metadata"].get("labels", {}):
            assert config["metadata"]["namespace"] == "grafana"
            assert config["metadata"]["annotations"] == {"grafana_folder": "warren"}


def test_builtin_objects_validate_with_observability_on(observability, kubernetes_validate, tmp_path):
    builtin = [d for d in observability.docs if d["kind"] not in MONITOR_KINDS
               and d["apiVersion"] != "warren.dev/v1alpha1"]
    manifest = tmp_path / "observability.yaml"
    manifest.write_text(yaml.safe_dump_all(builtin))
    proc = run([kubernetes_validate, "--strict", "-k", KUBE_VERSION, str(manifest)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("bad", [
    ["--set", "metrics.serviceMonitor.interval=often"],
    ["--set", "metrics.serviceMonitor.scrapeInterval=15s"],
    ["--set", "metrics.prometheus.namespace=Not_A_Namespace"],
    ["--set", "metrics.prometheusRule.disabledAlerts={NoSuchThing}"],
    ["--set", "dashboards.enabled=yes"],
], ids=["bad-interval", "unknown-key", "bad-namespace", "not-an-alert-name", "enabled-not-bool"])
def test_schema_rejects_bad_observability_values(helm, bad):
    proc = helm_template(helm, bad)
    assert proc.returncode != 0, f"{bad} accepted"
    assert "schema" in proc.stderr.lower(), proc.stderr


def test_own_prometheus_finds_every_component_and_passes_promtool(render, promtool, tmp_path):
    rendered = render(["--set", "metrics.prometheus.deploy=true"])
    config = rendered.one("ConfigMap", "warren-prometheus")["data"]
    (tmp_path / "rules.yaml").write_text(config["rules.yaml"])
    (tmp_path / "prometheus.yml").write_text(
        config["prometheus.yml"].replace("/etc/prometheus/rules.yaml", "rules.yaml"))
    proc = run([promtool, "check", "config", str(tmp_path / "prometheus.yml")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    scrape = yaml.safe_load(config["prometheus.yml"])["scrape_configs"]
    jobs = {j["job_name"]: j for j in scrape}
    # warren-admin too: tokens (auth.enabled) are on by default
    assert set(jobs) == {"sender", "worker", "controller", "admin", "rabbitmq", "rabbitmq-queues"}
    assert jobs["rabbitmq-queues"]["params"] == {"family": ["queue_coarse_metrics"]}
    assert jobs["controller"]["honor_labels"] is True
    services = {s["metadata"]["name"]: s for s in rendered.kinds("Service")}
    for name, job in jobs.items():
        (sd,) = job["dns_sd_configs"]
        (dns,) = sd["names"]
        service = dns.split(".")[0]
        assert dns == f"{service}.{NAMESPACE}.svc.cluster.local"
        # Every name resolves to the pods of its component, on the metrics port.
        assert services[service]["spec"]["clusterIP"] == "None", service
        component = "rabbitmq" if name.startswith("rabbitmq") else name
        selector = services[service]["spec"]["selector"]
        selected = [w for w in rendered.workloads()
                    if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert [w["metadata"]["labels"]["app.kubernetes.io/component"] for w in selected] == [component], name
        relabel = {r["target_label"]: r["replacement"] for r in job["relabel_configs"]}
        assert relabel["warren_component"] == name
        ports = {p["containerPort"] for c in selected[0]["spec"]["template"]["spec"]["containers"]
                 for p in c.get("ports", [])}
        assert sd["port"] in ports, (name, sd["port"], ports)
    deployment = rendered.one("Deployment", "warren-prometheus")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"].startswith("prom/prometheus:")
    assert container["args"][0] == "--config.file=/etc/prometheus/prometheus.yml"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    assert container["resources"]["limits"]["memory"]
    assert rendered.one("Service", "warren-prometheus")["spec"]["ports"][0]["port"] == 9090
    # Its pod may reach RabbitMQ's metrics port through the NetworkPolicy.
    policy = rendered.one("NetworkPolicy", "warren-rabbitmq")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    allowed = [r for r in policy["spec"]["ingress"]
               for p in r.get("from", [])
               if p.get("podSelector", {}).get("matchLabels", {}).items() <= labels.items()
               and "namespaceSelector" not in p
               and p.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component") == "prometheus"]
    assert allowed and {"port": "prometheus", "protocol": "TCP"} in allowed[0]["ports"]


POOLS = [
    "--set", "queue.extra={sms,email}",
    "--set-json", 'worker.pools=[{"name":"worker"},{"name":"worker-sms","queues":["sms"]},'
                  '{"name":"worker-email","queues":["email"]}]',
]


def test_every_worker_pool_is_scraped_by_the_monitor_and_the_own_prometheus(render):
    rendered = render(ALL_ON + POOLS + ["--set", "metrics.prometheus.deploy=true"])
    pools = [w for w in rendered.workloads()
             if w["spec"]["template"]["metadata"]["labels"].get("warren.dev/role") == "worker"]
    assert sorted(w["metadata"]["name"] for w in pools) == ["warren-worker", "warren-worker-email", "warren-worker-sms"]
    monitor = rendered.one("PodMonitor", "warren-worker")
    headless = rendered.one("Service", "warren-worker-metrics")["spec"]["selector"]
    for selector in (monitor["spec"]["selector"]["matchLabels"], headless):
        selected = [w["metadata"]["name"] for w in rendered.workloads()
                    if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert sorted(selected) == sorted(w["metadata"]["name"] for w in pools), selector
    # Each series says which pool it came from.
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    pool = [r for r in endpoint["relabelings"] if r["targetLabel"] == "warren_pool"]
    assert pool == [{"action": "replace", "targetLabel": "warren_pool",
                     "sourceLabels": ["__meta_kubernetes_pod_label_app_kubernetes_io_component"]}]
