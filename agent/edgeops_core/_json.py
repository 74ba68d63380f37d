"""Parsing untrusted JSON with bounds on nesting and integer size.

``json.loads`` recurses once per nesting level, so a document of 100 000 ``[`` raises
``RecursionError``, which no caller expects; and a 400-digit integer parses, then breaks
``math.isfinite``. Every JSON document that arrives from outside (``manifest.json``,
``model.sig`` and its signed statement) goes through :func:`load_untrusted_json`, which
turns both, and an object with the same name twice, into ``ValueError`` so each caller
converts it into its own typed error.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["MAX_JSON_DEPTH", "load_untrusted_json"]

#: Deepest nesting accepted. Real manifests and signatures nest at most 5 levels; 32 leaves
#: room for hyperparameters while keeping every later recursive use (repr, dumps) safe.
MAX_JSON_DEPTH = 32
# Integers beyond 64 bits have no meaning in a bundle and overflow float conversion.
_MAX_INT_DIGITS = 20


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise ValueError(f"integer of {len(text)} digits is too large (at most {_MAX_INT_DIGITS})")
    return int(text)


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-finite number {name} is not allowed")


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal names; a signature over one reading of a document
    # must not be checked against another, so a name given twice is refused.
    obj: dict[str, Any] = {}
    for name, value in pairs:
        if name in obj:
            raise ValueError(f"object has the name {name[:60]!r} twice")
        obj[name] = value
    return obj


def _depth(value: object) -> int:
    """Nesting depth of a parsed document, computed without recursion."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: list[object] = list(item.values())
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children)
    return deepest


def load_untrusted_json(data: bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse UTF-8 JSON from an untrusted source.

    Rejects NaN/Infinity, integers over 20 digits, an object with the same name twice and
    nesting deeper than ``max_depth``.

    Raises:
        ValueError: not UTF-8 (``UnicodeDecodeError`` is a ``ValueError``), not JSON, or
            over one of the bounds above; the message says which.
    """
    text = data.decode("utf-8")
    try:
        doc = json.loads(text, parse_int=_parse_int, parse_constant=_reject_constant, object_pairs_hook=_unique_object)
    except RecursionError as exc:
        # The C decoder stops at the interpreter's recursion limit and unwinds cleanly.
        raise ValueError(f"nested deeper than {max_depth} levels") from exc
    # Each nesting level opens one bracket, so a text with at most max_depth brackets cannot
    # be too deep (brackets inside strings only make this bound looser): small documents, such
    # as every MQTT message, skip the walk.
    if text.count("{") + text.count("[") <= max_depth:
        return doc
    depth = _depth(doc)
    if depth > max_depth:
        raise ValueError(f"nested {depth} levels deep, deeper than {max_depth} levels")
    return doc
