"""MQTT topic names and message schemas, shared by the agent and the fleet console.

Topics live under one versioned prefix, one subtree per device, so a broker ACL
``pattern readwrite edgeops/v1/%u/#`` confines each device to its own subtree::

    <prefix>/<device_id>/state       retained; the device's bundle, health and last error;
                                     the Last Will sets ``online: false``
    <prefix>/<device_id>/telemetry   periodic counters, latency, drift, resources
    <prefix>/<device_id>/events      install / drift / command / outbox events
    <prefix>/<device_id>/samples     field samples (the drift reservoir), on request
    <prefix>/<device_id>/cmd         console → device commands, each with an ``id``

Every device → console message is a JSON object with ``schema`` (1), ``device_id``, ``ts``
(UTC ``YYYY-MM-DDTHH:MM:SS.ffffffZ``) and ``seq`` (the device's outbox sequence number:
strictly increasing per device, so a consumer can detect gaps and drop a duplicate).
``docs/asyncapi.json`` documents every payload as JSON Schema.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from edgeops_core.errors import InputError

__all__ = [
    "COMMAND_TYPES",
    "DEFAULT_PREFIX",
    "LEAVES",
    "MESSAGE_SCHEMA",
    "Command",
    "CommandError",
    "check_device_id",
    "device_topic",
    "parse_command",
    "utc_now_text",
]

DEFAULT_PREFIX = "edgeops/v1"
MESSAGE_SCHEMA = 1
#: Per-device topic leaves.
LEAVES = ("state", "telemetry", "events", "samples", "cmd")
#: Commands the agent understands (``deploy``/``rollback`` arrive with over-the-air updates).
COMMAND_TYPES = ("ping", "status", "sample_upload")
#: Largest command payload the agent reads (bytes).
MAX_COMMAND_BYTES = 64 * 1024

_DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_COMMAND_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class CommandError(InputError):
    """A command payload is malformed (not JSON, missing id, unknown type...)."""


def check_device_id(device_id: str) -> str:
    """``device_id`` if it is usable as one topic level (no ``/``, ``+``, ``#``), else :class:`InputError`."""
    if not _DEVICE_ID.match(device_id):
        raise InputError(
            f"device id {device_id!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return device_id


def device_topic(prefix: str, device_id: str, leaf: str) -> str:
    """``<prefix>/<device_id>/<leaf>``."""
    if leaf not in LEAVES:
        raise ValueError(f"unknown topic leaf {leaf!r}")
    return f"{prefix}/{device_id}/{leaf}"


def utc_now_text() -> str:
    """The current UTC time as messages carry it."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class Command:
    """A validated console → device command."""

    id: str
    type: str
    args: Mapping[str, Any]


def parse_command(payload: bytes) -> Command:
    """Validate a ``cmd`` payload: ``{"id": str, "type": one of COMMAND_TYPES, "args": {...}?}``.

    Raises:
        CommandError: anything else, with what was expected and what arrived.
    """
    if len(payload) > MAX_COMMAND_BYTES:
        raise CommandError(f"command payload is {len(payload)} bytes, the limit is {MAX_COMMAND_BYTES}")
    try:
        raw = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CommandError(f"command payload is not UTF-8 JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise CommandError(f"command payload must be a JSON object, got {type(raw).__name__}")
    extra = sorted(set(raw) - {"id", "type", "args"})
    if extra:
        raise CommandError(f"command has unknown field {extra[0]!r}")
    cid, ctype, args = raw.get("id"), raw.get("type"), raw.get("args", {})
    if not isinstance(cid, str) or not _COMMAND_ID.match(cid):
        raise CommandError(f"command 'id' must be 1-64 characters [A-Za-z0-9._:-], got {cid!r}")
    if ctype not in COMMAND_TYPES:
        raise CommandError(f"command 'type' must be one of {', '.join(COMMAND_TYPES)}, got {ctype!r}")
    if not isinstance(args, dict):
        raise CommandError(f"command 'args' must be an object, got {type(args).__name__}")
    return Command(id=cid, type=str(ctype), args=args)
