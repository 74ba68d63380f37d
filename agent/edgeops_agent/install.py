"""Installing a bundle: every check DESIGN.md lists, then an A/B switch.

Order (each step either passes or leaves the active slot and the floor as they were), all
under the data directory's lock (:meth:`DataDir.lock`):

1. verify the bundle against the trust store while streaming it (container, signature,
   digests, exact member set, manifest schema, expiry; :func:`edgeops_core.verify_bundle_file`),
   so memory stays bounded whatever the bundle's size. With a root of trust the keys are
   the trusted release keys, after the release-key list the manifest may carry has been
   applied (:meth:`~edgeops_agent.trust.TrustStore.apply_embedded`: it is root-signed on its
   own, so a bundle signed by a key it adds installs in one step); without one, the
   development keys;
2. the target must be the device's; the name must be the model the device is bound to
   (or an explicit switch to it, ADR 0009); the release must be greater than the highest
   release of that name ever installed here -- or, to repair a damaged active slot, be
   exactly the bundle recorded for it;
3. record the inactive slot as empty and delete its old bundle, then write the new one
   through a :class:`~edgeops_agent.store.SlotWriter` (temporary file, fsync, rename, fsync);
   its sha256 must be the verified one;
4. verify the slot as it is on disk, again: its digest must equal the verified bytes'
   (so the checks above and the recorded slot info are about the same bytes), re-run the
   step-2 checks on *its* manifest, load its model and run the self-test vectors;
5. commit: one atomic state write makes the slot active and raises the floor (or, for a
   trial, makes it active on trial: see :mod:`edgeops_agent.store` and :func:`confirm_trial`).
   Just before it, under the trust store's lock (:meth:`~edgeops_agent.trust.TrustStore.held`),
   the key that signed the bundle must still be one a bundle may be signed by: a
   ``trust_update`` handled on another thread since step 1 may have revoked it, and none
   can run between that check and the commit.

A crash (kill -9) anywhere before step 5 leaves the state pointing at the old slot, so the
old model keeps running; the next lock holder removes the temporary files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from edgeops_agent.crash import crash_point
from edgeops_agent.errors import (
    AgentError,
    ModelSwitchError,
    RollbackError,
    StateCorruptedError,
    TrialPendingError,
    WrongTargetError,
)
from edgeops_agent.model import LoadedModel
from edgeops_agent.store import PROCESS_TOKEN, AgentState, DataDir, SlotInfo, SlotWriter, Trial
from edgeops_agent.trust import TrustStore
from edgeops_core import (
    MAX_BUNDLE_BYTES,
    SIGNATURE_MEMBER,
    BundleError,
    BundleFormatError,
    EdgeopsError,
    InputError,
    Manifest,
    SignatureError,
    format_time,
    read_bundle_file,
    read_members,
    verify_bundle_file,
    verify_members,
)
from edgeops_core.digest import sha256_hex, sha256_new
from edgeops_core.trust import TrustUpdate

__all__ = ["InstallResult", "adopt_trial", "confirm_trial", "install_bundle", "read_bundle", "recover", "rollback_trial"]

_CHUNK = 1024 * 1024
_GUARDS: dict[Path, threading.Lock] = {}
_GUARDS_LOCK = threading.Lock()


@dataclass(frozen=True)
class InstallResult:
    """What an install did."""

    slot: str
    name: str
    version: str
    release: int
    previous_release: int | None
    self_tests: int
    model: LoadedModel
    trial: bool = False
    #: The release-key list the bundle carried, when it was newer and applied (step 1).
    trust: TrustUpdate | None = None


def read_bundle(source: Path | bytes) -> bytes:
    """The bundle's bytes, refusing anything larger than :data:`MAX_BUNDLE_BYTES`.

    Raises:
        BundleFormatError: unreadable, not a regular file, or too large.
    """
    data = source if isinstance(source, bytes) else read_bundle_file(source)
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleFormatError(f"bundle is {len(data)} bytes, larger than the {MAX_BUNDLE_BYTES}-byte limit")
    return data


def _guard(data_dir: DataDir) -> threading.Lock:
    """Serializes installs of one directory within this process (the flock is per process)."""
    with _GUARDS_LOCK:
        return _GUARDS.setdefault(data_dir.root.resolve(), threading.Lock())


def install_bundle(
    data_dir: DataDir,
    source: Path | bytes,
    *,
    target: str | None = None,
    switch_model: str | None = None,
    trial: bool = False,
) -> InstallResult:
    """Verify, stage, self-test and activate a bundle (see the module docstring).

    Args:
        target: the device's target; defaults to the one recorded in the state (set by the
            first install or by ``run``).
        switch_model: install a bundle of another model name than the one this device is
            bound to; must name the bundle's model (an operator's explicit decision, ADR 0009).
        trial: activate on trial: the floor rises only on :func:`confirm_trial`, and a
            restart before that falls back to the previous slot.

    Raises:
        BundleError: the bundle does not verify (tampered, untrusted key, expired, malformed).
        WrongTargetError, ModelSwitchError, RollbackError, SelfTestError, TrialPendingError:
            verified but not acceptable here.
        StateCorruptedError: the state file is damaged or missing (nothing is changed).
        DataDirLockedError: another process works on the data directory.
        InputError: no target known.
        AgentError: the slot or the state cannot be written, or the slot does not hold the
            verified bytes.
    """
    with data_dir.lock("install"), _guard(data_dir):
        state = recover(data_dir)
        try:
            return _install(data_dir, state, source, target, switch_model, trial)
        except EdgeopsError as exc:
            with contextlib.suppress(StateCorruptedError):
                record_error(data_dir, data_dir.load_state(), f"install rejected: {exc}")
            raise


def _check(state: AgentState, manifest: Manifest, device_target: str, switch_model: str | None, repair: bool) -> int | None:
    """Step 2 of the module docstring; the floor of the bundle's name."""
    if manifest.target != device_target:
        raise WrongTargetError(f"bundle is built for target {manifest.target!r}, this device is {device_target!r}")
    if switch_model is not None and switch_model != manifest.name:
        raise ModelSwitchError(f"--switch-model names {switch_model!r}, but the bundle is of model {manifest.name!r}")
    if state.model_name is not None and manifest.name != state.model_name and switch_model is None:
        raise ModelSwitchError(
            f"this device is bound to model {state.model_name!r}; the bundle is of model {manifest.name!r}: "
            f"switching models is an explicit decision (--switch-model {manifest.name}, see docs/adr/0009)"
        )
    floor = state.highest_release.get(manifest.name)
    if floor is not None and manifest.release <= floor and not (repair and manifest.release == floor):
        raise RollbackError(
            f"release {manifest.release} of {manifest.name!r} is not newer than the highest installed release {floor}"
        )
    return floor


