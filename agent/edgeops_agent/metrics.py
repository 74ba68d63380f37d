"""Prometheus metrics and ``/healthz`` over HTTP, for a daemon whose agent.toml has ``[metrics]``.

Imported by the daemon only when ``[metrics]`` is set: ``prometheus_client`` (the extra
``edgeops[metrics]``) is then loaded, and never otherwise (``tests/test_service.py`` checks
``sys.modules`` of a daemon without it). Without the package, importing this module raises
:class:`MetricsError` naming the extra.

Every value is read from the running agent when a scrape asks for it, by one collector:
nothing is added to the prediction path. Inference counts, errors and the latency
histogram come from :meth:`Agent.counters` (cumulative since start; the histogram is filled
from the latency ring in bulk), drift from the detector's status, the outbox's from its
database. Names (all gauges unless a ``_total``/histogram; docs/operations.md has the
table and alert rules)::

    edgeops_agent_info{version,device_id,target}               1
    edgeops_agent_model_info{name,version,release,runtime,sha256}  1 (only while a model serves)
    edgeops_agent_model_serving                                1 while a model is loaded
    edgeops_agent_model_release                                the active manifest's release
    edgeops_agent_model_expired                                1 past the bundle's expiry
    edgeops_agent_inferences_total                             rows answered
    edgeops_agent_requests_total                               requests answered (a batch counts once)
    edgeops_agent_inference_errors_total{type}                 rejected requests by error type
    edgeops_agent_inference_latency_seconds                    histogram of answered rows
    edgeops_agent_drift_alarm / _psi_max / _cusum_max / _prediction_psi / _features_over / _samples
    edgeops_agent_outbox_pending, _healthy; _dropped_total, _quarantined_total, _superseded_total
    edgeops_agent_mqtt_connected
    edgeops_agent_endpoint_refused_total                       local socket connections refused (busy)
    edgeops_agent_healthy                                      1 when /healthz answers 200
    edgeops_agent_serving_probe_duration_seconds               the last serving probe's time
    edgeops_agent_serving_probe_stuck_seconds                  how long the probe in flight has run
    process_*                                                  prometheus_client's process collector

Endpoints (GET or HEAD): ``/metrics`` (Prometheus text format 0.0.4), ``/healthz`` (200
``ok: …`` while :meth:`Daemon.health` finds nothing wrong, else 503 with the reason on one
line), anything else 404. The listener is bounded like the local endpoint: at most
:data:`MAX_CONNECTIONS` connections at once (one more gets ``503`` with the body ``busy: …``
and ``Retry-After: 1``, so a scraper can tell it from an unhealthy agent's
``unavailable: …``), and a connection must deliver its whole request (request line and
headers) within :data:`TIMEOUT_S` seconds of connecting, however it trickles, or it is
closed. Requests are logged at debug level only; so are clients that hang up or time out
(any local process could otherwise flood the journal); other failures are logged as a
warning at most once a minute, with the count of those not logged.
"""

from __future__ import annotations

import errno
import io
import logging
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import TYPE_CHECKING, Any

from edgeops_agent import __version__
from edgeops_agent.agent import LATENCY_BUCKETS_S
from edgeops_agent.errors import AgentError, MetricsError
from edgeops_agent.server import BoundedThreadingMixIn
from edgeops_agent.service import status_text

try:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily, Metric
    from prometheus_client.process_collector import ProcessCollector
    from prometheus_client.registry import Collector
except ImportError as exc:
    raise MetricsError(
        "agent.toml has a [metrics] table, but prometheus_client is not installed: pip install 'edgeops[metrics]'"
    ) from exc

if TYPE_CHECKING:
    from edgeops_agent.config import MetricsConfig
    from edgeops_agent.daemon import Daemon

__all__ = ["BUSY_RESPONSE", "CONTENT_TYPE", "MAX_CONNECTIONS", "TIMEOUT_S", "AgentCollector", "MetricsServer"]

log = logging.getLogger(__name__)

#: What generate_latest writes with its default escaping: the classic text format (every
#: name here is a legacy-valid name), which every Prometheus version parses.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Connections served at once; one more gets a 503.
MAX_CONNECTIONS = 8
#: Seconds a connection has, from its accept, to deliver its whole request.
TIMEOUT_S = 10.0
#: Seconds between two warnings of failed metrics requests (the rest go to debug, counted).
WARN_INTERVAL_S = 60.0
#: What a connection past :data:`MAX_CONNECTIONS` gets: a 503 a scraper can tell from "unhealthy".
_BUSY_BODY = b"busy: all metrics connections are in use; retry later\n"
BUSY_RESPONSE = (
    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nRetry-After: 1\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)
#: Errors a client causes by hanging up or stalling: never worth more than a debug line.
_CLIENT_GONE = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, TimeoutError)
#: Error types always exported (as 0 until they happen), so rate() alerts have a series.
KNOWN_ERRORS = ("TensorInputError", "ModelOutputError", "NoModel")

