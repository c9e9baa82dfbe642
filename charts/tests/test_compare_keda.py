"""mk/compare_keda.py (`make compare-keda`, `make compare-keda-repeat`) without a cluster.

A run needs the local cluster; what is checked here is the part that turns reads into
figures: when the management API first showed a burst (the count watch against a stand-in
broker), and the rows `table` and `compare` print from a run's JSON, in particular a
scaler's reaction counted from that moment (its own part, the management API's lag left
out) next to the reaction counted from the burst.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO

SCRIPT = REPO / "mk" / "compare_keda.py"


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    # mk/local_e2e.py (imported by the script) reads LOCAL_STATE when imported
    os.environ.setdefault("LOCAL_STATE", str(tmp_path_factory.mktemp("state")))
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("compare_keda", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_burst_shows_at_the_midpoint_of_the_reads_around_its_first_count(ck):
    samples = [(10.0, 0), (10.2, 0), (10.4, None), (10.6, 0), (10.8, 40), (11.0, 40)]
    assert ck.first_visible(samples, 0) == (pytest.approx(10.7), 40)
    # a count left from before the burst is the base: only more than it shows the burst
    assert ck.first_visible([(1.0, 3), (1.2, 3), (1.4, 38)], 3) == (pytest.approx(1.3), 38)
    assert ck.first_visible([(1.0, 0), (1.2, 0)], 0) is None
    assert ck.first_visible([(1.0, 0), (1.2, None)], 0) is None, "a failed read shows nothing"


class StandInBroker:
    """The management API's count of the queue: 0 until `shows_at`, then 40; every third
    read fails as a port-forward can."""

    def __init__(self, shows_at: float):
        self.shows_at, self.reads = shows_at, []

    def queue(self):
        now = time.time()
        self.reads.append(now)
        if len(self.reads) % 3 == 0:
            raise ConnectionResetError("port-forward dropped the connection")
        return {"messages": 40 if now >= self.shows_at else 0}


def test_the_count_watch_finds_when_the_count_shows_and_stops_reading(ck):
    broker = StandInBroker(shows_at=time.time() + 1.0)
    watch = ck.CountWatch(broker, timeout=20)
    deadline = time.time() + 20
    while watch.thread.is_alive() and time.time() < deadline:
        time.sleep(0.1)
    assert not watch.thread.is_alive(), "the watch goes on reading after the count showed"
    reads = len(broker.reads)
    t, count = watch.shown()
    assert count == 40
    assert watch.base == 0
    assert watch.errors >= 1, "the failed reads are counted"
    shown_by = [s for s, n in watch.samples if n == 40][0]
    before = max(s for s, n in watch.samples if s < shown_by)
    assert before < broker.shows_at <= shown_by
    assert before <= t <= shown_by
    time.sleep(3 * ck.CountWatch.POLL)
    assert len(broker.reads) == reads, "no read after the count showed"


def test_the_count_watch_gives_up_at_its_timeout(ck):
    broker = StandInBroker(shows_at=time.time() + 3600)
    watch = ck.CountWatch(broker, timeout=1)
    watch.thread.join(timeout=10)
    assert not watch.thread.is_alive()
    assert watch.shown() is None


def bursts(reactions, visible, first_ack=4.0):
    return [{"reaction": r, "visible": v, "visible_count": 40, "base_count": 0, "first_new_ack": first_ack + r,
             "drain": 22.0, "ideal": 15, "peak": 8, "send_seconds": 0.3, "phase": (i + 0.5) / 3,
             "aligned_to_sync": False} for i, (r, v) in enumerate(zip(reactions, visible))]


IDLE = {"broker_http_per_min": 60.0, "broker_amqp_per_min": 68.0, "apiserver_per_min": 90.0,
        "apiserver_by_request": {"GET secrets": 1.0, "PATCH warren.dev/queuescalers/status": 1.0}}


def result(keda_reactions, keda_visible):
    side = {"idle": IDLE, "scale_in": {"peak": 3, "stopped": 2, "stopped_busy": 0, "redelivered": 0, "dead": 0}}
    keda, warren = copy.deepcopy(side), copy.deepcopy(side)
    for start in ("from_zero", "from_one"):
        keda[start] = bursts(keda_reactions, keda_visible)
        warren[start] = bursts([0.5, 0.3, 0.9], [4.8, 4.4, 8.6])
    return {"mode": "1s", "date": "2026-11-30 15:40 UTC", "keda_version": "2.19.0", "hpa_sync": 1.0,
            "keda_poll": 1, "warren_poll": 1, "reps": 3, "phase": "stratified", "k8s": "v1.34.4",
            "rabbitmq": "3.10.8", "burst": [40, 3], "stream": [15, 30],
            "idle_baseline": dict(IDLE, apiserver_by_request={"GET secrets": 0.5}), "keda": keda, "warren": warren}


def run(*args, env_dir):
    env = dict(os.environ, LOCAL_STATE=str(env_dir), COMPARE_OUT=str(env_dir))
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          check=False, cwd=REPO)


def row(out: str, label: str) -> list[str]:
    line = next(x for x in out.splitlines() if x.startswith(label))
    return line[len(label):].split()


def test_compare_flags_the_reaction_but_not_the_part_after_the_count_showed(tmp_path):
    # KEDA in run B waited longer for the management API (8.8 s instead of 4.2 s) and then
    # took the same 0.8 s: its reaction does not repeat, its own part does.
    a = tmp_path / "a.json"
    b = tmp_path / "b.json"
    a.write_text(json.dumps(result([5.0, 5.4, 4.7], [4.2, 4.6, 3.9])))
    b.write_text(json.dumps(result([9.6, 5.4, 4.7], [8.8, 4.6, 3.9])))
    p = run("compare", str(a), str(b), env_dir=tmp_path)
    assert p.returncode == 0, p.stderr
    assert row(p.stdout, "from zero: burst -> first scale write p95 (s)")[:3] == ["5.4", "9.6", "1.78!"]
    assert row(p.stdout, "from zero: burst -> count in management API p95 (s)")[:3] == ["4.6", "8.8", "1.91!"]
    assert row(p.stdout, "from zero: count shown -> first scale write p95 (s)")[:3] == ["0.8", "0.8", "1.00"]
    # warren wrote before the management API showed the burst: negative, the same in both runs
    assert row(p.stdout, "from one: count shown -> first scale write p50 (s)")[3:] == ["-4.3", "-4.3", "1.00"]
    assert "  B keda   from_zero after_visible median   0.8: 0.8 0.8 0.8" in p.stdout


def test_the_table_gives_no_ratio_against_a_negative_time_and_old_runs_still_compare(tmp_path):
    (tmp_path / "1s.json").write_text(json.dumps(result([5.0, 5.4, 4.7], [4.2, 4.6, 3.9])))
    p = run("table", env_dir=tmp_path)
    assert p.returncode == 0, p.stderr
    assert row(p.stdout, "from zero: count shown -> first scale write p50 (s)") == ["0.8", "-4.3", "-"]
    assert row(p.stdout, "from zero: burst -> count in management API p50 (s)") == ["4.2", "4.8", "0.88"]
    # a run taken before the count watch (no `visible`) prints `-` there and compares the rest
    old = result([5.0, 5.4, 4.7], [4.2, 4.6, 3.9])
    for side in ("keda", "warren"):
        for start in ("from_zero", "from_one"):
            for x in old[side][start]:
                del x["visible"], x["visible_count"], x["base_count"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    p = run("compare", str(tmp_path / "old.json"), str(tmp_path / "1s.json"), env_dir=tmp_path)
    assert p.returncode == 0, p.stderr
    assert row(p.stdout, "from zero: count shown -> first scale write p50 (s)")[:3] == ["-", "0.8", "-?"]
    assert row(p.stdout, "from zero: burst -> first scale write p50 (s)")[:3] == ["5.0", "5.0", "1.00"]


def test_each_arming_gets_a_scaled_object_and_so_an_hpa_of_its_own(ck, monkeypatch):
    # the HPA controller keeps recommendations per HPA name: a reused name inherited the last
    # burst's 8 replicas (the defaults run of 2026-11-30 17:50 failed on it)
    monkeypatch.setattr(ck, "broker_credentials", lambda: ("u", "p"))
    names = [ck.keda_objects(1)[-1]["metadata"]["name"] for _ in range(3)]
    assert len(set(names)) == 3 and all(n.startswith(ck.WORKER + "-") for n in names)
    assert ck.scaled_object == names[-1], "arm() waits for the ScaledObject it applied last"
    hpas = [{"metadata": {"name": f"keda-hpa-{names[0]}"}}, {"metadata": {"name": "worker-cpu"}}]
    assert ck.keda_hpas(hpas) == [f"keda-hpa-{names[0]}"]


def test_a_rep_whose_worker_scaled_before_its_burst_is_armed_again_not_counted(ck, monkeypatch):
    replicas = {"now": 8}
    monkeypatch.setattr(ck, "kjson", lambda *args: {"spec": {"replicas": replicas["now"]}})
    assert ck.scaled_before_burst(1) == 8
    replicas["now"] = 1
    assert ck.scaled_before_burst(1) is None

    outcomes = iter([None, None, {"reaction": 6.0}])
    monkeypatch.setattr(ck, "burst_once", lambda *args: next(outcomes))
    assert ck.burst("keda", 1, 0) == {"reaction": 6.0, "redone": 2}
    monkeypatch.setattr(ck, "burst_once", lambda *args: None)
    monkeypatch.setattr(ck, "fail", lambda msg: (_ for _ in ()).throw(AssertionError(msg)))
    with pytest.raises(AssertionError, match="scaled before the burst in 3 attempts"):
        ck.burst("keda", 1, 0)


def test_settling_waits_for_the_management_api_to_show_the_queue_empty(ck, monkeypatch):
    shown = iter([{"messages": 40}, ConnectionResetError("port-forward"), {"messages": 0}])

    class LaggingBroker:
        def queue(self):
            v = next(shown)
            if isinstance(v, Exception):
                raise v
            return v

    b = LaggingBroker()
    assert [ck.shows_empty(b) for _ in range(3)] == [False, False, True]
