"""The agent's data directory: A/B slots, the checksummed state file, the trust store.

Layout::

    <data>/state.json          {"state": {...}, "sha256": "<hex of the canonical state JSON>"}
    <data>/trust/<fp>.pem      trusted public keys (file name: key fingerprint prefix)
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
* the state's ``active`` slot is the only bundle the agent runs; the other slot is scratch
  space for the next install until a state write makes it active.
* ``highest_release`` (per bundle name) only ever grows.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgeops_agent.errors import AgentError, StateCorruptedError
from edgeops_core import KeyFileError, TrustedKey, load_public_key
from edgeops_core.digest import sha256_hex

__all__ = ["SLOTS", "AgentState", "DataDir", "SlotInfo", "fsync_dir", "write_durably"]

SLOTS = ("a", "b")
_STATE_VERSION = 1


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


@dataclass
class AgentState:
    """The persisted state (see the module docstring)."""

    target: str | None = None
    active: str | None = None
    slots: dict[str, SlotInfo | None] = field(default_factory=lambda: dict.fromkeys(SLOTS))
    highest_release: dict[str, int] = field(default_factory=dict)
    last_error: str | None = None

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
        }

    @classmethod
    def from_dict(cls, raw: Any, source: str) -> AgentState:
        """Parse a state body.

        Raises:
            StateCorruptedError: not a state of this version.
        """
        try:
            if raw["version"] != _STATE_VERSION:
                raise StateCorruptedError(f"{source}: state version {raw['version']!r}, this agent reads {_STATE_VERSION}")
            slots = {k: (SlotInfo(**raw["slots"][k]) if raw["slots"].get(k) else None) for k in SLOTS}
            active = raw["active"]
            if active is not None and (active not in SLOTS or slots[active] is None):
                raise StateCorruptedError(f"{source}: active slot {active!r} holds no bundle")
            highest = {str(k): int(v) for k, v in raw["highest_release"].items()}
            return cls(target=raw["target"], active=active, slots=slots, highest_release=highest, last_error=raw["last_error"])
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

    def load_state(self) -> AgentState:
        """The persisted state (a fresh one if there is none yet).

        Raises:
            StateCorruptedError: the file is unreadable, malformed or fails its checksum.
        """
        try:
            raw = self.state_path.read_bytes()
        except FileNotFoundError:
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
        """Every key in the trust store.

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


def _digest(body: Any) -> str:
    return sha256_hex(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
