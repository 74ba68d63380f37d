"""The device's trust store on disk: its root of trust, its release-key list, and what a bundle verifies against.

Layout, under ``<data>/trust/``::

    <fp16>.pem          development keys (`edgeops-agent trust add`), used only while there is no root
    root.json           the trusted root (a signed document as canonical JSON, edgeops_core.trust)
    release-keys.json   the trusted release-key list (same form)
    revoked.json        {"revoked": [key id, ...]}: every key id a trusted list ever revoked; only grows
    pending.json        only while an update is written: the whole new state (a roll-forward journal)

Which keys a bundle verifies against (:meth:`TrustStore.bundle_keys`): with a ``root.json``,
only :func:`edgeops_core.trust.trusted_release_keys` (the ``.pem`` files are then ignored, and
``trust add`` refuses); without one, the ``.pem`` files, as before roots existed.

Invariants:

* nothing is written until the whole update has verified
  (:func:`edgeops_core.trust.plan_update`): a refused update leaves every file byte-identical;
* an update is committed by one atomic write of ``pending.json`` (the complete new state,
  :func:`~edgeops_agent.store.write_durably`); then ``root.json``, ``release-keys.json`` and
  ``revoked.json`` are replaced one by one and ``pending.json`` is deleted. A reader that finds
  ``pending.json`` takes the state from it, and the next update finishes it first. So a kill -9
  between any two files leaves the old state or the new one, never a mix of the two;
* once ``pending.json`` is written the update is applied, whatever happens next: a file that
  then cannot be replaced (disk full) is reported as a warning of the applied update
  (:attr:`~edgeops_core.trust.TrustUpdate.warning`), never as a refusal;
* one update at a time: the data directory's lock between processes, a lock per directory
  between threads (a ``trust_update`` command and an over-the-air install carrying a list),
  which readers in the process hold too, so none reads half an update. A reader in another
  process (``status`` beside a running daemon) may, and then reports the store as damaged
  once; revocations it reads are never fewer than before the update. An install holds that
  lock (:meth:`TrustStore.held`) from its last check of the signer to its commit, so no
  ``trust_update`` revokes the key in between;
* provisioning a root never leaves a model serving on a key its list does not name
  (:meth:`TrustStore.provision`): from then on every servable slot was signed by a listed
  key, and only a revocation takes one out of service;
* reading the revoked key ids (:meth:`TrustStore.revoked`) parses JSON only, so a serving agent
  checks its active bundle's key at start-up without loading ``cryptography``;
* damaged trust files are an error (:class:`~edgeops_core.TrustError`), never read as "no
  root": that would silently fall back to the development keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edgeops_agent.errors import AgentError
from edgeops_agent.store import DataDir, write_durably
from edgeops_core import SIGNATURE_MEMBER, BundleError, EdgeopsError, TrustedKey, read_members
from edgeops_core._json import load_untrusted_json
from edgeops_core.bundle import read_manifest_member
from edgeops_core.signature import key_hint
from edgeops_core.trust import (
    MAX_METADATA_BYTES,
    ReleaseKeyList,
    RootMetadata,
    TrustError,
    TrustState,
    TrustUpdate,
    load_metadata,
    parse_release_keys,
    parse_root,
    plan_update,
    trusted_release_keys,
    verify_release_keys,
    verify_root,
)

__all__ = ["ROOT_FILE", "TrustStore", "TrustSummary", "read_document"]

log = logging.getLogger(__name__)

ROOT_FILE = "root.json"
KEYS_FILE = "release-keys.json"
REVOKED_FILE = "revoked.json"
PENDING_FILE = "pending.json"
# revoked.json grows with every list; far above what MAX_REVOKED lists add in a device's life.
_MAX_REVOKED_BYTES = 4 * 1024 * 1024
_GUARDS: dict[Path, threading.RLock] = {}
_GUARDS_LOCK = threading.Lock()


def _guard(root: Path) -> threading.RLock:
    """One lock per data directory: writers hold it for a whole update, readers while they read
    the files, so a reader in this process never sees half of an update (re-entrant: an update
    reads the state it replaces)."""
    with _GUARDS_LOCK:
        return _GUARDS.setdefault(root.resolve(), threading.RLock())


@dataclass(frozen=True)
class TrustSummary:
    """What ``edgeops-agent trust show`` prints (JSON-ready through :meth:`to_dict`)."""

    root_version: int | None
    root_expires: str | None
    threshold: int | None
    root_keys: tuple[str, ...]
    keys_version: int | None
    keys_expires: str | None
    release_keys: tuple[str, ...]
    revoked: tuple[str, ...]
    development_keys: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "root_version": self.root_version,
            "root_expires": self.root_expires,
            "threshold": self.threshold,
            "root_keys": list(self.root_keys),
            "keys_version": self.keys_version,
            "keys_expires": self.keys_expires,
            "release_keys": list(self.release_keys),
            "revoked": list(self.revoked),
            "development_keys": list(self.development_keys),
        }


class TrustStore:
    """One data directory's trust store (see the module docstring)."""

    def __init__(self, data_dir: DataDir) -> None:
        """Use ``data_dir``'s ``trust/`` folder (nothing is read yet)."""
        self.data = data_dir
        self.folder = data_dir.trust_dir
        self.root_path = self.folder / ROOT_FILE
        self.keys_path = self.folder / KEYS_FILE
        self.revoked_path = self.folder / REVOKED_FILE
        self.pending_path = self.folder / PENDING_FILE

    def held(self) -> threading.RLock:
        """This directory's trust lock in this process, as a context manager: no update runs while it is held.

        Re-entrant; an install holds it from its last check of the signer to its commit.
        (Between processes the data directory's lock excludes updates already.)
        """
        return _guard(self.data.root)

    # -- reading --------------------------------------------------------------------------------

    def has_root(self) -> bool:
        """Whether a root of trust is provisioned (then only release keys verify bundles)."""
        return self.root_path.exists() or self.pending_path.exists()

    def _read(self, path: Path, limit: int = MAX_METADATA_BYTES) -> object | None:
        try:
            with open(path, "rb") as fh:
                data = fh.read(limit + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise TrustError(f"{path}: cannot read the trust store: {exc.strerror or exc}") from exc
        if len(data) > limit:
            raise TrustError(f"{path}: over {limit} bytes; the trust store is damaged")
        try:
            doc: object = load_untrusted_json(data)
        except ValueError as exc:
            raise TrustError(f"{path}: damaged ({exc}); restore the trust store or re-provision the device") from exc
        return doc

    def _raw(self) -> tuple[object | None, object | None, object | None]:
        """(root, release keys, revoked) documents as stored: from ``pending.json`` if present."""
        with _guard(self.data.root):
            pending = self._read(self.pending_path, 2 * MAX_METADATA_BYTES + _MAX_REVOKED_BYTES)
            if pending is not None:
                if not isinstance(pending, dict) or set(pending) != {"root", "release_keys", "revoked"}:
                    raise TrustError(f"{self.pending_path}: damaged; restore the trust store or re-provision the device")
                return pending["root"], pending["release_keys"], {"revoked": pending["revoked"]}
            return self._read(self.root_path), self._read(self.keys_path), self._read(self.revoked_path, _MAX_REVOKED_BYTES)

    @staticmethod
    def _revoked_ids(raw: object | None, where: Path) -> frozenset[str]:
        if raw is None:
            return frozenset()
        ids = raw.get("revoked") if isinstance(raw, dict) else None
        if not isinstance(ids, list) or not all(isinstance(k, str) for k in ids):
            raise TrustError(f"{where}: damaged; restore the trust store or re-provision the device")
        return frozenset(ids)

    def revoked(self) -> frozenset[str]:
        """Every key id a trusted list ever revoked (JSON only: no ``cryptography``).

        Raises:
            TrustError: a trust file is damaged or unreadable.
        """
        _, raw_keys, raw_revoked = self._raw()
        ids = self._revoked_ids(raw_revoked, self.revoked_path)
        if raw_keys is not None:  # already in revoked.json; read again so a damaged revoked.json cannot hide one
            try:
                ids |= frozenset(parse_release_keys(raw_keys).revoked)
            except TrustError as exc:
                raise TrustError(f"{self.keys_path}: damaged ({exc})") from exc
        return ids

    def load(self) -> TrustState | None:
        """The trusted state, checked again (the list's root signatures), or ``None`` without a root.

        Raises:
            TrustError: a trust file is damaged, or the stored list no longer verifies.
        """
        raw_root, raw_keys, raw_revoked = self._raw()
        if raw_root is None:
            if raw_keys is not None:
                raise TrustError(f"{self.keys_path} exists without {self.root_path}: the trust store is damaged")
            return None
        try:
            root = parse_root(raw_root)
            doc = None if raw_keys is None else parse_release_keys(raw_keys)
            if doc is not None:
                verify_release_keys(root, doc, None, None)
        except TrustError as exc:
            raise TrustError(f"{self.folder}: the trust store is damaged ({exc})") from exc
        revoked = self._revoked_ids(raw_revoked, self.revoked_path) | frozenset(doc.revoked if doc else ())
        return TrustState(root=root, release_keys=doc, revoked=revoked)

    def bundle_keys(self, *, now: datetime | None = None) -> list[TrustedKey]:
        """The keys a bundle must be signed by to be installed now.

        Raises:
            TrustError: a root is provisioned, and its list is missing, expired, or trusts no
                key, or the root itself is expired (no new install; the installed model serves on).
            BundleError: no root and no development key either.
            KeyFileError: a development key file is not a usable key.
        """
        state = self.load()
        if state is None:
            dev = self.data.trusted_keys()
            if not dev:
                raise BundleError(
                    f"the trust store {self.folder} is empty: provision a root (`edgeops-agent trust root ROOT.json`), "
                    "or add a development key with `edgeops-agent trust add`"
                )
            return dev
        return trusted_release_keys(state, now or datetime.now(UTC))

    def summary(self) -> TrustSummary:
        """What is trusted, for ``trust show`` and ``status``.

        Raises:
            TrustError: a trust file is damaged.
            KeyFileError: a development key file is not a usable key.
        """
        state = self.load()
        dev = tuple(k.fingerprint for k in self.data.trusted_keys()) if state is None else ()
        if state is None:
            return TrustSummary(None, None, None, (), None, None, (), (), dev)
        doc = state.release_keys
        listed = tuple(sorted(k for k in (doc.keys if doc else {}) if k not in state.revoked))
        return TrustSummary(
            root_version=state.root.version,
            root_expires=state.root.expires,
            threshold=state.root.threshold,
            root_keys=tuple(sorted(state.root.keys)),
            keys_version=doc.version if doc else None,
            keys_expires=doc.expires if doc else None,
            release_keys=listed,
            revoked=tuple(sorted(state.revoked)),
            development_keys=(),
        )

    # -- writing --------------------------------------------------------------------------------

    def provision(self, root_doc: object, release_keys_doc: object | None = None, *, now: datetime | None = None) -> TrustUpdate:
        """Install the first root (trust on first use, by whoever sets the device up), and optionally a list.

        The root must be signed by a threshold of its own keys and not be expired. The same
        root again is a no-op (a list with it is then applied as an update). A device that
        already holds a model must get the list with the root, and the list must name the key
        that signed each slot that may serve (the active one, and the rollback target of a
        pending trial): otherwise a development key would go on signing what the device
        serves, vouched for by no root (docs/adr/0018).

        Raises:
            TrustError: malformed, under-signed or expired; another root is already
                provisioned (rotate it with a ``trust_update`` signed by the current root);
                or a slot that may serve is signed by a key the list does not name.
            DataDirLockedError: another process works on the data directory.
            AgentError: the journal (``pending.json``) cannot be written (nothing changed).
        """
        moment = now or datetime.now(UTC)
        root = parse_root(root_doc)
        doc = None if release_keys_doc is None else parse_release_keys(release_keys_doc)
        with self.data.lock("trust"), _guard(self.data.root):
            self._finish_pending()
            current = self.load()
            if current is not None:
                if root.to_json() != current.root.to_json():
                    raise TrustError(
                        f"this device already trusts root version {current.root.version}; a root is replaced only by "
                        "a trust_update signed by the current root (TUF 5.3.4), never provisioned over it"
                    )
                return self._apply(current, (), doc, moment)
            verify_root(root, moment)
            update = plan_update(TrustState(root=root), (), doc, moment) if doc is not None else None
            state = update.state if update is not None else TrustState(root=root)
            self._check_servable_slots(state)
            warning = self._write(state, root_changed=True, keys_changed=doc is not None)
            return TrustUpdate(
                state=state,
                roots=(root,),
                release_keys_changed=doc is not None,
                newly_revoked=tuple(sorted(state.revoked)),
                warning=warning,
            )

    def _check_servable_slots(self, state: TrustState) -> None:
        """Refuse a first root whose list does not name the signer of a slot that may serve."""
        try:
            agent_state = self.data.load_state()
        except EdgeopsError as exc:
            raise TrustError(f"cannot check the installed slots before provisioning a root: {exc}") from exc
        slots = [agent_state.active]
        if agent_state.trial is not None:
            slots.append(agent_state.trial.previous)  # a rollback would serve it again
        doc = state.release_keys
        listed = {k for k in (doc.keys if doc is not None else {}) if k not in state.revoked}
        for slot in dict.fromkeys(s for s in slots if s is not None):
            info = agent_state.slots.get(slot)
            if info is None:
                continue
            try:
                signer = key_hint(read_members(self.data.slot_path(slot).read_bytes())[SIGNATURE_MEMBER])
            except (OSError, EdgeopsError, KeyError):
                continue  # unreadable or damaged: its start-up check refuses to serve it anyway
            if signer in listed:
                continue
            which = f"release-key list version {doc.version} does not name" if doc is not None else "no release-key list names"
            key = f"key sha256:{signer[:16]}…" if signer else "an unnamed key"
            raise TrustError(
                f"slot {slot} ({info.name} release {info.release}) is signed by {key}, which {which}: with this root it "
                "would keep serving on a key no root vouched for. Provision the root with a list that names the key "
                "(--release-keys; `edgeops keys rotate --new-key PUB.pem` adds it), or first install a release signed "
                "by a listed key"
            )

    def update(
        self, roots: Sequence[RootMetadata], release_keys: ReleaseKeyList | None, *, now: datetime | None = None
    ) -> TrustUpdate:
        """Apply a ``trust_update``: verify everything (:func:`edgeops_core.trust.plan_update`), then write.

        Raises:
            TrustError: refused (no root provisioned, or a rule of ``plan_update``); nothing
                trusted changed.
            DataDirLockedError: another process works on the data directory.
            AgentError: the journal (``pending.json``) cannot be written: nothing trusted
                changed. A file that fails after it is a warning of the applied update
                (:attr:`~edgeops_core.trust.TrustUpdate.warning`), finished by the next update.
        """
        moment = now or datetime.now(UTC)
        with self.data.lock("trust"), _guard(self.data.root):
            self._finish_pending()
            current = self.load()
            if current is None:
                raise TrustError(
                    f"this device has no root of trust ({self.root_path}): provision one with "
                    "`edgeops-agent trust root ROOT.json` first; a trust_update never creates the first root"
                )
            return self._apply(current, roots, release_keys, moment)

    def apply_embedded(self, source: Path | bytes, *, now: datetime | None = None) -> TrustUpdate | None:
        """Apply the release-key list a bundle's manifest carries, if it is newer and the root signed it.

        Read before the bundle's signature is checked, from the unverified manifest: the list
        is signed by the root on its own. Anything else (no root, no list, an older or the same
        list, a malformed or under-signed one, an unreadable bundle) is ignored silently: an
        older embedded list is what most bundles carry. The bundle's own checks come after.

        Returns:
            The update when a newer list was applied, else ``None``.

        Raises:
            DataDirLockedError: another process works on the data directory.
            AgentError: the journal (``pending.json``) cannot be written (nothing changed).
        """
        if not self.has_root():
            return None
        try:
            raw = load_untrusted_json(read_manifest_member(source))
            embedded = raw.get("release_keys") if isinstance(raw, dict) else None
            if embedded is None:
                return None
            doc = parse_release_keys(embedded)
            state = self.load()
            current = state.release_keys if state is not None else None
            if state is None or (current is not None and doc.version <= current.version):
                return None
            with self.data.lock("trust"), _guard(self.data.root):
                self._finish_pending()
                return self._apply(self.load() or state, (), doc, now or datetime.now(UTC))
        except (ValueError, EdgeopsError) as exc:
            if isinstance(exc, AgentError):
                raise
            log.info("the release-key list in the bundle's manifest is not applied: %s", exc)
            return None

    def _apply(
        self, current: TrustState, roots: Sequence[RootMetadata], doc: ReleaseKeyList | None, now: datetime
    ) -> TrustUpdate:
        update = plan_update(current, roots, doc, now)
        if update.changed:
            warning = self._write(update.state, root_changed=bool(update.roots), keys_changed=update.release_keys_changed)
            if warning is not None:
                update = dataclasses.replace(update, warning=warning)
        return update

    def _write(self, state: TrustState, *, root_changed: bool, keys_changed: bool) -> str | None:
        """Commit ``state`` (the caller holds both locks): pending.json, the files, then no pending.json.

        Returns:
            ``None``, or a warning: the commit point passed (``pending.json`` is in place, so
            every reader takes the new state from it) but a file after it could not be
            written; the next writer finishes the journal.

        Raises:
            AgentError: ``pending.json`` could not be written: nothing changed.
        """
        doc = state.release_keys
        pending = {
            "root": state.root.to_dict(),
            "release_keys": doc.to_dict() if doc is not None else None,
            "revoked": sorted(state.revoked),
        }
        try:
            write_durably(self.pending_path, json.dumps(pending, sort_keys=True, separators=(",", ":")).encode() + b"\n")
        except OSError as exc:
            # The caller finished any earlier journal, so a pending.json now is this one: renamed
            # into place, only the folder's fsync failed, and readers already take it.
            if not self.pending_path.exists():
                raise AgentError(f"{self.pending_path}: cannot write the trust store: {exc.strerror or exc}") from exc
            return self._committed_but(f"{self.folder}: cannot sync the trust store: {exc.strerror or exc}")
        self._crash_point("trust_pending")
        try:
            self._finish_pending(root_changed=root_changed, keys_changed=keys_changed)
        except AgentError as exc:
            return self._committed_but(str(exc))
        return None

    @staticmethod
    def _committed_but(problem: str) -> str:
        warning = (
            f"applied, but not every trust file was replaced ({problem}): the device uses the new state from "
            "pending.json, and the next trust update finishes writing the files"
        )
        log.warning("%s", warning)
        return warning

    def _finish_pending(self, *, root_changed: bool = True, keys_changed: bool = True) -> None:
        """Replace the files from ``pending.json`` and delete it (a no-op without one).

        After a crash nobody knows which files were replaced already: all three are written.
        """
        raw = self._read(self.pending_path, 2 * MAX_METADATA_BYTES + _MAX_REVOKED_BYTES)
        if raw is None:
            return
        if not isinstance(raw, dict) or set(raw) != {"root", "release_keys", "revoked"}:
            raise TrustError(f"{self.pending_path}: damaged; restore the trust store or re-provision the device")
        root = parse_root(raw["root"])
        doc = None if raw["release_keys"] is None else parse_release_keys(raw["release_keys"])
        revoked = json.dumps({"revoked": sorted(self._revoked_ids(raw, self.pending_path))}, separators=(",", ":"))
        try:
            # revoked.json first: with it a key stays revoked whatever happens to the other two.
            write_durably(self.revoked_path, revoked.encode() + b"\n")
            self._crash_point("trust_revoked")
            if root_changed:
                write_durably(self.root_path, root.to_json())
                self._crash_point("trust_root")
            if keys_changed:
                if doc is not None:
                    write_durably(self.keys_path, doc.to_json())
                else:
                    self.keys_path.unlink(missing_ok=True)
            self.pending_path.unlink()
        except OSError as exc:
            raise AgentError(f"{self.folder}: cannot write the trust store: {exc.strerror or exc}") from exc
        for stale in self.folder.glob(".*.json.*"):  # write_durably's temporaries left by a crash
            with contextlib.suppress(OSError):
                stale.unlink()

    @staticmethod
    def _crash_point(name: str) -> None:
        from edgeops_agent.crash import crash_point

        crash_point(name)

    def add_development_key(self, pem: Path) -> TrustedKey:
        """``edgeops-agent trust add``: refused once a root is provisioned.

        Raises:
            TrustError: a root is provisioned (bundles verify only against its release keys).
            KeyFileError: ``pem`` is missing or not a usable public key.
        """
        if self.has_root():
            raise TrustError(
                f"this device trusts a root ({self.root_path}): bundles verify only against the release keys it signs, "
                "so a development key would be ignored; rotate keys with `edgeops keys rotate` and a trust_update"
            )
        return self.data.add_trusted_key(pem)


def read_document(path: Path, *, what: str) -> object:
    """Read a metadata document file (``trust root ROOT.json``), bounded.

    Raises:
        TrustError: unreadable, too large or not JSON.
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_METADATA_BYTES + 1)
    except OSError as exc:
        raise TrustError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from exc
    return load_metadata(data, what=f"{path}")
