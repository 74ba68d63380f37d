"""The agent as a managed service: the systemd unit, sd_notify + watchdog, Prometheus metrics, /healthz.

Real parts throughout: ``systemd-analyze`` on the shipped unit; the agent as its own
process (``edgeops-agent run``) against a real Mosquitto, with a built and installed ECU
bundle; the notify protocol received on the test's own ``AF_UNIX`` datagram socket (with
``SO_PASSCRED``, so the sender's PID is the kernel's word, as systemd checks it for
``NotifyAccess=main``); ``/metrics`` scraped over HTTP and parsed by ``prometheus_client``'s
own parser; a full disk that is a real tmpfs.

How the serving path is wedged (``test_wedged_serving_thread_stops_the_pings``): the agent
process is started through a small launcher that replaces ``OnnxRuntime.invoke`` with one
that does not return while a flag file exists, then runs the real CLI. That is what a
native runtime deadlock looks like from Python (the call never returns, the GIL is
released meanwhile); nothing in the agent knows about the flag, and the probe, the
watchdog, ``/healthz`` and the faulthandler stack dump are the shipped code.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker import Broker, free_port
from conftest import AGENT, REPO, Built, fill_disk, run_agent
from edgeops_agent.agent import LATENCY_BUCKETS_S, LATENCY_RING
from edgeops_agent.agent import Agent as AgentApi
from edgeops_agent.config import MetricsConfig, load_config
from edgeops_agent.errors import ConfigError
from edgeops_agent.server import recv_frame, send_frame
from edgeops_agent.service import MAX_STATUS, Notifier, ServiceMonitor, watchdog_timeout_s
from edgeops_agent.store import DataDir
from edgeops_core import Manifest, read_members

UNIT = REPO / "packaging" / "systemd" / "edgeops-agent.service"
#: The unit's ExecStart binary; the verify test points it at this checkout's real script.
UNIT_BINARY = "/opt/edgeops/bin/edgeops-agent"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or (
    "/usr/bin/systemd-analyze" if Path("/usr/bin/systemd-analyze").exists() else None
)

WEDGE_LAUNCHER = """
import os, time
from edgeops_agent import runtime
flag = os.environ["EDGEOPS_TEST_WEDGE"]
real = runtime.OnnxRuntime.invoke
def invoke(self, x):
    while os.path.exists(flag):  # a runtime call that does not return (the GIL is free meanwhile)
        time.sleep(0.01)
    if os.path.exists(flag + ".fail"):  # a runtime that raises its own exception on every call
        raise RuntimeError("simulated runtime failure")
    return real(self, x)
runtime.OnnxRuntime.invoke = invoke
from edgeops_agent.cli import main
main()
"""
#: The agent with prometheus_client made unimportable, as on a device without the extra.
NO_PROMETHEUS = "import sys; sys.modules['prometheus_client'] = None; from edgeops_agent.cli import main; main()"


# the unit file ------------------------------------------------------------------------------


def _unit_values() -> dict[str, list[str]]:
    """``Section.Key`` -> every value given (systemd keys may repeat)."""
    values: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        values.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return values


def _verify(unit_text: str, folder: Path) -> str:
    """``systemd-analyze verify`` on ``unit_text`` as edgeops-agent.service; everything it said."""
    assert SYSTEMD_ANALYZE is not None
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "edgeops-agent.service"
    path.write_text(unit_text)
    done = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(path)], capture_output=True, text=True, timeout=60)
    said = (done.stdout + done.stderr).strip()
    return f"exit {done.returncode}: {said}" if done.returncode != 0 or said else ""


def _testable_unit() -> str:
    """The shipped unit with ExecStart pointing at this checkout's real edgeops-agent script."""
    script = Path(sys.executable).parent / "edgeops-agent"
    assert script.is_file() and os.access(script, os.X_OK), f"{script}: the console script is not installed"
    text = UNIT.read_text()
    assert text.count(UNIT_BINARY) == 1
    return text.replace(UNIT_BINARY, str(script))


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (scripts/setup.sh --dev installs it)")
def test_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """The unit verifies with no word from systemd-analyze; the check itself catches broken units."""
    text = _testable_unit()
    assert _verify(text, tmp_path / "good") == ""
    # The same check on broken copies: each must be reported (unknown keys and bad values
    # only warn, with exit 0, so the test fails on any output, not only on the exit code).
    for broken in (
        text.replace("Type=notify", "Type=notfy"),
        text.replace("ProtectSystem=strict", "ProtectSytem=strict"),
        text.replace("WatchdogSec=30", "WatchdogSec=thirty"),
        text.replace(str(Path(sys.executable).parent / "edgeops-agent"), "/nonexistent/edgeops-agent"),
    ):
        assert _verify(broken, tmp_path / "bad") != ""


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (scripts/setup.sh --dev installs it)")
def test_unit_file_exposure_is_ok(tmp_path: Path) -> None:
    """systemd's own hardening score for the unit: "OK" (below 2.0 of 10)."""
    path = tmp_path / "edgeops-agent.service"
    path.write_text(_testable_unit())
    done = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", "--no-pager", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stdout.splitlines() if "Overall exposure level" in x)
    score = float(line.split(":", 1)[1].split()[0])
    assert score < 2.0, line


