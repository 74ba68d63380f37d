"""Over-the-air transfer on the device: refusals before fetching, a resumable staging file, the pull engine.

The protocol is :mod:`edgeops_core.messages` (``Deploy``, ``BlockRequest``, ``BlockFrame``);
the decisions are ADR 0012. This module is the device's half, as three pieces:

* :func:`preflight` refuses a deploy before a single byte is fetched: another target, a
  release not above the floor (read from the state), a size over the cap, or a disk without
  room for the staging file and the slot it is later copied into.
* :class:`Staging` keeps the blocks of one deploy in ``<data>/ota/``::

      <data>/ota/<deploy_id>.part      the bundle being assembled, preallocated to its size
      <data>/ota/<deploy_id>.journal   a JSON header line, then one 8-byte record per block

  Blocks that arrived together (a batch, at most a window) are each checked against their
  digest, written at their offsets and the part file ``fdatasync``'d once; only then are
  their records appended to the journal and the journal ``fdatasync``'d once (**fsync
  point 1 and 2**). The journal header is written to a temporary, fsynced and renamed, and
  the folder fsynced, before any record (**fsync point 0**). So after a power cut a
  journal record always names a block whose bytes are on disk; a torn last record fails
  its check and is ignored, which only costs that block again. On reopening, a journal
  whose header names another deploy, sha256 or block list is discarded with its part file,
  and every journaled block is hashed again before it is trusted (a disk that lied about
  fsync costs a re-fetch, never a bad install). :meth:`Staging.finish` hashes the whole
  file against the announced sha256 before the path is handed to the install code
  (:func:`install_staged`), whose own verification (signature, target, floor, self-test)
  is the one path every bundle takes.
* :class:`TransferEngine` pulls the missing blocks through an injected ``request(indexes)``
  callback and an injected :class:`~edgeops_agent.transport.Clock`: a bounded window of
  outstanding blocks, retry with exponential backoff, a deadline and a minimum throughput.
  A frame that is malformed, foreign, out of range, of the wrong length, corrupt, a
  duplicate or not requested is refused with its reason, counted and never written.

Memory is bounded by the frames waiting to be written (a queue of ``2 × window + 4`` and a batch
of ``window`` blocks of at most 1 MiB) plus the bitmap (at most 512 entries):
neither the staging file nor the sender's file is ever held whole.

Errors (under :class:`~edgeops_agent.errors.AgentError`)::

    OtaError                 .reason is one of edgeops_core.OTA_REASONS
    ├── DeployRefusedError   refused before fetching (wrong_target, not_newer, too_large, no_space)
    └── TransferFailedError  the transfer cannot finish (deadline, too_slow, no_space, storage, digest_mismatch)
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import struct
import threading
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgeops_agent.errors import AgentError
from edgeops_agent.store import DataDir, fsync_dir
from edgeops_agent.transport import Clock, RealClock
from edgeops_core import MAX_BUNDLE_BYTES, BlockError, BlockFrame, Deploy, OtaProgress
from edgeops_core.digest import sha256_new

__all__ = [
    "OTA_DIR",
    "DeployRefusedError",
    "OtaError",
    "Staging",
    "TransferEngine",
    "TransferFailedError",
    "TransferPolicy",
    "install_staged",
    "preflight",
]

if TYPE_CHECKING:
    from edgeops_agent.install import InstallResult

log = logging.getLogger(__name__)

#: The staging folder's name under the data directory.
OTA_DIR = "ota"
#: Room kept free beyond what a deploy needs (bytes): the state, the outbox and the journal grow too.
RESERVE_BYTES = 1024 * 1024
_RECORD = struct.Struct(">II")  # block index, crc32 of (index, blocks digest)
_JOURNAL_VERSION = 1
_HASH_CHUNK = 256 * 1024


class OtaError(AgentError):
    """An over-the-air update cannot go on; :attr:`reason` is one of ``edgeops_core.OTA_REASONS``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class DeployRefusedError(OtaError):
    """A deploy is refused before anything is fetched."""


