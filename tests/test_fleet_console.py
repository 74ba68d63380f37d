"""The fleet console (``edgeops fleet serve``): ingest, the HTTP API, its token, and kill -9.

Everything is real: a Mosquitto per test (:mod:`broker`), a SQLite store in the test's
folder, plain paho publishers sending payloads built with :mod:`edgeops_core`'s message
types, and the console either in process (:class:`~edgeops_fleet.console.Console`) or as
the real ``edgeops fleet serve`` in a subprocess (the SIGKILL test).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker import Broker, free_port
from conftest import EDGEOPS
from edgeops_core import (
    DEFAULT_PREFIX,
    BundleInfo,
    Event,
    InputError,
    ModelRef,
    State,
    Telemetry,
    device_topic,
    utc_now_text,
)
from edgeops_fleet.console import Console
from edgeops_fleet.link import BrokerUrl
from edgeops_fleet.store import Store
from ota_device import OtaDevice

# -- helpers ---------------------------------------------------------------------------------


def telemetry(device_id: str, seq: int | None, *, release: int = 1, count: int = 50) -> bytes:
    return Telemetry(
        device_id=device_id,
        ts=utc_now_text(),
        seq=seq,
        interval_s=1.0,
        model=ModelRef(name="vibration", release=release),
        inference={"count": count, "window_count": count, "errors": {}, "error_count": 0},
        latency_ms={"p50": 0.4, "p95": 0.8, "p99": 1.2, "max": 2.0},
        drift=None,
        resources={"rss_bytes": 1e7, "cpu_percent": 3.0},
        outbox={"pending": 0, "dropped": 0, "quarantined": 0, "superseded": 0},
    ).to_json()


def state(device_id: str, seq: int | None, *, online: bool = True, target: str = "ecu", release: int | None = None) -> bytes:
    bundle = None
    if release is not None:
        bundle = BundleInfo(
            name="vibration-classifier",
            version="1.0.0",
            release=release,
            sha256="ab" * 32,
            slot="a",
            expires="2099-01-01T00:00:00.000000Z",
            expired=False,
        )
    return State(
        device_id=device_id,
        ts=utc_now_text(),
        seq=seq,
        online=online,
        agent_version="0.1.0",
        target=target,
        runtime="onnxruntime",
        bundle=bundle,
        health="no_model" if bundle is None else "ok",
        last_error=None,
    ).to_json()


def event(device_id: str, seq: int, kind: str = "drift_alarm") -> bytes:
    return Event(device_id=device_id, ts=utc_now_text(), seq=seq, type=kind, detail={"feature": "rms"}).to_json()


class Publisher:
    """A device-like paho client that publishes QoS 1 and waits for each PUBACK."""

    def __init__(self, port: int, client_id: str) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def send(self, device_id: str, leaf: str, payload: bytes, *, retain: bool = False) -> None:
        info = self.client.publish(device_topic(DEFAULT_PREFIX, device_id, leaf), payload, qos=1, retain=retain)
        info.wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def http_json(url: str, *, token: str | None = None, method: str = "GET", body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def wait_for(check: Callable[[], bool], timeout_s: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(f"sqlite:///{tmp_path / 'console.sqlite'}", retry_s=0.5)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def console(tmp_path: Path, broker: Broker, store: Store) -> Iterator[Console]:
    c = Console(BrokerUrl("127.0.0.1", broker.port), store, http=("127.0.0.1", 0), bundles_dir=tmp_path / "bundles")
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def publisher(broker: Broker) -> Iterator[Publisher]:
    p = Publisher(broker.port, "test-publisher")
    try:
        yield p
    finally:
        p.close()


def api(console: Console) -> str:
    address = console.http_address
    assert address is not None
    return f"http://{address[0]}:{address[1]}"


def history(console: Console, device_id: str, query: str = "") -> list[dict[str, Any]]:
    status, doc = http_json(f"{api(console)}/api/devices/{device_id}/history{query}")
    return list(doc["history"]) if status == 200 else []


# -- ingest ----------------------------------------------------------------------------------


def test_state_telemetry_and_events_are_stored_and_served_over_http(console: Console, publisher: Publisher) -> None:
    publisher.send("ecu-1", "state", state("ecu-1", 1, release=4), retain=True)
    for seq in range(2, 7):
        publisher.send("ecu-1", "telemetry", telemetry("ecu-1", seq))
    publisher.send("ecu-1", "events", event("ecu-1", 7))
    publisher.send("ecu-2", "telemetry", telemetry("ecu-2", 1))
    wait_for(lambda: len(history(console, "ecu-1")) == 7 and len(history(console, "ecu-2")) == 1, what="9 stored messages")

    status, doc = http_json(f"{api(console)}/api/devices")
    assert status == 200
    devices = {d["device_id"]: d for d in doc["devices"]}
    assert set(devices) == {"ecu-1", "ecu-2"}
    assert devices["ecu-1"]["online"] is True and devices["ecu-1"]["target"] == "ecu"
    assert devices["ecu-2"]["online"] is None  # telemetry only: no state seen yet
    # A release the console never rolled out is flagged, not refused: the fleet's truth is kept.
    assert devices["ecu-1"]["release_known"] is False and devices["ecu-2"]["release_known"] is None

    rows = history(console, "ecu-1")
    assert [r["seq"] for r in rows] == list(range(1, 8))
    assert [r["kind"] for r in rows] == ["state", *["telemetry"] * 5, "event"]
    assert rows[1]["release"] == 1 and rows[1]["payload"]["latency_ms"]["p99"] == 1.2
    assert [r["seq"] for r in history(console, "ecu-1", "?kinds=event")] == [7]
    assert len(history(console, "ecu-1", "?limit=2")) == 2

    status, doc = http_json(f"{api(console)}/api/devices/ecu-1")
    assert status == 200 and doc["device"]["device_id"] == "ecu-1" and doc["gaps"] == []
    status, doc = http_json(f"{api(console)}/api/devices/nope-9")
    assert status == 404 and "nope-9" in doc["error"]
    status, doc = http_json(f"{api(console)}/api/devices/ecu-1/history?kinds=bogus")
    assert status == 400 and "kinds" in doc["error"]
    status, doc = http_json(f"{api(console)}/api/devices/ecu-1/history?since=yesterday-ish")
    assert status == 400 and "since" in doc["error"]
    status, doc = http_json(f"{api(console)}/api/health")
    assert status == 200 and doc["ok"] is True and doc["console"]["connected"] is True


def test_duplicates_are_dropped_and_gaps_recorded(console: Console, publisher: Publisher) -> None:
    for seq in (1, 2, 2, 5, 3, 1):
        publisher.send("ecu-1", "telemetry", telemetry("ecu-1", seq))
    wait_for(lambda: console.counters["received"] == 6, what="6 messages received")
    wait_for(lambda: http_json(f"{api(console)}/api/stats")[1]["store"]["duplicates"] == 2, what="2 duplicates")
    assert [r["seq"] for r in history(console, "ecu-1")] == [1, 2, 5, 3]
    assert http_json(f"{api(console)}/api/devices/ecu-1")[1]["gaps"] == [[4, 4]]
    publisher.send("ecu-1", "telemetry", telemetry("ecu-1", 4))
    wait_for(lambda: http_json(f"{api(console)}/api/devices/ecu-1")[1]["gaps"] == [], what="the gap to fill")


def test_malformed_payloads_are_rejected_and_change_nothing_else(console: Console, publisher: Publisher) -> None:
    publisher.send("ecu-1", "telemetry", telemetry("ecu-1", 1))
    wait_for(lambda: len(history(console, "ecu-1")) == 1, what="the first message")
    before = http_json(f"{api(console)}/api/stats")[1]["store"]
    devices_before = http_json(f"{api(console)}/api/devices")[1]

    future = json.loads(telemetry("ecu-1", 2))
    future["schema"] = 99
    bad = {
        "telemetry": [b"\xff\xfe not json", json.dumps(future).encode(), b"[" * 10000, telemetry("ecu-9", 3)],
        "events": [b'{"schema": 1, "device_id": "ecu-1", "ts": null, "seq": 4, "type": "made_up", "detail": {}}'],
        "state": [b"{}"],
    }
    for leaf, payloads in bad.items():
        for payload in payloads:
            publisher.send("ecu-1", leaf, payload)
    wait_for(lambda: console.counters["rejected"] == 6, what="6 rejects")

    status, doc = http_json(f"{api(console)}/api/rejects")
    assert status == 200 and len(doc["rejects"]) == 6
    reasons = " | ".join(r["reason"] for r in doc["rejects"])
    assert "schema must be 1, got 99" in reasons
    assert "names device 'ecu-9'" in reasons
    assert "not valid UTF-8 JSON" in reasons
    after = http_json(f"{api(console)}/api/stats")[1]["store"]
    assert {k: v for k, v in after.items() if k != "rejects"} == {k: v for k, v in before.items() if k != "rejects"}
    assert after["rejects"] == before["rejects"] + 6
    assert http_json(f"{api(console)}/api/devices")[1] == devices_before
    # the console keeps going
    publisher.send("ecu-1", "telemetry", telemetry("ecu-1", 2))
    wait_for(lambda: len(history(console, "ecu-1")) == 2, what="the next good message")


def test_a_locked_database_delays_acknowledgements_and_loses_nothing(
    tmp_path: Path, console: Console, publisher: Publisher
) -> None:
    publisher.send("ecu-1", "telemetry", telemetry("ecu-1", 1))
    wait_for(lambda: len(history(console, "ecu-1")) == 1, what="the first message")
    blocker = sqlite3.connect(tmp_path / "console.sqlite", timeout=5)
    try:
        blocker.execute("BEGIN EXCLUSIVE")  # another writer holds the database (retry_s is 0.5 s here)
        for seq in range(2, 12):
            publisher.send("ecu-1", "telemetry", telemetry("ecu-1", seq))
        wait_for(lambda: console.counters["db_errors"] >= 1, what="a database error")
        assert console.counters["stored"] == 1
        time.sleep(1.0)
    finally:
        blocker.rollback()
        blocker.close()
    wait_for(lambda: len(history(console, "ecu-1")) == 11, what="every message after the lock", timeout_s=20)
    assert [r["seq"] for r in history(console, "ecu-1")] == list(range(1, 12))


# -- the token ---------------------------------------------------------------------------------


def test_a_non_loopback_bind_needs_a_token(tmp_path: Path, broker: Broker, store: Store) -> None:
    with pytest.raises(InputError, match="without a token"):
        Console(BrokerUrl("127.0.0.1", broker.port), store, http=("0.0.0.0", 0), bundles_dir=tmp_path)
    done = subprocess.run(
        [*EDGEOPS, "fleet", "serve", "--broker", f"mqtt://127.0.0.1:{broker.port}", "--http", "0.0.0.0:0",
         "--db", f"sqlite:///{tmp_path / 'untouched.sqlite'}"],
        capture_output=True, text=True, timeout=60, env={k: v for k, v in os.environ.items() if k != "EDGEOPS_CONSOLE_TOKEN"},
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "without a token" in done.stderr
    assert not (tmp_path / "untouched.sqlite").exists()


def test_with_a_token_every_request_needs_it(tmp_path: Path, broker: Broker, store: Store) -> None:
    c = Console(BrokerUrl("127.0.0.1", broker.port), store, http=("127.0.0.1", 0), token="s3cret-t0ken", bundles_dir=tmp_path)
    c.start()
    try:
        base = api(c)
        status, doc = http_json(f"{base}/api/devices")
        assert status == 401 and "token" in doc["error"]
        assert http_json(f"{base}/api/devices", token="wrong")[0] == 401
        status, doc = http_json(f"{base}/api/devices", token="s3cret-t0ken")
        assert status == 200 and doc == {"devices": []}
        status, _ = http_json(f"{base}/api/rollouts", token="nope", method="POST", body={})
        assert status == 401

        # The dashboard: ?token= once → an HttpOnly, SameSite=Strict cookie, then a redirect without it.
        import http.client

        host, port = c.http_address or ("", 0)
        conn = http.client.HTTPConnection(host, port, timeout=10)
        try:
            conn.request("GET", "/?token=s3cret-t0ken")
            response = conn.getresponse()
            response.read()
            assert response.status == 303 and response.getheader("location") == "/"
            cookie = response.getheader("set-cookie") or ""
            assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
            conn.request("GET", "/api/health", headers={"Cookie": cookie.split(";")[0]})
            response = conn.getresponse()
            assert response.status == 200 and json.loads(response.read())["ok"] is True
            conn.request("GET", "/")
            response = conn.getresponse()
            response.read()
            assert response.status == 401
        finally:
            conn.close()
    finally:
        c.stop()


# -- kill -9 -------------------------------------------------------------------------------------


def _serve(broker: Broker, db: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            [*EDGEOPS, "fleet", "serve", "--broker", f"mqtt://127.0.0.1:{broker.port}", "--db", f"sqlite:///{db}",
             "--http", f"127.0.0.1:{port}", "--bundles", str(db.parent / "bundles")],
            stdout=subprocess.DEVNULL, stderr=fh,
        )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if http_json(f"http://127.0.0.1:{port}/api/health")[0] == 200:
                return proc
        except OSError:
            pass
        if proc.poll() is not None:
            raise AssertionError(f"serve exited {proc.returncode}: {log.read_text()}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"serve did not answer: {log.read_text()}")


def test_kill_9_mid_stream_loses_no_message_and_stores_none_twice(tmp_path: Path, broker: Broker) -> None:
    db, port, log = tmp_path / "console.sqlite", free_port(), tmp_path / "serve.log"
    devices, per_device = ("ecu-1", "ecu-2", "ecu-3"), 600
    proc = _serve(broker, db, port, log)
    base = f"http://127.0.0.1:{port}"
    sent = dict.fromkeys(devices, 0)
    errors: list[BaseException] = []

    def publish(device_id: str) -> None:
        pub = Publisher(broker.port, device_id)
        try:
            for seq in range(1, per_device + 1):
                pub.send(device_id, "telemetry", telemetry(device_id, seq))
                sent[device_id] = seq
                time.sleep(0.004)
        except BaseException as exc:  # noqa: BLE001 - surfaced by the test
            errors.append(exc)
        finally:
            pub.close()

    threads = [threading.Thread(target=publish, args=(d,)) for d in devices]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: min(sent.values()) > 100, what="publishers under way")
        os.kill(proc.pid, signal.SIGKILL)  # mid-stream, mid-batch: whatever was not committed is not acknowledged
        proc.wait(timeout=10)
        killed_at = dict(sent)
        wait_for(lambda: min(sent.values()) > min(killed_at.values()) + 100, what="messages sent while the console is down")
        proc = _serve(broker, db, port, log)
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors
        for device_id in devices:
            wait_for(
                lambda d=device_id: (
                    http_json(f"{base}/api/devices/{d}/history?kinds=telemetry&limit=5000")[1]["history"].__len__() >= per_device
                ),
                timeout_s=30,
                what=f"every message of {device_id}",
            )
            rows = http_json(f"{base}/api/devices/{device_id}/history?kinds=telemetry&limit=5000")[1]["history"]
            seqs = [r["seq"] for r in rows]
            assert sorted(seqs) == list(range(1, per_device + 1)), f"{device_id}: missing or doubled seqs"
            assert http_json(f"{base}/api/devices/{device_id}")[1]["gaps"] == []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    with sqlite3.connect(db) as conn:
        (doubles,) = conn.execute(
            "SELECT COUNT(*) FROM (SELECT device_id, seq FROM messages GROUP BY 1, 2 HAVING COUNT(*) > 1)"
        ).fetchone()
    conn.close()
    assert doubles == 0


# -- a rollout through the API, with fake devices ------------------------------------------------


class HoldingOtaDevice(OtaDevice):
    """Takes a ``deploy`` with ``hold_s`` (issue 9) like one without (it commits on its own) and
    records every other command (``commit``, ``rollback``) instead of acting on it."""

    def __init__(self, device_id: str, port: int, data: Path) -> None:
        super().__init__(device_id, port, data)
        self.commands: list[dict[str, Any]] = []

    def _message(self, topic: str, payload: bytes) -> None:
        if topic == self.topic["cmd"]:
            doc = json.loads(payload)
            if doc.get("type") != "deploy":
                self.commands.append(doc)
                return
            doc["args"].pop("hold_s", None)
            payload = json.dumps(doc).encode()
        super()._message(topic, payload)


class TelemetryDevice:
    """An :class:`ota_device.OtaDevice` that also reports telemetry for the release it runs.

    The fake device commits a deploy as soon as the whole file hashes right (no held trial),
    then reports healthy telemetry on the new release: enough for a wave's soak to pass.
    """

    def __init__(self, device_id: str, port: int, data: Path) -> None:
        self.device = HoldingOtaDevice(device_id, port, data)
        self.publisher = Publisher(port, f"{device_id}-telemetry")
        self.seq = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._report, daemon=True)

    def start(self) -> None:
        self.device.start()
        assert self.device.connected.wait(10)
        self._thread.start()

    def _report(self) -> None:
        while not self._stop.wait(0.2):
            committed = [o for o in self.device.outcomes if o.type == "ota_committed"]
            release = committed[-1].release if committed else self.device.release
            self.seq += 1
            self.publisher.send(self.device.id, "telemetry", telemetry(self.device.id, self.seq, release=release))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.publisher.close()
        self.device.stop()


def _release_2(built: Any, tmp: Path) -> Path:
    """The session's bundle re-signed as release 2."""
    import dataclasses

    from edgeops_core import Manifest, pack_bundle, read_members
    from edgeops_toolchain.signing import sign_members

    members = read_members(built.bundle.read_bytes())
    manifest = dataclasses.replace(Manifest.from_json(members["manifest.json"]), release=2)
    body = {"manifest.json": manifest.to_json(), "model.onnx": members["model.onnx"]}
    path = tmp / "release-2.edgeops"
    path.write_bytes(pack_bundle({**body, "model.sig": sign_members(body, built.private_key, subject=path.stem)}))
    return path


