"""The on-disk outbox: every MQTT message the agent sends goes through it.

SQLite in WAL mode (``<data>/outbox.sqlite``, created 0600 like every other file of the
data directory; SQLite gives its ``-wal``/``-shm`` files the database's mode), tables:

* ``outbox(seq, topic, payload, qos, retain, created)`` — pending messages; ``seq`` is also
  written into the JSON payload, so consumers can spot gaps and duplicates;
* ``quarantine`` — messages the broker refused with a failure reason code (≥ 0x80, e.g.
  0x87 not authorized, 0x97 quota exceeded): kept for inspection and reported, never
  retried;
* ``counters`` — ``dropped`` (messages never handed to the broker because the outbox was at
  its cap, or because the disk was full when they were queued), ``quarantined`` and
  ``superseded`` (retained messages replaced by a newer one of the same topic before they
  were sent).

Send order and the state lane: :meth:`Outbox.next_batch` hands out retained messages (the
device's ``state``) before any backlog, and a retained message that is still unsent when a
newer one for the same topic arrives is replaced (only the newest state matters). So a
telemetry backlog can never starve ``state``; its ``seq`` may therefore arrive ahead of
older telemetry seqs.

Delivery bound: a message leaves ``outbox`` only when the broker acknowledged it (PUBACK with
a success reason code): a broker outage or an agent restart (kill -9 included) loses nothing
up to the cap. Up to ``inflight`` messages (the link's window) can be at the broker but not
yet acknowledged to us when the process dies; they are sent again after restart with the
same ``seq``, so **a crash causes at most ``inflight`` duplicates** (QoS 1 without a
persisted client session cannot do better), which consumers drop by ``seq``.

Errors: every :class:`sqlite3.Error` is converted at this boundary into
:class:`OutboxError`. A failed write marks the outbox unhealthy (:attr:`Outbox.healthy`,
:attr:`Outbox.last_error`, ``on_health``); the next successful write marks it healthy again,
so a disk that fills and empties again degrades and recovers without a restart.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeops_agent.errors import AgentError

__all__ = ["Outbox", "OutboxError", "OutboxStats", "Pending"]

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS quarantine (
    seq INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    reason_code INTEGER NOT NULL,
    reason TEXT NOT NULL,
    quarantined REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS seen_commands (id TEXT PRIMARY KEY, at REAL NOT NULL);
"""


_STATS = (
    "SELECT (SELECT count(*) FROM outbox), (SELECT seq FROM sqlite_sequence WHERE name = 'outbox'),"
    " (SELECT value FROM counters WHERE name = 'dropped'), (SELECT value FROM counters WHERE name = 'quarantined'),"
    " (SELECT value FROM counters WHERE name = 'superseded')"
)


def _json_ints(values: Iterable[int]) -> str:
    # "seq NOT IN" a set of ints passed as one JSON array parameter: no SQL built from data.
    return json.dumps(sorted(values))


class OutboxError(AgentError):
    """The outbox database failed (disk full, I/O error, damaged file)."""


@dataclass(frozen=True)
class Pending:
    """A message waiting to be sent."""

    seq: int
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(frozen=True)
class OutboxStats:
    """Outbox counters for telemetry; ``last_seq`` is the highest seq ever assigned (0: none).

    Every seq up to ``last_seq`` was acknowledged by the broker, is pending, or is counted in
    ``dropped``, ``quarantined`` or ``superseded``: how the simulator accounts for each message.
    """

    pending: int
    dropped: int
    quarantined: int
    superseded: int = 0
    last_seq: int = 0


