"""Streaming drift detection against the manifest's reference statistics.

Two views of every input feature, both computed from the reference decile bins the build
stored (``drift_reference.features[i].bin_edges`` / ``bin_fractions``), so the device needs
no training data:

* **PSI** (population stability index) of the last ``window`` inputs' bin counts against
  the reference fractions — the interpretable *score* that telemetry reports (rule of
  thumb: < 0.1 stable, 0.1–0.25 moderate, > 0.25 major shift);
* a two-sided **CUSUM on rank scores** per feature — the *alarm*. Each value is replaced
  by its reference bin index ``b`` (0–9), standardized with the reference's own mean and
  variance of ``b``, so the score ``s`` has mean 0 and variance 1 under the reference
  distribution whatever the feature's shape (heavy tails cannot fake an alarm). Each
  feature keeps ``C+ = max(0, C+ + s − k)`` and ``C− = max(0, C− − s − k)``; the alarm
  rises when any feature's ``max(C+, C−) > h`` and clears, with hysteresis, once every
  statistic has stayed below ``h / 2`` for ``window`` consecutive inputs (statistics are
  capped at ``2h`` so a long drift clears in bounded time after it ends).

The predicted-class distribution is watched too: its PSI over the window against
``prediction_fractions``, with an alarm when a full window's PSI exceeds
``prediction_psi_alarm`` (0.25, the usual "major shift" level). The reference fractions
come from a few hundred validation rows, so a significance test against them would
mistake their own sampling error for drift; under no drift the window's PSI stays around
0.01–0.02 for five classes.

Why these numbers: ``k = 0.25`` is half the score shift of a 0.5σ mean shift (≈ 0.45–0.5
for normal-like features), which is what CUSUM is tuned to; ``h = 40`` then keeps false
alarms rare across many features. Measured on the vibration example (106 features): over
100 000 stationary inputs the largest statistic of any feature was 32 (no alarm); a 0.5σ
shift of any single feature was detected after 174 inputs (median), 257 at worst
(tests/test_drift.py; the design's false-alarm rate is at most one alarm per 100 000
inputs). A CUSUM was chosen over an EWMA chart after both were measured: at equal false
alarms the EWMA needed up to 290 inputs. The reference itself is a sample (its bin
fractions carry sampling error of about 1/sqrt(sample_count) in score units), which ``k``
absorbs.

**N-d inputs** (ADR 0021): ``drift_reference.features[c]`` describes channel ``c`` pooled over
every position of the sample, so the device pools the same way. PSI counts every value of a
channel in the window (``window x positions`` values per channel). The CUSUM score of a
channel for one sample is the mean of its positions' standardized rank scores: under the
reference it has mean 0 and a variance of at most 1 (1 when the positions move together,
``1 / positions`` when they are independent), so ``k`` and ``h`` give at most the flat case's
false alarms, and a shift of the whole channel moves it as much as a flat feature's.

An N-d sample is reduced, once, to what both need: each channel's histogram over its reference
bins (:meth:`DriftDetector.channel_counts`, ``[channels x bins]`` counts; the CUSUM score is the
histogram's mean bin, so it needs nothing more). The agent does this when it predicts and
buffers the histograms (:meth:`DriftDetector.update_counts`), never the raw samples, and the
window keeps one histogram per sample: memory does not grow with the positions. The bins are
counted as ``searchsorted(edges, value, side="right")`` counts them (how many edges are <= the
value): per edge, with one vectorized comparison of at most :data:`COUNT_CHUNK` values of one
channel at a time, in the samples' own float32 (no float64 copy). A float32 value is compared
with its edge rounded *up* to float32, which decides ``value >= edge`` exactly as float64 does.
A sample of a few hundred values or less is binned in one broadcast comparison or one
``searchsorted`` per channel (fewer numpy calls). Measured for a [3, 96, 96] sample: about
0.1 ms and 10 KiB of temporaries per sample, and 0.25 ms for an update of 256 samples' counts,
where buffering raw samples cost 27 MiB for 256 of them and each drift update peaked at
126 MiB (ADR 0021).

**Regression and anomaly models** have no classes: ``drift_reference.outputs`` holds the
reference statistics of each output (the anomaly score included), and the answers are watched
with the PSI of each output over the window against them (binned as the inputs are); the
largest is reported as ``prediction_psi`` and alarms over ``prediction_psi_alarm`` exactly as
the predicted-class PSI does for a classifier.

The detector also keeps a bounded reservoir (Vitter's algorithm R, float32 rows in one
preallocated array) of the raw inputs since the model loaded, which the console can ask for
as field samples, and scores how unlike the reference a row is (:meth:`DriftDetector.rarity`),
so an upload can favour the rows that drifted. The score is a per-feature surprisal under
the same reference bins, ``-ln(fraction of the value's bin)``, averaged over features and
divided by ``ln(bins)``: a row drawn from the reference scores about 1 (exactly 1 with
equal-fraction bins, as the build's deciles are). The bins are open-ended, so a value
outside the reference's ``[min, max]`` is scored as the tail it falls in instead: no
reference sample fell there, so its probability is at most ``1 / (sample_count + 1)``
(the expected mass beyond a sample's extreme), and the farther out it is the smaller, which
a normal tail with the feature's mean and std measures (``-ln P(|Z| >= z)`` grows as
``z^2 / 2``). Each feature's term is capped at :data:`RARITY_MAX`, so one absurd value
cannot make a row certain to be picked and a row far out in every feature weighs at most
that much.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np

from edgeops_core import DriftReference
from edgeops_core.messages import MAX_SAMPLE_ROWS

__all__ = ["COUNT_CHUNK", "MAX_INPUT_RING", "RARITY_MAX", "DriftConfig", "DriftDetector", "DriftStatus"]

#: Most rows ``input_ring`` may keep: a label can reach no further back than the agent's
#: feedback ring (:data:`edgeops_agent.agent.FEEDBACK_RING`), so more rows could never be used.
MAX_INPUT_RING = 1 << 14
#: Cap of one feature's rarity term (a reference row scores about 1 per feature).
RARITY_MAX = 32.0
#: Values of one channel compared with an edge at once when an N-d sample is binned (bounds
#: the temporaries: one boolean per value).
COUNT_CHUNK = 1 << 16
#: Below this many positions a channel's values are binned for all channels at once, as a
#: flat row's are (fewer numpy calls); from it, one channel at a time (fewer comparisons).
_WIDE = 1024
#: One narrow sample of at most this many channels is binned with a searchsorted per channel.
_FEW = 16
#: One sample of at most this many value-edge comparisons is binned in one broadcast comparison.
_TINY = 2048


def _edges_f32(edges: np.ndarray) -> np.ndarray:
    """Float32 edges that bin float32 values exactly as the float64 ``edges`` do.

    For a float32 ``v`` and a float64 ``e``, ``v >= e`` holds exactly when ``v`` is at least
    the smallest float32 that is ``>= e``: ``e`` rounded up to float32 (``+inf`` stays).
    """
    with np.errstate(over="ignore"):  # an edge beyond float32's range is +-inf, then stepped
        out = edges.astype(np.float32)
    low = out.astype(np.float64) < edges
    out[low] = np.nextafter(out[low], np.float32(np.inf))
    return out


@dataclass(frozen=True)
class DriftConfig:
    """Detector settings (``[drift]`` in agent.toml).

    Attributes:
        window: inputs in the PSI window and in the clearing period.
        cusum_k: CUSUM reference value k (score units; half the shift to detect).
        cusum_h: CUSUM decision threshold h.
        reservoir: raw inputs kept for field-sample upload (a uniform sample of all since the
            model loaded).
        prediction_psi_alarm: PSI of the predicted classes over a full window that raises the alarm.
        input_ring: raw inputs of the latest predictions kept so that a late label
            (:meth:`~edgeops_agent.agent.Agent.feedback`) can keep its row; 0..:data:`MAX_INPUT_RING`
            (0: labels keep no rows). Memory: ``input_ring x features x 4`` bytes.
        labelled_rows: labelled rows kept for upload, the newest; 0..:data:`MAX_SAMPLE_ROWS`.

    Raises:
        ValueError: a value is out of range.
    """

    window: int = 500
    cusum_k: float = 0.25
    cusum_h: float = 40.0
    reservoir: int = 256
    prediction_psi_alarm: float = 0.25
    input_ring: int = 1024
    labelled_rows: int = 256

    def __post_init__(self) -> None:
        if self.window < 10 or self.cusum_k <= 0 or self.cusum_h <= 0:
            raise ValueError("drift config: need window >= 10, cusum_k > 0 and cusum_h > 0")
        if self.reservoir < 0:
            raise ValueError("drift config: reservoir must be >= 0")
        if not 0 <= self.input_ring <= MAX_INPUT_RING:
            raise ValueError(f"drift config: input_ring must be 0..{MAX_INPUT_RING}, got {self.input_ring}")
        if not 0 <= self.labelled_rows <= MAX_SAMPLE_ROWS:
            raise ValueError(f"drift config: labelled_rows must be 0..{MAX_SAMPLE_ROWS}, got {self.labelled_rows}")


@dataclass
class DriftStatus:
    """What the detector reports (telemetry ``drift``)."""

    alarm: bool
    samples: int
    max_psi: float
    max_feature: str
    max_cusum: float
    prediction_psi: float
    features_over: list[str] = field(default_factory=list)
    #: Regression and anomaly models: each output's PSI over the window, by output name.
    output_psi: dict[str, float] = field(default_factory=dict)


class DriftDetector:
    """Streaming drift detection over one model's inputs and predictions."""

    def __init__(
        self,
        reference: DriftReference,
        labels: int,
        config: DriftConfig | None = None,
        *,
        seed: int = 0,
        positions: int = 1,
    ) -> None:
        """Prepare per-feature state from the manifest's reference.

        Args:
            labels: the model's labels (classes; for a regression or anomaly model, outputs).
            positions: values of each channel in one sample (1 for a flat vector; an N-d
                input's raw row is ``channels x positions`` values, channel first).
        """
        self.config = config or DriftConfig()
        feats = reference.features
        self.names = [f.name for f in feats]
        self.n = len(feats)
        self.positions = max(int(positions), 1)
        width = max((len(f.bin_edges) for f in feats), default=0)
        self._nbins = width + 1
        # Edges padded with +inf to one width: a value's bin is the number of edges <= it,
        # which is numpy's searchsorted(edges, v, side="right") as the build computed it.
        self._edges = np.full((self.n, width), np.inf)
        fractions = np.zeros((self.n, self._nbins))
        for k, f in enumerate(feats):
            self._edges[k, : len(f.bin_edges)] = f.bin_edges
            fractions[k, : len(f.bin_fractions)] = f.bin_fractions
        # PSI is undefined for empty bins: floor both sides at a small probability.
        self._ref = np.maximum(fractions, 1e-4)
        # Rarity (see the module docstring): each bin's surprisal, and what a value outside the
        # reference's range is scored by.
        self._surprisal = -np.log(self._ref)
        self._low = np.array([f.min for f in feats], dtype=np.float64)
        self._high = np.array([f.max for f in feats], dtype=np.float64)
        self._mean = np.array([f.mean for f in feats], dtype=np.float64)
        self._spread = np.maximum(np.array([f.std for f in feats], dtype=np.float64), 1e-12)
        self._beyond = math.log(reference.sample_count + 1)
        self._rarity_norm = math.log(max(self._nbins, 2))
        idx = np.arange(self._nbins, dtype=np.float64)
        self._idx = idx
        self._mu = (fractions * idx).sum(axis=1)
        var = (fractions * (idx[None, :] - self._mu[:, None]) ** 2).sum(axis=1)
        self._sd = np.sqrt(np.maximum(var, 1e-12))
        self._up = np.zeros(self.n)
        self._down = np.zeros(self.n)
        w = self.config.window
        #: N-d inputs: the type of a channel's bin count (the smallest that holds ``positions``).
        self.count_dtype = np.dtype(np.uint16 if self.positions <= np.iinfo(np.uint16).max else np.uint32)
        self._edges32 = _edges_f32(self._edges)
        self._n_edges = [len(f.bin_edges) for f in feats]
        self._slots = (np.arange(self.n) * self._nbins)[:, None]  # each channel's first bin in a sample's counts
        if self.positions == 1:
            self._ring = np.zeros((w, self.n), dtype=np.int16)  # each input's bin per feature
        else:  # each input's histogram per channel
            self._ring = np.zeros((w, self.n * self._nbins), dtype=self.count_dtype)
        self._counts = np.zeros((self.n, self._nbins), dtype=np.int64)
        self._base = np.arange(self.n) * self._nbins  # each feature's first slot in the flat counts
        self._pred_ring = np.zeros(w, dtype=np.int32)
        self._labels = labels
        self._pred_ref = np.maximum(np.asarray(reference.prediction_fractions, dtype=np.float64), 1e-4)
        self._pred_counts = np.zeros(labels, dtype=np.int64)
        # Regression / anomaly: the outputs' reference bins, window bins and counts.
        outs = reference.outputs
        self.output_names = [f.name for f in outs]
        self.n_out = len(outs)
        o_width = max((len(f.bin_edges) for f in outs), default=0)
        self._out_edges = np.full((self.n_out, o_width), np.inf)
        o_fractions = np.zeros((self.n_out, o_width + 1))
        for k, f in enumerate(outs):
            self._out_edges[k, : len(f.bin_edges)] = f.bin_edges
            o_fractions[k, : len(f.bin_fractions)] = f.bin_fractions
        self._out_ref = np.maximum(o_fractions, 1e-4)
        self._out_ring = np.zeros((w, self.n_out), dtype=np.int16)
        self._out_counts = np.zeros((self.n_out, o_width + 1), dtype=np.int64)
        self._out_base = np.arange(self.n_out) * (o_width + 1)
        self._samples = 0
        self._quiet = 0  # consecutive inputs below the clearing level
        self.alarm = False
        self._reservoir = np.zeros((self.config.reservoir, self.n * self.positions), dtype=np.float32)
        self._kept = 0  # reservoir rows filled
        # The standard library's generator, not numpy's: numpy.random pulls in OpenSSL
        # (secrets -> hmac -> hashlib), 3.6 MiB of RSS a device does not need.
        self._rng = random.Random(seed)  # noqa: S311  sampling, not security
        self._pred_alarm = False

    @property
    def count_width(self) -> int:
        """Numbers :meth:`channel_counts` gives per N-d sample: ``channels x bins``."""
        return self.n * self._nbins

    def update_batch(self, rows: np.ndarray, predicted: np.ndarray, outputs: np.ndarray | None = None) -> list[tuple[int, bool]]:
        """Feed raw input rows ``[m, values]`` and their predicted classes, in arrival order.

        ``outputs`` (``[m, outputs]``) are the model's output values: a regression or anomaly
        model's answers, watched against ``drift_reference.outputs``; ignored for a classifier.
        N-d rows are reduced to their channel histograms first (:meth:`channel_counts`; the
        same as :meth:`update_counts` of those, plus the reservoir, which keeps raw rows).

        Vectorized over rows and features: the CUSUM statistics of every row come from one
        cumulative sum (Lindley's recursion ``S_t = max(0, S_{t-1} + y_t)`` is
        ``X_t − min(−S_0, min_{u≤t} X_u)`` with ``X`` the running sum of ``y``), so each
        input's alarm decision is exact; the window counts (PSI) and the prediction check
        are brought up to date once per batch.

        Returns:
            ``(sample_number, raised)`` for every alarm change in this batch (``raised`` is
            ``True`` when the alarm rose, ``False`` when it cleared).

        Raises:
            ValueError: an output model's batch comes without its outputs.
        """
        if self.positions == 1:
            rows = np.asarray(rows, dtype=np.float64).reshape(-1, self.n)
            return self._update(rows, predicted, outputs, rows)
        rows = np.asarray(rows).reshape(-1, self.n * self.positions)  # no copy: binned as they are
        return self._update(self.channel_counts(rows), predicted, outputs, rows if self.config.reservoir else None)

    def update_counts(
        self, counts: np.ndarray, predicted: np.ndarray, outputs: np.ndarray | None = None
    ) -> list[tuple[int, bool]]:
        """:meth:`update_batch` for N-d inputs already reduced by :meth:`channel_counts` (``[m, count_width]``).

        The reservoir keeps no rows of inputs fed this way (the agent keeps none for N-d models).

        Raises:
            ValueError: a flat model's detector, or an output model's batch without its outputs.
        """
        if self.positions == 1:
            raise ValueError("update_counts is for N-d inputs; feed a flat model's rows to update_batch")
        return self._update(np.asarray(counts).reshape(-1, self.count_width), predicted, outputs, None)

    def channel_counts(self, rows: np.ndarray) -> np.ndarray:
        """Each N-d raw row ``[m, channels x positions]`` (channel first) reduced to its channels'
        histograms over the reference bins: ``[m, channels x bins]`` of :attr:`count_dtype`.

        Bin ``b`` of a channel counts its values with exactly ``b`` edges ``<=`` them
        (``searchsorted(edges, value, side="right")``, as the build binned the reference). float32
        rows are compared in float32 (edges rounded up: the same bins), others in float64; the
        temporaries are at most :data:`COUNT_CHUNK` values' worth (see the module docstring).
        """
        p, n, nb = self.positions, self.n, self._nbins
        x = np.asarray(rows).reshape(-1, n, p)
        m = x.shape[0]
        out = np.zeros((m, n, nb), dtype=self.count_dtype)
        f32 = x.dtype == np.float32
        if not f32 and x.dtype != np.float64:
            x = x.astype(np.float64)  # other numbers (int rows): compared exactly in float64
        edges = self._edges32 if f32 else self._edges
        if m == 1 and n * p * edges.shape[1] <= _TINY:
            # One tiny sample (a prediction's): every value against every edge of its channel, in
            # the fewest numpy calls.
            bins = (x[0, :, :, None] >= edges[:, None, :]).sum(axis=2, dtype=np.intp)
            bins += self._slots
            return np.bincount(bins.ravel(), minlength=n * nb).astype(self.count_dtype).reshape(1, n * nb)
        if p < _WIDE and m == 1 and n <= _FEW:
            # One small sample of a few channels (a prediction's): numpy's searchsorted per channel
            # is the fewest calls.
            for c in range(n):
                bins = np.searchsorted(edges[c, : self._n_edges[c]], x[0, c], side="right")
                out[0, c] = np.bincount(bins, minlength=nb)
            return out.reshape(m, n * nb)
        if p < _WIDE:
            # Narrow channels: every value against every edge of its channel at once, as a flat
            # row is binned, a block of samples and channels at a time.
            each = p * max(edges.shape[1], 1)  # comparisons for one channel of one sample
            per = max(min(n, COUNT_CHUNK // each), 1)  # channels at a time
            step = max(COUNT_CHUNK // (each * per), 1)  # samples at a time
            for c0 in range(0, n, per):
                e = edges[c0 : c0 + per, None, :]
                k_c = e.shape[0]
                slots = (np.arange(k_c) * nb)[:, None]
                for s in range(0, m, step):
                    part = x[s : s + step, c0 : c0 + per]
                    k = part.shape[0]
                    bins = (part[..., None] >= e).sum(axis=3, dtype=np.intp)
                    bins += slots
                    bins += (np.arange(k) * (k_c * nb))[:, None, None]
                    out[s : s + k, c0 : c0 + k_c] = np.bincount(bins.ravel(), minlength=k * k_c * nb).reshape(k, k_c, nb)
            return out.reshape(m, n * nb)
        # Wide channels: count the values >= each edge, one edge at a time (edges ascend, so the
        # bin counts are the differences of those counts).
        ge = np.zeros(nb + 1, dtype=np.int64)
        flag = np.empty(min(p, COUNT_CHUNK), dtype=bool)
        for i in range(m):
            for c in range(n):
                values = x[i, c]
                e = edges[c]
                ge[:] = 0
                ge[0] = p
                for s in range(0, p, COUNT_CHUNK):
                    part = values[s : s + COUNT_CHUNK]
                    hit = flag[: part.size]
                    for j in range(self._n_edges[c]):
                        np.greater_equal(part, e[j], out=hit)
                        ge[j + 1] += np.count_nonzero(hit)
                out[i, c] = ge[:-1] - ge[1:]
        return out.reshape(m, n * nb)

    def _update(
        self, data: np.ndarray, predicted: np.ndarray, outputs: np.ndarray | None, raw: np.ndarray | None
    ) -> list[tuple[int, bool]]:
        """Feed ``data`` (flat rows, or N-d channel counts) in chunks no longer than the window; ``raw``: rows to reserve."""
        predicted = np.asarray(predicted, dtype=np.int64).reshape(-1)
        outs = None
        if self.n_out:
            if outputs is None:
                raise ValueError("a regression or anomaly model's drift detector needs the outputs of every input")
            outs = np.asarray(outputs, dtype=np.float64).reshape(-1, self.n_out)
        changes: list[tuple[int, bool]] = []
        w = self.config.window
        for start in range(0, data.shape[0], w):  # chunks no longer than the window
            chunk_outs = outs[start : start + w] if outs is not None else None
            chunk_raw = raw[start : start + w] if raw is not None else None
            changes += self._chunk(data[start : start + w], predicted[start : start + w], chunk_outs, chunk_raw)
        return changes

    def _input_scores(self, data: np.ndarray, slots: np.ndarray, filled: np.ndarray) -> np.ndarray:
        """Bring the window's input counts up to date; the inputs' CUSUM scores ``[m, channels]``.

        ``data``: flat rows ``[m, features]``, or N-d channel counts ``[m, channels x bins]``.
        """
        m, nb = data.shape[0], self._nbins
        if self.positions == 1:
            bins = _slide_window(self._counts, self._ring, self._base, self._edges, data, slots, filled)
            scores: np.ndarray = (bins - self._mu) / self._sd
            return scores
        # N-d: each channel's histogram of its values pooled over the positions (module docstring).
        hist = data.reshape(m, self.n, nb)
        if filled.any():
            self._counts -= self._ring[slots[filled]].sum(axis=0, dtype=np.int64).reshape(self.n, nb)
        self._counts += hist.sum(axis=0, dtype=np.int64)
        self._ring[slots] = data
        # The mean bin of a sample's channel (exact: sums of integer products, well below 2**53),
        # one bin at a time: no [m, channels, bins] float64 temporary.
        total = np.zeros((m, self.n))
        for b in range(1, nb):
            total += hist[:, :, b] * float(b)
        mean_bin = total / self.positions
        pooled: np.ndarray = (mean_bin - self._mu) / self._sd
        return pooled

    def _output_counts(self, outs: np.ndarray, slots: np.ndarray, filled: np.ndarray) -> None:
        _slide_window(self._out_counts, self._out_ring, self._out_base, self._out_edges, outs, slots, filled)

    def _chunk(
        self, data: np.ndarray, predicted: np.ndarray, outs: np.ndarray | None, raw: np.ndarray | None
    ) -> list[tuple[int, bool]]:
        m, w = data.shape[0], self.config.window
        preds = np.where((predicted >= 0) & (predicted < self._labels), predicted, 0)
        slots = (self._samples + np.arange(m)) % w
        filled = (self._samples + np.arange(m)) >= w
        if filled.any():
            self._pred_counts -= np.bincount(self._pred_ring[slots[filled]], minlength=self._labels)
        scores = self._input_scores(data, slots, filled)
        self._pred_counts += np.bincount(preds, minlength=self._labels)
        self._pred_ring[slots] = preds
        if outs is not None:
            self._output_counts(outs, slots, filled)
        # CUSUM for every row at once (exact; the cap is applied at the end of the chunk).
        k, cap = self.config.cusum_k, 2 * self.config.cusum_h
        up_x = np.cumsum(scores - k, axis=0)
        down_x = np.cumsum(-scores - k, axis=0)
        up = up_x - np.minimum(-self._up, np.minimum.accumulate(up_x, axis=0))
        down = down_x - np.minimum(-self._down, np.minimum.accumulate(down_x, axis=0))
        levels = np.maximum(up.max(axis=1), down.max(axis=1)) if self.n else np.zeros(m)
        np.clip(up[-1], 0.0, cap, out=self._up)
        np.clip(down[-1], 0.0, cap, out=self._down)
        if raw is not None:
            self._reserve(raw)
        first = self._samples
        self._samples += m
        pred = self._prediction_alarm()
        changes = []
        for i in range(m):
            change = self._hysteresis(float(levels[i]), pred)
            if change is not None:
                changes.append((first + i + 1, change))
        return changes

    def update(self, features: np.ndarray, predicted: int, outputs: np.ndarray | None = None) -> bool | None:
        """Feed one raw input row and its predicted class (and, for output models, its outputs).

        Returns:
            ``True`` when the alarm rises with this input, ``False`` when it clears, else ``None``.
        """
        outs = None if outputs is None else np.asarray(outputs).reshape(1, -1)
        changes = self.update_batch(np.asarray(features).reshape(1, -1), np.asarray([predicted]), outs)
        return changes[-1][1] if changes else None

    def _reserve(self, rows: np.ndarray) -> None:
        """Algorithm R: after ``t`` inputs every one of them is in the reservoir with probability cap / t."""
        cap = self.config.reservoir
        start = min(cap - self._kept, rows.shape[0])
        if start > 0:
            self._reservoir[self._kept : self._kept + start] = rows[:start]
            self._kept += start
        if start == rows.shape[0] or cap == 0:
            return
        draw = self._rng.random
        for i in range(start, rows.shape[0]):
            j = int(draw() * (self._samples + i + 1))  # uniform over the inputs seen so far
            if j < cap:
                self._reservoir[j] = rows[i]

    def _prediction_alarm(self) -> bool:
        if self._samples < self.config.window:
            return self._pred_alarm
        self._pred_alarm = self.prediction_psi() > self.config.prediction_psi_alarm
        return self._pred_alarm

    def _level(self) -> float:
        return float(max(self._up.max(), self._down.max())) if self.n else 0.0

    def _hysteresis(self, level: float, pred: bool) -> bool | None:
        if not self.alarm:
            if level > self.config.cusum_h or pred:
                self.alarm, self._quiet = True, 0
                return True
            return None
        if level < self.config.cusum_h / 2 and not pred:
            self._quiet += 1
            if self._quiet >= self.config.window:
                self.alarm = False
                return False
        else:
            self._quiet = 0
        return None

    def psi(self) -> np.ndarray:
        """PSI of each feature (channel) over the current window (0 before any input)."""
        total = min(self._samples, self.config.window) * self.positions
        if total == 0:
            return np.zeros(self.n)
        actual = np.maximum(self._counts / total, 1e-4)
        out: np.ndarray = ((actual - self._ref) * np.log(actual / self._ref)).sum(axis=1)
        return out

    def output_psi(self) -> np.ndarray:
        """PSI of each output over the current window (regression and anomaly models; empty for a classifier)."""
        total = min(self._samples, self.config.window)
        if total == 0 or not self.n_out:
            return np.zeros(self.n_out)
        actual = np.maximum(self._out_counts / total, 1e-4)
        out: np.ndarray = ((actual - self._out_ref) * np.log(actual / self._out_ref)).sum(axis=1)
        return out

    def prediction_psi(self) -> float:
        """PSI of the answers over the current window: of the predicted classes (a classifier),
        or the largest output's (a regression or anomaly model)."""
        if self.n_out:
            return float(self.output_psi().max())
        total = min(self._samples, self.config.window)
        if total == 0:
            return 0.0
        actual = np.maximum(self._pred_counts / total, 1e-4)
        return float(((actual - self._pred_ref) * np.log(actual / self._pred_ref)).sum())

    def status(self) -> DriftStatus:
        """The current scores and alarm state."""
        psi = self.psi()
        k = int(np.argmax(psi)) if self.n else 0
        level = np.maximum(self._up, self._down)
        over = [self.names[i] for i in np.flatnonzero(level > self.config.cusum_h)]
        outputs = self.output_psi()
        return DriftStatus(
            alarm=self.alarm,
            samples=self._samples,
            max_psi=round(float(psi[k]) if self.n else 0.0, 6),
            max_feature=self.names[k] if self.n else "",
            max_cusum=round(self._level(), 4),
            prediction_psi=round(self.prediction_psi(), 6),
            features_over=over,
            output_psi={name: round(float(v), 6) for name, v in zip(self.output_names, outputs, strict=True)},
        )

    def reservoir(self) -> np.ndarray:
        """A uniform sample of the inputs seen so far: a float32 copy, at most ``reservoir`` rows."""
        return self._reservoir[: self._kept].copy()

    def rarity(self, rows: np.ndarray) -> np.ndarray:
        """How unlike the reference each raw row ``[m, values]`` is: about 1 for a row drawn
        from the reference, more the farther out its values are (see the module docstring).
        An N-d row's values are scored against their channel's pooled reference and averaged.

        Returns:
            float64 ``[m]``, each in ``0..RARITY_MAX``.
        """
        p = self.positions
        rows = np.asarray(rows, dtype=np.float64).reshape(-1, self.n * p)
        m = rows.shape[0]
        if not self.n:
            return np.zeros(m)
        # [m * positions, channels]: every value beside its channel's statistics.
        x = rows if p == 1 else rows.reshape(m, self.n, p).transpose(0, 2, 1).reshape(m * p, self.n)
        bins = (x[:, :, None] >= self._edges).sum(axis=2)
        terms = self._surprisal[np.arange(self.n), bins]
        outside = (x < self._low) | (x > self._high)
        if outside.any():
            cols = outside.nonzero()[1]
            with np.errstate(over="ignore"):  # a huge value: z is inf, then capped (its term is RARITY_MAX)
                z = np.minimum(np.abs(x[outside] - self._mean[cols]) / self._spread[cols], 1e6)
            # -ln P(|Z| >= z) of a normal tail (Mills' ratio; within 0.2 of exact for z >= 2),
            # never less than a value beyond every reference sample deserves.
            tail = 0.5 * z * z + np.log(np.maximum(z, 1.0)) + 0.5 * math.log(math.pi / 2)
            terms[outside] = np.maximum(tail, self._beyond)
        out: np.ndarray = np.minimum(terms / self._rarity_norm, RARITY_MAX).reshape(m, p * self.n).mean(axis=1)
        return out


def _slide_window(
    counts: np.ndarray,
    ring: np.ndarray,
    base: np.ndarray,
    edges: np.ndarray,
    values: np.ndarray,
    slots: np.ndarray,
    filled: np.ndarray,
) -> np.ndarray:
    """Bin ``values`` ``[m, k]`` against ``edges`` and slide them into the window in place.

    ``counts`` ``[k, bins]`` loses the rows ``ring`` held at the ``filled`` ``slots`` and gains
    the new ones, which take their slots; ``base`` offsets each column into its own bins.

    Returns:
        the new rows' bins ``[m, k]`` (a value's bin: how many edges are <= it).
    """
    k, nb = counts.shape
    bins: np.ndarray = (values[:, :, None] >= edges).sum(axis=2, dtype=np.int16)
    if filled.any():
        counts -= np.bincount((base + ring[slots[filled]]).ravel(), minlength=k * nb).reshape(k, nb)
    counts += np.bincount((base + bins).ravel(), minlength=k * nb).reshape(k, nb)
    ring[slots] = bins
    return bins
