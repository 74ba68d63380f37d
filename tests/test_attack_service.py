"""Attacks on the agent as a service (sd_notify, watchdog, /metrics, /healthz) that the shipped
tests do not cover (issue 13 review). Each test is one hole and fails on the code it was written against.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from broker import free_port
from conftest import Built
from edgeops_agent.service import Notifier, ServiceMonitor
from test_service import WEDGE_LAUNCHER, NotifyReceiver, _abstract, _ask, _device, _get, _inputs, _metrics, _wait_http

#: The agent with onnxruntime raising its own exception (as onnxruntime's ``Fail`` /
#: ``RuntimeException`` do) on every call while a flag file exists.
RAISING_LAUNCHER = """
import os
from edgeops_agent import runtime
flag = os.environ["EDGEOPS_TEST_RAISE"]
real = runtime.OnnxRuntime.invoke
def invoke(self, x):
    if os.path.exists(flag):
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : simulated")
    return real(self, x)
runtime.OnnxRuntime.invoke = invoke
from edgeops_agent.cli import main
main()
"""


def test_a_slow_client_cannot_hold_the_metrics_listener(tmp_path: Path, built: Built) -> None:
    """Eight clients that send one byte every 2 s are never "silent", so the 10 s timeout never
    closes them: /healthz and /metrics answer 503 (busy) for as long as they keep trickling.
    A whole request must get a deadline (here: still refused 15 s later)."""
    port = free_port()
    dev = _device(tmp_path, built, None, "atk-slow", extra=f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    stop = threading.Event()
    try:
        dev.start()
        _wait_http(port, "/healthz", lambda s, b: s == 200, "healthz 200")
        slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]

        def trickle() -> None:
            while not stop.wait(2.0):
                for s in slow:
                    with contextlib.suppress(OSError):
                        s.send(b"X")

        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        time.sleep(15.0)
        status, body = _get(port, "/healthz")
        stop.set()
        thread.join()
        for s in slow:
            s.close()
        assert status == 200, (status, body)
    finally:
        stop.set()
        dev.kill()


def test_runtime_exceptions_are_counted_as_inference_errors(tmp_path: Path, built: Built) -> None:
    """docs/operations.md: edgeops_agent_inference_errors_total counts rejected requests by error
    type. A runtime that raises its own exception (not an EdgeopsError) is answered
    InternalError but counted nowhere: every request fails and the error counters stay 0, so
    the EdgeopsAgentInferenceErrors alert never fires."""
    port = free_port()
    flag = tmp_path / "raise"
    dev = _device(tmp_path, built, None, "atk-raise", extra=f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    try:
        dev.start(env={"EDGEOPS_TEST_RAISE": str(flag)}, argv=[sys.executable, "-c", RAISING_LAUNCHER])
        _wait_http(port, "/healthz", lambda s, b: s == 200, "healthz 200")
        sock = dev.socket()
        row = _inputs(built)[0]
        flag.touch()
        replies = [_ask(sock, {"op": "predict", "features": row, "id": i}) for i in range(5)]
        flag.unlink()
        sock.close()
        assert all(not r["ok"] and r["error"]["type"] == "InternalError" for r in replies), replies
        scraped = _metrics(port)
        errors = {k: v for k, v in scraped.items() if k.startswith("edgeops_agent_inference_errors_total")}
        assert scraped["edgeops_agent_inferences_total"] == 0
        assert sum(errors.values()) == 5, errors
    finally:
        flag.unlink(missing_ok=True)
        dev.kill()


def test_an_infinite_watchdog_timeout_does_not_kill_the_watchdog_thread(tmp_path: Path, built: Built) -> None:
    """$WATCHDOG_USEC=18446744073709551615 (USEC_INFINITY, which libsystemd's sd_watchdog_enabled
    treats as "no watchdog"): half of it is past threading.TIMEOUT_MAX, Event.wait raises
    OverflowError, and the edgeops-watchdog thread dies with a traceback. No probe runs after
    that, so a later wedge is never seen by /healthz either."""
    receiver = NotifyReceiver(_abstract()).start()
    dev = _device(tmp_path, built, None, "atk-wd")
    try:
        dev.start(env={"NOTIFY_SOCKET": receiver.address, "WATCHDOG_USEC": "18446744073709551615"})
        receiver.wait(lambda r: "READY=1" in r.lines(), "READY=1")
        time.sleep(1.0)
        assert dev.stop() == 0
    finally:
        dev.kill()
        receiver.close()
    log = dev.log.read_text()
    assert "Traceback" not in log and "OverflowError" not in log, log[-2000:]


def test_clients_that_hang_up_cannot_flood_the_journal(tmp_path: Path, built: Built) -> None:
    """Every metrics client that resets its connection before the answer is written costs one
    WARNING line (ConnectionResetError/BrokenPipeError in handle_error): any local process can
    write thousands a second into the journal, whose per-service rate limit then drops the
    agent's own warnings (serving path stuck, outbox failing)."""
    port = free_port()
    dev = _device(tmp_path, built, None, "atk-flood", extra=f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    try:
        dev.start()
        _wait_http(port, "/healthz", lambda s, b: s == 200, "healthz 200")
        for _ in range(100):
            s = socket.create_connection(("127.0.0.1", port))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close() sends RST
            s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            s.close()
        _wait_http(port, "/healthz", lambda s, b: s == 200, "healthz 200 after the hang-ups")
        assert dev.stop() == 0
    finally:
        dev.kill()
    warnings = [line for line in dev.log.read_text().splitlines() if "WARNING" in line and "metrics request failed" in line]
    assert len(warnings) <= 1, f"{len(warnings)} warnings, e.g. {warnings[:2]}"


def test_healthz_says_starting_until_the_first_probe_answered(tmp_path: Path, built: Built) -> None:
    """The listener serves before the first (synchronous) probe returns; until it has, the agent
    has not shown it can answer, so /healthz is 503 "starting", not 200."""
    port = free_port()
    flag = tmp_path / "wedge"
    flag.touch()  # the first probe's runtime call waits until the flag goes
    dev = _device(tmp_path, built, None, "atk-start", extra=f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    try:
        dev.start(env={"EDGEOPS_TEST_WEDGE": str(flag)}, argv=[sys.executable, "-c", WEDGE_LAUNCHER])
        status, body = _wait_http(port, "/healthz", lambda s, b: s != 0, "any /healthz answer")
        assert status == 503 and body.startswith("unavailable: starting"), (status, body)
        assert _metrics(port)["edgeops_agent_healthy"] == 0
        flag.unlink()
        _, body = _wait_http(port, "/healthz", lambda s, b: s == 200, "healthz 200 once the probe answered")
        assert body.startswith("ok: serving ")
        assert dev.stop() == 0
    finally:
        flag.unlink(missing_ok=True)
        dev.kill()


class GatedModel:
    """A model whose runtime call waits for one permit per call: a wedge that can be let go once."""

    def __init__(self) -> None:
        self.permits = threading.Semaphore(0)
        self.calls = 0
        self.expired = False
        vectors = [SimpleNamespace(input=[0.0])]
        self.manifest = SimpleNamespace(
            name="m", version="1.0.0", release=1, runtime="fake", self_test=SimpleNamespace(vectors=vectors)
        )

    def sample(self, values: Any) -> Any:
        return list(values)

    def prepare(self, x: Any) -> tuple[Any, Any]:
        return x, x

    def invoke(self, tensor: Any) -> Any:
        self.calls += 1
        self.permits.acquire()
        return tensor

    def output(self, y: Any) -> Any:
        return y


def _until(predicate: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_a_probe_stuck_since_an_earlier_tick_that_returns_late_is_not_a_ping() -> None:
    """The serving path wedges; its probe returns once, then the next runtime call wedges again.
    That late answer belongs to a probe started ticks ago: it proves nothing about now, so no
    WATCHDOG=1 may follow it (the old watchdog pinged on any probe's completion). Once calls
    answer again, the pings resume."""
    receiver = NotifyReceiver(_abstract()).start()
    model = GatedModel()
    notifier = Notifier(receiver.address)
    monitor = ServiceMonitor(SimpleNamespace(model=model), notifier, watchdog_s=0.2)  # type: ignore[arg-type]
    try:
        model.permits.release()  # the synchronous first probe answers
        monitor.start()
        _until(lambda: model.calls >= 2 and monitor.stuck_for() > 4 * monitor.period_s, "a wedged probe")
        assert "stuck" in (monitor.problem() or "")
        released = time.monotonic()
        model.permits.release()  # the wedged call returns; the next one wedges again
        _until(lambda: model.calls >= 3, "the probe asked for while the old one hung")
        time.sleep(6 * monitor.period_s)
        assert receiver.pings(since=released) == [], "a ping for a probe that started before the tick"
        assert monitor.probes == 2 and "stuck" in (monitor.problem() or "")
        for _ in range(1000):  # the runtime answers again
            model.permits.release()
        receiver.wait(lambda r: len(r.pings(since=released)) >= 2, "pings once probes answer again")
        assert monitor.problem() is None
    finally:
        for _ in range(1000):
            model.permits.release()
        monitor.stop()
        notifier.close()
        receiver.close()
