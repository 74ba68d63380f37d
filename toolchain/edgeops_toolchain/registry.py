"""The local model registry: every release and every build, in one SQLite file.

``$EDGEOPS_REGISTRY`` or ``$EDGEOPS_HOME/registry.sqlite`` holds two tables:

* ``releases`` — one row per signed bundle: name, version, ``release``, target, bundle
  sha256 and path, report path, signer, created/expires, metrics and lineage (JSON);
* ``builds`` — one row per ``edgeops build`` that produced a bundle, including rebuilds
  that reused a cached bundle (``reused = 1``), with the steps that came from the cache.

Release numbers come from here and only from here: the next release of a name and target
is one more than the highest ever recorded, and recording it happens in a write
transaction (``BEGIN IMMEDIATE``) that re-checks the number, so two concurrent builds can
never record the same number. Devices refuse any release not newer than the highest they
installed, which is why numbers are never reused, even after a failed write.

The registry replaces the ``releases.json`` counters of ADR 0004: when it is created next
to such a file, the counters are imported as a floor, so numbering never restarts.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edgeops_core import Manifest
from edgeops_toolchain.errors import BuildError

__all__ = ["BuildRecord", "Registry", "RegistryError", "ReleaseRecord", "default_registry_path"]

_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS releases (
    name TEXT NOT NULL,
    target TEXT NOT NULL,
    release INTEGER NOT NULL CHECK (release > 0),
    version TEXT NOT NULL,
    bundle_sha256 TEXT NOT NULL,
    path TEXT NOT NULL,
    report_path TEXT,
    signer TEXT NOT NULL,
    created TEXT NOT NULL,
    expires TEXT NOT NULL,
    metrics TEXT NOT NULL,
    lineage TEXT NOT NULL,
    PRIMARY KEY (name, target, release)
);
CREATE TABLE IF NOT EXISTS builds (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    target TEXT NOT NULL,
    release INTEGER NOT NULL,
    bundle_sha256 TEXT NOT NULL,
    finished TEXT NOT NULL,
    seconds REAL NOT NULL,
    reused INTEGER NOT NULL,
    cached_steps TEXT NOT NULL,
    path TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS release_floor (
    name TEXT NOT NULL,
    target TEXT NOT NULL,
    last INTEGER NOT NULL,
    PRIMARY KEY (name, target)
);
"""


class RegistryError(BuildError):
    """The registry file is unreadable, of another schema, or a release number conflicts."""


def default_registry_path() -> Path:
    """``$EDGEOPS_REGISTRY``, else ``$EDGEOPS_HOME/registry.sqlite``."""
    from edgeops_toolchain.signing import edgeops_home

    env = os.environ.get("EDGEOPS_REGISTRY")
    return Path(env) if env else edgeops_home() / "registry.sqlite"


