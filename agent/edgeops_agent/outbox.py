"""The on-disk outbox: every MQTT message the agent sends goes through it.

SQLite in WAL mode (``<data>/outbox.sqlite``), three tables:

* ``outbox(seq, topic, payload, qos, retain, created)`` — pending messages in send order;
  ``seq`` is also written into the JSON payload, so consumers can spot gaps and duplicates;
* ``quarantine`` — messages the broker refused with a failure reason code (≥ 0x80, e.g.
  0x87 not authorized, 0x97 quota exceeded): kept for inspection and reported, never
  retried;
* ``counters`` — ``dropped`` (messages discarded because the outbox was at its cap; the
  oldest go first, so the newest state of the device survives a long outage) and
  ``quarantined``.

A message leaves ``outbox`` only when the broker acknowledged it (PUBACK with a success
reason code): a broker outage or an agent restart (kill -9 included) loses nothing up to
the cap. A crash between the broker's PUBACK and the delete sends that one message again
after restart with the same ``seq``; consumers drop it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeops_agent.errors import AgentError

__all__ = ["Outbox", "OutboxStats", "Pending"]

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
    """Outbox counters for telemetry."""

    pending: int
    dropped: int
    quarantined: int


class Outbox:
    """The outbox at ``path``; safe to use from several threads."""

    def __init__(self, path: Path, *, cap: int = 10_000) -> None:
        """Open (or create) the outbox; ``cap`` is the most messages it holds.

        Raises:
            AgentError: the file is not a usable database.
        """
        if cap < 1:
            raise ValueError("outbox cap must be >= 1")
        self.path, self.cap = path, cap
        self._lock = threading.Lock()
        self._new = threading.Condition(self._lock)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a PUBACK'd delete and an enqueue survive power loss
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise AgentError(f"{path}: not a usable outbox database ({exc})") from exc

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    def put(self, topic: str, message: Mapping[str, Any], *, qos: int = 1, retain: bool = False) -> int:
        """Append ``message`` (a JSON object; its ``seq`` is filled in) and return its seq.

        At the cap the oldest pending message is discarded and counted as dropped.
        """
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name='outbox'").fetchone()
                seq = (row[0] if row else 0) + 1
                payload = json.dumps({**message, "seq": seq}, separators=(",", ":")).encode()
                self._db.execute(
                    "INSERT INTO outbox (seq, topic, payload, qos, retain, created) VALUES (?, ?, ?, ?, ?, ?)",
                    (seq, topic, payload, qos, int(retain), time.time()),
                )
                (count,) = self._db.execute("SELECT count(*) FROM outbox").fetchone()
                if count > self.cap:
                    excess = count - self.cap
                    self._db.execute("DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox ORDER BY seq LIMIT ?)", (excess,))
                    self._bump("dropped", excess)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._new.notify_all()
            return seq

    def _bump(self, name: str, by: int) -> None:
        self._db.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            (name, by),
        )

    def pending(self, *, after: int = 0, limit: int = 100) -> list[Pending]:
        """Up to ``limit`` pending messages with ``seq > after``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, topic, payload, qos, retain FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
            ).fetchall()
        return [Pending(r[0], r[1], bytes(r[2]), r[3], bool(r[4])) for r in rows]

    def wait(self, after: int, timeout: float) -> None:
        """Block until a message with ``seq > after`` may exist, or ``timeout`` seconds pass."""
        with self._new:
            row = self._db.execute("SELECT max(seq) FROM outbox").fetchone()
            if row[0] is None or row[0] <= after:
                self._new.wait(timeout)

    def ack(self, seq: int) -> None:
        """The broker accepted ``seq``: remove it."""
        with self._lock:
            self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))

    def quarantine(self, seq: int, reason_code: int, reason: str) -> Pending | None:
        """The broker refused ``seq``: move it to quarantine (never retried); the message, if it was pending."""
        with self._lock:
            row = self._db.execute("SELECT seq, topic, payload, qos, retain FROM outbox WHERE seq = ?", (seq,)).fetchone()
            if row is None:
                return None
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT OR REPLACE INTO quarantine VALUES (?, ?, ?, ?, ?, ?)",
                (row[0], row[1], row[2], reason_code, reason, time.time()),
            )
            self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
            self._bump("quarantined", 1)
            self._db.execute("COMMIT")
        return Pending(row[0], row[1], bytes(row[2]), row[3], bool(row[4]))

    def stats(self) -> OutboxStats:
        """Pending, dropped and quarantined counts."""
        with self._lock:
            (pending,) = self._db.execute("SELECT count(*) FROM outbox").fetchone()
            counters = dict(self._db.execute("SELECT name, value FROM counters").fetchall())
        return OutboxStats(pending=pending, dropped=counters.get("dropped", 0), quarantined=counters.get("quarantined", 0))

    def first_time(self, command_id: str) -> bool:
        """Record a command id; ``False`` if it was seen before (a duplicate is acted on once)."""
        with self._lock:
            cur = self._db.execute("INSERT OR IGNORE INTO seen_commands VALUES (?, ?)", (command_id, time.time()))
            if cur.rowcount:
                # Keep the table bounded: the newest 10 000 ids are plenty against redelivery.
                self._db.execute(
                    "DELETE FROM seen_commands WHERE id NOT IN (SELECT id FROM seen_commands ORDER BY at DESC LIMIT 10000)"
                )
            return bool(cur.rowcount)
