"""The outbox and the MQTT link: full disk, crash duplicates, state lane, Will, sessions.

Unit tests drive :class:`MqttLink` through our own :class:`SimTransport` /
:class:`InMemoryBroker`; the session test and the full-disk test use the real things
(Mosquitto from ``tests/broker.py``, a real tmpfs that really fills).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker import Broker
from conftest import Built, fill_disk
from edgeops_agent.mqtt import MqttLink, MqttSettings
from edgeops_agent.outbox import Outbox, OutboxError
from edgeops_agent.transport import InMemoryBroker, ManualClock, PahoTransport, SimTransport

DEV = "dev-1"
STATE = f"edgeops/v1/{DEV}/state"
TELEMETRY = f"edgeops/v1/{DEV}/telemetry"
CMD = f"edgeops/v1/{DEV}/cmd"


def until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


class FlakyDb:
    """The real connection, but writes fail like SQLite on a full disk while ``full``.

    SQLite rolls the transaction back by itself on SQLITE_FULL; the proxy does the same,
    which is what turned the old code's ROLLBACK into "no transaction is active".
    """

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db, self.full = db, False

    @property
    def in_transaction(self) -> bool:
        return self.db.in_transaction

    def _check(self, sql: str) -> None:
        if self.full and sql.lstrip().split()[0].upper() in ("INSERT", "DELETE"):
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise sqlite3.OperationalError("database or disk is full")

    def execute(self, sql: str, args: Any = ()) -> sqlite3.Cursor:
        self._check(sql)
        return self.db.execute(sql, args)

    def executemany(self, sql: str, args: Any) -> sqlite3.Cursor:
        self._check(sql)
        return self.db.executemany(sql, args)

    def close(self) -> None:
        self.db.close()


def flaky(outbox: Outbox) -> FlakyDb:
    proxy = FlakyDb(outbox._db)
    outbox._db = proxy  # type: ignore[assignment]
    return proxy


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    box = Outbox(tmp_path / "outbox.sqlite")
    yield box
    box.close()


def make_link(
    outbox: Outbox, broker: InMemoryBroker, *, inflight: int = 32, on_command: Callable[[bytes], None] | None = None
) -> tuple[MqttLink, SimTransport]:
    transport = SimTransport(broker, DEV)
    link = MqttLink(
        MqttSettings(inflight=inflight),
        DEV,
        outbox,
        offline_state={"online": False, "device_id": DEV},
        on_command=on_command or (lambda payload: None),
        transport=transport,
    )
    return link, transport


# defect 11: a full disk ---------------------------------------------------------------------


def test_full_disk_put_is_typed_error_marks_unhealthy_and_recovers(outbox: Outbox) -> None:
    changes: list[tuple[bool, str | None]] = []
    outbox.on_health = lambda ok, err: changes.append((ok, err))
    outbox.put(TELEMETRY, {"n": 1})
    db = flaky(outbox)
    db.full = True
    with pytest.raises(OutboxError, match="disk is full"):
        outbox.put(TELEMETRY, {"n": 2})
    assert not outbox.healthy
    assert outbox.last_error is not None and "disk is full" in outbox.last_error
    assert changes == [(False, outbox.last_error)]
    db.full = False
    outbox.put(TELEMETRY, {"n": 3})
    assert outbox.healthy and outbox.last_error is None
    assert changes[-1] == (True, None)
    stats = outbox.stats()
    assert (stats.pending, stats.dropped) == (2, 1)  # the message lost to the full disk is counted


def test_on_health_may_queue_a_degraded_state(outbox: Outbox) -> None:
    def report(ok: bool, error: str | None) -> None:  # what a daemon does: say so in its state
        outbox.put(STATE, {"health": "ok" if ok else "degraded", "error": error}, retain=True)

    outbox.on_health = report
    db = flaky(outbox)
    db.full = True
    with pytest.raises(OutboxError):
        outbox.put(TELEMETRY, {"n": 1})
    db.full = False
    outbox.put(TELEMETRY, {"n": 2})
    states = [json.loads(m.payload) for m in outbox.pending() if m.topic == STATE]
    assert [s["health"] for s in states] == ["ok"]  # the degraded one could not be written
    assert outbox.stats().dropped == 2  # the telemetry and the degraded state


def test_degraded_state_goes_out_directly_while_the_disk_is_full(outbox: Outbox) -> None:
    broker = InMemoryBroker()
    link, _ = make_link(outbox, broker)
    assert link.publish_direct(STATE, {"health": "degraded"}, retain=True) is False  # not connected
    link.start()
    try:
        until(link.connected.is_set, what="connect")
        flaky(outbox).full = True
        assert link.publish_direct(STATE, {"health": "degraded"}, retain=True)
        assert broker.retained[STATE].json() == {"health": "degraded", "seq": None}
        assert link._direct == set() and link._early == {}  # its PUBACK settled nothing else
    finally:
        link.stop()


def test_full_disk_ack_is_kept_and_written_later(outbox: Outbox) -> None:
    a = outbox.put(TELEMETRY, {"n": 1})
    outbox.put(TELEMETRY, {"n": 2})
    db = flaky(outbox)
    db.full = True
    outbox.ack(a)  # must not raise: it runs on the transport's thread
    assert not outbox.healthy
    assert [m.seq for m in outbox.pending()] == [a + 1]  # not re-sent meanwhile
    db.full = False
    outbox.put(TELEMETRY, {"n": 3})
    assert outbox.healthy
    assert [m.seq for m in outbox.pending()] == [a + 1, a + 2]
    assert outbox.stats().pending == 2


def test_full_disk_never_escapes_a_callback_or_kills_the_sender(outbox: Outbox) -> None:
    broker = InMemoryBroker()
    link, transport = make_link(outbox, broker, on_command=lambda p: outbox.put(TELEMETRY, {"cmd": p.decode()}))
    link.start()
    try:
        until(link.connected.is_set, what="connect")
        db = flaky(outbox)
        db.full = True
        broker.publish(CMD, b"ping")  # the handler's put fails on the transport's thread
        broker.hold_acks = True
        db.full = False
        outbox.put(TELEMETRY, {"n": 1})
        until(lambda: len(broker.messages(TELEMETRY)) == 1, what="first send")
        db.full = True
        broker.release_acks()  # the ack's DELETE fails on the transport's thread
        assert not outbox.healthy
        broker.hold_acks = False
        db.full = False
        outbox.put(TELEMETRY, {"n": 2})
        until(lambda: outbox.stats().pending == 0, what="drain after recovery")
        assert outbox.healthy
        assert transport.hook_errors == []
        assert link._sender.is_alive()
        assert [m.json()["n"] for m in broker.messages(TELEMETRY)] == [1, 2]  # no duplicate of 1
    finally:
        link.stop()


def test_real_full_disk_degrades_and_recovers(tiny_fs: Path) -> None:
    box = Outbox(tiny_fs / "outbox.sqlite")
    try:
        box.put(TELEMETRY, {"n": 0})
        filler = tiny_fs / "filler"
        with open(filler, "wb", buffering=0) as f:  # fill the disk to the last byte
            try:
                while True:
                    f.write(b"\0" * 512)
            except OSError:
                pass
        errors: list[OutboxError] = []
        for n in range(200):  # the WAL may still have room for a few
            try:
                box.put(TELEMETRY, {"n": n, "pad": "x" * 8000})
            except OutboxError as exc:
                errors.append(exc)
                break
        assert len(errors) == 1 and not box.healthy
        assert "full" in str(errors[0]) and "cannot rollback" not in str(errors[0])
        filler.unlink()
        box.put(TELEMETRY, {"n": "after"})
        assert box.healthy
        assert json.loads(box.pending(limit=100_000)[-1].payload)["n"] == "after"
    finally:
        box.close()


# defect 9 (part): file modes ----------------------------------------------------------------


def test_outbox_files_are_0600(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        box = Outbox(tmp_path / "outbox.sqlite")
        box.put(TELEMETRY, {"n": 1})
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
        box.close()
    finally:
        os.umask(old)
    assert {"outbox.sqlite", "outbox.sqlite-wal", "outbox.sqlite-shm"} <= set(modes)
    assert set(modes.values()) == {0o600}, modes


# defect 14: crash duplicates and drop counting ----------------------------------------------


def test_dropped_counts_only_messages_never_sent(outbox: Outbox) -> None:
    box = Outbox(outbox.path.with_name("capped.sqlite"), cap=5)
    for n in range(5):
        box.put(TELEMETRY, {"n": n})
    sent = box.next_batch(3)  # in flight at the broker
    for n in range(5, 8):
        box.put(TELEMETRY, {"n": n})
    for m in sent:
        box.ack(m.seq)
    delivered = [m.seq for m in sent]
    while batch := box.next_batch(10):
        for m in batch:
            delivered.append(m.seq)
            box.ack(m.seq)
    stats = box.stats()
    box.close()
    # every message is either delivered or counted as dropped, never both
    assert len(delivered) == len(set(delivered))
    assert len(delivered) + stats.dropped == 8
    assert stats.dropped == 3


def test_crash_resends_at_most_inflight_messages(tmp_path: Path) -> None:
    path, inflight, total = tmp_path / "outbox.sqlite", 4, 40
    broker = InMemoryBroker()
    broker.hold_acks = True
    box = Outbox(path)
    link, _ = make_link(box, broker, inflight=inflight)
    for n in range(total):
        box.put(TELEMETRY, {"n": n})
    link.start()
    until(lambda: len(broker.messages(TELEMETRY)) == inflight, what="a full window")
    time.sleep(0.05)
    assert len(broker.messages(TELEMETRY)) == inflight  # never more than the window
    # kill -9: the process dies with the window unacknowledged
    link._stop.set()
    broker.kill(DEV)
    broker.forget_acks()
    link._sender.join(timeout=5)
    box.close()
    broker.hold_acks = False
    box = Outbox(path)
    link, _ = make_link(box, broker, inflight=inflight)
    link.start()
    try:
        until(lambda: box.stats().pending == 0, what="drain after restart")
    finally:
        link.stop()
        box.close()
    seqs = [m.json()["seq"] for m in broker.messages(TELEMETRY)]
    assert set(seqs) == set(range(1, total + 1))  # nothing lost
    assert len(seqs) - len(set(seqs)) == inflight  # the documented bound, reached


# defect 16: the state lane and the Will -----------------------------------------------------


def test_state_is_sent_before_any_backlog_and_coalesced(outbox: Outbox) -> None:
    broker = InMemoryBroker()
    broker.stop()
    link, _ = make_link(outbox, broker, inflight=8)
    link.start()
    try:
        for n in range(300):
            outbox.put(TELEMETRY, {"n": n})
        for release in (1, 2, 3):
            outbox.put(STATE, {"online": True, "release": release}, retain=True)
        broker.start()
        until(lambda: outbox.stats().pending == 0, what="drain")
    finally:
        link.stop()
    sent = [m for m in broker.messages() if not m.will]
    assert sent[0].topic == STATE and sent[0].json()["release"] == 3
    assert [m.json()["release"] for m in sent if m.topic == STATE] == [3]
    assert len([m for m in sent if m.topic == TELEMETRY]) == 300
    assert outbox.stats().superseded == 2 and outbox.stats().dropped == 0


def test_set_will_reaches_the_broker_without_losing_commands(outbox: Outbox) -> None:
    broker = InMemoryBroker()
    commands: list[bytes] = []
    link, _ = make_link(outbox, broker, on_command=commands.append)
    link.start()
    try:
        until(link.connected.is_set, what="connect")
        link.set_will({"online": False, "device_id": DEV, "bundle": {"release": 2}})
        until(lambda: link.connects == 2, what="controlled reconnect")
        assert not [m for m in broker.messages() if m.will]  # the old Will was not published
        broker.publish(CMD, b"after-reconnect")
        until(lambda: commands == [b"after-reconnect"], what="command after reconnect")
        broker.kill(DEV)
        wills = [m for m in broker.messages(STATE) if m.will]
        assert [w.json()["bundle"] for w in wills] == [{"release": 2}]
        assert broker.retained[STATE].json()["bundle"] == {"release": 2}
    finally:
        link.stop()


# an idle sender sleeps (no polling) and is woken by what concerns it --------------------------


def test_outbox_wait_returns_on_wake_even_a_wake_that_came_first(outbox: Outbox) -> None:
    outbox.wake()  # before anyone waits: the next wait must not sleep
    started = time.monotonic()
    outbox.wait(10.0)
    assert time.monotonic() - started < 1.0
    threading.Timer(0.1, outbox.wake).start()
    started = time.monotonic()
    outbox.wait(10.0)
    assert 0.05 < time.monotonic() - started < 2.0


def test_idle_sender_wakes_for_a_put_a_new_will_and_stop(outbox: Outbox) -> None:
    from edgeops_agent.mqtt import IDLE_WAIT_S

    assert IDLE_WAIT_S >= 4.5  # the checks below (3.5 s after a 0.3 s nap) tell a wake-up from the idle timeout
    broker = InMemoryBroker()
    link, _ = make_link(outbox, broker)
    link.start()
    try:
        until(link.connected.is_set, what="connect")
        time.sleep(0.3)  # the sender is asleep in outbox.wait now
        started = time.monotonic()
        outbox.put(TELEMETRY, {"n": 1})
        until(lambda: len(broker.messages(TELEMETRY)) == 1, timeout=3.5, what="the put to be sent")
        time.sleep(0.3)
        link.set_will({"online": False, "device_id": DEV, "bundle": {"release": 9}})
        until(lambda: link.connects == 2, timeout=3.5, what="the controlled reconnect")
        time.sleep(0.3)
        started = time.monotonic()
    finally:
        link.stop()
    assert time.monotonic() - started < 2.0  # stop() woke the idle sender instead of waiting it out
    assert not link._sender.is_alive()


def test_a_full_window_sends_on_as_soon_as_a_puback_frees_a_slot(outbox: Outbox) -> None:
    from edgeops_agent.mqtt import WINDOW_WAIT_S

    broker = InMemoryBroker()
    broker.hold_acks = True
    link, _ = make_link(outbox, broker, inflight=2)
    link.start()
    try:
        until(link.connected.is_set, what="connect")
        for n in range(6):
            outbox.put(TELEMETRY, {"n": n})
        until(lambda: len(broker.messages(TELEMETRY)) == 2, what="the first window")
        time.sleep(0.2)
        assert len(broker.messages(TELEMETRY)) == 2  # the window is full: nothing more goes out
        for sent in (4, 6):
            started = time.monotonic()
            broker.release_acks()
            until(lambda n=sent: len(broker.messages(TELEMETRY)) == n, what=f"{sent} messages")
            assert time.monotonic() - started < 0.9 * WINDOW_WAIT_S  # woken by the PUBACK, not the 1 s timer
        broker.hold_acks = False
        broker.release_acks()
        until(lambda: outbox.stats().pending == 0, what="the outbox to drain")
        assert [json.loads(m.payload)["n"] for m in broker.messages(TELEMETRY)] == list(range(6))
    finally:
        link.stop()


# defect 13 (second half): commands published while the agent is down ------------------------


@pytest.mark.slow
def test_commands_sent_while_the_agent_is_down_arrive_on_reconnect(tmp_path: Path) -> None:
    broker = Broker(tmp_path / "broker")
    broker.start()
    settings = MqttSettings(port=broker.port, reconnect_min_s=0.1, reconnect_max_s=0.5)
    got: list[bytes] = []
    lock = threading.Lock()

    def on_command(payload: bytes) -> None:
        with lock:
            got.append(payload)

    def link() -> tuple[MqttLink, Outbox]:
        box = Outbox(tmp_path / "outbox.sqlite")
        return MqttLink(settings, DEV, box, offline_state={"online": False}, on_command=on_command), box

    console = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="console", protocol=mqtt.MQTTv5)
    try:
        first, box = link()
        first.start()
        until(first.connected.is_set, what="first connect")
        time.sleep(0.2)  # the SUBSCRIBE is in the session
        first.stop()
        box.close()
        console.connect("127.0.0.1", broker.port)
        console.loop_start()
        n = 200
        infos = [console.publish(CMD, json.dumps({"id": f"c{i}"}), qos=1) for i in range(n)]
        for info in infos:
            info.wait_for_publish(timeout=10)
        second, box = link()
        second.start()
        until(lambda: len(got) >= n, timeout=20, what=f"{n} queued commands, got {len(got)}")
        second.stop()
        box.close()
        assert sorted(json.loads(p)["id"] for p in got) == sorted(f"c{i}" for i in range(n))
    finally:
        console.disconnect()
        console.loop_stop()
        broker.stop()


# the seam ------------------------------------------------------------------------------------


def test_a_failing_command_handler_does_not_stop_the_link(outbox: Outbox) -> None:
    broker = InMemoryBroker()

    def boom(payload: bytes) -> None:
        raise RuntimeError("handler bug")

    link, transport = make_link(outbox, broker, on_command=boom)
    link.start()
    try:
        until(link.connected.is_set, what="connect")
        broker.publish(CMD, b"x")
        outbox.put(TELEMETRY, {"n": 1})
        until(lambda: len(broker.messages(TELEMETRY)) == 1, what="send after a failed handler")
        assert transport.hook_errors == []
    finally:
        link.stop()


def test_refused_message_is_quarantined_not_retried(outbox: Outbox) -> None:
    broker = InMemoryBroker()
    broker.refuse = 0x87
    link, _ = make_link(outbox, broker)
    link.start()
    try:
        outbox.put(TELEMETRY, {"n": 1})
        until(lambda: outbox.stats().quarantined == 1, what="quarantine")
        assert outbox.stats().pending == 0 and broker.messages(TELEMETRY) == []
    finally:
        link.stop()


def test_backoff_keeps_fractions_of_a_second() -> None:
    transport = PahoTransport("127.0.0.1", 1, DEV, reconnect_min_s=0.5, reconnect_max_s=2.5)
    assert (transport.client._reconnect_min_delay, transport.client._reconnect_max_delay) == (0.5, 2.5)


def test_manual_clock_moves_only_when_told() -> None:
    clock = ManualClock(start=10.0)
    event = threading.Event()
    assert clock.wait(event, 2.5) is False and clock.monotonic() == 12.5
    clock.sleep(1.0)
    event.set()
    assert clock.wait(event, 5.0) is True and clock.time() == 13.5


_WILL_CHILD = """
import os, sys, time
from pathlib import Path
from edgeops_agent.mqtt import MqttLink, MqttSettings
from edgeops_agent.outbox import Outbox
port, folder = int(sys.argv[1]), Path(sys.argv[2])
box = Outbox(folder / "outbox.sqlite")
link = MqttLink(MqttSettings(port=port), "dev-1", box, offline_state={"online": False, "release": 1},
                on_command=lambda p: None)
