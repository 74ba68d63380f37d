"""sha256 for the device side, without loading OpenSSL just for a hash.

``hashlib`` loads OpenSSL's libcrypto (about 3.6 MiB of resident memory on a device) as
soon as it is imported. A serving agent only hashes a few small files at start-up, which
CPython's built-in sha256 does as well. When OpenSSL is loaded anyway (an install checks
signatures with ``cryptography``), its faster implementation is used.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["sha256_hex", "sha256_new"]


def sha256_new(data: bytes = b"") -> Any:
    """A sha256 object (``update``/``digest``/``hexdigest``)."""
    if "_hashlib" in sys.modules:
        import hashlib

        return hashlib.sha256(data)
    try:
        from _sha2 import sha256  # type: ignore[import-not-found,unused-ignore]  # CPython >= 3.12
    except ImportError:
        try:
            from _sha256 import sha256  # type: ignore[import-not-found,unused-ignore]  # CPython 3.11
        except ImportError:  # another implementation: hashlib it is
            from hashlib import sha256
    return sha256(data)


def sha256_hex(data: bytes) -> str:
    """sha256 of ``data`` as lowercase hex."""
    return str(sha256_new(data).hexdigest())
