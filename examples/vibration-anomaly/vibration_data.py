"""Engine-vibration fault data: a physically motivated generator of sensor-window features.

The simulated machine is a rotating shaft (engine accessory drive, pump or e-motor) with a
3-axis accelerometer on its bearing housing, sampled at 2048 Hz in windows of 512 samples
(0.25 s). Each window is one of five conditions, the classic rotating-machinery faults:

``normal``        small 1x/2x shaft orders, gear-mesh tone at 18x, broadband noise
``imbalance``     strong 1x order, radial (x and y 90 degrees apart), little axial
``misalignment``  strong 2x (and 1x) order, large in the axial (z) direction
``bearing_outer`` outer-race defect: impacts at BPFO = 3.58x shaft speed ringing a
                  structural resonance near 600 Hz, so high kurtosis and a raised band there
``looseness``     many harmonics 1x..10x plus 0.5x sub-harmonics, clipped (non-linear)

Fault severity, shaft speed (1200-2400 rpm), sensor gain and noise vary per window, and mild
faults overlap normal operation, so the task is learnable but not trivial.

Features per window (what an ECU would compute before the model): for each axis the log
energy of 32 spectral bands of 32 Hz (0-1024 Hz), log RMS, kurtosis and crest factor; plus
the shaft speed in rpm from the engine bus: 3 * 35 + 1 = 106 features.

:class:`Shift` distorts the generator on demand (sensor gain, noise, speed range, fault mix,
an offset on one feature), which the drift tests use to create realistic distribution shift.
:func:`simulate` draws windows from named physical quantities (:data:`QUANTITIES`: shaft
speed, load, bearing wear, sensor gain, noise), each a scalar or one value per window; the
fleet simulator (firmware-sim) drives it for many devices in one vectorized call. Only
numpy is used, so devices and the simulator can run it too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

LABELS = ("normal", "imbalance", "misalignment", "bearing_outer", "looseness")
AXES = ("x", "y", "z")
SAMPLE_RATE_HZ = 2048
WINDOW = 512
BANDS = 32
BPFO_ORDER = 3.58
RESONANCE_HZ = 600.0
GEAR_MESH_ORDER = 18


def feature_names() -> tuple[str, ...]:
    """Names of the 106 features, in model-input order."""
    names = []
    for axis in AXES:
        names += [f"{axis}_band{b:02d}_{b * 32}_{b * 32 + 32}hz" for b in range(BANDS)]
        names += [f"{axis}_log_rms", f"{axis}_kurtosis", f"{axis}_crest"]
    names.append("shaft_rpm")
    return tuple(names)


@dataclass(frozen=True)
class Shift:
    """A distribution shift applied by :func:`generate`.

    Attributes:
        sensor_gain: multiplies every acceleration (a loose or ageing sensor mount).
        noise_scale: multiplies the broadband noise (a noisier environment).
        rpm_range: shaft speed range in rpm.
        class_weights: relative frequency of each label (default: uniform).
        feature_offsets: ``{feature index: offset}`` added to the computed features, in units
            of that feature's natural scale (used by drift tests for a clean 0.5-sigma shift).
    """

    sensor_gain: float = 1.0
    noise_scale: float = 1.0
    rpm_range: tuple[float, float] = (1200.0, 2400.0)
    class_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0)
    feature_offsets: dict[int, float] = field(default_factory=dict)


Scale = float | np.ndarray  # one value, or one per window


#: Windows computed at a time. Every step after the per-window draws works window by window,
#: and the noise is the last draw, taken block after block from the same stream, so the block
#: size changes no value; it only bounds the working memory (3 x 512 float64 per window), which
#: makes a large ``n`` several times faster than one array of every window's signals.
_BLOCK = 1024


def _windows(
    labels: np.ndarray,
    rng: np.random.Generator,
    rpm_range: tuple[Scale, Scale],
    noise_scale: Scale,
    sensor_gain: Scale,
    load: Scale = 1.0,
) -> np.ndarray:
    """The float64 features of one window per label (draws from ``rng`` in a fixed order)."""
    n = labels.shape[0]
    rpm = rng.uniform(*rpm_range, size=n)
    phase = rng.uniform(0, 2 * np.pi, size=(n, 1))
    severity = rng.uniform(0.15, 1.0, size=(n, 1))
    base = rng.uniform(0.05, 0.15, size=(n, 1)) * _column(load, n)
    start = rng.uniform(0, 1, size=(n, 1))  # where in the impact period a window starts
    noise = rng.uniform(0.05, 0.2, size=(n, 1, 1)) * _column(noise_scale, n, 3)
    gain = rng.normal(1.0, 0.05, size=(n, 1, 1)) * _column(sensor_gain, n, 3)
    mesh = 0.08 * _column(load, n)
    out = np.empty((n, len(AXES) * (BANDS + 3) + 1))
    for s in range(0, n, _BLOCK):
        b = slice(s, min(s + _BLOCK, n))
        sig = noise[b] * rng.standard_normal((b.stop - s, 3, WINDOW))
        mesh_b = mesh if isinstance(mesh, float) else mesh[b]
        _add_tones(sig, labels[b], rpm[b], phase[b], severity[b], base[b], start[b], mesh_b)
        out[b] = _features(sig * gain[b], rpm[b])
    return out


def _add_tones(
    sig: np.ndarray,
    labels: np.ndarray,
    rpm: np.ndarray,
    phase: np.ndarray,
    severity: np.ndarray,
    base: np.ndarray,
    start: np.ndarray,
    mesh: np.ndarray | float,
) -> None:
    """Add each window's machine tones and fault signature to its noise ``sig`` (in place)."""
    t = np.arange(WINDOW) / SAMPLE_RATE_HZ
    f_r = (rpm / 60.0)[:, None]  # shaft frequency, Hz

    def tone(rows: np.ndarray, order: float, amp: np.ndarray | float, ph: float = 0.0) -> np.ndarray:
        return amp * np.sin(2 * np.pi * order * f_r[rows] * t + phase[rows] + ph)

    every = np.arange(labels.shape[0])
    # Baseline machine: residual unbalance (the same on every axis), small 2x, gear-mesh tone.
    unbalance = tone(every, 1, base)
    for a in range(3):
        sig[:, a] += unbalance + tone(every, 2, base * 0.5, a) + tone(every, GEAR_MESH_ORDER, mesh, a)

    r = np.flatnonzero(labels == 1)  # imbalance: 1x radial, x and y in quadrature
    sig[r, 0] += tone(r, 1, 0.7 * severity[r])
    sig[r, 1] += tone(r, 1, 0.7 * severity[r], np.pi / 2)
    sig[r, 2] += tone(r, 1, 0.1 * severity[r])

    r = np.flatnonzero(labels == 2)  # misalignment: 2x (and 1x), mostly axial
    sig[r, 2] += tone(r, 2, 0.6 * severity[r]) + tone(r, 1, 0.3 * severity[r])
    sig[r, 0] += tone(r, 2, 0.25 * severity[r])

    r = np.flatnonzero(labels == 3)  # outer-race defect: impacts at BPFO ringing a resonance
    period = SAMPLE_RATE_HZ / (BPFO_ORDER * f_r[r])  # samples between impacts
    since = np.mod(np.arange(WINDOW)[None, :] + start[r] * period, period)
    ring = 1.6 * severity[r] * np.exp(-since / 4.0) * np.sin(2 * np.pi * RESONANCE_HZ * since / SAMPLE_RATE_HZ)
    for a, g in enumerate((1.0, 0.8, 0.3)):
        sig[r, a] += g * ring

    r = np.flatnonzero(labels == 4)  # looseness: rich harmonics and 0.5x, clipped
    loose = sum(tone(r, order, 0.25 * severity[r] / order**0.5, order * 0.7) for order in range(1, 11))
    loose = loose + tone(r, 0.5, 0.2 * severity[r])
    clip = 0.6 * severity[r] + 0.2
    loose = np.clip(loose, -clip, clip)
    for a, g in enumerate((1.0, 0.9, 0.5)):
        sig[r, a] += g * loose


