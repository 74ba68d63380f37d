"""The bundle file: one uncompressed tar of exactly three members, and nothing else.

``<name>-<version>-<target>.edgeops`` holds ``manifest.json``, the model
(``model.onnx`` or ``model.tflite``) and ``model.sig``, as regular files at the top level,
in that order, then the end-of-archive: two zero blocks and zeros up to the next
10240-byte record, exactly as :func:`pack_bundle` (``tarfile``) writes it. Every byte of
the file is either covered by the signature or fixed by these rules:

* each member header is exactly the one :func:`pack_bundle` writes for that name and size
  (owner 0:0, mode 0644, no link, no prefix, no pax or GNU extensions); only ``mtime`` is
  free, because the build stamps it;
* the padding after each member's content, the end-of-archive blocks and the record
  padding are all zero bytes;
* the file ends right there: a byte appended, a second archive appended, or a byte cut
  off (truncation) is a :class:`BundleFormatError`.

Memory is bounded: ``manifest.json`` may be at most :data:`MAX_MANIFEST_BYTES` and
``model.sig`` at most :data:`MAX_SIGNATURE_BYTES`; the whole file at most
:data:`MAX_BUNDLE_BYTES`, checked with ``fstat`` on the opened file before a byte is read.
:func:`verify_bundle_file` streams the model through sha256 and never holds it in memory.

The checks, in order:

1. the file is a regular file within the size limit, the tar structure and the exact
   member set and order (:class:`BundleFormatError`);
2. ``model.sig`` against the trusted keys (:class:`SignatureError`);
3. that the signed statement lists exactly the other members and each sha256 matches
   (:class:`DigestMismatchError`, naming the member);
4. the manifest schema (:class:`ManifestError`) and that it names the model member present;
5. ``expires`` is in the future (:class:`ExpiredBundleError`).

Device-only checks (target, anti-rollback, self-test) belong to the agent.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from edgeops_core.digest import sha256_hex, sha256_new
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
    "MAX_MANIFEST_BYTES",
    "MAX_SIGNATURE_BYTES",
    "MODEL_MEMBERS",
    "VerifiedBundle",
    "VerifiedBundleFile",
    "pack_bundle",
    "read_bundle_file",
    "read_manifest_member",
    "read_members",
    "verify_bundle",
    "verify_bundle_file",
    "verify_members",
    "write_atomically",
]

MANIFEST_MEMBER = "manifest.json"
MODEL_MEMBERS = ("model.onnx", "model.tflite")
#: Largest bundle accepted, so a hostile file cannot exhaust a device's memory.
MAX_BUNDLE_BYTES = 256 * 1024 * 1024
#: Largest ``manifest.json`` accepted. A real one is a few KiB; it is held in memory.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
#: Largest ``model.sig`` accepted. A real one is about 1.5 KiB; it is held in memory.
MAX_SIGNATURE_BYTES = 1024 * 1024
_ALLOWED = {MANIFEST_MEMBER, SIGNATURE_MEMBER, *MODEL_MEMBERS}
_MEMBER_LIMITS = {MANIFEST_MEMBER: MAX_MANIFEST_BYTES, SIGNATURE_MEMBER: MAX_SIGNATURE_BYTES}
_BLOCK = tarfile.BLOCKSIZE  # 512
_RECORD = tarfile.RECORDSIZE  # 10240: tarfile (and GNU tar) pad the archive to this
_ZERO_BLOCK = bytes(_BLOCK)
_CHUNK = 1024 * 1024  # read size when streaming the model
_ORDER_HINT = f"a bundle stores {MANIFEST_MEMBER}, the model, then {SIGNATURE_MEMBER}, in that order"


@dataclass(frozen=True)
class VerifiedBundleFile:
    """A bundle file verified by streaming; the model stays on disk.

    Attributes:
        path: the file that was verified.
        manifest: the parsed manifest.
        digest: sha256 hex of the whole file, as read during verification.
        signer: fingerprint of the trusted key that signed it.
        size: the file's size in bytes.
        model_offset: byte offset of the model member's content in the file.
        model_size: length of the model member's content in bytes.
        model_sha256: the signed (and checked) sha256 hex of the model member.
    """

    path: Path
    manifest: Manifest
    digest: str
    signer: str
    size: int
    model_offset: int
    model_size: int
    model_sha256: str

    def read_model(self) -> bytes:
        """Read the model member from the file and check it still has the signed digest.

        The file may have changed since it was verified, so the bytes are hashed again.

        Raises:
            BundleFormatError: the file can no longer be read as the same regular file.
            DigestMismatchError: the model bytes differ from the verified ones.
        """
        with _open_bundle(self.path) as fh:
            fh.seek(self.model_offset)
            model = fh.read(self.model_size)
        if len(model) != self.model_size or sha256_hex(model) != self.model_sha256:
            raise DigestMismatchError(
                f"{self.path}: member {self.manifest.model_file!r} changed after the bundle was verified",
                member=self.manifest.model_file,
            )
        return model


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose signature, digests, member set, manifest and expiry all checked out.

    Attributes:
        manifest: the parsed manifest.
        digest: sha256 hex of the whole bundle file.
        signer: fingerprint of the trusted key that signed it.
        model: the model file's bytes (see the property).
    """

    manifest: Manifest
    digest: str
    signer: str
    _model: bytes | None = field(default=None, repr=False, compare=False)
    _file: VerifiedBundleFile | None = field(default=None, repr=False, compare=False)

    @property
    def model(self) -> bytes:
        """The model file's bytes.

        For a bundle verified from a file, they are read (and their digest checked again)
        on each access, so verifying a file never holds the model in memory.

        Raises:
            BundleFormatError, DigestMismatchError: the file changed since it was verified.
        """
        if self._model is not None:
            return self._model
        if self._file is None:  # pragma: no cover - verify_bundle always sets one
            raise BundleFormatError("this verified bundle holds no model")
        return self._file.read_model()