class TransferFailedError(OtaError):
    """A transfer stopped for good: deadline, throughput, disk, or a file that is not the announced one."""


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def preflight(data_dir: DataDir, deploy: Deploy, *, device_target: str, max_bundle_bytes: int = MAX_BUNDLE_BYTES) -> None:
    """Refuse ``deploy`` before fetching anything, or return.

    The disk must hold the part of the staging file not yet allocated, plus the slot the
    install copies it into (less the inactive slot's bundle, which the install deletes
    first), plus :data:`RESERVE_BYTES`.

    Raises:
        DeployRefusedError: ``wrong_target``, ``not_newer``, ``too_large`` or ``no_space``.
        StateCorruptedError: the state (which holds the floor) is damaged.
    """
    if deploy.target != device_target:
        raise DeployRefusedError(
            "wrong_target", f"deploy {deploy.deploy_id} is for target {deploy.target!r}, this device is {device_target!r}"
        )
    state = data_dir.load_state()
    floor = state.highest_release.get(deploy.name, 0)
    if deploy.release <= floor:
        raise DeployRefusedError(
            "not_newer",
            f"deploy {deploy.deploy_id}: release {deploy.release} of {deploy.name!r} is not newer than release {floor}",
        )
    if deploy.size > max_bundle_bytes:
        raise DeployRefusedError("too_large", f"deploy {deploy.deploy_id} is {deploy.size} bytes, the cap is {max_bundle_bytes}")
    folder = data_dir.root / OTA_DIR
    folder.mkdir(parents=True, exist_ok=True)
    part = folder / f"{deploy.deploy_id}.part"
    staged = part.stat().st_blocks * 512 if part.exists() else 0
    inactive = data_dir.slot_path(state.inactive_slot())
    freed = inactive.stat().st_size if inactive.exists() else 0
    need = max(0, deploy.size - staged) + max(0, deploy.size - freed) + RESERVE_BYTES
    free = _free_bytes(folder)
    if free < need:
        raise DeployRefusedError("no_space", f"deploy {deploy.deploy_id} needs {need} bytes free, the disk has {free}")


def _header(deploy: Deploy) -> bytes:
    doc = {
        "version": _JOURNAL_VERSION,
        "deploy_id": deploy.deploy_id,
        "sha256": deploy.sha256,
        "blocks_digest": deploy.blocks_digest,
        "size": deploy.size,
        "block_size": deploy.block_size,
    }
    return json.dumps(doc, sort_keys=True).encode() + b"\n"


