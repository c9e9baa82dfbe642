"""Every pod and container of every variation: non-root, no escalation, no capabilities,
seccomp RuntimeDefault, read-only root for warren's own containers, requests and limits."""

from __future__ import annotations

import pytest

from conftest import VARIATIONS, containers_of

WARREN_CONTAINERS = {"sender", "worker", "controller", "send-job"}


def effective(pod_spec: dict, container: dict, key: str):
    """A container's security setting, falling back to the pod's, as Kubernetes does."""
    container_ctx = container.get("securityContext", {})
    if key in container_ctx:
        return container_ctx[key]
    return pod_spec.get("securityContext", {}).get(key)


@pytest.mark.parametrize("variation", sorted(VARIATIONS))
def test_every_container_is_locked_down(variation, render):
    rendered = render(variation)
    pod_specs = rendered.pod_specs()
    pools = [d for d in rendered.kinds("Deployment") if d["metadata"].get("labels", {}).get("warren.dev/role") == "worker"]
    assert len(pools) >= 1
    # rabbitmq, sender, one worker Deployment per pool, controller, helm test pod; with tokens
    # on: admin and (unless the database is external) postgres
    auth = "auth.enabled=false" not in VARIATIONS[variation]
    external = any("existingSecret" in a for a in VARIATIONS[variation])
    assert len(pod_specs) == 4 + len(pools) + (1 if auth else 0) + (1 if auth and not external else 0)
    checked = 0
    for name, pod in pod_specs:
        assert pod.get("securityContext", {}).get("seccompProfile") == {"type": "RuntimeDefault"}, name
        for c in containers_of(pod):
            where = f"{name}/{c['name']}"
            assert effective(pod, c, "runAsNonRoot") is True, where
            user = effective(pod, c, "runAsUser")
            assert isinstance(user, int) and user > 0, where
            ctx = c.get("securityContext", {})
            assert ctx.get("allowPrivilegeEscalation") is False, where
            assert ctx.get("privileged", False) is False, where
            assert ctx.get("capabilities", {}).get("drop") == ["ALL"], where
            assert "add" not in ctx.get("capabilities", {}), where
            assert effective(pod, c, "seccompProfile") == {"type": "RuntimeDefault"}, where
            checked += 1
    assert checked >= 6  # incl. RabbitMQ's init container


@pytest.mark.parametrize("variation", sorted(VARIATIONS))
def test_warren_containers_have_a_read_only_root(variation, render):
    seen = set()
    for name, pod in render(variation).pod_specs():
        for c in containers_of(pod):
            if c["name"] in WARREN_CONTAINERS:
                assert c["securityContext"]["readOnlyRootFilesystem"] is True, f"{name}/{c['name']}"
                seen.add(c["name"])
    assert seen == WARREN_CONTAINERS


def test_warren_images_run_as_the_distroless_nonroot_user(defaults):
    for name, pod in defaults.pod_specs():
        if name.endswith(("-sender", "-worker", "-controller")):
            assert pod["securityContext"]["runAsUser"] == 65532, name
            assert pod["securityContext"]["runAsGroup"] == 65532, name


def test_rabbitmq_runs_as_its_own_user_999(defaults):
    pod = defaults.one("StatefulSet", "warren-rabbitmq")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 999
    assert pod["securityContext"]["fsGroup"] == 999
    for c in containers_of(pod):
        assert c["securityContext"]["runAsUser"] == 999, c["name"]
        assert c["securityContext"]["readOnlyRootFilesystem"] is True, c["name"]
    mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    # With a read-only root, everything RabbitMQ writes is a volume.
    assert {"/var/lib/rabbitmq", "/var/lib/rabbitmq/mnesia", "/var/log/rabbitmq", "/tmp"} <= mounts


@pytest.mark.parametrize("variation", sorted(VARIATIONS))
def test_every_container_has_requests_and_limits(variation, render):
    for name, pod in render(variation).pod_specs():
        for c in containers_of(pod):
            resources = c.get("resources", {})
            for section in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(section, {})), f"{name}/{c['name']} {section}"


def test_only_the_controller_gets_an_api_token(defaults):
    for name, pod in defaults.pod_specs():
        if name == "warren-controller":
            assert pod["serviceAccountName"] == "warren-controller"
            assert pod.get("automountServiceAccountToken", True) is True
        else:
            assert pod["automountServiceAccountToken"] is False, name


def test_schema_refuses_resources_without_limits(helm):
    from conftest import helm_template

    proc = helm_template(helm, ["--set", "sender.resources.limits=null"])
    assert proc.returncode != 0
    assert "limits" in proc.stderr
