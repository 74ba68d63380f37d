"""The step cache: content-addressed storage of each pipeline step's outputs.

A step's key is the sha256 of what its outputs depend on, as the step declares it
(:attr:`~edgeops_toolchain.pipeline.Step.inputs`): outside inputs (project tables, the code
digest, the target profile, the signing key) by value, and inputs made by an earlier step by
*that step's key* — so keys chain like a Merkle tree and are all known before anything runs.
The toolchain's own version and the versions of the libraries that shape a model (torch,
onnx, onnxruntime, litert-torch…) are part of every key.

Layout (``<root>`` is ``--cache-dir``, ``$EDGEOPS_CACHE_DIR`` or ``$EDGEOPS_HOME/cache``)::

    <root>/<step>/<key[:2]>/<key>/entry.json   {"step", "key", "files": {name: sha256}}
    <root>/<step>/<key[:2]>/<key>/<name>...     the serialized outputs

Invariants:

* an entry appears by one ``rename`` of a complete folder, so a crashed build leaves a stray
  temporary folder at worst, never a partial entry;
* every file's sha256 is checked on every read: an entry that does not match its
  ``entry.json`` (bit rot, a truncated copy, a hand edit) is reported, deleted and rebuilt,
  never used.

The cache holds the user's own build products (pickled step outputs); it is trusted like
the project's code, and the digest check guards against corruption, not against an
attacker who can write to it (see docs/adr/0006-step-cache.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from edgeops_toolchain.errors import BuildError

__all__ = ["CacheEntryCorrupted", "CacheStats", "StepCache", "default_cache_dir", "digest_json"]

log = logging.getLogger(__name__)

_ENTRY = "entry.json"
_FAN = re.compile(r"[0-9a-f]{2}")
_KEY = re.compile(r"[0-9a-f]{64}")
_TMP = re.compile(r"\.[0-9a-f]{12}-.+")


def default_cache_dir() -> Path:
    """``$EDGEOPS_CACHE_DIR``, else ``$EDGEOPS_HOME/cache`` (``~/.edgeops/cache``)."""
    from edgeops_toolchain.signing import edgeops_home

    env = os.environ.get("EDGEOPS_CACHE_DIR")
    return Path(env) if env else edgeops_home() / "cache"


def digest_json(value: object) -> str:
    """sha256 of ``value``'s canonical JSON (sorted keys, sets as sorted lists, no spaces)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=_canonical)
    return hashlib.sha256(text.encode()).hexdigest()


def _canonical(value: object) -> object:
    # A set's iteration order depends on the process's hash seed: sort it, or the same
    # inputs would give another key in every process.
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    return str(value)


@dataclass(frozen=True)
class CacheEntryCorrupted:
    """A cache entry that failed its digest check (it has been deleted)."""

    step: str
    key: str
    reason: str


@dataclass(frozen=True)
class CacheStats:
    """What ``edgeops cache info`` shows."""

    root: Path
    entries: int
    bytes: int
    per_step: Mapping[str, int]


class StepCache:
    """Entries of step outputs under ``root``, keyed by step name and key."""

    def __init__(self, root: Path) -> None:
        """Use ``root`` (created on first write)."""
        self.root = root

    def _dir(self, step: str, key: str) -> Path:
        return self.root / step / key[:2] / key

    def load(self, step: str, key: str) -> dict[str, bytes] | CacheEntryCorrupted | None:
        """The entry's files, ``None`` if there is none, or :class:`CacheEntryCorrupted`.

        A corrupted entry is deleted before this returns, so the next build starts clean.
        """
        folder = self._dir(step, key)
        try:
            meta = json.loads((folder / _ENTRY).read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            return self._corrupted(step, key, f"unreadable {_ENTRY}: {exc}")
        files = meta.get("files") if isinstance(meta, dict) else None
        if not isinstance(files, dict) or meta.get("step") != step or meta.get("key") != key:
            return self._corrupted(step, key, f"{_ENTRY} does not describe this entry")
        out: dict[str, bytes] = {}
        for name, expected in sorted(files.items()):
            try:
                data = (folder / name).read_bytes()
            except OSError as exc:
                return self._corrupted(step, key, f"{name}: {exc.strerror or exc}")
            actual = hashlib.sha256(data).hexdigest()
            if actual != expected:
                return self._corrupted(
                    step, key, f"{name}: sha256 {actual[:12]}… does not match the recorded {str(expected)[:12]}…"
                )
            out[name] = data
        return out

    def _corrupted(self, step: str, key: str, reason: str) -> CacheEntryCorrupted:
        log.warning("cache entry %s/%s is corrupted (%s); deleting it", step, key[:12], reason)
        shutil.rmtree(self._dir(step, key), ignore_errors=True)
        return CacheEntryCorrupted(step, key, reason)

    def store(self, step: str, key: str, files: Mapping[str, bytes]) -> None:
        """Write an entry atomically (a complete folder, then one rename).

        A failure to write is logged and otherwise ignored: the cache only saves time.
        """
        final = self._dir(step, key)
        meta = {"step": step, "key": key, "files": {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}}
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=final.parent))
            try:
                for name, data in files.items():
                    (tmp / name).write_bytes(data)
                (tmp / _ENTRY).write_text(json.dumps(meta, sort_keys=True))
                if final.exists():  # an older (or corrupted) entry under the same key
                    shutil.rmtree(final)
                os.rename(tmp, final)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        except OSError as exc:
            log.warning("cannot write cache entry %s/%s: %s", step, key[:12], exc)

    def stats(self) -> CacheStats:
        """Entry count and bytes, in all and per step."""
        per_step: dict[str, int] = {}
        total = 0
        if self.root.is_dir():
            for meta in self.root.glob(f"*/*/*/{_ENTRY}"):
                step = meta.parents[2].name
                per_step[step] = per_step.get(step, 0) + 1
                total += sum(f.stat().st_size for f in meta.parent.iterdir() if f.is_file())
        return CacheStats(root=self.root, entries=sum(per_step.values()), bytes=total, per_step=per_step)

    def clear(self) -> int:
        """Delete every entry (and a crashed store's temporary folders); the number of entries deleted.

        Only what the cache wrote is removed: ``<step>/<kk>/<key>`` entry folders and
        ``.<key>-*`` temporaries beside them, then the step folders they leave empty. The
        folder may be shared with other files (``--cache-dir`` is the user's choice), so
        nothing else in it is touched.

        Raises:
            BuildError: an entry cannot be removed.
        """
        count = 0
        if not self.root.is_dir():
            return 0
        try:
            for step_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.is_symlink()):
                for fan in sorted(p for p in step_dir.iterdir() if _FAN.fullmatch(p.name) and p.is_dir()):
                    for entry in sorted(fan.iterdir()):
                        if entry.is_symlink() or not entry.is_dir():
                            continue
                        if _KEY.fullmatch(entry.name) and entry.name.startswith(fan.name):
                            count += (entry / _ENTRY).is_file()
                            shutil.rmtree(entry)
                        elif _TMP.fullmatch(entry.name):
                            shutil.rmtree(entry)
                    with contextlib.suppress(OSError):
                        fan.rmdir()  # only when empty
                with contextlib.suppress(OSError):
                    step_dir.rmdir()
        except OSError as exc:
            raise BuildError(f"{self.root}: cannot clear the cache: {exc.strerror or exc}") from exc
        return count
