"""Generated credentials that survive upgrades, and the `helm test` pod."""

from __future__ import annotations

import base64

from conftest import CHART


def decoded(secret: dict, key: str) -> str:
    return base64.b64decode(secret["data"][key]).decode()


def test_secrets_are_kept_by_helm(defaults):
    for name in ("warren-rabbitmq", "warren-rabbitmq-erlang-cookie"):
        secret = defaults.one("Secret", name)
        assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert "stringData" not in secret


def test_credentials_are_generated_strong_and_random(render):
    first = render("defaults").one("Secret", "warren-rabbitmq")
    second = render(["--set", "log.filter=debug"]).one("Secret", "warren-rabbitmq")
    assert decoded(first, "username") == "warren"
    password = decoded(first, "password")
    assert len(password) == 32 and password.isalnum()
    assert password != decoded(second, "password")  # generated, not a constant
    cookie = decoded(render("defaults").one("Secret", "warren-rabbitmq-erlang-cookie"), "cookie")
    assert len(cookie) == 64 and cookie.isalnum()


def test_given_credentials_are_used(render):
    rendered = render(["--set", "rabbitmq.auth.username=ops", "--set", "rabbitmq.auth.password=correct-horse-battery",
                       "--set", "rabbitmq.auth.erlangCookie=ABCDEFGHIJKLMNOPQRSTUVWXYZ"])
    secret = rendered.one("Secret", "warren-rabbitmq")
    assert (decoded(secret, "username"), decoded(secret, "password")) == ("ops", "correct-horse-battery")
    assert decoded(rendered.one("Secret", "warren-rabbitmq-erlang-cookie"), "cookie") == "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def test_helm_test_pod_posts_a_job_and_expects_202(defaults):
    (pod,) = defaults.kinds("Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    (c,) = pod["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["SENDER_URL"] == "http://warren-sender:80/send"
    assert env["ADMIN_URL"] == "http://warren-admin:80"  # auth is on by default
    (admin_token,) = [e for e in c["env"] if e["name"] == "ADMIN_TOKEN"]
    assert admin_token["valueFrom"]["secretKeyRef"] == {"name": "warren-admin", "key": "token"}
    script = c["command"][-1]
    assert '-X POST "$SENDER_URL"' in script
    assert "Content-Type: application/json" in script
    assert "202) exit 0" in script
    assert "exit 1" in script  # anything else fails the test


def test_helm_test_pod_survives_a_pass_for_helm_test_logs(defaults):
    """With hook-succeeded, Helm 3 deletes the passed pod before `helm test --logs` reads
    it and the command errors (fixed only in Helm 4.1). before-hook-creation alone keeps
    the pod until the next `helm test` replaces it, on Helm 3 and 4 alike."""
    (pod,) = defaults.kinds("Pod")
    policies = pod["metadata"]["annotations"]["helm.sh/hook-delete-policy"].split(",")
    assert "hook-succeeded" not in policies
    assert "before-hook-creation" in policies  # a second `helm test` does not collide


class _Sender:
    """A stand-in sender on 127.0.0.1 that answers POST /send with a chosen status list."""

    def __init__(self, statuses: list[int]):
        import http.server
        import threading

        self.statuses = list(statuses)
        self.bodies: list[dict] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server API)
                import json

                length = int(self.headers.get("Content-Length", 0))
                outer.bodies.append({"path": self.path, "type": self.headers.get("Content-Type"),
                                     "json": json.loads(self.rfile.read(length))})
                status = outer.statuses.pop(0) if len(outer.statuses) > 1 else outer.statuses[0]
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"id": "x"}')

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/send"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def run_helm_test_script(defaults, statuses: list[int]):
    import subprocess

    (pod,) = defaults.kinds("Pod")
    (c,) = pod["spec"]["containers"]
    assert c["command"][:2] == ["sh", "-c"]
    script = c["command"][2].replace("sleep 3", "sleep 0.1")
    sender = _Sender(statuses)
    try:
        proc = subprocess.run(["sh", "-c", script], env={"SENDER_URL": sender.url, "PATH": "/usr/bin:/bin"},
                              capture_output=True, text=True, timeout=60)
    finally:
        sender.close()
    return proc, sender.bodies


def test_helm_test_script_passes_on_202(defaults):
    proc, bodies = run_helm_test_script(defaults, [202])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(bodies) == 1
    assert bodies[0]["path"] == "/send" and bodies[0]["type"] == "application/json"
    assert isinstance(bodies[0]["json"]["message"], str) and bodies[0]["json"]["message"].strip()
    assert bodies[0]["json"]["message"].count(".") <= 5  # passes the sender's dot rule


def test_helm_test_script_retries_while_the_sender_is_unavailable(defaults):
    proc, bodies = run_helm_test_script(defaults, [503, 503, 202])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(bodies) == 3