class Staging:
    """The staging file and journal of one deploy (see the module docstring).

    Not thread-safe by itself; :class:`TransferEngine` serializes its use.
    """

    def __init__(self, folder: Path, deploy: Deploy) -> None:
        """Open the staging of ``deploy`` in ``folder``, resuming a matching one; remove any other.

        Raises:
            TransferFailedError: ``no_space`` (the file cannot be preallocated) or ``storage``.
        """
        self.deploy = deploy
        self.folder = folder
        self.path = folder / f"{deploy.deploy_id}.part"
        self.journal_path = folder / f"{deploy.deploy_id}.journal"
        self._salt = bytes.fromhex(deploy.blocks_digest)
        self.have = bytearray(deploy.block_count)
        self.received = 0
        self._fd: int | None = None
        self._journal: int | None = None
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self._clear_others()
            resumed = self._resume()
            if not resumed:
                self._create()
        except OSError as exc:
            self.discard()
            reason = "no_space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "storage"
            raise TransferFailedError(
                reason, f"{self.path}: cannot stage deploy {deploy.deploy_id}: {exc.strerror or exc}"
            ) from exc

    # -- opening ---------------------------------------------------------------------------

    def _clear_others(self) -> None:
        """One staging at a time: a superseded or abandoned deploy's files go."""
        keep = {self.path.name, self.journal_path.name}
        for item in self.folder.iterdir():
            if item.name not in keep and item.is_file():
                item.unlink()

    def _resume(self) -> bool:
        try:
            raw = self.journal_path.read_bytes()
        except FileNotFoundError:
            return False
        head, sep, records = raw.partition(b"\n")
        if not sep or head + b"\n" != _header(self.deploy) or not self.path.exists():
            log.info("staging of %s does not match the deploy: starting again", self.deploy.deploy_id)
            return False
        self._fd = os.open(self.path, os.O_RDWR)
        if os.fstat(self._fd).st_size != self.deploy.size:
            return False
        valid_len = len(head) + 1
        for offset in range(0, len(records) - len(records) % _RECORD.size, _RECORD.size):
            index, crc = _RECORD.unpack_from(records, offset)
            if index >= self.deploy.block_count or crc != self._crc(index):
                break  # a torn or damaged tail: everything after it is untrusted
            valid_len += _RECORD.size
            if not self.have[index] and self._block_ok(index):
                self.have[index] = 1
                self.received += 1
        self._journal = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND)
        os.truncate(self.journal_path, valid_len)  # drop a torn tail before appending after it
        return True

    def _create(self) -> None:
        for fd in (self._fd, self._journal):
            if fd is not None:
                os.close(fd)
        self._fd = self._journal = None
        self.have = bytearray(self.deploy.block_count)
        self.received = 0
        for stale in (self.path, self.journal_path):
            stale.unlink(missing_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        # Reserve every byte now: a disk that cannot hold the bundle says so before the
        # first block, not in the middle of the transfer.
        os.posix_fallocate(self._fd, 0, self.deploy.size)
        os.fsync(self._fd)
        tmp = self.folder / f".{self.journal_path.name}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(_header(self.deploy))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.journal_path)
        fsync_dir(self.folder)  # fsync point 0: the journal exists, with its header, before any record
        self._journal = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND)

    def _crc(self, index: int) -> int:
        return zlib.crc32(self._salt + index.to_bytes(4, "big"))

    def _block_ok(self, index: int) -> bool:
        assert self._fd is not None
        length = self.deploy.block_length(index)
        data = os.pread(self._fd, length, index * self.deploy.block_size)
        return len(data) == length and sha256_new(data).hexdigest() == self.deploy.block_sha256[index]

    # -- writing ---------------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        """Whether every block is on disk."""
        return self.received == self.deploy.block_count

    def progress(self, phase: str) -> OtaProgress:
        """The retained state's ``ota`` for this staging in ``phase``.

        Raises:
            MessageError: ``phase`` is not one of ``edgeops_core.OTA_PHASES``.
        """
        return OtaProgress(
            deploy_id=self.deploy.deploy_id,
            release=self.deploy.release,
            phase=phase,
            blocks_received=self.received,
            blocks_total=self.deploy.block_count,
        )

    def missing(self) -> list[int]:
        """Indexes of the blocks not yet on disk, in order."""
        return [i for i, have in enumerate(self.have) if not have]

    def write_block(self, frame: BlockFrame) -> None:
        """Check ``frame`` against the deploy, write it and journal it (fsync points 1 and 2).

        Raises:
            BlockError: ``foreign``, ``out_of_range``, ``wrong_length``, ``corrupt`` or
                ``duplicate``; nothing is written.
            TransferFailedError: ``no_space`` or ``storage``: the disk refused the write.
        """
        self.check(frame)
        self.store([frame])

    def check(self, frame: BlockFrame) -> None:
        """Check ``frame`` against the deploy and what is on disk; nothing is written.

        Raises:
            BlockError: ``foreign``, ``out_of_range``, ``wrong_length``, ``corrupt`` or ``duplicate``.
        """
        self.deploy.check_frame(frame)
        if self.have[frame.index]:
            raise BlockError("duplicate", f"block {frame.index} is already on disk")

    def store(self, frames: Sequence[BlockFrame]) -> None:
        """Write checked frames of distinct indexes, then journal them: one batch, two ``fdatasync``.

        Every block is written at its offset and the part file synced once (fsync point 1);
        only then are all their records appended in one write and the journal synced once
        (fsync point 2). A crash in between loses records, never names a block not on disk.

        Raises:
            TransferFailedError: ``no_space`` or ``storage``: the disk refused the write
                (blocks written but not journaled are fetched again after a restart).
        """
        if not frames:
            return
        if self._fd is None or self._journal is None:
            raise TransferFailedError("storage", f"{self.path}: the staging is closed")
        try:
            for frame in frames:
                os.pwrite(self._fd, frame.data, frame.index * self.deploy.block_size)
            os.fdatasync(self._fd)  # fsync point 1: the blocks' bytes are durable...
            os.write(self._journal, b"".join(_RECORD.pack(f.index, self._crc(f.index)) for f in frames))
            os.fdatasync(self._journal)  # fsync point 2: ...before the journal says so
        except OSError as exc:
            reason = "no_space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "storage"
            indexes = ", ".join(str(f.index) for f in frames[:4]) + (" …" if len(frames) > 4 else "")
            raise TransferFailedError(reason, f"{self.path}: cannot write block {indexes}: {exc.strerror or exc}") from exc
        for frame in frames:
            self.have[frame.index] = 1
        self.received += len(frames)

    def finish(self) -> Path:
        """Hash the complete file against the announced sha256; the path to install.

        Raises:
            TransferFailedError: ``digest_mismatch`` (the staging is discarded), ``storage``,
                or blocks are still missing.
        """
        if not self.complete or self._fd is None:
            raise TransferFailedError("storage", f"deploy {self.deploy.deploy_id}: {len(self.missing())} blocks are missing")
        digest = sha256_new()
        buffer = bytearray(_HASH_CHUNK)  # one buffer, reused: memory stays at one chunk
        view = memoryview(buffer)
        try:
            offset = 0
            while offset < self.deploy.size:
                n = os.preadv(self._fd, [view[: min(_HASH_CHUNK, self.deploy.size - offset)]], offset)
                if n == 0:
                    break
                digest.update(view[:n])
                offset += n
        except OSError as exc:
            raise TransferFailedError("storage", f"{self.path}: cannot read the staging file: {exc.strerror or exc}") from exc
        if digest.hexdigest() != self.deploy.sha256:
            self.discard()
            raise TransferFailedError(
                "digest_mismatch",
                f"deploy {self.deploy.deploy_id}: the assembled file hashes to {digest.hexdigest()}, "
                f"the deploy announced {self.deploy.sha256}",
            )
        return self.path

    def close(self) -> None:
        """Close the descriptors; the files stay for a resume."""
        for name in ("_fd", "_journal"):
            fd = getattr(self, name)
            if fd is not None:
                setattr(self, name, None)
                with contextlib.suppress(OSError):
                    os.close(fd)

    def discard(self) -> None:
        """Close and delete the staging file and the journal."""
        self.close()
        for path in (self.path, self.journal_path):
            with contextlib.suppress(OSError):
                path.unlink()


