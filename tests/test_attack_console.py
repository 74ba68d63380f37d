"""Attacks on the fleet console (issue 9): hostile HTTP requests, MQTT floods, a broken store.

Each test is a hole found (or a defence checked) by driving the real thing: a Mosquitto per
test (:mod:`broker`), a SQLite store in the test's folder, the console's HTTP API served by
uvicorn, and plain paho publishers.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker import Broker
from edgeops_fleet.console import Console
from edgeops_fleet.link import BrokerUrl
from edgeops_fleet.store import Store
from test_fleet_console import Publisher, api, http_json, state, telemetry, wait_for

TOKEN = "attack-t0ken"


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
    p = Publisher(broker.port, "attack-publisher")
    try:
        yield p
    finally:
        p.close()


def raw_request(
    console: Console, method: str, path: str, *, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """One request on a fresh connection; ``(status, body)``."""
    host, port = console.http_address or ("", 0)
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, path, body=body or None, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def json_error(status: int, raw: bytes) -> str:
    """The ``error`` of a JSON error answer (fails the test on anything else)."""
    assert 400 <= status < 500, (status, raw[:300])
    doc = json.loads(raw)
    assert isinstance(doc, dict) and isinstance(doc.get("error"), str), raw[:300]
    return str(doc["error"])


# -- the HTTP API ----------------------------------------------------------------------------------


def test_query_params_with_absurd_values_are_400_never_500(console: Console, publisher: Publisher) -> None:
    publisher.send("ecu-1", "telemetry", telemetry("ecu-1", 1))
    wait_for(lambda: console.counters["stored"] == 1, what="one stored message")
    base = "/api/devices/ecu-1/history"
    for query in (
        "limit=1000000000000",
        "limit=0",
        "limit=-1",
        "limit=1e3",
        "limit=%C2%B2",  # "²": str.isdigit() says yes, int() says no
        "limit=%D9%A3%D9%A3",  # Arabic-Indic digits
        "since=-1",
        "since=nan",
        "since=inf",
        "since=1e400",
        "since=99999999999999999999999999h",
        "since=2026-01-01T00:00:00",
        "kinds=state,%00",
    ):
        status, raw = raw_request(console, "GET", f"{base}?{query}")
        if status == 200:
            continue  # an unusual but meaningful value (Arabic-Indic digits are digits)
        json_error(status, raw)
    status, raw = raw_request(console, "GET", "/api/rejects?limit=%C2%B2")
    json_error(status, raw)
    for device in ("..%2F..%2Fetc", "%3Cscript%3E", "a" * 500):
        status, raw = raw_request(console, "GET", f"/api/devices/{device}")
        json_error(status, raw)


def test_request_bodies_over_the_limit_or_malformed_are_refused(console: Console) -> None:
    big = b'{"bundle": "' + b"a" * (1024 * 1024 + 10) + b'"}'
    status, raw = raw_request(console, "POST", "/api/rollouts", body=big, headers={"Content-Type": "application/json"})
    assert status == 413, (status, raw[:200])
    json_error(status, raw)

    # chunked, no Content-Length
    host, port = console.http_address or ("", 0)
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:

        def chunks() -> Iterator[bytes]:
            for _ in range(20):
                yield b"[" * 65536

        conn.request("POST", "/api/rollouts", body=chunks(), encode_chunked=True, headers={"Transfer-Encoding": "chunked"})
        response = conn.getresponse()
        status, raw = response.status, response.read()
    finally:
        conn.close()
    assert status == 413, (status, raw[:200])

    # a Content-Length that lies (says less than sent): the request is cut where it says
    with socket.create_connection(console.http_address or ("", 0), timeout=10) as sock:
        sock.sendall(b"POST /api/rollouts HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n" + b"{}" * 1000)
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 4"), answer[:200]

    for body in (b"[" * 50_000 + b"]" * 50_000, b"\xff\xfe", b"not json", b'{"a": NaN}', b"1" * 5000, b""):
        status, raw = raw_request(console, "POST", "/api/rollouts", body=body)
        assert "valid JSON" in json_error(status, raw) or status == 400


def _start_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "bundle": "/nonexistent.edgeops",
        "group": {"target": "ecu"},
        "waves": "1,100%",
        "soak": "1s",
        "key": None,
    }
    body.update(overrides)
    return body


BAD_ROLLOUT_FIELDS: list[dict[str, Any]] = [
    {"bundle": 7},
    {"bundle": None},
    {"bundle": ["a"]},
    {"bundle": "relative.edgeops"},
    {"bundle": "/etc/../etc/passwd"},
    {"bundle": "/dev/zero"},
    {"bundle": "/"},
    {"bundle": "/\u0000x"},
    {"group": "ecu"},
    {"group": {"target": 1}},
    {"group": {"target": "ecu", "tags": ["a"]}},
    {"group": {"target": "ecu", "tags": {"k": 1}}},
    {"group": {"target": "ecu", "extra": 1}},
    {"waves": 5},
    {"waves": [True]},
    {"waves": [{"a": 1}]},
    {"waves": "0%"},
    {"waves": ""},
    {"soak": None},
    {"soak": -1},
    {"soak": True},
    {"soak": "forever"},
    {"soak": 1e308},
    {"deadline": -5},
    {"deadline": [1]},
    {"gates": []},
    {"gates": {"error_rate_max": "nan"}},
    {"gates": {"error_rate_max": 2}},
    {"gates": {"no_such_gate": 1}},
    {"gates": {"min_inferences": -1}},
    {"gates": {"latency_p99_ms": {"x": 1}}},
    {"allow_bad": "yes"},
    {"key": 42},
    {"key": "-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n"},
    {"unknown": 1},
]


def test_wrong_types_in_every_rollout_field_are_400(console: Console) -> None:
    for overrides in BAD_ROLLOUT_FIELDS:
        status, raw = raw_request(console, "POST", "/api/rollouts", body=json.dumps(_start_body(**overrides)).encode())
        assert status in (400, 409), (overrides, status, raw[:300])
        json_error(status, raw)
    assert http_json(f"{api(console)}/api/rollouts")[1] == {"rollouts": []}


def test_a_fifo_or_directory_as_bundle_is_refused_at_once(tmp_path: Path, console: Console) -> None:
    fifo = tmp_path / "bundle.fifo"
    os.mkfifo(fifo)
    link = tmp_path / "link.edgeops"
    link.symlink_to(fifo)
    loop = tmp_path / "loop.edgeops"
    loop.symlink_to(loop)
    for path in (fifo, link, tmp_path, loop):
        started = time.monotonic()
        status, raw = raw_request(console, "POST", "/api/rollouts", body=json.dumps(_start_body(bundle=str(path))).encode())
        assert time.monotonic() - started < 5
        json_error(status, raw)


def test_copying_a_bundle_swapped_for_a_fifo_or_device_after_verify_is_refused_at_once(tmp_path: Path) -> None:
    """The window between verify and copy: the path now names a FIFO (open would block
    forever) or /dev/zero (the copy would fill the disk)."""
    from edgeops_fleet.api import _copy_verified
    from edgeops_fleet.errors import FleetError

    fifo = tmp_path / "swapped.fifo"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero"), tmp_path):
        verified = _FakeVerified(path=path, digest="ab" * 32, size=1000)
        outcome: list[BaseException | None] = []

        def copy(v: Any = verified, outcome: list[BaseException | None] = outcome) -> None:
            try:
                _copy_verified(v, tmp_path / "bundles")
                outcome.append(None)
            except BaseException as exc:  # noqa: BLE001 - inspected below
                outcome.append(exc)

        worker = threading.Thread(target=copy, daemon=True)
        worker.start()
        worker.join(timeout=5)
        if worker.is_alive():  # unblock the FIFO reader so the thread ends
            with open(fifo, "wb"):
                pass
            worker.join(timeout=5)
            pytest.fail(f"copying {path} blocked")
        assert outcome and isinstance(outcome[0], FleetError), (path, outcome)
        assert not list((tmp_path / "bundles").glob("*")) if (tmp_path / "bundles").exists() else True


class _FakeVerified:
    """What :func:`_copy_verified` reads of a :class:`VerifiedBundleFile`."""

    def __init__(self, *, path: Path, digest: str, size: int) -> None:
        self.path, self.digest, self.size = path, digest, size


def test_tokens_cannot_be_bypassed(tmp_path: Path, broker: Broker, store: Store) -> None:
    c = Console(BrokerUrl("127.0.0.1", broker.port), store, http=("127.0.0.1", 0), token=TOKEN, bundles_dir=tmp_path / "b")
    c.start()
    try:
        for path, headers in (
            ("/api/devices", {}),
            ("/api/devices?token=" + TOKEN, {}),  # a query token is for pages only
            ("/api/devices", {"Authorization": "Bearer " + TOKEN[:-1]}),
            ("/api/devices", {"Authorization": "Bearer " + TOKEN + "x"}),
            ("/api/devices", {"Authorization": "Basic " + TOKEN}),
            ("/api/devices", {"Authorization": TOKEN}),
            ("/api/devices", {"Authorization": "Bearer \u00e9" + TOKEN}),
            ("/api/devices", {"Cookie": "edgeops_console_token=wrong"}),
            ("/api/devices", {"Cookie": "edgeops_console_token=" + TOKEN + "x"}),
            ("/api/devices", {"Cookie": '\xff;;==,,"\\'}),
            ("//api/devices", {}),
            ("/api//devices", {}),
            ("/API/devices", {}),
            ("/%61pi/devices", {}),
            ("/", {}),
            ("/devices/ecu-1", {}),
            ("/rollouts?token=wrong", {}),
        ):
            status, raw = raw_request(c, "GET", path, headers=headers)
            assert status == 401, (path, headers, status, raw[:200])
        status, _ = raw_request(c, "POST", "/api/rollouts?token=" + TOKEN, body=b"{}")
        assert status == 401
        status, _ = raw_request(c, "POST", "/?token=" + TOKEN, body=b"{}")
        assert status == 401
        status, raw = raw_request(c, "GET", "/api/devices", headers={"Authorization": "Bearer " + TOKEN})
        assert status == 200, raw
    finally:
        c.stop()


def test_the_dashboard_escapes_what_devices_report(console: Console, publisher: Publisher) -> None:
    evil = "<script>alert(1)</script>"
    doc = json.loads(state("ecu-1", 1, release=3))
    doc["last_error"] = evil + '"><img src=x onerror=alert(2)>'
    doc["bundle"]["name"] = evil
    doc["bundle"]["version"] = "1.0.0"
    publisher.send("ecu-1", "state", json.dumps(doc).encode())
    wait_for(lambda: console.counters["stored"] + console.counters["rejected"] >= 1, what="the state")
    for path in ("/", "/devices/ecu-1", "/rollouts"):
        status, raw = raw_request(console, "GET", path)
        assert status == 200, (path, status)
        assert b"<script>" not in raw and b"<img" not in raw, path
    # reflected: filters, an unknown device id, an unknown window, an unknown rollout
    for path in (
        "/?target=%3Cscript%3Ex&tag=a%3D%3Cimg%3E",
        "/?tag=%3Cscript%3E",
        "/devices/%3Cscript%3Ex",
        "/devices/ecu-1?window=%3Cscript%3E",
        "/rollouts/%3Cimg%20src=x%3E",
    ):
        status, raw = raw_request(console, "GET", path)
        assert status < 500, (path, status)
        assert b"<script>" not in raw and b"<img" not in raw, (path, raw[:300])


# -- MQTT ingest ------------------------------------------------------------------------------------


def test_a_seq_beyond_64_bits_is_a_reject_and_ingest_goes_on(console: Console, publisher: Publisher) -> None:
    for seq in (2**63, 2**63 - 1, 10**19 + 7):
        doc = json.loads(telemetry("ecu-1", 1))
        doc["seq"] = seq
        publisher.send("ecu-1", "telemetry", json.dumps(doc).encode())
    publisher.send("ecu-1", "telemetry", telemetry("ecu-1", 5))
    publisher.send("ecu-2", "telemetry", telemetry("ecu-2", 1))

    # (2**63 - 1 is a valid seq and may be stored too: wait for ecu-2's message itself.)
    def ecu2_seqs() -> list[int]:
        status, doc = http_json(f"{api(console)}/api/devices/ecu-2/history")
        return [r["seq"] for r in doc["history"]] if status == 200 else []

    wait_for(lambda: ecu2_seqs() == [1], timeout_s=10, what="the valid messages after the huge seqs")
    assert console.counters["stored"] >= 2
    status, rejects = http_json(f"{api(console)}/api/rejects")
    assert status == 200 and any("seq" in r["reason"] for r in rejects["rejects"]), rejects


def test_non_finite_numbers_and_mismatched_ids_are_rejected(console: Console, publisher: Publisher) -> None:
    good = telemetry("ecu-1", 1).decode()
    for text in (
        good.replace('"p99":1.2', '"p99":NaN'),
        good.replace('"p99":1.2', '"p99":Infinity'),
        good.replace('"p99":1.2', '"p99":1e400'),
        good.replace('"p99":1.2', '"p99":-1'),
    ):
        publisher.send("ecu-1", "telemetry", text.encode())
    publisher.send("ecu-1", "telemetry", telemetry("ecu-2", 2))
    huge_tags = json.loads(state("ecu-1", 3))
    huge_tags["tags"] = {f"k{i}": "v" * 64 for i in range(5000)}
    publisher.send("ecu-1", "state", json.dumps(huge_tags).encode(), retain=True)
    wait_for(lambda: console.counters["rejected"] == 6, what="6 rejects")
    assert console.counters["stored"] == 0


def test_the_same_seq_with_another_payload_is_a_duplicate_first_kept(console: Console, publisher: Publisher) -> None:
    publisher.send("ecu-1", "telemetry", telemetry("ecu-1", 1, count=10))
    publisher.send("ecu-1", "telemetry", telemetry("ecu-1", 1, count=99))
    wait_for(lambda: console.counters["duplicates"] == 1, what="a duplicate")
    _, doc = http_json(f"{api(console)}/api/devices/ecu-1/history")
    assert [r["payload"]["inference"]["count"] for r in doc["history"]] == [10]


def test_a_flood_of_rejects_does_not_starve_valid_messages(console: Console, broker: Broker) -> None:
    """2000 malformed payloads, then one valid one: stored within seconds, not after
    one durable transaction per reject."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from edgeops_core import DEFAULT_PREFIX, device_topic

    flood = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="flooder", protocol=mqtt.MQTTv5)
    flood.connect("127.0.0.1", broker.port)
    flood.loop_start()
    try:
        infos = [
            flood.publish(
                device_topic(DEFAULT_PREFIX, f"bad-{i % 50}", ("state", "telemetry", "events")[i % 3]), b"{" * 100, qos=1
            )
            for i in range(2000)
        ]
        for info in infos:
            info.wait_for_publish(20)
        started = time.monotonic()
        flood.publish(device_topic(DEFAULT_PREFIX, "ecu-1", "telemetry"), telemetry("ecu-1", 1), qos=1).wait_for_publish(10)
        wait_for(lambda: console.counters["stored"] == 1, timeout_s=30, what="the valid message")
        waited = time.monotonic() - started
    finally:
        flood.disconnect()
        flood.loop_stop()
    wait_for(lambda: console.counters["rejected"] == 2000, timeout_s=30, what="every reject recorded")
    assert waited < 5, f"the valid message waited {waited:.1f} s behind the flood"