#: The ``le`` labels, written as prometheus_client writes its own (``2.5e-05``, ``0.001``, ``1.0``).
_BOUNDS = [repr(float(b)) for b in LATENCY_BUCKETS_S]


class AgentCollector(Collector):
    """Reads a running daemon's agent, outbox, link and monitor at each scrape."""

    def __init__(self, daemon: Daemon) -> None:
        """Collect from ``daemon``."""
        self.daemon = daemon

    def collect(self) -> Iterable[Metric]:
        """The metric families (see the module docstring)."""
        d = self.daemon
        agent = d.agent
        yield InfoMetricFamily(
            "edgeops_agent",
            "The agent's version, device id and target.",
            value={"version": __version__, "device_id": d.config.device_id, "target": d.config.target},
        )
        model = agent.model
        yield GaugeMetricFamily("edgeops_agent_model_serving", "1 while a model is loaded and serving.", value=int(bool(model)))
        if model is not None:
            m = model.manifest
            info = {"name": m.name, "version": m.version, "release": str(m.release), "runtime": m.runtime, "sha256": model.digest}
            yield InfoMetricFamily("edgeops_agent_model", "The active model.", value=info)
            yield GaugeMetricFamily("edgeops_agent_model_release", "The active model's release number.", value=m.release)
            yield GaugeMetricFamily(
                "edgeops_agent_model_expired", "1 when the active bundle is past its expiry.", value=int(model.expired)
            )
        yield from self._inference()
        yield from self._drift()
        yield from self._outbox()
        yield GaugeMetricFamily(
            "edgeops_agent_mqtt_connected", "1 while the MQTT link is connected.", value=int(d.link.connected.is_set())
        )
        server = getattr(d, "server", None)
        if server is not None:
            yield CounterMetricFamily(
                "edgeops_agent_endpoint_refused", "Local socket connections refused because all were busy.", value=server.refused
            )
        yield GaugeMetricFamily("edgeops_agent_healthy", "1 when /healthz answers 200.", value=int(d.health() is None))
        monitor = d.monitor
        if monitor is not None:
            if monitor.last_duration_s is not None:
                yield GaugeMetricFamily(
                    "edgeops_agent_serving_probe_duration_seconds",
                    "How long the last serving probe inference took.",
                    value=monitor.last_duration_s,
                )
            yield GaugeMetricFamily(
                "edgeops_agent_serving_probe_stuck_seconds",
                "How long the serving probe in flight has run (0 when none is).",
                value=monitor.stuck_for(),
            )

    def _inference(self) -> Iterable[Metric]:
        c = self.daemon.agent.counters()
        yield CounterMetricFamily("edgeops_agent_inferences", "Rows the model answered.", value=c.inferences)
        yield CounterMetricFamily(
            "edgeops_agent_requests", "Inference requests answered (a batch is one request).", value=c.requests
        )
        errors = CounterMetricFamily(
            "edgeops_agent_inference_errors", "Rejected inference requests by error type.", labels=["type"]
        )
        for kind in sorted({*KNOWN_ERRORS, *c.errors}):
            errors.add_metric([kind], c.errors.get(kind, 0))
        yield errors
        buckets = [*zip(_BOUNDS, c.latency_buckets[:-1], strict=True), ("+Inf", c.latency_buckets[-1])]
        yield HistogramMetricFamily(
            "edgeops_agent_inference_latency_seconds",
            "Latency of answered rows (a batch's time divided among its rows).",
            buckets=buckets,
            sum_value=c.latency_sum_s,
        )

    def _drift(self) -> Iterable[Metric]:
        detector = self.daemon.agent.detector
        if detector is None:
            return
        s = detector.status()
        yield GaugeMetricFamily("edgeops_agent_drift_alarm", "1 while the drift alarm is raised.", value=int(s.alarm))
        yield GaugeMetricFamily("edgeops_agent_drift_psi_max", "Largest per-feature PSI over the window.", value=s.max_psi)
        yield GaugeMetricFamily("edgeops_agent_drift_cusum_max", "Largest per-feature CUSUM level.", value=s.max_cusum)
        yield GaugeMetricFamily(
            "edgeops_agent_drift_prediction_psi", "PSI of the predicted classes over the window.", value=s.prediction_psi
        )
        yield GaugeMetricFamily(
            "edgeops_agent_drift_features_over", "Features over the CUSUM threshold.", value=len(s.features_over)
        )
        yield GaugeMetricFamily("edgeops_agent_drift_samples", "Inputs the drift detector has seen.", value=s.samples)

    def _outbox(self) -> Iterable[Metric]:
        outbox = self.daemon.outbox
        yield GaugeMetricFamily(
            "edgeops_agent_outbox_healthy", "1 while the outbox's last write succeeded.", value=int(outbox.healthy)
        )
        try:
            s = outbox.stats()
        except AgentError as exc:  # the database cannot be read: the scrape goes on without these
            log.debug("outbox stats not available: %s", exc)
            return
        yield GaugeMetricFamily("edgeops_agent_outbox_pending", "Messages waiting for the broker.", value=s.pending)
        yield CounterMetricFamily("edgeops_agent_outbox_dropped", "Messages dropped (cap or full disk).", value=s.dropped)
        yield CounterMetricFamily("edgeops_agent_outbox_quarantined", "Messages the broker refused.", value=s.quarantined)
        yield CounterMetricFamily(
            "edgeops_agent_outbox_superseded", "Retained messages replaced before they were sent.", value=s.superseded
        )


