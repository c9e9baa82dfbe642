"""The QueueScaler CRD in the chart, and QueueScalers validated against its schema."""

from __future__ import annotations

import copy

import jsonschema
import pytest

from conftest import CHART, KUBE_VERSION, REPO, VARIATIONS, load_yaml_docs, run

MANIFEST_CRD = REPO / "manifests" / "crds.yaml"
CHART_CRD = CHART / "crds" / "queuescaler.yaml"
EXAMPLE = REPO / "manifests" / "queuescaler.yaml"


def the_crd() -> dict:
    (crd,) = load_yaml_docs(CHART_CRD)
    return crd


def served_version(crd: dict) -> dict:
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return version


def to_json_schema(node: dict) -> dict:
    """An OpenAPI v3 structural schema as JSON Schema, the way the API server reads it:
    nullable allows null, int-or-string allows both, and objects reject unknown fields
    (kubectl's default strict field validation) unless they preserve them."""
    node = copy.deepcopy(node)
    out: dict = {}
    for key, value in node.items():
        if key == "properties":
            out["properties"] = {k: to_json_schema(v) for k, v in value.items()}
        elif key == "items" and isinstance(value, dict):
            out["items"] = to_json_schema(value)
        elif key == "additionalProperties" and isinstance(value, dict):
            out["additionalProperties"] = to_json_schema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [to_json_schema(v) for v in value]
        elif key == "not":
            out["not"] = to_json_schema(value)
        elif key.startswith("x-kubernetes-") or key in ("nullable", "default", "description", "format"):
            continue
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (node.get("type") == "object" and "properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def apply_defaults(value, node: dict):
    """Structural defaulting as the API server does it, to compare two QueueScalers."""
    if isinstance(value, dict) and "properties" in node:
        for key, child in node["properties"].items():
            if key not in value and "default" in child:
                value[key] = copy.deepcopy(child["default"])
            if key in value:
                value[key] = apply_defaults(value[key], child)
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        return [apply_defaults(v, node["items"]) for v in value]
    return value


def validator() -> jsonschema.Draft7Validator:
    root = copy.deepcopy(served_version(the_crd())["schema"]["openAPIV3Schema"])
    # The API server supplies these at the root of every custom resource.
    root.setdefault("properties", {}).update({
        "apiVersion": {"type": "string", "enum": ["warren.dev/v1alpha1"]},
        "kind": {"type": "string", "enum": ["QueueScaler"]},
        "metadata": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
    })
    schema = to_json_schema(root)
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


# The CEL rules (x-kubernetes-validations) the CRD declares, as Python over the same
# object. A rule this table does not know fails the tests: add it here.
CEL_RULES = {
    "self.maxReplicas >= self.minReplicas":
        lambda s: s["maxReplicas"] >= s.get("minReplicas", 0),
    "!has(self.fallback) || !has(self.fallback.replicas) || self.fallback.replicas <= self.maxReplicas":
        lambda s: "fallback" not in s or "replicas" not in s["fallback"] or s["fallback"]["replicas"] <= s["maxReplicas"],
    "!has(self.targetDrainSeconds) || !has(self.queue.operation) || self.queue.operation == 'sum'":
        lambda s: "targetDrainSeconds" not in s or s["queue"].get("operation") in (None, "sum"),
    "(has(self.name) && size(self.name) > 0) || (has(self.names) && size(self.names) > 0)"
    " || (has(self.pattern) && size(self.pattern) > 0)":
        lambda q: bool(q.get("name")) or bool(q.get("names")) or bool(q.get("pattern")),
}


def cel_rules(node: dict, path: tuple = ()) -> list[tuple[tuple, str]]:
    found = [(path, v["rule"]) for v in node.get("x-kubernetes-validations", [])]
    for key, child in node.get("properties", {}).items():
        found += cel_rules(child, path + (key,))
    return found


def cel_errors(resource: dict) -> list[str]:
    root = served_version(the_crd())["schema"]["openAPIV3Schema"]
    errors = []
    for path, rule in cel_rules(root):
        assert rule in CEL_RULES, f"unknown CEL rule at {'.'.join(path)}: {rule!r} (teach test_crd.CEL_RULES)"
        value = resource
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None and not CEL_RULES[rule](value):
            errors.append(f"{'.'.join(path)}: {rule}")
    return errors


def errors_of(resource: dict) -> list[str]:
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator().iter_errors(resource)]
    return errors or cel_errors(resource)


def example_scalers() -> list[dict]:
    scalers = [d for d in load_yaml_docs(EXAMPLE) if d.get("kind") == "QueueScaler"]
    assert scalers, f"{EXAMPLE} holds no QueueScaler"
    return scalers


def test_chart_crd_is_identical_to_the_generated_manifest():
    assert MANIFEST_CRD.is_file(), f"{MANIFEST_CRD} is missing (make crds)"
    assert CHART_CRD.is_file(), f"{CHART_CRD} is missing: cp manifests/crds.yaml {CHART_CRD}"
    assert CHART_CRD.read_bytes() == MANIFEST_CRD.read_bytes(), \
        "charts/warren/crds/queuescaler.yaml differs from manifests/crds.yaml: run `make crds`"


def test_crd_is_the_queuescaler_api():
    crd = the_crd()
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["metadata"]["name"] == "queuescalers.warren.dev"
    spec = crd["spec"]
    assert spec["group"] == "warren.dev"
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "QueueScaler"
    assert "qs" in spec["names"].get("shortNames", [])
    version = served_version(crd)
    assert version["served"] is True and version["storage"] is True
    assert "status" in version.get("subresources", {})
    columns = {c["name"].lower() for c in version.get("additionalPrinterColumns", [])}
    assert {"age"} <= columns and len(columns) >= 5, columns
    spec_schema = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert "maxReplicas" in spec_schema.get("required", [])


