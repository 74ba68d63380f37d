"""The host's half of root and release keys: make, sign and keep the trust metadata (docs/security.md).

Devices check the metadata with :mod:`edgeops_core.trust`; this module writes it. Files::

    $EDGEOPS_HOME/trust/root.json             the current root (public): what devices are provisioned with
    $EDGEOPS_HOME/trust/roots/<N>.root.json   every root version, so a device on an old root catches up
    $EDGEOPS_HOME/trust/release-keys.json     the current release-key list; every build embeds it
    $EDGEOPS_HOME/keys/dev-signing.pem        the key builds sign with by default: the current release key
    $EDGEOPS_HOME/keys/retired/<id16>.pem     release keys `keys rotate` replaced

``edgeops keys root init --out DIR`` writes the root's private keys to ``DIR/root-<i>.pem``
(mode 0600) and nowhere else: they are meant to go offline, and every command that signs as
the root takes them back with ``--root-key``.

Invariants:

* every document is checked with the device's own functions (:func:`~edgeops_core.trust.verify_root`,
  :func:`~edgeops_core.trust.verify_root_update`, :func:`~edgeops_core.trust.verify_release_keys`)
  before anything is written, so the host never publishes what a device would refuse;
* signing as the root is refused unless the ``--root-key`` files are keys of the current root
  and at least its threshold of them (the same threshold a device counts);
* versions only go up by one per document, so a device accepts every list in order.
"""

from __future__ import annotations

import base64
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeops_core import CommandError, InputError, KeyFileError, TrustedKey, format_time, write_atomically
from edgeops_core.messages import trust_update_command
from edgeops_core.trust import (
    MAX_KEYS,
    MAX_ROOT_CHAIN,
    RELEASE_KEYS_TYPE,
    ROOT_TYPE,
    SPEC_VERSION,
    ReleaseKeyList,
    RootMetadata,
    TrustError,
    canonical_bytes,
    load_metadata,
    parse_release_keys,
    parse_root,
    verify_release_keys,
    verify_root,
    verify_root_update,
)
from edgeops_toolchain.errors import SigningError
from edgeops_toolchain.signing import dev_key, edgeops_home, load_signing_key

if TYPE_CHECKING:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

__all__ = [
    "DEFAULT_EXPIRES_DAYS",
    "HostTrust",
    "InitResult",
    "RootKey",
    "RootRotation",
    "RotateResult",
    "check_signing_key",
    "init_root",
    "load_host_trust",
    "load_root_key",
    "renew_release_keys",
    "revoke_release_key",
    "rotate_release_key",
    "rotate_root",
    "trust_dir",
]

#: How long a new root or list stays valid unless ``--expires-days`` says otherwise.
DEFAULT_EXPIRES_DAYS = 365


def trust_dir() -> Path:
    """``$EDGEOPS_HOME/trust``."""
    return edgeops_home() / "trust"


@dataclass(frozen=True)
class RootKey:
    """A root private key loaded from ``--root-key`` (or just generated)."""

    private: ec.EllipticCurvePrivateKey
    keyid: str
    pem: str
    path: Path


@dataclass(frozen=True)
class HostTrust:
    """The host's current root and release-key list (``$EDGEOPS_HOME/trust``)."""

    root: RootMetadata
    release_keys: ReleaseKeyList | None
    folder: Path

    def root_history(self) -> list[RootMetadata]:
        """Every stored root version, oldest first (the current one last).

        Raises:
            TrustError: a stored root is damaged.
        """
        found: dict[int, RootMetadata] = {}
        for path in (self.folder / "roots").glob("*.root.json"):
            doc = _read_doc(path, parse_root)
            # A copy above root.json is a rotation that stopped before root.json was written
            # (disk full): never published, and redone (same version) by the next rotation.
            if doc.version < self.root.version:
                found[doc.version] = doc
        found[self.root.version] = self.root
        return [found[v] for v in sorted(found)]

    def update_documents(self) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        """What a ``trust_update`` carries: the current list and the newest roots, oldest first.

        As many roots as one command holds (:data:`~edgeops_core.messages.MAX_COMMAND_BYTES`,
        :data:`~edgeops_core.trust.MAX_ROOT_CHAIN`): a device applies the chain from its own
        version in one update, and cannot take it in parts (see ``MAX_ROOT_CHAIN``). A device
        whose root is older than the first one sent must be provisioned again
        (:meth:`oldest_reachable_root`).
        """
        return self._fit()

    def oldest_reachable_root(self) -> int:
        """The oldest root version a device may have and still catch up with :meth:`update_documents`."""
        roots, _ = self._fit()
        return max(1, int(roots[0]["signed"]["version"]) - 1) if roots else self.root.version

    def _fit(self) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        listed = self.release_keys.to_dict() if self.release_keys is not None else None
        history = [r.to_dict() for r in self.root_history()[-MAX_ROOT_CHAIN:]]
        # Drop the oldest roots until the command fits (a 3-key root is about 2 KiB).
        for start in range(len(history)):
            try:
                trust_update_command(history[start:], listed, command_id="size-check")
            except CommandError:
                continue
            return history[start:], listed
        return history[-1:], listed  # the newest alone; trust_update_command names the size