def test_helm_test_script_fails_on_a_refusal(defaults):
    proc, bodies = run_helm_test_script(defaults, [400])
    assert proc.returncode == 1
    assert len(bodies) == 1  # a 4xx is final, no retry


def test_helm_test_script_fails_when_202_never_comes(defaults):
    proc, bodies = run_helm_test_script(defaults, [503])
    assert proc.returncode == 1
    assert len(bodies) == 10


# --- lookup against an API server: the credentials survive `helm upgrade` ------------

class _FakeApiServer:
    """Just enough of a Kubernetes API server for `helm template --dry-run=server`:
    version, discovery for the kinds the chart renders, and GET on a few Secrets."""

    GROUPS = {
        "v1": [("Secret", "secrets"), ("ConfigMap", "configmaps"), ("Service", "services"),
               ("ServiceAccount", "serviceaccounts"), ("Pod", "pods")],
        "apps/v1": [("Deployment", "deployments"), ("StatefulSet", "statefulsets")],
        "rbac.authorization.k8s.io/v1": [("Role", "roles"), ("RoleBinding", "rolebindings")],
        "networking.k8s.io/v1": [("NetworkPolicy", "networkpolicies")],
    }

    def __init__(self, namespace: str, secrets: dict[str, dict[str, str]]):
        import http.server
        import json
        import threading

        self.requests: list[str] = []
        objects = {}
        for name, data in secrets.items():
            objects[(namespace, name)] = {
                "apiVersion": "v1", "kind": "Secret",
                # What a previous `helm install` of this release left behind.
                "metadata": {"name": name, "namespace": namespace,
                             "labels": {"app.kubernetes.io/managed-by": "Helm"},
                             "annotations": {"meta.helm.sh/release-name": "warren",
                                             "meta.helm.sh/release-namespace": namespace}},
                "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
            }
        groups = self.GROUPS
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def reply(self, code: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802 (http.server API)
                path = self.path.split("?")[0]
                outer.requests.append(path)
                if path == "/version":
                    return self.reply(200, {"major": "1", "minor": "33", "gitVersion": "v1.33.1"})
                if path == "/api":
                    return self.reply(200, {"kind": "APIVersions", "versions": ["v1"]})
                if path == "/apis":
                    return self.reply(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                        {"name": gv.split("/")[0], "versions": [{"groupVersion": gv, "version": gv.split("/")[1]}],
                         "preferredVersion": {"groupVersion": gv, "version": gv.split("/")[1]}}
                        for gv in groups if "/" in gv]})
                gv = "v1" if path == "/api/v1" else path[len("/apis/"):] if path.startswith("/apis/") else None
                if gv in groups:
                    return self.reply(200, {"kind": "APIResourceList", "groupVersion": gv, "resources": [
                        {"name": plural, "singularName": kind.lower(), "namespaced": True, "kind": kind,
                         "verbs": ["get", "list"]} for kind, plural in groups[gv]]})
                parts = path.strip("/").split("/")
                if len(parts) == 6 and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "secrets" \
                        and (parts[3], parts[5]) in objects:
                    return self.reply(200, objects[(parts[3], parts[5])])
                return self.reply(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                        "reason": "NotFound", "code": 404})

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def kubeconfig(self, path) -> str:
        path.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n"
            f"clusters: [{{name: fake, cluster: {{server: '{self.url}'}}}}]\n"
            "users: [{name: fake, user: {}}]\n"
            "contexts: [{name: fake, context: {cluster: fake, user: fake}}]\n")
        return str(path)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def render_against(helm, tmp_path, secrets: dict[str, dict[str, str]], extra: list[str] = ()) -> dict[str, dict]:
    """The chart's two Secrets as `helm template --dry-run=server` renders them when the
    cluster holds `secrets` in namespace demo (the same lookup as helm upgrade)."""
    import yaml

    from conftest import run

    api = _FakeApiServer("demo", secrets)
    try:
        proc = run([helm, "template", "warren", str(CHART), "--namespace", "demo", "--dry-run=server",
                    "--disable-openapi-validation", "--kubeconfig", api.kubeconfig(tmp_path / "kubeconfig"),
                    "--show-only", "templates/rabbitmq-secrets.yaml", *extra])
    finally:
        api.close()
    assert proc.returncode == 0, proc.stderr
    assert "/api/v1/namespaces/demo/secrets/warren-rabbitmq" in api.requests  # the lookup happened
    assert "/api/v1/namespaces/demo/secrets/warren-rabbitmq-erlang-cookie" in api.requests
    return {d["metadata"]["name"]: d for d in yaml.safe_load_all(proc.stdout) if d}


