"""The error tree shared by every edgeops package.

Errors are split by who is at fault, so a caller can tell "your input is wrong" from
"this bundle must not be trusted" from "a budget was broken"::

    EdgeopsError
    ├── InputError               the user's input is malformed (files, options, data)
    │   ├── ProfileError         a target profile TOML is missing, malformed or invalid
    │   ├── UnknownTargetError   no profile of that name exists
    │   ├── KeyFileError         a key file is missing, unreadable or not an ECDSA key
    │   └── FieldDataError       a field dataset file is malformed, tampered with or invalid
    └── BundleError              a bundle must not be trusted or cannot be read
        ├── BundleFormatError    not a tar, wrong/extra/missing/unsafe members
        ├── SignatureError       model.sig is malformed or does not verify
        ├── DigestMismatchError  a member's bytes differ from the signed digest
        ├── ManifestError        manifest.json is malformed or violates the schema
        ├── ExpiredBundleError   the manifest's ``expires`` is in the past
        └── TrustError           root or release-key metadata is malformed, under-signed,
                                 a replay or expired (edgeops_core.trust)

Every message says what was expected and what arrived, and names the file or member.
"""

from __future__ import annotations

__all__ = [
    "BundleError",
    "BundleFormatError",
    "DigestMismatchError",
    "EdgeopsError",
    "ExpiredBundleError",
    "FieldDataError",
    "InputError",
    "KeyFileError",
    "ManifestError",
    "ProfileError",
    "SignatureError",
    "TrustError",
    "UnknownTargetError",
]


class EdgeopsError(Exception):
    """Base of every error edgeops raises on purpose."""


class InputError(EdgeopsError):
    """The user's input (a file, an option, a dataset) is malformed or invalid."""


class ProfileError(InputError):
    """A target profile is missing, malformed TOML, or fails validation."""


class UnknownTargetError(InputError):
    """No target profile has the requested name."""


class KeyFileError(InputError):
    """A key file is missing, unreadable, or not a supported ECDSA key."""


class FieldDataError(InputError):
    """A field dataset (:mod:`edgeops_core.fielddata`) is malformed, altered or invalid."""


class BundleError(EdgeopsError):
    """A bundle cannot be read or must not be trusted.

    Attributes:
        member: the bundle member the failure is about, if any.
    """

    def __init__(self, message: str, *, member: str | None = None) -> None:
        super().__init__(message)
        self.member = member


class BundleFormatError(BundleError):
    """The file is not a well-formed bundle (tar structure, member set, member names)."""


class SignatureError(BundleError):
    """``model.sig`` is malformed or its signature does not verify against a trusted key."""


class DigestMismatchError(BundleError):
    """A member's sha256 differs from the digest in the signed statement."""


class ManifestError(BundleError):
    """``manifest.json`` is not valid JSON or does not match the manifest schema."""


class ExpiredBundleError(BundleError):
    """The manifest's ``expires`` timestamp is not in the future."""


class TrustError(BundleError):
    """Root or release-key metadata (:mod:`edgeops_core.trust`) is malformed, not signed by a
    threshold of the right keys, a replay of an older version, or expired."""
