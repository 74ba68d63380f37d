"""The agent as a managed service: systemd's notify protocol, and a watchdog fed by a serving probe.

**sd_notify**, in a few lines of standard library (no libsystemd, no new dependency). The
facts of the protocol this module relies on (sd_notify(3), systemd.service(5)):

* ``$NOTIFY_SOCKET`` names an ``AF_UNIX``/``SOCK_DGRAM`` socket: a file system path
  (``/run/systemd/notify``) or an abstract name written with a leading ``@`` (the kernel's
  leading NUL byte). Anything else (e.g. a ``vsock:`` address) is logged and ignored;
* one datagram carries newline-separated ``NAME=VALUE`` assignments, so a ``STATUS=`` text
  is put on one line here (a newline in an error message must not become an assignment);
* with ``NotifyAccess=main`` systemd accepts a datagram only from the main PID, which it
  reads from the kernel's sender credentials: every thread of the agent sends as that PID;
* ``$WATCHDOG_USEC`` is the watchdog timeout and ``$WATCHDOG_PID``, when set, the process
  it is meant for (a watchdog set for another PID is not ours to feed); systemd asks for a
  ping at half the timeout.

The agent sends ``READY=1`` once the active model is loaded, the local endpoint serves and
a first probe inference (below) answered; ``STATUS=`` lines saying what it serves (or why
nothing); ``WATCHDOG=1`` at half the watchdog timeout while the serving path answers; and
``STOPPING=1`` first thing on SIGTERM. Sending never blocks (the socket is non-blocking)
and never raises: a socket that is missing, refuses, is full or has an unusable address is
logged once (:class:`Notifier`) and the agent goes on serving.

**Liveness.** A timer ping would prove only that one thread runs. :class:`ServiceMonitor`
instead runs a *probe*: one inference on the active model's first self-test vector through
the serving path (:meth:`LoadedModel.prepare`, the runtime's ``invoke`` under the same
interpreter lock request threads take on LiteRT and TFLite Micro, :meth:`LoadedModel.output`),
on a thread of its own, not counted in telemetry or metrics and not fed to drift
detection. The watchdog thread asks for a probe every half timeout and pings only when a
probe started after that ask has returned (probes are numbered: one that hung since an
earlier tick and returns late proves nothing about now); a runtime call that hangs (a native deadlock, an interpreter lock never
released) leaves the probe hanging with it, the pings stop, and systemd kills and restarts
the agent (``WatchdogSignal=SIGABRT``: the faulthandler ``edgeops-agent run`` enables
prints every thread's stack to the journal first). A probe that *raises* (a model that no
longer answers) still counts as alive: a restart cannot repair a model, and a restart loop
would take away the over-the-air update that can; it is reported instead (log, and
:meth:`ServiceMonitor.problem`, which makes ``/healthz`` answer 503). An agent with no
model is alive too (nothing can be wedged; ``/healthz`` says why it is not serving).
Until the first probe has returned, :meth:`ServiceMonitor.problem` says the agent is
starting (``/healthz`` 503: the listener serves before the first probe is done).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

import numpy as np

from edgeops_agent.agent import Agent
from edgeops_agent.model import LoadedModel
from edgeops_core import EdgeopsError

__all__ = ["MIN_PING_INTERVAL_S", "PROBE_PERIOD_S", "Notifier", "ServiceMonitor", "status_text", "watchdog_timeout_s"]

log = logging.getLogger(__name__)

#: Probe period when no watchdog is asked for (the probe then only feeds ``/healthz``).
PROBE_PERIOD_S = 5.0
#: Shortest ping interval: a watchdog of a few microseconds must not become a busy loop.
MIN_PING_INTERVAL_S = 0.01
#: systemd's ``USEC_INFINITY``: a ``$WATCHDOG_USEC`` this large (or larger) means no watchdog.
USEC_INFINITY = 2**64 - 1
#: Seconds the watchdog thread waits after an unexpected error in its own loop before going on.
RETRY_S = 1.0
#: Longest ``STATUS=`` text sent (systemd shows one line of it in ``systemctl status``).
MAX_STATUS = 400


def _one_line(text: str) -> str:
    """``text`` on one line without NUL, at most :data:`MAX_STATUS` characters."""
    flat = " ".join(text.replace("\0", " ").split())
    return flat if len(flat) <= MAX_STATUS else flat[: MAX_STATUS - 1] + "…"


class Notifier:
    """Sends sd_notify messages to one ``$NOTIFY_SOCKET`` address; a no-op without one.

    Thread-safe. :meth:`notify` never raises and never blocks: the first failure is logged
    as a warning (naming the address and the reason), later ones only at debug level, and
    a later success once at info level.

    Attributes:
        address: the ``$NOTIFY_SOCKET`` value, or ``None``.
        sent: datagrams delivered.
        failed: datagrams that could not be delivered.
    """

    def __init__(self, address: str | None) -> None:
        """Prepare a socket for ``address`` (a path, or ``@name`` for an abstract socket)."""
        self.address = address
        self.sent = 0
        self.failed = 0
        self._target: str | None = None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False
        self._failing = False
        self._recovery_logged = False
        if not address:
            return
        if address.startswith("/"):
            target = address
        elif address.startswith("@") and len(address) > 1:
            target = "\0" + address[1:]
        else:
            self._warn(f"it is neither an absolute socket path nor an @abstract name ({address[:120]!r})")
            return
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            sock.setblocking(False)  # a full receiver queue must not stall serving
        except OSError as exc:
            self._warn(f"no AF_UNIX datagram socket: {exc.strerror or exc}")
            return
        self._sock, self._target = sock, target

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """The notifier for ``$NOTIFY_SOCKET`` (of ``environ``, default ``os.environ``)."""
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET") or None)

    @property
    def enabled(self) -> bool:
        """``True`` when there is an address to send to."""
        return self._target is not None

    def _warn(self, reason: str) -> None:
        if self._warned:
            log.debug("sd_notify to $NOTIFY_SOCKET=%s failed: %s", self.address, reason)
            return
        self._warned = True
        log.warning(
            "sd_notify: cannot use $NOTIFY_SOCKET=%s: %s; the service manager will not hear from the agent "
            "(logged once; the agent keeps serving)",
            self.address,
            reason,
        )

    def notify(self, *assignments: str) -> bool:
        """Send ``NAME=VALUE`` assignments in one datagram; ``True`` if it was delivered."""
        if self._sock is None or self._target is None:
            return False
        payload = "\n".join(assignments).encode("utf-8", "replace")
        with self._lock:
            try:
                self._sock.sendto(payload, self._target)
            except (OSError, ValueError) as exc:  # ValueError: a path the kernel cannot take
                self.failed += 1
                self._failing = True
                detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                self._warn(detail)
                return False
            self.sent += 1
            if self._failing:
                self._failing = False
                if not self._recovery_logged:
                    self._recovery_logged = True
                    log.info("sd_notify: $NOTIFY_SOCKET=%s takes messages again", self.address)
        return True

    def ready(self, status: str) -> bool:
        """``READY=1`` with a ``STATUS=`` line."""
        return self.notify("READY=1", f"STATUS={_one_line(status)}")

    def status(self, status: str) -> bool:
        """A ``STATUS=`` line (shown by ``systemctl status``)."""
        return self.notify(f"STATUS={_one_line(status)}")

    def stopping(self, status: str = "stopping") -> bool:
        """``STOPPING=1`` with a ``STATUS=`` line."""
        return self.notify("STOPPING=1", f"STATUS={_one_line(status)}")

    def watchdog(self) -> bool:
        """One ``WATCHDOG=1`` ping."""
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        """Close the socket; later messages are dropped."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
            self._sock = self._target = None