def test_the_rejects_table_is_bounded(store: Store) -> None:
    from edgeops_fleet.store import MAX_REJECTS_KEPT

    with store.transaction():  # one commit: fast
        for i in range(MAX_REJECTS_KEPT + 50):
            store.reject(topic="t", reason=f"r{i}", payload=b"x", received_at=float(i), device_id=None)
    assert store.stats()["rejects"] <= MAX_REJECTS_KEPT
    newest = store.rejects(limit=1)
    assert newest[0]["reason"] == f"r{MAX_REJECTS_KEPT + 49}"


# -- the store --------------------------------------------------------------------------------------


def test_a_full_disk_under_a_running_console_holds_acks_logs_once_and_recovers(
    tmp_path: Path, tiny_fs: Path, broker: Broker, publisher: Publisher, caplog: pytest.LogCaptureFixture
) -> None:
    from conftest import fill_disk

    s = Store.open(f"sqlite:///{tiny_fs / 'console.sqlite'}", retry_s=0.5)
    c = Console(BrokerUrl("127.0.0.1", broker.port), s, http=("127.0.0.1", 0), bundles_dir=tmp_path / "bundles")
    c.start()
    try:
        publisher.send("ecu-1", "telemetry", telemetry("ecu-1", 1))
        wait_for(lambda: c.counters["stored"] == 1, what="the first message")
        fill_disk(tiny_fs / "filler")
        acked = c.counters["acked"]
        with caplog.at_level("INFO", logger="edgeops_fleet"):
            for seq in range(2, 40):
                publisher.send("ecu-1", "telemetry", telemetry("ecu-1", seq) + b" " * 2000)
            wait_for(lambda: c.counters["db_errors"] >= 2, what="the full disk to be seen", timeout_s=20)
            assert c.counters["acked"] == acked, "acknowledged what was not stored"
            status, doc = http_json(f"{api(c)}/api/health")
            assert status == 200 and doc["ok"] is True  # the console keeps serving
            (tiny_fs / "filler").unlink()
            wait_for(lambda: c.counters["stored"] == 39, what="every message after space returned", timeout_s=30)
        errors = [r for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and "full" in errors[0].getMessage(), [r.getMessage() for r in errors]
        assert "\n" not in errors[0].getMessage()
        status, doc = http_json(f"{api(c)}/api/devices/ecu-1/history?limit=100")
        assert [r["seq"] for r in doc["history"]] == list(range(1, 40))
    finally:
        c.stop()
        s.close()


@pytest.mark.parametrize("content", [b"this is not a database" * 100, b"SQLite format 3\x00" + b"\xff" * 4000])
def test_serve_with_a_file_that_is_not_a_database_says_so_in_one_line(tmp_path: Path, broker: Broker, content: bytes) -> None:
    from conftest import run_edgeops

    db = tmp_path / "broken.sqlite"
    db.write_bytes(content)
    done = run_edgeops(
        "fleet", "serve", "--broker", f"mqtt://127.0.0.1:{broker.port}", "--db", f"sqlite:///{db}", "--http", "127.0.0.1:0",
        "--bundles", tmp_path / "b",
    )  # fmt: skip
    assert done.returncode != 0
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert "database" in done.stderr and "Traceback" not in done.stderr
    assert db.read_bytes() == content  # untouched


def test_serve_with_a_db_folder_that_does_not_exist_or_is_a_file(tmp_path: Path, broker: Broker) -> None:
    from conftest import run_edgeops

    (tmp_path / "afile").write_text("x")
    for url in (f"sqlite:///{tmp_path / 'afile' / 'console.sqlite'}", f"sqlite:///{tmp_path}", "sqlite:////proc/nope/x.sqlite"):
        done = run_edgeops(
            "fleet", "serve", "--broker", f"mqtt://127.0.0.1:{broker.port}", "--db", url, "--http", "127.0.0.1:0",
            "--bundles", tmp_path / "b",
        )  # fmt: skip
        assert done.returncode != 0, url
        assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr, done.stderr


# -- the CLI against something that is not the console ------------------------------------------------


class _FakeServer:
    """A TCP server on loopback that answers every connection with ``respond(conn)``."""

    def __init__(self, respond: Any) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.respond = respond
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.settimeout(5)
                    conn.recv(65536)
                    self.respond(conn)
                except OSError:
                    pass

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone does not)
        self._thread.join(timeout=5)
        self.sock.close()