class Outbox:
    """The outbox at ``path``; safe to use from several threads."""

    def __init__(self, path: Path, *, cap: int = 10_000, on_health: Callable[[bool, str | None], None] | None = None) -> None:
        """Open (or create, mode 0600) the outbox; ``cap`` is the most messages it holds.

        Args:
            path: the database file.
            cap: the most pending messages; past it the oldest unsent are dropped and counted.
            on_health: called with ``(healthy, last_error)`` whenever health changes, from
                whichever thread hit the change, after the outbox's lock is released (so it
                may queue a message); its exceptions are logged, never raised. Also
                settable later as the attribute ``on_health``.

        Raises:
            OutboxError: the file is not a usable database.
        """
        if cap < 1:
            raise ValueError(f"outbox cap must be >= 1, got {cap}")
        self.path, self.cap = path, cap
        self.on_health = on_health
        self._lock = threading.Lock()
        self._new = threading.Condition(self._lock)
        self._healthy = True
        self._last_error: str | None = None
        self._unsaved = 0  # messages refused while the disk was full, not yet in ``dropped``
        self._unsaved_acks: set[int] = set()  # acks whose DELETE failed; retried on the next write
        self._handed: set[int] = set()  # seqs given to the link and not yet settled
        self._cursor = 0  # highest non-retained seq handed out
        self._health_calls: list[tuple[bool, str | None]] = []
        self._puts = self._puts_seen = 0  # so wait() does not sleep through a put it raced with
        self._woken = False  # wake() came before wait(): the next wait() returns at once
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Create the file ourselves so it is 0600 from the first byte; SQLite copies the
            # database's mode to its -wal and -shm files.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            os.chmod(path, 0o600)
            self._db = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a PUBACK'd delete and an enqueue survive power loss
            self._db.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise OutboxError(f"{path}: not a usable outbox database ({exc})") from exc

    # health -------------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """``False`` after a failed write, until a write succeeds again."""
        return self._healthy

    @property
    def last_error(self) -> str | None:
        """The last database error, or ``None`` when healthy."""
        return self._last_error

    def _set_health(self, ok: bool, error: str | None) -> None:
        # Called with the lock held: the callback is queued and run by _locked() once the
        # lock is released, so it may use the outbox (e.g. queue a degraded state).
        changed = ok != self._healthy
        self._healthy, self._last_error = ok, error
        if changed:
            if ok:
                log.warning("outbox recovered")
            else:
                log.error("outbox failing: %s", error)
            self._health_calls.append((ok, error))

    @contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            with self._lock:
                yield
        finally:
            self._report_health()

    def _report_health(self) -> None:
        while self._health_calls:
            try:
                ok, error = self._health_calls.pop(0)
            except IndexError:  # another thread reported it
                return
            if self.on_health is not None:
                try:
                    self.on_health(ok, error)
                except Exception:  # a reporting bug must not turn into an outbox failure
                    log.exception("outbox on_health callback failed")

    def _fail(self, what: str, exc: sqlite3.Error) -> OutboxError:
        message = f"outbox {what} failed: {exc}"
        self._set_health(False, message)
        return OutboxError(message)

    def _rollback(self) -> None:
        # SQLite may already have rolled the transaction back by itself (SQLITE_FULL does):
        # a ROLLBACK then fails with "no transaction is active", which must not hide the
        # real error.
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                log.debug("rollback failed", exc_info=True)

    def _write(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` in one IMMEDIATE transaction (lock held); convert SQLite errors."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if self._unsaved_acks:
                    self._db.executemany("DELETE FROM outbox WHERE seq = ?", [(s,) for s in self._unsaved_acks])
                if self._unsaved:
                    self._bump("dropped", self._unsaved)
                result = fn()
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        except sqlite3.Error as exc:
            raise self._fail(what, exc) from exc
        self._unsaved_acks.clear()
        self._unsaved = 0
        if not self._healthy:
            self._set_health(True, None)
        return result

    def _read(self, what: str, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise OutboxError(f"outbox {what} failed: {exc}") from exc

    # API ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    def put(self, topic: str, message: Mapping[str, Any], *, qos: int = 1, retain: bool = False, once: str | None = None) -> int:
        """Append ``message`` (a JSON object; its ``seq`` is filled in) and return its seq.

        With ``once``, the message is appended only if that key was never used (the key is
        recorded in the same transaction, so even a kill -9 between two tries cannot queue it
        twice: how each OTA deploy gets exactly one final event); a repeat returns 0.

        A retained message replaces any unsent retained message of the same topic (counted as
        ``superseded``). At the cap the oldest unsent non-retained messages are discarded and
        counted as dropped (messages already handed to the broker are not: they may arrive).

        Raises:
            OutboxError: the database refused the write (e.g. the disk is full); the message
                is lost, counted in ``dropped`` once the outbox works again.
        """

        def insert() -> int:
            if once is not None:
                cur = self._db.execute("INSERT OR IGNORE INTO seen_commands VALUES (?, ?)", (once, time.time()))
                if not cur.rowcount:
                    return 0
            row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name='outbox'").fetchone()
            seq = (row[0] if row else 0) + 1
            payload = json.dumps({**message, "seq": seq}, separators=(",", ":")).encode()
            if retain:
                cur = self._db.execute(
                    "DELETE FROM outbox WHERE topic = ? AND retain = 1 AND seq NOT IN (SELECT value FROM json_each(?))",
                    (topic, _json_ints(self._handed)),
                )
                if cur.rowcount > 0:
                    self._bump("superseded", cur.rowcount)
            self._db.execute(
                "INSERT INTO outbox (seq, topic, payload, qos, retain, created) VALUES (?, ?, ?, ?, ?, ?)",
                (seq, topic, payload, qos, int(retain), time.time()),
            )
            (count,) = self._db.execute("SELECT count(*) FROM outbox").fetchone()
            if count > self.cap:
                # Drop the oldest unsent non-retained rows; handed-out rows and the newest
                # state may push the count past the cap by at most the link's window + 1.
                cur = self._db.execute(
                    "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox WHERE retain = 0 AND seq <> ?"
                    " AND seq NOT IN (SELECT value FROM json_each(?)) ORDER BY seq LIMIT ?)",
                    (seq, _json_ints(self._handed), count - self.cap),
                )
                if cur.rowcount > 0:
                    self._bump("dropped", cur.rowcount)
            return seq

        with self._locked():
            try:
                seq: int = self._write("put", insert)
            except OutboxError:
                self._unsaved += 1
                raise
            self._puts += 1
            self._new.notify_all()  # _new shares _lock, which is held here
        return seq

    def _bump(self, name: str, by: int) -> None:
        self._db.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            (name, by),
        )

    def pending(self, *, after: int = 0, limit: int = 100) -> list[Pending]:
        """Up to ``limit`` pending messages with ``seq > after``, oldest first (inspection).

        Raises:
            OutboxError: the database cannot be read.
        """
        with self._lock:
            rows = self._read(
                "read", "SELECT seq, topic, payload, qos, retain FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
            )
        return [Pending(r[0], r[1], bytes(r[2]), r[3], bool(r[4])) for r in rows if r[0] not in self._unsaved_acks]

    def next_batch(self, limit: int) -> list[Pending]:
        """Up to ``limit`` messages not yet handed out: unsent retained ones first, then the
        oldest others; they count as handed out until :meth:`ack`, :meth:`quarantine` or
        :meth:`reset_handed`.

        Raises:
            OutboxError: the database cannot be read.
        """
        if limit <= 0:
            return []
        with self._lock:
            handed = self._handed | self._unsaved_acks
            rows = self._read(
                "read",
                "SELECT seq, topic, payload, qos, retain FROM outbox"
                " WHERE retain = 1 AND seq NOT IN (SELECT value FROM json_each(?)) ORDER BY seq LIMIT ?",
                (_json_ints(handed), limit),
            )
            rows += self._read(
                "read",
                "SELECT seq, topic, payload, qos, retain FROM outbox WHERE retain = 0 AND seq > ? ORDER BY seq LIMIT ?",
                (self._cursor, limit - len(rows)),
            )
            self._puts_seen = self._puts
            batch = [Pending(r[0], r[1], bytes(r[2]), r[3], bool(r[4])) for r in rows if r[0] not in handed]
            for msg in batch:
                self._handed.add(msg.seq)
                if not msg.retain:
                    self._cursor = max(self._cursor, msg.seq)
        return batch

    def unhand(self, seqs: Iterable[int]) -> None:
        """Give back handed-out messages that were not sent after all."""
        back = list(seqs)
        if not back:
            return
        with self._lock:
            self._handed.difference_update(back)
            self._cursor = min(self._cursor, min(back) - 1)

    def reset_handed(self) -> None:
        """Forget what was handed out (the link lost its in-flight window): re-send all."""
        with self._lock:
            self._handed.clear()
            self._cursor = 0

    def wait(self, timeout: float) -> None:
        """Block until :meth:`put` adds a message after the last :meth:`next_batch`,
        :meth:`wake` is called, or ``timeout`` seconds pass."""
        with self._new:
            if self._puts == self._puts_seen and not self._woken:
                self._new.wait(timeout)
            self._woken = False

    def wake(self) -> None:
        """End a :meth:`wait` now (or the next one, if nobody waits): the sender has news."""
        with self._new:
            self._woken = True
            self._new.notify_all()

    def ack(self, seq: int) -> None:
        """The broker accepted ``seq``: remove it.

        Never raises: if the delete fails (disk full), the ack is kept in memory and written
        with the next successful write; the outbox is marked unhealthy meanwhile.
        """
        with self._locked():
            self._handed.discard(seq)
            try:
                self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
            except sqlite3.Error as exc:
                self._rollback()
                self._unsaved_acks.add(seq)
                self._fail("ack", exc)
                return
            if not self._healthy and not self._unsaved_acks:
                self._set_health(True, None)

    def quarantine(self, seq: int, reason_code: int, reason: str) -> Pending | None:
        """The broker refused ``seq``: move it to quarantine (never retried); the message, if it was pending.

        Raises:
            OutboxError: the database refused the write.
        """

        def move() -> Any:
            row = self._db.execute("SELECT seq, topic, payload, qos, retain FROM outbox WHERE seq = ?", (seq,)).fetchone()
            if row is None:
                return None
            self._db.execute(
                "INSERT OR REPLACE INTO quarantine VALUES (?, ?, ?, ?, ?, ?)",
                (row[0], row[1], row[2], reason_code, reason, time.time()),
            )
            self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
            self._bump("quarantined", 1)
            return row

        with self._locked():
            self._handed.discard(seq)
            row = self._write("quarantine", move)
        return None if row is None else Pending(row[0], row[1], bytes(row[2]), row[3], bool(row[4]))

    def stats(self) -> OutboxStats:
        """Pending, dropped, quarantined and superseded counts.

        Raises:
            OutboxError: the database cannot be read.
        """
        with self._lock:
            # One statement (telemetry asks every interval; each statement hands the GIL over).
            ((pending, last, dropped, quarantined, superseded),) = self._read("stats", _STATS)
            pending -= len(self._unsaved_acks)
            unsaved = self._unsaved
        return OutboxStats(
            pending=pending,
            dropped=(dropped or 0) + unsaved,
            quarantined=quarantined or 0,
            superseded=superseded or 0,
            last_seq=last or 0,
        )

    def first_time(self, command_id: str) -> bool:
        """Record a command id; ``False`` if it was seen before (a duplicate is acted on once).

        Raises:
            OutboxError: the database refused the write.
        """

        def record() -> bool:
            cur = self._db.execute("INSERT OR IGNORE INTO seen_commands VALUES (?, ?)", (command_id, time.time()))
            if cur.rowcount:
                # Keep the table bounded: the newest 10 000 ids are plenty against redelivery.
                self._db.execute(
                    "DELETE FROM seen_commands WHERE id NOT IN (SELECT id FROM seen_commands ORDER BY at DESC LIMIT 10000)"
                )
            return bool(cur.rowcount)

        with self._locked():
            return bool(self._write("first_time", record))
