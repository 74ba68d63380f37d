"""The fleet console's store: fleet state, message history, rollouts, through SQLAlchemy Core.

One code path for SQLite (the embedded default, ``$EDGEOPS_HOME/console.sqlite``) and
PostgreSQL (``postgresql+psycopg://…``; a bare ``postgresql://`` means psycopg 3 too).

Tables: ``devices`` (latest state, plus per-device seq bookkeeping), ``messages`` (every
state, telemetry and event message kept, unique by ``(device_id, seq)``), ``gaps`` (seq
ranges not received), ``rejects`` (payloads the console refused), ``releases``,
``rollouts``, ``rollout_devices``, ``waves``, ``bad_releases``, ``field_uploads`` (device
sample uploads), ``field_datasets`` (content-addressed, with provenance and the ``.npz``
bytes), ``autopilot`` (per-group configuration), ``autopilot_runs`` and ``schema_meta``.

Invariants:

* **Seq bookkeeping.** Per device the stored seqs are exactly ``[min_seq, max_seq]`` minus
  the open ``gaps``. A seq above ``max_seq`` extends the range (a jump opens a gap), one
  below ``min_seq`` extends it downwards (the gap between opens likewise), one inside an
  open gap fills or splits it, and any other seq is a duplicate: dropped and counted,
  never stored twice. ``messages`` also has a unique constraint on ``(device_id, seq)``
  as a second line of defence. A message without seq is never a duplicate.
* **State never goes back.** A ``state`` with a seq not newer than the stored one is kept
  in the history but does not overwrite the device row. A state without seq (the Last Will,
  composed before it is published) only sets ``online`` once the device has a state.
* **One transaction** per :meth:`Store.ingest` batch, per ``put_*`` call (or per
  :meth:`Store.transaction` block) and per migration: a failure leaves nothing half-applied.
* **Bounded rejects.** At most :data:`MAX_REJECTS_KEPT` rejected payloads (the newest, each
  cut to 64 KiB) are kept, and a seq or release beyond 64 bits is refused by
  :class:`Incoming` rather than failing the batch it came in.
* **Migrations** are numbered; each runs in its own transaction with the version bump, so
  a failed one leaves the database at the previous version. A database newer than this
  code is refused.
* **Locked or unreachable** database: each operation is retried with backoff for up to
  ``retry_s`` seconds, then raises one :class:`StoreError` line. SQLite runs in WAL mode
  with a busy timeout, and write transactions start with ``BEGIN IMMEDIATE`` so a reader
  never has to upgrade its lock (which SQLite cannot wait for); PostgreSQL gets a
  ``lock_timeout`` so a lock held elsewhere ends in a retry rather than an endless wait.

JSON-valued columns (tags, payloads, rollout group/waves/gates/detail, wave devices/gate)
are stored as text and returned decoded; every read returns plain JSON-ready dicts.
SQLAlchemy is imported by this module only: ``import edgeops_fleet`` does not load it.
"""

from __future__ import annotations

import bisect
import functools
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Connection, Engine

from edgeops_fleet.errors import StoreError

__all__ = [
    "DEFAULT_DB_ENV",
    "KINDS",
    "MAX_DB_INT",
    "MAX_REJECTS_KEPT",
    "MAX_UPLOADS_PER_DEVICE",
    "Incoming",
    "IngestResult",
    "Store",
    "default_db_url",
]

log = logging.getLogger(__name__)

DEFAULT_DB_ENV = "EDGEOPS_CONSOLE_DB"
"""Environment variable naming the console's database URL."""

KINDS = ("state", "telemetry", "event")
"""The kinds of device message the store keeps."""

MAX_DB_INT = 2**63 - 1
"""The largest seq or release a column holds (SQL BIGINT, SQLite INTEGER): anything above is refused."""

MAX_REJECTS_KEPT = 10_000
"""Rejected payloads kept (the newest): a flood of garbage must not grow the database without bound."""

MAX_UPLOADS_PER_DEVICE = 20
"""Sample uploads kept per device (the newest)."""

_T = TypeVar("_T")


def default_db_url() -> str:
    """``$EDGEOPS_CONSOLE_DB``, else ``sqlite:///$EDGEOPS_HOME/console.sqlite`` (``~/.edgeops``)."""
    env = os.environ.get(DEFAULT_DB_ENV)
    if env:
        return env
    home = Path(os.environ.get("EDGEOPS_HOME") or Path.home() / ".edgeops")
    return f"sqlite:///{home.absolute() / 'console.sqlite'}"


@dataclass(frozen=True)
class Incoming:
    """One validated device message, as the console hands it to :meth:`Store.ingest`.

    Attributes:
        device_id: the device it came from.
        kind: one of :data:`KINDS`.
        seq: the agent's outbox sequence number (``None``: the Last Will, never a duplicate).
        ts: the device's UTC timestamp text, if any.
        received_at: when the console received it (epoch seconds, console clock).
        payload: the parsed, validated message's ``to_dict()``.
        release: telemetry ``model.release``, state ``bundle.release``, event ``detail.release``.
        payload_json: the payload's JSON text exactly as received, when the caller validated it
            (``payload`` parsed from it): stored as is instead of serialising ``payload`` again.
    """

    device_id: str
    kind: str
    seq: int | None
    ts: str | None
    received_at: float
    payload: Mapping[str, Any]
    release: int | None = None
    payload_json: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.device_id, str) or not self.device_id:
            raise StoreError(f"incoming.device_id: expected a non-empty string, got {self.device_id!r}")
        if self.kind not in KINDS:
            raise StoreError(f"incoming.kind: expected one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.seq is not None and (
            isinstance(self.seq, bool) or not isinstance(self.seq, int) or not 1 <= self.seq <= MAX_DB_INT
        ):
            raise StoreError(f"incoming.seq: expected an integer 1..2**63-1 or None, got {self.seq!r}")
        if isinstance(self.received_at, bool) or not isinstance(self.received_at, int | float):
            raise StoreError(f"incoming.received_at: expected epoch seconds, got {self.received_at!r}")
        if not math.isfinite(self.received_at):
            raise StoreError(f"incoming.received_at: expected a finite number, got {self.received_at!r}")
        if not isinstance(self.payload, Mapping):
            raise StoreError(f"incoming.payload: expected an object, got {type(self.payload).__name__}")
        if self.release is not None and (
            isinstance(self.release, bool) or not isinstance(self.release, int) or abs(self.release) > MAX_DB_INT
        ):
            raise StoreError(f"incoming.release: expected a 64-bit integer or None, got {self.release!r}")
        if self.payload_json is not None and not isinstance(self.payload_json, str):
            raise StoreError(f"incoming.payload_json: expected JSON text or None, got {type(self.payload_json).__name__}")