def _read_doc(path: Path, parse: Any) -> Any:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TrustError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        return parse(load_metadata(data, what=str(path)))
    except TrustError as exc:
        raise TrustError(f"{path}: {exc}") from exc


def load_host_trust(folder: Path | None = None) -> HostTrust | None:
    """The host's root and list, checked (the list against the root), or ``None`` without a root.

    Raises:
        TrustError: a file is damaged, or the list is not signed by a threshold of the root.
    """
    folder = folder or trust_dir()
    if not (folder / "root.json").exists():
        return None
    root = _read_doc(folder / "root.json", parse_root)
    listed = folder / "release-keys.json"
    doc = _read_doc(listed, parse_release_keys) if listed.exists() else None
    if doc is not None:
        try:
            verify_release_keys(root, doc, None, None)
        except TrustError as exc:
            raise TrustError(f"{listed}: {exc} (for {folder / 'root.json'})") from exc
    return HostTrust(root=root, release_keys=doc, folder=folder)


def _require_host() -> HostTrust:
    host = load_host_trust()
    if host is None:
        raise InputError(f"{trust_dir() / 'root.json'}: no root of trust on this host; make one with `edgeops keys root init`")
    return host


def _require_list(host: HostTrust) -> ReleaseKeyList:
    if host.release_keys is None:
        raise InputError(f"{host.folder / 'release-keys.json'}: no release-key list on this host")
    return host.release_keys


# -- keys ----------------------------------------------------------------------------------------