def watchdog_timeout_s(environ: Mapping[str, str] | None = None) -> float | None:
    """The watchdog timeout systemd asks this process to honour (seconds), or ``None``.

    ``None`` when ``$WATCHDOG_USEC`` is unset, not a positive integer (logged) or systemd's
    infinity (``2**64 - 1`` or more), or when ``$WATCHDOG_PID`` names another process.
    """
    env = os.environ if environ is None else environ
    raw = env.get("WATCHDOG_USEC")
    if raw is None:
        return None
    try:
        usec = int(raw)
    except ValueError:
        usec = 0
    if usec <= 0:
        log.warning("$WATCHDOG_USEC=%.40r is not a positive integer; no watchdog pings", raw)
        return None
    if usec >= USEC_INFINITY:  # libsystemd's sd_watchdog_enabled() reads it as "no watchdog" too
        log.info("$WATCHDOG_USEC is infinity; no watchdog pings")
        return None
    pid = env.get("WATCHDOG_PID")
    if pid is not None:
        if not pid.strip().isdigit():
            log.warning("$WATCHDOG_PID=%.40r is not a process id; no watchdog pings", pid)
            return None
        if int(pid) != os.getpid():
            log.info("the watchdog is meant for pid %s, not this process (%d); no watchdog pings", pid, os.getpid())
            return None
    return usec / 1e6


