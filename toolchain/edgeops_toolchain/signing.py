"""Signing keys and bundle signatures (OpenSSF Model Signing, ECDSA P-256).

The host signs with the ``model_signing`` library so that ``model.sig`` is exactly what the
standard ``model_signing sign key`` writes and ``model_signing verify key`` accepts; devices
verify it with :mod:`edgeops_core.signature` (``cryptography`` only). See
docs/adr/0002-signing-format.md.

Without ``--key`` a per-user development key is created once under ``$EDGEOPS_HOME/keys``
(default ``~/.edgeops/keys``) and every build says it used it.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edgeops_core import SIGNATURE_MEMBER, KeyFileError, TrustedKey
from edgeops_toolchain.errors import SigningError

__all__ = ["KeyPair", "dev_key", "edgeops_home", "generate_keypair", "load_signing_key", "sign_members"]

log = logging.getLogger(__name__)
PRIVATE_NAME = "edgeops-signing.pem"
PUBLIC_NAME = "edgeops-signing.pub.pem"


@dataclass(frozen=True)
class KeyPair:
    """Paths of a private key and its public key."""

    private: Path
    public: Path


def edgeops_home() -> Path:
    """``$EDGEOPS_HOME`` or ``~/.edgeops``: per-user keys and release counters."""
    return Path(os.environ.get("EDGEOPS_HOME") or Path.home() / ".edgeops")


def _write_private(path: Path, pem: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)


def generate_keypair(folder: Path, *, force: bool = False) -> KeyPair:
    """Write a new ECDSA P-256 key pair into ``folder`` (private key mode 0600).

    Raises:
        KeyFileError: the files exist and ``force`` is false, or the folder is not writable.
    """
    pair = KeyPair(folder / PRIVATE_NAME, folder / PUBLIC_NAME)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not force:
            for p in (pair.private, pair.public):
                if p.exists():
                    raise KeyFileError(f"{p} already exists; pass --force to replace it")
        pair.private.unlink(missing_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        _write_private(
            pair.private,
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        )
        pair.public.write_bytes(
            key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
    except OSError as exc:
        raise KeyFileError(f"{folder}: cannot write keys: {exc.strerror or exc}") from exc
    return pair


def dev_key() -> tuple[KeyPair, bool]:
    """The per-user development key pair, created on first use.

    Returns:
        ``(pair, created_now)``.
    """
    folder = edgeops_home() / "keys"
    pair = KeyPair(folder / "dev-signing.pem", folder / "dev-signing.pub.pem")
    if pair.private.exists() and pair.public.exists():
        return pair, False
    folder.mkdir(parents=True, exist_ok=True)
    tmp = generate_keypair(Path(tempfile.mkdtemp(prefix=".dev-", dir=folder)))
    os.replace(tmp.public, pair.public)
    os.replace(tmp.private, pair.private)
    tmp.private.parent.rmdir()
    return pair, True


def load_signing_key(path: Path) -> TrustedKey:
    """Check that ``path`` is a usable unencrypted EC private key; return its public half.

    Raises:
        KeyFileError: missing, unreadable, encrypted, or not a P-256/P-384/P-521 key.
    """
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read private key: {exc.strerror or exc}") from exc
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError as exc:
        raise KeyFileError(f"{path}: private key is encrypted; edgeops needs an unencrypted PEM key") from exc
    except ValueError as exc:
        raise KeyFileError(f"{path}: not a PEM private key ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyFileError(f"{path}: expected an ECDSA private key, got {type(key).__name__}")
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return TrustedKey.from_pem(public, source=str(path))


def sign_members(members: Mapping[str, bytes], key: Path, *, subject: str) -> bytes:
    """Sign bundle members with ``model_signing`` and return the ``model.sig`` bytes.

    The members are laid out in a folder named ``subject`` (the in-toto subject name) and
    signed with the ``files`` serialization, ``model.sig`` itself ignored, exactly as
    ``model_signing sign key`` does on an unpacked bundle.

    Raises:
        KeyFileError: the key cannot be used.
        SigningError: model_signing failed.
    """
    import model_signing

    load_signing_key(key)
    with tempfile.TemporaryDirectory(prefix="edgeops-sign-") as tmp:
        folder = Path(tmp) / subject
        folder.mkdir()
        for name, data in members.items():
            (folder / name).write_bytes(data)
        sig_path = folder / SIGNATURE_MEMBER
        try:
            hashing = model_signing.hashing.Config().set_ignored_paths(  # type: ignore[no-untyped-call]
                paths=[SIGNATURE_MEMBER], ignore_git_paths=True
            )
            config = model_signing.signing.Config().use_elliptic_key_signer(private_key=key)  # type: ignore[no-untyped-call]
            config.set_hashing_config(hashing).sign(folder, sig_path)
        except Exception as exc:  # model_signing raises assorted types
            raise SigningError(f"model_signing failed to sign: {type(exc).__name__}: {exc}") from exc
        return sig_path.read_bytes()
