"""MQTT topic names and message schemas, shared by the agent and the fleet console.

Topics live under one versioned prefix, one subtree per device, so a broker ACL
``pattern readwrite edgeops/v1/%u/#`` confines each device to its own subtree::

    <prefix>/<device_id>/state       retained; the device's bundle, health and last error;
                                     the Last Will sets ``online: false``
    <prefix>/<device_id>/telemetry   periodic counters, latency, drift, resources
    <prefix>/<device_id>/events      install / drift / command / outbox events
    <prefix>/<device_id>/samples     field samples (the drift reservoir), on request
    <prefix>/<device_id>/cmd         console → device commands, each with an ``id``
    <prefix>/<device_id>/ota_request device → console: the blocks of a deploy it lacks (JSON)
    <prefix>/<device_id>/ota_block   console → device: one block per message, binary (ADR 0012)
    <prefix>/<device_id>/csr         device → console: a certificate signing request (renewal)

Every device → console message is a JSON object with ``schema`` (1), ``device_id``, ``ts``
(UTC ``YYYY-MM-DDTHH:MM:SS.ffffffZ``) and ``seq`` (the device's outbox sequence number:
strictly increasing per device, so a consumer can detect gaps and drop a duplicate).
The payloads themselves are the types in :mod:`edgeops_core.messages`;
``docs/asyncapi.json`` documents every payload as JSON Schema.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from edgeops_core.errors import InputError

__all__ = [
    "DEFAULT_PREFIX",
    "LEAVES",
    "MESSAGE_SCHEMA",
    "check_device_id",
    "device_topic",
    "parse_topic",
    "set_clock_skew",
    "utc_now_text",
]

DEFAULT_PREFIX = "edgeops/v1"
MESSAGE_SCHEMA = 1
#: Per-device topic leaves.
LEAVES = ("state", "telemetry", "events", "samples", "cmd", "ota_request", "ota_block", "csr")

# fullmatch, never match: ``$`` also matches before a trailing newline, and "dev\n" as an
# MQTT client id makes the broker refuse every CONNECT.
_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_device_id(device_id: str) -> str:
    """``device_id`` if it is usable as one topic level and client id, else :class:`InputError`.

    Raises:
        InputError: not 1-64 letters, digits, ``.``, ``_`` or ``-`` starting with a letter or digit.
    """
    if not isinstance(device_id, str) or not _DEVICE_ID.fullmatch(device_id):
        raise InputError(
            f"device id {device_id!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return device_id


def device_topic(prefix: str, device_id: str, leaf: str) -> str:
    """``<prefix>/<device_id>/<leaf>``.

    Raises:
        InputError: ``device_id`` is not a valid id, or ``leaf`` is not one of :data:`LEAVES`.
    """
    if leaf not in LEAVES:
        raise InputError(f"topic leaf must be one of {', '.join(LEAVES)}, got {leaf!r}")
    return f"{prefix}/{check_device_id(device_id)}/{leaf}"


def parse_topic(prefix: str, topic: str) -> tuple[str, str]:
    """The ``(device_id, leaf)`` of a per-device topic under ``prefix``; the inverse of :func:`device_topic`.

    Raises:
        InputError: the topic is not ``<prefix>/<device_id>/<leaf>`` with a valid id and a known leaf.
    """
    head = prefix + "/"
    rest = topic[len(head) :].split("/") if topic.startswith(head) else []
    if len(rest) != 2 or rest[1] not in LEAVES:
        raise InputError(f"topic must be {prefix}/<device_id>/<{'|'.join(LEAVES)}>, got {topic!r}")
    return check_device_id(rest[0]), rest[1]


_skew = timedelta(0)


def set_clock_skew(seconds: float) -> None:
    """Shift the time :func:`utc_now_text` tells by ``seconds`` (test-only: a device whose clock is wrong)."""
    global _skew
    _skew = timedelta(seconds=seconds)


def utc_now_text() -> str:
    """The current UTC time as messages carry it (as this device's clock tells it: :func:`set_clock_skew`)."""
    return (datetime.now(UTC) + _skew).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
