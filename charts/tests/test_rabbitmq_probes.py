"""The chart's RabbitMQ probe commands, run against a real RabbitMQ node started the way the
chart starts it: the rendered rabbitmq.conf and enabled_plugins, the container's environment,
and an Erlang cookie file in HOME as the init container leaves it. The node is Debian's
rabbitmq-server (3.10 here, 4.x in the chart's image); the probes must pass on both, which is
also what `make local-up`'s node agent relies on.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import env_of

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")


def free_port() -> int:
    """A free port, never one the chart keeps for the node itself (epmd, distribution, CLI)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in (4369, 25672) and not 35672 <= port <= 35682:
            return port


def probe_commands(defaults) -> dict[str, list[str]]:
    sts = defaults.one("StatefulSet", "warren-rabbitmq")
    (c,) = [c for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] == "rabbitmq"]
    return {name: c[name]["exec"]["command"] for name in ("startupProbe", "readinessProbe", "livenessProbe")}, c


@pytest.fixture
def chart_like_node(render, tmp_path):
    """Starts (lazily, via the returned function) a node from the rendered chart objects, its
    listeners on free ports set through the chart's rabbitmq.ports values."""
    if not (RABBIT_BIN / "rabbitmq-server").is_file():
        pytest.fail("rabbitmq-server is not installed (apt-get install rabbitmq-server; .ci/run does)")
    amqp, management, prometheus, dist = (free_port() for _ in range(4))
    rendered = render(["--set", f"rabbitmq.ports.amqp={amqp}", "--set", f"rabbitmq.ports.management={management}",
                       "--set", f"rabbitmq.ports.prometheus={prometheus}"])
    probes, container = probe_commands(rendered)
    config = rendered.one("ConfigMap", "warren-rabbitmq-config")["data"]
    node = f"warren-probe-{amqp}@127.0.0.1"
    conf_d = tmp_path / "conf.d"
    conf_d.mkdir()
    conf = config["10-warren.conf"]
    for key, port in (("listeners.tcp.default", amqp), ("management.tcp.port", management),
                      ("prometheus.tcp.port", prometheus)):
        assert f"\n{key} = {port}\n" in f"\n{conf}\n", key
    conf, count = re.subn(r"^(cluster_formation\.classic_config\.nodes\.1) = .*$", rf"\1 = {node}", conf,
                          flags=re.MULTILINE)
    assert count == 1
    (conf_d / "10-warren.conf").write_text(conf)
    (conf_d / "enabled_plugins").write_text(config["enabled_plugins"])
    home = tmp_path / "home"
    home.mkdir()
    cookie = home / ".erlang.cookie"
    cookie.write_text(secrets.token_hex(16))
    cookie.chmod(0o400)  # what the erlang-cookie init container leaves behind
    env = {k: v["value"] for k, v in env_of(container).items() if "value" in v}
    assert env["RABBITMQ_USE_LONGNAME"] == "true"
    env.update({
        "RABBITMQ_NODENAME": node,  # rabbit@<pod>.<headless service>... in the cluster
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(conf_d / "enabled_plugins"),
        "RABBITMQ_DEFAULT_USER": "warren", "RABBITMQ_DEFAULT_PASS": secrets.token_hex(8),
        # The image reads /etc/rabbitmq/conf.d/*.conf, where the chart mounts its ConfigMap.
        "RABBITMQ_CONFIG_FILES": str(conf_d / "*.conf"),
        "RABBITMQ_DIST_PORT": str(dist),
        "RABBITMQ_MNESIA_BASE": str(tmp_path / "mnesia"), "RABBITMQ_LOG_BASE": str(tmp_path / "log"),
        "RABBITMQ_PID_FILE": str(tmp_path / "rabbit.pid"),
        "RABBITMQ_FEATURE_FLAGS_FILE": str(tmp_path / "feature_flags"),
        "ERL_CRASH_DUMP": str(tmp_path / "erl_crash.dump"),
        "HOME": str(home),
        "PATH": f"{RABBIT_BIN}:{os.environ['PATH']}",  # the image has the CLI tools on PATH
        "LANG": "C.UTF-8",
    })
    started: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        log = open(tmp_path / "server.log", "wb")
        proc = subprocess.Popen([str(RABBIT_BIN / "rabbitmq-server")], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        started.append(proc)
        return proc

    def probe(name: str) -> subprocess.CompletedProcess:
        return subprocess.run(probes[name], env=env, capture_output=True, text=True, timeout=60)

    yield start, probe, tmp_path, (amqp, management, prometheus)
    for proc in started:
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
    pid_file = tmp_path / "rabbit.pid"
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text().strip()), 9)
        except (ProcessLookupError, ValueError):
            pass
    shutil.rmtree(tmp_path / "mnesia", ignore_errors=True)


def test_probe_commands_fail_without_a_node_and_pass_once_it_runs(chart_like_node):
    start, probe, tmp_path, listeners = chart_like_node
    for name in ("startupProbe", "readinessProbe"):
        before = probe(name)
        assert before.returncode != 0, f"{name} passed with no node running: {before.stdout}"
    server = start()
    deadline = time.monotonic() + 120
    while probe("startupProbe").returncode != 0:
        assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "startup probe never passed:\n" + (tmp_path / "server.log").read_text()[-3000:]
        time.sleep(1)
    ready = probe("readinessProbe")
    assert ready.returncode == 0, ready.stdout + ready.stderr
    assert "Successfully connected to ports" in ready.stdout
    for port in listeners:  # the rabbitmq.ports values, which the node listens on
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            pass
    alive = probe("livenessProbe")
    assert alive.returncode == 0, alive.stdout + alive.stderr