@dataclass
class _Member:
    name: str
    offset: int
    size: int
    sha256: str
    content: bytes | None


@dataclass
class _Scan:
    members: list[_Member]
    size: int
    digest: str | None

    def member(self, name: str) -> _Member | None:
        return next((m for m in self.members if m.name == name), None)


class _Reader:
    """Reads exact byte counts from a stream, tracking the position and hashing the file."""

    def __init__(self, fh: BinaryIO, *, hash_file: bool) -> None:
        self.fh = fh
        self.pos = 0
        self.hash = sha256_new() if hash_file else None

    def exactly(self, n: int, what: str) -> bytes:
        data = self.fh.read(n)
        if len(data) != n:
            raise BundleFormatError(
                f"truncated bundle: expected {n} bytes of {what} at byte {self.pos}, the file ends after {len(data)}"
            )
        self._consume(data)
        return data

    def at_most(self, n: int) -> bytes:
        data = self.fh.read(n)
        self._consume(data)
        return data

    def _consume(self, data: bytes) -> None:
        self.pos += len(data)
        if self.hash is not None:
            self.hash.update(data)


def _canonical_header(name: str, size: int, mtime: int) -> bytes | None:
    """The header :func:`pack_bundle` writes for this member, or None if it cannot write one."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = mtime
    try:
        return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    except ValueError:  # mtime or size out of the ustar range
        return None


def _check_header(header: bytes, found: list[_Member], at: int) -> tuple[str, int]:
    """Validate one member header against the rules; returns (name, size)."""
    index = len(found)
    try:
        info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
    except tarfile.HeaderError as exc:
        if index >= 3:
            raise BundleFormatError(
                f"expected the end-of-archive (zero blocks) after {SIGNATURE_MEMBER} at byte {at}, found other bytes"
            ) from exc
        raise BundleFormatError(f"not a readable uncompressed tar: {exc} at byte {at}") from exc
    name = info.name
    if name not in _ALLOWED:
        raise BundleFormatError(
            f"unexpected member {name!r}; a bundle holds only "
            f"{MANIFEST_MEMBER}, one of {'/'.join(MODEL_MEMBERS)} and {SIGNATURE_MEMBER}",
            member=name,
        )
    if not info.isreg():
        raise BundleFormatError(f"member {name!r} is not a regular file", member=name)
    names = [m.name for m in found]
    if name in names:
        raise BundleFormatError(f"member {name!r} appears twice", member=name)
    if name in MODEL_MEMBERS and any(n in MODEL_MEMBERS for n in names):
        raise BundleFormatError(f"expected exactly one model member ({' or '.join(MODEL_MEMBERS)}), got 2", member=name)
    if index >= 3:  # pragma: no cover - a fourth allowed name is a duplicate or a second model
        raise BundleFormatError(f"unexpected fourth member {name!r}", member=name)
    expected = ((MANIFEST_MEMBER,), MODEL_MEMBERS, (SIGNATURE_MEMBER,))[index]
    if name not in expected:
        raise BundleFormatError(f"member {name!r} is stored at position {index + 1}; {_ORDER_HINT}", member=name)
    if header != _canonical_header(name, info.size, int(info.mtime)):  # nti() always gives an int
        raise BundleFormatError(
            f"member {name!r} has a tar header edgeops does not write (owner, mode, type, link or other "
            "unsigned fields differ from pack_bundle's 0:0, 0644 regular file)",
            member=name,
        )
    return name, info.size


def _scan(fh: BinaryIO, *, keep_model: bool, hash_file: bool) -> _Scan:
    """Walk a bundle stream, enforcing every container rule of the module docstring.

    Member contents are hashed as they stream past; the manifest and the signature (both
    small, capped) are kept, the model only when ``keep_model``.
    """
    reader = _Reader(fh, hash_file=hash_file)
    found: list[_Member] = []
    while True:
        at = reader.pos
        header = reader.exactly(_BLOCK, "a tar header")
        if header == _ZERO_BLOCK:
            break
        name, size = _check_header(header, found, at)
        limit = _MEMBER_LIMITS.get(name, MAX_BUNDLE_BYTES)
        if size > limit or reader.pos + size > MAX_BUNDLE_BYTES:
            raise BundleFormatError(
                f"member {name!r} is {size} bytes, over the {min(limit, MAX_BUNDLE_BYTES)}-byte limit", member=name
            )
        offset = reader.pos
        digest = sha256_new()
        keep = keep_model or name in _MEMBER_LIMITS
        parts: list[bytes] = []
        remaining = size
        while remaining:
            chunk = reader.exactly(min(_CHUNK, remaining), f"member {name!r}")
            digest.update(chunk)
            if keep:
                parts.append(chunk)
            remaining -= len(chunk)
        pad = -size % _BLOCK
        if pad and reader.exactly(pad, f"the padding of {name!r}") != bytes(pad):
            raise BundleFormatError(f"member {name!r}: non-zero padding after its content (unsigned bytes)", member=name)
        found.append(_Member(name, offset, size, digest.hexdigest(), b"".join(parts) if keep else None))
    names = [m.name for m in found]
    for required in (MANIFEST_MEMBER, SIGNATURE_MEMBER):
        if required not in names:
            raise BundleFormatError(f"missing member {required}", member=required)
    if not any(n in MODEL_MEMBERS for n in names):
        raise BundleFormatError(f"expected exactly one model member ({' or '.join(MODEL_MEMBERS)}), got 0")
    # The first zero block is read; the rest of the file must be the second one and the
    # zero padding to the end of the record, exactly. Reading one byte more than that
    # tells "appended data" from "end of file" without reading an unbounded tail.
    expected = _BLOCK + (-(reader.pos + _BLOCK) % _RECORD)
    start = reader.pos
    tail = reader.at_most(expected + 1)
    extra_at = min(len(tail) - len(tail.lstrip(b"\0")), expected)
    if extra_at < len(tail):
        raise BundleFormatError(
            f"unsigned bytes in or after the end-of-archive at byte {start + extra_at}: a bundle ends with two zero "
            f"blocks padded with zeros to a {_RECORD}-byte record, and nothing after them"
        )
    if len(tail) < expected:
        raise BundleFormatError(
            f"truncated bundle: the end-of-archive is {len(tail) + _BLOCK} bytes, expected {expected + _BLOCK}"
        )
    return _Scan(found, reader.pos, None if reader.hash is None else reader.hash.hexdigest())


def read_manifest_member(source: Path | bytes) -> bytes:
    """The bytes of ``manifest.json``, the first member, **unverified**; nothing else is read.

    For metadata that must be looked at before the signature is checked: a release-key list
    the manifest carries (:mod:`edgeops_core.trust`) is signed by the root on its own, so it
    can be applied first and the bundle then verified against the keys it lists. The header
    is held to the same rules as in a full verification; trust nothing else in the result.

    Raises:
        BundleFormatError: unreadable, not a regular file, or the first member is not a
            well-formed ``manifest.json`` within :data:`MAX_MANIFEST_BYTES`.
    """
    with contextlib.ExitStack() as stack:
        fh: BinaryIO = io.BytesIO(source) if isinstance(source, bytes) else stack.enter_context(_open_bundle(source))
        reader = _Reader(fh, hash_file=False)
        try:
            name, size = _check_header(reader.exactly(_BLOCK, "a tar header"), [], 0)
            if size > MAX_MANIFEST_BYTES:
                raise BundleFormatError(f"member {name!r} is {size} bytes, over the {MAX_MANIFEST_BYTES}-byte limit", member=name)
            return reader.exactly(size, f"member {name!r}")
        except OSError as exc:
            raise BundleFormatError(f"{source if isinstance(source, Path) else 'bundle'}: cannot read: {exc}") from exc


def read_members(data: bytes) -> dict[str, bytes]:
    """Parse bundle bytes into ``{member name: content}``, enforcing the container rules.

    Raises:
        BundleFormatError: not an uncompressed tar, a member breaks the rules above, or
            bytes after the end-of-archive or missing from its end.
    """
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleFormatError(f"bundle is {len(data)} bytes, over the {MAX_BUNDLE_BYTES}-byte limit")
    scan = _scan(io.BytesIO(data), keep_model=True, hash_file=False)
    return {m.name: m.content for m in scan.members if m.content is not None}


def _verify_digests(
    digests: Mapping[str, str], signature: bytes, manifest_json: bytes, trusted: Iterable[TrustedKey], now: datetime | None
) -> tuple[Manifest, TrustedKey]:
    """Checks 2-5 of the module docstring, given the sha256 of every member but model.sig."""
    signed, key = verify_signature(signature, trusted)
    for name in sorted(set(digests) | set(signed)):
        if name not in signed:
            raise DigestMismatchError(f"member {name!r} is not covered by the signature", member=name)
        if name not in digests:
            raise DigestMismatchError(f"signed member {name!r} is missing from the bundle", member=name)
        actual = digests[name]
        if actual != signed[name]:
            raise DigestMismatchError(
                f"member {name!r} was modified: sha256 {actual[:16]}… does not match the signed {signed[name][:16]}…",
                member=name,
            )
    manifest = Manifest.from_json(manifest_json)
    if manifest.model_file not in digests:
        raise ManifestError(
            f"manifest.json names model_file {manifest.model_file!r}, which is not in the bundle", member=MANIFEST_MEMBER
        )
    moment = now or datetime.now(UTC)
    if manifest.expires_at <= moment:
        raise ExpiredBundleError(f"bundle expired at {manifest.expires}", member=MANIFEST_MEMBER)
    return manifest, key


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
    for required in (SIGNATURE_MEMBER, MANIFEST_MEMBER):
        if required not in members:
            raise BundleFormatError(f"missing member {required}", member=required)
    digests = {name: sha256_hex(data) for name, data in members.items() if name != SIGNATURE_MEMBER}
    return _verify_digests(digests, members[SIGNATURE_MEMBER], members[MANIFEST_MEMBER], trusted, now)


def _kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def _check_stat(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise BundleFormatError(f"{path}: not a regular file ({_kind(st.st_mode)}); a bundle is a regular file")
    if st.st_size > MAX_BUNDLE_BYTES:
        raise BundleFormatError(f"{path}: {st.st_size} bytes, over the {MAX_BUNDLE_BYTES}-byte limit")


def _open_bundle(path: Path) -> BinaryIO:
    """Open a bundle for reading, refusing anything but a regular file within the size limit.

    ``stat`` first, so a FIFO is never opened (opening one blocks until a writer comes);
    then ``fstat`` on the opened descriptor, because the path may have been swapped in
    between. ``O_NONBLOCK`` keeps that swapped-in FIFO from blocking the open itself.

    Raises:
        BundleFormatError: missing, unreadable, not a regular file, or too large.
    """
    try:
        _check_stat(path, os.stat(path))
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise BundleFormatError(f"{path}: cannot read bundle: {exc.strerror or exc}") from exc
    try:
        _check_stat(path, os.fstat(fd))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bundle_file(path: Path) -> bytes:
    """Read a whole bundle file into memory, safely: for callers that need the bytes.

    The type and size are checked on the opened descriptor before reading (so a FIFO,
    ``/dev/zero``, a directory or a 2 GiB file is refused at once), and at most
    :data:`MAX_BUNDLE_BYTES` + 1 bytes are ever read, even if the file grows meanwhile.
    Prefer :func:`verify_bundle_file` when the model need not be in memory.

    Raises:
        BundleFormatError: missing, unreadable, not a regular file, or over the limit.
    """
    with _open_bundle(path) as fh:
        try:
            data = fh.read(MAX_BUNDLE_BYTES + 1)
        except OSError as exc:
            raise BundleFormatError(f"{path}: cannot read bundle: {exc.strerror or exc}") from exc
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleFormatError(f"{path}: over the {MAX_BUNDLE_BYTES}-byte limit (it grew while being read)")
    return data


def verify_bundle_file(path: Path, trusted: Iterable[TrustedKey], *, now: datetime | None = None) -> VerifiedBundleFile:
    """Verify a bundle file by streaming it: memory stays bounded whatever the model's size.

    The file's type and size are checked on the open descriptor before anything is read;
    the model is hashed in 1 MiB chunks and never held, and only ``manifest.json`` (at most
    :data:`MAX_MANIFEST_BYTES`) and ``model.sig`` (at most :data:`MAX_SIGNATURE_BYTES`) are
    kept. The whole-file sha256 is computed in the same pass.

    Args:
        path: the bundle file.
        trusted: keys whose signatures are accepted.
        now: the moment to check ``expires`` against (default: the current time).

    Returns:
        The verified manifest, file digest, signer and where the model lies in the file.

    Raises:
        BundleFormatError: unreadable, not a regular file, too large, or a container rule
            broken; or any error of :func:`verify_members`.
    """
    with _open_bundle(path) as fh:
        try:
            scan = _scan(fh, keep_model=False, hash_file=True)
        except OSError as exc:
            raise BundleFormatError(f"{path}: cannot read bundle: {exc.strerror or exc}") from exc
    manifest_json = scan.member(MANIFEST_MEMBER)
    signature = scan.member(SIGNATURE_MEMBER)
    if manifest_json is None or manifest_json.content is None or signature is None or signature.content is None:
        raise BundleFormatError("missing manifest or signature")  # pragma: no cover - _scan checks it
    digests = {m.name: m.sha256 for m in scan.members if m.name != SIGNATURE_MEMBER}
    manifest, key = _verify_digests(digests, signature.content, manifest_json.content, trusted, now)
    model = scan.member(manifest.model_file)
    if model is None or scan.digest is None:  # pragma: no cover - _verify_digests checks it
        raise BundleFormatError(f"missing member {manifest.model_file}")
    return VerifiedBundleFile(
        path=path,
        manifest=manifest,
        digest=scan.digest,
        signer=key.fingerprint,
        size=scan.size,
        model_offset=model.offset,
        model_size=model.size,
        model_sha256=model.sha256,
    )


def verify_bundle(source: Path | bytes, trusted: Iterable[TrustedKey], *, now: datetime | None = None) -> VerifiedBundle:
    """Fully verify a bundle file (streaming, see :func:`verify_bundle_file`) or its bytes.

    Raises:
        BundleFormatError: unreadable file or bad structure; or any error of
            :func:`verify_members`.
    """
    if isinstance(source, Path):
        verified = verify_bundle_file(source, trusted, now=now)
        return VerifiedBundle(manifest=verified.manifest, digest=verified.digest, signer=verified.signer, _file=verified)
    members = read_members(source)
    manifest, key = verify_members(members, trusted, now=now)
    return VerifiedBundle(
        manifest=manifest, digest=sha256_hex(source), signer=key.fingerprint, _model=members[manifest.model_file]
    )


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