@dataclass(frozen=True)
class ReleaseRecord:
    """One signed bundle as the registry knows it."""

    name: str
    target: str
    release: int
    version: str
    bundle_sha256: str
    path: str
    report_path: str | None
    signer: str
    created: str
    expires: str
    metrics: Mapping[str, float]
    lineage: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``registry show --json``)."""
        return {**vars(self), "metrics": dict(self.metrics), "lineage": dict(self.lineage)}


@dataclass(frozen=True)
class BuildRecord:
    """One build that produced (or reused) a bundle."""

    name: str
    target: str
    release: int
    bundle_sha256: str
    finished: str
    seconds: float
    reused: bool
    cached_steps: tuple[str, ...]
    path: str


class Registry:
    """The SQLite registry at ``path`` (created with its folder on first use)."""

    def __init__(self, path: Path | None = None) -> None:
        """Open (and if needed create) the registry.

        Raises:
            RegistryError: the file is not a registry of this schema or cannot be opened.
        """
        self.path = path or default_registry_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fresh = not self.path.exists()
            self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, _SCHEMA_VERSION):
                raise RegistryError(f"{self.path}: registry schema {version}, this edgeops reads schema {_SCHEMA_VERSION}")
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            raise RegistryError(f"{self.path}: not a usable registry database ({exc}); move it away to start a new one") from exc
        if fresh:
            self._import_counters()

    def close(self) -> None:
        """Close the database connection."""
        self._db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise RegistryError(f"{self.path}: registry is locked by another build ({exc})") from exc
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _import_counters(self) -> None:
        legacy = self.path.parent / "releases.json"
        try:
            data = json.loads(legacy.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if not isinstance(data, dict):
            return
        with self._write() as db:
            for key, last in data.items():
                name, _, target = str(key).partition("/")
                if target and isinstance(last, int) and last > 0:
                    db.execute("INSERT OR REPLACE INTO release_floor VALUES (?, ?, ?)", (name, target, last))

    def last_release(self, name: str, target: str) -> int:
        """The highest release ever recorded for ``name``/``target`` (0 if none)."""
        row = self._db.execute(
            "SELECT max(r) FROM (SELECT max(release) AS r FROM releases WHERE name=? AND target=? "
            "UNION ALL SELECT last FROM release_floor WHERE name=? AND target=?)",
            (name, target, name, target),
        ).fetchone()
        return int(row[0] or 0)

    def latest(self, name: str, target: str) -> ReleaseRecord | None:
        """The newest release of ``name`` for ``target``."""
        rows = self.releases(name=name, target=target, limit=1)
        return rows[0] if rows else None

    def record_release(
        self, manifest: Manifest, *, bundle_sha256: str, path: Path, report_path: Path | None, signer: str
    ) -> None:
        """Record a newly signed bundle.

        Raises:
            RegistryError: its release is not newer than the highest recorded (a concurrent
                build took the number); nothing is recorded.
        """
        with self._write() as db:
            last = self.last_release(manifest.name, manifest.target)
            if manifest.release <= last:
                raise RegistryError(
                    f"release {manifest.release} of {manifest.name}/{manifest.target} is not newer than the recorded "
                    f"{last} (another build recorded it meanwhile); build again"
                )
            db.execute(
                "INSERT INTO releases VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    manifest.name,
                    manifest.target,
                    manifest.release,
                    manifest.version,
                    bundle_sha256,
                    str(path),
                    str(report_path) if report_path else None,
                    signer,
                    manifest.created,
                    manifest.expires,
                    json.dumps(dict(manifest.metrics), sort_keys=True),
                    json.dumps(manifest.to_dict()["lineage"], sort_keys=True),
                ),
            )

    def update_location(self, name: str, target: str, release: int, path: Path, report_path: Path | None) -> None:
        """Point a release at where a rebuild wrote it (a rebuild may use another ``--out``)."""
        with self._write() as db:
            db.execute(
                "UPDATE releases SET path=?, report_path=? WHERE name=? AND target=? AND release=?",
                (str(path), str(report_path) if report_path else None, name, target, release),
            )

    def record_build(self, build: BuildRecord) -> None:
        """Record one build."""
        with self._write() as db:
            db.execute(
                "INSERT INTO builds (name, target, release, bundle_sha256, finished, seconds, reused, cached_steps, path) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    build.name,
                    build.target,
                    build.release,
                    build.bundle_sha256,
                    build.finished,
                    build.seconds,
                    int(build.reused),
                    json.dumps(list(build.cached_steps)),
                    build.path,
                ),
            )

    def releases(self, *, name: str | None = None, target: str | None = None, limit: int | None = None) -> list[ReleaseRecord]:
        """Releases, newest first within each name and target, filtered by ``name``/``target``."""
        sql = "SELECT * FROM releases WHERE (? IS NULL OR name=?) AND (? IS NULL OR target=?) ORDER BY name, target, release DESC"
        params: list[Any] = [name, name, target, target]
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [_release(row) for row in self._db.execute(sql, params).fetchall()]

    def release(self, name: str, target: str, release: int) -> ReleaseRecord | None:
        """One release, if recorded."""
        row = self._db.execute(
            "SELECT * FROM releases WHERE name=? AND target=? AND release=?", (name, target, release)
        ).fetchone()
        return _release(row) if row else None

    def builds(self, *, name: str | None = None, target: str | None = None) -> list[BuildRecord]:
        """Builds, oldest first."""
        rows = self._db.execute(
            "SELECT name, target, release, bundle_sha256, finished, seconds, reused, cached_steps, path FROM builds "
            "WHERE (? IS NULL OR name=?) AND (? IS NULL OR target=?) ORDER BY id",
            (name, name, target, target),
        ).fetchall()
        return [
            BuildRecord(r[0], r[1], int(r[2]), r[3], r[4], float(r[5]), bool(r[6]), tuple(json.loads(r[7])), r[8]) for r in rows
        ]


def _release(row: tuple[Any, ...]) -> ReleaseRecord:
    return ReleaseRecord(
        name=row[0],
        target=row[1],
        release=int(row[2]),
        version=row[3],
        bundle_sha256=row[4],
        path=row[5],
        report_path=row[6],
        signer=row[7],
        created=row[8],
        expires=row[9],
        metrics=json.loads(row[10]),
        lineage=json.loads(row[11]),
    )


def now_text() -> str:
    """The current UTC time as the registry writes it."""
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
