"""The bundle file: one uncompressed tar of exactly three members.

``<name>-<version>-<target>.edgeops`` holds ``manifest.json``, the model
(``model.onnx`` or ``model.tflite``) and ``model.sig``, as regular files at the top level,
in that order. Nothing else: no directories, links, devices, absolute or ``..`` paths,
duplicate names or trailing data members. :func:`verify_bundle` checks, in order:

1. the tar structure and the exact member set (:class:`BundleFormatError`);
2. ``model.sig`` against the trusted keys (:class:`SignatureError`);
3. that the signed statement lists exactly the other members and each sha256 matches
   (:class:`DigestMismatchError`, naming the member);
4. the manifest schema (:class:`ManifestError`) and that it names the model member present;
5. ``expires`` is in the future (:class:`ExpiredBundleError`).

Device-only checks (target, anti-rollback, self-test) belong to the agent.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from edgeops_core.digest import sha256_hex
from edgeops_core.errors import (
    BundleFormatError,
    DigestMismatchError,
    ExpiredBundleError,
    ManifestError,
)
from edgeops_core.manifest import Manifest
from edgeops_core.signature import SIGNATURE_MEMBER, TrustedKey, verify_signature

__all__ = [
    "MANIFEST_MEMBER",
    "MAX_BUNDLE_BYTES",
    "MODEL_MEMBERS",
    "VerifiedBundle",
    "pack_bundle",
    "read_members",
    "verify_bundle",
    "verify_members",
    "write_atomically",
]

MANIFEST_MEMBER = "manifest.json"
MODEL_MEMBERS = ("model.onnx", "model.tflite")
#: Largest bundle accepted, so a hostile file cannot exhaust a device's memory.
MAX_BUNDLE_BYTES = 256 * 1024 * 1024
_ALLOWED = {MANIFEST_MEMBER, SIGNATURE_MEMBER, *MODEL_MEMBERS}


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose signature, digests, member set, manifest and expiry all checked out.

    Attributes:
        manifest: the parsed manifest.
        model: the model file's bytes.
        digest: sha256 hex of the whole bundle file.
        signer: fingerprint of the trusted key that signed it.
    """

    manifest: Manifest
    model: bytes
    digest: str
    signer: str


def read_members(data: bytes) -> dict[str, bytes]:
    """Parse bundle bytes into ``{member name: content}``, enforcing the member rules.

    Raises:
        BundleFormatError: not an uncompressed tar, or a member breaks the rules above.
    """
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleFormatError(f"bundle is {len(data)} bytes, over the {MAX_BUNDLE_BYTES}-byte limit")
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                name = info.name
                if name not in _ALLOWED:
                    raise BundleFormatError(
                        f"unexpected member {name!r}; a bundle holds only "
                        f"{MANIFEST_MEMBER}, one of {'/'.join(MODEL_MEMBERS)} and {SIGNATURE_MEMBER}",
                        member=name,
                    )
                if not info.isreg():
                    raise BundleFormatError(f"member {name!r} is not a regular file", member=name)
                if name in members:
                    raise BundleFormatError(f"member {name!r} appears twice", member=name)
                handle = tar.extractfile(info)
                if handle is None:  # pragma: no cover - isreg() above guarantees a file
                    raise BundleFormatError(f"member {name!r} has no content", member=name)
                members[name] = handle.read()
    except tarfile.TarError as exc:
        raise BundleFormatError(f"not a readable uncompressed tar: {exc}") from exc
    except EOFError as exc:
        raise BundleFormatError(f"truncated tar: {exc}") from exc
    models = [m for m in MODEL_MEMBERS if m in members]
    missing = [m for m in (MANIFEST_MEMBER, SIGNATURE_MEMBER) if m not in members]
    if missing:
        raise BundleFormatError(f"missing member {missing[0]}", member=missing[0])
    if len(models) != 1:
        raise BundleFormatError(f"expected exactly one model member ({' or '.join(MODEL_MEMBERS)}), got {len(models)}")
    return members


def verify_members(
    members: Mapping[str, bytes], trusted: Iterable[TrustedKey], *, now: datetime | None = None
) -> tuple[Manifest, TrustedKey]:
    """Verify already-read members (see the module docstring for the order of checks).

    Raises:
        SignatureError, DigestMismatchError, ManifestError, ExpiredBundleError,
        BundleFormatError: see the module docstring.
    """
    extra = sorted(set(members) - _ALLOWED)
    if extra:
        raise BundleFormatError(f"unexpected member {extra[0]!r}", member=extra[0])
    if SIGNATURE_MEMBER not in members:
        raise BundleFormatError(f"missing member {SIGNATURE_MEMBER}", member=SIGNATURE_MEMBER)
    signed, key = verify_signature(members[SIGNATURE_MEMBER], trusted)
    present = {name for name in members if name != SIGNATURE_MEMBER}
    for name in sorted(present | set(signed)):
        if name not in signed:
            raise DigestMismatchError(f"member {name!r} is not covered by the signature", member=name)
        if name not in present:
            raise DigestMismatchError(f"signed member {name!r} is missing from the bundle", member=name)
        actual = sha256_hex(members[name])
        if actual != signed[name]:
            raise DigestMismatchError(
                f"member {name!r} was modified: sha256 {actual[:16]}… does not match the signed {signed[name][:16]}…",
                member=name,
            )
    manifest = Manifest.from_json(members[MANIFEST_MEMBER])
    if manifest.model_file not in members:
        raise ManifestError(
            f"manifest.json names model_file {manifest.model_file!r}, which is not in the bundle", member=MANIFEST_MEMBER
        )
    moment = now or datetime.now(UTC)
    if manifest.expires_at <= moment:
        raise ExpiredBundleError(f"bundle expired at {manifest.expires}", member=MANIFEST_MEMBER)
    return manifest, key


def verify_bundle(source: Path | bytes, trusted: Iterable[TrustedKey], *, now: datetime | None = None) -> VerifiedBundle:
    """Read and fully verify a bundle file (or its bytes).

    Raises:
        BundleFormatError: unreadable file or bad structure; or any error of
            :func:`verify_members`.
    """
    if isinstance(source, Path):
        try:
            data = source.read_bytes()
        except OSError as exc:
            raise BundleFormatError(f"{source}: cannot read bundle: {exc.strerror or exc}") from exc
    else:
        data = source
    members = read_members(data)
    manifest, key = verify_members(members, trusted, now=now)
    return VerifiedBundle(manifest=manifest, model=members[manifest.model_file], digest=sha256_hex(data), signer=key.fingerprint)


def pack_bundle(members: Mapping[str, bytes], *, mtime: int = 0) -> bytes:
    """Pack members into bundle bytes, deterministically (fixed order, owner and mode).

    Raises:
        BundleFormatError: the member set is not exactly a manifest, one model and a signature.
    """
    read_members_order = [MANIFEST_MEMBER, *[m for m in MODEL_MEMBERS if m in members], SIGNATURE_MEMBER]
    if set(members) != set(read_members_order) or len(read_members_order) != 3:
        raise BundleFormatError(f"cannot pack members {sorted(members)}: need manifest.json, one model and model.sig")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in read_members_order:
            info = tarfile.TarInfo(name)
            info.size = len(members[name])
            info.mode = 0o644
            info.mtime = mtime
            tar.addfile(info, io.BytesIO(members[name]))
    return buf.getvalue()


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync and rename: all or nothing."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