def _column(value: Scale, n: int, dims: int = 2) -> np.ndarray | float:
    """``value`` shaped ``(n, 1)`` (or ``(n, 1, 1)``) when it has one value per window, else as is."""
    if np.ndim(value) == 0:
        return float(value)
    return np.asarray(value, dtype=np.float64).reshape((n,) + (1,) * (dims - 1))


def _features(sig: np.ndarray, rpm: np.ndarray) -> np.ndarray:
    n = sig.shape[0]
    window = np.hanning(WINDOW)
    spectrum = np.abs(np.fft.rfft(sig * window, axis=-1)) ** 2  # (n, 3, 257)
    bins_per_band = (WINDOW // 2) // BANDS  # 8 bins of 4 Hz = 32 Hz
    bands = spectrum[..., 1 : 1 + BANDS * bins_per_band].reshape(n, 3, BANDS, bins_per_band).sum(-1)
    log_bands = np.log10(bands + 1e-6)
    rms = np.sqrt((sig**2).mean(-1))
    centred = sig - sig.mean(-1, keepdims=True)
    var = (centred**2).mean(-1)
    kurt = (centred**4).mean(-1) / np.maximum(var**2, 1e-12)
    crest = np.abs(sig).max(-1) / np.maximum(rms, 1e-12)
    per_axis = np.concatenate([log_bands, np.log10(rms + 1e-6)[..., None], kurt[..., None], crest[..., None]], axis=-1)
    return np.concatenate([per_axis.reshape(n, -1), rpm[:, None]], axis=1)


def generate(n: int, seed: int, shift: Shift | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Generate ``n`` feature windows and their labels.

    Args:
        n: number of windows.
        seed: seed of the random generator (same seed, same data).
        shift: an optional distribution shift; ``None`` is the reference distribution.

    Returns:
        ``(features float32 [n, 106], labels int64 [n])``.
    """
    shift = shift or Shift()
    rng = np.random.default_rng(seed)
    weights = np.asarray(shift.class_weights, dtype=np.float64)
    labels = rng.choice(len(LABELS), size=n, p=weights / weights.sum())
    x = _windows(labels, rng, shift.rpm_range, shift.noise_scale, shift.sensor_gain)
    for index, offset in shift.feature_offsets.items():
        x[:, index] += offset
    return x.astype(np.float32), labels.astype(np.int64)


@dataclass(frozen=True)
class Quantity:
    """A physical quantity the simulator can set per device: its nominal value and range."""

    nominal: float
    low: float
    high: float
    unit: str
    doc: str


#: The named quantities :func:`simulate` takes; at nominal values it draws the reference
#: distribution that :func:`generate` draws (same label mix, same speed range).
QUANTITIES: dict[str, Quantity] = {
    "shaft_rpm": Quantity(1800.0, 300.0, 6000.0, "rpm", "centre of the shaft speed; each window is within ±600 rpm of it"),
    "load": Quantity(1.0, 0.0, 4.0, "x", "drive load: scales the residual unbalance, 2x order and gear-mesh tones"),
    "bearing_wear": Quantity(
        0.2, 0.0, 1.0, "", "share of windows showing the outer-race defect (the rest: the other four conditions evenly)"
    ),
    "sensor_gain": Quantity(1.0, 0.1, 10.0, "x", "sensor sensitivity: multiplies every acceleration"),
    "noise": Quantity(1.0, 0.0, 20.0, "x", "broadband noise level"),
}
RPM_SPREAD = 600.0


def simulate(n: int, rng: np.random.Generator, quantities: Mapping[str, float | np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``n`` windows under the given physical quantities (each a scalar or one value per window).

    Missing quantities take their nominal value. The labels are the machine's true condition:
    a window is ``bearing_outer`` with probability ``bearing_wear``, else one of the other four
    conditions, evenly.

    Returns:
        ``(features float32 [n, 106], labels int64 [n])``.
    """

    def value(name: str) -> np.ndarray:
        q = QUANTITIES[name]
        v = np.broadcast_to(np.asarray(quantities.get(name, q.nominal), dtype=np.float64), (n,))
        return np.clip(v, q.low, q.high)

    wear = value("bearing_wear")
    u = rng.random(n)
    others = np.array([0, 1, 2, 4])
    pick = np.minimum(((u - wear) / np.maximum(1.0 - wear, 1e-12) * 4).astype(np.int64), 3)
    labels = np.where(u < wear, 3, others[np.clip(pick, 0, 3)])
    rpm = value("shaft_rpm")
    low = np.maximum(rpm - RPM_SPREAD, QUANTITIES["shaft_rpm"].low)
    x = _windows(labels, rng, (low, rpm + RPM_SPREAD), value("noise"), value("sensor_gain"), value("load"))
    return x.astype(np.float32), labels.astype(np.int64)


def load_dataset(n_train: int = 6000, n_val: int = 1000, n_test: int = 2000, seed: int = 7) -> dict[str, object]:
    """The project's dataset entry point: independent train/validation/test draws.

    Each split uses its own seed, so no window is shared between splits.
    """
    x_train, y_train = generate(n_train, seed)
    x_val, y_val = generate(n_val, seed + 1)
    x_test, y_test = generate(n_test, seed + 2)
    return {
        "x_train": x_train,
        "y_train": y_train,
        "x_val": x_val,
        "y_val": y_val,
        "x_test": x_test,
        "y_test": y_test,
        "feature_names": feature_names(),
        "label_names": LABELS,
    }