def _public_pem(private: ec.EllipticCurvePrivateKey) -> str:
    from cryptography.hazmat.primitives import serialization

    return private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def load_root_key(path: Path) -> RootKey:
    """Load a root private key (unencrypted PEM, ECDSA).

    Raises:
        KeyFileError: missing, unreadable, encrypted or not an ECDSA key.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    public = load_signing_key(path)  # the checks and messages of a signing key
    private = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(private, ec.EllipticCurvePrivateKey):  # pragma: no cover - load_signing_key checked it
        raise KeyFileError(f"{path}: expected an ECDSA private key")
    return RootKey(private=private, keyid=public.fingerprint, pem=_public_pem(private), path=path)


def _write_private(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    from cryptography.hazmat.primitives import serialization

    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise KeyFileError(f"{path} already exists; choose an empty folder") from exc
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot write the key: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)


def _generate_root_keys(folder: Path, n: int) -> list[RootKey]:
    """``n`` new P-256 keys as ``folder/root-<i>.pem`` (0600) and ``root-<i>.pub.pem``."""
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyFileError(f"{folder}: cannot create: {exc.strerror or exc}") from exc
    taken = sorted(folder.glob("root-*.pem"))
    if taken:
        raise KeyFileError(f"{folder} already holds root keys ({taken[0].name}); choose an empty folder")
    out = []
    for i in range(1, n + 1):
        private = ec.generate_private_key(ec.SECP256R1())
        path = folder / f"root-{i}.pem"
        _write_private(path, private)
        pem = _public_pem(private)
        (folder / f"root-{i}.pub.pem").write_text(pem)
        out.append(RootKey(private=private, keyid=TrustedKey.from_pem(pem.encode()).fingerprint, pem=pem, path=path))
    return out


def _signers(root: RootMetadata, paths: Sequence[Path]) -> list[RootKey]:
    """The ``--root-key`` files as keys of ``root``: each must be one, and at least ``threshold`` of them.

    Raises:
        InputError: a key that is not ``root``'s, or fewer than its threshold (signing is
            refused here as a device would refuse the result).
    """
    keys: dict[str, RootKey] = {}
    for path in paths:
        key = load_root_key(path)
        if key.keyid not in root.keys:
            raise InputError(f"{path}: key sha256:{key.keyid[:16]}… is not a key of root version {root.version}")
        keys[key.keyid] = key
    if len(keys) < root.threshold:
        raise InputError(
            f"root version {root.version} needs {root.threshold} of its keys to sign (its threshold), got {len(keys)}: "
            "pass --root-key for each"
        )
    return list(keys.values())


def _hash_for(curve: str) -> type[hashes.HashAlgorithm] | None:
    from cryptography.hazmat.primitives import hashes

    return {"secp256r1": hashes.SHA256, "secp384r1": hashes.SHA384, "secp521r1": hashes.SHA512}.get(curve)


def _sign(signed: Mapping[str, Any], keys: Sequence[RootKey]) -> dict[str, Any]:
    from cryptography.hazmat.primitives.asymmetric import ec

    message = canonical_bytes(signed)
    signatures = []
    for key in keys:
        algorithm = _hash_for(key.private.curve.name)
        if algorithm is None:
            raise KeyFileError(f"{key.path}: expected a P-256, P-384 or P-521 key, got {key.private.curve.name}")
        raw = key.private.sign(message, ec.ECDSA(algorithm()))
        signatures.append({"keyid": key.keyid, "sig": base64.b64encode(raw).decode("ascii")})
    return {"signed": dict(signed), "signatures": signatures}


def _expires(now: datetime, days: int) -> str:
    if not 1 <= days <= 3650:
        raise InputError(f"--expires-days must be 1..3650, got {days}")
    return format_time(now + timedelta(days=days))


def _root(version: int, keys: Sequence[RootKey], threshold: int, expires: str, signers: Sequence[RootKey]) -> RootMetadata:
    signed = {
        "_type": ROOT_TYPE,
        "spec_version": SPEC_VERSION,
        "version": version,
        "expires": expires,
        "keys": {k.keyid: k.pem for k in keys},
        "threshold": threshold,
    }
    return parse_root(_sign(signed, signers))


def _list(
    version: int, keys: Mapping[str, str], revoked: Sequence[str], expires: str, signers: Sequence[RootKey]
) -> ReleaseKeyList:
    signed = {
        "_type": RELEASE_KEYS_TYPE,
        "spec_version": SPEC_VERSION,
        "version": version,
        "expires": expires,
        "keys": dict(keys),
        "revoked": list(revoked),
    }
    return parse_release_keys(_sign(signed, signers))


def _signing_key(path: Path | None) -> tuple[TrustedKey, str]:
    """The current signing key (``path``, or the development key builds use) and its PEM."""
    if path is None:
        path = dev_key()[0].private
    key = load_signing_key(path)
    from cryptography.hazmat.primitives import serialization

    pem = key.key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return key, pem


def _current_signing_keyid() -> str | None:
    pair = edgeops_home() / "keys" / "dev-signing.pem"
    return load_signing_key(pair).fingerprint if pair.exists() else None


# -- writing --------------------------------------------------------------------------------------


def _save(host_folder: Path, *, root: RootMetadata | None = None, doc: ReleaseKeyList | None = None) -> None:
    """Write the host's files: the root's history copy first, then the list, then the current root.

    Stopped part-way, the files stay usable: a history copy above ``root.json`` is ignored
    (:meth:`HostTrust.root_history`), and a rotation's list is signed by the old root too.
    """
    try:
        (host_folder / "roots").mkdir(parents=True, exist_ok=True)
        if root is not None:
            write_atomically(host_folder / "roots" / f"{root.version}.root.json", root.to_json())
        if doc is not None:
            write_atomically(host_folder / "release-keys.json", doc.to_json())
        if root is not None:
            write_atomically(host_folder / "root.json", root.to_json())
    except OSError as exc:
        raise InputError(f"{host_folder}: cannot write the trust files: {exc.strerror or exc}") from exc


@dataclass(frozen=True)
class InitResult:
    """What ``keys root init`` made."""

    root: RootMetadata
    release_keys: ReleaseKeyList
    root_keys: tuple[Path, ...]
    out: Path


def init_root(
    out: Path,
    *,
    keys: int = 1,
    threshold: int = 1,
    expires_days: int = DEFAULT_EXPIRES_DAYS,
    signing_key: Path | None = None,
    now: datetime | None = None,
) -> InitResult:
    """Make a root of trust: ``keys`` root keys in ``out`` and root v1 + release-key list v1.

    The list holds the current signing key (``signing_key``, default the development key
    builds use). ``out`` gets the private keys (0600), ``root.json`` and
    ``release-keys.json``; ``$EDGEOPS_HOME/trust`` gets the two documents.

    Raises:
        InputError: the host has a root already, or ``keys``/``threshold`` out of range.
        KeyFileError: ``out`` holds root keys already, or the signing key is unusable.
    """
    moment = now or datetime.now(UTC)
    if load_host_trust() is not None:
        raise InputError(
            f"{trust_dir() / 'root.json'}: this host has a root of trust already; rotate it with `edgeops keys root rotate`"
        )
    if not 1 <= keys <= MAX_KEYS:
        raise InputError(f"--keys must be 1..{MAX_KEYS}, got {keys}")
    if not 1 <= threshold <= keys:
        raise InputError(f"--threshold must be 1..{keys} (the number of root keys), got {threshold}")
    expires = _expires(moment, expires_days)
    release, pem = _signing_key(signing_key)
    root_keys = _generate_root_keys(out, keys)
    root = _root(1, root_keys, threshold, expires, root_keys)
    doc = _list(1, {release.fingerprint: pem}, [], expires, root_keys)
    verify_root(root, moment)
    verify_release_keys(root, doc, None, moment)
    try:
        write_atomically(out / "root.json", root.to_json())
        write_atomically(out / "release-keys.json", doc.to_json())
    except OSError as exc:
        raise InputError(f"{out}: cannot write: {exc.strerror or exc}") from exc
    _save(trust_dir(), root=root, doc=doc)
    return InitResult(root=root, release_keys=doc, root_keys=tuple(k.path for k in root_keys), out=out)


def _next_list(
    host: HostTrust, root_keys: Sequence[Path], keys: Mapping[str, str], revoked: Sequence[str], expires_days: int, now: datetime
) -> ReleaseKeyList:
    current = _require_list(host)
    signers = _signers(host.root, root_keys)
    doc = _list(current.version + 1, keys, revoked, _expires(now, expires_days), signers)
    verify_release_keys(host.root, doc, current.version, now)  # what every device will check
    return doc


@dataclass(frozen=True)
class RotateResult:
    """What ``keys rotate`` did."""

    release_keys: ReleaseKeyList
    new_keyid: str
    signing_key: Path | None  # the new default signing key, when one was generated
    retired: Path | None  # where the previous default signing key went


def rotate_release_key(
    root_keys: Sequence[Path],
    *,
    new_key: Path | None = None,
    expires_days: int = DEFAULT_EXPIRES_DAYS,
    now: datetime | None = None,
) -> RotateResult:
    """Add a new release key to the list (version + 1); by default a new key that builds then sign with.

    Without ``new_key`` a key pair is generated and becomes ``$EDGEOPS_HOME/keys/dev-signing.pem``
    (the old one moves to ``keys/retired/``); with it (a public key PEM), that key is listed
    and the signing key is left alone. The old key stays listed: revoke it once devices run
    a release signed by the new one (docs/security.md, runbook).

    Raises:
        InputError: no root or list on this host, root keys below the threshold.
        KeyFileError: a key file is unusable.
    """
    moment = now or datetime.now(UTC)
    host = _require_host()
    current = _require_list(host)
    if new_key is not None:
        key = TrustedKey.from_pem(_read_pem(new_key), source=str(new_key))
        from cryptography.hazmat.primitives import serialization

        pem = key.key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        if key.fingerprint in current.revoked:
            raise InputError(f"{new_key}: key sha256:{key.fingerprint[:16]}… was revoked; a revoked key is never trusted again")
        doc = _next_list(host, root_keys, {**current.keys, key.fingerprint: pem}, current.revoked, expires_days, moment)
        _save(host.folder, doc=doc)
        return RotateResult(release_keys=doc, new_keyid=key.fingerprint, signing_key=None, retired=None)
    folder = edgeops_home() / "keys"
    folder.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=".rotate-", dir=folder))
    try:
        from edgeops_toolchain.signing import generate_keypair

        pair = generate_keypair(staged)
        key = load_signing_key(pair.private)
        doc = _next_list(host, root_keys, {**current.keys, key.fingerprint: pair.public.read_text()}, current.revoked,
                         expires_days, moment)  # fmt: skip
        _save(host.folder, doc=doc)
        # The list names the new key before builds sign with it: a build in between still signs
        # with the old key, which stays listed.
        dev_private, dev_public = folder / "dev-signing.pem", folder / "dev-signing.pub.pem"
        retired = None
        if dev_private.exists():
            retired_dir = folder / "retired"
            retired_dir.mkdir(exist_ok=True)
            old = load_signing_key(dev_private).fingerprint
            retired = retired_dir / f"{old[:16]}.pem"
            os.replace(dev_private, retired)
            if dev_public.exists():
                os.replace(dev_public, retired_dir / f"{old[:16]}.pub.pem")
        os.replace(pair.public, dev_public)
        os.replace(pair.private, dev_private)
    finally:
        for leftover in staged.iterdir():
            leftover.unlink()
        staged.rmdir()
    return RotateResult(release_keys=doc, new_keyid=key.fingerprint, signing_key=dev_private, retired=retired)


def _read_pem(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read: {exc.strerror or exc}") from exc


def _resolve(keyid: str, doc: ReleaseKeyList) -> str:
    text = keyid.lower().removeprefix("sha256:").rstrip("…")
    if len(text) == 64 and all(c in "0123456789abcdef" for c in text):
        return text
    if len(text) < 8:
        raise InputError(f"key id {keyid!r}: give at least 8 hex digits (see `edgeops keys show`)")
    found = [k for k in (*doc.keys, *doc.revoked) if k.startswith(text)]
    if len(found) != 1:
        what = "no key" if not found else f"{len(found)} keys"
        raise InputError(f"key id {keyid!r} matches {what} of release-key list version {doc.version} (`edgeops keys show`)")
    return found[0]


def revoke_release_key(
    keyid: str, root_keys: Sequence[Path], *, expires_days: int = DEFAULT_EXPIRES_DAYS, now: datetime | None = None
) -> ReleaseKeyList:
    """Revoke a release key: list version + 1 without it and with it in ``revoked``, forever.

    Raises:
        InputError: unknown or already revoked key id; the current signing key (rotate first);
            the last key of the list; root keys below the threshold.
    """
    moment = now or datetime.now(UTC)
    host = _require_host()
    current = _require_list(host)
    target = _resolve(keyid, current)
    if target in current.revoked:
        raise InputError(f"key sha256:{target[:16]}… is revoked already (release-key list version {current.version})")
    if target == _current_signing_keyid():
        raise InputError(
            f"key sha256:{target[:16]}… is the current signing key ($EDGEOPS_HOME/keys/dev-signing.pem): run "
            "`edgeops keys rotate` first, so builds sign with a new key, then revoke this one"
        )
    keys = {k: v for k, v in current.keys.items() if k != target}
    if not keys:
        raise InputError(f"revoking key sha256:{target[:16]}… would leave no release key: add one with `edgeops keys rotate`")
    doc = _next_list(host, root_keys, keys, [*current.revoked, target], expires_days, moment)
    _save(host.folder, doc=doc)
    return doc


def renew_release_keys(
    root_keys: Sequence[Path], *, expires_days: int = DEFAULT_EXPIRES_DAYS, now: datetime | None = None
) -> ReleaseKeyList:
    """The same keys in a new list (version + 1) with a later expiry.

    Raises:
        InputError: no root or list on this host, root keys below the threshold.
    """
    moment = now or datetime.now(UTC)
    host = _require_host()
    current = _require_list(host)
    doc = _next_list(host, root_keys, current.keys, current.revoked, expires_days, moment)
    _save(host.folder, doc=doc)
    return doc


@dataclass(frozen=True)
class RootRotation:
    """What ``keys root rotate`` did."""

    root: RootMetadata
    release_keys: ReleaseKeyList | None
    new_keys: tuple[Path, ...]


def rotate_root(
    old_keys: Sequence[Path],
    *,
    new_keys: Sequence[Path] = (),
    generate: int = 0,
    out: Path | None = None,
    threshold: int | None = None,
    expires_days: int = DEFAULT_EXPIRES_DAYS,
    now: datetime | None = None,
) -> RootRotation:
    """Replace the root (TUF §5.3.4): root version + 1, signed by the old root and by the new keys.

    The new root's keys are ``new_keys`` (private keys), or ``generate`` new ones written to
    ``out``. The current list is signed again (version + 1) by the new keys, so devices that
    take the new root keep a valid list, and by the old ones, so the host's files stay valid
    if it stops between writing the list and ``root.json``.

    Raises:
        InputError: no root on this host, old keys below the old threshold, no new key, a
            threshold out of range.
        KeyFileError: a key file is unusable, or ``out`` holds root keys already.
    """
    moment = now or datetime.now(UTC)
    host = _require_host()
    old = _signers(host.root, old_keys)
    if bool(new_keys) == bool(generate):
        raise InputError("give the new root's keys: --new-root-key PEM (repeatable), or --generate N --out DIR")
    if generate:
        if out is None:
            raise InputError("--generate needs --out DIR for the new root keys")
        if not 1 <= generate <= MAX_KEYS:
            raise InputError(f"--generate must be 1..{MAX_KEYS}, got {generate}")
        fresh = _generate_root_keys(out, generate)
    else:
        fresh = list({k.keyid: k for k in map(load_root_key, new_keys)}.values())
    k = threshold if threshold is not None else min(host.root.threshold, len(fresh))
    if not 1 <= k <= len(fresh):
        raise InputError(f"--threshold must be 1..{len(fresh)} (the new root's keys), got {k}")
    expires = _expires(moment, expires_days)
    signers = list({s.keyid: s for s in (*old, *fresh)}.values())
    root = _root(host.root.version + 1, fresh, k, expires, signers)
    verify_root_update(host.root, root, moment)  # what every device will check
    doc = None
    if host.release_keys is not None:
        current = host.release_keys
        # Signed by the old root's keys too (extra signatures count for nothing on a device on
        # the new root): _save writes the list before root.json, and a host stopped between
        # the two (disk full) must still hold a list its root.json signs, or every build fails.
        doc = _list(current.version + 1, current.keys, current.revoked, _expires(moment, expires_days), signers)
        verify_release_keys(root, doc, current.version, moment)
        verify_release_keys(host.root, doc, current.version, moment)
    if out is not None:
        try:
            write_atomically(out / "root.json", root.to_json())
        except OSError as exc:
            raise InputError(f"{out}: cannot write: {exc.strerror or exc}") from exc
    _save(host.folder, root=root, doc=doc)
    return RootRotation(root=root, release_keys=doc, new_keys=tuple(f.path for f in fresh))


def check_signing_key(signer: TrustedKey, *, source: str, now: datetime | None = None) -> dict[str, Any] | None:
    """The release-key list a build embeds, after checking that devices will take a bundle signed by ``signer``.

    Returns ``None`` on a host without a root of trust (a development setup).

    Raises:
        SigningError: the signing key is not in the list or is revoked (naming it), the root
            or the list is expired or missing, or the trust files are damaged.
    """
    moment = now or datetime.now(UTC)
    try:
        host = load_host_trust()
    except TrustError as exc:
        raise SigningError(f"the host's trust files are damaged: {exc}") from exc
    if host is None:
        return None
    doc = host.release_keys
    where = host.folder / "release-keys.json"
    name = f"signing key sha256:{signer.fingerprint[:16]}… ({source})"
    if doc is None:
        raise SigningError(f"{where}: the host has a root of trust but no release-key list; devices would refuse {name}")
    if signer.fingerprint in doc.revoked:
        raise SigningError(f"{name} is revoked by release-key list version {doc.version} ({where}); sign with a current key")
    if signer.fingerprint not in doc.keys:
        raise SigningError(
            f"{name} is not in release-key list version {doc.version} ({where}): devices would refuse the bundle; "
            "sign with a listed key or add this one (`edgeops keys rotate --new-key PUB.pem`)"
        )
    try:
        host.root.check_expiry(moment)
        doc.check_expiry(moment)
    except TrustError as exc:
        raise SigningError(f"{exc}; renew it (`edgeops keys renew`, `edgeops keys root rotate`)") from exc
    return doc.to_dict()
