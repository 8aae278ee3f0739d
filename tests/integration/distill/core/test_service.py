"""The worker service: real HTTP endpoints, and a graceful stop on SIGTERM in a real process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator

import pytest

from distill.core.service import Service


def get(port: int, path: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


@pytest.fixture
def service() -> Iterator[Service]:
    s = Service(role="test", worker=f"w-{uuid.uuid4().hex[:6]}", host="127.0.0.1", health_timeout_s=0.3)
    s.start_http()
    yield s
    s.shutdown_http()


def test_metrics_endpoint(service):
    service.heartbeat()
    service.set_ready(True, "assigned")
    code, ctype, body = get(service.port, "/metrics")
    assert code == 200
    assert ctype.startswith("text/plain")
    assert "distill_build_info{" in body
    assert f'distill_ready{{role="test",worker="{service.worker}"}} 1.0' in body
    assert f'distill_heartbeat_timestamp_seconds{{role="test",worker="{service.worker}"}}' in body
    assert "# TYPE distill_dead_letters_total counter" in body


def test_healthz_turns_503_when_the_heartbeat_is_stale(service):
    service.heartbeat()
    code, ctype, body = get(service.port, "/healthz")
    assert (code, ctype) == (200, "application/json")
    reply = json.loads(body)
    assert reply["ok"] is True and reply["role"] == "test" and reply["worker"] == service.worker
    time.sleep(0.5)
    code, _, body = get(service.port, "/healthz")
    assert code == 503
    assert json.loads(body)["ok"] is False
    assert "old" in json.loads(body)["detail"]
    service.heartbeat()
    assert get(service.port, "/healthz")[0] == 200


def test_readyz_is_503_until_ready(service):
    code, _, body = get(service.port, "/readyz")
    assert code == 503
    assert json.loads(body) == {"ok": False, "role": "test", "worker": service.worker, "detail": "starting"}
    service.set_ready(True, "partitions assigned")
    code, _, body = get(service.port, "/readyz?verbose=1")  # query strings are ignored
    assert code == 200 and json.loads(body)["detail"] == "partitions assigned"
    service.set_ready(False, "broker unreachable")
    code, _, body = get(service.port, "/readyz")
    assert code == 503 and json.loads(body)["detail"] == "broker unreachable"


def test_readyz_is_503_while_one_step_runs_too_long(tmp_path):
    """A step blocked on a stalled broker (a commit that does not return) is not ready."""
    s = Service(role="test", worker=f"w-{uuid.uuid4().hex[:6]}", host="127.0.0.1", busy_ready_s=0.3)
    s.start_http()
    try:
        s.heartbeat()
        s.set_ready(True, "assigned")
        assert get(s.port, "/readyz")[0] == 200
        time.sleep(0.5)  # no heartbeat: the loop is stuck in one step
        code, _, body = get(s.port, "/readyz")
        assert code == 503 and "broker stalled?" in json.loads(body)["detail"]
        assert f'distill_ready{{role="test",worker="{s.worker}"}} 0.0' in get(s.port, "/metrics")[2]
        s.heartbeat()  # the step returned
        assert get(s.port, "/readyz")[0] == 200
    finally:
        s.shutdown_http()


def test_unknown_path_is_404_with_a_hint(service):
    code, _, body = get(service.port, "/nope")
    assert code == 404 and "/metrics" in body


def test_run_stops_when_step_returns_false_and_closes_once():
    s = Service(role="test", worker="run", health_timeout_s=5)
    calls, closed = [], []

    def step() -> bool:
        calls.append(1)
        return len(calls) < 3

    s.run(step, lambda: closed.append(True))
    assert len(calls) == 3 and closed == [True]
    assert s.ready() == (False, "stopping")


def test_run_closes_even_when_step_raises():
    s = Service(role="test", worker="boom", health_timeout_s=5)
    closed = []

    def step() -> bool:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        s.run(step, lambda: closed.append(True))
    assert closed == [True]


# -- a real process and a real signal ----------------------------------------------------------
WORKER = """
import sys, time
from pathlib import Path
from distill.core.service import Service, configure_logging

out = Path(sys.argv[1])
close_seconds = float(sys.argv[2])
configure_logging("test", "worker")
service = Service(role="test", worker="worker", host="127.0.0.1",
                  stop_deadline_s=float(sys.argv[3]))
service.install_signal_handlers()
port = service.start_http()
state = {"steps": 0, "in_step": False}
fail_after = int(sys.argv[4]) if len(sys.argv) > 4 else None

def step():
    state["in_step"] = True
    time.sleep(0.05)  # a batch in progress when the signal arrives is finished
    state["steps"] += 1
    state["in_step"] = False
    if state["steps"] == 1:
        print(f"running {port}", flush=True)
    if fail_after is not None and state["steps"] >= fail_after:
        raise RuntimeError("a fatal error in the loop")
    return True

def close():
    out.write_text(f"closed steps={state['steps']} in_step={state['in_step']}")
    time.sleep(close_seconds)

service.run(step, close)
"""


@pytest.fixture
def worker(tmp_path) -> Iterator:
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    procs: list[subprocess.Popen] = []

    def start(close_seconds: float = 0.0, stop_deadline_s: float = 30.0, fail_after: int | None = None):
        out = tmp_path / f"closed-{len(procs)}.txt"
        extra = [] if fail_after is None else [str(fail_after)]
        proc = subprocess.Popen(
            [sys.executable, str(script), str(out), str(close_seconds), str(stop_deadline_s), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        procs.append(proc)
        line = proc.stdout.readline()
        assert line.startswith("running"), line + proc.stderr.read()
        return proc, out, int(line.split()[1])

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_finishes_the_step_then_closes_and_exits_0(worker):
    proc, out, port = worker()
    assert get(port, "/healthz")[0] == 200
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0, proc.stderr.read()
    text = out.read_text()
    assert text.startswith("closed steps=") and text.endswith("in_step=False")
    logs = [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]
    stop = [e for e in logs if e["msg"] == "stop requested"]
    assert stop and stop[0]["signal"] == "SIGTERM" and stop[0]["role"] == "test"


def test_second_signal_exits_at_once(worker):
    proc, out, _ = worker(close_seconds=30)
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert out.exists(), "close did not start"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 130


def test_stop_deadline_ends_a_hung_close(worker):
    proc, out, _ = worker(close_seconds=30, stop_deadline_s=0.5)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 1
    assert time.monotonic() - started < 5
    assert out.exists()
    assert "graceful stop took longer" in proc.stderr.read()


def test_stop_deadline_also_ends_a_hung_close_after_an_error(worker):
    """An error ends the loop; a close that then hangs (a consumer waiting on a rebalance) must
    not keep a dead worker's process alive: the same deadline applies."""
    proc, out, _ = worker(close_seconds=30, stop_deadline_s=0.5, fail_after=3)
    assert proc.wait(timeout=10) == 1
    assert out.exists()
    assert "graceful stop took longer" in proc.stderr.read()