link.start()
while link.connects < 1:
    time.sleep(0.01)
link.set_will({"online": False, "release": 2})
while link.connects < 2:
    time.sleep(0.01)
box.put("edgeops/v1/dev-1/telemetry", {"alive": True})
while box.stats().pending:
    time.sleep(0.01)
os._exit(0)  # like kill -9: no DISCONNECT, the broker publishes the Will
"""


@pytest.mark.slow
def test_updated_will_is_what_mosquitto_publishes(tmp_path: Path) -> None:
    broker = Broker(tmp_path / "broker")
    broker.start()
    seen: list[tuple[str, dict[str, Any]]] = []
    console = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="console", protocol=mqtt.MQTTv5)
    console.on_message = lambda c, u, m: seen.append((m.topic, json.loads(m.payload)))
    try:
        console.connect("127.0.0.1", broker.port)
        console.subscribe(f"edgeops/v1/{DEV}/#", qos=1)
        console.loop_start()
        time.sleep(0.2)
        child = subprocess.run(
            [sys.executable, "-c", _WILL_CHILD, str(broker.port), str(tmp_path)], capture_output=True, timeout=30
        )
        assert child.returncode == 0, child.stderr.decode()
        until(lambda: any(t == STATE for t, _ in seen), what="the Will")
        assert [m for t, m in seen if t == STATE] == [{"online": False, "release": 2}]
        assert [m["alive"] for t, m in seen if t == TELEMETRY] == [True]
    finally:
        console.disconnect()
        console.loop_stop()
        broker.stop()


@pytest.mark.slow
def test_daemon_survives_a_disk_that_fills_and_empties(tmp_path: Path, built: Built) -> None:
    """The whole agent process, its data directory on a real tmpfs that fills up."""
    from test_agent_mqtt import Collector, _ask, _device, _inputs

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "fs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    broker = Broker(tmp_path / "broker")
    broker.start()
    dev = _device(mount, built, broker, "ecu-full", interval=0.5)
    console = Collector(broker, "ecu-full").start()
    try:
        dev.start()
        try:
            sock = dev.socket()
        except AssertionError:
            raise AssertionError(dev.log.read_text()[-3000:]) from None
        row = _inputs(built)[0]
        console.wait(lambda c: len(c.of("telemetry")) >= 2, what="telemetry before the disk fills")
        filler = mount / "filler"
        fill_disk(filler)
        served = 0
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:  # telemetry fails to queue several times meanwhile
            assert _ask(sock, {"op": "predict", "features": row})["ok"]
            served += 1
        assert dev.proc is not None and dev.proc.poll() is None, "the agent died on a full disk"
        # The console is told, although the outbox cannot take the message: a direct state.
        console.wait(lambda c: any(s["health"] == "degraded" for s in c.of("state")), timeout=10, what="degraded state")
        degraded = next(s for s in console.of("state") if s["health"] == "degraded")
        assert degraded["online"] and "disk is full" in degraded["last_error"] and degraded["seq"] is None
        before = len(console.of("telemetry"))
        filler.unlink()
        console.wait(lambda c: len(c.of("telemetry")) >= before + 3, timeout=30, what="telemetry after space returned")
        # ...and told again when it recovers, through the outbox (a seq); the repeated row may have raised drift.
        console.wait(
            lambda c: c.of("state")[-1]["health"] != "degraded" and c.of("state")[-1]["seq"] is not None,
            timeout=10,
            what="a state after recovery",
        )
        assert console.of("state")[-1]["last_error"] is None
        assert _ask(sock, {"op": "predict", "features": row})["ok"] and served > 10
        assert console.of("telemetry")[-1]["outbox"]["dropped"] > 0  # what the full disk cost is counted
        sock.close()
        dev.stop()
    finally:
        if dev.proc is not None:
            dev.stop(signal.SIGKILL)
        console.stop()
        broker.stop()
        subprocess.run(["umount", "-l", str(mount)], check=True)
