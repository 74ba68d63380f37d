"""The console's MQTT connection: the broker URL and a connected paho client.

``mqtt://HOST:PORT`` is plain TCP; ``mqtts://HOST:PORT`` (port 8883 by default) is mutual TLS
with the files of a folder ``edgeops fleet provision --console`` wrote (``ca.crt``,
``client.crt``, ``client.key``): TLS 1.2 or later, the broker's certificate checked against
``ca.crt`` and its name against HOST (docs/security.md). Every console client (the console,
``fleet deploy``, ``fleet status``, ``fleet trust-push``) is made by :func:`new_client`, so
none of them can connect in plaintext to a TLS URL.

paho is imported inside the functions that connect, so ``import edgeops_fleet`` stays free
of it (a test pins the fleet package's imports).
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

from edgeops_core import Event, InputError, device_topic, parse_topic
from edgeops_fleet.errors import BrokerError

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

__all__ = ["BrokerUrl", "TlsFiles", "command_and_follow", "connect", "new_client", "parse_broker_url"]

DEFAULT_MQTT_PORT = 1883
DEFAULT_MQTTS_PORT = 8883


@dataclass(frozen=True)
class TlsFiles:
    """A console identity: the fleet CA's certificate, the console's certificate and key."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def from_folder(cls, folder: Path) -> TlsFiles:
        """``ca.crt``, ``client.crt`` and ``client.key`` of ``folder``.

        Raises:
            InputError: the folder or one of the files is missing.
        """
        files = cls(folder / "ca.crt", folder / "client.crt", folder / "client.key")
        for path in (files.ca, files.cert, files.key):
            if not path.is_file():
                raise InputError(f"--tls {folder}: {path.name} is missing (edgeops fleet provision NAME --console writes it)")
        return files

    def context(self) -> ssl.SSLContext:
        """A client context: TLS 1.2 or later, the broker checked against ``ca`` and by name.

        Raises:
            InputError: a file cannot be read or the key does not match the certificate.
        """
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_verify_locations(cafile=str(self.ca))
            ctx.load_cert_chain(str(self.cert), str(self.key))
        except (OSError, ssl.SSLError) as exc:
            raise InputError(f"TLS files {self.cert.parent}: cannot use them: {exc}") from exc
        return ctx


@dataclass(frozen=True)
class BrokerUrl:
    """Where the broker listens (``mqtt://HOST:PORT``, plain TCP; ``mqtts://``, with ``tls``)."""

    host: str
    port: int
    tls: TlsFiles | None = None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"


def parse_broker_url(url: str, tls: Path | None = None) -> BrokerUrl:
    """Parse ``mqtt://HOST[:PORT]`` (port 1883 by default) or ``mqtts://HOST[:PORT]`` (8883) with ``tls``.

    Args:
        url: the broker URL.
        tls: the folder of the console's TLS files; required by ``mqtts://``, refused with
            ``mqtt://`` (a URL says plainly whether the connection is encrypted).

    Raises:
        InputError: another scheme, no host, a port outside 1..65535, or a path, query,
            fragment or user name in the URL; ``mqtts://`` without ``tls`` or the reverse.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InputError(f"broker URL {url!r}: {exc}; expected mqtt://HOST:PORT") from exc
    if parts.scheme not in ("mqtt", "mqtts"):
        raise InputError(f"broker URL {url!r} must start with mqtt:// or mqtts:// (expected mqtt://HOST:PORT)")
    if parts.scheme == "mqtts" and tls is None:
        raise InputError(
            f"broker URL {url!r} is TLS: give the console's TLS folder (--tls DIR, from edgeops fleet provision --console)"
        )
    if parts.scheme == "mqtt" and tls is not None:
        raise InputError(f"broker URL {url!r} is plain TCP but TLS files were given: use mqtts://")
    if not parts.hostname:
        raise InputError(f"broker URL {url!r} has no host; expected mqtt://HOST:PORT")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username is not None:
        raise InputError(f"broker URL {url!r} must be only mqtt://HOST:PORT (no user, path or query)")
    if port == 0:
        raise InputError(f"broker URL {url!r}: port must be 1..65535")
    if tls is not None:
        return BrokerUrl(parts.hostname, DEFAULT_MQTTS_PORT if port is None else port, TlsFiles.from_folder(tls))
    return BrokerUrl(parts.hostname, DEFAULT_MQTT_PORT if port is None else port)


def new_client(broker: BrokerUrl, client_id: str = "", **kwargs: Any) -> mqtt.Client:
    """A paho MQTT v5 client for ``broker``, with its TLS context when the URL is ``mqtts://``.

    Raises:
        InputError: the TLS files cannot be used.
    """
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5, **kwargs)
    if broker.tls is not None:
        client.tls_set_context(broker.tls.context())
    return client


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


def command_and_follow(
    broker: BrokerUrl,
    device_ids: Sequence[str],
    payload: bytes,
    on_event: Callable[[str, Event], bool],
    *,
    prefix: str,
    timeout_s: float,
    connect_timeout_s: float = 10.0,
) -> None:
    """Publish the command ``payload`` (QoS 1) on each device's ``cmd`` and follow their ``events``.

    The events are subscribed first and the command published only once the subscription is
    acknowledged, so no answer can come before it. Each parsed event of a listed device goes
    to ``on_event(device_id, event)`` (one call at a time); it returns ``True`` when every
    device has answered, which ends the wait early. Unparsable events are skipped.

    Raises:
        BrokerError: the broker does not accept the connection in time.
    """
    ids = set(device_ids)
    lock = threading.Lock()
    connected, subscribed, done = threading.Event(), threading.Event(), threading.Event()

    def on_connect(client: Any, userdata: object, flags: object, reason: Any, props: object) -> None:
        if not getattr(reason, "is_failure", False):
            client.subscribe([(device_topic(prefix, d, "events"), 1) for d in device_ids])
            connected.set()

    def on_subscribe(client: Any, userdata: object, mid: int, reasons: object, props: object) -> None:
        if not subscribed.is_set():
            subscribed.set()
            for d in device_ids:
                client.publish(device_topic(prefix, d, "cmd"), payload, qos=1)

    def on_message(client: Any, userdata: object, message: Any) -> None:
        try:
            device_id, _ = parse_topic(prefix, message.topic)
            event = Event.from_json(bytes(message.payload))
        except InputError:
            return
        if device_id in ids:
            with lock:
                if on_event(device_id, event):
                    done.set()

    client = new_client(broker)
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    started = time.monotonic()
    connect(client, broker, clean_start=True, session_expiry_s=0, timeout_s=connect_timeout_s, connected=connected)
    try:
        done.wait(max(0.0, started + timeout_s - time.monotonic()))
    finally:
        client.disconnect()
        client.loop_stop()