@pytest.mark.slow
def test_a_rollout_through_the_api_offers_serves_and_passes_each_wave(
    tmp_path: Path, broker: Broker, console: Console, built: Any
) -> None:
    fleet = [TelemetryDevice(f"ecu-{i}", broker.port, tmp_path / f"dev-{i}") for i in range(2)]
    for d in fleet:
        d.start()
    try:
        wait_for(lambda: len(http_json(f"{api(console)}/api/devices?target=ecu")[1]["devices"]) == 2, what="two devices")
        bundle = _release_2(built, tmp_path)
        request = {
            "bundle": str(bundle),
            "key": built.public_key.read_text(),
            "group": {"target": "ecu"},
            "waves": "1,100%",
            "soak": "1s",
            "deadline": "10m",
            "gates": {"min_inferences": 10, "latency_p99_ms": 50},
        }
        status, doc = http_json(f"{api(console)}/api/rollouts", method="POST", body={**request, "bundle": str(tmp_path / "x")})
        assert status == 400 and "no such bundle" in doc["error"]
        tampered = tmp_path / "tampered.edgeops"
        tampered.write_bytes(bundle.read_bytes()[:-1] + b"\x01")
        status, doc = http_json(f"{api(console)}/api/rollouts", method="POST", body={**request, "bundle": str(tampered)})
        assert status == 400
        assert http_json(f"{api(console)}/api/rollouts")[1] == {"rollouts": []}
        assert not list((tmp_path / "bundles").glob("*.edgeops"))  # nothing copied for a refused bundle

        status, doc = http_json(f"{api(console)}/api/rollouts", method="POST", body=request)
        assert status == 201, doc
        rollout_id = doc["rollout"]["rollout_id"]
        kept = list((tmp_path / "bundles").glob("*.edgeops"))
        assert [p.name for p in kept] == [f"{doc['rollout']['sha256']}.edgeops"]
        status, again = http_json(f"{api(console)}/api/rollouts", method="POST", body=request)
        assert status in (400, 409) and "already" in again["error"]

        wait_for(
            lambda: http_json(f"{api(console)}/api/rollouts/{rollout_id}")[1]["rollout"]["state"] in ("passed", "failed"),
            timeout_s=60,
            what="the rollout to end",
        )
        status, doc = http_json(f"{api(console)}/api/rollouts/{rollout_id}")
        assert doc["rollout"]["state"] == "passed", doc
        assert [w["state"] for w in doc["waves"]] == ["passed", "passed"]
        for d in fleet:
            assert [o.type for o in d.device.outcomes] == ["ota_committed"]
            assert len(d.device.seen_deploys) == 1  # each device got its deploy once
        status, doc = http_json(f"{api(console)}/api/rollouts/{rollout_id}/pause", method="POST", body={})
        assert status == 409 and "passed" in doc["error"]

        from conftest import run_edgeops

        env = {"EDGEOPS_CONSOLE": api(console)}
        shown = run_edgeops("fleet", "rollout", "status", rollout_id, env=env)
        assert shown.returncode == 0, shown.stderr
        assert f"rollout {rollout_id}" in shown.stdout and "passed" in shown.stdout and "error_rate" in shown.stdout
        listed = run_edgeops("fleet", "rollout", "status", "--json", env=env)
        assert [r["rollout_id"] for r in json.loads(listed.stdout)["rollouts"]] == [rollout_id]
    finally:
        for d in fleet:
            d.stop()
