"""The agent: serves the active model, watches it, reports over MQTT.

:class:`Agent` is the Python API (``Agent.predict``); ``edgeops-agent run`` wraps it with
the MQTT link (:mod:`edgeops_agent.mqtt`), the local socket endpoint
(:mod:`edgeops_agent.server`) and a telemetry timer.

Predictions may come from any number of threads (each gets the sequential answer; see
:mod:`edgeops_agent.runtime`), one row at a time (:meth:`Agent.predict`) or many
(:meth:`Agent.predict_batch`). A non-finite model output raises :class:`ModelOutputError`
and is counted; it never becomes a label.

The prediction path is kept short because it is the product: check and convert the input
(:meth:`LoadedModel.prepare`), run the model, record the latency and the input. Drift
detection does not run per prediction: inputs are copied into a buffer, and every
``DRIFT_BATCH`` inputs the caller that fills it runs the detector on the whole batch,
vectorized (about 1 ms for 256 inputs of 106 features), after its own prediction was
timed. A background thread was tried and measured worse: on a two-core device it competed
with LiteRT's two worker threads on every inference, not once per 256. Bad input raises
:class:`TensorInputError`, is counted by type in telemetry, and never disturbs serving.

Ground truth arrives late in the field. Every prediction has an id (:attr:`Prediction.id`);
:meth:`Agent.feedback` attaches a label to one of the last :data:`FEEDBACK_RING` predictions
of the active model by that id, and telemetry's ``inference.feedback`` counts the labelled,
the correct and the refused ones per interval. The prediction path pays one numpy store for it
(the predicted index, in a ring indexed by the id).

A label is also training data. The raw input rows of the latest ``[drift] input_ring``
predictions are kept in a preallocated float32 ring indexed like the feedback ring (one more
row store per prediction, in the same locked section); when a label arrives while its row is
still there, the row, the true and the predicted index are copied into a FIFO of the newest
``[drift] labelled_rows`` labelled rows. A label whose row has left the ring counts as ever
in telemetry and keeps no row. Both belong to the model that served them and are emptied when
the active model changes. When the drift alarm rises, the rows labelled before the alarm's
input are no longer uploaded: they describe a world that is gone, and a retrain for the
drifted devices must learn (and take its drift reference from) the world as it is now.
:meth:`Agent.samples` picks the rows a ``sample_upload`` sends:
every labelled row first (newest first: they are what retraining needs, and an unbiased
recent sample), then reservoir rows drawn without replacement with weights
``1 + rarity + uncertainty`` (Efraimidis-Spirakis), so rows unlike the drift reference and
rows the model is unsure of are favoured, but no row weighs more than a bounded multiple of
another. Scoring runs the model on the candidate rows directly, outside :meth:`Agent.predict`:
an upload counts no inference, feeds no drift statistic and times nothing.

Tasks and inputs (issue 12): a sample may be N-d (``[1, *sample_shape]``), and a model may be a
regression or an anomaly scorer. Drift needs only each channel's histogram over its reference
bins of an N-d sample (:meth:`DriftDetector.channel_counts`, ``channels x bins`` small counts),
so the prediction reduces the sample to that, after it is timed and outside the lock, and the
buffer holds those counts instead of raw samples: a [3, 96, 96] image costs about 0.1 ms and
60 bytes of buffer instead of 108 KiB (docs/adr/0021). A
classifier's path is the one above, with one more branch on the task; a regression's or
anomaly model's outputs are kept beside its inputs for output drift, and an anomaly model's
predictions whose score is above ``task.threshold`` count toward an ``anomaly`` event, at most
one per ``anomaly_event_s`` (the later one carries the count since the earlier; anomalies held
back go out with the next telemetry record or when the model is replaced). Its verdicts are
counted like a classifier's classes, ``[normal, anomaly]``, which gives telemetry's anomaly rate.

The per-label prediction counts of telemetry (``inference.predicted``) cost nothing per
prediction either: the predicted indexes are in the drift buffer already, and they are
counted with one ``np.bincount`` when the buffer is handed over or a telemetry record is
taken (:meth:`Agent._tally`), under the lock that guards the buffer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from edgeops_agent import __version__
from edgeops_agent.drift import DriftConfig, DriftDetector
from edgeops_agent.errors import ActiveSlotDamagedError, AgentError, ConfigError, DataDirLockedError, FeedbackError
from edgeops_agent.fault import FaultInjection
from edgeops_agent.install import recover
from edgeops_agent.model import LoadedModel, Prediction
from edgeops_agent.store import DataDir
from edgeops_agent.trust import TrustStore
from edgeops_core import MESSAGE_SCHEMA, EdgeopsError, utc_now_text
from edgeops_core.messages import DEFAULT_SAMPLE_ROWS, MAX_PREDICTED_LABELS, MAX_SAMPLE_ROWS

__all__ = [
    "ANOMALY_EVENT_S",
    "FEEDBACK_RING",
    "LATENCY_BUCKETS_S",
    "MAX_INTERVAL_S",
    "Agent",
    "Counters",
    "SampleSelection",
    "process_resources",
]

log = logging.getLogger(__name__)

_new_tuple = tuple.__new__

#: Latencies kept for the telemetry percentiles (the most recent, per interval).
LATENCY_RING = 8192
#: Inputs buffered before the monitor thread runs the drift detector on them.
DRIFT_BATCH = 256
#: Recent predictions a late label can still be attached to (a power of two).
FEEDBACK_RING = 1 << 14
_RING_MASK = FEEDBACK_RING - 1
#: Prediction ids are ``boot << _ID_SHIFT | n``: ``n`` counts this process's predictions and
#: ``boot`` is drawn at start, so a label meant for a previous run is refused, never misfiled.
_ID_SHIFT = 40
#: In the feedback ring: the prediction was made by a model replaced while it ran (refused).
_REPLACED = np.iinfo(np.int64).min

#: Seconds between two ``anomaly`` events at most (the later one carries the count since the earlier).
ANOMALY_EVENT_S = 10.0
#: The longest ``anomaly_event_s`` (and telemetry interval) the agent takes: a day.
MAX_INTERVAL_S = 86_400.0

#: Upper bounds (seconds, inclusive) of the cumulative latency histogram (:meth:`Agent.counters`).
LATENCY_BUCKETS_S = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 1.0)


@dataclass(frozen=True, eq=False)
class SampleSelection:
    """The field samples :meth:`Agent.samples` picked: labelled rows first (newest first), then
    reservoir rows in the order of their weighted draw.

    Attributes:
        model: the model whose inputs these are (``None``: no model is loaded, and no rows).
        rows: raw input rows, float32 ``[n, features]``.
        labels: per row, the ground-truth label's name, or ``None`` for a reservoir row.
        predicted: per row, the index the model predicts for it, int64 ``[n]``.
        scores: per row, rarity + uncertainty (its selection weight minus 1), float64 ``[n]``.
    """

    model: LoadedModel | None
    rows: np.ndarray
    labels: tuple[str | None, ...]
    predicted: np.ndarray
    scores: np.ndarray

    def wire_rows(self) -> tuple[tuple[float, ...], ...]:
        """:attr:`rows` for JSON: each value as the float with the fewest digits that is the same float32.

        A float32 written as the double it converts to takes 17 digits; the shortest decimal
        that converts back to the same float32 takes 9 at most, which halves an upload.
        """
        return tuple(map(tuple, _float32_decimals(self.rows).tolist()))

    def wire_scores(self) -> tuple[float, ...]:
        """:attr:`scores` rounded to 4 decimals for JSON."""
        return tuple(np.round(self.scores, 4).tolist())


def _float32_decimals(a: np.ndarray) -> np.ndarray:
    """float32 values as float64s with the fewest significant digits (6-9) that round-trip to them.

    A decimal ``N / 10^k`` (``N`` an integer, ``|k| <= 22``) divided or multiplied in float64
    is the double nearest to it, whose ``repr`` is that decimal; 9 digits always round-trip.
    The rare value beyond that range of magnitudes (below about 1e-14 or above 1e31) goes
    through numpy's shortest ``str`` of a float32, one by one.
    """
    a = np.asarray(a, dtype=np.float32)
    x = a.astype(np.float64)
    out = x.copy()
    todo = x != 0
    with np.errstate(divide="ignore"):
        mag = np.floor(np.log10(np.abs(np.where(todo, x, 1.0))))
    for digits in (6, 7, 8, 9):
        k = digits - 1 - mag
        up = 10.0 ** np.minimum(np.abs(k), 22)
        r = np.where(k >= 0, np.round(x * up) / up, np.round(x / up) * up)
        ok = todo & (np.abs(k) <= 22) & (r.astype(np.float32) == a)
        out[ok] = r[ok]
        todo &= ~ok
        if not todo.any():
            return out
    out[todo] = [float(str(v)) for v in a[todo]]
    return out


@dataclass(frozen=True)
class Counters:
    """Cumulative serving counters since the agent started (the Prometheus metrics' source).

    Attributes:
        inferences: rows answered.
        requests: requests answered (a ``predict_batch`` of n rows is one request).
        errors: rejected requests by error type.
        latency_buckets: per :data:`LATENCY_BUCKETS_S` bound, then ``+Inf``: how many
            answered rows took at most that long (cumulative; the last equals ``inferences``).
        latency_sum_s: the answered rows' latencies added up.
    """

    inferences: int
    requests: int
    errors: dict[str, int]
    latency_buckets: tuple[int, ...]
    latency_sum_s: float


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
#: How long a read of the process's RSS is reused (many agents in one process share it).
RSS_MAX_AGE_S = 1.0
_rss_seen: tuple[float, float] = (-RSS_MAX_AGE_S, 0.0)


def percentiles(values: np.ndarray, qs: tuple[float, ...]) -> list[float]:
    """``numpy.percentile(values, qs)`` (its default, linear method) for a non-empty array.

    numpy's own costs ~40 µs a call however few the values; telemetry asks for three every
    interval on every device, so this sorts once and interpolates.
    """
    v = np.sort(np.asarray(values, dtype=np.float64).ravel()).tolist()
    last = len(v) - 1
    out = []
    for q in qs:
        pos = q / 100.0 * last
        lo = int(pos)
        hi = min(lo + 1, last)
        t = pos - lo
        a, b = v[lo], v[hi]
        # numpy's lerp: from the nearer end, so the result stays within [a, b]
        out.append(a + (b - a) * t if t < 0.5 else b - (b - a) * (1 - t))
    return out


def process_resources(prev: tuple[float, float] | None = None) -> tuple[dict[str, float], tuple[float, float]]:
    """``({"rss_bytes", "cpu_percent"}, sample)``: resident memory, and CPU use since ``prev``'s sample."""
    global _rss_seen
    seen_at, rss = _rss_seen
    now = time.monotonic()
    if now - seen_at >= RSS_MAX_AGE_S:  # one read a second per process, not per caller
        rss = 0.0
        try:
            with open("/proc/self/statm", "rb") as fh:  # "size resident shared ...", in pages
                rss = float(fh.read().split()[1]) * _PAGE
        except (OSError, IndexError, ValueError):
            pass
        _rss_seen = (now, rss)
    t = os.times()
    sample = (t.user + t.system, time.monotonic())
    cpu = 0.0
    if prev is not None and sample[1] > prev[1]:
        cpu = 100.0 * (sample[0] - prev[0]) / (sample[1] - prev[1])
    return {"rss_bytes": rss, "cpu_percent": round(cpu, 2)}, sample


class Agent:
    """The active model of one data directory, served with telemetry and drift detection."""

    def __init__(
        self,
        data_dir: DataDir,
        *,
        device_id: str = "local",
        drift: DriftConfig | None = None,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        threads: int | None = None,
        anomaly_event_s: float = ANOMALY_EVENT_S,
    ) -> None:
        """Load the active bundle (if any) from ``data_dir``, checked against its install-time digest.

        A missing, changed or unloadable active slot does not stop the agent: it starts
        without a model, with :attr:`fault` and the state's ``last_error`` saying why, and
        predictions raise :class:`ActiveSlotDamagedError`; :meth:`install` repairs it.
        When the data directory's lock is free, start-up also rolls back a trial left
        unconfirmed by a process that is gone, and removes stale temporary files.

        ``anomaly_event_s``: an anomaly model's ``anomaly`` events come at most this often; the
        anomalies in between are counted into the next one (0..:data:`MAX_INTERVAL_S` seconds).

        Raises:
            ConfigError: ``anomaly_event_s`` is out of range.
            StateCorruptedError: the state file is damaged, or missing while slots exist
                (:class:`StateMissingError`).
        """
        if not 0 <= anomaly_event_s <= MAX_INTERVAL_S:  # also NaN; int(1e300 * 1e9) would raise OverflowError
            raise ConfigError(f"anomaly_event_s must be 0..{MAX_INTERVAL_S:g} seconds, got {anomaly_event_s!r}")
        self.data_dir = data_dir
        self.device_id = device_id
        self.drift_config = drift or DriftConfig()
        self._on_event = on_event
        self._threads = threads
        self._lock = threading.Lock()
        self._latency = np.zeros(LATENCY_RING, dtype=np.float64)
        self._lat_n = 0
        self._count = 0
        self._errors: dict[str, int] = {}
        # Requests answered = _count - _batch_rows + _batches: predict() adds nothing for it.
        self._batches = 0
        self._batch_rows = 0
        self._window = (0, 0)  # (count, lat_n) at the last telemetry snapshot
        # The cumulative histogram is filled from the latency ring in bulk (numpy), never per
        # call: before the ring would overwrite latencies not yet counted, and on counters().
        self._edges_ns = np.asarray(LATENCY_BUCKETS_S, dtype=np.float64) * 1e9
        self._hist = np.zeros(len(LATENCY_BUCKETS_S) + 1, dtype=np.int64)
        self._hist_sum_ns = 0.0
        self._harvested = 0  # ring entries [0, _harvested) are in the histogram
        self._resources: tuple[float, float] | None = None
        self.model: LoadedModel | None = None
        self.detector: DriftDetector | None = None
        self._buf = np.zeros((0, 0), dtype=np.float32)
        self._pred = np.zeros(0, dtype=np.int64)
        # A regression's or anomaly model's outputs beside their inputs (None for a classifier).
        self._outs: np.ndarray | None = None
        self._fill = 0
        # Anomaly events: anomalies not yet reported, and when the last event went (perf_counter ns).
        self._anomaly_gap_ns = int(anomaly_event_s * 1e9)
        self._anomaly_pending = 0
        self._anomaly_last_ns: int | None = None
        self._anomaly_score = 0.0
        # Per-label counts of the active model's predictions this interval: buffer entries
        # [0, _counted) are in _pred_counts already (see _tally).
        self._pred_counts = np.zeros(0, dtype=np.int64)
        self._counted = 0
        # Feedback: predicted index per prediction number n (n & _RING_MASK); a labelled one is
        # stored as -1 - index. Numbers <= _ring_from were made by an earlier model.
        self._id_base = (int.from_bytes(os.urandom(3), "big") + 1) << _ID_SHIFT
        self._recent = np.zeros(FEEDBACK_RING, dtype=np.int64)
        self._ring_from = 0
        self._fb_labelled = self._fb_correct = self._fb_rejected = 0
        # Raw input of prediction n in row n % _ring_rows of _rows (the last input_ring ones; a
        # one-row dummy when input_ring is 0), and the labelled FIFO: row i of _lab_* for the
        # (i+1)-th label modulo labelled_rows; _lab_n labels so far. Sized per model (_activate).
        self._rows = np.zeros((1, 0), dtype=np.float32)
        self._ring_rows = 1
        self._lab_rows = np.zeros((0, 0), dtype=np.float32)
        self._lab_truth = np.zeros(0, dtype=np.int64)
        self._lab_pred = np.zeros(0, dtype=np.int64)
        self._lab_n = 0
        # Prediction number of each labelled row; rows of predictions <= _lab_from are not uploaded.
        self._lab_id = np.zeros(0, dtype=np.int64)
        self._lab_from = 0
        # The standard library's generator, as the drift detector's (numpy.random costs RSS).
        self._rng = random.Random()  # noqa: S311  sampling, not security
        #: Test-only (:mod:`edgeops_agent.fault`): slow or failing predictions of one release.
        self.injected_fault: FaultInjection | None = None
        self._drift_jobs: queue.SimpleQueue[tuple[DriftDetector, np.ndarray, np.ndarray, np.ndarray | None]] = queue.SimpleQueue()
        self._drift_lock = threading.Lock()
        #: Why the active slot cannot be served (missing, changed, unloadable); ``None`` if it can.
        self.fault: str | None = None
        # Start-up maintenance (roll back an unconfirmed trial, remove stale temporaries)
        # needs the directory's lock; a process that cannot have it (``predict`` beside a
        # running daemon) only reads.
        hold = None
        if data_dir.root.is_dir():
            with contextlib.suppress(DataDirLockedError):
                hold = data_dir.lock("start-up")
        try:
            self.state = recover(data_dir) if hold else data_dir.load_state()
            active = self.state.active
            slot = self.state.slots.get(active) if active else None
            if active is not None and slot is not None:
                path = data_dir.slot_path(active)
                try:
                    data = path.read_bytes()
                    revoked = TrustStore(data_dir).revoked()  # a slot signed by a revoked key is not served
                    model = LoadedModel.from_installed(data, slot.sha256, source=str(path), threads=threads, revoked=revoked)
                    self._activate(model)
                except (OSError, EdgeopsError) as exc:
                    # Installing must stay possible: start without a model, say so, and
                    # let an install (to the other slot) repair it.
                    detail = exc.strerror if isinstance(exc, OSError) else str(exc)
                    self.fault = (
                        f"active slot {active} ({slot.name} release {slot.release}) cannot be served: {detail}; "
                        "install a bundle to repair it (the same bundle, or a newer release)"
                    )
                    log.error("%s", self.fault)
                    self.state.last_error = self.fault[:500]
                    if hold is not None:
                        with contextlib.suppress(AgentError):
                            data_dir.save_state(self.state)
        finally:
            if hold is not None:
                hold.release()

    def _no_model(self) -> AgentError:
        """The error of a prediction with no model: a damaged active slot, or none installed."""
        if self.fault is not None:
            return ActiveSlotDamagedError(self.fault)
        return AgentError("no model is installed: edgeops-agent install BUNDLE")

    def _activate(self, model: LoadedModel) -> None:
        cfg = self.drift_config
        flat = model.positions == 1
        if not flat:
            # Field samples are flat feature rows (edgeops_core.messages.Samples, the field
            # datasets): an N-d model keeps no rows for them (no input ring, labelled FIFO or
            # reservoir), and sample_upload is refused (Agent.samples).
            cfg = replace(cfg, reservoir=0, input_ring=0, labelled_rows=0)
            log.warning(
                "field-sample upload is off for %s release %d: its input is N-d %s and samples carry flat feature rows",
                model.manifest.name,
                model.manifest.release,
                [1, *model.sample_shape],
            )
        detector = DriftDetector(model.manifest.drift_reference, len(model.labels), cfg, positions=model.positions)
        # What a prediction keeps for drift: a flat model's raw row, an N-d one's channel
        # histograms (channel_counts). For an N-d model the input ring is a one-row dummy.
        width = model.n_values if flat else detector.count_width
        kind = np.float32 if flat else detector.count_dtype
        rows = np.zeros((max(cfg.input_ring, 1), width), dtype=kind)
        labelled = np.zeros((cfg.labelled_rows, width), dtype=np.float32)
        with self._lock:
            old, owed = self.model, self._anomaly_pending
            # The detector first: predict() reads the model, then (N-d) the detector, without the
            # lock; whoever sees this model sees its detector.
            self.detector = detector
            self.model = model
            self._buf = np.zeros((DRIFT_BATCH, width), dtype=kind)
            self._pred = np.zeros(DRIFT_BATCH, dtype=np.int64)
            self._outs = None if model.classifier else np.zeros((DRIFT_BATCH, len(model.labels)), dtype=np.float32)
            self._fill = 0
            # An anomaly model's "classes" are its verdicts: [normal, anomaly].
            self._pred_counts = np.zeros(2 if model.anomaly else len(model.labels), dtype=np.int64)
            self._counted = 0
            self._ring_from = self._count
            # Rows belong to the model that served them: a new model starts with none.
            self._rows, self._ring_rows = rows, rows.shape[0]
            self._lab_rows = labelled
            self._lab_truth = np.zeros(cfg.labelled_rows, dtype=np.int64)
            self._lab_pred = np.zeros(cfg.labelled_rows, dtype=np.int64)
            self._lab_id = np.zeros(cfg.labelled_rows, dtype=np.int64)
            self._lab_n = 0
            self._lab_from = self._count
            self._anomaly_pending = 0
        if owed and old is not None:  # the replaced model's anomalies held back by the rate limit
            self._anomaly_event(old, owed, self._anomaly_score, None)

    def install(self, source: Any, *, target: str | None = None, switch_model: str | None = None) -> Any:
        """Install a bundle (see :func:`edgeops_agent.install.install_bundle`) and serve it.

        Events ``install_started``, then ``install_activated`` or ``install_rejected``.
        On rejection the active model is unchanged and still serving. Works with a damaged
        active slot too (it is the repair).
        """
        from edgeops_agent.install import install_bundle

        self.event("install_started", {})
        try:
            result = install_bundle(self.data_dir, source, target=target, switch_model=switch_model)
        except EdgeopsError as exc:
            with contextlib.suppress(EdgeopsError):  # install_bundle recorded the error
                self.state = self.data_dir.load_state()
            self.event("install_rejected", {"error": type(exc).__name__, "message": str(exc)})
            # A list the bundle carried may have revoked the key of the model serving now,
            # though the bundle itself was refused. (Installed, it replaces that model.)
            self.enforce_revocations()
            raise
        if result.trust is not None:
            self.event("trust_updated", {"source": "bundle", **result.trust.detail()})
        self.flush_drift()
        self._activate(result.model)
        self.fault = None
        self.state = self.data_dir.load_state()
        # A trust_update handled since the install's commit found the old model serving;
        # the one just activated is checked here.
        self.enforce_revocations()
        self.event(
            "install_activated",
            {
                "name": result.name,
                "version": result.version,
                "release": result.release,
                "slot": result.slot,
                "self_tests": result.self_tests,
            },
        )
        return result

    def enforce_revocations(self) -> str | None:
        """Stop serving the active model if the key that signed it is revoked now (docs/adr/0018).

        The same outcome as a start-up with that slot (:meth:`LoadedModel.from_installed`):
        no model, :attr:`fault` and the state's ``last_error`` say why, predictions raise
        :class:`ActiveSlotDamagedError`, and installing a bundle signed by a current key
        repairs it. Call after anything that may revoke a key.

        Returns:
            Why the model was stopped, or ``None`` if it serves on (or none served).
        """
        while True:
            model = self.model
            if model is None:
                return None
            try:
                revoked = TrustStore(self.data_dir).revoked()
            except EdgeopsError as exc:  # a damaged trust store: the next start-up fails closed the same way
                revoked, why = frozenset({model.signer}), f"the trust store cannot be read ({exc})"
            else:
                why = f"its signing key sha256:{model.signer[:16]}… is revoked"
            if model.signer not in revoked and (model.signer or not revoked):
                return None
            m = model.manifest
            reason = (
                f"active slot {self.state.active} ({m.name} release {m.release}) is no longer served: {why}; install a "
                "release signed by a current release key (docs/adr/0018)"
            )
            if self._stop_serving(reason, only=model):
                return reason
            # Replaced meanwhile (an install, a rollback): its key was checked before a
            # revocation that may have landed since, so check the model serving now.

    def _stop_serving(self, reason: str, *, only: LoadedModel | None = None) -> bool:
        """Serve no model from now on, as after a failed start-up check: :attr:`fault` and ``last_error`` say why.

        With ``only``, nothing happens unless that model is the one serving.

        Returns:
            Whether the model was dropped.
        """
        with self._lock:
            if only is not None and self.model is not only:
                return False
            self.model = None
        self.fault = reason
        log.error("%s", reason)
        with contextlib.suppress(EdgeopsError), self.data_dir.lock("revocation"):
            state = self.data_dir.load_state()  # fresh: never write back an older copy
            state.last_error = reason[:500]
            self.data_dir.save_state(state)
            self.state = state
        return True

    def predict(self, features: Any) -> Prediction:
        """Run the active model on one raw sample.

        ``features`` is a numpy array or nested lists of shape ``sample_shape`` or
        ``[1, *sample_shape]`` (a flat model: ``[features]`` or ``[1, features]``). The result
        says the model's task: the top class, the regression outputs, or the anomaly score
        and verdict (:class:`Prediction`).

        Safe to call from any number of threads: each caller gets the answer a sequential
        call would (see :mod:`edgeops_agent.runtime`).

        Raises:
            TensorInputError: wrong shape, non-numeric, NaN or inf (counted in telemetry).
            ModelOutputError: the model's output is NaN or inf (counted; no label is given).
            AgentError: no model is installed, or the runtime failed (counted).
            Exception: whatever the runtime itself raised (counted by its type name).
        """
        start = time.perf_counter_ns()
        model = self.model
        if model is None:
            self.count_error("NoModel")
            raise self._no_model()
        fault = self.injected_fault
        try:
            row, tensor = model.prepare(features)
            logits = model.output(model.invoke(tensor))
            if fault is not None and fault.release == model.manifest.release:
                fault.apply()
        except EdgeopsError as exc:
            self.count_error(getattr(exc, "counted_as", type(exc).__name__))
            raise
        except Exception as exc:  # the runtime's own exception (e.g. onnxruntime's Fail): counted, then raised
            self.count_error(type(exc).__name__)
            raise
        classifier = model.classifier
        # A regression's "index" is 0; an anomaly model's is its verdict (1: anomaly).
        index = int(logits.argmax()) if classifier else model.verdict(float(logits[0]))
        elapsed = time.perf_counter_ns() - start
        if model.positions != 1:  # N-d: drift keeps the channels' histograms, not the sample
            row = self._channel_counts(row)
        with self._lock:
            self._count += 1
            n = self._count
            if self._lat_n - self._harvested >= LATENCY_RING:
                self._harvest()
            self._latency[self._lat_n % LATENCY_RING] = elapsed
            self._lat_n += 1
            full = False
            if self.model is not model:  # replaced while this ran: its label would be misfiled
                self._recent[n & _RING_MASK] = _REPLACED
            else:
                self._recent[n & _RING_MASK] = index
                self._rows[n % self._ring_rows] = row
                self._buf[self._fill] = row
                self._pred[self._fill] = index
                if not classifier:
                    self._outs[self._fill] = logits  # type: ignore[index]
                self._fill += 1
                full = self._fill == DRIFT_BATCH
                if full:
                    self._hand_over()
        if full:
            self._drain()
        if classifier:
            # tuple.__new__ skips NamedTuple's Python-level __new__ (0.35 us of a ~15 us call).
            return _new_tuple(
                Prediction,
                (model.labels[index], index, logits.tolist(), elapsed / 1e6, self._id_base + n, "classification", None, ()),
            )
        values = logits.tolist()
        if index:
            self._anomalies(model, 1, values[0], self._id_base + n, start)
        return _answer(model, index, values, elapsed / 1e6, self._id_base + n)

    def _channel_counts(self, rows: np.ndarray) -> np.ndarray:
        """An N-d model's raw rows reduced to what drift keeps of them (:meth:`DriftDetector.channel_counts`).

        Called after ``self.model`` was read: ``_activate`` stores the detector before the model,
        so this is the detector of that model or of a later one (whose rows are then discarded).
        """
        detector = self.detector
        if detector is None or detector.positions == 1:  # a flat model meanwhile: its rows are discarded
            return rows
        if rows.shape[-1] != detector.n * detector.positions:  # another N-d model meanwhile: discarded too
            return rows
        counts: np.ndarray = detector.channel_counts(rows).reshape(*rows.shape[:-1], -1)  # a row, or [n, counts]
        return counts

    def _anomalies(self, model: LoadedModel, k: int, score: float, prediction_id: int, now_ns: int) -> None:
        """Count ``k`` anomalies; report them with an ``anomaly`` event unless one went less than ``anomaly_event_s`` ago."""
        with self._lock:
            self._anomaly_pending += k
            self._anomaly_score = score
            last = self._anomaly_last_ns
            if last is not None and now_ns - last < self._anomaly_gap_ns:
                return
            count, self._anomaly_pending = self._anomaly_pending, 0
            self._anomaly_last_ns = now_ns
        self._anomaly_event(model, count, score, prediction_id)

    def _anomaly_event(self, model: LoadedModel, count: int, score: float, prediction_id: int | None) -> None:
        m = model.manifest
        self.event(
            "anomaly",
            {
                "count": count,
                "score": score,
                "threshold": model.threshold,
                "prediction_id": prediction_id,
                "model": m.name,
                "release": m.release,
            },
        )

    def predict_batch(self, rows: Any) -> list[Prediction]:
        """Run the active model on ``rows`` (``[n, *sample_shape]``), one :class:`Prediction` per row.

        The conversions, the output checks and the bookkeeping are done once for the whole
        batch; the runtime is called once per row, because every model this toolchain
        exports has a fixed batch dimension of 1. Each prediction's ``latency_ms`` is the
        batch's time divided by ``n``. All rows are answered, or none (an error names the row).

        Raises:
            TensorInputError: not ``[n, *sample_shape]``, non-numeric, NaN or inf (counted once).
            ModelOutputError: a row's output is NaN or inf (counted once; no label is given).
            AgentError: no model is installed, or the runtime failed (counted once).
            Exception: whatever the runtime itself raised (counted once, by its type name).
        """
        start = time.perf_counter_ns()
        model = self.model
        if model is None:
            self.count_error("NoModel")
            raise self._no_model()
        fault = self.injected_fault
        try:
            x, tensors = model.prepare_batch(rows)
            invoke = model.invoke
            logits = model.output_batch(np.stack([invoke(t) for t in tensors]))
            if fault is not None and fault.release == model.manifest.release:
                for _ in range(len(tensors)):
                    fault.apply()
        except EdgeopsError as exc:
            self.count_error(getattr(exc, "counted_as", type(exc).__name__))
            raise
        except Exception as exc:  # the runtime's own exception: counted once, then raised
            self.count_error(type(exc).__name__)
            raise
        classifier = model.classifier
        index = logits.argmax(axis=1) if classifier else _verdicts(model, logits)
        n = len(x)
        per_row = (time.perf_counter_ns() - start) / n
        if model.positions != 1:
            x = self._channel_counts(x)
        with self._lock:
            first = self._count + 1
            self._count += n
            same = self.model is model
            numbers = np.arange(first, first + n)
            self._recent[numbers & _RING_MASK] = index if same else _REPLACED
            if same:
                keep = min(n, self._ring_rows)  # the last rows only: earlier ones would be overwritten
                self._rows[numbers[n - keep :] % self._ring_rows] = x[n - keep :]
            self._batches += 1
            self._batch_rows += n
            k = min(n, LATENCY_RING)
            if self._lat_n + k - self._harvested > LATENCY_RING:
                self._harvest()
            self._latency[np.arange(self._lat_n, self._lat_n + k) % LATENCY_RING] = per_row
            self._lat_n += k
            if n > k:  # rows past the ring's size: straight into the histogram
                self._hist[int(np.searchsorted(self._edges_ns, per_row))] += n - k
                self._hist_sum_ns += per_row * (n - k)
            drain = False
            done = 0
            while same and done < n:
                take = min(n - done, DRIFT_BATCH - self._fill)
                self._buf[self._fill : self._fill + take] = x[done : done + take]
                self._pred[self._fill : self._fill + take] = index[done : done + take]
                if not classifier:
                    self._outs[self._fill : self._fill + take] = logits[done : done + take]  # type: ignore[index]
                self._fill += take
                done += take
                if self._fill == DRIFT_BATCH:
                    self._hand_over()
                    drain = True
        if drain:
            self._drain()
        labels, ms, base = model.labels, per_row / 1e6, self._id_base + first
        if classifier:
            return [
                _new_tuple(Prediction, (labels[k], k, row, ms, base + i, "classification", None, ()))
                for i, (k, row) in enumerate(zip(index.tolist(), logits.tolist(), strict=True))
            ]
        return self._answers(model, index, logits, ms, base, start)

    def _answers(
        self, model: LoadedModel, index: np.ndarray, logits: np.ndarray, ms: float, base: int, start: int
    ) -> list[Prediction]:
        """A batch's predictions of a regression or anomaly model; its anomalies counted (and reported)."""
        out = [
            _answer(model, k, row, ms, base + i) for i, (k, row) in enumerate(zip(index.tolist(), logits.tolist(), strict=True))
        ]
        flagged = [p for p in out if p.class_index]
        if flagged:
            last = flagged[-1]
            self._anomalies(model, len(flagged), last.logits[0], last.id, start)
        return out

    def feedback(self, prediction_id: int, label: str | int) -> bool:
        """Attach the ground-truth ``label`` (a name or an index) to a recent prediction; ``True`` if it was right.

        Counted in telemetry ``inference.feedback``: labelled and correct, or rejected. If the
        prediction is one of the last ``[drift] input_ring``, its input row is kept, labelled,
        for :meth:`samples` (the newest ``[drift] labelled_rows`` are kept).

        Raises:
            FeedbackError: the id is not one of the last :data:`FEEDBACK_RING` predictions of
                the active model (or of this run), it has its label already, the label is
                not one of the model's, or the model is not a classifier.
            AgentError: no model is installed.
        """
        if isinstance(prediction_id, bool) or not isinstance(prediction_id, int):
            with self._lock:
                self._fb_rejected += 1
            raise FeedbackError(f"a prediction id is an integer, got {type(prediction_id).__name__}")
        model = self.model
        if model is None:
            raise self._no_model()
        if not model.classifier:
            with self._lock:
                self._fb_rejected += 1
            raise FeedbackError(f"labels are attached to a classifier's predictions; the active model is a {model.task} model")
        labels = model.labels
        if isinstance(label, str) and label in labels:
            truth = labels.index(label)
        elif isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(labels):
            truth = label
        else:
            with self._lock:
                self._fb_rejected += 1
            raise FeedbackError(
                f"label {str(label)[:80]!r} is not one of the model's labels ({', '.join(labels)}) or their index"
            )
        with self._lock:
            n = prediction_id - self._id_base
            if not self._ring_from < n <= self._count or self._count - n >= FEEDBACK_RING:
                self._fb_rejected += 1
                raise FeedbackError(
                    f"prediction {prediction_id} is unknown here: not one of the last {FEEDBACK_RING} predictions "
                    "of the active model since the agent started"
                )
            slot = n & _RING_MASK
            predicted = int(self._recent[slot])
            if predicted < 0:
                self._fb_rejected += 1
                if predicted == _REPLACED:
                    raise FeedbackError(f"prediction {prediction_id} was made by a model replaced since")
                raise FeedbackError(f"prediction {prediction_id} has its label already")
            self._recent[slot] = -1 - predicted
            self._fb_labelled += 1
            correct = predicted == truth
            self._fb_correct += correct
            cap = self._lab_truth.size
            if cap and self._count - n < self.drift_config.input_ring:  # its row is still in the ring
                i = self._lab_n % cap
                self._lab_rows[i] = self._rows[n % self._ring_rows]
                self._lab_truth[i] = truth
                self._lab_id[i] = n
                self._lab_pred[i] = predicted
                self._lab_n += 1
        return correct

    def count_error(self, kind: str) -> None:
        """Count a rejected inference request of type ``kind`` (telemetry ``inference.errors``)."""
        with self._lock:
            self._errors[kind] = self._errors.get(kind, 0) + 1

    def _harvest(self) -> None:
        """Add the ring's latencies not yet counted to the histogram (caller holds ``self._lock``)."""
        if self._lat_n == self._harvested:
            return
        lat = self._latency[np.arange(self._harvested, self._lat_n) % LATENCY_RING]
        # side="left": a latency equal to a bound counts in that bound's bucket (``le``).
        self._hist += np.bincount(np.searchsorted(self._edges_ns, lat), minlength=self._hist.size)
        self._hist_sum_ns += float(lat.sum())
        self._harvested = self._lat_n

    def counters(self) -> Counters:
        """The cumulative counters: inferences, errors by type, the latency histogram."""
        with self._lock:
            self._harvest()
            return Counters(
                inferences=self._count,
                requests=self._count - self._batch_rows + self._batches,
                errors=dict(self._errors),
                latency_buckets=tuple(int(c) for c in np.cumsum(self._hist)),
                latency_sum_s=self._hist_sum_ns / 1e9,
            )

    def _tally(self) -> None:
        """Add the buffered predictions not yet counted to the per-label counts (caller holds ``self._lock``)."""
        if self._fill > self._counted:
            counts = np.bincount(self._pred[self._counted : self._fill], minlength=self._pred_counts.size)
            self._pred_counts += counts[: self._pred_counts.size]
            self._counted = self._fill

    def _hand_over(self) -> None:
        """Queue the buffered inputs for the detector (caller holds ``self._lock``)."""
        self._tally()
        if self._fill and self.detector is not None:
            outs = self._outs[: self._fill].copy() if self._outs is not None else None
            self._drift_jobs.put((self.detector, self._buf[: self._fill].copy(), self._pred[: self._fill].copy(), outs))
        self._fill = 0
        self._counted = 0

    def _drain(self) -> None:
        """Run the drift detector on every queued batch, in this thread, one thread at a time."""
        with self._drift_lock:
            while True:
                try:
                    detector, rows, preds, outs = self._drift_jobs.get_nowait()
                except queue.Empty:
                    return
                try:
                    if detector.positions == 1:
                        changes = detector.update_batch(rows, preds, outs)
                    else:  # N-d: the rows are the samples' channel histograms
                        changes = detector.update_counts(rows, preds, outs)
                except Exception:  # a detector bug must not stop serving
                    log.exception("drift detector failed")
                    continue
                for sample, raised in changes:
                    if raised:
                        with self._lock:
                            if detector is self.detector:  # sample k of this model is prediction _ring_from + k
                                self._lab_from = max(self._lab_from, self._ring_from + sample)
                    status = detector.status()
                    detail: dict[str, Any] = {
                        "sample": sample,
                        "features": status.features_over,
                        "max_cusum": status.max_cusum,
                        "max_psi": status.max_psi,
                    }
                    if status.output_psi:  # a regression's or anomaly model's answers
                        detail["prediction_psi"] = status.prediction_psi
                        detail["output_psi"] = status.output_psi
                    self.event("drift_alarm" if raised else "drift_cleared", detail)

    def flush_drift(self) -> None:
        """Feed the buffered inputs to the drift detector now."""
        with self._lock:
            self._hand_over()
        self._drain()

    def event(self, kind: str, detail: dict[str, Any]) -> None:
        """Report an event (to the MQTT outbox when running as a daemon)."""
        log.info("event %s %s", kind, detail)
        if self._on_event is not None:
            self._on_event(kind, detail)

    def telemetry(self, interval_s: float) -> dict[str, Any]:
        """One telemetry record (see docs/asyncapi.json); counters since the previous call."""
        with self._lock:
            count, lat_n = self._count, self._lat_n
            prev_count, prev_lat = self._window
            self._window = (count, lat_n)
            fresh = min(lat_n - prev_lat, LATENCY_RING)
            idx = (np.arange(lat_n - fresh, lat_n) % LATENCY_RING) if fresh else np.zeros(0, dtype=np.int64)
            lat = self._latency[idx] / 1e6
            errors = dict(self._errors)
            self._tally()
            predicted = self._pred_counts.tolist() if self.model is not None else None
            self._pred_counts[:] = 0
            owed = self._anomaly_pending
            due = owed > 0 and (
                self._anomaly_last_ns is None or time.perf_counter_ns() - self._anomaly_last_ns >= self._anomaly_gap_ns
            )
            if due:
                self._anomaly_pending, self._anomaly_last_ns = 0, time.perf_counter_ns()
            feedback = {"labelled": self._fb_labelled, "correct": self._fb_correct, "rejected": self._fb_rejected}
            self._fb_labelled = self._fb_correct = self._fb_rejected = 0
        resources, self._resources = process_resources(self._resources)
        p50, p95, p99 = (round(v, 4) for v in percentiles(lat, (50, 95, 99))) if lat.size else (None, None, None)
        status = self.detector.status() if self.detector else None
        model = self.model
        if due and model is not None:  # anomalies held back by the rate limit, and none since
            self._anomaly_event(model, owed, self._anomaly_score, None)
        inference: dict[str, Any] = {
            "count": count,
            "window_count": count - prev_count,
            "errors": errors,
            "error_count": sum(errors.values()),
            "predicted": predicted if predicted is None or len(predicted) <= MAX_PREDICTED_LABELS else None,
            "feedback": feedback,
            "task": model.task if model is not None else None,
        }
        if model is not None and not model.classifier:
            # The answers are not classes: no per-label counts. An anomaly model's verdicts are
            # counted instead: [normal, anomaly] over this interval's predictions.
            inference["predicted"] = None
            if model.anomaly and predicted is not None and len(predicted) == 2:
                scored = predicted[0] + predicted[1]
                inference["anomaly"] = {"count": predicted[1], "rate": round(predicted[1] / scored, 6) if scored else None}
        drift: dict[str, Any] | None = None
        if status is not None:
            drift = {
                "alarm": status.alarm,
                "samples": status.samples,
                "max_psi": status.max_psi,
                "max_feature": status.max_feature,
                "max_cusum": status.max_cusum,
                "prediction_psi": status.prediction_psi,
            }
            if status.output_psi:
                drift["output_psi"] = status.output_psi
        return {
            "schema": MESSAGE_SCHEMA,
            "device_id": self.device_id,
            "ts": utc_now_text(),
            "interval_s": interval_s,
            "model": {"name": model.manifest.name, "release": model.manifest.release} if model else None,
            "inference": inference,
            "latency_ms": {
                "p50": p50,
                "p95": p95,
                "p99": p99,
                "max": round(float(lat.max()), 4) if lat.size else None,
            },
            "drift": drift,
            "resources": resources,
        }

    def state_message(self, *, online: bool) -> dict[str, Any]:
        """The retained ``state`` message."""
        model, st = self.model, self.state
        bundle = None
        if model is not None:
            m = model.manifest
            bundle = {
                "name": m.name,
                "version": m.version,
                "release": m.release,
                "sha256": model.digest,
                "slot": st.active,
                "expires": m.expires,
                "expired": model.expired,
            }
        health = "no_model" if model is None else ("expired" if model.expired else "ok")
        if self.detector is not None and self.detector.alarm and health == "ok":
            health = "drift"
        return {
            "schema": MESSAGE_SCHEMA,
            "device_id": self.device_id,
            "ts": utc_now_text(),
            "online": online,
            "agent_version": __version__,
            "target": st.target,
            "runtime": model.manifest.runtime if model else None,
            "bundle": bundle,
            "health": health,
            "last_error": st.last_error,
        }

    def samples(self, max_rows: int = DEFAULT_SAMPLE_ROWS, *, seed: int | None = None) -> SampleSelection:
        """Pick at most ``max_rows`` field samples of the active model to upload.

        First every kept labelled row, newest first; the slots left go to rows of the drift
        reservoir (except those equal to a labelled row sent), drawn without replacement with
        weight ``w = 1 + rarity + uncertainty`` (Efraimidis-Spirakis: the largest keys
        ``ln(u) / w``), in draw order. ``rarity`` is :meth:`~edgeops_agent.drift.DriftDetector.rarity`
        (about 1 for a row like the reference, up to :data:`~edgeops_agent.drift.RARITY_MAX`);
        ``uncertainty`` is 1 minus the model's top softmax probability for the row (1 if the
        model's output for it is not finite). Each row's score is ``w - 1``. The model runs on
        the candidate rows outside :meth:`predict`: nothing is counted, timed or fed to the
        drift detector. Inputs buffered for the detector are handed to it first, so the
        reservoir is up to date.

        Args:
            max_rows: 1..:data:`~edgeops_core.messages.MAX_SAMPLE_ROWS`.
            seed: makes the draw repeatable (tests); by default the agent's own generator.

        A regression's or anomaly model's rows carry no labels (feedback is for classifiers)
        and no uncertainty (their outputs are not probabilities): they are weighted by rarity.
        An N-d input model keeps no rows for uploads (samples are flat feature rows).

        Raises:
            ValueError: ``max_rows`` is out of range.
            AgentError: the active model's input is N-d.
        """
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or not 1 <= max_rows <= MAX_SAMPLE_ROWS:
            raise ValueError(f"max_rows must be an integer 1..{MAX_SAMPLE_ROWS}, got {max_rows!r}")
        active = self.model
        if active is not None and active.positions != 1:
            raise AgentError(
                f"field samples are flat feature rows; {active.manifest.name} release {active.manifest.release} takes "
                f"N-d input {[1, *active.sample_shape]}, so its inputs are not uploaded"
            )
        self.flush_drift()
        with self._lock:
            model, detector = self.model, self.detector
            cap = self._lab_truth.size
            newest = (self._lab_n - 1 - np.arange(min(self._lab_n, cap))) % max(cap, 1)
            newest = newest[self._lab_id[newest] > self._lab_from][:max_rows]  # none from before the alarm
            lab_rows, truth, lab_pred = self._lab_rows[newest], self._lab_truth[newest], self._lab_pred[newest]
        if model is None or detector is None:
            empty = np.zeros(0)
            return SampleSelection(None, np.zeros((0, 0), dtype=np.float32), (), empty.astype(np.int64), empty)
        slots = max_rows - len(lab_rows)
        with self._drift_lock:  # the drain thread writes the reservoir
            pool = detector.reservoir() if slots else np.zeros((0, model.n_values), dtype=np.float32)
        if len(pool) and len(lab_rows):  # a labelled row is often in the reservoir too: send it once
            sent = {row.tobytes() for row in lab_rows}
            pool = pool[[row.tobytes() not in sent for row in pool]]
        rows = np.concatenate([lab_rows, pool])
        predicted, uncertainty = _uncertainty(model, rows)
        scores = detector.rarity(rows) + uncertainty
        if len(pool):
            rng = random.Random(seed) if seed is not None else self._rng  # noqa: S311  sampling, not security
            keys = np.log(_uniform(rng, len(pool))) / (1.0 + scores[len(lab_rows) :])
            order = np.argsort(-keys, kind="stable")[:slots] + len(lab_rows)
            pick = np.concatenate([np.arange(len(lab_rows)), order])
            rows, predicted, scores = rows[pick], predicted[pick], scores[pick]
            predicted[: len(lab_rows)] = lab_pred
        else:
            predicted = lab_pred.copy()
        names = model.labels
        labels = tuple(names[t] for t in truth.tolist()) + (None,) * (len(rows) - len(truth))
        return SampleSelection(model, rows, labels, predicted, scores)


def _uniform(rng: random.Random, n: int) -> np.ndarray:
    """``n`` uniform draws in (0, 1), in one call of the generator (53 random bits each)."""
    bits = np.frombuffer(rng.getrandbits(64 * n).to_bytes(8 * n, "little"), dtype=np.uint64)
    out: np.ndarray = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
    return out


def _uncertainty(model: LoadedModel, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(predicted index, 1 - top softmax probability)`` of each row, running the model directly.

    A row whose output is not finite has no prediction (index -1) and uncertainty 1.

    Raises:
        AgentError: the runtime failed (its own exception, converted).
    """
    n = len(rows)
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    _, tensors = model.prepare_batch(rows.reshape(n, *model.sample_shape))
    invoke = model.invoke
    try:
        logits = np.stack([model.logits(invoke(t)) for t in tensors]).astype(np.float64)
    except Exception as exc:  # the runtime's own exception type: a typed error for the command's report
        raise AgentError(f"scoring {n} field samples failed: the runtime raised {type(exc).__name__}: {exc}") from exc
    finite = np.asarray(np.isfinite(logits).all(axis=1))
    if not model.classifier:  # outputs, not probabilities: no uncertainty; the "class" is the verdict (anomaly) or 0
        verdicts = [model.verdict(float(v)) if model.anomaly else 0 for v in logits[:, 0]]
        return np.where(finite, np.asarray(verdicts, dtype=np.int64), -1), np.zeros(n)
    safe = np.where(finite[:, None], logits, 0.0)
    z = safe - safe.max(axis=1, keepdims=True)
    p = np.exp(z)
    top = p.max(axis=1) / p.sum(axis=1)
    predicted = np.where(finite, safe.argmax(axis=1), -1)
    return predicted, np.where(finite, 1.0 - top, 1.0)


def _answer(model: LoadedModel, index: int, values: list[float], ms: float, prediction_id: int) -> Prediction:
    """A regression's or an anomaly model's :class:`Prediction` (``index``: the anomaly verdict, else 0)."""
    if model.anomaly:
        label = "anomaly" if index else "normal"
        return _new_tuple(Prediction, (label, index, values, ms, prediction_id, model.task, model.threshold, model.output_names))
    return _new_tuple(Prediction, ("", 0, values, ms, prediction_id, model.task, None, model.output_names))


def _verdicts(model: LoadedModel, logits: np.ndarray) -> np.ndarray:
    """An anomaly model's verdicts on ``[n, 1]`` scores (1: above the threshold, as doubles); zeros for a regression."""
    if model.anomaly and model.threshold is not None:
        return (logits[:, 0].astype(np.float64) > model.threshold).astype(np.int64)
    return np.zeros(len(logits), dtype=np.int64)
