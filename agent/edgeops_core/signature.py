"""Verification of ``model.sig`` (OpenSSF Model Signing, elliptic-curve key) with ``cryptography`` only.

``model.sig`` is a Sigstore bundle (media type ``application/vnd.dev.sigstore.bundle.v0.3+json``)
whose DSSE envelope carries an in-toto statement. The statement's predicate
(``https://model_signing/signature/v1.0``) lists every signed file with its sha256, and the
subject digest is the sha256 over those digests in order. This module checks, in order:

1. the JSON has exactly the structure the ``model_signing`` key signer writes (unknown or
   missing keys are rejected, base64 must be canonical, so no byte of the file is free),
   and neither it nor the signed statement nests deeper than 32 levels (a deeper document
   is a :class:`SignatureError`, never a ``RecursionError``);
2. the ECDSA signature over the DSSE pre-authentication encoding verifies against one of the
   trusted public keys (P-256/SHA-256, P-384/SHA-384 or P-521/SHA-512);
3. the statement is well formed and its subject digest matches its resources.

It returns the signed ``{file name: sha256 hex}``; comparing those with the bundle's bytes is
the caller's job (:mod:`edgeops_core.bundle`). Importing ``model_signing`` is deliberately
avoided: it drags sigstore, protobuf and network clients onto the device.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeops_core._json import load_untrusted_json
from edgeops_core.digest import sha256_hex, sha256_new
from edgeops_core.errors import KeyFileError, SignatureError

__all__ = ["SIGNATURE_MEMBER", "TrustedKey", "key_hint", "load_public_key", "verify_signature"]

SIGNATURE_MEMBER = "model.sig"
_BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
_PAYLOAD_TYPE = "application/vnd.in-toto+json"
_STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
_PREDICATE_TYPE = "https://model_signing/signature/v1.0"
if TYPE_CHECKING:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

# cryptography (with OpenSSL) costs a device ~14 MiB of RAM; it is imported only when a
# key is loaded or a signature checked, so an agent serving an already-installed bundle
# does not carry it.


def _hash_for(curve: str) -> type[hashes.HashAlgorithm] | None:
    from cryptography.hazmat.primitives import hashes

    return {"secp256r1": hashes.SHA256, "secp384r1": hashes.SHA384, "secp521r1": hashes.SHA512}.get(curve)


@dataclass(frozen=True)
class TrustedKey:
    """A public key the verifier trusts.

    Attributes:
        key: the elliptic-curve public key.
        fingerprint: sha256 hex of the key's PEM SubjectPublicKeyInfo, the value
            ``model_signing`` writes as the signature's key hint.
    """

    key: ec.EllipticCurvePublicKey
    fingerprint: str

    @classmethod
    def from_pem(cls, pem: bytes, *, source: str = "public key") -> TrustedKey:
        """Load a PEM public key.

        Raises:
            KeyFileError: not a PEM public key, or not on a supported curve.
        """
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        try:
            key = serialization.load_pem_public_key(pem)
        except ValueError as exc:
            raise KeyFileError(f"{source}: not a PEM public key ({exc})") from exc
        if not isinstance(key, ec.EllipticCurvePublicKey) or _hash_for(key.curve.name) is None:
            raise KeyFileError(f"{source}: expected an ECDSA P-256/P-384/P-521 public key, got {type(key).__name__}")
        canonical = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        return cls(key=key, fingerprint=sha256_hex(canonical))


def load_public_key(path: Path) -> TrustedKey:
    """Read a PEM public key file.

    Raises:
        KeyFileError: missing, unreadable or not a supported public key.
    """
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read public key: {exc.strerror or exc}") from exc
    return TrustedKey.from_pem(pem, source=str(path))


def _fail(message: str) -> SignatureError:
    return SignatureError(f"{SIGNATURE_MEMBER}: {message}", member=SIGNATURE_MEMBER)


def _exact(obj: object, keys: set[str], where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise _fail(f"{where} must be an object")
    if set(obj) != keys:
        raise _fail(f"{where} must have exactly the keys {sorted(keys)}, got {sorted(obj)}")
    return obj


def _b64(text: object, where: str) -> bytes:
    if not isinstance(text, str):
        raise _fail(f"{where} must be a base64 string")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _fail(f"{where} is not valid base64: {exc}") from exc
    # Non-canonical padding bits would let a byte change without changing the value.
    if base64.b64encode(raw).decode("ascii") != text:
        raise _fail(f"{where} is not canonical base64")
    return raw


def _pae(payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding."""
    header = f"DSSEv1 {len(_PAYLOAD_TYPE)} {_PAYLOAD_TYPE} {len(payload)} ".encode()
    return header + payload


