"""Root and release keys: which keys may sign bundles, and how that changes (TUF's root and targets roles).

A device with a root of trust accepts a bundle only if ``model.sig`` verifies against a key
of the **release-key list** it trusts, and it trusts a list only if a threshold of its
**root** keys signed it. Root keys stay offline; release keys sign builds every day. So a
leaked release key is revoked by a new list, and the root itself is replaced by a new root
that the old one signs (TUF §5.3.4). This is TUF's root and targets roles, and Uptane's
image-repository root and targets, cut down to what a bundle needs.

Both are signed metadata documents, as in TUF::

    {"signed": {...}, "signatures": [{"keyid": "<64 hex>", "sig": "<base64>"}, ...]}

* ``keyid`` is :attr:`~edgeops_core.signature.TrustedKey.fingerprint`: the sha256 hex of the
  key's PEM SubjectPublicKeyInfo (what ``model_signing`` writes as a signature's key hint);
* ``sig`` is a DER-encoded ECDSA signature (P-256/SHA-256, P-384/SHA-384 or P-521/SHA-512,
  by the key's curve), in canonical base64, over the **canonical bytes** of ``signed``
  (:func:`canonical_bytes`)::

      json.dumps(signed, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()

The two ``signed`` bodies (every field required, no other field allowed)::

    root          {"_type": "root", "spec_version": 1, "version": N, "expires": "YYYY-MM-DDTHH:MM:SSZ",
                   "keys": {keyid: PEM}, "threshold": k}
    release-keys  {"_type": "release-keys", "spec_version": 1, "version": N, "expires": ...,
                   "keys": {keyid: PEM}, "revoked": [keyid, ...]}

The checks, in the order every function here makes them (each failure is one
:class:`TrustError` line):

1. structure: the exact fields and types above; at most :data:`MAX_METADATA_BYTES`, nested at
   most :data:`MAX_METADATA_DEPTH` levels, :data:`MAX_KEYS` keys, :data:`MAX_SIGNATURES`
   signatures (no key id twice) and :data:`MAX_REVOKED` revoked ids; every key id must be the
   fingerprint of its PEM key (checked when the keys are loaded, which needs ``cryptography``;
   :func:`parse_root` and :func:`parse_release_keys` check structure only, without it);
2. signatures: a threshold of **distinct** keys of the signing role must have valid
   signatures; signatures by other keys, or invalid ones, count for nothing and are
   otherwise ignored (TUF: extra signatures are allowed);
3. version: a root must be exactly one above the trusted one (a chain is applied one step at
   a time); a list must be strictly above the trusted one (anything else is a replay);
4. expiry: an expired root or list is refused for anything new (a freeze attack keeps a
   device on old metadata). Intermediate roots of a chain may have expired; only the last
   one is checked (TUF §5.3.10).

Invariants of a :class:`TrustState`:

* its list is signed by a threshold of its root's keys (a root rotation that would leave the
  trusted list unsigned by the new root is refused unless a new list comes with it);
* ``revoked`` holds every key id any trusted list ever revoked and only grows: a key once
  revoked is never trusted again, even if a later list forgets to revoke it
  (:func:`trusted_release_keys`);
* expired metadata stops new installs (:func:`trusted_release_keys` raises) but never stops
  the installed model from serving: the agent checks revocation, not expiry, when it loads an
  installed slot.

This module needs only the standard library and ``cryptography`` (imported when a key or a
signature is checked), like :mod:`edgeops_core.signature`; it never signs (that is the host's
``edgeops keys``).
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from edgeops_core._json import load_untrusted_json
from edgeops_core.errors import KeyFileError, TrustError
from edgeops_core.signature import TrustedKey

if TYPE_CHECKING:
    from cryptography.hazmat.primitives import hashes

__all__ = [
    "MAX_KEYS",
    "MAX_METADATA_BYTES",
    "MAX_METADATA_DEPTH",
    "MAX_REVOKED",
    "MAX_ROOT_CHAIN",
    "MAX_SIGNATURES",
    "RELEASE_KEYS_TYPE",
    "ROOT_TYPE",
    "SPEC_VERSION",
    "ReleaseKeyList",
    "RootMetadata",
    "TrustError",
    "TrustState",
    "TrustUpdate",
    "canonical_bytes",
    "load_metadata",
    "parse_release_keys",
    "parse_root",
    "plan_update",
    "trust_update_args",
    "trusted_release_keys",
    "verify_release_keys",
    "verify_root",
    "verify_root_update",
]

ROOT_TYPE = "root"
RELEASE_KEYS_TYPE = "release-keys"
#: The metadata format version this module reads and writes.
SPEC_VERSION = 1
#: Largest metadata document accepted (a root of 8 keys is about 4 KiB).
MAX_METADATA_BYTES = 32 * 1024
#: Deepest nesting of a metadata document (a real one nests 3 levels).
MAX_METADATA_DEPTH = 4
#: Most keys in a role, and most signatures on a document.
MAX_KEYS = 32
MAX_SIGNATURES = 32
#: Most key ids one list may revoke.
MAX_REVOKED = 256
#: Most root documents one ``trust_update`` may carry. A chain cannot be split over several
#: updates (each root rotation re-signs the list with the new root's keys only, so a device
#: stopped half-way would hold a list its root does not sign, which :func:`plan_update`
#: refuses): a device catches up in one update, so the bound is generous and the command's
#: size (64 KiB, about 30 roots of 3 keys) usually binds first.
MAX_ROOT_CHAIN = 64
_KEYID = re.compile(r"[0-9a-f]{64}")
_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
_PEM_HEAD = "-----BEGIN PUBLIC KEY-----"
_MAX_PEM_CHARS = 1024  # a P-521 SubjectPublicKeyInfo PEM is 268 characters
_MAX_SIG_CHARS = 256  # a P-521 DER signature is at most 139 bytes, 188 in base64
_MAX_VERSION = 2**63 - 1
_ROLE_NAMES = {ROOT_TYPE: "root", RELEASE_KEYS_TYPE: "release-key list"}


def canonical_bytes(signed: Mapping[str, Any]) -> bytes:
    """The bytes a metadata signature covers: ``signed`` as sorted, compact UTF-8 JSON.

    Raises:
        TrustError: a string that has no UTF-8 form (a lone surrogate, which JSON's ``\\ud800``
            escape can carry), or a value JSON cannot hold.
    """
    try:
        return json.dumps(signed, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except (UnicodeError, ValueError, TypeError) as exc:
        raise TrustError(f"metadata has no canonical form: {exc}") from exc


def _parse_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


@dataclass(frozen=True)
class _Metadata:
    version: int
    expires: str
    keys: Mapping[str, str]
    signatures: tuple[tuple[str, str], ...]

    _TYPE = ""

    @property
    def role(self) -> str:
        """How messages name this document (``root version 3``, ``release-key list version 4``)."""
        return f"{_ROLE_NAMES[self._TYPE]} version {self.version}"

    @property
    def expires_at(self) -> datetime:
        """``expires`` as an aware datetime."""
        return _parse_time(self.expires)

    def signed(self) -> dict[str, Any]:
        """The ``signed`` body."""
        raise NotImplementedError

    def signed_bytes(self) -> bytes:
        """What the signatures cover (:func:`canonical_bytes` of :meth:`signed`)."""
        return canonical_bytes(self.signed())

    def to_dict(self) -> dict[str, Any]:
        """The whole document, JSON-ready."""
        return {"signed": self.signed(), "signatures": [{"keyid": k, "sig": s} for k, s in self.signatures]}

    def to_json(self) -> bytes:
        """The whole document as canonical JSON (how devices and the host store it), with a newline.

        Two documents are the same document exactly when these bytes are equal.
        """
        return canonical_bytes(self.to_dict()) + b"\n"

    def check_expiry(self, now: datetime) -> None:
        """Raise :class:`TrustError` if this document is expired at ``now``."""
        if self.expires_at <= now:
            raise TrustError(
                f"{self.role} expired on {self.expires}: refused for new installs and updates (a stale document is "
                "what a freeze attack serves); the installed model keeps serving"
            )


@dataclass(frozen=True)
class RootMetadata(_Metadata):
    """A parsed root document (structure checked; signatures not yet)."""

    threshold: int = 1

    _TYPE = ROOT_TYPE

    def signed(self) -> dict[str, Any]:
        """The ``signed`` body."""
        return {
            "_type": ROOT_TYPE,
            "spec_version": SPEC_VERSION,
            "version": self.version,
            "expires": self.expires,
            "keys": dict(self.keys),
            "threshold": self.threshold,
        }


@dataclass(frozen=True)
class ReleaseKeyList(_Metadata):
    """A parsed release-key list (structure checked; signatures not yet)."""

    revoked: tuple[str, ...] = ()

    _TYPE = RELEASE_KEYS_TYPE

    def signed(self) -> dict[str, Any]:
        """The ``signed`` body."""
        return {
            "_type": RELEASE_KEYS_TYPE,
            "spec_version": SPEC_VERSION,
            "version": self.version,
            "expires": self.expires,
            "keys": dict(self.keys),
            "revoked": list(self.revoked),
        }


# -- structure ------------------------------------------------------------------------------


def _exact(obj: object, keys: set[str], where: str) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise TrustError(f"{where} must be an object, got {type(obj).__name__}")
    if set(obj) != keys:
        missing, extra = sorted(keys - set(obj)), sorted(set(obj) - keys)
        raise TrustError(f"{where} must have exactly the fields {sorted(keys)}; missing {missing}, unknown {extra}")
    return obj


def _int(value: object, where: str, minimum: int, maximum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= maximum:
        raise TrustError(f"{where} must be an integer {minimum}..{maximum}, got {str(value)[:40]!r}")
    return value


def _keyid(value: object, where: str) -> str:
    if not isinstance(value, str) or not _KEYID.fullmatch(value):
        raise TrustError(f"{where} must be a key id (64 lowercase hex digits), got {str(value)[:80]!r}")
    return value


def _keys(raw: object, where: str) -> dict[str, str]:
    if not isinstance(raw, Mapping):
        raise TrustError(f"{where} must be an object of key id: PEM public key, got {type(raw).__name__}")
    if len(raw) > MAX_KEYS:
        raise TrustError(f"{where} has {len(raw)} keys, at most {MAX_KEYS} are allowed")
    out: dict[str, str] = {}
    for keyid, pem in raw.items():
        _keyid(keyid, f"{where} key id")
        # PEM is ASCII by definition (RFC 7468); anything else (a lone surrogate) has no UTF-8 form.
        if not isinstance(pem, str) or not pem.startswith(_PEM_HEAD) or len(pem) > _MAX_PEM_CHARS or not pem.isascii():
            raise TrustError(
                f"{where}[{keyid[:16]}…] must be a PEM public key of at most {_MAX_PEM_CHARS} characters, ASCII only"
            )
        out[keyid] = pem
    return out


def _signatures(raw: object, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, list):
        raise TrustError(f"{where} signatures must be a list, got {type(raw).__name__}")
    if len(raw) > MAX_SIGNATURES:
        raise TrustError(f"{where} has {len(raw)} signatures, at most {MAX_SIGNATURES} are allowed")
    out: list[tuple[str, str]] = []
    for i, item in enumerate(raw):
        sig = _exact(item, {"keyid", "sig"}, f"{where} signatures[{i}]")
        keyid = _keyid(sig["keyid"], f"{where} signatures[{i}].keyid")
        text = sig["sig"]
        if not isinstance(text, str) or not 0 < len(text) <= _MAX_SIG_CHARS:
            raise TrustError(f"{where} signatures[{i}].sig must be base64 text of at most {_MAX_SIG_CHARS} characters")
        try:
            raw_sig = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise TrustError(f"{where} signatures[{i}].sig is not valid base64: {exc}") from exc
        # Non-canonical padding bits would let a byte change without changing the value.
        if base64.b64encode(raw_sig).decode("ascii") != text:
            raise TrustError(f"{where} signatures[{i}].sig is not canonical base64")
        if any(k == keyid for k, _ in out):
            raise TrustError(f"{where} carries two signatures by key {keyid[:16]}…")
        out.append((keyid, text))
    return tuple(out)


def _common(doc: object, kind: str, fields: set[str]) -> tuple[Mapping[str, Any], tuple[tuple[str, str], ...], int, str]:
    name = _ROLE_NAMES[kind]
    top = _exact(doc, {"signed", "signatures"}, f"{name} document")
    signed = top["signed"]
    if isinstance(signed, Mapping) and signed.get("_type") != kind:
        raise TrustError(f"{name} document must have _type {kind!r}, got {str(signed.get('_type'))[:40]!r}")
    body = _exact(signed, fields, f"{name} 'signed'")
    _int(body["spec_version"], f"{name} spec_version", SPEC_VERSION, SPEC_VERSION)
    version = _int(body["version"], f"{name} version", 1, _MAX_VERSION)
    expires = body["expires"]
    if not isinstance(expires, str) or not _TIME.fullmatch(expires):
        raise TrustError(f"{name} version {version}: expires must be UTC text YYYY-MM-DDTHH:MM:SSZ, got {str(expires)[:40]!r}")
    try:
        _parse_time(expires)
    except ValueError as exc:
        raise TrustError(f"{name} version {version}: expires {expires!r} is not a date: {exc}") from exc
    return body, _signatures(top["signatures"], f"{name} version {version}"), version, expires


_ROOT_FIELDS = {"_type", "spec_version", "version", "expires", "keys", "threshold"}
_LIST_FIELDS = {"_type", "spec_version", "version", "expires", "keys", "revoked"}


def parse_root(doc: object) -> RootMetadata:
    """Check a root document's structure (no cryptography) and return it parsed.

    Raises:
        TrustError: a field missing, unknown, of the wrong type or out of bounds.
    """
    body, signatures, version, expires = _common(doc, ROOT_TYPE, _ROOT_FIELDS)
    keys = _keys(body["keys"], f"root version {version} keys")
    if not keys:
        raise TrustError(f"root version {version} has no key")
    threshold = _int(body["threshold"], f"root version {version} threshold", 1, len(keys))
    return RootMetadata(version=version, expires=expires, keys=keys, signatures=signatures, threshold=threshold)


def parse_release_keys(doc: object) -> ReleaseKeyList:
    """Check a release-key list's structure (no cryptography) and return it parsed.

    Raises:
        TrustError: a field missing, unknown, of the wrong type or out of bounds, a key id
            revoked twice, or a key both listed and revoked.
    """
    body, signatures, version, expires = _common(doc, RELEASE_KEYS_TYPE, _LIST_FIELDS)
    where = f"release-key list version {version}"
    keys = _keys(body["keys"], f"{where} keys")
    raw = body["revoked"]
    if not isinstance(raw, list) or len(raw) > MAX_REVOKED:
        raise TrustError(f"{where} revoked must be a list of at most {MAX_REVOKED} key ids")
    revoked = tuple(_keyid(k, f"{where} revoked[{i}]") for i, k in enumerate(raw))
    if len(set(revoked)) != len(revoked):
        raise TrustError(f"{where} revokes a key id twice")
    both = sorted(set(revoked) & set(keys))
    if both:
        raise TrustError(f"{where} both lists and revokes key {both[0][:16]}…")
    return ReleaseKeyList(version=version, expires=expires, keys=keys, signatures=signatures, revoked=revoked)


def load_metadata(data: bytes, *, what: str = "trust metadata") -> object:
    """Parse a metadata document's bytes, bounded in size and nesting (structure not checked).

    Raises:
        TrustError: over :data:`MAX_METADATA_BYTES`, not UTF-8 JSON, or nested deeper than
            :data:`MAX_METADATA_DEPTH`.
    """
    if len(data) > MAX_METADATA_BYTES:
        raise TrustError(f"{what} is {len(data)} bytes, the limit is {MAX_METADATA_BYTES}")
    try:
        return load_untrusted_json(data, max_depth=MAX_METADATA_DEPTH)
    except ValueError as exc:  # also UnicodeDecodeError, and the nesting and number bounds
        raise TrustError(f"{what} is not valid JSON: {exc}") from exc


def trust_update_args(args: Mapping[str, Any]) -> tuple[tuple[RootMetadata, ...], ReleaseKeyList | None]:
    """Check a ``trust_update`` command's arguments: ``root`` (a list, oldest first) and ``release_keys``.

    Both are optional, but not both absent; structure only (no cryptography).

    Raises:
        TrustError: an unknown argument, more than :data:`MAX_ROOT_CHAIN` roots, roots not in
            ascending version order, a malformed document, or nothing to update.
    """
    extra = sorted(set(args) - {"root", "release_keys"})
    if extra:
        raise TrustError(f"trust_update has unknown argument {extra[0]!r}")
    raw_roots = args.get("root", [])
    if not isinstance(raw_roots, list | tuple) or len(raw_roots) > MAX_ROOT_CHAIN:
        raise TrustError(f"trust_update 'root' must be a list of at most {MAX_ROOT_CHAIN} root documents, oldest first")
    roots = tuple(parse_root(_plain(r)) for r in raw_roots)
    for before, after in itertools.pairwise(roots):
        if after.version <= before.version:
            raise TrustError(f"trust_update 'root' must list roots oldest first: version {after.version} after {before.version}")
    raw_list = args.get("release_keys")
    release_keys = None if raw_list is None else parse_release_keys(_plain(raw_list))
    if not roots and release_keys is None:
        raise TrustError("trust_update carries neither a root nor a release-key list")
    return roots, release_keys


def _plain(value: Any) -> Any:
    """Read-only mappings and tuples (a validated command's args) back to dicts and lists."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


# -- signatures -----------------------------------------------------------------------------


def _hash_for(curve: str) -> type[hashes.HashAlgorithm] | None:
    from cryptography.hazmat.primitives import hashes

    return {"secp256r1": hashes.SHA256, "secp384r1": hashes.SHA384, "secp521r1": hashes.SHA512}.get(curve)


def _load_keys(meta: _Metadata) -> dict[str, TrustedKey]:
    """The role's keys, each checked to have the key id it is listed under."""
    out: dict[str, TrustedKey] = {}
    for keyid, pem in meta.keys.items():
        try:
            key = TrustedKey.from_pem(pem.encode("ascii"), source=f"{meta.role} key {keyid[:16]}…")
        except UnicodeError as exc:  # parse_* refuse it first; a document built in code may not have been parsed
            raise TrustError(f"{meta.role} key {keyid[:16]}… is not an ASCII PEM: {exc}") from exc
        except KeyFileError as exc:
            raise TrustError(str(exc)) from exc
        if key.fingerprint != keyid:
            raise TrustError(
                f"{meta.role} lists a key under id {keyid[:16]}…, but that key's id (sha256 of its PEM) is "
                f"{key.fingerprint[:16]}…"
            )
        out[keyid] = key
    return out


def _valid_signers(meta: _Metadata, keys: Mapping[str, TrustedKey]) -> set[str]:
    """The distinct ids in ``keys`` whose signature on ``meta`` verifies."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ec

    message = meta.signed_bytes()
    valid: set[str] = set()
    for keyid, text in meta.signatures:
        key = keys.get(keyid)
        algorithm = _hash_for(key.key.curve.name) if key is not None else None
        if key is None or algorithm is None:
            continue  # a signature by a key outside the role counts for nothing (TUF allows extras)
        try:
            key.key.verify(base64.b64decode(text), message, ec.ECDSA(algorithm()))
        except InvalidSignature:
            continue
        valid.add(keyid)
    return valid


def _require(meta: _Metadata, signer: RootMetadata, what: str) -> None:
    n = len(_valid_signers(meta, _load_keys(signer)))
    if n < signer.threshold:
        plural = "" if n == 1 else "s"
        raise TrustError(f"{meta.role} has {n} valid signature{plural} {what}, threshold is {signer.threshold}")


def verify_root(root: RootMetadata, now: datetime | None) -> None:
    """Check a root on its own: signed by a threshold of its own keys and, with ``now``, not expired.

    What a device checks when its first root is provisioned (trust on first use).

    Raises:
        TrustError: a key id that does not match its key, too few valid signatures, expired.
    """
    _load_keys(root)
    _require(root, root, "by its own keys")
    if now is not None:
        root.check_expiry(now)


def verify_root_update(current: RootMetadata, new: RootMetadata, now: datetime | None) -> None:
    """Check one root rotation step (TUF §5.3.4): ``current`` → ``new``.

    ``new`` must be version ``current.version + 1`` and be signed by a threshold of
    ``current``'s keys **and** a threshold of its own. ``now`` checks ``new``'s expiry; pass
    ``None`` for the intermediate roots of a chain, which may have expired (TUF §5.3.10).

    Raises:
        TrustError: the version does not follow, a signature threshold is not met, expired.
    """
    if new.version != current.version + 1:
        if new.version <= current.version:
            raise TrustError(f"root version {new.version} is not newer than the trusted version {current.version} (replay)")
        raise TrustError(
            f"root version {new.version} does not follow the trusted version {current.version}: versions go up by "
            f"exactly 1; send roots {current.version + 1}..{new.version} in one update, oldest first"
        )
    _load_keys(new)
    n = len(_valid_signers(new, _load_keys(current)))
    if n < current.threshold:
        raise TrustError(
            f"root version {new.version} is not signed by the previous root (TUF 5.3.4): {n} valid signature(s) of "
            f"root version {current.version}'s keys, threshold is {current.threshold}"
        )
    _require(new, new, "by its own keys")
    if now is not None:
        new.check_expiry(now)


def verify_release_keys(root: RootMetadata, doc: ReleaseKeyList, current_version: int | None, now: datetime | None) -> None:
    """Check a release-key list against the trusted root and the trusted list's version.

    Args:
        root: the current trusted root; a threshold of its keys must have signed ``doc``.
        doc: the list.
        current_version: the trusted list's version; ``doc`` must be strictly newer.
            ``None`` when no list is trusted yet.
        now: check ``doc``'s expiry at this moment (``None``: do not).

    Raises:
        TrustError: a listed key id that does not match its key, too few valid root
            signatures, not newer (a replay or an older list), or expired.
    """
    _load_keys(doc)
    n = len(_valid_signers(doc, _load_keys(root)))
    if n < root.threshold:
        plural = "" if n == 1 else "s"
        raise TrustError(f"release-key list has {n} valid root signature{plural}, threshold is {root.threshold}")
    if current_version is not None and doc.version <= current_version:
        raise TrustError(
            f"release-key list version {doc.version} is not newer than the trusted version {current_version} (replay)"
        )
    if now is not None:
        doc.check_expiry(now)


# -- the trusted state ------------------------------------------------------------------------


@dataclass(frozen=True)
class TrustState:
    """What a device trusts: its root, its release-key list (if any) and every key id ever revoked."""

    root: RootMetadata
    release_keys: ReleaseKeyList | None = None
    revoked: frozenset[str] = field(default_factory=frozenset)


def trusted_release_keys(state: TrustState, now: datetime) -> list[TrustedKey]:
    """The keys a new bundle may be signed by: the list's keys minus every key ever revoked.

    Raises:
        TrustError: the root or the list is expired (no new install: a freeze attack), no
            list is trusted, or every listed key is revoked.
    """
    state.root.check_expiry(now)
    doc = state.release_keys
    if doc is None:
        raise TrustError(
            f"no release-key list is trusted yet (root version {state.root.version}): send one with a trust_update "
            "command (`edgeops fleet trust-push`)"
        )
    doc.check_expiry(now)
    keys = [k for keyid, k in sorted(_load_keys(doc).items()) if keyid not in state.revoked]
    if not keys:
        raise TrustError(f"{doc.role} trusts no key: every key it lists is revoked")
    return keys


@dataclass(frozen=True)
class TrustUpdate:
    """The outcome of :func:`plan_update`: the new state and what changed.

    Attributes:
        state: the state after the update (equal to the old one for a repeat).
        roots: the root documents to store, one per version applied (empty: root unchanged).
        release_keys_changed: the list is new.
        newly_revoked: key ids revoked by this update and not before, sorted.
        warning: set when the update is committed but not every file could be replaced (the
            next writer finishes it; readers already see the new state).
    """

    state: TrustState
    roots: tuple[RootMetadata, ...] = ()
    release_keys_changed: bool = False
    newly_revoked: tuple[str, ...] = ()
    warning: str | None = None

    @property
    def changed(self) -> bool:
        """Whether anything trusted changes (a repeat of what is trusted changes nothing)."""
        return bool(self.roots) or self.release_keys_changed

    def detail(self) -> dict[str, Any]:
        """The ``trust_updated`` event's detail: versions, newly revoked ids, how many are revoked in all.

        ``warning`` is there only when set (:attr:`warning`).
        """
        doc = self.state.release_keys
        detail: dict[str, Any] = {
            "root_version": self.state.root.version,
            "keys_version": doc.version if doc is not None else None,
            "revoked": list(self.newly_revoked),
            "revoked_total": len(self.state.revoked),
            "changed": self.changed,
        }
        if self.warning is not None:
            detail["warning"] = self.warning
        return detail


def plan_update(
    state: TrustState, roots: Sequence[RootMetadata], release_keys: ReleaseKeyList | None, now: datetime
) -> TrustUpdate:
    """Verify a whole update against ``state`` and return the state it leads to; nothing is written.

    Rules (docs/security.md):

    * roots older than the trusted one are skipped (a console sends the whole history); one of
      the trusted version must be byte-identical to it; each newer one must pass
      :func:`verify_root_update` from the one before; the newest root in the update must not
      be older than the trusted one, and the resulting root must not be expired;
    * a list identical to the trusted one is a repeat (no change); any other must pass
      :func:`verify_release_keys` against the resulting root;
    * after a root rotation without a new list, the trusted list must still be signed by a
      threshold of the new root's keys (otherwise the device would be left without keys).

    A repeat of exactly what is trusted succeeds with no change (commands can be redelivered).

    Raises:
        TrustError: the first rule broken; the state is then unchanged.
    """
    root = state.root
    applied: list[RootMetadata] = []
    if roots and roots[-1].version < root.version:
        raise TrustError(f"root version {roots[-1].version} is not newer than the trusted version {root.version} (replay)")
    for doc in roots:
        if doc.version < root.version:
            continue
        if doc.version == root.version and not applied:
            if doc.to_json() != root.to_json():
                raise TrustError(
                    f"root version {doc.version} differs from the trusted root of that version (a root version is never "
                    "reissued with other content)"
                )
            continue
        verify_root_update(root, doc, None)
        root = doc
        applied.append(doc)
    current = state.release_keys
    repeat = release_keys is not None and current is not None and release_keys.to_json() == current.to_json()
    if not applied and (release_keys is None or repeat):
        return TrustUpdate(state=state)  # the same documents again: nothing to do
    root.check_expiry(now)
    new_list = current
    if release_keys is not None and not repeat:
        verify_release_keys(root, release_keys, current.version if current is not None else None, now)
        new_list = release_keys
    elif applied and current is not None:
        try:
            verify_release_keys(root, current, None, None)
        except TrustError as exc:
            raise TrustError(
                f"after the rotation to root version {root.version}, the trusted release-key list version "
                f"{current.version} is no longer valid ({exc}): send a release-key list signed by the new root in "
                "the same trust_update"
            ) from exc
    revoked = state.revoked | frozenset(new_list.revoked if new_list is not None else ())
    return TrustUpdate(
        state=TrustState(root=root, release_keys=new_list, revoked=revoked),
        roots=tuple(applied),
        release_keys_changed=new_list is not current,
        newly_revoked=tuple(sorted(revoked - state.revoked)),
    )
