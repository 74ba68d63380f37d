"""The agent's data directory: A/B slots, the checksummed state file, the trust store, the lock.

Layout::

    <data>/state.json          {"state": {...}, "sha256": "<hex of the canonical state JSON>"}
    <data>/agent.lock          flock'd by the one process working on the directory ("pid purpose")
    <data>/trust/<fp>.pem      development keys (file name: key fingerprint prefix); with a root
                               of trust (trust/root.json, edgeops_agent.trust) they are ignored
    <data>/slots/a/bundle.edgeops
    <data>/slots/b/bundle.edgeops
    <data>/outbox.sqlite       the MQTT outbox (edgeops_agent.outbox)
    <data>/agent.sock          the local inference endpoint while ``run`` is up

Invariants:

* ``state.json`` is only ever replaced whole: written to a temporary file in the same
  folder, fsynced, renamed over the old one, and the folder fsynced. A crash leaves the old
  or the new file, never a mix. Its checksum catches a file damaged at rest; a damaged
  state is an error the operator must see (:class:`StateCorruptedError`), never silently
  reset, because it holds the anti-rollback floor.
* ``state.json`` exists before any slot is written (the first install writes it first).
  So a missing state next to a slot bundle or an outbox is a *lost* state, not a new device
  (:class:`StateMissingError`); a new device is an absent or empty directory, or one holding
  only its trust store.
* one process at a time works on a directory (:meth:`DataDir.lock`, an ``fcntl.flock``):
  the daemon for its lifetime, an install for its duration. The lock holder removes the
  temporary files (``.<name>.*``) a crash left behind.
* the state's ``active`` slot is the only bundle the agent runs; the other slot is scratch
  space. An install first records the inactive slot as empty and deletes its bundle, then
  writes the new one (:class:`SlotWriter`): room for two bundles, and the state never
  claims a bundle that is not there.
* ``highest_release`` (per bundle name) only ever grows, and the device is bound to one
  model name (``model_name``); another name installs only with an explicit switch (ADR 0009).

Activation state machine (``active``, ``trial``)::

    idle(active=X) --install-------------------------------> idle(active=Y), floor raised
    idle(active=X) --install(trial)------------------------> trial(active=Y, previous=X)
    trial          --confirm_trial-------------------------> idle(active=Y), floor raised
    trial          --rollback_trial / restart of the owner-> idle(active=X), last_error set
    trial          --install-------------------------------> refused (TrialPendingError)

A trial belongs to the process that started it (``Trial.owner`` is that process's
:data:`PROCESS_TOKEN`); the next process to take the lock finds a trial it does not own and
rolls it back, so a restart (or crash) during a trial falls back to the previous slot. The
floor and ``model_name`` change only when an activation is committed (confirmed).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from edgeops_agent.errors import AgentError, DataDirLockedError, StateCorruptedError, StateMissingError
from edgeops_core import MAX_BUNDLE_BYTES, BundleFormatError, KeyFileError, TrustedKey, load_public_key
from edgeops_core.digest import sha256_hex, sha256_new

__all__ = [
    "PROCESS_TOKEN",
    "SLOTS",
    "AgentState",
    "DataDir",
    "DataDirLock",
    "SlotInfo",
    "SlotWriter",
    "Trial",
    "fsync_dir",
    "write_durably",
]

SLOTS = ("a", "b")
_STATE_VERSION = 2
#: Identifies this process as the owner of a trial it started (see the module docstring).
PROCESS_TOKEN = os.urandom(8).hex()  # not `secrets`: it imports hashlib's libcrypto
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class SlotInfo:
    """What a slot holds."""

    name: str
    version: str
    release: int
    target: str
    runtime: str
    sha256: str
    installed: str


@dataclass(frozen=True)
class Trial:
    """An activation on trial: ``slot`` is active, ``previous`` is what a rollback restores."""

    slot: str
    previous: str | None
    owner: str


@dataclass
class AgentState:
    """The persisted state (see the module docstring)."""

    target: str | None = None
    active: str | None = None
    slots: dict[str, SlotInfo | None] = field(default_factory=lambda: dict.fromkeys(SLOTS))
    highest_release: dict[str, int] = field(default_factory=dict)
    last_error: str | None = None
    model_name: str | None = None
    trial: Trial | None = None

    def inactive_slot(self) -> str:
        """The slot an install writes to."""
        return "b" if self.active == "a" else "a"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "version": _STATE_VERSION,
            "target": self.target,
            "active": self.active,
            "slots": {k: (asdict(v) if v else None) for k, v in self.slots.items()},
            "highest_release": dict(sorted(self.highest_release.items())),
            "last_error": self.last_error,
            "model_name": self.model_name,
            "trial": asdict(self.trial) if self.trial else None,
        }

    @classmethod
    def from_dict(cls, raw: Any, source: str) -> AgentState:
        """Parse a state body; version 1 (no ``model_name``, no ``trial``) is migrated.

        Raises:
            StateCorruptedError: not a state of a version this agent reads, or inconsistent.
        """
        try:
            version = raw["version"]
            if version not in (1, _STATE_VERSION):
                raise StateCorruptedError(f"{source}: state version {version!r}, this agent reads 1 and {_STATE_VERSION}")
            slots = {k: (SlotInfo(**raw["slots"][k]) if raw["slots"].get(k) else None) for k in SLOTS}
            active = raw["active"]
            if active is not None and (active not in SLOTS or slots[active] is None):
                raise StateCorruptedError(f"{source}: active slot {active!r} holds no bundle")
            highest = {str(k): int(v) for k, v in raw["highest_release"].items()}
            trial = None
            if version == 1:
                # Version 1 kept only per-name floors. Bind the device to what it runs (or
                # to its only name); ADR 0009.
                active_info = slots[active] if active else None
                model_name = active_info.name if active_info else (next(iter(highest)) if len(highest) == 1 else None)
            else:
                model_name = raw["model_name"]
                if raw["trial"] is not None:
                    trial = Trial(**raw["trial"])
                    previous = trial.previous
                    if trial.slot != active or (previous is not None and (previous not in SLOTS or slots[previous] is None)):
                        raise StateCorruptedError(f"{source}: trial {raw['trial']!r} does not match active slot {active!r}")
            return cls(
                target=raw["target"],
                active=active,
                slots=slots,
                highest_release=highest,
                last_error=raw["last_error"],
                model_name=model_name,
                trial=trial,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StateCorruptedError(f"{source}: malformed state ({type(exc).__name__}: {exc})") from exc


def fsync_dir(path: Path) -> None:
    """fsync a directory, so a rename inside it is durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: temporary file, fsync, rename, fsync of the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@dataclass