def test_crd_validates_against_kubernetes(kubernetes_validate):
    proc = run([kubernetes_validate, "--strict", "-k", KUBE_VERSION, str(CHART_CRD)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "passed for resource customresourcedefinition/queuescalers.warren.dev" in proc.stdout


def test_example_queuescaler_matches_the_crd_schema():
    for scaler in example_scalers():
        assert scaler["apiVersion"] == "warren.dev/v1alpha1"
        assert errors_of(scaler) == []


SCALER_VARIATIONS = ["chart-scaler", "long-jobs"]
# Variations with one chart QueueScaler per scaled worker pool.
POOL_SCALER_VARIATIONS = {"pools": 2, "multi-queue-pool": 2}


def test_the_chart_scaler_is_a_values_switch(render):
    assert render("defaults").kinds("QueueScaler") == []
    for variation in SCALER_VARIATIONS:
        assert len(render(variation).kinds("QueueScaler")) == 1, variation
    for variation, count in POOL_SCALER_VARIATIONS.items():
        assert len(render(variation).kinds("QueueScaler")) == count, variation
    assert {v for v in VARIATIONS if render(v).kinds("QueueScaler")} == \
        set(SCALER_VARIATIONS) | set(POOL_SCALER_VARIATIONS)


@pytest.mark.parametrize("variation", SCALER_VARIATIONS + sorted(POOL_SCALER_VARIATIONS))
def test_chart_queuescaler_matches_the_crd_schema(variation, render):
    scalers = render(variation).kinds("QueueScaler")
    assert scalers
    for scaler in scalers:
        assert errors_of(scaler) == []


def test_chart_queuescaler_drives_the_chart_worker(render):
    (scaler,) = render("chart-scaler").kinds("QueueScaler")
    spec = scaler["spec"]
    assert scaler["metadata"]["name"] == "warren-worker"
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "warren-worker"}
    assert spec["queue"] == {"name": "tasks", "vhost": "/"}
    assert spec["broker"]["credentialsSecretRef"] == {"name": "warren-rabbitmq", "usernameKey": "username",
                                                      "passwordKey": "password"}
    assert (spec["minReplicas"], spec["maxReplicas"]) == (1, 20)
    assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 120
    assert spec["behavior"]["cooldownSeconds"] == 30
    long_jobs = render("long-jobs").kinds("QueueScaler")[0]["spec"]
    assert long_jobs["targetDrainSeconds"] == 120
    assert long_jobs["fallback"] == {"failureThreshold": 3, "replicas": 2}


def test_example_queuescaler_fits_the_default_install(defaults):
    """`kubectl apply -n NS -f manifests/queuescaler.yaml` after a default install scales
    the chart's worker Deployment from the chart's queue, with the chart's credentials."""
    schema = served_version(the_crd())["schema"]["openAPIV3Schema"]["properties"]["spec"]
    worker = defaults.one("Deployment", "warren-worker")
    secret = defaults.one("Secret", "warren-rabbitmq")
    queue = {e["name"]: e.get("value") for e in worker["spec"]["template"]["spec"]["containers"][0]["env"]}
    for scaler in example_scalers():
        assert "namespace" not in scaler["metadata"], "the example must follow `kubectl apply -n`"
        spec = apply_defaults(copy.deepcopy(scaler["spec"]), schema)
        assert spec["scaleTargetRef"]["kind"] == "Deployment"
        assert spec["scaleTargetRef"]["name"] == worker["metadata"]["name"]
        assert spec["queue"]["name"] == queue["WARREN_QUEUE"]
        assert spec["queue"]["vhost"] == "/"
        ref = spec["broker"]["credentialsSecretRef"]
        assert ref["name"] == secret["metadata"]["name"]
        assert {ref["usernameKey"], ref["passwordKey"]} <= set(secret["data"])
        assert spec["broker"]["managementUrl"] == "http://warren-rabbitmq:15672"
        assert spec["broker"]["amqpUrl"] == "amqp://warren-rabbitmq:5672"
        assert spec["maxReplicas"] >= 2  # something to scale to


@pytest.mark.parametrize("breakage", ["maxReplicas as text", "missing maxReplicas", "misspelled field",
                                      "negative minReplicas", "target name not a string", "maxReplicas zero",
                                      "messagesPerReplica zero", "target kind DaemonSet",
                                      "minReplicas above maxReplicas", "fallback above maxReplicas"])
def test_schema_validation_catches_broken_queuescalers(breakage):
    scaler = copy.deepcopy(example_scalers()[0])
    spec = scaler["spec"]
    if breakage == "maxReplicas as text":
        spec["maxReplicas"] = "ten"
    elif breakage == "missing maxReplicas":
        del spec["maxReplicas"]
    elif breakage == "misspelled field":
        spec["maxReplica"] = 3
    elif breakage == "negative minReplicas":
        spec["minReplicas"] = -1
    elif breakage == "target name not a string":
        spec["scaleTargetRef"]["name"] = 42
    elif breakage == "maxReplicas zero":
        spec["maxReplicas"] = 0
    elif breakage == "messagesPerReplica zero":
        spec["messagesPerReplica"] = 0
    elif breakage == "target kind DaemonSet":
        spec["scaleTargetRef"]["kind"] = "DaemonSet"
    elif breakage == "minReplicas above maxReplicas":
        spec["minReplicas"] = spec["maxReplicas"] + 1
    elif breakage == "fallback above maxReplicas":
        spec["fallback"] = {"failureThreshold": 3, "replicas": spec["maxReplicas"] + 1}
    assert errors_of(scaler) != [], breakage
