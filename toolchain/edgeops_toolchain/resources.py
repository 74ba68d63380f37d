"""Where the built-in target profiles and example projects live.

In a source checkout (editable install) they are the repository's ``targets/`` and
``examples/`` folders; in a wheel they are packaged under ``edgeops_toolchain/_data/``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEFAULT_EXAMPLE", "builtin_targets_dir", "example_dir"]

DEFAULT_EXAMPLE = "vibration"
_PACKAGE = Path(__file__).resolve().parent


def _data_root() -> Path:
    packaged = _PACKAGE / "_data"
    if packaged.is_dir():
        return packaged
    return _PACKAGE.parent.parent  # toolchain/edgeops_toolchain -> repository root


def builtin_targets_dir() -> Path:
    """The folder of the built-in target profiles (ecu, wearable, mobile)."""
    return _data_root() / "targets"


def example_dir(name: str = DEFAULT_EXAMPLE) -> Path:
    """The folder of a built-in example project."""
    return _data_root() / "examples" / name
