"""Revert as a new release: ship an earlier release's model again under a higher number.

Devices refuse any release not newer than the highest they ever installed (anti-rollback),
so a bad release is never taken back by re-sending the old bundle. As TUF and Uptane do,
the earlier model is signed again as a *new* release: numbers only ever go up, and a
device moves forward onto the old model. ``edgeops release revert NAME --to N``:

* reads release ``N`` from the registry and checks its bundle before anything is signed:
  the file is still the one recorded (same sha256), and it verifies with
  :mod:`edgeops_core` (the device's code) against the trusted keys *as of its creation*,
  since renewing an expired release is one reason to revert to it;
* copies its manifest, changing only ``release`` (the registry's last + 1), ``version``
  (see :func:`revert_version`), ``created``/``expires`` (now, and the earlier release's
  lifetime from now), ``lineage.parent_release`` (the release reverted from, the current
  last) and ``lineage.reverted_to`` (``N``); the model member is ``N``'s bytes, unchanged;
* signs it with the same code as ``edgeops build`` (``model_signing``), verifies the signed
  bytes with :mod:`edgeops_core`, records the release (the registry's write transaction
  re-checks the number) and only then writes the file, atomically.

Errors::

    InputError (edgeops_core)
    └── RevertError          nothing to revert to: unknown name, target or release, or N is the latest
    BundleError (edgeops_core)
    └── RevertSourceError    release N's bundle is missing, replaced, or no longer verifies
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from edgeops_core import (
    BundleError,
    InputError,
    Manifest,
    SignatureError,
    TrustedKey,
    format_time,
    load_public_key,
    pack_bundle,
    parse_time,
    read_bundle_file,
    verify_bundle,
    write_atomically,
)
from edgeops_toolchain.errors import BuildError
from edgeops_toolchain.keyring import check_signing_key
from edgeops_toolchain.registry import Registry, ReleaseRecord
from edgeops_toolchain.signing import dev_key, load_signing_key, sign_members

__all__ = ["RevertError", "RevertResult", "RevertSourceError", "revert_release", "revert_version"]


class RevertError(InputError):
    """The revert asks for something the registry cannot give: an unknown name, target or
    release, an ambiguous target, or the latest release itself (nothing to revert)."""


class RevertSourceError(BundleError):
    """The bundle of the release to revert to is missing, was replaced, or no longer verifies."""


@dataclass(frozen=True)
class RevertResult:
    """A revert that was signed, recorded and written.

    Attributes:
        bundle_path: the new bundle file.
        manifest: its manifest (``release`` is the new number, ``lineage.reverted_to`` the old).
        bundle_sha256: sha256 hex of the new bundle file.
        model_sha256: sha256 hex of the model member, equal to the reverted-to release's.
        signer: fingerprint of the key that signed it.
        public_key: the public key file that verifies it when the development key signed
            (``None`` when the caller passed ``key``).
        dev_key_created: the development key was created by this call.
    """

    bundle_path: Path
    manifest: Manifest
    bundle_sha256: str
    model_sha256: str
    signer: str
    public_key: Path | None
    dev_key_created: bool


def revert_version(version: str, *, release: int, reverted_to: int) -> str:
    """The version string of a revert: the earlier version with SemVer build metadata.

    Release 3, version ``0.3.1``, shipped again as release 7 is ``0.3.1+release.7.reverts-to.3``.
    Build metadata does not change SemVer precedence, which is the truth:
    the model is the earlier version's, byte for byte. A version bump would claim changes
    that do not exist and could collide with the project's next real version. Any build
    metadata the earlier version carried (a revert of a revert) is replaced, because SemVer
    allows one ``+`` section. The release number in it keeps bundle file names unique.
    """
    base = version.split("+", 1)[0]
    return f"{base}+release.{release}.reverts-to.{reverted_to}"


def revert_release(
    name: str,
    *,
    to: int,
    target: str | None = None,
    registry: Path | None = None,
    key: Path | None = None,
    verify_keys: Sequence[Path] = (),
    out_dir: Path = Path("dist"),
) -> RevertResult:
    """Sign release ``to`` of ``name`` again as the next release and record it.

    Args:
        name: the bundle name (``vibration-classifier``).
        to: the earlier release whose model is shipped again.
        target: the target; may be left out when ``name`` has releases for one target only.
        registry: the registry file (default ``$EDGEOPS_REGISTRY`` or ``$EDGEOPS_HOME/registry.sqlite``).
        key: private signing key; ``None`` uses (and on first use creates) the development key.
        verify_keys: public keys the earlier bundle is verified against (default: the public
            half of ``key``); needed when the earlier release was signed by another key.
        out_dir: where the new bundle is written (created if needed).

    Raises:
        RevertError: unknown name, target or release, ambiguous target, or ``to`` is the latest.
        RevertSourceError: release ``to``'s bundle is missing, replaced, or does not verify.
        KeyFileError: a key cannot be used.
        SigningError: model_signing failed.
        RegistryError: the registry is unusable, or a concurrent build took the number.
        BuildError: the bundle cannot be written.
    """
    with Registry(registry) as reg:
        target = _resolve_target(reg, name, target)
        last = reg.last_release(name, target)
        record = _release_to_revert_to(reg, name, target, to, last)
        # Keys only once the request makes sense: a refused revert creates no development key.
        public: Path | None = None
        created_key = False
        if key is None:
            pair, created_key = dev_key()
            key, public = pair.private, pair.public
        signer = load_signing_key(key)
        release_keys = check_signing_key(signer, source=str(key))  # as a build: devices must take the key
        trusted = [load_public_key(p) for p in verify_keys] or [signer]
        earlier = _verified_source(record, trusted)
        manifest = _revert_manifest(earlier.manifest, release=last + 1, parent=last, reverted_to=to)
        # The host's current list, not the one the earlier release carried.
        manifest = dataclasses.replace(manifest, release_keys=release_keys)
        model = earlier.model
        stem = manifest.bundle_filename().removesuffix(".edgeops")
        members = {"manifest.json": manifest.to_json(), manifest.model_file: model}
        signature = sign_members(members, key, subject=stem)
        data = pack_bundle({**members, "model.sig": signature}, mtime=int(parse_time(manifest.created).timestamp()))
        verify_bundle(data, [signer])  # the device's own check, before anything leaves
        digest = hashlib.sha256(data).hexdigest()
        # Absolute, so a later revert to this release finds it from any working directory.
        path = out_dir.resolve() / manifest.bundle_filename()
        # Record before writing, as builds do: a failed write skips a number, which devices
        # tolerate; handing the same number out twice they would not.
        reg.record_release(manifest, bundle_sha256=digest, path=path, report_path=None, signer=signer.fingerprint)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomically(path, data)
    except OSError as exc:
        raise BuildError(f"{out_dir}: cannot write the bundle: {exc.strerror or exc}") from exc
    return RevertResult(
        bundle_path=path,
        manifest=manifest,
        bundle_sha256=digest,
        model_sha256=hashlib.sha256(model).hexdigest(),
        signer=signer.fingerprint,
        public_key=public,
        dev_key_created=created_key,
    )


def _resolve_target(reg: Registry, name: str, target: str | None) -> str:
    rows = reg.releases(name=name)
    if not rows:
        raise RevertError(f"the registry {reg.path} has no release of {name!r}; see `edgeops registry list`")
    targets = sorted({r.target for r in rows})
    if target is None:
        if len(targets) > 1:
            raise RevertError(f"{name!r} has releases for targets {', '.join(targets)}; pass --target")
        return targets[0]
    if target not in targets:
        raise RevertError(f"the registry has no release of {name!r} for target {target!r} (it has {', '.join(targets)})")
    return target


def _release_to_revert_to(reg: Registry, name: str, target: str, to: int, last: int) -> ReleaseRecord:
    if to == last:
        raise RevertError(f"release {to} is already the latest release of {name!r} for {target!r}; nothing to revert")
    record = reg.release(name, target, to) if to >= 1 else None
    if record is None:
        known = ", ".join(str(r.release) for r in reversed(reg.releases(name=name, target=target)))
        raise RevertError(f"the registry has no release {to} of {name!r} for target {target!r} (recorded: {known})")
    return record


def _verified_source(record: ReleaseRecord, trusted: Sequence[TrustedKey]) -> _Source:
    """Release ``record``'s bundle, checked to be the recorded file and to verify."""
    which = f"release {record.release} of {record.name!r} for {record.target!r}"
    path = Path(record.path)
    if not path.exists():
        raise RevertSourceError(f"{which}: its bundle {path} is missing; restore it (or rebuild) before reverting to it")
    try:
        data = read_bundle_file(path)
    except BundleError as exc:
        raise RevertSourceError(f"{which}: {exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != record.bundle_sha256:
        raise RevertSourceError(
            f"{which}: {path} is no longer the bundle recorded for it (sha256 {digest[:16]}…, recorded "
            f"{record.bundle_sha256[:16]}…); it was replaced or modified"
        )
    try:
        # As of its creation: the signature, digests and schema must hold; its own expiry is
        # exactly what a revert may renew.
        verified = verify_bundle(data, trusted, now=parse_time(record.created))
    except BundleError as exc:
        hint = "; pass the key that signed it with --verify-key" if isinstance(exc, SignatureError) else ""
        raise RevertSourceError(f"{which}: {path} no longer verifies: {exc}{hint}") from exc
    m = verified.manifest
    if (m.name, m.target, m.release) != (record.name, record.target, record.release):
        raise RevertSourceError(
            f"{which}: {path} holds release {m.release} of {m.name!r} for {m.target!r}, not the recorded release"
        )
    return _Source(manifest=m, model=verified.model)


@dataclass(frozen=True)
class _Source:
    manifest: Manifest
    model: bytes


def _revert_manifest(earlier: Manifest, *, release: int, parent: int, reverted_to: int) -> Manifest:
    """The earlier manifest with only the fields a revert changes (module docstring)."""
    created = datetime.now(UTC).replace(microsecond=0)
    lifetime = parse_time(earlier.expires) - parse_time(earlier.created)
    return dataclasses.replace(
        earlier,
        release=release,
        version=revert_version(earlier.version, release=release, reverted_to=reverted_to),
        created=format_time(created),
        expires=format_time(created + lifetime),
        lineage=dataclasses.replace(earlier.lineage, parent_release=parent, reverted_to=reverted_to),
    )