class _Held:
    fd: int
    count: int


_HELD: dict[Path, _Held] = {}
_HELD_GUARD = threading.Lock()


class DataDirLock:
    """This process's hold on a data directory (``fcntl.flock`` on ``agent.lock``).

    Taken when constructed (see :meth:`DataDir.lock`); re-entrant within one process, so
    the daemon's lifetime hold and an install it runs nest. Use as a context manager, or
    call :meth:`release` once.
    """

    def __init__(self, data_dir: DataDir, purpose: str) -> None:
        """Take the lock now.

        Raises:
            DataDirLockedError: another process holds it (the message names its pid).
            AgentError: the lock file cannot be created.
        """
        self._key = data_dir.root.resolve()
        self._released = False
        with _HELD_GUARD:
            held = _HELD.get(self._key)
            if held is not None:
                held.count += 1
                return
            path = data_dir.root / "agent.lock"
            try:
                data_dir.root.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise AgentError(f"{path}: cannot open the lock file: {exc.strerror or exc}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = os.pread(fd, 200, 0).decode(errors="replace").split()
                os.close(fd)
                who = f"pid {holder[0]} ({' '.join(holder[1:])})" if holder else "another process"
                raise DataDirLockedError(
                    f"{data_dir.root} is in use by {who}: one agent process works on a data directory at a time; "
                    "stop it (or wait for it) and try again"
                ) from exc
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {purpose}\n".encode(), 0)
            _HELD[self._key] = _Held(fd, 1)
        data_dir.remove_temporaries()

    def release(self) -> None:
        """Give this hold back (the lock is freed when the last hold in the process is)."""
        if self._released:
            return
        self._released = True
        with _HELD_GUARD:
            held = _HELD[self._key]
            held.count -= 1
            if held.count == 0:
                del _HELD[self._key]
                os.close(held.fd)  # closing the descriptor releases the flock

    def __enter__(self) -> DataDirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class DataDir:
    """One agent's data directory."""

    def __init__(self, root: Path) -> None:
        """Use ``root`` (created with its subfolders on first write)."""
        self.root = root
        self.state_path = root / "state.json"
        self.trust_dir = root / "trust"
        self.outbox_path = root / "outbox.sqlite"
        self.socket_path = root / "agent.sock"

    def slot_path(self, slot: str) -> Path:
        """Where ``slot``'s bundle lives."""
        return self.root / "slots" / slot / "bundle.edgeops"

    def lock(self, purpose: str) -> DataDirLock:
        """Take the data directory for this process (see :class:`DataDirLock`).

        ``purpose`` (``"daemon"``, ``"install"``) is written into the lock file, so a
        refused process can say who holds it. The first hold removes stale temporary files.

        Raises:
            DataDirLockedError: another process holds it.
        """
        return DataDirLock(self, purpose)

    def remove_temporaries(self) -> list[Path]:
        """Delete the temporary files a crash left (``.state.json.*``, ``slots/*/.bundle.edgeops.*``).

        Only call it holding :meth:`lock`: then no write that owns one is running.
        """
        stale = [*self.root.glob(f".{self.state_path.name}.*"), *self.root.glob("slots/*/.bundle.edgeops.*")]
        for path in stale:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return stale

    def _device_files(self) -> list[Path]:
        """Files only a device that was set up has (the state is written before any of them)."""
        found = [self.slot_path(s) for s in SLOTS if self.slot_path(s).exists()]
        return found + ([self.outbox_path] if self.outbox_path.exists() else [])

    def load_state(self) -> AgentState:
        """The persisted state (a fresh one for a new device: no state and no slots yet).

        Raises:
            StateMissingError: there is no state, but there are slots or an outbox.
            StateCorruptedError: the file is unreadable, malformed or fails its checksum.
        """
        try:
            raw = self.state_path.read_bytes()
        except FileNotFoundError:
            found = self._device_files()
            if found:
                names = ", ".join(str(p.relative_to(self.root)) for p in found)
                raise StateMissingError(
                    f"{self.state_path}: state.json is missing, but the data directory holds {names}: the anti-rollback "
                    "floor is lost, so this is not treated as a new device. Restore state.json from a backup; to "
                    "re-provision the device on purpose, move the data directory away and start from an empty one"
                ) from None
            return AgentState()
        except OSError as exc:
            raise StateCorruptedError(f"{self.state_path}: cannot read the state: {exc.strerror or exc}") from exc
        try:
            doc = json.loads(raw)
            body, digest = doc["state"], doc["sha256"]
        except (ValueError, KeyError, TypeError) as exc:
            raise StateCorruptedError(f"{self.state_path}: not a state file ({exc})") from exc
        if _digest(body) != digest:
            raise StateCorruptedError(
                f"{self.state_path}: checksum mismatch, the state file was damaged; restore it from a backup or "
                "re-provision the device (it holds the anti-rollback floor, so it is never reset silently)"
            )
        return AgentState.from_dict(body, str(self.state_path))

    def save_state(self, state: AgentState) -> None:
        """Persist ``state`` atomically and durably.

        Raises:
            AgentError: the file cannot be written (the old state stays).
        """
        body = state.to_dict()
        doc = json.dumps({"state": body, "sha256": _digest(body)}, sort_keys=True, indent=1).encode() + b"\n"
        try:
            write_durably(self.state_path, doc)
        except OSError as exc:
            raise AgentError(f"{self.state_path}: cannot write the state: {exc.strerror or exc}") from exc

    def trusted_keys(self) -> list[TrustedKey]:
        """Every development key (``trust/*.pem``); what bundles verify against is
        :meth:`edgeops_agent.trust.TrustStore.bundle_keys` (these, only without a root).

        Raises:
            KeyFileError: a file in the trust store is not a usable public key.
        """
        if not self.trust_dir.is_dir():
            return []
        return [load_public_key(p) for p in sorted(self.trust_dir.glob("*.pem"))]

    def add_trusted_key(self, pem: Path) -> TrustedKey:
        """Copy a public key into the trust store (idempotent).

        Raises:
            KeyFileError: ``pem`` is missing or not an ECDSA P-256 public key.
        """
        key = load_public_key(pem)
        try:
            write_durably(self.trust_dir / f"{key.fingerprint[:16]}.pem", pem.read_bytes())
        except OSError as exc:
            raise KeyFileError(f"{self.trust_dir}: cannot store the key: {exc.strerror or exc}") from exc
        return key


class SlotWriter:
    """Writes one bundle into a slot, incrementally: the staged half of an install (and of OTA).

    The bytes go to a temporary file beside the slot's bundle; :meth:`commit` fsyncs it,
    renames it over ``bundle.edgeops`` and fsyncs the folder, and returns the path and the
    sha256 of the bytes in the file. Chunks arrive in order (:meth:`write`, hashed as they
    come) or at any offset (:meth:`write_at`, as OTA chunks do; the file is then hashed when
    committed). :meth:`abort` (or leaving a ``with`` block by an exception) deletes the
    temporary. Hold :meth:`DataDir.lock` while writing; never write the active slot.
    """

    def __init__(self, data_dir: DataDir, slot: str) -> None:
        """Open a temporary file for ``slot``.

        Raises:
            AgentError: no such slot, or the file cannot be created.
        """
        if slot not in SLOTS:
            raise AgentError(f"no slot {slot!r}; slots are {', '.join(SLOTS)}")
        self.path = data_dir.slot_path(slot)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        except OSError as exc:
            raise AgentError(f"{self.path}: cannot write the slot: {exc.strerror or exc}") from exc
        self._fd: int | None = fd
        self._tmp = Path(tmp)
        self._hash: Any = sha256_new()
        self._size = 0
        self._in_order = True

    def _check(self, end: int) -> int:
        if self._fd is None:
            raise AgentError(f"{self.path}: the slot writer is already committed or aborted")
        if end > MAX_BUNDLE_BYTES:
            raise BundleFormatError(f"bundle would be {end} bytes, over the {MAX_BUNDLE_BYTES}-byte limit")
        return self._fd

    def write(self, chunk: bytes | memoryview) -> None:
        """Append ``chunk``.

        Raises:
            BundleFormatError: past :data:`MAX_BUNDLE_BYTES`.
            AgentError: the disk refused it, or the writer is closed.
        """
        self.write_at(self._size, chunk)

    def write_at(self, offset: int, chunk: bytes | memoryview) -> None:
        """Write ``chunk`` at ``offset`` (chunks may come in any order, and again).

        Raises:
            BundleFormatError: past :data:`MAX_BUNDLE_BYTES`.
            AgentError: a negative offset, the disk refused it, or the writer is closed.
        """
        view = memoryview(chunk).cast("B")
        fd = self._check(offset + len(view))
        if offset < 0:
            raise AgentError(f"negative offset {offset}")
        if offset != self._size:
            self._in_order = False
        try:
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], offset + done)
        except OSError as exc:
            raise AgentError(f"{self.path}: cannot write the slot: {exc.strerror or exc}") from exc
        if self._in_order:
            self._hash.update(view)
        self._size = max(self._size, offset + len(view))

    def commit(self) -> tuple[Path, str]:
        """Make the written bytes the slot's bundle, durably: ``(path, sha256 hex of its bytes)``.

        Raises:
            AgentError: the file cannot be synced or renamed (the temporary is removed).
        """
        fd = self._check(self._size)
        try:
            os.fsync(fd)
            if not self._in_order:
                self._hash = sha256_new()
                offset = 0
                while block := os.pread(fd, _CHUNK, offset):
                    self._hash.update(block)
                    offset += len(block)
            os.close(fd)
            self._fd = None
            os.replace(self._tmp, self.path)
            fsync_dir(self.path.parent)
        except OSError as exc:
            self.abort()
            raise AgentError(f"{self.path}: cannot commit the slot: {exc.strerror or exc}") from exc
        return self.path, str(self._hash.hexdigest())

    def abort(self) -> None:
        """Discard what was written (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> SlotWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if kind is not None:
            self.abort()


def _digest(body: Any) -> str:
    return sha256_hex(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