@dataclass(frozen=True, kw_only=True)
class TransferPolicy:
    """How the engine pulls (seconds and bytes).

    Attributes:
        window: most blocks outstanding (requested, not yet arrived) at once.
        retry_initial_s: wait before asking again for a block that did not arrive; doubles per attempt.
        retry_max_s: the longest wait between two requests of one block.
        deadline_s: the whole transfer must finish within this.
        min_bytes_per_s: the least throughput, measured over ``throughput_window_s``
            once the transfer has run that long.
        throughput_window_s: the span the throughput is measured over.
        tick_s: how often :meth:`TransferEngine.run` wakes to retry and check limits.
    """

    window: int = 8
    retry_initial_s: float = 1.0
    retry_max_s: float = 30.0
    deadline_s: float = 3600.0
    min_bytes_per_s: float = 256.0
    throughput_window_s: float = 60.0
    tick_s: float = 0.1

    def __post_init__(self) -> None:
        if not isinstance(self.window, int) or not 1 <= self.window <= 64:
            raise ValueError(f"window must be an integer 1..64, got {self.window!r}")
        for name in ("retry_initial_s", "retry_max_s", "deadline_s", "throughput_window_s", "tick_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.min_bytes_per_s < 0:
            raise ValueError(f"min_bytes_per_s must be >= 0, got {self.min_bytes_per_s!r}")


class TransferEngine:
    """Pulls the missing blocks of one :class:`Staging` (see the module docstring).

    ``request(indexes)`` asks the sender for blocks (the caller wraps them into a
    :class:`~edgeops_core.BlockRequest` and publishes it directly, never through the
    outbox). Frames arrive through :meth:`on_block`, from any thread.

    Attributes:
        refused: refused frames by reason (``edgeops_core.BLOCK_REFUSALS``).
        requested_blocks: block indexes asked for, retries included.
        bytes_written: bytes of blocks accepted and written in this run.
    """

    def __init__(
        self,
        staging: Staging,
        request: Callable[[tuple[int, ...]], None],
        *,
        policy: TransferPolicy | None = None,
        clock: Clock | None = None,
    ) -> None:
        """Prepare; nothing is requested until :meth:`start`."""
        self.staging = staging
        self.deploy = staging.deploy
        self.policy = policy or TransferPolicy()
        self.clock: Clock = clock or RealClock()
        self._request = request
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._outstanding: dict[int, tuple[float, int]] = {}  # index -> (last asked, attempts)
        self._recent: deque[tuple[float, int]] = deque()
        self._started: float | None = None
        self._error: TransferFailedError | None = None
        self.refused: Counter[str] = Counter()
        self.requested_blocks = 0
        self.bytes_written = 0
        self.dropped_frames = 0
        self._inbox: deque[bytes] = deque()
        self._inbox_max = 2 * self.policy.window + 4

    @property
    def outstanding(self) -> int:
        """Blocks requested and not yet arrived."""
        with self._lock:
            return len(self._outstanding)

    def start(self) -> None:
        """Start the clock and request the first window."""
        with self._lock:
            self._started = self.clock.monotonic()
        self.tick()

    def on_block(self, payload: bytes) -> str | None:
        """Take one ``ota_block`` payload: ``None`` if written, else why not (see :meth:`on_blocks`)."""
        return self.on_blocks([payload])[0]

    def on_blocks(self, payloads: Sequence[bytes]) -> list[str | None]:
        """Take ``ota_block`` payloads that arrived together: for each, ``None`` if written, else why not.

        Each frame is checked on its own; the accepted ones are written as one batch
        (:meth:`Staging.store`: one ``fdatasync`` of the part file, then one of the journal).
        A refused frame's reason (one of ``edgeops_core.BLOCK_REFUSALS``) is counted in
        :attr:`refused`; a write the disk refuses ends the transfer (``no_space`` or
        ``storage``, raised by the next :meth:`tick`) and is every accepted frame's answer.
        """
        results: list[str | None] = []
        accepted: list[BlockFrame] = []
        with self._lock:
            batch: set[int] = set()
            for payload in payloads:
                try:
                    frame = BlockFrame.parse(payload)
                    if self._error is not None:  # the transfer is over: nothing more is written
                        raise BlockError("unrequested", f"block {frame.index} arrived after the transfer failed")
                    if frame.tag == self.deploy.tag and frame.index < self.deploy.block_count:
                        if self.staging.have[frame.index] or frame.index in batch:
                            raise BlockError("duplicate", f"block {frame.index} is already on disk")
                        if frame.index not in self._outstanding:
                            raise BlockError("unrequested", f"block {frame.index} was not requested")
                    self.staging.check(frame)  # the deploy's own checks: foreign, range, length, digest
                except BlockError as exc:
                    self._refuse(exc.reason)
                    log.info("block refused (%s): %s", exc.reason, exc)
                    results.append(exc.reason)
                    continue
                batch.add(frame.index)
                accepted.append(frame)
                results.append(None)
            if not accepted:
                return results
            try:
                self.staging.store(accepted)
            except TransferFailedError as exc:  # the disk refused the write: the transfer is over
                self._error = exc
                reason: str | None = exc.reason
            else:
                reason = None
                now = self.clock.monotonic()
                for frame in accepted:
                    del self._outstanding[frame.index]
                    self.bytes_written += len(frame.data)
                    self._recent.append((now, len(frame.data)))
        self._wake.set()
        return [reason if r is None else r for r in results]

    def _refuse(self, reason: str) -> str:
        self.refused[reason] += 1
        return reason

    def tick(self) -> None:
        """Retry overdue blocks, fill the window, enforce the deadline and the throughput.

        Raises:
            TransferFailedError: ``deadline`` or ``too_slow``, or a write failed (``no_space``, ``storage``).
        """
        now = self.clock.monotonic()
        asks: list[int] = []
        with self._lock:
            if self._error is not None:
                raise self._error
            if self._started is None or self.staging.complete:
                return
            p = self.policy
            elapsed = now - self._started
            if elapsed > p.deadline_s:
                self._error = TransferFailedError(
                    "deadline", f"deploy {self.deploy.deploy_id}: not complete after {p.deadline_s:g} s "
                    f"({self.staging.received} of {self.deploy.block_count} blocks)"
                )  # fmt: skip
                raise self._error
            while self._recent and self._recent[0][0] < now - p.throughput_window_s:
                self._recent.popleft()
            rate = sum(n for _, n in self._recent) / p.throughput_window_s
            if elapsed >= p.throughput_window_s and rate < p.min_bytes_per_s:
                self._error = TransferFailedError(
                    "too_slow", f"deploy {self.deploy.deploy_id}: {rate:.0f} B/s over the last {p.throughput_window_s:g} s, "
                    f"the minimum is {p.min_bytes_per_s:g} B/s"
                )  # fmt: skip
                raise self._error
            for index, (asked, attempts) in self._outstanding.items():
                if now - asked >= min(p.retry_max_s, p.retry_initial_s * 2 ** (attempts - 1)):
                    asks.append(index)
            for index in asks:
                self._outstanding[index] = (now, self._outstanding[index][1] + 1)
            if len(self._outstanding) < p.window:
                for index in self.staging.missing():
                    if index not in self._outstanding:
                        self._outstanding[index] = (now, 1)
                        asks.append(index)
                        if len(self._outstanding) >= p.window:
                            break
            self.requested_blocks += len(asks)
        for batch in _batches(sorted(asks)):
            try:
                self._request(batch)
            except Exception as exc:  # noqa: BLE001 - a lost request is retried like a lost block
                log.warning("block request %s not sent: %s", batch[:4], exc)

    def offer(self, payload: bytes) -> bool:
        """Queue an ``ota_block`` payload for :meth:`run` (from the network thread, which never writes).

        At most ``2 × window + 4`` frames wait; beyond that a frame is dropped (``False``,
        counted in :attr:`dropped_frames`) and asked for again when its retry falls due.
        """
        with self._lock:
            if len(self._inbox) >= self._inbox_max:
                self.dropped_frames += 1
                return False
            self._inbox.append(payload)
        self._wake.set()
        return True

    def _take(self) -> list[bytes]:
        """Up to ``window`` queued payloads (one batch for :meth:`on_blocks`)."""
        with self._lock:
            return [self._inbox.popleft() for _ in range(min(len(self._inbox), self.policy.window))]

    def run(self, stop: threading.Event | None = None) -> Path:
        """Pull until complete, then check the whole file; the path to install.

        Frames come through :meth:`offer` (written here, in batches) or :meth:`on_block`.

        Raises:
            TransferFailedError: deadline, throughput, disk, or a file that is not the announced one.
            OtaError: ``superseded``: ``stop`` was set.
        """
        if self._started is None:
            self.start()
        while not self.staging.complete:
            if stop is not None and stop.is_set():
                raise OtaError("superseded", f"deploy {self.deploy.deploy_id} was stopped")
            batch = self._take()
            if batch:
                self.on_blocks(batch)
            else:
                self.clock.wait(self._wake, self.policy.tick_s)
                self._wake.clear()
            self.tick()
        self.tick()  # a write error after the last block
        return self.staging.finish()


def _batches(indexes: Iterable[int], size: int = 64) -> list[tuple[int, ...]]:
    items = list(indexes)
    return [tuple(items[i : i + size]) for i in range(0, len(items), size)]


def install_staged(data_dir: DataDir, path: Path, *, target: str) -> InstallResult:
    """Hand a finished staging file to the one install path, as a trial (ADR 0012).

    The caller confirms or rolls back the trial and removes the staging.

    Raises:
        BundleError, InstallRejectedError...: whatever :func:`~edgeops_agent.install.install_bundle` raises.
    """
    from edgeops_agent.install import install_bundle  # the install pulls in the runtimes' loader

    return install_bundle(data_dir, path, target=target, trial=True)
