"""The console store (edgeops_fleet.store) on real SQLite and a real PostgreSQL server.

The PostgreSQL server is started once per session from the Debian server binaries
(``initdb`` + ``pg_ctl`` on a free loopback port, sockets in a temp folder); each test gets a
fresh database. Without the binaries the PostgreSQL cases are skipped, saying why.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from edgeops_fleet.errors import FleetError, StoreError
from edgeops_fleet.store import _MIGRATIONS, Incoming, Store, _Migration, default_db_url

SHA = "ab" * 32


# -- message builders ---------------------------------------------------------------------


def tel(dev: str, seq: int | None, t: float, *, release: int = 1, p99: float = 3.0) -> Incoming:
    payload = {
        "schema": 1,
        "device_id": dev,
        "ts": "2026-01-01T00:00:00.000000Z",
        "seq": seq,
        "interval_s": 10.0,
        "model": {"name": "vib", "release": release},
        "inference": {"count": 100, "window_count": 100, "errors": {}, "error_count": 0, "predicted": [50, 50]},
        "latency_ms": {"p50": 1.0, "p95": 2.0, "p99": p99, "max": 4.0},
        "drift": None,
        "resources": {"rss_bytes": 1.0e6, "cpu_percent": 3.0},
        "outbox": {"pending": 0, "dropped": 0, "quarantined": 0, "superseded": 0},
    }
    return Incoming(
        device_id=dev,
        kind="telemetry",
        seq=seq,
        ts="2026-01-01T00:00:00.000000Z",
        received_at=t,
        payload=payload,
        release=release,
    )


def state(
    dev: str,
    seq: int | None,
    t: float,
    *,
    online: bool = True,
    release: int = 1,
    target: str = "ecu",
    tags: dict[str, str] | None = None,
    health: str = "ok",
) -> Incoming:
    payload = {
        "schema": 1,
        "device_id": dev,
        "ts": None,
        "seq": seq,
        "online": online,
        "agent_version": "0.9",
        "target": target,
        "runtime": "onnxruntime",
        "bundle": {
            "name": "vib",
            "version": f"1.{release}.0",
            "release": release,
            "sha256": SHA,
            "slot": "a",
            "expires": "2027-01-01T00:00:00Z",
            "expired": False,
        },
        "health": health,
        "last_error": None,
        "ota": {"deploy_id": "dep-1", "release": release, "phase": "committed", "blocks_received": 3, "blocks_total": 3},
        "tags": tags or {},
    }
    return Incoming(device_id=dev, kind="state", seq=seq, ts=None, received_at=t, payload=payload, release=release)


def event(dev: str, seq: int, t: float, type_: str, **detail: Any) -> Incoming:
    payload = {"schema": 1, "device_id": dev, "ts": None, "seq": seq, "type": type_, "detail": detail}
    return Incoming(device_id=dev, kind="event", seq=seq, ts=None, received_at=t, payload=payload, release=detail.get("release"))


# -- databases ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


class PgServer:
    """A throwaway PostgreSQL cluster on a loopback port (trust auth, fsync off)."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        # Not under pytest's tmp_path: its 0700 parents are closed to the postgres user.
        self.root = Path(tempfile.mkdtemp(prefix="edgeops-pg-"))
        self.port = _free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            self.as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.root, "postgres", "postgres")
        self.data = self.root / "data"
        self.sock = self.root / "sock"
        self._run("mkdir", str(self.sock))
        self._run(str(bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        self._n = 0
        self.start()

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=60"
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"), "-w", "-o", opts, "start")

    def halt(self) -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def _run(self, *argv: str) -> None:
        done = subprocess.run([*self.as_user, *argv], capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {done.stderr.strip() or done.stdout.strip()}")

    def url(self, db: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{db}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres", autocommit=True) as conn:
            conn.execute(sql)

    def create_db(self) -> str:
        self._n += 1
        name = f"t{self._n}"
        self._admin(f"CREATE DATABASE {name}")
        return name

    def drop_db(self, name: str) -> None:
        self._admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin (scripts/setup.sh --dev installs them)")
    server = PgServer(bindir)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database of each kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'nested' / 'console.sqlite'}"
        return
    server: PgServer = request.getfixturevalue("pg_server")
    name = server.create_db()
    try:
        yield server.url(name)
    finally:
        server.drop_db(name)


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = Store.open(db_url, retry_s=2.0)
    try:
        yield s
    finally:
        s.close()


def _tables(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return set(sa.inspect(conn).get_table_names())
    finally:
        engine.dispose()


# -- ingest -------------------------------------------------------------------------------


def test_open_creates_folder_schema_and_wal(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "console.sqlite"
    with Store.open(f"sqlite:///{path}") as s:
        assert s.schema_version() == Store.SCHEMA_VERSION == 3
    assert path.exists()
    con = sqlite3.connect(path)
    try:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        con.close()


def test_dedupe_and_gap_opened_by_a_jump(store: Store) -> None:
    r = store.ingest([tel("d1", 1, 1.0), tel("d1", 2, 2.0), tel("d1", 2, 2.5), tel("d1", 6, 3.0), tel("d2", 4, 3.0)])
    assert (r.stored, r.duplicates, r.gaps_opened) == (4, 1, 1)
    assert store.gaps("d1") == [(3, 5)]
    assert store.gaps("d2") == []  # the first seq seen sets the start: nothing before it is a gap
    # the same batch again (a redelivery after a console crash) stores nothing
    r = store.ingest([tel("d1", 1, 1.0), tel("d1", 2, 2.0), tel("d1", 6, 3.0)])
    assert (r.stored, r.duplicates, r.gaps_opened) == (0, 3, 0)
    assert [m["seq"] for m in store.history("d1")] == [1, 2, 6]
    # a message without seq is never a duplicate
    assert store.ingest([state("d1", None, 4.0, online=False)] * 2).stored == 2
    assert store.stats() == {"devices": 2, "messages": 6, "duplicates": 4, "rejects": 0, "gaps": 1, "missing": 3}


def test_late_arrivals_fill_and_split_gaps(store: Store) -> None:
    store.ingest([tel("d", 1, 1.0), tel("d", 10, 2.0)])
    assert store.gaps("d") == [(2, 9)]
    # out of order, several in one batch: the middle splits, the edges shrink
    r = store.ingest([tel("d", 5, 3.0), tel("d", 2, 3.1), tel("d", 9, 3.2), tel("d", 5, 3.3)])
    assert (r.stored, r.duplicates, r.gaps_opened) == (3, 1, 0)
    assert store.gaps("d") == [(3, 4), (6, 8)]
    store.ingest([tel("d", s, 4.0 + s) for s in (8, 3, 7, 4, 6)])
    assert store.gaps("d") == []
    assert sorted(m["seq"] for m in store.history("d")) == list(range(1, 11))
    # a seq below the first one seen opens the gap in between, filled later
    r = store.ingest([tel("d", 12, 5.0), tel("e", 50, 5.0), tel("e", 47, 5.1)])
    assert r.gaps_opened == 2
    assert store.gaps("d") == [(11, 11)] and store.gaps("e") == [(48, 49)]
    store.ingest([tel("e", 48, 6.0), tel("e", 49, 6.0), tel("d", 11, 6.0)])
    assert store.gaps("e") == [] and store.gaps("d") == []
    assert store.stats()["gaps"] == 0


def test_older_state_never_overwrites_newer(store: Store) -> None:
    store.ingest([state("d", 5, 1.0, release=2, health="ok")])
    store.ingest([state("d", 3, 2.0, release=1, health="degraded"), tel("d", 4, 2.1)])
    dev = store.device("d")
    assert dev is not None
    assert (dev["release"], dev["health"], dev["state_seq"], dev["last_seen"]) == (2, "ok", 5, 2.1)
    assert [m["seq"] for m in store.history("d", kinds=["state"])] == [5, 3]  # both kept, in arrival order
    # the Last Will (no seq) only turns the device offline
    store.ingest([state("d", None, 3.0, online=False, release=1, health="failed")])
    dev = store.device("d")
    assert dev is not None and (dev["online"], dev["release"], dev["health"], dev["state_seq"]) == (False, 2, "ok", 5)
    store.ingest([state("d", 7, 4.0, release=3)])
    dev = store.device("d")
    assert dev is not None
    assert (dev["online"], dev["release"], dev["version"], dev["sha256"], dev["slot"]) == (True, 3, "1.3.0", SHA, "a")
    assert (dev["ota_phase"], dev["ota_deploy_id"], dev["ota_release"], dev["agent_version"]) == ("committed", "dep-1", 3, "0.9")


def test_telemetry_creates_unknown_device_and_keeps_latest(store: Store) -> None:
    store.ingest([tel("new", 3, 1.0, p99=9.0), tel("new", 2, 2.0, p99=1.0)])
    dev = store.device("new")
    assert dev is not None
    assert dev["online"] is None and dev["target"] is None and dev["tags"] == {}
    assert dev["last_telemetry"]["latency_ms"]["p99"] == 9.0  # the newest by seq, not by arrival
    assert (dev["first_seen"], dev["last_seen"]) == (1.0, 2.0)
    assert store.device("nobody") is None


def test_device_filter_by_target_and_tags(store: Store) -> None:
    store.ingest(
        [
            state("a", 1, 1.0, target="ecu", tags={"site": "north", "line": "1"}),
            state("b", 1, 1.0, target="ecu", tags={"site": "south"}),
            state("c", 1, 1.0, target="wearable", tags={"site": "north"}),
            tel("d", 1, 1.0),
        ]
    )
    assert [d["device_id"] for d in store.devices()] == ["a", "b", "c", "d"]
    assert [d["device_id"] for d in store.devices(target="ecu")] == ["a", "b"]
    assert [d["device_id"] for d in store.devices(tags={"site": "north"})] == ["a", "c"]
    assert [d["device_id"] for d in store.devices(target="ecu", tags={"site": "north", "line": "1"})] == ["a"]
    assert store.devices(target="ecu", tags={"site": "east"}) == []
    assert store.devices()[0]["tags"] == {"line": "1", "site": "north"}


def test_history_since_kinds_limit(store: Store) -> None:
    store.ingest(
        [tel("d", s, float(s)) for s in range(1, 11)]
        + [event("d", 11, 11.0, "drift_alarm", release=1), state("d", 12, 12.0), tel("x", 1, 5.0)]
    )
    rows = store.history("d")
    assert [r["seq"] for r in rows] == list(range(1, 13))
    assert set(rows[0]) == {"device_id", "seq", "kind", "ts", "received_at", "release", "payload"}
    assert rows[0]["payload"]["latency_ms"]["p99"] == 3.0 and rows[0]["release"] == 1
    assert [r["seq"] for r in store.history("d", since=9.0)] == [9, 10, 11, 12]
    assert [r["seq"] for r in store.history("d", kinds=["event", "state"])] == [11, 12]
    assert [r["seq"] for r in store.history("d", limit=3)] == [10, 11, 12]  # the newest, ascending
    assert [r["seq"] for r in store.history("d", since=2.0, kinds=["telemetry"], limit=2)] == [9, 10]
    assert store.history("nobody") == []
    with pytest.raises(StoreError, match="history kinds"):
        store.history("d", kinds=["bogus"])
    with pytest.raises(StoreError, match="limit"):
        store.history("d", limit=0)


def test_telemetry_and_events_queries(store: Store) -> None:
    store.ingest(
        [
            tel("a", 1, 10.0, release=1),
            tel("a", 2, 20.0, release=2),
            tel("b", 1, 21.0, release=2),
            tel("c", 1, 22.0, release=2),
            event("a", 3, 23.0, "ota_committed", deploy_id="x", release=2),
            event("b", 2, 24.0, "drift_alarm"),
        ]
    )
    rows = store.telemetry(["a", "b"], since=15.0)
    assert [(r["device_id"], r["seq"]) for r in rows] == [("a", 2), ("b", 1)]
    assert [r["device_id"] for r in store.telemetry(["a", "b", "c"], since=0, until=21.0)] == ["a", "a"]
    assert [r["seq"] for r in store.telemetry(["a"], since=0, release=1)] == [1]
    assert store.telemetry([], since=0) == []
    assert [r["payload"]["type"] for r in store.events(["a", "b"], since=0)] == ["ota_committed", "drift_alarm"]
    assert [r["device_id"] for r in store.events(["a", "b"], since=0, types=["drift_alarm"])] == ["b"]
    assert store.events(["a"], since=23.5) == []


def test_rejects(store: Store) -> None:
    store.reject(
        topic="edgeops/v1/d/telemetry", reason="telemetry.seq: expected >= 1", payload=b"{bad\xff", received_at=1.0, device_id="d"
    )
    store.reject(topic="junk", reason="unknown topic", payload=b"x" * 70000, received_at=2.0, device_id=None)
    rows = store.rejects()
    assert [r["topic"] for r in rows] == ["junk", "edgeops/v1/d/telemetry"]
    assert rows[0]["size"] == 70000 and len(rows[0]["payload"]) == 65536
    assert rows[1]["payload"] == "{bad\ufffd" and rows[1]["device_id"] == "d"
    assert len(store.rejects(limit=1)) == 1
    assert store.stats()["rejects"] == 2


def test_incoming_is_validated() -> None:
    with pytest.raises(StoreError, match=r"incoming\.kind"):
        Incoming(device_id="d", kind="samples", seq=1, ts=None, received_at=1.0, payload={})
    with pytest.raises(StoreError, match=r"incoming\.seq"):
        Incoming(device_id="d", kind="event", seq=0, ts=None, received_at=1.0, payload={})
    with pytest.raises(StoreError, match="received_at"):
        Incoming(device_id="d", kind="event", seq=1, ts=None, received_at=float("nan"), payload={})
    assert issubclass(StoreError, FleetError)


# -- releases and rollouts ----------------------------------------------------------------


def test_releases(store: Store) -> None:
    store.put_release(name="vib", target="ecu", release=3, version="1.3.0", sha256=SHA, bundle_path="/b/x.edgeops")
    store.put_release(name="vib", target="ecu", release=3, version="1.3.0", sha256=SHA, bundle_path="/b/y.edgeops")
    rows = store.releases()
    assert len(rows) == 1 and rows[0]["bundle_path"] == "/b/y.edgeops" and rows[0]["version"] == "1.3.0"
    assert store.known_release("vib", 3)
    assert not store.known_release("vib", 4)
    assert not store.known_release("other", 3)


def test_rollout_rows_round_trip(store: Store) -> None:
    rollout = {
        "rollout_id": "r-1",
        "state": "running",
        "name": "vib",
        "version": "1.3.0",
        "release": 3,
        "target": "ecu",
        "sha256": SHA,
        "bundle_path": "/bundles/ab.edgeops",
        "group": {"target": "ecu", "tags": {"site": "north"}},
        "group_key": "target=ecu,site=north",
        "waves": ["1", "10%", "50%", "100%"],
        "soak_s": 90.0,
        "gates": {"error_rate_max": 0.01, "latency_p99_ms": None, "psi_max": 0.25},
        "deadline_at": 1000.5,
        "current_wave": 0,
        "created_at": 10.0,
        "updated_at": 10.0,
        "message": None,
        "detail": {"notes": ["a", 1, True, None]},
    }
    store.put_rollout(rollout)
    assert store.rollout("r-1") == rollout
    store.put_rollout({"rollout_id": "r-1", "state": "paused", "updated_at": 11.0})  # only those columns change
    assert store.rollout("r-1") == {**rollout, "state": "paused", "updated_at": 11.0}
    store.put_rollout({**rollout, "rollout_id": "r-2", "state": "failed", "created_at": 20.0})
    assert [r["rollout_id"] for r in store.rollouts()] == ["r-2", "r-1"]
    assert [r["rollout_id"] for r in store.rollouts(states=["paused", "running"])] == ["r-1"]
    assert store.rollout("nope") is None

    wave = {
        "rollout_id": "r-1",
        "index": 0,
        "state": "soaking",
        "devices": ["a", "b"],
        "started_at": 11.0,
        "soak_until": 101.0,
        "ended_at": None,
        "gate": {"error_rate": {"value": 0.0, "limit": 0.01, "passed": True, "detail": None}},
        "passed": None,
    }
    store.put_wave(wave)
    store.put_wave({**wave, "index": 1, "state": "pending", "devices": [], "gate": None})
    store.put_wave({"rollout_id": "r-1", "index": 0, "state": "passed", "passed": True, "ended_at": 102.0})
    waves = store.waves("r-1")
    assert waves[0] == {**wave, "state": "passed", "passed": True, "ended_at": 102.0}
    assert waves[1]["passed"] is None and waves[1]["devices"] == []

    dev = {
        "rollout_id": "r-1",
        "device_id": "a",
        "wave": 0,
        "deploy_id": "r-1-w0",
        "status": "offered",
        "previous_release": 2,
        "offered_at": 11.0,
        "ended_at": None,
        "reason": None,
        "message": None,
    }
    store.put_rollout_device(dev)
    store.put_rollout_device({**dev, "device_id": "c", "wave": 1, "status": "pending", "previous_release": None})
    store.put_rollout_device({"rollout_id": "r-1", "device_id": "a", "status": "held"})
    assert store.rollout_devices("r-1") == [
        {**dev, "status": "held"},
        {**dev, "device_id": "c", "wave": 1, "status": "pending", "previous_release": None},
    ]
    assert store.rollout_devices("r-2") == []

    with pytest.raises(StoreError, match=r"missing keys \['rollout_id'\], unknown fields \['colour'\]"):
        store.put_rollout({"state": "running", "colour": "red"})
    with pytest.raises(StoreError, match="missing keys"):
        store.put_wave({"rollout_id": "r-1", "state": "x"})


def test_transaction_is_all_or_nothing(store: Store) -> None:
    with store.transaction():
        store.put_rollout({"rollout_id": "r", "state": "running", "created_at": 1.0})
        store.put_wave({"rollout_id": "r", "index": 0, "state": "offering"})
        with store.transaction():  # nested: joins
            store.put_rollout_device({"rollout_id": "r", "device_id": "a", "status": "offered"})
        assert store.rollout("r") is not None  # reads inside see the block's writes
    assert len(store.waves("r")) == 1 and len(store.rollout_devices("r")) == 1

    def crash() -> None:
        with store.transaction():
            store.put_rollout({"rollout_id": "r", "state": "failed"})
            store.put_wave({"rollout_id": "r", "index": 1, "state": "offering"})
            raise RuntimeError("engine crashed")

    def refused() -> None:
        with store.transaction():
            store.put_rollout({"rollout_id": "r", "state": "aborted"})
            store.put_wave({"rollout_id": "r", "index": 2})  # state is required: the database refuses

    with pytest.raises(RuntimeError, match="engine crashed"):
        crash()
    assert store.rollout("r")["state"] == "running"  # type: ignore[index]
    assert len(store.waves("r")) == 1

    with pytest.raises(StoreError, match="database error"):
        refused()
    assert store.rollout("r")["state"] == "running"  # type: ignore[index]


def test_mark_bad(store: Store) -> None:
    store.mark_bad(group="target=ecu", name="vib", release=3, rollout_id="r-1", reason="latency p99 12.0 > 5.0")
    store.mark_bad(group="target=ecu,site=a", name="vib", release=3, rollout_id="r-2", reason="error rate")
    store.mark_bad(group="target=ecu", name="vib", release=3, rollout_id="r-3", reason="again")  # upsert
    rows = store.bad_releases(group="target=ecu")
    assert len(rows) == 1
    assert {k: rows[0][k] for k in ("group_key", "name", "release", "rollout_id", "reason")} == {
        "group_key": "target=ecu",
        "name": "vib",
        "release": 3,
        "rollout_id": "r-3",
        "reason": "again",
    }
    assert isinstance(rows[0]["marked_at"], float)
    assert len(store.bad_releases()) == 2
    assert store.bad_releases(group="target=wearable") == []


# -- migrations ---------------------------------------------------------------------------


class _V1Store(Store):
    _migrations = _MIGRATIONS[:1]


def test_migration_upgrades_a_version_1_database(db_url: str) -> None:
    with _V1Store.open(db_url) as old:
        assert old.schema_version() == 1
        old.ingest([tel("d", 1, 1.0), tel("d", 3, 2.0)])
    assert "rollouts" not in _tables(db_url)
    with Store.open(db_url) as s:
        assert s.schema_version() == 3
        assert {"field_uploads", "field_datasets", "autopilot", "autopilot_runs"} <= set(_tables(db_url))
        assert s.gaps("d") == [(2, 2)] and len(s.history("d")) == 2
        s.put_rollout({"rollout_id": "r", "state": "running"})
        assert s.rollout("r") is not None
    with Store.open(db_url) as s:  # reopening at the current version changes nothing
        assert s.schema_version() == 3 and s.rollout("r") is not None


def test_newer_database_is_refused(db_url: str) -> None:
    class Future(Store):
        _migrations = (*_MIGRATIONS, *(_Migration(v, f"future {v}", lambda conn: None) for v in (4, 5)))

    with Future.open(db_url) as f:
        assert f.schema_version() == 5
    with pytest.raises(StoreError) as info:
        Store.open(db_url)
    assert str(info.value) == "database schema 5 is newer than this console (3); upgrade edgeops"


def test_failing_migration_leaves_the_old_version(db_url: str) -> None:
    def broken(conn: sa.Connection) -> None:
        conn.execute(sa.text("CREATE TABLE half_done (x INTEGER)"))
        conn.execute(
            sa.text(
                "INSERT INTO devices (device_id, tags, first_seen, last_seen, stored, duplicates) VALUES ('z', '{}', 0, 0, 0, 0)"
            )
        )
        raise RuntimeError("disk on fire")

    class Broken(Store):
        _migrations = (*_MIGRATIONS, _Migration(4, "half done", broken))

    with Store.open(db_url) as s:
        s.ingest([tel("d", 1, 1.0)])
    with pytest.raises(StoreError) as info:
        Broken.open(db_url)
    assert str(info.value) == "migration 4 (half done) failed: disk on fire; the database stays at schema 3"
    assert "half_done" not in _tables(db_url)
    with Store.open(db_url) as s:
        assert s.schema_version() == 3
        assert s.device("z") is None and s.device("d") is not None


# -- locks, outages, lifecycle ------------------------------------------------------------


def _ingest_in_transaction(s: Store) -> None:
    with s.transaction():
        s.ingest([tel("d", 2, 1.0)])


@contextlib.contextmanager
def _hold_lock(db_url: str) -> Iterator[Any]:
    """Another connection holding a lock that blocks every writer of ``messages``."""
    url = sa.make_url(db_url)
    if url.get_backend_name() == "sqlite":
        lite = sqlite3.connect(str(url.database), isolation_level=None, check_same_thread=False)
        try:
            lite.execute("BEGIN EXCLUSIVE")
            yield lite
        finally:
            if lite.in_transaction:
                lite.execute("ROLLBACK")
            lite.close()
    else:
        import psycopg

        with psycopg.connect(host=url.host, port=url.port, user=url.username, dbname=url.database) as con:
            con.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
            yield con
            with contextlib.suppress(psycopg.Error):
                con.rollback()


def test_locked_database_retries_then_fails_in_time(db_url: str) -> None:
    with Store.open(db_url, retry_s=1.0) as s, _hold_lock(db_url):
        t0 = time.monotonic()
        with pytest.raises(StoreError, match=r"is locked or unreachable; gave up after 1 s") as info:
            s.ingest([tel("d", 1, 1.0)])
        elapsed = time.monotonic() - t0
        assert 1.0 <= elapsed < 3.0, elapsed
        assert "\n" not in str(info.value) and "sqlalche.me" not in str(info.value)
        with pytest.raises(StoreError, match="lock"):
            _ingest_in_transaction(s)
    with Store.open(db_url) as s:
        assert s.history("d") == [] and s.stats()["messages"] == 0  # nothing half-stored


def test_lock_released_within_the_window_succeeds(db_url: str) -> None:
    with Store.open(db_url, retry_s=5.0) as s, _hold_lock(db_url) as con:
        timer = threading.Timer(0.6, con.rollback if not isinstance(con, sqlite3.Connection) else lambda: con.execute("ROLLBACK"))
        timer.start()
        try:
            t0 = time.monotonic()
            assert s.ingest([tel("d", 1, 1.0)]).stored == 1
            assert time.monotonic() - t0 >= 0.5
        finally:
            timer.join()
        assert len(s.history("d")) == 1


def test_unreachable_postgres_fails_in_time() -> None:
    port = _free_port()  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(StoreError, match=r"^database postgresql\+psycopg://u:\*\*\*@127\.0\.0\.1:\d+/x is locked or unreachable"):
        Store.open(f"postgresql://u:secret@127.0.0.1:{port}/x", retry_s=0.5)
    assert time.monotonic() - t0 < 3.0


def test_postgres_outage_is_ridden_out(pg_server: PgServer) -> None:
    name = pg_server.create_db()
    try:
        with Store.open(pg_server.url(name), retry_s=10.0) as s:
            s.ingest([tel("d", 1, 1.0)])
            pg_server.halt()
            restart = threading.Timer(0.8, pg_server.start)
            restart.start()
            try:
                t0 = time.monotonic()
                assert s.ingest([tel("d", 2, 2.0)]).stored == 1  # the pooled connection died: reconnects
                assert time.monotonic() - t0 >= 0.7
            finally:
                restart.join()
            assert [m["seq"] for m in s.history("d")] == [1, 2]
    finally:
        pg_server.drop_db(name)


def test_bad_urls() -> None:
    with pytest.raises(StoreError, match="expected sqlite:///PATH or postgresql"):
        Store.open("not a url")
    with pytest.raises(StoreError, match="expected sqlite:///PATH or postgresql"):
        Store.open("mysql://u@h/db")
    with pytest.raises(StoreError, match="retry_s"):
        Store.open("sqlite://", retry_s=-1)


def test_default_db_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("EDGEOPS_CONSOLE_DB", raising=False)
    monkeypatch.setenv("EDGEOPS_HOME", str(tmp_path))
    assert default_db_url() == f"sqlite:///{tmp_path}/console.sqlite"
    monkeypatch.setenv("EDGEOPS_CONSOLE_DB", "postgresql+psycopg://c@db/console")
    assert default_db_url() == "postgresql+psycopg://c@db/console"


def test_close_disposes_and_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    s = Store.open(f"sqlite:///{path}")
    s.ingest([tel("d", 1, 1.0)])
    s.devices()
    s.close()
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.devices()
    # no connection left open: the WAL is checkpointed and removed by the last close
    assert not (tmp_path / "c.sqlite-wal").exists()


def test_readers_run_while_ingesting(tmp_path: Path) -> None:
    with Store.open(f"sqlite:///{tmp_path / 'c.sqlite'}") as s:
        errors: list[BaseException] = []
        stop = threading.Event()

        def read() -> None:
            while not stop.is_set():
                try:
                    s.devices()
                    s.history("d0", limit=10)
                    s.stats()
                except BaseException as exc:  # noqa: BLE001  (reported below)
                    errors.append(exc)
                    return

        readers = [threading.Thread(target=read) for _ in range(2)]
        for t in readers:
            t.start()
        try:
            for b in range(20):
                s.ingest([tel(f"d{i % 5}", b * 20 + i // 5 + 1, float(b)) for i in range(100)])
        finally:
            stop.set()
            for t in readers:
                t.join()
        assert errors == []
        assert s.stats()["messages"] == 2000 and s.stats()["gaps"] == 0


def test_import_fleet_does_not_load_sqlalchemy() -> None:
    code = "import sys, edgeops_fleet; print('sqlalchemy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_ingest_rate(db_url: str) -> None:
    """10 000 telemetry messages from 50 devices in batches of 200 (printed with -s)."""
    with Store.open(db_url) as s:
        msgs = [tel(f"dev{i % 50:02d}", i // 50 + 1, 1000.0 + i / 100) for i in range(10_000)]
        t0 = time.perf_counter()
        for i in range(0, len(msgs), 200):
            s.ingest(msgs[i : i + 200])
        rate = len(msgs) / (time.perf_counter() - t0)
        print(f"\ningest {sa.make_url(db_url).get_backend_name()}: {rate:.0f} messages/s")
        assert s.stats()["messages"] == 10_000
        assert rate > 2000
