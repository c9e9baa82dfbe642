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


def test_secrets_reuse_what_the_cluster_holds():
    """`helm template` has no cluster, so lookup() returns nothing there; check the
    template reads the existing Secret before generating anything."""
    source = (CHART / "templates" / "rabbitmq-secrets.yaml").read_text()
    assert 'lookup "v1" "Secret" .Release.Namespace $secretName' in source
    assert 'lookup "v1" "Secret" .Release.Namespace $cookieName' in source
    lookup_at = source.index("$existing := lookup")
    assert lookup_at < source.index("randAlphaNum 32")
    assert source.index("$existingCookie := lookup") < source.index("randAlphaNum 64")


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
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["SENDER_URL"] == "http://warren-sender:80/send"
    script = c["command"][-1]
    assert '-X POST "$SENDER_URL"' in script
    assert "Content-Type: application/json" in script
    assert "202) exit 0" in script
    assert "exit 1" in script  # anything else fails the test


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
