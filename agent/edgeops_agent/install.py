"""Installing a bundle: every check DESIGN.md lists, then an A/B switch.

Order (each step either passes or leaves the device exactly as it was):

1. read the bundle (size-capped) and verify it with the trust store: container, signature,
   digests, exact member set, manifest schema, expiry (:func:`edgeops_core.verify_members`);
2. the target must be the device's; the release must be greater than the highest release
   of that name ever installed here (persisted, so also after a restart);
3. write it to the inactive slot (temporary file, fsync, rename, fsync);
4. read the slot back, verify it again, load the model and run its self-test vectors
   through the serving path;
5. commit: one atomic state write makes the slot active and raises the anti-rollback floor.

A crash (kill -9) anywhere before step 5 leaves the state file pointing at the old slot,
so the old model keeps running; the half-written slot is scratch space for the next try.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from edgeops_agent.errors import AgentError, RollbackError, WrongTargetError
from edgeops_agent.model import LoadedModel
from edgeops_agent.store import AgentState, DataDir, SlotInfo, write_durably
from edgeops_core import MAX_BUNDLE_BYTES, BundleError, BundleFormatError, InputError, format_time, read_members, verify_members

__all__ = ["InstallResult", "install_bundle", "read_bundle"]


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


def read_bundle(source: Path | bytes) -> bytes:
    """The bundle's bytes, refusing anything larger than :data:`MAX_BUNDLE_BYTES`.

    Raises:
        BundleFormatError: unreadable or too large.
    """
    if isinstance(source, bytes):
        data = source
    else:
        try:
            size = source.stat().st_size
            if size > MAX_BUNDLE_BYTES:
                raise BundleFormatError(f"{source}: {size} bytes, larger than the {MAX_BUNDLE_BYTES}-byte limit")
            data = source.read_bytes()
        except OSError as exc:
            raise BundleFormatError(f"{source}: cannot read bundle: {exc.strerror or exc}") from exc
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleFormatError(f"bundle is {len(data)} bytes, larger than the {MAX_BUNDLE_BYTES}-byte limit")
    return data


def install_bundle(data_dir: DataDir, source: Path | bytes, *, target: str | None = None) -> InstallResult:
    """Verify, stage, self-test and activate a bundle (see the module docstring).

    Args:
        target: the device's target; defaults to the one recorded in the state (set by the
            first install or by ``run``).

    Raises:
        BundleError: the bundle does not verify (tampered, untrusted key, expired, malformed).
        WrongTargetError, RollbackError, SelfTestError: verified but not acceptable here.
        StateCorruptedError: the state file is damaged (nothing is changed).
        InputError: no target known.
        AgentError: the slot or the state cannot be written.
    """
    state = data_dir.load_state()
    device_target = target or state.target
    if device_target is None:
        raise InputError("this device's target is unknown: pass --target (it is then recorded in the data directory)")
    if state.target is not None and target is not None and target != state.target:
        raise WrongTargetError(f"this device is a {state.target!r} device; --target {target!r} does not match")
    data = read_bundle(source)
    trusted = data_dir.trusted_keys()
    if not trusted:
        raise BundleError(f"the trust store {data_dir.trust_dir} is empty: add the release key with `edgeops-agent trust add`")
    manifest, _ = verify_members(read_members(data), trusted)
    if manifest.target != device_target:
        raise WrongTargetError(f"bundle is built for target {manifest.target!r}, this device is {device_target!r}")
    floor = state.highest_release.get(manifest.name)
    if floor is not None and manifest.release <= floor:
        raise RollbackError(
            f"release {manifest.release} of {manifest.name!r} is not newer than the highest installed release {floor}"
        )
    slot = state.inactive_slot()
    path = data_dir.slot_path(slot)
    try:
        write_durably(path, data)
    except OSError as exc:
        raise AgentError(f"{path}: cannot write the bundle: {exc.strerror or exc}") from exc
    # Verify what is on disk, not what is in memory: the slot is what the agent will run.
    model = LoadedModel.from_bundle(read_bundle(path), trusted)
    tests = model.self_test()
    info = SlotInfo(
        name=manifest.name,
        version=manifest.version,
        release=manifest.release,
        target=manifest.target,
        runtime=manifest.runtime,
        sha256=model.digest,
        installed=format_time(datetime.now(UTC).replace(microsecond=0)),
    )
    new = AgentState(
        target=device_target,
        active=slot,
        slots={**state.slots, slot: info},
        highest_release={**state.highest_release, manifest.name: manifest.release},
        last_error=None,
    )
    data_dir.save_state(new)  # the commit point
    return InstallResult(
        slot=slot,
        name=manifest.name,
        version=manifest.version,
        release=manifest.release,
        previous_release=floor,
        self_tests=tests,
        model=model,
    )


def record_error(data_dir: DataDir, state: AgentState, message: str) -> None:
    """Remember the last error in the state (best effort: a failure to write is ignored)."""
    state.last_error = message[:500]
    with contextlib.suppress(AgentError):
        data_dir.save_state(state)