@dataclass(frozen=True)
class IngestResult:
    """What one :meth:`Store.ingest` batch did."""

    stored: int
    duplicates: int
    gaps_opened: int


# -- schema -----------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """JSON fallback: mappings (message payloads are frozen views) become dicts, sets lists."""
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


class _RawJson(str):
    """JSON text that was already validated: :class:`_Json` binds it as it is."""

    __slots__ = ()


class _Json(sa.types.TypeDecorator[Any]):
    """A JSON value stored as text (portable: no JSON operators are needed in SQL)."""

    impl = sa.Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> str | None:
        if value is None:
            return None
        if isinstance(value, _RawJson):  # ingest's hot path: no second serialisation
            return str(value)
        return json.dumps(value, separators=(",", ":"), sort_keys=True, allow_nan=False, default=_plain)

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> Any:
        return None if value is None else json.loads(value)


# SQLite autoincrements only an INTEGER PRIMARY KEY.
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

_meta = sa.MetaData()

_schema_meta = sa.Table(
    "schema_meta",
    _meta,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

_devices = sa.Table(
    "devices",
    _meta,
    sa.Column("device_id", sa.String(128), primary_key=True),
    sa.Column("online", sa.Boolean, nullable=True),
    sa.Column("target", sa.String(128)),
    sa.Column("tags", _Json, nullable=False),
    sa.Column("runtime", sa.String(64)),
    sa.Column("model", sa.String(256)),
    sa.Column("version", sa.String(128)),
    sa.Column("release", sa.Integer),
    sa.Column("sha256", sa.String(64)),
    sa.Column("slot", sa.String(8)),
    sa.Column("health", sa.String(64)),
    sa.Column("ota_phase", sa.String(32)),
    sa.Column("ota_deploy_id", sa.String(64)),
    sa.Column("ota_release", sa.Integer),
    sa.Column("last_error", sa.Text),
    sa.Column("agent_version", sa.String(64)),
    sa.Column("state_seq", sa.BigInteger),
    sa.Column("state_ts", sa.String(40)),
    sa.Column("telemetry_seq", sa.BigInteger),
    sa.Column("last_telemetry", _Json),
    sa.Column("first_seen", sa.Double, nullable=False),
    sa.Column("last_seen", sa.Double, nullable=False),
    # seq bookkeeping (module docstring): stored seqs = [min_seq, max_seq] minus gaps
    sa.Column("min_seq", sa.BigInteger),
    sa.Column("max_seq", sa.BigInteger),
    sa.Column("stored", sa.BigInteger, nullable=False),
    sa.Column("duplicates", sa.BigInteger, nullable=False),
)
sa.Index("ix_devices_target", _devices.c.target)

_messages = sa.Table(
    "messages",
    _meta,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("device_id", sa.String(128), nullable=False),
    sa.Column("seq", sa.BigInteger),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("event_type", sa.String(64)),
    sa.Column("ts", sa.String(40)),
    sa.Column("received_at", sa.Double, nullable=False),
    sa.Column("release", sa.Integer),
    sa.Column("payload", _Json, nullable=False),
    sa.UniqueConstraint("device_id", "seq", name="uq_messages_device_seq"),
)
sa.Index("ix_messages_device_kind_time", _messages.c.device_id, _messages.c.kind, _messages.c.received_at)
sa.Index("ix_messages_device_time", _messages.c.device_id, _messages.c.received_at)

_gaps = sa.Table(
    "gaps",
    _meta,
    sa.Column("device_id", sa.String(128), primary_key=True),
    sa.Column("first", sa.BigInteger, primary_key=True),
    sa.Column("last", sa.BigInteger, nullable=False),
)

_rejects = sa.Table(
    "rejects",
    _meta,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("topic", sa.Text, nullable=False),
    sa.Column("device_id", sa.String(128)),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("payload", sa.LargeBinary, nullable=False),
    sa.Column("size", sa.Integer, nullable=False),
    sa.Column("received_at", sa.Double, nullable=False),
)

_releases = sa.Table(
    "releases",
    _meta,
    sa.Column("name", sa.String(256), primary_key=True),
    sa.Column("target", sa.String(128), primary_key=True),
    sa.Column("release", sa.Integer, primary_key=True),
    sa.Column("version", sa.String(128), nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("bundle_path", sa.Text, nullable=False),
    sa.Column("registered_at", sa.Double, nullable=False),
)

_rollouts = sa.Table(
    "rollouts",
    _meta,
    sa.Column("rollout_id", sa.String(64), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("name", sa.String(256)),
    sa.Column("version", sa.String(128)),
    sa.Column("release", sa.Integer),
    sa.Column("target", sa.String(128)),
    sa.Column("sha256", sa.String(64)),
    sa.Column("bundle_path", sa.Text),
    sa.Column("group", _Json),
    sa.Column("group_key", sa.String(512)),
    sa.Column("waves", _Json),
    sa.Column("soak_s", sa.Double),
    sa.Column("gates", _Json),
    sa.Column("deadline_at", sa.Double),
    sa.Column("current_wave", sa.Integer),
    sa.Column("created_at", sa.Double),
    sa.Column("updated_at", sa.Double),
    sa.Column("message", sa.Text),
    sa.Column("detail", _Json),
)
sa.Index("ix_rollouts_state", _rollouts.c.state)

_rollout_devices = sa.Table(
    "rollout_devices",
    _meta,
    sa.Column("rollout_id", sa.String(64), primary_key=True),
    sa.Column("device_id", sa.String(128), primary_key=True),
    sa.Column("wave", sa.Integer),
    sa.Column("deploy_id", sa.String(64)),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("previous_release", sa.Integer),
    sa.Column("offered_at", sa.Double),
    sa.Column("ended_at", sa.Double),
    sa.Column("reason", sa.Text),
    sa.Column("message", sa.Text),
)

_waves = sa.Table(
    "waves",
    _meta,
    sa.Column("rollout_id", sa.String(64), primary_key=True),
    sa.Column("index", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("devices", _Json),
    sa.Column("started_at", sa.Double),
    sa.Column("soak_until", sa.Double),
    sa.Column("ended_at", sa.Double),
    sa.Column("gate", _Json),
    sa.Column("passed", sa.Boolean),
)

_bad_releases = sa.Table(
    "bad_releases",
    _meta,
    sa.Column("group_key", sa.String(512), primary_key=True),
    sa.Column("name", sa.String(256), primary_key=True),
    sa.Column("release", sa.Integer, primary_key=True),
    sa.Column("rollout_id", sa.String(64), nullable=False),
    sa.Column("marked_at", sa.Double, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
)


_field_uploads = sa.Table(
    "field_uploads",
    _meta,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("device_id", sa.String(128), nullable=False),
    sa.Column("command_id", sa.String(64)),
    sa.Column("ts", sa.String(40)),
    sa.Column("received_at", sa.Double, nullable=False),
    sa.Column("model", sa.String(256)),
    sa.Column("release", sa.Integer),
    sa.Column("rows", sa.Integer, nullable=False),
    sa.Column("labelled", sa.Integer, nullable=False),
    sa.Column("payload", _Json, nullable=False),
)
sa.Index("ix_field_uploads_received", _field_uploads.c.received_at)

_field_datasets = sa.Table(
    "field_datasets",
    _meta,
    sa.Column("digest", sa.String(80), primary_key=True),
    sa.Column("group_key", sa.String(512)),
    sa.Column("run_id", sa.String(64)),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("rows", sa.Integer, nullable=False),
    sa.Column("labelled", sa.Integer, nullable=False),
    sa.Column("provenance", _Json, nullable=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
)

_autopilot = sa.Table(
    "autopilot",
    _meta,
    sa.Column("group_key", sa.String(512), primary_key=True),
    sa.Column("config", _Json, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
)

_autopilot_runs = sa.Table(
    "autopilot_runs",
    _meta,
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("group_key", sa.String(512), nullable=False),
    sa.Column("group", _Json, nullable=False),
    sa.Column("mode", sa.String(16), nullable=False),
    sa.Column("trigger", sa.String(32), nullable=False),
    sa.Column("triggers", _Json, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
    sa.Column("ended_at", sa.Double),
    sa.Column("datasets", _Json),
    sa.Column("bundle_path", sa.Text),
    sa.Column("release", sa.Integer),
    sa.Column("rollout_id", sa.String(64)),
    sa.Column("metrics", _Json),
    sa.Column("decision", sa.String(32)),
    sa.Column("reason", sa.Text),
    sa.Column("steps", _Json),
)
sa.Index("ix_autopilot_runs_state", _autopilot_runs.c.state)


# -- migrations -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Migration:
    """Schema version ``version`` is reached by running ``apply`` on the previous one."""

    version: int
    description: str
    apply: Callable[[Connection], None]


# A migration creates tables from the definitions above as they stand when it is written.
# When a later migration alters one of those tables, first freeze the older definition into
# the earlier migration (its own MetaData), so replaying the list yields every version exactly.
def _create(*tables: sa.Table) -> Callable[[Connection], None]:
    def apply(conn: Connection) -> None:
        _meta.create_all(conn, tables=list(tables), checkfirst=False)

    return apply


_MIGRATIONS: tuple[_Migration, ...] = (
    _Migration(1, "devices, messages, gaps, rejects", _create(_devices, _messages, _gaps, _rejects)),
    _Migration(
        2,
        "releases, rollouts, rollout_devices, waves, bad_releases",
        _create(_releases, _rollouts, _rollout_devices, _waves, _bad_releases),
    ),
    _Migration(
        3,
        "field_uploads, field_datasets, autopilot, autopilot_runs",
        _create(_field_uploads, _field_datasets, _autopilot, _autopilot_runs),
    ),
)


def _read_version(conn: Connection) -> int:
    if not sa.inspect(conn).has_table("schema_meta"):
        return 0
    value = conn.execute(sa.select(_schema_meta.c.value).where(_schema_meta.c.key == "version")).scalar()
    try:
        return int(value) if value is not None else 0
    except ValueError:
        raise StoreError(f"schema_meta.version: expected an integer, found {value!r}") from None


# -- errors -----------------------------------------------------------------------------------

_SQLITE_BUSY = (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED (primary codes)


def _transient(exc: BaseException) -> bool:
    """Whether waiting may help: a lock held elsewhere, a server not (yet) reachable."""
    if isinstance(exc, sa_exc.TimeoutError):  # the pool had no free connection in time
        return True
    if not isinstance(exc, sa_exc.DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    orig = exc.orig
    code = getattr(orig, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) in _SQLITE_BUSY
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate:
        # connection exception, transaction rollback (serialization, deadlock), insufficient
        # resources, operator intervention (shutdown, starting up), lock not available
        return sqlstate[:2] in ("08", "40", "53", "57") or sqlstate == "55P03"
    if isinstance(exc, sa_exc.OperationalError):
        text = str(orig).lower()
        if "locked" in text or "busy" in text:
            return True
        # psycopg reports a failed connection without a sqlstate; a wrong password or a
        # missing database will not fix itself, so those fail at once.
        return "connect" in text and not any(w in text for w in ("password", "authentication", "does not exist", "role"))
    return False


def _overflow(exc: OverflowError) -> str:
    return f"a number is beyond the database's 64-bit integers ({exc})"


def _describe(exc: BaseException) -> str:
    """One line from a driver error, without SQLAlchemy's statement dump and help link."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
    return line[:300]


# -- the store --------------------------------------------------------------------------------


@dataclass
class _Book:
    """One device's row (as loaded) and its seq bookkeeping, changed in memory by a batch."""

    row: dict[str, Any]
    gaps: list[tuple[int, int]]
    new: bool = False
    gaps_changed: bool = False

    def admit(self, seq: int) -> tuple[bool, int]:
        """``(is_new, gaps_opened)`` for ``seq``; updates the bookkeeping when new."""
        lo, hi = self.row["min_seq"], self.row["max_seq"]
        if lo is None or hi is None:
            self.row["min_seq"] = self.row["max_seq"] = seq
            return True, 0
        if seq > hi:
            self.row["max_seq"] = seq
            if seq > hi + 1:
                self.gaps.append((hi + 1, seq - 1))
                self.gaps_changed = True
                return True, 1
            return True, 0
        if seq < lo:
            self.row["min_seq"] = seq
            if seq < lo - 1:
                self.gaps.insert(0, (seq + 1, lo - 1))
                self.gaps_changed = True
                return True, 1
            return True, 0
        i = bisect.bisect_right(self.gaps, (seq, math.inf)) - 1
        if i < 0 or not (self.gaps[i][0] <= seq <= self.gaps[i][1]):
            return False, 0
        first, last = self.gaps.pop(i)
        pieces = [(a, b) for a, b in ((first, seq - 1), (seq + 1, last)) if a <= b]
        self.gaps[i:i] = pieces
        self.gaps_changed = True
        return True, 0


_STATE_FIELDS = (
    "online",
    "target",
    "tags",
    "runtime",
    "model",
    "version",
    "release",
    "sha256",
    "slot",
    "health",
    "ota_phase",
    "ota_deploy_id",
    "ota_release",
    "last_error",
    "agent_version",
    "state_seq",
    "state_ts",
)
_BOOK_FIELDS = ("telemetry_seq", "last_telemetry", "last_seen", "min_seq", "max_seq", "stored", "duplicates")
_MUTABLE = (*_STATE_FIELDS, *_BOOK_FIELDS)
# Bookkeeping stays internal; every other device column is part of the public row.
_DEVICE_PUBLIC = tuple(c.name for c in _devices.c if c.name not in ("telemetry_seq", "min_seq"))


def _state_fields(msg: Incoming) -> dict[str, Any]:
    p = msg.payload
    bundle = p.get("bundle") or {}
    ota = p.get("ota") or {}
    return {
        "online": p.get("online"),
        "target": p.get("target"),
        "tags": dict(p.get("tags") or {}),
        "runtime": p.get("runtime"),
        "model": bundle.get("name"),
        "version": bundle.get("version"),
        "release": bundle.get("release"),
        "sha256": bundle.get("sha256"),
        "slot": bundle.get("slot"),
        "health": p.get("health"),
        "ota_phase": ota.get("phase"),
        "ota_deploy_id": ota.get("deploy_id"),
        "ota_release": ota.get("release"),
        "last_error": p.get("last_error"),
        "agent_version": p.get("agent_version"),
        "state_seq": msg.seq,
        "state_ts": msg.ts,
    }


def _blank_device(device_id: str, received_at: float) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(_devices.c.keys())
    row.update(device_id=device_id, tags={}, first_seen=received_at, last_seen=received_at, stored=0, duplicates=0)
    return row


def _chunks(items: Sequence[_T], size: int = 500) -> Iterator[Sequence[_T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


_REJECT_KEEP = 65536  # bytes of a rejected payload kept for inspection


class Store:
    """The console's database (see the module docstring for the invariants).

    Open it with :meth:`open`; every method may be called from any thread. :meth:`ingest` is
    meant for one writer thread; readers run concurrently (SQLite WAL, PostgreSQL MVCC).
    Every failure surfaces as :class:`StoreError` with one line.
    """

    SCHEMA_VERSION: ClassVar[int] = _MIGRATIONS[-1].version
    _migrations: ClassVar[tuple[_Migration, ...]] = _MIGRATIONS

    def __init__(self, engine: Engine, *, url: str, retry_s: float) -> None:
        """Use :meth:`open`; this wraps an engine that is already configured."""
        self._engine: Engine | None = engine
        self._url = url
        self._retry_s = retry_s
        self._local = threading.local()
        self._lock = threading.Lock()

    # -- lifecycle ----------------------------------------------------------------------------

    @classmethod
    def open(cls, url: str, *, retry_s: float = 10.0) -> Store:
        """Connect to ``url``, create or migrate the schema, and return the store.

        Args:
            url: ``sqlite:///path`` (the folder is created) or ``postgresql+psycopg://…``.
            retry_s: how long to retry while the database is locked or unreachable.

        Raises:
            StoreError: a bad URL, an unreachable or locked database (after ``retry_s``), a
                schema newer than this code, or a migration that failed (the database stays
                at the version before it).
        """
        if isinstance(retry_s, bool) or not isinstance(retry_s, int | float) or not (0 <= retry_s < math.inf):
            raise StoreError(f"retry_s: expected a finite number of seconds >= 0, got {retry_s!r}")
        engine, shown = _engine(url, retry_s=float(retry_s))
        store = cls(engine, url=shown, retry_s=float(retry_s))
        try:
            store._migrate()
        except BaseException:
            store.close()
            raise
        return store

    def close(self) -> None:
        """Dispose of the engine and all its connections (idempotent)."""
        with self._lock:
            engine, self._engine = self._engine, None
        if engine is not None:
            engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        """The database URL, password hidden."""
        return self._url

    def schema_version(self) -> int:
        """The schema version the database is at."""
        return self._run(_read_version, write=False)

    def _migrate(self) -> None:
        target = self._migrations[-1].version
        current = self._run(_read_version, write=False)
        if current > target:
            raise StoreError(f"database schema {current} is newer than this console ({target}); upgrade edgeops")
        for migration in self._migrations:
            if migration.version > current:
                self._run(functools.partial(self._apply, migration=migration), write=True)
                current = migration.version

    def _apply(self, conn: Connection, migration: _Migration) -> None:
        _schema_meta.create(conn, checkfirst=True)
        current = _read_version(conn)
        if current >= migration.version:  # another console got there first
            return
        try:
            migration.apply(conn)
        except sa_exc.SQLAlchemyError as exc:
            if _transient(exc):
                raise
            raise StoreError(
                f"migration {migration.version} ({migration.description}) failed: {_describe(exc)}; "
                f"the database stays at schema {current}"
            ) from exc
        except Exception as exc:
            raise StoreError(
                f"migration {migration.version} ({migration.description}) failed: {exc}; the database stays at schema {current}"
            ) from exc
        if current == 0:
            conn.execute(sa.insert(_schema_meta).values(key="version", value=str(migration.version)))
        else:
            conn.execute(sa.update(_schema_meta).where(_schema_meta.c.key == "version").values(value=str(migration.version)))
        log.info("database %s migrated to schema %d (%s)", self._url, migration.version, migration.description)

    # -- running statements -------------------------------------------------------------------

    def _live(self) -> Engine:
        engine = self._engine
        if engine is None:
            raise StoreError("the store is closed")
        return engine

    def _run(self, fn: Callable[[Connection], _T], *, write: bool) -> _T:
        """``fn(conn)`` in one transaction, retried while the database is locked or unreachable."""
        joined: Connection | None = getattr(self._local, "conn", None)
        if joined is not None:
            try:
                return fn(joined)
            except sa_exc.SQLAlchemyError as exc:
                raise StoreError(f"database error: {_describe(exc)}") from exc
            except OverflowError as exc:
                raise StoreError(f"database error: {_overflow(exc)}") from exc
        deadline = time.monotonic() + self._retry_s
        delay = 0.05
        while True:
            try:
                with self._live().connect() as conn:
                    if write:
                        conn.execution_options(edgeops_write=True)
                    with conn.begin():
                        return fn(conn)
            except OverflowError as exc:  # sqlite3 binds Python ints beyond 64 bits this way, unwrapped
                raise StoreError(f"database error: {_overflow(exc)}") from exc
            except sa_exc.SQLAlchemyError as exc:
                if not _transient(exc):
                    raise StoreError(f"database error: {_describe(exc)}") from exc
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StoreError(
                        f"database {self._url} is locked or unreachable; gave up after {self._retry_s:g} s: {_describe(exc)}"
                    ) from exc
                log.warning("database busy or unreachable (%s); retrying", _describe(exc))
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, 1.0)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        if getattr(self._local, "conn", None) is not None:
            yield  # nested: part of the enclosing transaction
            return

        deadline = time.monotonic() + self._retry_s
        delay = 0.05
        while True:
            conn = None
            try:
                conn = self._live().connect()
                conn.execution_options(edgeops_write=True)
                trans = conn.begin()
                break
            except sa_exc.SQLAlchemyError as exc:
                if conn is not None:
                    conn.close()
                if not _transient(exc):
                    raise StoreError(f"database error: {_describe(exc)}") from exc
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StoreError(
                        f"database {self._url} is locked or unreachable; gave up after {self._retry_s:g} s: {_describe(exc)}"
                    ) from exc
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, 1.0)
        self._local.conn = conn
        try:
            yield
            trans.commit()
        except sa_exc.SQLAlchemyError as exc:
            if trans.is_active:
                trans.rollback()
            raise StoreError(f"database error: {_describe(exc)}") from exc
        except BaseException:
            if trans.is_active:
                trans.rollback()
            raise
        finally:
            self._local.conn = None
            conn.close()

    def transaction(self) -> AbstractContextManager[None]:
        """A block in which several ``put_*`` calls (and reads) form one transaction.

        Nested blocks join the outer one. An exception inside rolls everything back.

        Raises:
            StoreError: the database stayed locked or unreachable for ``retry_s``, or the
                commit failed (nothing of the block is kept).
        """
        return self._transaction()

    def _upsert(self, table: sa.Table, keys: tuple[str, ...], row: Mapping[str, Any], what: str) -> None:
        columns = set(table.c.keys())
        unknown = sorted(set(row) - columns)
        missing = [k for k in keys if row.get(k) is None]
        if unknown or missing:
            raise StoreError(f"{what} row: missing keys {missing}, unknown fields {unknown}")
        values = dict(row)

        def put(conn: Connection) -> None:
            conn.execute(self._upsert_stmt(table, keys, values))

        self._run(put, write=True)

    def _dialect_insert(self, table: sa.Table) -> Any:
        if self._live().dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            return pg_insert(table)
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table)

    def _upsert_stmt(self, table: sa.Table, keys: tuple[str, ...], values: Mapping[str, Any]) -> Any:
        stmt = self._dialect_insert(table).values(dict(values))
        rest = {k: stmt.excluded[k] for k in values if k not in keys}
        if not rest:
            return stmt.on_conflict_do_nothing(index_elements=list(keys))
        return stmt.on_conflict_do_update(index_elements=list(keys), set_=rest)

    # -- ingest -------------------------------------------------------------------------------

    def ingest(self, batch: Sequence[Incoming]) -> IngestResult:
        """Store a batch of device messages in one transaction (see the module invariants).

        Raises:
            StoreError: the database stayed locked or unreachable for ``retry_s`` (nothing of
                the batch is stored), or refused the batch.
        """
        if not batch:
            return IngestResult(stored=0, duplicates=0, gaps_opened=0)
        for m in batch:
            if not isinstance(m, Incoming):
                raise StoreError(f"ingest: expected Incoming messages, got {type(m).__name__}")
        return self._run(lambda conn: self._ingest(conn, batch), write=True)

    def _ingest(self, conn: Connection, batch: Sequence[Incoming]) -> IngestResult:
        ids = sorted({m.device_id for m in batch})
        books: dict[str, _Book] = {}
        for chunk in _chunks(ids):
            for r in conn.execute(sa.select(_devices).where(_devices.c.device_id.in_(chunk))):
                books[r.device_id] = _Book(row=dict(r._mapping), gaps=[])
            gap_rows = conn.execute(
                sa.select(_gaps.c.device_id, _gaps.c.first, _gaps.c.last)
                .where(_gaps.c.device_id.in_(chunk))
                .order_by(_gaps.c.device_id, _gaps.c.first)
            )
            for device_id, first, last in gap_rows:
                books[device_id].gaps.append((first, last))
        rows: list[dict[str, Any]] = []
        duplicates = opened = 0
        for m in batch:
            book = books.get(m.device_id)
            if book is None:
                book = books[m.device_id] = _Book(row=_blank_device(m.device_id, m.received_at), gaps=[], new=True)
            row = book.row
            if m.seq is not None:
                fresh, gaps = book.admit(m.seq)
                opened += gaps
                if not fresh:
                    duplicates += 1
                    row["duplicates"] += 1
                    continue
            row["stored"] += 1
            row["last_seen"] = max(row["last_seen"], m.received_at)
            if m.kind == "state":
                self._apply_state(row, m)
            elif m.kind == "telemetry" and (m.seq is None or row["telemetry_seq"] is None or m.seq > row["telemetry_seq"]):
                row["telemetry_seq"] = m.seq if m.seq is not None else row["telemetry_seq"]
                row["last_telemetry"] = m.payload
            rows.append(
                {
                    "device_id": m.device_id,
                    "seq": m.seq,
                    "kind": m.kind,
                    "event_type": m.payload.get("type") if m.kind == "event" else None,
                    "ts": m.ts,
                    "received_at": m.received_at,
                    "release": m.release,
                    "payload": m.payload if m.payload_json is None else _RawJson(m.payload_json),
                }
            )
        if rows:
            # The bookkeeping already dropped duplicates; the constraint is the backstop.
            stmt = self._dialect_insert(_messages).on_conflict_do_nothing(index_elements=["device_id", "seq"])
            conn.execute(stmt, rows)
        self._write_books(conn, books)
        return IngestResult(stored=len(rows), duplicates=duplicates, gaps_opened=opened)

    @staticmethod
    def _apply_state(row: dict[str, Any], m: Incoming) -> None:
        stored = row["state_seq"]
        if m.seq is None:
            if row["health"] is None:  # no state yet: the Will is all we know
                row.update({**_state_fields(m), "state_seq": None})
            else:
                row["online"] = m.payload.get("online")
            return
        if stored is None or m.seq > stored:
            row.update(_state_fields(m))

    @staticmethod
    def _write_books(conn: Connection, books: Mapping[str, _Book]) -> None:
        new = [b.row for b in books.values() if b.new]
        old = [b.row for b in books.values() if not b.new]
        if new:
            conn.execute(sa.insert(_devices), new)
        if old:
            stmt = (
                sa.update(_devices)
                .where(_devices.c.device_id == sa.bindparam("b_device_id"))
                .values({c: sa.bindparam(f"b_{c}", type_=_devices.c[c].type) for c in _MUTABLE})
            )
            conn.execute(stmt, [{f"b_{k}": r[k] for k in ("device_id", *_MUTABLE)} for r in old])
        changed = [(d, b.gaps) for d, b in books.items() if b.gaps_changed]
        if changed:
            conn.execute(sa.delete(_gaps).where(_gaps.c.device_id.in_([d for d, _ in changed])))
            gap_rows = [{"device_id": d, "first": a, "last": z} for d, gaps in changed for a, z in gaps]
            if gap_rows:
                conn.execute(sa.insert(_gaps), gap_rows)

    def reject(self, *, topic: str, reason: str, payload: bytes, received_at: float, device_id: str | None) -> None:
        """Record a payload the console refused (kept up to 64 KiB, with its full size).

        Only the newest :data:`MAX_REJECTS_KEPT` rejects are kept: older ones are deleted in
        the same transaction, so a flood of garbage costs a bounded amount of disk.

        Raises:
            StoreError: the database stayed locked or unreachable for ``retry_s``.
        """
        data = bytes(payload)
        values = {
            "topic": str(topic),
            "device_id": device_id,
            "reason": str(reason),
            "payload": data[:_REJECT_KEEP],
            "size": len(data),
            "received_at": float(received_at),
        }

        def put(conn: Connection) -> None:
            key = conn.execute(sa.insert(_rejects).values(values)).inserted_primary_key
            if key is not None and key[0] is not None:
                # Ids only grow: everything MAX_REJECTS_KEPT behind the newest goes (one index range).
                conn.execute(sa.delete(_rejects).where(_rejects.c.id <= int(key[0]) - MAX_REJECTS_KEPT))

        self._run(put, write=True)

    # -- reads --------------------------------------------------------------------------------

    def devices(self, *, target: str | None = None, tags: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        """Every device (sorted by id), optionally only those of ``target`` carrying all ``tags``."""
        stmt = sa.select(*(_devices.c[c] for c in _DEVICE_PUBLIC)).order_by(_devices.c.device_id)
        if target is not None:
            stmt = stmt.where(_devices.c.target == target)
        rows = self._run(lambda conn: [dict(r._mapping) for r in conn.execute(stmt)], write=False)
        if tags:
            want = dict(tags)
            rows = [r for r in rows if all((r["tags"] or {}).get(k) == v for k, v in want.items())]
        return rows

    def device(self, device_id: str) -> dict[str, Any] | None:
        """One device's row, or ``None`` if the store never heard of it."""
        stmt = sa.select(*(_devices.c[c] for c in _DEVICE_PUBLIC)).where(_devices.c.device_id == device_id)

        def read(conn: Connection) -> dict[str, Any] | None:
            r = conn.execute(stmt).first()
            return None if r is None else dict(r._mapping)

        return self._run(read, write=False)

    _HISTORY = (
        _messages.c.device_id,
        _messages.c.seq,
        _messages.c.kind,
        _messages.c.ts,
        _messages.c.received_at,
        _messages.c.release,
        _messages.c.payload,
    )
    _ASC = (_messages.c.received_at.asc(), _messages.c.seq.asc().nulls_first(), _messages.c.id.asc())

    def _rows(self, stmt: sa.Select[Any]) -> list[dict[str, Any]]:
        return self._run(lambda conn: [dict(r._mapping) for r in conn.execute(stmt)], write=False)

    def history(
        self, device_id: str, *, since: float | None = None, kinds: Sequence[str] | None = None, limit: int = 1000
    ) -> list[dict[str, Any]]:
        """A device's messages, ascending by ``received_at`` then ``seq``.

        Args:
            device_id: the device.
            since: only messages received at or after this epoch time.
            kinds: only these kinds (of :data:`KINDS`).
            limit: at most this many: the newest ones, still returned in ascending order.

        Raises:
            StoreError: an unknown kind or a limit below 1.
        """
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise StoreError(f"history limit: expected an integer >= 1, got {limit!r}")
        stmt = sa.select(*self._HISTORY).where(_messages.c.device_id == device_id)
        if since is not None:
            stmt = stmt.where(_messages.c.received_at >= since)
        if kinds is not None:
            bad = sorted(set(kinds) - set(KINDS))
            if bad:
                raise StoreError(f"history kinds: expected some of {', '.join(KINDS)}, got {', '.join(bad)}")
            stmt = stmt.where(_messages.c.kind.in_(list(kinds)))
        stmt = stmt.order_by(_messages.c.received_at.desc(), _messages.c.seq.desc().nulls_last(), _messages.c.id.desc()).limit(
            limit
        )
        return self._rows(stmt)[::-1]

    def gaps(self, device_id: str) -> list[tuple[int, int]]:
        """The device's open seq gaps, ``(first, last)`` inclusive, ascending."""
        stmt = sa.select(_gaps.c.first, _gaps.c.last).where(_gaps.c.device_id == device_id).order_by(_gaps.c.first)
        return self._run(lambda conn: [(int(a), int(z)) for a, z in conn.execute(stmt)], write=False)

    def telemetry(
        self, device_ids: Sequence[str], *, since: float, until: float | None = None, release: int | None = None
    ) -> list[dict[str, Any]]:
        """Telemetry history rows of ``device_ids`` received in ``[since, until)``, optionally of one release."""
        ids = list(device_ids)
        if not ids:
            return []
        stmt = sa.select(*self._HISTORY).where(
            _messages.c.device_id.in_(ids), _messages.c.kind == "telemetry", _messages.c.received_at >= since
        )
        if until is not None:
            stmt = stmt.where(_messages.c.received_at < until)
        if release is not None:
            stmt = stmt.where(_messages.c.release == release)
        return self._rows(stmt.order_by(*self._ASC))

    def events(self, device_ids: Sequence[str], *, since: float, types: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Event history rows of ``device_ids`` received at or after ``since``, optionally of some types."""
        ids = list(device_ids)
        if not ids:
            return []
        stmt = sa.select(*self._HISTORY).where(
            _messages.c.device_id.in_(ids), _messages.c.kind == "event", _messages.c.received_at >= since
        )
        if types is not None:
            stmt = stmt.where(_messages.c.event_type.in_(list(types)))
        return self._rows(stmt.order_by(*self._ASC))

    def rejects(self, *, limit: int = 100) -> list[dict[str, Any]]:
        """The newest rejected payloads first (payload as text, undecodable bytes replaced)."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise StoreError(f"rejects limit: expected an integer >= 1, got {limit!r}")
        stmt = sa.select(_rejects).order_by(_rejects.c.received_at.desc(), _rejects.c.id.desc()).limit(limit)
        rows = self._rows(stmt)
        for r in rows:
            r["payload"] = bytes(r["payload"]).decode("utf-8", errors="replace")
            del r["id"]
        return rows

    def stats(self) -> dict[str, int]:
        """Counts: ``devices``, ``messages`` stored, ``duplicates`` dropped, ``rejects``, open ``gaps``
        and the seqs they leave ``missing``."""

        def read(conn: Connection) -> dict[str, int]:
            n, stored, dups = conn.execute(
                sa.select(sa.func.count(), sa.func.sum(_devices.c.stored), sa.func.sum(_devices.c.duplicates))
            ).one()
            gaps, missing = conn.execute(sa.select(sa.func.count(), sa.func.sum(_gaps.c.last - _gaps.c.first + 1))).one()
            rejects = conn.execute(sa.select(sa.func.count()).select_from(_rejects)).scalar_one()
            return {
                "devices": int(n),
                "messages": int(stored or 0),
                "duplicates": int(dups or 0),
                "rejects": int(rejects),
                "gaps": int(gaps),
                "missing": int(missing or 0),
            }

        return self._run(read, write=False)

    # -- releases -----------------------------------------------------------------------------

    def put_release(self, *, name: str, target: str, release: int, version: str, sha256: str, bundle_path: str) -> None:
        """Register a release the console knows (upsert by name, target, release)."""
        self._upsert(
            _releases,
            ("name", "target", "release"),
            {
                "name": name,
                "target": target,
                "release": release,
                "version": version,
                "sha256": sha256,
                "bundle_path": str(bundle_path),
                "registered_at": time.time(),
            },
            "release",
        )

    def releases(self) -> list[dict[str, Any]]:
        """Every known release, by name, target and release."""
        return self._rows(sa.select(_releases).order_by(_releases.c.name, _releases.c.target, _releases.c.release))

    def known_release(self, name: str, release: int) -> bool:
        """Whether release ``release`` of model ``name`` was registered (for any target)."""
        stmt = sa.select(sa.literal(1)).where(_releases.c.name == name, _releases.c.release == release).limit(1)
        return self._run(lambda conn: conn.execute(stmt).first() is not None, write=False)

    # -- rollouts -----------------------------------------------------------------------------

    def put_rollout(self, row: Mapping[str, Any]) -> None:
        """Insert or update a rollout by ``rollout_id`` (only the given columns change).

        Raises:
            StoreError: no ``rollout_id``, an unknown column, or the database refused the row.
        """
        self._upsert(_rollouts, ("rollout_id",), row, "rollout")

    def rollout(self, rollout_id: str) -> dict[str, Any] | None:
        """One rollout's row (JSON fields decoded), or ``None``."""
        rows = self._rows(sa.select(_rollouts).where(_rollouts.c.rollout_id == rollout_id))
        return rows[0] if rows else None

    def rollouts(self, *, states: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Rollouts, newest first, optionally only those in ``states``."""
        stmt = sa.select(_rollouts).order_by(_rollouts.c.created_at.desc().nulls_last(), _rollouts.c.rollout_id.desc())
        if states is not None:
            stmt = stmt.where(_rollouts.c.state.in_(list(states)))
        return self._rows(stmt)

    def put_rollout_device(self, row: Mapping[str, Any]) -> None:
        """Insert or update a rollout's device by ``(rollout_id, device_id)``.

        Raises:
            StoreError: a key is missing, an unknown column, or the database refused the row.
        """
        self._upsert(_rollout_devices, ("rollout_id", "device_id"), row, "rollout device")

    def rollout_devices(self, rollout_id: str) -> list[dict[str, Any]]:
        """A rollout's devices, by wave then device id."""
        stmt = (
            sa.select(_rollout_devices)
            .where(_rollout_devices.c.rollout_id == rollout_id)
            .order_by(_rollout_devices.c.wave, _rollout_devices.c.device_id)
        )
        return self._rows(stmt)

    def put_wave(self, row: Mapping[str, Any]) -> None:
        """Insert or update a rollout's wave by ``(rollout_id, index)``.

        Raises:
            StoreError: a key is missing, an unknown column, or the database refused the row.
        """
        self._upsert(_waves, ("rollout_id", "index"), row, "wave")

    def waves(self, rollout_id: str) -> list[dict[str, Any]]:
        """A rollout's waves, by index."""
        return self._rows(sa.select(_waves).where(_waves.c.rollout_id == rollout_id).order_by(_waves.c.index))

    def mark_bad(self, *, group: str, name: str, release: int, rollout_id: str, reason: str) -> None:
        """Mark release ``release`` of ``name`` bad for the group ``group`` (a group key)."""
        self._upsert(
            _bad_releases,
            ("group_key", "name", "release"),
            {
                "group_key": group,
                "name": name,
                "release": release,
                "rollout_id": rollout_id,
                "marked_at": time.time(),
                "reason": reason,
            },
            "bad release",
        )

    def bad_releases(self, *, group: str | None = None) -> list[dict[str, Any]]:
        """Releases marked bad, optionally for one group key, oldest mark first."""
        stmt = sa.select(_bad_releases).order_by(_bad_releases.c.marked_at, _bad_releases.c.name, _bad_releases.c.release)
        if group is not None:
            stmt = stmt.where(_bad_releases.c.group_key == group)
        return self._rows(stmt)

    # -- field samples and datasets -----------------------------------------------------------

    def put_upload(
        self,
        *,
        device_id: str,
        command_id: str | None,
        ts: str | None,
        received_at: float,
        model: str | None,
        release: int | None,
        rows: int,
        labelled: int,
        payload: Mapping[str, Any],
    ) -> int:
        """Keep one device's sample upload (the validated ``samples`` message); its id.

        Only the newest :data:`MAX_UPLOADS_PER_DEVICE` uploads of a device are kept (a field
        dataset keeps its own copy of the rows it was made from), and an upload answering a
        command id already kept for the device is the same upload delivered again: kept once.
        """
        stmt = sa.insert(_field_uploads).values(
            device_id=device_id,
            command_id=command_id,
            ts=ts,
            received_at=received_at,
            model=model,
            release=release,
            rows=rows,
            labelled=labelled,
            payload=payload,
        )

        def put(conn: Connection) -> int:
            if command_id is not None:  # a QoS 1 redelivery (a console restart before its ack): kept once
                same = sa.select(_field_uploads.c.id).where(
                    _field_uploads.c.device_id == device_id, _field_uploads.c.command_id == command_id
                )
                found = conn.execute(same).scalar()
                if found is not None:
                    return int(found)
            key = conn.execute(stmt).inserted_primary_key
            mine = _field_uploads.c.device_id == device_id
            newest = sa.select(_field_uploads.c.id).where(mine).order_by(_field_uploads.c.id.desc()).limit(MAX_UPLOADS_PER_DEVICE)
            conn.execute(sa.delete(_field_uploads).where(mine, _field_uploads.c.id.not_in(newest.scalar_subquery())))
            return int(key[0]) if key is not None else 0

        return self._run(put, write=True)

    def uploads(
        self, *, device_ids: Sequence[str] | None = None, since: float = 0.0, with_payload: bool = False
    ) -> list[dict[str, Any]]:
        """Sample uploads received at or after ``since`` (optionally of some devices), oldest first."""
        cols = list(_field_uploads.c) if with_payload else [c for c in _field_uploads.c if c.name != "payload"]
        stmt = sa.select(*cols).where(_field_uploads.c.received_at >= since)
        if device_ids is not None:
            ids = list(device_ids)
            if not ids:
                return []
            stmt = stmt.where(_field_uploads.c.device_id.in_(ids))
        return self._rows(stmt.order_by(_field_uploads.c.received_at, _field_uploads.c.id))

    def put_dataset(
        self,
        *,
        digest: str,
        group_key: str | None,
        run_id: str | None,
        rows: int,
        labelled: int,
        provenance: Mapping[str, Any],
        data: bytes,
    ) -> None:
        """Keep a field dataset by its content digest (a second put of the same digest changes nothing)."""
        row = {
            "digest": digest,
            "group_key": group_key,
            "run_id": run_id,
            "created_at": time.time(),
            "rows": rows,
            "labelled": labelled,
            "provenance": provenance,
            "data": data,
        }

        def put(conn: Connection) -> None:
            exists = conn.execute(sa.select(sa.literal(1)).where(_field_datasets.c.digest == digest)).first()
            if exists is None:
                conn.execute(sa.insert(_field_datasets).values(**row))

        self._run(put, write=True)

    def datasets(self) -> list[dict[str, Any]]:
        """Every field dataset's row without its bytes, newest first."""
        cols = [c for c in _field_datasets.c if c.name != "data"]
        return self._rows(sa.select(*cols).order_by(_field_datasets.c.created_at.desc(), _field_datasets.c.digest))

    def dataset(self, digest: str, *, with_data: bool = False) -> dict[str, Any] | None:
        """One field dataset by digest, or by a unique prefix of its hex part (``None`` if none or ambiguous)."""
        text = digest.removeprefix("sha256:")
        if not text or any(c not in "0123456789abcdef" for c in text):
            return None
        cols = list(_field_datasets.c) if with_data else [c for c in _field_datasets.c if c.name != "data"]
        rows = self._rows(sa.select(*cols).where(_field_datasets.c.digest.like(f"sha256:{text}%")).limit(2))
        return rows[0] if len(rows) == 1 else None

    # -- autopilot ----------------------------------------------------------------------------

    def put_autopilot(self, group_key: str, config: Mapping[str, Any]) -> None:
        """Set a group's autopilot configuration (upsert)."""
        self._upsert(
            _autopilot, ("group_key",), {"group_key": group_key, "config": dict(config), "updated_at": time.time()}, "autopilot"
        )

    def autopilots(self) -> list[dict[str, Any]]:
        """Every group's autopilot configuration, by group key."""
        return self._rows(sa.select(_autopilot).order_by(_autopilot.c.group_key))

    def put_run(self, row: Mapping[str, Any]) -> None:
        """Insert or update an autopilot run by ``run_id`` (only the given columns change)."""
        values = dict(row)
        run_id = values.get("run_id")
        if not isinstance(run_id, str):
            raise StoreError(f"autopilot run: run_id must be text, got {run_id!r}")
        unknown = sorted(set(values) - set(_autopilot_runs.c.keys()))
        if unknown:
            raise StoreError(f"autopilot run: unknown column {unknown[0]!r}")

        def put(conn: Connection) -> None:
            changes = {k: v for k, v in values.items() if k != "run_id"}
            done = conn.execute(sa.update(_autopilot_runs).where(_autopilot_runs.c.run_id == run_id).values(**changes)).rowcount
            if not done:
                conn.execute(sa.insert(_autopilot_runs).values(**values))

        self._run(put, write=True)

    def run(self, run_id: str) -> dict[str, Any] | None:
        """One autopilot run, or ``None``."""
        rows = self._rows(sa.select(_autopilot_runs).where(_autopilot_runs.c.run_id == run_id))
        return rows[0] if rows else None

    def runs(
        self, *, group_key: str | None = None, states: Sequence[str] | None = None, limit: int = 200
    ) -> list[dict[str, Any]]:
        """Autopilot runs, newest first."""
        stmt = sa.select(_autopilot_runs).order_by(_autopilot_runs.c.created_at.desc(), _autopilot_runs.c.run_id.desc())
        if group_key is not None:
            stmt = stmt.where(_autopilot_runs.c.group_key == group_key)
        if states is not None:
            stmt = stmt.where(_autopilot_runs.c.state.in_(list(states)))
        return self._rows(stmt.limit(limit))


# -- engines ----------------------------------------------------------------------------------


def _engine(url: str, *, retry_s: float) -> tuple[Engine, str]:
    """A configured engine for ``url`` and the URL to show (password hidden)."""
    try:
        parsed = sa.make_url(url)
    except (sa_exc.ArgumentError, ValueError, TypeError) as exc:
        raise StoreError(f"database URL: expected sqlite:///PATH or postgresql+psycopg://USER@HOST/DB, got {url!r}") from exc
    backend = parsed.get_backend_name()
    if backend == "postgresql" and parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    shown = parsed.render_as_string(hide_password=True)
    # A lock held elsewhere should end in our retry loop, never hang the console: the driver
    # waits this long per attempt before reporting "locked".
    wait_s = min(2.0, max(0.05, retry_s / 4))
    try:
        if backend == "sqlite" and parsed.drivername in ("sqlite", "sqlite+pysqlite"):
            return _sqlite_engine(parsed, wait_s), shown
        if backend == "postgresql" and parsed.drivername == "postgresql+psycopg":
            connect_timeout = max(2, min(10, math.ceil(retry_s)))
            engine = sa.create_engine(
                parsed,
                connect_args={"connect_timeout": connect_timeout, "options": f"-c lock_timeout={int(wait_s * 1000)}"},
            )
            return engine, shown
    except (sa_exc.ArgumentError, ImportError) as exc:
        raise StoreError(f"database URL {shown}: {exc}") from exc
    raise StoreError(f"database URL: expected sqlite:///PATH or postgresql+psycopg://USER@HOST/DB, got {shown}")


def _sqlite_engine(parsed: URL, wait_s: float) -> Engine:
    database = parsed.database or ""
    memory = database in ("", ":memory:") or parsed.query.get("mode") == "memory"
    if not memory and not database.startswith("file:"):
        try:
            Path(database).expanduser().absolute().parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"database folder for {database}: {exc.strerror or exc}") from exc
    kwargs: dict[str, Any] = {"connect_args": {"timeout": wait_s, "check_same_thread": False}}
    if memory:
        kwargs["poolclass"] = sa.StaticPool  # one shared in-memory database (tests)
    engine = sa.create_engine(parsed, **kwargs)

    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        # Manage transactions ourselves (BEGIN below): pysqlite's implicit ones would leave
        # DDL outside them and open reads without the IMMEDIATE a writer needs.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            if not memory:
                cur.execute("PRAGMA journal_mode=WAL")
            # WAL with FULL: a commit survives power loss too; the console acks a QoS 1
            # message only after its commit, so acknowledged data must be durable.
            cur.execute("PRAGMA synchronous=FULL")
        finally:
            cur.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("edgeops_write") else "BEGIN")

    return engine