def _http(body: bytes, *, content_type: str = "application/json", status: str = "200 OK") -> Any:
    def respond(conn: socket.socket) -> None:
        head = f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        conn.sendall(head.encode() + body)

    return respond


def _endless(conn: socket.socket) -> None:
    """96 MiB of one JSON array that never closes (cheap to parse: whitespace)."""
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n[")
    chunk = b" " * (1 << 20)
    for _ in range(96):
        conn.sendall(chunk)


@pytest.mark.parametrize(
    "respond",
    [
        lambda conn: conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n"),
        lambda conn: conn.sendall(b"\x00\xff" * 100),
        lambda conn: None,  # accepts, says nothing, closes
        _http(b"<html><body>Welcome to nginx!</body></html>", content_type="text/html"),
        _http(b"<html>bad gateway</html>", content_type="text/html", status="502 Bad Gateway"),
        _http(b"[" * 100_000 + b"]" * 100_000),
        _http(b'{"devices": "nope"}'),
        _http(b'{"devices": [1, 2]}'),
        _endless,
    ],
    ids=["ssh", "binary", "silent", "html", "html-502", "deep-json", "wrong-shape", "wrong-rows", "endless"],
)
def test_the_cli_against_something_that_is_not_the_console_fails_in_one_clear_line(respond: Any) -> None:
    """The CLI's client raises a typed error (the CLI prints those as one line, exit 5),
    never an internal error; and it reads a bounded answer."""
    from edgeops_core import EdgeopsError
    from edgeops_toolchain.fleet_cli import ConsoleClient, _rows

    server = _FakeServer(respond)
    try:
        started = time.monotonic()
        with pytest.raises(EdgeopsError) as caught:
            _rows(ConsoleClient(f"http://127.0.0.1:{server.port}", None, timeout_s=5).get("/api/devices"), "devices")
        took = time.monotonic() - started
    finally:
        server.close()
    message = str(caught.value)
    assert "\n" not in message and "console" in message, message
    if respond is _endless:
        assert "more than" in message, message  # the answer was cut, not read whole
    assert took < 10, f"took {took:.1f} s"


def test_a_token_with_a_newline_is_refused_without_echoing_it(tmp_path: Path) -> None:
    from conftest import run_edgeops

    server = _FakeServer(_http(b'{"devices": []}'))
    try:
        done = run_edgeops(
            "fleet", "devices", "--console", f"http://127.0.0.1:{server.port}", "--token", "abc\r\nX-Evil: 1",
        )  # fmt: skip
    finally:
        server.close()
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0 and "internal error" not in done.stderr, done.stderr
    assert "X-Evil" not in done.stderr and "abc" not in done.stderr  # a secret is never printed


# -- concurrent starts (needs the session's real build) ----------------------------------------------


@pytest.mark.slow
def test_many_concurrent_posts_of_one_rollout_start_exactly_one(
    tmp_path: Path, console: Console, publisher: Publisher, built: Any
) -> None:
    from test_fleet_console import _release_2

    for i in range(3):
        publisher.send(f"ecu-{i}", "state", state(f"ecu-{i}", 1, release=1), retain=True)
    wait_for(lambda: len(http_json(f"{api(console)}/api/devices?target=ecu")[1]["devices"]) == 3, what="three devices")
    body = json.dumps(
        {
            "bundle": str(_release_2(built, tmp_path)),
            "key": built.public_key.read_text(),
            "group": {"target": "ecu"},
            "waves": "1,100%",
            "soak": "1h",
        }
    ).encode()
    answers: list[tuple[int, bytes]] = []
    gate = threading.Barrier(8)

    def post() -> None:
        gate.wait()
        answers.append(raw_request(console, "POST", "/api/rollouts", body=body))

    threads = [threading.Thread(target=post) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    statuses = sorted(status for status, _ in answers)
    assert statuses == [201] + [409] * 7, [(s, r[:200]) for s, r in answers]
    for status, raw in answers:
        if status == 409:
            assert "already" in json_error(status, raw)
    assert len(http_json(f"{api(console)}/api/rollouts")[1]["rollouts"]) == 1
    assert [p.suffix for p in (tmp_path / "bundles").iterdir()] == [".edgeops"]  # no temp file left behind