KEPT = {"warren-rabbitmq": {"username": "warren", "password": "KeptFromTheFirstInstall42"},
        "warren-rabbitmq-erlang-cookie": {"cookie": "KEPTCOOKIEKEPTCOOKIEKEPTCOOKIE"}}


def test_upgrade_keeps_the_generated_password_and_cookie(helm, tmp_path):
    secrets = render_against(helm, tmp_path, KEPT)
    assert decoded(secrets["warren-rabbitmq"], "password") == "KeptFromTheFirstInstall42"
    assert decoded(secrets["warren-rabbitmq-erlang-cookie"], "cookie") == "KEPTCOOKIEKEPTCOOKIEKEPTCOOKIE"


def test_first_install_generates_fresh_credentials(helm, tmp_path):
    first = render_against(helm, tmp_path, {})
    second = render_against(helm, tmp_path, {})
    password = decoded(first["warren-rabbitmq"], "password")
    assert len(password) == 32 and password.isalnum()
    assert password != decoded(second["warren-rabbitmq"], "password")
    assert decoded(first["warren-rabbitmq-erlang-cookie"], "cookie") != \
        decoded(second["warren-rabbitmq-erlang-cookie"], "cookie")


def test_a_given_password_wins_over_the_stored_one(helm, tmp_path):
    secrets = render_against(helm, tmp_path, KEPT, ["--set", "rabbitmq.auth.password=OperatorChosen123"])
    assert decoded(secrets["warren-rabbitmq"], "password") == "OperatorChosen123"
    assert decoded(secrets["warren-rabbitmq-erlang-cookie"], "cookie") == "KEPTCOOKIEKEPTCOOKIEKEPTCOOKIE"


def test_a_stored_secret_without_a_password_gets_one(helm, tmp_path):
    secrets = render_against(helm, tmp_path, {"warren-rabbitmq": {"username": "warren"}})
    assert len(decoded(secrets["warren-rabbitmq"], "password")) == 32


def _env(doc: dict) -> dict:
    (c,) = [c for c in doc["spec"]["template"]["spec"]["containers"]]
    return {e["name"]: e for e in c["env"]}


def test_tokens_are_on_by_default_with_the_database_url_from_the_secret(defaults):
    sender = _env(defaults.one("Deployment", "warren-sender"))
    assert sender["WARREN_AUTH"]["value"] == "required"
    assert sender["WARREN_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "warren-postgres", "key": "url"}
    admin = _env(defaults.one("Deployment", "warren-admin"))
    assert admin["WARREN_DATABASE_URL"] == sender["WARREN_DATABASE_URL"]
    assert admin["WARREN_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "warren-admin", "key": "token"}
    for name in ("warren-admin", "warren-postgres"):
        assert defaults.one("Secret", name)["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    import base64
    url = base64.b64decode(defaults.one("Secret", "warren-postgres")["data"]["url"]).decode()
    password = base64.b64decode(defaults.one("Secret", "warren-postgres")["data"]["password"]).decode()
    assert url == f"postgres://warren:{password}@warren-postgres:5432/warren" and len(password) == 32
    assert len(base64.b64decode(defaults.one("Secret", "warren-admin")["data"]["token"])) == 40


def test_postgres_is_reached_only_by_the_sender_and_admin(defaults):
    policy = defaults.one("NetworkPolicy", "warren-postgres")
    (rule,) = policy["spec"]["ingress"]
    (source,) = rule["from"]
    assert source["podSelector"]["matchExpressions"][0]["values"] == ["sender", "admin"]
    assert rule["ports"] == [{"port": "postgres", "protocol": "TCP"}]
    sts = defaults.one("StatefulSet", "warren-postgres")
    assert sts["spec"]["template"]["spec"]["containers"][0]["image"].startswith("postgres:")
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"


def test_no_auth_renders_no_database_and_an_open_sender(render):
    rendered = render("no-auth")
    kinds = {(d["kind"], d["metadata"]["name"]) for d in rendered.docs}
    assert not any("postgres" in name or name == "warren-admin" for _, name in kinds)
    sender = _env(rendered.one("Deployment", "warren-sender"))
    assert sender["WARREN_AUTH"]["value"] == "off" and "WARREN_DATABASE_URL" not in sender


def test_external_database_comes_from_the_existing_secret(render):
    rendered = render("external-db")
    kinds = {(d["kind"], d["metadata"]["name"]) for d in rendered.docs}
    assert not any("postgres" in name for _, name in kinds)
    sender = _env(rendered.one("Deployment", "warren-sender"))
    assert sender["WARREN_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "tokens-db", "key": "DATABASE_URL"}
    import base64
    token = base64.b64decode(rendered.one("Secret", "warren-admin")["data"]["token"]).decode()
    assert token == "a-given-admin-token-1234"
