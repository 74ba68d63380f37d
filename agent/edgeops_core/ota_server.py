"""Serving a deploy over the air: the announcement and the block server (ADR 0012, 0015).

The sending half of the block-transfer protocol, beside its message types. It lives in the
contract package so that everything that serves blocks uses one implementation: the fleet
console and ``edgeops fleet deploy`` (re-exported as :mod:`edgeops_fleet.ota`) and the fleet
simulator, which may not import the host side. The agent never imports this module.

:func:`announce` turns a verified bundle file into the :class:`~edgeops_core.Deploy` a
``deploy`` command carries (block size, block count, the sha256 of every block), reading
the file once in blocks and checking it still hashes to what was verified.

:class:`BlockServer` answers ``ota_request`` messages of the devices it serves: for each
requested index it reads that one block from disk (``pread``; the file is never held) and
publishes it as a binary :class:`~edgeops_core.BlockFrame` on the device's ``ota_block``.
It is transport-agnostic: it gets a ``publish(topic, payload)`` callable (for paho:
``lambda t, p: client.publish(t, p, qos=1)``) and is fed with :meth:`BlockServer.on_message`.
One worker thread serves every device, earliest-allowed first, so an optional per-device
byte-rate cap (a token bucket each) slows that device only.

Invariants: a request is honoured only for this deploy, from a device in the served set,
on that device's own topic; indexes out of range are refused (counted), never read. The
pending work per device is bounded (one block index at most once), so a device flooding
requests cannot grow the server's memory.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from edgeops_core import (
    DEFAULT_PREFIX,
    BlockRequest,
    Deploy,
    InputError,
    MessageError,
    VerifiedBundleFile,
    check_device_id,
    choose_block_size,
    device_topic,
    parse_topic,
)
from edgeops_core.digest import sha256_new
from edgeops_core.errors import EdgeopsError

__all__ = ["BlockServer", "DeviceStats", "SenderError", "TokenBucket", "announce"]

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes], None]


class SenderError(EdgeopsError):
    """A bundle cannot be served over the air (unreadable, or changed since it was verified)."""


def announce(bundle: VerifiedBundleFile, *, deploy_id: str, block_size: int | None = None) -> Deploy:
    """The deploy announcement of a verified bundle file.

    Args:
        bundle: what :func:`~edgeops_core.verify_bundle_file` returned for the file.
        deploy_id: the id of this deploy (unique per deploy; a device acts on it once).
        block_size: a power of two; default :func:`~edgeops_core.choose_block_size`.

    Raises:
        SenderError: the file cannot be read, or changed since it was verified.
        MessageError: the deploy id or block size is invalid.
    """
    size = bundle.size
    block = choose_block_size(size) if block_size is None else choose_block_size(size, block_size)
    digests: list[str] = []
    whole = sha256_new()
    try:
        with open(bundle.path, "rb") as fh:
            while chunk := fh.read(block):
                digests.append(str(sha256_new(chunk).hexdigest()))
                whole.update(chunk)
    except OSError as exc:
        raise SenderError(f"{bundle.path}: cannot read the bundle: {exc.strerror or exc}") from exc
    if whole.hexdigest() != bundle.digest or len(digests) != -(-size // block):
        raise SenderError(f"{bundle.path}: the file changed since it was verified; verify it again")
    m = bundle.manifest
    return Deploy(
        deploy_id=deploy_id,
        name=m.name,
        version=m.version,
        release=m.release,
        target=m.target,
        size=size,
        sha256=bundle.digest,
        block_size=block,
        block_count=len(digests),
        block_sha256=tuple(digests),
    )


class TokenBucket:
    """A byte-rate cap: ``rate`` bytes per second with a burst of ``burst`` bytes.

    The balance starts at zero and a send is allowed whenever it is not negative; sending
    takes it below zero and the next send waits until it is back at zero. So by any time
    ``t`` after the first send, at most one block plus ``rate * t`` bytes went out,
    whatever the block size.
    """

    def __init__(self, rate: float, burst: float, *, now: float) -> None:
        """An empty bucket at time ``now`` (it holds at most ``burst`` bytes).

        Raises:
            ValueError: ``rate`` or ``burst`` is not > 0.
        """
        if not rate > 0 or not burst > 0:
            raise ValueError(f"rate and burst must be > 0, got {rate!r} and {burst!r}")
        self.rate, self.burst = float(rate), float(burst)
        self._tokens = 0.0
        self._at = now

    def _refill(self, now: float) -> None:
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now

    def wait_s(self, now: float) -> float:
        """Seconds until a send is allowed (0: now)."""
        self._refill(now)
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def take(self, nbytes: int, now: float) -> None:
        """Account for ``nbytes`` sent at ``now``."""
        self._refill(now)
        self._tokens -= nbytes


@dataclass
class DeviceStats:
    """What one device got: blocks and bytes published, requests taken, requests or indexes refused."""

    requests: int = 0
    blocks_sent: int = 0
    bytes_sent: int = 0
    refused: int = 0
    last_error: str | None = None


class _Device:
    def __init__(self, device_id: str, bucket: TokenBucket | None) -> None:
        self.id = device_id
        self.bucket = bucket
        self.pending: dict[int, None] = {}  # ordered set of block indexes
        self.stats = DeviceStats()


class BlockServer:
    """Serves the blocks of one deploy to a set of devices (see the module docstring).

    Args:
        path: the bundle file (the one :func:`announce` read).
        deploy: its announcement.
        publish: sends one payload to one topic (QoS 1).
        devices: the device ids this deploy goes to.
        prefix: the topic prefix.
        max_bytes_per_s: per-device byte-rate cap, or ``None``.
        monotonic, sleep: the clock (injected for tests).

    Raises:
        SenderError: the file cannot be opened or is not the announced size.
        InputError: a device id is invalid.
    """

    def __init__(
        self,
        path: Path,
        deploy: Deploy,
        publish: Publish,
        *,
        devices: Iterable[str],
        prefix: str = DEFAULT_PREFIX,
        max_bytes_per_s: float | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """Open the file and prepare one queue (and bucket) per device; :meth:`start` serves."""
        self.deploy, self.prefix = deploy, prefix
        self._publish = publish
        self._monotonic = monotonic
        if max_bytes_per_s is not None and not max_bytes_per_s > 0:
            raise InputError(f"max_bytes_per_s must be > 0, got {max_bytes_per_s!r}")
        now = monotonic()
        self._devices: dict[str, _Device] = {}
        for device_id in devices:
            bucket = (
                None
                if max_bytes_per_s is None
                else TokenBucket(max_bytes_per_s, min(max_bytes_per_s, deploy.block_size), now=now)
            )
            self._devices[check_device_id(device_id)] = _Device(device_id, bucket)
        try:
            self._fd = os.open(path, os.O_RDONLY)
            size = os.fstat(self._fd).st_size
        except OSError as exc:
            raise SenderError(f"{path}: cannot open the bundle: {exc.strerror or exc}") from exc
        if size != deploy.size:
            os.close(self._fd)
            raise SenderError(f"{path}: the file is {size} bytes, the deploy announced {deploy.size}")
        self.path = path
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- intake ------------------------------------------------------------------------------

    @property
    def subscriptions(self) -> list[str]:
        """The ``ota_request`` topics to subscribe to, one per device."""
        return [device_topic(self.prefix, d, "ota_request") for d in self._devices]

    def stats(self, device_id: str) -> DeviceStats:
        """A copy of one device's counters."""
        with self._cond:
            s = self._devices[device_id].stats
            return DeviceStats(s.requests, s.blocks_sent, s.bytes_sent, s.refused, s.last_error)

    def on_message(self, topic: str, payload: bytes) -> bool:
        """Take one ``ota_request``; whether it was accepted (a refusal is counted and logged).

        Never blocks and never raises: it is meant to run in the MQTT client's callback.
        """
        try:
            device_id, leaf = parse_topic(self.prefix, topic)
        except InputError:
            return False
        device = self._devices.get(device_id)
        if leaf != "ota_request" or device is None:
            return False
        try:
            request = BlockRequest.from_json(payload)
            if request.device_id != device_id:
                raise MessageError(f"ota_request on {device_id}'s topic names device {request.device_id!r}")
            if request.deploy_id != self.deploy.deploy_id:
                raise MessageError(f"ota_request is for deploy {request.deploy_id!r}, this is {self.deploy.deploy_id!r}")
            bad = [i for i in request.blocks if i >= self.deploy.block_count]
            if bad:
                raise MessageError(f"ota_request asks for blocks {bad[:4]} of a deploy of {self.deploy.block_count}")
        except MessageError as exc:
            with self._cond:
                device.stats.refused += 1
                device.stats.last_error = str(exc)
            log.info("ota_request from %s refused: %s", device_id, exc)
            return False
        with self._cond:
            device.stats.requests += 1
            for index in request.blocks:
                device.pending[index] = None
            self._cond.notify()
        return True

    def forget(self, device_id: str) -> int:
        """Drop what ``device_id`` asked for and was not sent yet; how many blocks were dropped.

        For a device gone offline (its Last Will): whatever it asked for before it went away
        it asks for again, if it still lacks it, when it is back; serving the old queue
        would send those blocks twice (once into its broker session, once on its new request).
        """
        with self._cond:
            device = self._devices.get(device_id)
            if device is None:
                return 0
            dropped = len(device.pending)
            device.pending.clear()
            return dropped

    # -- serving -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="ota-block-server", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the worker and close the file (idempotent)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def serve_once(self) -> float | None:
        """Send one pending block if a device may receive one now.

        Returns:
            ``0`` if a block was sent, the seconds until the next one may be, or ``None`` if
            nothing is pending.

        Raises:
            SenderError: the block cannot be read (the file changed, or the server is stopped).
        """
        with self._cond:
            now = self._monotonic()
            best: tuple[float, _Device] | None = None
            for device in self._devices.values():
                if device.pending:
                    wait = device.bucket.wait_s(now) if device.bucket is not None else 0.0
                    if best is None or wait < best[0]:
                        best = (wait, device)
            if best is None:
                return None
            if best[0] > 0:
                return best[0]
            device = best[1]
            index = next(iter(device.pending))
            del device.pending[index]
            length = self.deploy.block_length(index)
            if device.bucket is not None:
                device.bucket.take(length, now)
        try:
            data = os.pread(self._fd, length, index * self.deploy.block_size)
        except OSError as exc:  # includes a server already stopped (its descriptor is closed)
            raise SenderError(f"{self.path}: cannot read block {index}: {exc.strerror or exc}") from exc
        if len(data) != length:
            raise SenderError(f"{self.path}: block {index} reads {len(data)} bytes, expected {length}: the file changed")
        self._publish(device_topic(self.prefix, device.id, "ota_block"), self.deploy.frame(index, data).to_bytes())
        with self._cond:
            device.stats.blocks_sent += 1
            device.stats.bytes_sent += length
        return 0.0

    def _work(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
            try:
                wait = self.serve_once()
            except Exception:  # a publish that raises must not end the server; the device asks again
                log.exception("serving a block failed")
                wait = 0.05
            if wait == 0:
                continue
            with self._cond:
                if not self._stopping:
                    self._cond.wait(timeout=1.0 if wait is None else wait)
