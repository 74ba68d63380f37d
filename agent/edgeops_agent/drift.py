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

__all__ = ["MAX_INPUT_RING", "RARITY_MAX", "DriftConfig", "DriftDetector", "DriftStatus"]

#: Most rows ``input_ring`` may keep: a label can reach no further back than the agent's
#: feedback ring (:data:`edgeops_agent.agent.FEEDBACK_RING`), so more rows could never be used.
MAX_INPUT_RING = 1 << 14
#: Cap of one feature's rarity term (a reference row scores about 1 per feature).
RARITY_MAX = 32.0


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


class DriftDetector:
    """Streaming drift detection over one model's inputs and predictions."""

    def __init__(self, reference: DriftReference, labels: int, config: DriftConfig | None = None, *, seed: int = 0) -> None:
        """Prepare per-feature state from the manifest's reference."""
        self.config = config or DriftConfig()
        feats = reference.features
        self.names = [f.name for f in feats]
        self.n = len(feats)
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
        self._mu = (fractions * idx).sum(axis=1)
        var = (fractions * (idx[None, :] - self._mu[:, None]) ** 2).sum(axis=1)
        self._sd = np.sqrt(np.maximum(var, 1e-12))
        self._up = np.zeros(self.n)
        self._down = np.zeros(self.n)
        w = self.config.window
        self._ring = np.zeros((w, self.n), dtype=np.int16)
        self._counts = np.zeros((self.n, self._nbins), dtype=np.int64)
        self._base = np.arange(self.n) * self._nbins  # each feature's first slot in the flat counts
        self._pred_ring = np.zeros(w, dtype=np.int32)
        self._labels = labels
        self._pred_ref = np.maximum(np.asarray(reference.prediction_fractions, dtype=np.float64), 1e-4)
        self._pred_counts = np.zeros(labels, dtype=np.int64)
        self._samples = 0
        self._quiet = 0  # consecutive inputs below the clearing level
        self.alarm = False
        self._reservoir = np.zeros((self.config.reservoir, self.n), dtype=np.float32)
        self._kept = 0  # reservoir rows filled
        # The standard library's generator, not numpy's: numpy.random pulls in OpenSSL
        # (secrets -> hmac -> hashlib), 3.6 MiB of RSS a device does not need.
        self._rng = random.Random(seed)  # noqa: S311  sampling, not security
        self._pred_alarm = False

    def update_batch(self, rows: np.ndarray, predicted: np.ndarray) -> list[tuple[int, bool]]:
        """Feed raw input rows ``[m, features]`` and their predicted classes, in arrival order.

        Vectorized over rows and features: the CUSUM statistics of every row come from one
        cumulative sum (Lindley's recursion ``S_t = max(0, S_{t-1} + y_t)`` is
        ``X_t − min(−S_0, min_{u≤t} X_u)`` with ``X`` the running sum of ``y``), so each
        input's alarm decision is exact; the window counts (PSI) and the prediction check
        are brought up to date once per batch.

        Returns:
            ``(sample_number, raised)`` for every alarm change in this batch (``raised`` is
            ``True`` when the alarm rose, ``False`` when it cleared).
        """
        rows = np.asarray(rows, dtype=np.float64).reshape(-1, self.n)
        predicted = np.asarray(predicted, dtype=np.int64).reshape(-1)
        changes: list[tuple[int, bool]] = []
        w = self.config.window
        for start in range(0, rows.shape[0], w):  # chunks no longer than the window
            changes += self._chunk(rows[start : start + w], predicted[start : start + w])
        return changes

    def _chunk(self, rows: np.ndarray, predicted: np.ndarray) -> list[tuple[int, bool]]:
        m, w, nb = rows.shape[0], self.config.window, self._nbins
        # A value's bin: how many edges are <= it (one comparison of every row with every edge).
        bins = (rows[:, :, None] >= self._edges).sum(axis=2, dtype=np.int16)
        preds = np.where((predicted >= 0) & (predicted < self._labels), predicted, 0)
        slots = (self._samples + np.arange(m)) % w
        filled = (self._samples + np.arange(m)) >= w
        if filled.any():
            old = self._ring[slots[filled]]
            self._counts -= np.bincount((self._base + old).ravel(), minlength=self.n * nb).reshape(self.n, nb)
            self._pred_counts -= np.bincount(self._pred_ring[slots[filled]], minlength=self._labels)
        self._counts += np.bincount((self._base + bins).ravel(), minlength=self.n * nb).reshape(self.n, nb)
        self._pred_counts += np.bincount(preds, minlength=self._labels)
        self._ring[slots] = bins
        self._pred_ring[slots] = preds
        # CUSUM for every row at once (exact; the cap is applied at the end of the chunk).
        k, cap = self.config.cusum_k, 2 * self.config.cusum_h
        scores = (bins - self._mu) / self._sd
        up_x = np.cumsum(scores - k, axis=0)
        down_x = np.cumsum(-scores - k, axis=0)
        up = up_x - np.minimum(-self._up, np.minimum.accumulate(up_x, axis=0))
        down = down_x - np.minimum(-self._down, np.minimum.accumulate(down_x, axis=0))
        levels = np.maximum(up.max(axis=1), down.max(axis=1)) if self.n else np.zeros(m)
        np.clip(up[-1], 0.0, cap, out=self._up)
        np.clip(down[-1], 0.0, cap, out=self._down)
        self._reserve(rows)
        first = self._samples
        self._samples += m
        pred = self._prediction_alarm()
        changes = []
        for i in range(m):
            change = self._hysteresis(float(levels[i]), pred)
            if change is not None:
                changes.append((first + i + 1, change))
        return changes

    def update(self, features: np.ndarray, predicted: int) -> bool | None:
        """Feed one raw input row and its predicted class.

        Returns:
            ``True`` when the alarm rises with this input, ``False`` when it clears, else ``None``.
        """
        changes = self.update_batch(np.asarray(features).reshape(1, -1), np.asarray([predicted]))
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
        """PSI of each feature over the current window (0 before any input)."""
        total = min(self._samples, self.config.window)
        if total == 0:
            return np.zeros(self.n)
        actual = np.maximum(self._counts / total, 1e-4)
        out: np.ndarray = ((actual - self._ref) * np.log(actual / self._ref)).sum(axis=1)
        return out

    def prediction_psi(self) -> float:
        """PSI of the predicted-class distribution over the current window."""
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
        return DriftStatus(
            alarm=self.alarm,
            samples=self._samples,
            max_psi=round(float(psi[k]) if self.n else 0.0, 6),
            max_feature=self.names[k] if self.n else "",
            max_cusum=round(self._level(), 4),
            prediction_psi=round(self.prediction_psi(), 6),
            features_over=over,
        )

    def reservoir(self) -> np.ndarray:
        """A uniform sample of the inputs seen so far: a float32 copy, at most ``reservoir`` rows."""
        return self._reservoir[: self._kept].copy()

    def rarity(self, rows: np.ndarray) -> np.ndarray:
        """How unlike the reference each raw row ``[m, features]`` is: about 1 for a row drawn
        from the reference, more the farther out its values are (see the module docstring).

        Returns:
            float64 ``[m]``, each in ``0..RARITY_MAX``.
        """
        x = np.asarray(rows, dtype=np.float64).reshape(-1, self.n)
        if not self.n:
            return np.zeros(x.shape[0])
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
        out: np.ndarray = np.minimum(terms / self._rarity_norm, RARITY_MAX).mean(axis=1)
        return out