def test_unit_file_declares_the_service_contract() -> None:
    v = _unit_values()
    one = {k: vals[-1] for k, vals in v.items()}
    assert one["Service.Type"] == "notify" and one["Service.NotifyAccess"] == "main"
    assert one["Service.User"] == one["Service.Group"] == "edgeops"
    assert one["Service.ProtectSystem"] == "strict"
    assert v["Service.ReadWritePaths"] == ["/var/lib/edgeops-agent"]  # the data directory, nothing else
    assert one["Service.StateDirectory"] == "edgeops-agent"
    assert one["Service.Restart"] == "on-failure" and int(one["Service.WatchdogSec"]) > 0
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome", "PrivateDevices"):
        assert one[f"Service.{key}"] == "yes", key
    assert one["Service.CapabilityBoundingSet"] == ""
    exec_start = one["Service.ExecStart"].split()
    assert exec_start[:2] == [UNIT_BINARY, "run"] and exec_start[2:] == ["--config", "/etc/edgeops/agent.toml"]
    # The agent.toml docs/operations.md installs uses the unit's data directory.
    assert 'data_dir = "/var/lib/edgeops-agent"' in (REPO / "docs" / "operations.md").read_text()


# the notify protocol, in-process --------------------------------------------------------------


class NotifyReceiver:
    """The service manager's side: an AF_UNIX datagram socket that records every message and its sender."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.messages: list[tuple[float, int, list[str]]] = []  # (monotonic time, sender pid, lines)
        self._lock = threading.Lock()
        self._stop = False
        self._thread: threading.Thread | None = None

    def start(self) -> NotifyReceiver:
        self.sock.settimeout(0.1)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        creds = struct.Struct("3i")
        while not self._stop:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(creds.size))
            except TimeoutError:
                continue
            except OSError:
                return
            pid = -1
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = creds.unpack(payload[: creds.size])[0]
            with self._lock:
                self.messages.append((time.monotonic(), pid, data.decode().split("\n")))

    def lines(self, since: float = 0.0) -> list[str]:
        with self._lock:
            return [line for t, _, lines in self.messages if t >= since for line in lines]

    def pings(self, since: float = 0.0) -> list[float]:
        with self._lock:
            return [t for t, _, lines in self.messages if t >= since and "WATCHDOG=1" in lines]

    def senders(self) -> set[int]:
        with self._lock:
            return {pid for _, pid, _ in self.messages}

    def wait(self, predicate: Callable[[NotifyReceiver], bool], what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}; got {self.lines()[-20:]}")

    def close(self) -> None:
        self._stop = True
        if self._thread is not None:
            self._thread.join(timeout=2)
        self.sock.close()
        if not self.address.startswith("@"):
            Path(self.address).unlink(missing_ok=True)


def _abstract() -> str:
    return f"@edgeops-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A folder with a short path: an AF_UNIX path must fit in 108 bytes, pytest's tmp_path may not."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="eo-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_notifier_speaks_to_path_and_abstract_sockets_one_line_status(short_dir: Path) -> None:
    for address in (str(short_dir / "notify"), _abstract()):
        receiver = NotifyReceiver(address).start()
        try:
            notifier = Notifier.from_environ({"NOTIFY_SOCKET": address})
            assert notifier.enabled
            assert notifier.ready("serving m 1.0.0 release 1")
            assert notifier.status("boom\nREADY=1\r\nSTOPPING=1 \0 " + "x" * 1000)  # an error text that tries to inject
            assert notifier.watchdog() and notifier.stopping()
            receiver.wait(lambda r: len(r.messages) == 4, "4 datagrams")
            assert receiver.messages[0][2] == ["READY=1", "STATUS=serving m 1.0.0 release 1"]
            status = receiver.messages[1][2]
            assert len(status) == 1 and status[0].startswith("STATUS=boom READY=1 STOPPING=1 x")
            assert len(status[0]) == len("STATUS=") + MAX_STATUS and "\0" not in status[0]
            assert receiver.messages[2][2] == ["WATCHDOG=1"] and receiver.messages[3][2][0] == "STOPPING=1"
            assert receiver.senders() == {os.getpid()}
            notifier.close()
            assert not notifier.watchdog()  # closed: dropped, not raised
        finally:
            receiver.close()


def test_notifier_failures_are_logged_once_and_never_block(short_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="edgeops_agent.service")
    # No such socket, a name nobody bound, an address form we do not speak, a path too long.
    for address in (str(short_dir / "missing" / "notify"), _abstract(), "vsock:2:1234", "/" + "x" * 200):
        caplog.clear()
        notifier = Notifier(address)
        for _ in range(5):
            assert not notifier.watchdog()
        notifier.close()
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1, (address, [r.getMessage() for r in warnings])
        assert "NOTIFY_SOCKET" in warnings[0].getMessage() and "keeps serving" in warnings[0].getMessage()
    # A receiver that never reads: its queue fills, sends fail at once instead of blocking.
    caplog.clear()
    receiver = NotifyReceiver(_abstract())  # bound, never started: nobody reads
    try:
        notifier = Notifier(receiver.address)
        start = time.monotonic()
        results = [notifier.watchdog() for _ in range(200)]
        assert time.monotonic() - start < 2.0
        assert results[0] and not results[-1] and notifier.failed > 0 and notifier.sent + notifier.failed == 200
        assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
        while True:  # drain: the next send is delivered again, and that is said once
            try:
                receiver.sock.recv(4096, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
        assert notifier.watchdog()
        notifier.close()
        assert any("again" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    finally:
        receiver.close()


def test_watchdog_environment(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edgeops_agent.service")  # other tests may raise its level
    me = str(os.getpid())
    assert watchdog_timeout_s({}) is None
    assert watchdog_timeout_s({"WATCHDOG_USEC": "400000"}) == 0.4
    assert watchdog_timeout_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": me}) == 30.0
    assert watchdog_timeout_s({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None  # not ours
    for bad in (
        {"WATCHDOG_USEC": "abc"},
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "-5"},
        {"WATCHDOG_USEC": "1", "WATCHDOG_PID": "x"},
    ):
        caplog.clear()
        assert watchdog_timeout_s(bad) is None
        assert any(r.levelno == logging.WARNING for r in caplog.records), bad
    # systemd's USEC_INFINITY (and past it) is "no watchdog", as sd_watchdog_enabled() reads it: no warning.
    for infinite in (str(2**64 - 1), str(2**64), str(10**30)):
        caplog.clear()
        assert watchdog_timeout_s({"WATCHDOG_USEC": infinite}) is None
        assert not any(r.levelno >= logging.WARNING for r in caplog.records), infinite
    # The largest finite timeout: a ping period Event.wait accepts.
    huge = watchdog_timeout_s({"WATCHDOG_USEC": str(2**64 - 2)})
    assert huge is not None and huge > threading.TIMEOUT_MAX
    monitor = ServiceMonitor(AgentApi.__new__(AgentApi), Notifier(None), watchdog_s=huge)
    assert monitor.period_s == threading.TIMEOUT_MAX


# devices ---------------------------------------------------------------------------------------


def _inputs(built: Built) -> list[list[float]]:
    m = Manifest.from_json(read_members(built.bundle.read_bytes())["manifest.json"])
    return [list(v.input) for v in m.self_test.vectors]


@dataclass
class Device:
    """One data directory and agent.toml; :meth:`start` runs the real agent on them."""

    data: Path
    config: Path
    proc: subprocess.Popen[str] | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.config.with_suffix(".log")

    def start(self, *, env: dict[str, str] | None = None, argv: list[str] | None = None) -> Device:
        base = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*(argv or AGENT), "run", "--config", str(self.config)],
                stdout=subprocess.DEVNULL,
                stderr=log,
                env={**base, **(env or {})},
                text=True,
            )
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=20)
        finally:
            self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def socket(self) -> socket.socket:
        path = self.data / "agent.sock"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(path))
                return s
            except OSError:
                s.close()
                time.sleep(0.05)
        raise AssertionError(f"agent socket {path} did not appear: {self.log.read_text()[-2000:]}")


def _device(
    tmp_path: Path,
    built: Built,
    broker: Broker | None,
    name: str,
    *,
    install: bool = True,
    extra: str = "",
    data: Path | None = None,
) -> Device:
    data = data or tmp_path / name
    steps = [("trust", "add", str(built.public_key), "-d", str(data))]
    if install:
        steps.append(("install", str(built.bundle), "-d", str(data), "-t", "ecu"))
    for args in steps:
        done = run_agent(*args)
        assert done.returncode == 0, done.stderr
    port = broker.port if broker is not None else free_port()
    config = tmp_path / f"{name}.toml"
    config.write_text(
        f'device_id = "{name}"\ntarget = "ecu"\ndata_dir = "{data}"\n'
        f"[mqtt]\nport = {port}\nkeepalive_s = 2\nreconnect_min_s = 0.5\nreconnect_max_s = 1.0\n"
        f"[telemetry]\ninterval_s = 0.5\n{extra}"
    )
    return Device(data=data, config=config)


def _ask(sock: socket.socket, request: dict[str, Any]) -> dict[str, Any]:
    send_frame(sock, request)
    payload = recv_frame(sock)
    assert payload is not None
    return dict(json.loads(payload))


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _wait_http(port: int, path: str, predicate: Callable[[int, str], bool], what: str, timeout: float = 30.0) -> tuple[int, str]:
    deadline = time.monotonic() + timeout
    last: tuple[int, str] = (0, "")
    while time.monotonic() < deadline:
        try:
            last = _get(port, path)
            if predicate(*last):
                return last
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; last answer {last}")


def _metrics(port: int) -> dict[str, float]:
    """One scrape, parsed by prometheus_client's parser: sample name{labels} -> value."""
    status, text = _get(port, "/metrics")
    assert status == 200
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