class _DeadlineSocketIO(io.RawIOBase):
    """Reads a socket with one deadline for everything read, however slowly the bytes trickle.

    A plain socket timeout bounds each ``recv`` only: a client sending a byte every few
    seconds would hold a connection (one of :data:`MAX_CONNECTIONS`) forever.
    """

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the request did not arrive within {TIMEOUT_S:g} s")
        self._sock.settimeout(left)
        return self._sock.recv_into(buffer)


class _Handler(BaseHTTPRequestHandler):
    server: MetricsServer
    timeout = TIMEOUT_S

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the plain socket file: replaced (closing it lets the socket close)
        self.rfile = io.BufferedReader(_DeadlineSocketIO(self.connection, time.monotonic() + TIMEOUT_S))

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, *, body: bool) -> None:
        self.connection.settimeout(TIMEOUT_S)  # the answer gets its own time, whatever the request left
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            code, ctype, data = 200, CONTENT_TYPE, self.server.scrape()
        elif path == "/healthz":
            problem = self.server.daemon.health()
            code = 200 if problem is None else 503
            text = f"ok: {status_text(self.server.daemon.agent)}" if problem is None else f"unavailable: {problem}"
            ctype, data = "text/plain; charset=utf-8", (" ".join(text.split()) + "\n").encode()
        else:
            code, ctype, data = 404, "text/plain; charset=utf-8", b"not found: try /metrics or /healthz\n"
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics %s: " + format, self.address_string(), *args)


class MetricsServer(BoundedThreadingMixIn, HTTPServer):
    """The ``[metrics]`` listener: bound at construction, served by :meth:`start`.

    Attributes:
        listen: the address as configured (``HOST:PORT``).
        refused: connections refused because :data:`MAX_CONNECTIONS` were open.
    """

    def __init__(self, settings: MetricsConfig, daemon: Daemon) -> None:
        """Bind ``settings.host:settings.port``.

        Raises:
            MetricsError: the host does not resolve, or the address cannot be bound (in use,
                not local, a privileged port).
        """
        self.daemon = daemon
        self.listen = settings.listen
        self._init_bounds(MAX_CONNECTIONS)
        self.failed = 0
        self._warned_at: float | None = None
        self._unlogged = 0
        self.registry = CollectorRegistry()
        self.registry.register(AgentCollector(daemon))
        ProcessCollector(registry=self.registry)
        try:
            infos = socket.getaddrinfo(settings.host, settings.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise MetricsError(f"[metrics] listen {self.listen}: cannot resolve {settings.host!r}: {exc.strerror}") from exc
        family, _, _, _, address = infos[0]
        self.address_family = family
        try:
            super().__init__((str(address[0]), int(address[1])), _Handler)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                reason = "the address is already in use (another process listens there; choose another [metrics] listen)"
            else:
                reason = f"cannot listen there: {exc.strerror or exc}"
            raise MetricsError(f"[metrics] listen {self.listen}: {reason}") from exc
        self._thread = threading.Thread(target=self.serve_forever, name="edgeops-metrics", daemon=True)

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse DNS lookup (a device without DNS would wait on it)."""
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self.server_address[1])

    def scrape(self) -> bytes:
        """The metrics in Prometheus text format."""
        return generate_latest(self.registry)

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread.start()
        log.info("metrics on http://%s/metrics and /healthz", self.listen)

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        if self._thread.is_alive():
            self.shutdown()
        self.server_close()

    def busy_reply(self) -> bytes:
        """A 503 a scraper can tell from "unhealthy"."""
        return BUSY_RESPONSE

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Never a traceback on stderr; a client that hung up or stalled: debug; else a rate-limited warning."""
        exc = sys.exc_info()[1]
        if isinstance(exc, _CLIENT_GONE):
            log.debug("metrics client %s gone: %s: %.200s", client_address, type(exc).__name__, exc)
            return
        with self._count_lock:
            self.failed += 1
            now = time.monotonic()
            if self._warned_at is not None and now - self._warned_at < WARN_INTERVAL_S:
                self._unlogged += 1
                unlogged = -1
            else:
                self._warned_at, unlogged, self._unlogged = now, self._unlogged, 0
        if unlogged < 0:
            log.debug("metrics request failed: %s: %.200s", type(exc).__name__, exc)
            return
        more = f" ({unlogged} more since the last warning, logged at debug level)" if unlogged else ""
        log.warning("metrics request failed: %s: %.200s%s", type(exc).__name__, exc, more)
