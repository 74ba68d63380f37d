"""The console's MQTT connection: the broker URL and a connected paho client.

paho is imported inside the functions that connect, so ``import edgeops_fleet`` stays free
of it (a test pins the fleet package's imports).
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

from edgeops_core import InputError
from edgeops_fleet.errors import BrokerError

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

__all__ = ["BrokerUrl", "connect", "parse_broker_url"]

DEFAULT_MQTT_PORT = 1883


@dataclass(frozen=True)
class BrokerUrl:
    """Where the broker listens (``mqtt://HOST:PORT``; plain TCP)."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mqtt://{host}:{self.port}"


def parse_broker_url(url: str) -> BrokerUrl:
    """Parse ``mqtt://HOST[:PORT]`` (port 1883 by default).

    Raises:
        InputError: another scheme, no host, a port outside 1..65535, or a path, query,
            fragment or user name in the URL.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InputError(f"broker URL {url!r}: {exc}; expected mqtt://HOST:PORT") from exc
    if parts.scheme != "mqtt":
        raise InputError(f"broker URL {url!r} must start with mqtt:// (expected mqtt://HOST:PORT)")
    if not parts.hostname:
        raise InputError(f"broker URL {url!r} has no host; expected mqtt://HOST:PORT")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username is not None:
        raise InputError(f"broker URL {url!r} must be only mqtt://HOST:PORT (no user, path or query)")
    if port == 0:
        raise InputError(f"broker URL {url!r}: port must be 1..65535")
    return BrokerUrl(parts.hostname, DEFAULT_MQTT_PORT if port is None else port)


def connect(
    client: mqtt.Client,
    broker: BrokerUrl,
    *,
    clean_start: bool | int,
    session_expiry_s: int,
    timeout_s: float,
    connected: threading.Event,
) -> None:
    """Start ``client``'s network thread and wait until ``connected`` is set (by its ``on_connect``).

    Raises:
        BrokerError: no accepted connection within ``timeout_s`` (the loop is stopped again).
    """
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    try:  # a refused or unroutable address fails now, not after the whole timeout
        socket.create_connection((broker.host, broker.port), timeout=min(timeout_s, 5.0)).close()
    except OSError as exc:
        raise BrokerError(f"cannot reach the broker at {broker}: {exc.strerror or exc}") from exc
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = session_expiry_s
    try:
        client.connect_async(broker.host, broker.port, keepalive=10, clean_start=cast(Any, clean_start), properties=props)
    except (OSError, ValueError) as exc:
        raise BrokerError(f"cannot connect to the broker at {broker}: {exc}") from exc
    client.loop_start()
    if not connected.wait(timeout_s):
        client.loop_stop()
        raise BrokerError(f"the broker at {broker} did not accept a connection within {timeout_s:g} s")
