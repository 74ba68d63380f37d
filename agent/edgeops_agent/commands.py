"""The command journal: every command id the agent accepted and how far it got.

A small SQLite file beside the outbox (``<data>/commands.sqlite``, mode 0600), one row per
command id: ``received`` → ``running`` → ``done`` | ``failed``. It is both the progress
record OTA commands need (a reboot mid-command is seen, and reported as failed, at the next
start) and the memory behind "a command id is acted on once":

* every id is kept for :data:`~edgeops_core.COMMAND_WINDOW_S` (30 days) after it arrived;
  older rows are pruned. Redelivery by the broker cannot outlive that window, because the
  session the agent opens expires sooner (``mqtt.session_expiry_s``, 7 days by default).
* a command whose ``issued_at`` is older than the window is refused as stale, so a replay
  of a command that carries ``issued_at`` is never acted on twice, however late it comes.
* the journal holds at most ``cap`` ids within the window; when it is full, new commands
  are refused (visibly, ``command_rejected``) rather than an old id being forgotten.

Writes use WAL with ``synchronous=NORMAL``: a committed row survives kill -9 of the agent
(the case redelivery matters for); a power cut may lose the last few rows.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from edgeops_agent.errors import AgentError
from edgeops_core import COMMAND_WINDOW_S, Command

__all__ = ["STATUSES", "CommandJournal", "JournalFullError", "StaleCommandError"]

#: A command's progress, in order.
STATUSES = ("received", "running", "done", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS commands (
    id TEXT PRIMARY KEY,
    type TEXT NOT NULL,
    status TEXT NOT NULL,
    received REAL NOT NULL,
    updated REAL NOT NULL,
    error TEXT
);
CREATE INDEX IF NOT EXISTS commands_received ON commands (received);
"""


class StaleCommandError(AgentError):
    """The command's ``issued_at`` is older than the id window: it may already have been acted on."""


class JournalFullError(AgentError):
    """The journal holds ``cap`` ids within the window; a new one cannot be remembered."""


class CommandJournal:
    """The journal at ``path``; safe to use from several threads."""

    def __init__(
        self,
        path: Path,
        *,
        window_s: float = COMMAND_WINDOW_S,
        cap: int = 200_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Open (or create) the journal.

        Raises:
            AgentError: the file is not a usable database.
        """
        self.path, self.window_s, self.cap, self._clock = path, window_s, cap, clock
        self._lock = threading.Lock()
        self._count = 0
        try:
            if not path.exists():  # created private, like everything else in the data directory
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
            self._db = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            self._prune()
        except (OSError, sqlite3.Error) as exc:
            raise AgentError(f"{path}: not a usable command journal ({exc})") from exc

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    def _prune(self) -> None:
        self._db.execute("DELETE FROM commands WHERE received < ?", (self._clock() - self.window_s,))
        (self._count,) = self._db.execute("SELECT count(*) FROM commands").fetchone()

    def receive(self, cmd: Command) -> bool:
        """Record ``cmd`` as received; ``False`` if its id is already known (a duplicate).

        Raises:
            StaleCommandError: ``issued_at`` is older than the window.
            JournalFullError: ``cap`` ids arrived within the window.
            AgentError: the database failed (e.g. a full disk).
        """
        now = self._clock()
        issued = cmd.issued_time()
        if issued is not None and issued < now - self.window_s:
            raise StaleCommandError(f"command {cmd.id} was issued at {cmd.issued_at}, more than {self.window_s:.0f} s ago")
        with self._lock:
            try:
                if self._db.execute("SELECT 1 FROM commands WHERE id = ?", (cmd.id,)).fetchone():
                    return False
                if self._count >= self.cap:
                    self._prune()
                    if self._count >= self.cap:
                        raise JournalFullError(f"{self.cap} commands arrived within {self.window_s:.0f} s; refusing more")
                self._db.execute(
                    "INSERT INTO commands (id, type, status, received, updated) VALUES (?, ?, 'received', ?, ?)",
                    (cmd.id, cmd.type, now, now),
                )
            except sqlite3.Error as exc:
                raise AgentError(f"{self.path}: cannot record command {cmd.id} ({exc})") from exc
            self._count += 1
            return True

    def mark(self, command_id: str, status: str, error: str | None = None) -> None:
        """Record progress: ``status`` is ``running``, ``done`` or ``failed``.

        Raises:
            AgentError: the database failed.
        """
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        with self._lock:
            try:
                self._db.execute(
                    "UPDATE commands SET status = ?, updated = ?, error = ? WHERE id = ?",
                    (status, self._clock(), error, command_id),
                )
            except sqlite3.Error as exc:
                raise AgentError(f"{self.path}: cannot record command {command_id} ({exc})") from exc

    def status(self, command_id: str) -> str | None:
        """The recorded status of ``command_id`` (``None`` if unknown)."""
        with self._lock:
            row = self._db.execute("SELECT status FROM commands WHERE id = ?", (command_id,)).fetchone()
        return None if row is None else str(row[0])

    def interrupted(self) -> list[tuple[str, str]]:
        """Mark commands left ``received``/``running`` by a previous process as failed; their ``(id, type)``."""
        with self._lock:
            rows = self._db.execute("SELECT id, type FROM commands WHERE status IN ('received', 'running')").fetchall()
            self._db.execute(
                "UPDATE commands SET status = 'failed', error = 'interrupted: the agent stopped', updated = ? "
                "WHERE status IN ('received', 'running')",
                (self._clock(),),
            )
        return [(str(i), str(t)) for i, t in rows]