def _parse_envelope(sig_bytes: bytes) -> tuple[str, bytes, bytes]:
    try:
        doc = load_untrusted_json(sig_bytes)
    except ValueError as exc:  # also UnicodeDecodeError, and nesting or number bounds
        raise _fail(f"not valid JSON: {exc}") from exc
    top = _exact(doc, {"mediaType", "verificationMaterial", "dsseEnvelope"}, "the signature bundle")
    if top["mediaType"] != _BUNDLE_MEDIA_TYPE:
        raise _fail(f"mediaType must be {_BUNDLE_MEDIA_TYPE!r}, got {top['mediaType']!r}")
    material = _exact(top["verificationMaterial"], {"publicKey", "tlogEntries"}, "verificationMaterial")
    if material["tlogEntries"] != []:
        raise _fail("tlogEntries must be empty for a key signature")
    hint = _exact(material["publicKey"], {"hint"}, "verificationMaterial.publicKey")["hint"]
    if not isinstance(hint, str):
        raise _fail("verificationMaterial.publicKey.hint must be a string")
    envelope = _exact(top["dsseEnvelope"], {"payload", "payloadType", "signatures"}, "dsseEnvelope")
    if envelope["payloadType"] != _PAYLOAD_TYPE:
        raise _fail(f"payloadType must be {_PAYLOAD_TYPE!r}, got {envelope['payloadType']!r}")
    sigs = envelope["signatures"]
    if not isinstance(sigs, list) or len(sigs) != 1:
        raise _fail("dsseEnvelope.signatures must hold exactly one signature")
    sig = _exact(sigs[0], {"sig", "keyid"}, "dsseEnvelope.signatures[0]")
    if sig["keyid"] != "":
        raise _fail("dsseEnvelope.signatures[0].keyid must be empty")
    return hint, _b64(envelope["payload"], "dsseEnvelope.payload"), _b64(sig["sig"], "dsseEnvelope.signatures[0].sig")


def _check_ecdsa(payload: bytes, signature: bytes, hint: str, keys: Iterable[TrustedKey]) -> TrustedKey:
    candidates = list(keys)
    if not candidates:
        raise _fail("no trusted public key to verify against")
    if hint:
        candidates = [k for k in candidates if k.fingerprint == hint]
        if not candidates:
            raise _fail(f"signed by key sha256:{hint[:16]}…, which is not a trusted key")
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ec

    message = _pae(payload)
    for k in candidates:
        algorithm = _hash_for(k.key.curve.name)
        if algorithm is None:
            continue
        try:
            k.key.verify(signature, message, ec.ECDSA(algorithm()))
        except InvalidSignature:
            continue
        return k
    raise _fail("the signature does not verify against the trusted key(s)")


def _parse_statement(payload: bytes) -> dict[str, str]:
    try:
        statement = load_untrusted_json(payload)
    except ValueError as exc:  # also UnicodeDecodeError, and nesting or number bounds
        raise _fail(f"signed payload is not JSON: {exc}") from exc
    if not isinstance(statement, dict) or statement.get("_type") != _STATEMENT_TYPE:
        raise _fail(f"signed payload is not an in-toto {_STATEMENT_TYPE} statement")
    if statement.get("predicateType") != _PREDICATE_TYPE:
        raise _fail(f"predicateType must be {_PREDICATE_TYPE!r}, got {statement.get('predicateType')!r}")
    subjects = statement.get("subject")
    predicate = statement.get("predicate")
    if not isinstance(subjects, list) or len(subjects) != 1 or not isinstance(predicate, dict):
        raise _fail("statement must have one subject and a predicate")
    serialization_ = predicate.get("serialization")
    if (
        not isinstance(serialization_, dict)
        or serialization_.get("method") != "files"
        or serialization_.get("hash_type") != "sha256"
    ):
        raise _fail("statement must use the 'files' serialization with sha256")
    resources = predicate.get("resources")
    if not isinstance(resources, list):
        raise _fail("statement predicate has no resource list")
    digests: dict[str, str] = {}
    root = sha256_new()
    for i, res in enumerate(resources):
        if not isinstance(res, dict) or res.get("algorithm") != "sha256":
            raise _fail(f"resource {i} must be a sha256 resource descriptor")
        name, digest = res.get("name"), res.get("digest")
        if not isinstance(name, str) or not isinstance(digest, str) or len(digest) != 64 or name in digests:
            raise _fail(f"resource {i} has a bad or duplicate name/digest")
        try:
            root.update(bytes.fromhex(digest))
        except ValueError as exc:
            raise _fail(f"resource {name!r} digest is not hex") from exc
        digests[name] = digest
    subject = subjects[0].get("digest") if isinstance(subjects[0], dict) else None
    subject_digest = subject.get("sha256") if isinstance(subject, dict) else None
    if subject_digest != root.hexdigest():
        raise _fail("subject digest does not match the listed resources")
    return digests


def key_hint(sig_bytes: bytes) -> str:
    """The key hint of ``model.sig`` (the signing key's fingerprint, or ``""``), without checking the signature.

    Only meaningful for a bundle that verified before and whose bytes are pinned since (an
    installed slot): :func:`verify_signature` then accepted it under a key with exactly this
    fingerprint when the hint is not empty. Needs no ``cryptography``.

    Raises:
        SignatureError: ``model.sig`` is malformed.
    """
    return _parse_envelope(sig_bytes)[0]


def verify_signature(sig_bytes: bytes, trusted: Iterable[TrustedKey]) -> tuple[dict[str, str], TrustedKey]:
    """Verify ``model.sig`` and return the signed member digests and the key that signed.

    Args:
        sig_bytes: the content of ``model.sig``.
        trusted: keys whose signatures are accepted.

    Returns:
        ``({member name: sha256 hex}, signing key)``.

    Raises:
        SignatureError: malformed signature file, untrusted key, bad signature, or a
            statement that is inconsistent. ``member`` is ``"model.sig"``.
    """
    hint, payload, signature = _parse_envelope(sig_bytes)
    key = _check_ecdsa(payload, signature, hint, trusted)
    return _parse_statement(payload), key
