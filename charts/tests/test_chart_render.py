"""helm lint, and every values variation rendered and validated against the pinned kind node version."""

from __future__ import annotations

import pytest

from conftest import CHART, KUBE_VERSION, RELEASE, VARIATIONS, helm_template, run

EXPECTED_DEFAULT_OBJECTS = {
    ("CustomResourceDefinition", "queuescalers.warren.dev"),
    ("Secret", "warren-rabbitmq"),
    ("Secret", "warren-rabbitmq-erlang-cookie"),
    ("ConfigMap", "warren-rabbitmq-config"),
    ("Service", "warren-rabbitmq"),
    ("Service", "warren-rabbitmq-headless"),
    ("StatefulSet", "warren-rabbitmq"),
    ("Deployment", "warren-sender"),
    ("Service", "warren-sender"),
    ("Deployment", "warren-worker"),
    ("Deployment", "warren-controller"),
    ("ServiceAccount", "warren-controller"),
    ("Role", "warren-controller"),
    ("RoleBinding", "warren-controller"),
    ("NetworkPolicy", "warren-rabbitmq"),
    ("Pod", "warren-test-send-job"),
    # Bearer tokens (auth.enabled: true by default)
    ("Secret", "warren-admin"),
    ("Deployment", "warren-admin"),
    ("Service", "warren-admin"),
    ("Secret", "warren-postgres"),
    ("Service", "warren-postgres"),
    ("StatefulSet", "warren-postgres"),
    ("NetworkPolicy", "warren-postgres"),
}


def test_helm_lint_strict(helm):
    proc = run([helm, "lint", "--strict", str(CHART)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


def test_helm_lint_strict_with_every_variation(helm):
    for name, args in VARIATIONS.items():
        proc = run([helm, "lint", "--strict", str(CHART)] + args)
        assert proc.returncode == 0, f"{name}: {proc.stdout}{proc.stderr}"


def test_defaults_render_the_expected_objects(defaults):
    rendered = {(d["kind"], d["metadata"]["name"]) for d in defaults.docs}
    assert rendered == EXPECTED_DEFAULT_OBJECTS


def test_names_follow_the_release_name(render):
    other = render(["--set", "fullnameOverride=acme"])
    names = {d["metadata"]["name"] for d in other.docs if d["kind"] != "CustomResourceDefinition"}
    assert all(n.startswith("acme-") for n in names), names


@pytest.mark.parametrize("variation", sorted(VARIATIONS))
def test_kubernetes_validate_strict(variation, render, kubernetes_validate, tmp_path):
    manifest = tmp_path / f"{variation}.yaml"
    manifest.write_text(render(variation).text)
    proc = run([kubernetes_validate, "--strict", "-k", KUBE_VERSION, str(manifest)])
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "ERROR" not in output, output
    # Every object has a schema except our own custom resource (validated against
    # its CRD in test_crd.py).
    warnings = [line for line in output.splitlines() if line.startswith("WARN")]
    assert all("kind QueueScaler" in w for w in warnings), warnings
    passed = sum(1 for line in output.splitlines() if " passed for resource " in line)
    builtin = [d for d in render(variation).docs if d["apiVersion"] != "warren.dev/v1alpha1"]
    assert passed == len(builtin)


def test_kubernetes_validate_catches_a_broken_object(kubernetes_validate, defaults, tmp_path):
    """The validation step is meaningful: a misspelled field fails it."""
    import yaml

    deployment = defaults.one("Deployment", "warren-sender")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["imagePulPolicy"] = "Always"
    manifest = tmp_path / "broken.yaml"
    manifest.write_text(yaml.safe_dump(broken))
    proc = run([kubernetes_validate, "--strict", "-k", KUBE_VERSION, str(manifest)])
    assert proc.returncode != 0
    assert "imagePulPolicy" in proc.stdout


def test_notes_tell_the_next_commands(helm):
    proc = run([helm, "install", "--dry-run=client", RELEASE, str(CHART), "--namespace", "demo"])
    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout.split("NOTES:", 1)[1]
    for expected in (
        "kubectl apply -n demo -f manifests/queuescaler.yaml",
        "kubectl port-forward -n demo svc/warren-sender 8080:80",
        "curl -X POST localhost:8080/send",
        "kubectl get queuescalers -n demo -w",
        "helm test warren -n demo",
    ):
        assert expected in notes, f"NOTES lack {expected!r}:\n{notes}"


def test_release_in_another_namespace_puts_everything_there(helm):
    proc = helm_template(helm, ["--namespace", "elsewhere"], include_crds=False)
    assert proc.returncode == 0, proc.stderr
    import yaml

    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert {d["metadata"].get("namespace") for d in docs} == {"elsewhere"}
