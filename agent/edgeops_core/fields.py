"""Small typed readers for untrusted JSON/TOML mappings.

Each reader takes the path of the value (``"inputs[0].shape"``) so the error names exactly
which field was wrong, what was expected and what arrived. The error class is passed in so
the same readers serve manifests (``ManifestError``) and profiles (``ProfileError``).
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from edgeops_core.errors import EdgeopsError

__all__ = ["FieldReader", "load_toml"]


def load_toml(path: Path, error: type[EdgeopsError], what: str) -> dict[str, Any]:
    """Read and parse a TOML file, turning every failure into ``error`` naming the file.

    Args:
        path: the file.
        error: the error class to raise.
        what: what the file is, for the message (``"target profile"``).

    Raises:
        error: unreadable (with the OS reason) or malformed (with line and column).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise error(f"{path}: {what} is not UTF-8 text: {exc}") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: malformed TOML: {exc}") from exc


def _describe(value: object) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


class FieldReader:
    """Reads typed fields from an untrusted mapping; raises ``error`` naming the field path.

    Args:
        error: the error class to raise (``ManifestError``, ``ProfileError``...).
        source: the file or member the mapping came from, prefixed to every message.
    """

    def __init__(self, error: type[EdgeopsError], source: str) -> None:
        self.error = error
        self.source = source

    def fail(self, path: str, expected: str, value: object) -> EdgeopsError:
        """Build (not raise) the error for ``path`` expecting ``expected`` but got ``value``."""
        return self.error(f"{self.source}: field '{path}' must be {expected}, got {_describe(value)}")

    def mapping(self, data: object, path: str) -> Mapping[str, Any]:
        """The value at ``path`` as a mapping."""
        if not isinstance(data, Mapping):
            raise self.fail(path, "a table/object", data)
        return data

    def get(self, data: Mapping[str, Any], key: str, path: str) -> Any:
        """``data[key]``; a missing key names ``path``."""
        if key not in data:
            where = f"'{path}'" if path else "the top level"
            raise self.error(f"{self.source}: missing field '{key}' in {where}")
        return data[key]

    def only(self, data: Mapping[str, Any], allowed: set[str], path: str) -> None:
        """Reject unknown keys: a typo in a budget must not silently disable it."""
        extra = sorted(set(data) - allowed)
        if extra:
            where = f"'{path}'" if path else "the top level"
            raise self.error(
                f"{self.source}: unknown field(s) {', '.join(extra)} in {where}; expected some of {', '.join(sorted(allowed))}"
            )

    def string(self, data: Mapping[str, Any], key: str, path: str = "", *, nonempty: bool = True) -> str:
        """``data[key]`` as a (non-empty) string."""
        full = f"{path}.{key}" if path else key
        value = self.get(data, key, path)
        if not isinstance(value, str) or (nonempty and not value):
            raise self.fail(full, "a non-empty string", value)
        return value

    def integer(self, data: Mapping[str, Any], key: str, path: str = "", *, minimum: int | None = None) -> int:
        """``data[key]`` as an int (bools rejected), at least ``minimum``."""
        full = f"{path}.{key}" if path else key
        value = self.get(data, key, path)
        return self.as_int(value, full, minimum=minimum)

    def as_int(self, value: object, path: str, *, minimum: int | None = None) -> int:
        """``value`` as an int (bools rejected), at least ``minimum``."""
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(path, "an integer", value)
        if minimum is not None and value < minimum:
            raise self.fail(path, f"an integer >= {minimum}", value)
        return value

    def number(
        self,
        data: Mapping[str, Any],
        key: str,
        path: str = "",
        *,
        minimum: float | None = None,
        maximum: float | None = None,
        exclusive_minimum: bool = False,
    ) -> float:
        """``data[key]`` as a finite float within the bounds."""
        full = f"{path}.{key}" if path else key
        return self.as_number(
            self.get(data, key, path), full, minimum=minimum, maximum=maximum, exclusive_minimum=exclusive_minimum
        )

    def as_number(
        self,
        value: object,
        path: str,
        *,
        minimum: float | None = None,
        maximum: float | None = None,
        exclusive_minimum: bool = False,
    ) -> float:
        """``value`` as a finite float within the bounds."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(path, "a finite number", value)
        if minimum is not None and (value <= minimum if exclusive_minimum else value < minimum):
            op = ">" if exclusive_minimum else ">="
            raise self.fail(path, f"a number {op} {minimum}", value)
        if maximum is not None and value > maximum:
            raise self.fail(path, f"a number <= {maximum}", value)
        return float(value)

    def sequence(self, data: Mapping[str, Any], key: str, path: str = "") -> Sequence[Any]:
        """``data[key]`` as a list."""
        full = f"{path}.{key}" if path else key
        value = self.get(data, key, path)
        if not isinstance(value, (list, tuple)):
            raise self.fail(full, "a list", value)
        return value

    def numbers(self, data: Mapping[str, Any], key: str, path: str = "", *, length: int | None = None) -> tuple[float, ...]:
        """``data[key]`` as a tuple of finite floats, of ``length`` if given."""
        full = f"{path}.{key}" if path else key
        values = self.sequence(data, key, path)
        if length is not None and len(values) != length:
            raise self.error(f"{self.source}: field '{full}' must have {length} entries, got {len(values)}")
        return tuple(self.as_number(v, f"{full}[{i}]") for i, v in enumerate(values))

    def strings(self, data: Mapping[str, Any], key: str, path: str = "") -> tuple[str, ...]:
        """``data[key]`` as a tuple of non-empty strings."""
        full = f"{path}.{key}" if path else key
        values = self.sequence(data, key, path)
        out = []
        for i, v in enumerate(values):
            if not isinstance(v, str) or not v:
                raise self.fail(f"{full}[{i}]", "a non-empty string", v)
            out.append(v)
        return tuple(out)