# the notify protocol against a running agent ---------------------------------------------------


def test_ready_after_load_watchdog_pings_and_stopping(tmp_path: Path, built: Built, broker: Broker) -> None:
    dev = _device(tmp_path, built, broker, "svc-1")
    receiver = NotifyReceiver(_abstract()).start()
    try:
        dev.start(env={"NOTIFY_SOCKET": receiver.address, "WATCHDOG_USEC": "400000"})
        receiver.wait(lambda r: "READY=1" in r.lines(), "READY=1")
        # Ready means serving: the endpoint answers at once, with the model loaded.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(dev.data / "agent.sock"))
        assert _ask(sock, {"op": "predict", "features": _inputs(built)[0]})["ok"]
        sock.close()
        ready = next(m for m in receiver.messages if "READY=1" in m[2])
        status = [x for x in ready[2] if x.startswith("STATUS=")]
        assert status and "release 1" in status[0] and status[0].startswith("STATUS=serving ")
        assert all(t >= ready[0] for t in receiver.pings())  # no ping before ready
        start = time.monotonic()
        receiver.wait(lambda r: len(r.pings(start)) >= 8, "8 watchdog pings", timeout=20)
        pings = receiver.pings(start)
        gaps = np.diff(pings)
        assert 0.1 < float(np.median(gaps)) < 0.4, gaps  # every WATCHDOG_USEC/2 = 0.2 s
        assert dev.proc is not None
        assert receiver.senders() == {dev.proc.pid}  # what NotifyAccess=main accepts: the main PID only
        assert dev.stop() == 0
        lines = receiver.lines()
        assert lines.count("READY=1") == 1 and lines.count("STOPPING=1") == 1
        after = lines[lines.index("STOPPING=1") :]
        assert "WATCHDOG=1" not in after and "READY=1" not in after  # nothing claims life after STOPPING=1
    finally:
        dev.kill()
        receiver.close()
    assert "Traceback" not in dev.log.read_text()


