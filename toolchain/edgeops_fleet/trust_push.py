"""Sending a ``trust_update`` to devices and following each to its answer (``edgeops fleet trust-push``).

One client (:func:`edgeops_fleet.link.command_and_follow`) subscribes to every device's
``events`` first, then publishes the one command (QoS 1) on each device's ``cmd``, so no
answer can come before the subscription. A device's
outcome is its first answer to that command id:

* ``trust_updated``: applied, or already trusted (a repeat changes nothing);
* ``trust_update_refused`` (then ``command_failed``): verified and refused, nothing changed;
* ``command_rejected``: malformed, stale, or a command this agent does not know;
* ``command_failed``: any other failure;
* ``timed_out``: no answer in time (an offline device gets the command from its persistent
  session when it comes back, and applies it then).

The pusher never decides anything: each device verifies the documents with its own root.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from edgeops_core import (
    DEFAULT_PREFIX,
    Event,
    InputError,
    check_device_id,
    parse_command,
)
from edgeops_fleet.link import BrokerUrl, command_and_follow

__all__ = ["TRUST_OUTCOMES", "TrustPushReport", "push_trust_update"]

#: How a device answered, as the pusher reports it.
TRUST_OUTCOMES = ("updated", "refused", "rejected", "failed", "timed_out")
_ANSWERS = {
    "trust_updated": "updated",
    "trust_update_refused": "refused",
    "command_rejected": "rejected",
    "command_failed": "failed",
}


@dataclass
class TrustPushReport:
    """One device's answer to the command."""

    device_id: str
    outcome: str | None = None
    root_version: int | None = None
    keys_version: int | None = None
    changed: bool | None = None
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def _take(report: TrustPushReport, outcome: str, detail: Mapping[str, Any]) -> None:
    if report.outcome is not None:
        return  # the first answer decides (trust_update_refused comes before its command_failed)
    report.outcome = outcome
    if outcome == "updated":
        report.root_version, report.keys_version = detail.get("root_version"), detail.get("keys_version")
        report.changed = detail.get("changed")
    else:
        report.message = str(detail.get("reason") or detail.get("message") or "")[:500]


def push_trust_update(
    broker: BrokerUrl,
    devices: Sequence[str],
    payload: bytes,
    *,
    prefix: str = DEFAULT_PREFIX,
    timeout_s: float = 30.0,
    connect_timeout_s: float = 10.0,
) -> list[TrustPushReport]:
    """Publish the ``trust_update`` command ``payload`` to ``devices`` and wait for their answers.

    Raises:
        InputError: no device, an invalid device id, or ``payload`` is not a trust_update.
        BrokerError: the broker does not accept the connection in time.
    """
    ids = list(dict.fromkeys(check_device_id(d) for d in devices))
    if not ids:
        raise InputError("a trust-push needs at least one device (--device ID, or --all-known)")
    command = parse_command(payload)
    if command.type != "trust_update":
        raise InputError(f"not a trust_update command: {command.type}")
    reports = {d: TrustPushReport(d) for d in ids}

    def on_event(device_id: str, event: Event) -> bool:
        outcome = _ANSWERS.get(event.type)
        if outcome is not None and event.detail.get("id") == command.id:
            _take(reports[device_id], outcome, event.detail)
        return all(r.outcome is not None for r in reports.values())

    command_and_follow(broker, ids, payload, on_event, prefix=prefix, timeout_s=timeout_s, connect_timeout_s=connect_timeout_s)
    for report in reports.values():
        if report.outcome is None:
            report.outcome, report.message = "timed_out", f"no answer within {timeout_s:g} s"
    return [reports[d] for d in ids]
