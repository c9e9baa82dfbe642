"""Least-privilege RBAC for the controller and the NetworkPolicy around RabbitMQ."""

from __future__ import annotations

import pytest

from conftest import NAMESPACE, VARIATIONS

# (apiGroup, resource) -> exactly the verbs the controller may use.
EXPECTED = {
    ("warren.dev", "queuescalers"): {"get", "list", "watch"},
    ("warren.dev", "queuescalers/status"): {"patch", "update"},
    ("apps", "deployments"): {"get", "list", "watch"},
    ("apps", "statefulsets"): {"get", "list", "watch"},
    ("apps", "deployments/scale"): {"get", "patch", "update"},
    ("apps", "statefulsets/scale"): {"get", "patch", "update"},
    ("", "pods"): {"list", "watch", "patch"},
    ("", "events"): {"create", "patch"},
    ("events.k8s.io", "events"): {"create", "patch"},
    ("", "secrets"): {"get"},
    ("coordination.k8s.io", "leases"): {"get", "create", "update", "patch"},
}


def permissions(rendered) -> dict[tuple[str, str], set[str]]:
    granted: dict[tuple[str, str], set[str]] = {}
    for role in rendered.kinds("Role") + rendered.kinds("ClusterRole"):
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


@pytest.mark.parametrize("variation", sorted(VARIATIONS))
def test_no_wildcards_anywhere(variation, render):
    for role in render(variation).kinds("Role") + render(variation).kinds("ClusterRole"):
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], f"{role['metadata']['name']}: {rule}"
            assert "nonResourceURLs" not in rule


@pytest.mark.parametrize("variation", ["defaults", "cluster-rbac"])
def test_controller_gets_exactly_what_it_uses(variation, render):
    assert permissions(render(variation)) == EXPECTED


def test_default_rbac_is_namespaced(defaults):
    assert defaults.kinds("ClusterRole") == [] and defaults.kinds("ClusterRoleBinding") == []
    (role,) = defaults.kinds("Role")
    (binding,) = defaults.kinds("RoleBinding")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "warren-controller",
                                    "namespace": NAMESPACE}]


def test_cluster_scope_keeps_the_lease_namespaced(render):
    rendered = render("cluster-rbac")
    (cluster_role,) = rendered.kinds("ClusterRole")
    assert all("leases" not in r["resources"] for r in cluster_role["rules"])
    (lease_role,) = rendered.kinds("Role")
    assert lease_role["metadata"]["namespace"] == NAMESPACE
    assert [r["resources"] for r in lease_role["rules"]] == [["leases"]]
    bindings = rendered.kinds("ClusterRoleBinding") + rendered.kinds("RoleBinding")
    assert len(bindings) == 2
    assert all(b["subjects"][0]["name"] == "warren-controller" for b in bindings)


def test_secrets_are_never_listed_or_written(render):
    for variation in VARIATIONS:
        assert permissions(render(variation))[("", "secrets")] == {"get"}


def rabbit_policy(rendered) -> dict:
    return rendered.one("NetworkPolicy", "warren-rabbitmq")


def test_only_warren_pods_reach_rabbitmq(defaults):
    policy = rabbit_policy(defaults)["spec"]
    assert policy["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "rabbitmq"
    assert policy["policyTypes"] == ["Ingress"]
    clients, peers = policy["ingress"]
    (client_peer,) = clients["from"]
    assert set(client_peer) == {"podSelector"}  # same namespace, no namespaceSelector/ipBlock
    selector = client_peer["podSelector"]
    assert selector["matchLabels"] == {"app.kubernetes.io/name": "warren", "app.kubernetes.io/instance": "warren"}
    assert selector["matchExpressions"] == [{"key": "app.kubernetes.io/component", "operator": "In",
                                             "values": ["sender", "worker", "controller"]}]
    assert {p["port"] for p in clients["ports"]} == {"amqp", "management", "prometheus"}
    (peer,) = peers["from"]
    assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "rabbitmq"


def test_policy_selectors_match_the_pods_they_mean(defaults):
    policy = rabbit_policy(defaults)["spec"]
    expression = policy["ingress"][0]["from"][0]["podSelector"]["matchExpressions"][0]
    allowed = set()
    for w in defaults.workloads():
        labels = w["spec"]["template"]["metadata"]["labels"]
        if labels["app.kubernetes.io/component"] in expression["values"]:
            allowed.add(w["metadata"]["name"])
        if w["metadata"]["name"] == "warren-rabbitmq":
            assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert allowed == {"warren-sender", "warren-worker", "warren-controller"}
    # The helm test pod is not a broker client.
    (test_pod,) = defaults.kinds("Pod")
    assert test_pod["metadata"]["labels"]["app.kubernetes.io/component"] not in expression["values"]
    # Named ports in the policy exist on the RabbitMQ container.
    rabbit_ports = {p["name"] for p in defaults.one("StatefulSet", "warren-rabbitmq")
                    ["spec"]["template"]["spec"]["containers"][0]["ports"]}
    for rule in policy["ingress"]:
        for port in rule["ports"]:
            assert isinstance(port["port"], int) or port["port"] in rabbit_ports


def test_network_policy_switch(render):
    assert render("no-networkpolicy").kinds("NetworkPolicy") == []
    extra = render(["--set-json", 'networkPolicy.extraIngress=[{"from":[{"namespaceSelector":'
                    '{"matchLabels":{"kubernetes.io/metadata.name":"monitoring"}}}],"ports":[{"port":15692}]}]'])
    assert len(rabbit_policy(extra)["spec"]["ingress"]) == 3