def test_path_socket_and_a_watchdog_meant_for_another_pid(tmp_path: Path, built: Built, broker: Broker, short_dir: Path) -> None:
    """A path $NOTIFY_SOCKET works too; WATCHDOG_PID naming another process means: no pings."""
    dev = _device(tmp_path, built, broker, "svc-2")
    receiver = NotifyReceiver(str(short_dir / "notify")).start()
    try:
        dev.start(env={"NOTIFY_SOCKET": receiver.address, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"})
        receiver.wait(lambda r: "READY=1" in r.lines(), "READY=1")
        time.sleep(1.0)  # five ping intervals
        assert receiver.pings() == []
        assert dev.stop() == 0
        assert "STOPPING=1" in receiver.lines()
    finally:
        dev.kill()
        receiver.close()


def test_no_model_is_ready_with_the_reason_and_pings(tmp_path: Path, built: Built, broker: Broker) -> None:
    """Without a model the agent is alive (it can take an install) but says why it serves nothing."""
    port = free_port()
    dev = _device(tmp_path, built, broker, "svc-3", install=False, extra=f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    receiver = NotifyReceiver(_abstract()).start()
    try:
        dev.start(env={"NOTIFY_SOCKET": receiver.address, "WATCHDOG_USEC": "400000"})
        receiver.wait(lambda r: "READY=1" in r.lines(), "READY=1")
        assert any(x.startswith("STATUS=no model: none installed") for x in receiver.lines())
        receiver.wait(lambda r: len(r.pings()) >= 2, "pings without a model")
        status, body = _get(port, "/healthz")
        assert status == 503 and body.startswith("unavailable: no model is installed")
        scraped = _metrics(port)
        assert scraped["edgeops_agent_model_serving"] == 0 and scraped["edgeops_agent_healthy"] == 0
        assert "edgeops_agent_model_release" not in scraped
        # The repair: an install while the daemon runs is refused (the daemon holds the lock),
        # so stop, install, start: healthz turns 200.
        assert dev.stop() == 0
        done = run_agent("install", str(built.bundle), "-d", str(dev.data), "-t", "ecu")
        assert done.returncode == 0, done.stderr
        dev.start(env={"NOTIFY_SOCKET": receiver.address, "WATCHDOG_USEC": "400000"})
        status, body = _wait_http(port, "/healthz", lambda s, b: s == 200, "healthz 200 after the install")
        assert body.startswith("ok: serving ") and "release 1" in body
    finally:
        dev.kill()
        receiver.close()


def test_wedged_serving_thread_stops_the_pings(tmp_path: Path, built: Built, broker: Broker) -> None:
    port = free_port()
    dev = _device(tmp_path, built, broker, "svc-4", extra=f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    flag = tmp_path / "wedge"
    receiver = NotifyReceiver(_abstract()).start()
    env = {"NOTIFY_SOCKET": receiver.address, "WATCHDOG_USEC": "400000", "EDGEOPS_TEST_WEDGE": str(flag)}
    row = _inputs(built)[0]
    try:
        dev.start(env=env, argv=[sys.executable, "-c", WEDGE_LAUNCHER])
        receiver.wait(lambda r: "READY=1" in r.lines(), "READY=1")
        receiver.wait(lambda r: len(r.pings()) >= 3, "pings while healthy")
        assert _get(port, "/healthz")[0] == 200

        touched = time.monotonic()
        flag.touch()  # from now on the runtime's invoke does not return
        client = dev.socket()
        send_frame(client, {"op": "predict", "features": row, "id": 1})  # a serving thread enters it and hangs
        client.settimeout(1.0)
        with pytest.raises(TimeoutError):
            recv_frame(client)
        # (A healthy probe that a busy machine delayed may have said "stuck" before the wedge: not that one.)
        receiver.wait(lambda r: any("stuck" in x for x in r.lines(touched)), "STATUS saying the serving path is stuck")
        stuck_at = max(t for t, _, lines in receiver.messages if t >= touched and any("stuck" in x for x in lines))
        time.sleep(2.0)  # ten ping intervals
        assert receiver.pings(stuck_at) == []  # the pings stopped: systemd would now kill and restart
        status, body = _get(port, "/healthz")
        assert status == 503 and "serving path stuck" in body
        scraped = _metrics(port)
        assert scraped["edgeops_agent_healthy"] == 0 and scraped["edgeops_agent_serving_probe_stuck_seconds"] > 1.0
        assert dev.proc is not None and dev.proc.poll() is None

        flag.unlink()  # the runtime returns: the wedged request is answered and the pings resume
        client.settimeout(10.0)
        reply = json.loads(recv_frame(client) or b"{}")
        assert reply["ok"] and reply["id"] == 1
        client.close()
        resumed = time.monotonic()
        receiver.wait(lambda r: len(r.pings(resumed)) >= 2, "pings after the serving path answers again")
        assert any(x.startswith("STATUS=serving ") for x in receiver.lines(resumed - 1.0))
        _wait_http(port, "/healthz", lambda s, b: s == 200, "healthz 200 again")
        assert _metrics(port)["edgeops_agent_inferences_total"] == 1  # the probes were never counted

        # A runtime that raises instead of hanging: alive (pings go on; a restart cannot fix a
        # model), but not fit to serve (healthz 503 with the reason).
        failing = Path(str(flag) + ".fail")
        failing.touch()
        _, body = _wait_http(port, "/healthz", lambda s, b: s == 503, "healthz 503 while the probe raises")
        assert "the model fails its probe inference: RuntimeError: simulated runtime failure" in body
        since = time.monotonic()
        receiver.wait(lambda r: len(r.pings(since)) >= 3, "pings while the probe raises")
        failing.unlink()
        _wait_http(port, "/healthz", lambda s, b: s == 200, "healthz 200 once the probe answers")

        # SIGTERM while the runtime hangs: still a clean, prompt stop (STOPPING=1, exit 0).
        flag.touch()
        since = time.monotonic()
        receiver.wait(lambda r: any("stuck" in x for x in r.lines(since)), "stuck again")
        assert dev.stop() == 0 and time.monotonic() - since < 15
        assert "STOPPING=1" in receiver.lines(since)
        log = dev.log.read_text()
        assert log.count("simulated runtime failure") == 2  # logged once, with its traceback, not per probe
        assert log.count("Traceback (most recent call last)") == 1 and "\nRuntimeError: simulated runtime failure" in log

        # A start whose first probe hangs never says READY=1 (systemd's TimeoutStartSec ends it).
        since = time.monotonic()
        dev.start(env=env, argv=[sys.executable, "-c", WEDGE_LAUNCHER])
        dev.socket().close()  # the endpoint is up: only the first probe stands between it and READY
        time.sleep(2.0)
        assert "READY=1" not in receiver.lines(since) and receiver.pings(since) == []
        # What systemd does when the pings stop (or the start times out with WatchdogSignal):
        # SIGABRT. The journal gets every thread's stack, the stuck runtime call included.
        assert dev.proc is not None
        dev.proc.send_signal(signal.SIGABRT)
        assert dev.proc.wait(timeout=20) == -signal.SIGABRT
        dev.proc = None
        log = dev.log.read_text()
        stack = log[log.index("Fatal Python error: Aborted") :]
        assert "in invoke" in stack and "edgeops_agent/service.py" in stack and "probe_once" in stack
    finally:
        flag.unlink(missing_ok=True)
        dev.kill()
        receiver.close()


@pytest.mark.parametrize("kind", ["missing path", "nobody bound", "full queue", "unsupported"])
def test_unreachable_notify_socket_is_logged_once_and_the_agent_serves(
    tmp_path: Path, built: Built, broker: Broker, short_dir: Path, kind: str
) -> None:
    stuck_receiver = NotifyReceiver(_abstract()) if kind == "full queue" else None  # bound, never read
    address = {
        "missing path": str(short_dir / "no" / "such.sock"),
        "nobody bound": _abstract(),
        "full queue": stuck_receiver.address if stuck_receiver else "",
        "unsupported": "vsock:2:9999",
    }[kind]
    dev = _device(tmp_path, built, broker, "svc-5")
    try:
        dev.start(env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "100000"})  # a ping every 50 ms
        sock = dev.socket()
        rows = _inputs(built)
        for i in range(40):
            assert _ask(sock, {"op": "predict", "features": rows[i % len(rows)]})["ok"]
            time.sleep(0.05)
        sock.close()
        assert dev.proc is not None and dev.proc.poll() is None
        started = time.monotonic()
        assert dev.stop() == 0  # STOPPING=1 fails as well, without blocking the shutdown
        assert time.monotonic() - started < 10
    finally:
        dev.kill()
        if stuck_receiver is not None:
            stuck_receiver.close()
    log = dev.log.read_text()
    warnings = [line for line in log.splitlines() if "NOTIFY_SOCKET" in line and "WARNING" in line]
    assert len(warnings) == 1, warnings
    assert "keeps serving" in warnings[0] and "Traceback" not in log


# metrics and /healthz ---------------------------------------------------------------------------


def test_prometheus_scrape_during_predictions_counts_match(tmp_path: Path, built: Built, broker: Broker) -> None:
    port = free_port()
    dev = _device(tmp_path, built, broker, "svc-6", extra=f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    rows = _inputs(built)
    threads_n, per_thread, batch_n, bad_n = 4, 150, 64, 7
    latencies: list[float] = []
    lat_lock = threading.Lock()
    scrapes: list[dict[str, float]] = []
    done = threading.Event()

    def feed(k: int) -> None:
        sock = dev.socket()
        mine = []
        for i in range(per_thread):
            reply = _ask(sock, {"op": "predict", "features": rows[(i + k) % len(rows)]})
            assert reply["ok"], reply
            mine.append(reply["latency_ms"])
        if k == 0:
            reply = _ask(sock, {"op": "predict_batch", "rows": [rows[i % len(rows)] for i in range(batch_n)]})
            assert reply["ok"], reply
            mine += [p["latency_ms"] for p in reply["predictions"]]
            for i in range(bad_n):  # wrong length, or not numbers: counted as TensorInputError
                bad = _ask(sock, {"op": "predict", "features": rows[0][:5] if i % 2 else "x"})
                assert bad["error"]["type"] == "TensorInputError"
            unknown = _ask(sock, {"op": "predict_all"})  # not a request the agent knows: counted too
            assert unknown["error"]["type"] == "RequestError"
        sock.close()
        with lat_lock:
            latencies.extend(mine)

    def scrape() -> None:
        while not done.is_set():
            scrapes.append(_metrics(port))
            time.sleep(0.01)

    try:
        dev.start()
        _wait_http(port, "/healthz", lambda s, b: s == 200, "healthz 200")
        scraper = threading.Thread(target=scrape)
        scraper.start()
        feeders = [threading.Thread(target=feed, args=(k,)) for k in range(threads_n)]
        for t in feeders:
            t.start()
        for t in feeders:
            t.join()
        done.set()
        scraper.join()
        final = _metrics(port)
        families = {f.name for f in text_string_to_metric_families(_get(port, "/metrics")[1])}
        deadline = time.monotonic() + 20
        while final["edgeops_agent_mqtt_connected"] != 1 and time.monotonic() < deadline:
            time.sleep(0.1)
            final = _metrics(port)
        status, body = _get(port, "/healthz")
        assert dev.stop() == 0
    finally:
        dev.kill()

    total = threads_n * per_thread + batch_n
    assert len(latencies) == total
    # Scrapes taken during the predictions parse, never go backwards, and every one is a consistent snapshot.
    assert len(scrapes) >= 5
    counts = [s["edgeops_agent_inferences_total"] for s in scrapes]
    assert counts == sorted(counts) and counts[-1] <= total
    assert any(0 < c < total for c in counts)  # some were really taken mid-stream
    for s in scrapes:
        assert s["edgeops_agent_inference_latency_seconds_count"] == s["edgeops_agent_inferences_total"]
    # After: the counts are the predictions made, exactly.
    assert final["edgeops_agent_inferences_total"] == total
    assert final["edgeops_agent_inference_errors_total{type=TensorInputError}"] == bad_n
    assert final["edgeops_agent_inference_errors_total{type=ModelOutputError}"] == 0
    assert final["edgeops_agent_inference_errors_total{type=RequestError}"] == 1
    # Requests answered: each predict, and the batch once (the alert rule's error ratio is per request).
    assert final["edgeops_agent_requests_total"] == threads_n * per_thread + 1
    assert final["edgeops_agent_inference_latency_seconds_count"] == total
    buckets = [final[f"edgeops_agent_inference_latency_seconds_bucket{{le={b!r}}}"] for b in map(float, LATENCY_BUCKETS_S)]
    assert buckets == sorted(buckets) and final["edgeops_agent_inference_latency_seconds_bucket{le=+Inf}"] == total
    # The histogram holds the latencies the replies reported.
    assert final["edgeops_agent_inference_latency_seconds_sum"] == pytest.approx(sum(latencies) / 1e3, rel=1e-6)
    expected_le = np.searchsorted(np.asarray(LATENCY_BUCKETS_S) * 1e3, np.asarray(latencies), side="left")
    assert buckets == [int((expected_le <= i).sum()) for i in range(len(LATENCY_BUCKETS_S))]
    manifest = Manifest.from_json(read_members(built.bundle.read_bytes())["manifest.json"])
    info = next(k for k in final if k.startswith("edgeops_agent_model_info{"))
    assert f"release={manifest.release}" in info and f"name={manifest.name}" in info and "runtime=onnxruntime" in info
    assert final["edgeops_agent_model_release"] == manifest.release and final["edgeops_agent_model_serving"] == 1
    assert final["edgeops_agent_drift_samples"] >= 0 and "edgeops_agent_drift_psi_max" in final
    assert final["edgeops_agent_outbox_healthy"] == 1 and final["edgeops_agent_outbox_pending"] >= 0
    assert final["edgeops_agent_mqtt_connected"] == 1 and final["edgeops_agent_healthy"] == 1
    assert final["process_resident_memory_bytes"] > 10_000_000
    assert status == 200 and body.startswith("ok: serving ")
    # docs/operations.md names only metrics a running agent really exports (table and alert rules).
    documented = set(re.findall(r"\b(edgeops_agent_[a-z_]+)", (REPO / "docs" / "operations.md").read_text()))
    exported = {f + suffix for f in families for suffix in ("", "_total", "_bucket", "_info")}
    assert documented and documented <= exported, sorted(documented - exported)


def test_healthz_503_while_the_outbox_cannot_write(tmp_path: Path, built: Built, broker: Broker) -> None:
    """A real full disk (a small tmpfs holding the data directory): 503 with the reason, 200 once space returns."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "fs"
    mount.mkdir()
    size = built.bundle.stat().st_size * 2 + (4 << 20)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mount)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    port = free_port()
    dev = _device(tmp_path, built, broker, "svc-7", data=mount / "data", extra=f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    filler = mount / "filler"
    try:
        dev.start()
        _wait_http(port, "/healthz", lambda s, b: s == 200, "healthz 200")
        fill_disk(filler)  # the disk, full to the last byte
        _, body = _wait_http(port, "/healthz", lambda s, b: s == 503, "healthz 503 on a full disk")
        assert body.startswith("unavailable: the outbox is not writable:") and "full" in body
        assert _metrics(port)["edgeops_agent_outbox_healthy"] == 0
        sock = dev.socket()  # serving goes on meanwhile
        assert _ask(sock, {"op": "predict", "features": _inputs(built)[0]})["ok"]
        sock.close()
        filler.unlink()
        _wait_http(port, "/healthz", lambda s, b: s == 200, "healthz 200 after space returns")
        assert dev.stop() == 0
    finally:
        dev.kill()
        subprocess.run(["umount", "-l", str(mount)], check=True)
    assert "Traceback" not in dev.log.read_text()


def test_metrics_http_edges(tmp_path: Path, built: Built, broker: Broker) -> None:
    """404 elsewhere, HEAD works, a silent client does not hold a slot forever, requests do not spam the log."""
    port = free_port()
    dev = _device(tmp_path, built, broker, "svc-8", extra=f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    try:
        dev.start()
        _wait_http(port, "/healthz", lambda s, b: s == 200, "healthz 200")
        assert _get(port, "/")[0] == 404 and _get(port, "/metrics/../state.json")[0] == 404
        request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", method="HEAD")
        with urllib.request.urlopen(request, timeout=10) as reply:
            assert reply.status == 200 and reply.read() == b"" and "version=0.0.4" in reply.headers["Content-Type"]
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]  # every slot taken by a silent client
        refused = socket.create_connection(("127.0.0.1", port))
        refused.settimeout(5)
        busy = b""
        while chunk := refused.recv(1000):
            busy += chunk
        refused.close()
        # A busy listener is told apart from an unhealthy agent: its own body, and when to retry.
        head, _, body = busy.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 503") and b"\r\nRetry-After: 1" in head, busy
        assert body.startswith(b"busy: ") and f"Content-Length: {len(body)}".encode() in head, busy
        for s in idle:
            s.close()
        _wait_http(port, "/metrics", lambda s, b: s == 200, "a slot again")
        assert dev.stop() == 0
    finally:
        dev.kill()
    log = dev.log.read_text()
    assert "GET /metrics" not in log and "Traceback" not in log


def test_metrics_address_in_use_is_one_clear_error(tmp_path: Path, built: Built, broker: Broker) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    dev = _device(tmp_path, built, broker, "svc-9", extra=f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    try:
        dev.start()
        assert dev.proc is not None
        code = dev.proc.wait(timeout=60)
        dev.proc = None
    finally:
        dev.kill()
        holder.close()
    log = dev.log.read_text()
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert code == 5 and errors == [f"error: [metrics] listen 127.0.0.1:{port}: the address is already in use "
                                    "(another process listens there; choose another [metrics] listen)"]  # fmt: skip
    assert "Traceback" not in log
    assert not (dev.data / "agent.sock").exists()  # it stopped before serving anything
    # The lock is free again: a start on a free port works.
    dev.config.write_text(dev.config.read_text().replace(str(port), str(free_port())))
    receiver = NotifyReceiver(_abstract()).start()
    try:
        dev.start(env={"NOTIFY_SOCKET": receiver.address})
        receiver.wait(lambda r: "READY=1" in r.lines(), "READY=1 on a free port")
        assert dev.stop() == 0
    finally:
        dev.kill()
        receiver.close()


def test_metrics_listener_binds_v4_v6_and_names_each_bind_failure() -> None:
    """Binding is all the constructor does with the network: checked in-process, without a daemon."""
    from edgeops_agent.errors import MetricsError
    from edgeops_agent.metrics import MetricsServer

    for host in ("127.0.0.1", "::1", "localhost"):
        port = free_port()
        server = MetricsServer(MetricsConfig(host=host, port=port), None)  # type: ignore[arg-type]
        assert server.port == port
        server.stop()  # never started: closes without waiting for a serve loop
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    try:
        for config, message in (
            (MetricsConfig(host="127.0.0.1", port=taken), f"listen 127.0.0.1:{taken}: the address is already in use"),
            (MetricsConfig(host="nonexistent.invalid", port=9108), "cannot resolve 'nonexistent.invalid'"),
            (MetricsConfig(host="192.0.2.1", port=9108), "listen 192.0.2.1:9108: cannot listen there: Cannot assign"),
        ):
            with pytest.raises(MetricsError, match=re.escape(message)):
                MetricsServer(config, None)  # type: ignore[arg-type]
    finally:
        holder.close()


def test_missing_prometheus_client_is_one_clear_error(tmp_path: Path, built: Built, broker: Broker) -> None:
    dev = _device(tmp_path, built, broker, "svc-10", extra=f'[metrics]\nlisten = "127.0.0.1:{free_port()}"\n')
    try:
        dev.start(argv=[sys.executable, "-c", NO_PROMETHEUS])
        assert dev.proc is not None
        code = dev.proc.wait(timeout=60)
        dev.proc = None
    finally:
        dev.kill()
    log = dev.log.read_text()
    assert code == 5 and "Traceback" not in log
    assert [line for line in log.splitlines() if line.startswith("error:")] == [
        "error: agent.toml has a [metrics] table, but prometheus_client is not installed: pip install 'edgeops[metrics]'"
    ]


def test_prometheus_client_is_imported_only_with_metrics(tmp_path: Path, built: Built) -> None:
    code = (
        "import sys; from pathlib import Path; from edgeops_agent.config import load_config; "
        "from edgeops_agent.daemon import Daemon; "
        "d = Daemon(load_config(Path(sys.argv[1]))); print('prometheus_client' in sys.modules, d.metrics is not None); "
        "d.server.server_close(); d.metrics and d.metrics.server_close()"
    )
    plain = _device(tmp_path, built, None, "svc-11", install=False)
    with_metrics = _device(
        tmp_path, built, None, "svc-12", install=False, extra=f'[metrics]\nlisten = "127.0.0.1:{free_port()}"\n'
    )
    for dev, expected in ((plain, "False False"), (with_metrics, "True True")):
        done = subprocess.run([sys.executable, "-c", code, str(dev.config)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == expected.split()


# config -----------------------------------------------------------------------------------------


def _config(tmp_path: Path, metrics: str) -> Path:
    (tmp_path / "data").mkdir(exist_ok=True)
    path = tmp_path / "agent.toml"
    path.write_text(f'device_id = "d"\ntarget = "ecu"\ndata_dir = "data"\n{metrics}')
    return path


@pytest.mark.parametrize(
    ("table", "host", "port"),
    [
        ("", None, None),
        ("[metrics]\n", "127.0.0.1", 9108),
        ('[metrics]\nlisten = "0.0.0.0:9200"\n', "0.0.0.0", 9200),
        ('[metrics]\nlisten = "[::1]:9108"\n', "::1", 9108),
        ('[metrics]\nlisten = "localhost:65535"\n', "localhost", 65535),
    ],
)
def test_metrics_config(tmp_path: Path, table: str, host: str | None, port: int | None) -> None:
    config = load_config(_config(tmp_path, table))
    if host is None:
        assert config.metrics is None
    else:
        assert config.metrics == MetricsConfig(host=host, port=int(port or 0))
        assert config.metrics.listen == (f"[{host}]:{port}" if ":" in host else f"{host}:{port}")


@pytest.mark.parametrize(
    "table",
    [
        '[metrics]\nlisten = "9108"\n',
        '[metrics]\nlisten = "localhost"\n',
        '[metrics]\nlisten = "127.0.0.1:0"\n',
        '[metrics]\nlisten = "127.0.0.1:70000"\n',
        '[metrics]\nlisten = "[zz::1]:9108"\n',
        '[metrics]\nlisten = "::1:9108"\n',
        '[metrics]\nlisten = "bad host:9108"\n',
        '[metrics]\nlisten = "-bad:9108"\n',
        '[metrics]\nlisten = ""\n',
        "[metrics]\nlisten = 9108\n",
        "[metrics]\nport = 9108\n",
        'metrics = "127.0.0.1:9108"\n',
    ],
)
def test_bad_metrics_config_is_a_config_error(tmp_path: Path, table: str) -> None:
    with pytest.raises(ConfigError, match="metrics") as info:
        load_config(_config(tmp_path, table))
    assert "agent.toml" in str(info.value)


def test_bad_metrics_listen_exits_2(tmp_path: Path) -> None:
    done = run_agent("run", "--config", _config(tmp_path, '[metrics]\nlisten = "127.0.0.1:99999"\n'))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: ") and "metrics.listen" in done.stderr and "[IPv6]:PORT" in done.stderr


# counters and the probe, in-process --------------------------------------------------------------


@pytest.fixture
def installed(tmp_path: Path, built: Built) -> DataDir:
    data = tmp_path / "installed"
    for args in (
        ("trust", "add", str(built.public_key), "-d", str(data)),
        ("install", str(built.bundle), "-d", str(data), "-t", "ecu"),
    ):
        done = run_agent(*args)
        assert done.returncode == 0, done.stderr
    return DataDir(data)


def test_counters_stay_exact_past_the_latency_ring(installed: DataDir, built: Built) -> None:
    """The histogram loses nothing when more predictions than the ring holds pass between two reads."""
    agent = AgentApi(installed)
    rows = np.asarray(_inputs(built), dtype=np.float32)
    singles = LATENCY_RING + 500
    for i in range(singles):
        agent.predict(rows[i % len(rows)])
    big = np.repeat(rows, (LATENCY_RING + 100) // len(rows) + 1, axis=0)  # one batch larger than the ring
    agent.predict_batch(big)
    agent.predict_batch(rows)
    c = agent.counters()
    total = singles + len(big) + len(rows)
    assert c.inferences == total and c.latency_buckets[-1] == total
    assert c.requests == singles + 2  # a batch is one request
    assert list(c.latency_buckets) == sorted(c.latency_buckets) and c.latency_sum_s > 0
    assert len(c.latency_buckets) == len(LATENCY_BUCKETS_S) + 1
    again = agent.counters()  # reading twice counts nothing twice
    assert again == c


def test_probe_is_not_counted_and_not_fed_to_drift(installed: DataDir) -> None:
    agent = AgentApi(installed)
    monitor = ServiceMonitor(agent, Notifier(None), watchdog_s=None)
    for _ in range(20):
        monitor.probe_once()
    assert agent.counters().inferences == 0
    agent.flush_drift()
    assert agent.detector is not None and agent.detector.status().samples == 0
    monitor.start()  # one probe in this thread, then the background ones
    assert monitor.probes >= 1 and monitor.last_error is None and monitor.problem() is None
    monitor.stop()
    assert agent.counters().inferences == 0 and monitor.last_duration_s is not None