def _active_damaged(data_dir: DataDir, state: AgentState) -> bool:
    """Whether the active slot's file is missing or no longer hashes to its recorded digest."""
    info = state.slots.get(state.active) if state.active else None
    if info is None:
        return False
    digest = sha256_new()
    try:
        with open(data_dir.slot_path(state.active), "rb") as fh:  # type: ignore[arg-type]
            while block := fh.read(_CHUNK):
                digest.update(block)
    except OSError:
        return True
    return bool(digest.hexdigest() != info.sha256)


def _copy_into(source: Path, writer: SlotWriter) -> None:
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise BundleFormatError(f"{source}: cannot read bundle: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BundleFormatError(f"{source}: not a regular file (it was replaced while being installed)")
        try:
            while block := fh.read(_CHUNK):
                writer.write(block)
        except OSError as exc:
            raise BundleFormatError(f"{source}: cannot read bundle: {exc.strerror or exc}") from exc


def _install(
    data_dir: DataDir, state: AgentState, source: Path | bytes, target: str | None, switch_model: str | None, trial: bool
) -> InstallResult:
    if state.trial is not None:
        raise TrialPendingError(
            f"slot {state.trial.slot} is active on trial: confirm it or roll it back before installing another bundle"
        )
    device_target = target or state.target
    if device_target is None:
        raise InputError("this device's target is unknown: pass --target (it is then recorded in the data directory)")
    if state.target is not None and target is not None and target != state.target:
        raise WrongTargetError(f"this device is a {state.target!r} device; --target {target!r} does not match")
    store = TrustStore(data_dir)
    embedded = store.apply_embedded(source)  # before the keys: it may add the one that signed
    trusted = store.bundle_keys()
    # 1. verify (streaming for a file).
    if isinstance(source, bytes):
        manifest, _ = verify_members(read_members(read_bundle(source)), trusted)
        digest = sha256_hex(source)
    else:
        verified = verify_bundle_file(source, trusted)
        manifest, digest = verified.manifest, verified.digest
    # 2. device checks. Re-installing the recorded bundle of a damaged active slot repairs it.
    active = state.slots.get(state.active) if state.active else None
    repair = active is not None and active.sha256 == digest and _active_damaged(data_dir, state)
    floor = _check(state, manifest, device_target, switch_model, repair)
    # 3. free the inactive slot (recorded first, so the state never claims a deleted
    # bundle; this also writes the state before the first slot ever exists), then write.
    slot = state.inactive_slot()
    path = data_dir.slot_path(slot)
    state = dataclasses.replace(state, target=device_target, slots={**state.slots, slot: None})
    data_dir.save_state(state)
    path.unlink(missing_ok=True)
    try:
        with SlotWriter(data_dir, slot) as writer:
            if isinstance(source, bytes):
                view = memoryview(source)
                for i in range(0, len(view), _CHUNK):
                    writer.write(view[i : i + _CHUNK])
            else:
                _copy_into(source, writer)
            path, written = writer.commit()
        if written != digest:
            what = source if isinstance(source, Path) else "bundle bytes"
            raise BundleFormatError(
                f"{what}: the bundle changed while being installed (sha256 {written[:16]}… written, {digest[:16]}… verified)"
            )
        # 4. what the agent will run is the slot: verify it as it is on disk, and require
        # the very bytes checked above; everything recorded below comes from this one read.
        try:
            on_disk = verify_bundle_file(path, trusted)
        except BundleError as exc:
            raise AgentError(f"slot {slot} ({path}) does not hold the verified bytes: {exc}") from exc
        if on_disk.digest != digest:
            raise AgentError(
                f"slot {slot} ({path}) does not hold the verified bytes: sha256 {on_disk.digest[:16]}… on disk, "
                f"{digest[:16]}… verified"
            )
        manifest = on_disk.manifest
        floor = _check(state, manifest, device_target, switch_model, repair)
        model = LoadedModel(manifest, on_disk.read_model(), digest=on_disk.digest, signer=on_disk.signer, expired=False)
        tests = model.self_test()
        crash_point("slot_written")  # test-only (edgeops_agent.crash): the slot is written, not yet active
    except BaseException:
        path.unlink(missing_ok=True)  # not claimed by the state: free the room now
        raise
    info = SlotInfo(
        name=manifest.name,
        version=manifest.version,
        release=manifest.release,
        target=manifest.target,
        runtime=manifest.runtime,
        sha256=on_disk.digest,
        installed=format_time(datetime.now(UTC).replace(microsecond=0)),
    )
    # 5. commit.
    if trial:
        new = dataclasses.replace(
            state, active=slot, slots={**state.slots, slot: info}, trial=Trial(slot, state.active, PROCESS_TOKEN), last_error=None
        )
    else:
        new = dataclasses.replace(
            state,
            active=slot,
            slots={**state.slots, slot: info},
            highest_release={**state.highest_release, manifest.name: max(manifest.release, floor or 0)},
            model_name=manifest.name,
            last_error=None,
        )
    with store.held():
        try:
            _still_trusted(store, on_disk.signer)
        except BaseException:
            path.unlink(missing_ok=True)  # the state records the slot as empty since step 3
            raise
        data_dir.save_state(new)  # the commit point
    return InstallResult(
        slot=slot,
        name=manifest.name,
        version=manifest.version,
        release=manifest.release,
        previous_release=floor,
        self_tests=tests,
        model=model,
        trial=trial,
        trust=embedded,
    )


def _still_trusted(store: TrustStore, signer: str) -> None:
    """Step 5's check (the caller holds the trust store's lock).

    Raises:
        SignatureError: ``signer`` is no longer a key a bundle may be signed by.
        TrustError: the trusted metadata expired or is damaged meanwhile.
    """
    if any(key.fingerprint == signer for key in store.bundle_keys()):
        return
    raise SignatureError(
        f"the bundle is signed by key sha256:{signer[:16]}…, which is no longer a trusted key: a trust update revoked "
        "or removed it while the bundle was being installed; install a release signed by a current release key",
        member=SIGNATURE_MEMBER,
    )


def confirm_trial(data_dir: DataDir) -> AgentState:
    """Commit the activation on trial: the floor rises and the device is bound to its model.

    Raises:
        AgentError: no trial is pending (or the state cannot be written).
        DataDirLockedError: another process works on the data directory.
    """
    with data_dir.lock("confirm"), _guard(data_dir):
        state = data_dir.load_state()
        if state.trial is None:
            raise AgentError("no trial is pending: nothing to confirm")
        info = state.slots[state.trial.slot]
        if info is None:  # pragma: no cover - from_dict refuses such a state
            raise StateCorruptedError(f"trial slot {state.trial.slot} holds no bundle")
        new = dataclasses.replace(
            state,
            trial=None,
            highest_release={**state.highest_release, info.name: max(info.release, state.highest_release.get(info.name, 0))},
            model_name=info.name,
            last_error=None,
        )
        data_dir.save_state(new)
        return new


def rollback_trial(data_dir: DataDir, reason: str = "the trial was rolled back") -> AgentState:
    """End the trial: the previous slot is active again; ``reason`` becomes the last error.

    Raises:
        AgentError: no trial is pending (or the state cannot be written).
        DataDirLockedError: another process works on the data directory.
    """
    with data_dir.lock("rollback"):
        state = data_dir.load_state()
        if state.trial is None:
            raise AgentError("no trial is pending: nothing to roll back")
        new = dataclasses.replace(state, active=state.trial.previous, trial=None, last_error=reason[:500])
        data_dir.save_state(new)
        return new


def adopt_trial(data_dir: DataDir) -> AgentState:
    """Make a trial left by an earlier process this process's own, so :func:`recover` keeps it.

    Only for a caller that counts the start-ups of the trial and rolls it back itself when
    there are too many (the daemon's over-the-air updates: a crash loop, ADR 0012).

    Raises:
        AgentError: no trial is pending (or the state cannot be written).
        DataDirLockedError: another process works on the data directory.
    """
    with data_dir.lock("adopt"):
        state = data_dir.load_state()
        if state.trial is None:
            raise AgentError("no trial is pending: nothing to adopt")
        new = dataclasses.replace(state, trial=dataclasses.replace(state.trial, owner=PROCESS_TOKEN))
        data_dir.save_state(new)
        return new


def recover(data_dir: DataDir) -> AgentState:
    """The state, after rolling back a trial whose process is gone (it did not confirm in time).

    Takes the lock (which also removes stale temporary files).

    Raises:
        StateCorruptedError: the state is damaged or missing.
        DataDirLockedError: another process works on the data directory.
    """
    with data_dir.lock("recover"):
        state = data_dir.load_state()
        t = state.trial
        if t is not None and t.owner != PROCESS_TOKEN:
            info = state.slots[t.slot]
            what = f"{info.name} release {info.release}" if info else "?"
            state = rollback_trial(
                data_dir,
                f"the trial of slot {t.slot} ({what}) was not confirmed before the agent restarted; "
                f"rolled back to slot {t.previous or '(none)'}",
            )
        return state


def record_error(data_dir: DataDir, state: AgentState, message: str) -> None:
    """Remember the last error in the state (best effort: a failure to write is ignored)."""
    state.last_error = message[:500]
    with contextlib.suppress(AgentError):
        data_dir.save_state(state)