def status_text(agent: Agent) -> str:
    """One line for ``STATUS=``: the model served, or why none is."""
    model = agent.model
    if model is None:
        return f"no model: {agent.fault or 'none installed (edgeops-agent install BUNDLE)'}"
    m = model.manifest
    expired = ", expired" if model.expired else ""
    return f"serving {m.name} {m.version} release {m.release} ({m.runtime}{expired})"


class ServiceMonitor:
    """Probes the serving path on its own thread; pings the watchdog while the probe answers.

    Two daemon threads: ``edgeops-probe`` runs probes when asked; ``edgeops-watchdog`` asks
    every :attr:`period_s` (half the watchdog timeout, or :data:`PROBE_PERIOD_S` without a
    watchdog; never more than ``threading.TIMEOUT_MAX``), waits up to one period for the
    answer and pings only if it came. Requests and probes carry a sequence number: a tick
    asks for probe *n* and pings only once a probe numbered *n* or later (so started after
    the tick asked) has returned; a probe that was stuck since an earlier tick and returns
    late proves nothing about now and pings nothing. A probe still running after a full
    period is *stuck*: logged once, shown in ``STATUS=`` and in :meth:`problem`, and no
    second probe is started beside it; the one asked for runs as soon as it returns. The
    watchdog thread survives any error of its own (logged once; it retries).

    Attributes:
        period_s: seconds between probes (and pings).
        watchdog_s: the watchdog timeout, or ``None`` (no pings).
        probes: probes that returned (or raised).
        last_duration_s: how long the last returned probe took.
        last_error: what the last probe raised, or ``None``.
    """

    def __init__(self, agent: Agent, notifier: Notifier, *, watchdog_s: float | None, period_s: float = PROBE_PERIOD_S) -> None:
        """Prepare the threads (started by :meth:`start`)."""
        self.agent = agent
        self.notifier = notifier
        self.watchdog_s = watchdog_s
        period = max(MIN_PING_INTERVAL_S, watchdog_s / 2) if watchdog_s else period_s
        self.period_s = min(period, threading.TIMEOUT_MAX)  # Event.wait raises OverflowError past it
        self.probes = 0
        self.last_duration_s: float | None = None
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a probe was asked for, or returned
        self._asked = 0  # the highest probe number asked for
        self._done = 0  # the number of the last probe that returned
        self._started_at: float | None = None  # monotonic start of the probe in flight
        self._stop = threading.Event()
        self._stuck = False
        self._vector: tuple[LoadedModel, np.ndarray] | None = None
        self._probe_thread = threading.Thread(target=self._probe_loop, name="edgeops-probe", daemon=True)
        self._thread = threading.Thread(target=self._watch, name="edgeops-watchdog", daemon=True)

    # the probe ---------------------------------------------------------------------------

    def probe_once(self) -> None:
        """One inference on the active model's first self-test vector, through the serving path.

        Not counted in telemetry or metrics, not fed to drift detection. Without a model
        there is nothing to probe.

        Raises:
            EdgeopsError: the model did not answer (e.g. :class:`ModelOutputError`).
        """
        model = self.agent.model
        if model is None:
            return
        cached = self._vector
        if cached is None or cached[0] is not model:
            cached = (model, model.sample(model.manifest.self_test.vectors[0].input))  # flattened: to sample_shape
            self._vector = cached
        _, tensor = model.prepare(cached[1])
        model.output(model.invoke(tensor))

    def _run_probe(self, number: int) -> None:
        start = time.monotonic()
        with self._lock:
            self._started_at = start
        error: str | None = None
        unexpected: Exception | None = None  # its traceback is worth logging (once)
        try:
            self.probe_once()
        except EdgeopsError as exc:
            error = f"{type(exc).__name__}: {str(exc)[:300]}"
        except Exception as exc:  # noqa: BLE001 - the runtime's own exception, or a bug: the watchdog goes on
            error, unexpected = f"{type(exc).__name__}: {str(exc)[:300]}", exc
        with self._changed:
            self._started_at = None
            self.last_duration_s = time.monotonic() - start
            if error is not None and error != self.last_error:  # once per new error, not per probe
                log.warning("serving probe: the model did not answer: %s", error, exc_info=unexpected)
            elif error is None and self.last_error is not None:
                log.warning("serving probe: the model answers again")
            self.last_error = error
            self.probes += 1
            self._done = max(self._done, number)
            self._changed.notify_all()

    def _probe_loop(self) -> None:
        while True:
            with self._changed:
                while self._asked <= self._done and not self._stop.is_set():
                    self._changed.wait()
                if self._stop.is_set():
                    return
                number = self._asked  # asked for before this start: its tick may count it
            self._run_probe(number)

    # the watchdog ------------------------------------------------------------------------

    def _watch(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                self._tick()
                failing = False
            except Exception:  # a bug here must not end the thread that sends the pings
                if not failing:
                    log.exception("watchdog loop failed; retrying in %.0f s", RETRY_S)
                failing = True
                self._stop.wait(RETRY_S)

    def _tick(self) -> None:
        tick = time.monotonic()
        with self._changed:
            self._asked += 1
            wanted = self._asked
            self._changed.notify_all()
            answered = self._changed.wait_for(lambda: self._done >= wanted or self._stop.is_set(), self.period_s)
        if self._stop.is_set():
            return
        if answered:
            if self._stuck:
                self._stuck = False
                log.warning("serving path answers again")
                self.notifier.status(status_text(self.agent))
            if self.watchdog_s is not None:
                self.notifier.watchdog()
        elif not self._stuck:
            self._stuck = True
            pings = "; watchdog pings stopped" if self.watchdog_s is not None else ""
            log.error("serving path stuck: a probe inference has not returned for %.1f s%s", self.stuck_for(), pings)
            self.notifier.status(f"serving path stuck: a probe inference has not returned{pings}")
        rest = self.period_s - (time.monotonic() - tick)
        if rest > 0:
            self._stop.wait(rest)

    def stuck_for(self) -> float:
        """Seconds the probe in flight has been running (0 when none is)."""
        with self._lock:
            started = self._started_at
        return 0.0 if started is None else time.monotonic() - started

    def problem(self) -> str | None:
        """Why the serving path is not answering, or ``None``.

        Starting (no probe has returned yet), stuck (a probe has run for more than a
        period), or failing (the last probe raised).
        """
        if self.probes == 0:
            return "starting: the first probe inference has not answered yet"
        stuck = self.stuck_for()
        if stuck > self.period_s:
            return f"serving path stuck: a probe inference has not returned for {stuck:.1f} s"
        error = self.last_error
        return f"the model fails its probe inference: {error}" if error is not None else None

    # life cycle --------------------------------------------------------------------------

    def start(self, *, on_ready: Callable[[], object] | None = None) -> None:
        """Run one probe in the calling thread, call ``on_ready``, then start probing (and
        pinging) in the background.

        The first probe is synchronous so that a model that hangs never reports ready, and
        ``on_ready`` (``READY=1``) runs before the pinging thread exists, so no ``WATCHDOG=1``
        can precede ``READY=1``.
        """
        self._run_probe(0)
        if on_ready is not None:
            on_ready()
        self._probe_thread.start()
        self._thread.start()

    def stop(self) -> None:
        """Stop probing and pinging (a probe stuck in the runtime is left behind: its thread is a daemon)."""
        with self._changed:
            self._stop.set()
            self._changed.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        if self._probe_thread.is_alive():
            self._probe_thread.join(timeout=0.5)
