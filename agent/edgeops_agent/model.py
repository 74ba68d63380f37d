"""A verified bundle, loaded and ready to serve: the agent's inference hot path.

:class:`LoadedModel` holds the manifest, the runtime and everything a prediction needs
precomputed, so one prediction is: check the input, preprocessing and (int8 models) input
quantization, the runtime call, dequantization, a finiteness check of the output.

Preprocessing and quantization compute exactly what :func:`edgeops_core.apply_preprocessing`
followed by :func:`edgeops_agent.runtime.quantize` compute -- the same float32 operations in
the same order (``(x - mean) / std``, then ``rint(t / scale) + zero_point``, saturated), on
arrays prepared once at load -- so the device's tensors are bit-identical to the host's
(``tests/test_serving.py`` checks this on many rows per target). The fused multiply-add
used before (``x * a + b``) saved two numpy calls but differed from the host: by float32
ulps on the ECU's float input, and by one input step on rounding ties of int8 inputs
(found on both TFLite targets); exactness was chosen. Saturation uses ``np.maximum`` /
``np.minimum`` (``np.clip``'s Python wrapper costs 2 us a row) and int8 outputs are
dequantized through a 256-entry table, which is what keeps the exact path as fast as a
caller's own code.

Inputs beyond a flat vector: a sample of shape ``sample_shape`` (the manifest's input without
its batch axis, the first axis the channel axis) is taken as that shape or ``[1, *sample_shape]``
and standardized per channel (mean and std broadcast as ``[1, C, 1, ...]``, as
:func:`edgeops_core.apply_preprocessing` does with ``sample_ndim``); any other shape is a
:class:`TensorInputError` naming the shapes expected. A flat model keeps its forms exactly
(``[features]`` and ``[1, features]``), and its hot path is the same code.

Tasks (``manifest.task``): a classifier's answer is the top class; a regression's the output
values; an anomaly model's the score, compared with ``task.threshold``. :class:`Prediction`
says which; the self-test checks what the contract asks of each task.

A model whose output is not finite (NaN or inf) for a valid input raises
:class:`ModelOutputError` rather than letting ``argmax`` pick a label from NaN. An input is
valid when it is finite *and* standardizes to finite float32 values: 3e38 is finite, but
``(3e38 - mean) / 0.5`` is not, and that is the input's fault (:class:`TensorInputError`). The
hot path pays nothing more for it: its finiteness check was already one dot product, now of
the row with itself (``np.vdot``, silent on overflow), which also bounds every value (load
precomputes the largest magnitude that standardizes without overflow); only a row past that
bound takes the checked path, computing the same float32 operations with numpy's overflow
warnings off and checking the result.

At load, the runtime's input tensor shape must be the manifest's ``inputs[0].shape`` wherever
the model fixes a size (an ONNX model's symbolic axes are not compared): :meth:`prepare`
reshapes by size, so an NHWC model under an NCHW manifest would get scrambled channels.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any, NamedTuple

import numpy as np

from edgeops_agent.errors import ModelLoadError, ModelOutputError, SelfTestError, TensorInputError
from edgeops_agent.runtime import ModelRunner, Runtime, open_runtime, refused_value, to_float32
from edgeops_core import (
    SIGNATURE_MEMBER,
    BundleError,
    ExpiredBundleError,
    Manifest,
    SignatureError,
    TrustedKey,
    read_members,
    verify_members,
)
from edgeops_core.digest import sha256_hex
from edgeops_core.signature import key_hint

__all__ = ["LoadedModel", "Prediction"]

_F32 = np.dtype(np.float32)
_F32_MAX = float(np.finfo(np.float32).max)
#: ``np.vdot`` without its ``__array_function__`` dispatch (0.15 us a call; the public function is the
#: fallback). vdot, unlike ``dot``, does not report a float overflow as a RuntimeWarning: the
#: check below must stay silent on the inputs it is there to refuse.
_vdot = getattr(np.vdot, "_implementation", np.vdot)
#: TFLite Micro arena headroom over the build's measured minimum (bytes).
ARENA_HEADROOM = 256


class Prediction(NamedTuple):
    """One inference result (a tuple: cheap to make on the serving path).

    What the answer is depends on the model's task (:attr:`task`):

    * ``classification``: :attr:`label` and :attr:`class_index` are the top class, :attr:`logits`
      one number per label;
    * ``regression``: :attr:`logits` are the output values, one per output name
      (:attr:`output_names`, also :attr:`values`); :attr:`label` is ``""`` and :attr:`class_index` 0;
    * ``anomaly``: :attr:`logits` is ``[score]``; :attr:`class_index` is 1 (:attr:`label`
      ``"anomaly"``) when the score is above :attr:`threshold`, else 0 (``"normal"``).
    """

    label: str
    class_index: int
    logits: list[float]
    latency_ms: float
    #: The prediction's id: a label that arrives later is attached to it (:meth:`Agent.feedback`).
    id: int = 0
    #: ``classification``, ``regression`` or ``anomaly`` (the manifest's ``task.kind``).
    task: str = "classification"
    #: Anomaly models: the score threshold (``task.threshold``); else ``None``.
    threshold: float | None = None
    #: Regression and anomaly models: the name of each output (the manifest's labels).
    output_names: tuple[str, ...] = ()

    @property
    def values(self) -> dict[str, float]:
        """Each output's value by its name (regression; an anomaly model's one score)."""
        return dict(zip(self.output_names, self.logits, strict=False))

    @property
    def score(self) -> float | None:
        """An anomaly model's score (``None`` for other tasks)."""
        return self.logits[0] if self.task == "anomaly" else None

    @property
    def anomaly(self) -> bool | None:
        """Whether an anomaly model's score is above its threshold (``None`` for other tasks)."""
        return self.class_index == 1 if self.task == "anomaly" else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the local endpoint's reply; its ``id`` is the request's, so this is ``prediction_id``)."""
        if self.task == "regression":
            return {"task": self.task, "values": self.values, "latency_ms": self.latency_ms, "prediction_id": self.id}
        if self.task == "anomaly":
            return {
                "task": self.task,
                "score": self.logits[0],
                "threshold": self.threshold,
                "anomaly": self.class_index == 1,
                "latency_ms": self.latency_ms,
                "prediction_id": self.id,
            }
        return {
            "task": self.task,
            "label": self.label,
            "index": self.class_index,
            "logits": self.logits,
            "latency_ms": self.latency_ms,
            "prediction_id": self.id,
        }


class LoadedModel:
    """A bundle verified, its model loaded into its runtime, ready to predict."""

    def __init__(
        self, manifest: Manifest, model: bytes, *, digest: str, signer: str, expired: bool, threads: int | None = None
    ) -> None:
        """Open the manifest's runtime on ``model`` and precompute the input/output conversions.

        Raises:
            RuntimeUnavailableError, ModelLoadError: the runtime is missing or refuses the model.
        """
        self.manifest = manifest
        self.digest = digest
        self.signer = signer
        self.expired = expired
        arena = None
        if manifest.runtime == "tflite-micro" and "arena_bytes" in manifest.metrics:
            arena = int(manifest.metrics["arena_bytes"]) + ARENA_HEADROOM
        n_threads = threads or int(manifest.metrics.get("threads", 1)) or 1
        self.runtime: Runtime = open_runtime(manifest.runtime, model, n_threads, arena_size=arena)
        self.runner = ModelRunner(self.runtime, manifest.inputs[0], manifest.outputs[0], manifest)
        self.labels = list(manifest.labels)
        #: Output names (regression outputs, the anomaly score), as a tuple.
        self.output_names = tuple(manifest.labels)
        #: Input channels: a flat vector's features, an image's channels.
        self.n_features = len(manifest.feature_names)
        #: The input without its batch axis, and the number of values in it (one raw row).
        self.sample_shape: tuple[int, ...] = manifest.sample_shape
        self.n_values = math.prod(self.sample_shape)
        #: Values of each channel in one sample (1 for a flat vector).
        self.positions = self.n_values // self.n_features
        task = manifest.task
        #: ``classification``, ``regression`` or ``anomaly``.
        self.task = task.kind
        self.classifier = task.kind == "classification"
        self.anomaly = task.kind == "anomaly"
        #: An anomaly model's threshold: a score above it is an anomaly (compared as doubles).
        self.threshold: float | None = float(task.threshold) if task.threshold is not None else None
        spec_in, spec_out = manifest.inputs[0], manifest.outputs[0]
        pre = manifest.preprocessing
        model_shape = tuple(self.runtime.input.shape)
        if len(model_shape) != len(spec_in.shape) or any(
            isinstance(d, int) and d != e for d, e in zip(model_shape, spec_in.shape, strict=False)
        ):
            shown = [d if isinstance(d, int) else str(d) for d in model_shape]
            raise ModelLoadError(
                f"the model's input tensor has shape {shown}, but the manifest's inputs[0].shape is {list(spec_in.shape)}; "
                "the agent would reshape each sample by size (a channels-last model under a channels-first manifest "
                "gets scrambled channels): export the model with the manifest's input shape"
            )
        # The manifest's shape: the runtime's wherever it fixes a size (checked above), and a
        # size where an ONNX model names a symbolic axis.
        shape = tuple(spec_in.shape)
        # The same float32 arrays apply_preprocessing builds per call, built once: mean and std
        # per channel, broadcast over the sample's other axes ([1, C, 1, ...]).
        standardize = pre.kind == "standardize"
        per_channel = (1, self.n_features) + (1,) * (len(self.sample_shape) - 1)
        self._mean = np.asarray(pre.mean, dtype=np.float32).reshape(per_channel) if standardize else None
        self._std = np.asarray(pre.std, dtype=np.float32).reshape(per_channel) if standardize else None
        self._int_in = spec_in.dtype in ("int8", "uint8") and spec_in.quantization is not None
        q_in = spec_in.quantization if self._int_in else None
        # quantize() divides a float32 array by the Python float scale: numpy computes that in
        # float32, i.e. by float32(scale); the zero point is added after rounding, as there.
        self._scale = np.float32(q_in.scale) if q_in is not None else np.float32(1.0)
        self._zero = np.float32(q_in.zero_point) if q_in is not None else np.float32(0.0)
        info = np.iinfo(np.dtype(spec_in.dtype)) if self._int_in else None
        self._lo, self._hi = (np.float32(info.min), np.float32(info.max)) if info else (np.float32(0), np.float32(0))
        self._in_dtype = np.dtype(spec_in.dtype)
        self._out_q = spec_out.quantization if spec_out.dtype in ("int8", "uint8") else None
        self._lut: np.ndarray | None = None
        if self._out_q is not None:
            self._out_zero, self._out_scale = np.float32(self._out_q.zero_point), np.float32(self._out_q.scale)
        if self._out_q is not None and self.runtime.output.dtype == spec_out.dtype:
            # Dequantization of a one-byte output as a 256-entry table indexed by the byte:
            # the same float32 expression evaluated once per possible value, so the result is
            # identical to computing it per call, in one numpy call instead of three.
            codes = np.arange(256, dtype=np.uint8).view(np.dtype(spec_out.dtype)).astype(np.float32)
            self._lut = (codes - self._out_zero) * self._out_scale
        self._ones_out = np.ones(len(self.labels), dtype=np.float32)
        # The largest |value| every float32 step of prepare() takes without overflow (mean and std
        # of the worst channel, the input scale; half of float32's range as the margin), squared:
        # a row with dot(row, row) <= this is finite and standardizes to finite values.
        limit = 0.5 * _F32_MAX * min(1.0, float(self._scale) if self._int_in else 1.0)
        if standardize:
            limit = limit * min(1.0, min(pre.std, default=1.0)) - max((abs(v) for v in pre.mean), default=0.0)
        self._safe_sq = (0.5 * limit) ** 2 if limit > 0 else -1.0
        self._shape = shape
        # The shapes prepare() takes without a conversion: the sample and [1, *sample]; a raw
        # row is the sample flattened (for a flat vector, the sample itself).
        self._sample, self._row, self._flat = self.sample_shape, (1, *self.sample_shape), (self.n_values,)
        #: The runtime's call, bound once (thread-safe on every runtime: see runtime.py).
        self.invoke = self.runtime.invoke

    @classmethod
    def from_bundle(
        cls, data: bytes, trusted: list[TrustedKey], *, allow_expired: bool = False, threads: int | None = None
    ) -> LoadedModel:
        """Verify bundle bytes and load their model.

        ``allow_expired`` is for the bundle that is already active: a device keeps serving
        past the expiry (and reports it) rather than go dark; installs never allow it.

        Raises:
            BundleError: the bundle does not verify (tampered, untrusted, malformed, expired).
            RuntimeUnavailableError, ModelLoadError: its model cannot be loaded here.
        """

        members = read_members(data)
        expired = False
        try:
            manifest, key = verify_members(members, trusted)
        except ExpiredBundleError:
            if not allow_expired:
                raise
            manifest, key = verify_members(members, trusted, now=datetime(1970, 1, 1, tzinfo=UTC))
            expired = True
        return cls(
            manifest,
            members[manifest.model_file],
            digest=sha256_hex(data),
            signer=key.fingerprint,
            expired=expired,
            threads=threads,
        )

    @classmethod
    def from_installed(
        cls, data: bytes, sha256: str, *, source: str, threads: int | None = None, revoked: frozenset[str] = frozenset()
    ) -> LoadedModel:
        """Load an installed slot: its bytes must hash to the ``sha256`` recorded at install.

        The signature was checked when the bundle was installed and the whole file's digest
        stored in the (checksummed) state, so start-up needs only the hash, not the
        signature stack (``cryptography`` stays out of a serving agent's memory). The signer
        is the signature's key hint, which the install's check pinned to the key that verified.

        Args:
            revoked: key ids revoked since (:meth:`edgeops_agent.trust.TrustStore.revoked`): a
                slot signed by one of them is not served (docs/adr/0018).

        Raises:
            BundleError: the slot's bytes changed since the install.
            SignatureError: the slot's signing key is revoked, or unknown (no key hint) while
                keys are revoked.
        """

        digest = sha256_hex(data)
        if digest != sha256:
            raise BundleError(
                f"{source}: sha256 {digest[:16]}… differs from the {sha256[:16]}… recorded at install; reinstall the bundle"
            )
        members = read_members(data)
        signer = key_hint(members[SIGNATURE_MEMBER])
        if signer in revoked or (revoked and not signer):
            whose = f"key sha256:{signer[:16]}…, which is revoked" if signer else "an unnamed key while keys are revoked"
            raise SignatureError(
                f"{source}: signed by {whose}; not served (docs/adr/0018): install a release signed by a current release key",
                member=SIGNATURE_MEMBER,
            )
        manifest = Manifest.from_json(members["manifest.json"])
        expired = manifest.expires_at <= datetime.now(UTC)
        return cls(manifest, members[manifest.model_file], digest=digest, signer=signer, expired=expired, threads=threads)

    def prepare(self, features: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(raw row as float32 [values], runtime input tensor)`` for one sample.

        ``features`` is a numpy array or nested lists of shape ``sample_shape`` or
        ``[1, *sample_shape]`` (a flat model: ``[features]`` or ``[1, features]``); the raw
        row is the sample flattened row-major.

        Raises:
            TensorInputError: wrong size or shape (the message names the shapes expected),
                not numeric, NaN or inf.
        """
        x = features
        if x.__class__ is not np.ndarray or x.dtype != _F32 or (x.shape != self._sample and x.shape != self._row):
            x = self.runner.check(x)
        if not float(_vdot(x, x)) <= self._safe_sq:  # NaN, inf, or a value large enough to overflow below
            return self._prepare_large(x)
        t = x.reshape(self._shape)
        if self._mean is not None:
            t = t - self._mean  # a new array: the in-place steps below never touch the caller's
            t /= self._std
            if self._int_in:
                t /= self._scale
        elif self._int_in:
            t = t / self._scale
        if self._int_in:
            np.rint(t, out=t)
            t += self._zero
            # Saturate: what np.clip does, without its Python wrapper (2 us on a 106-float row).
            np.maximum(t, self._lo, out=t)
            np.minimum(t, self._hi, out=t)
            return x if x.shape == self._flat else x.reshape(-1), t.astype(self._in_dtype)
        return x if x.shape == self._flat else x.reshape(-1), t

    def _prepare_large(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`prepare` of a row the fast path's bound does not clear: the same operations, checked.

        Raises:
            TensorInputError: a value is NaN or inf, or standardizes to one (the message names it).
        """
        self.runner.check(x.reshape(self._row) if x.size == self.n_values else x)  # NaN or inf: named
        with np.errstate(over="ignore", invalid="ignore"):
            row, t = self._standardize(x.reshape(1, -1), "input")
            t = self._quantize(t)
        return (row[0], t)

    def _standardize(self, x: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
        """``(x, standardized float32 [n, *input shape[1:]])`` of finite rows ``[n, values]``,
        the operations of :meth:`prepare` (caller: numpy's errstate), checked finite.

        Raises:
            TensorInputError: a value standardizes to a non-finite float32 (``what``: how to name its row).
        """
        t = x.reshape((x.shape[0], *self._shape[1:]))
        if self._mean is not None and self._std is not None:
            t = t - self._mean
            t /= self._std
            finite = np.isfinite(t.reshape(x.shape[0], -1))
            if not finite.all():
                r, f = (int(i) for i in np.argwhere(~finite)[0])
                c = int(np.unravel_index(f, self.sample_shape)[0])
                raise TensorInputError(
                    f"{what.format(r)} {self.runner.where(f)} is {x[r, f]!s}: standardized ((x - mean) / std of its channel, "
                    f"mean {float(self._mean.reshape(-1)[c]):g}, std {float(self._std.reshape(-1)[c]):g}) it overflows "
                    "float32; not accepted"
                )
        return x, t

    def _quantize(self, t: np.ndarray) -> np.ndarray:
        """The runtime's input from standardized ``t``: :meth:`prepare`'s int8 steps (saturating), or ``t``."""
        if not self._int_in:
            return t
        t = t / self._scale
        np.rint(t, out=t)
        t += self._zero
        np.maximum(t, self._lo, out=t)
        np.minimum(t, self._hi, out=t)
        return t.astype(self._in_dtype)

    def prepare_batch(self, rows: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(raw rows as float32 [n, values], runtime input tensors [n, *input shape])``.

        ``rows`` is ``[n, *sample_shape]`` (a flat model: ``[n, features]``).

        Raises:
            TensorInputError: not a non-empty ``[n, *sample_shape]`` numeric array, or a NaN/inf
                (the message names the row and the value).
        """
        try:
            x = np.asarray(rows)
        except (ValueError, TypeError) as exc:  # ragged nested lists
            expected = f"[n, {_dims(self._sample)}]"
            raise TensorInputError(f"rows must be a numeric array of shape {expected}: {str(exc)[:200]}") from None
        if x.dtype.kind not in "fiu":
            raise TensorInputError(f"rows must be numeric, got dtype {x.dtype}")
        if x.ndim != 1 + len(self._sample) or x.shape[1:] != self._sample or x.shape[0] == 0:
            raise TensorInputError(f"rows must have shape [n, {_dims(self._sample)}] with n >= 1, got shape {list(x.shape)}")
        x, orig = to_float32(x, copy=False).reshape(x.shape[0], self.n_values), x
        finite = np.isfinite(x)
        if not finite.all():
            r, f = (int(i) for i in np.argwhere(~finite)[0])
            raise TensorInputError(f"row {r}: input {self.runner.where(f)} is {refused_value(orig.reshape(x.shape)[r, f])}")
        with np.errstate(over="ignore", invalid="ignore"):  # a finite value that overflows is named instead
            x, t = self._standardize(x, "row {}: input")
            return x, self._quantize(t).reshape((x.shape[0], *self._shape))

    def output_batch(self, raw: np.ndarray) -> np.ndarray:
        """Float logits ``[n, labels]`` from ``n`` stacked raw outputs, checked finite.

        Raises:
            ModelOutputError: a row's output is NaN or inf (the message names the row).
        """
        n = raw.shape[0]
        if self._lut is not None:
            out: np.ndarray = self._lut.take(raw.view(np.uint8).reshape(n, -1))
            return out
        if self._out_q is not None:
            return (raw.reshape(n, -1).astype(np.float32) - self._out_zero) * self._out_scale
        out = raw.reshape(n, -1).astype(np.float32, copy=False)
        finite = np.isfinite(out)
        if not finite.all():
            r, k = (int(i) for i in np.argwhere(~finite)[0])
            raise ModelOutputError(
                f"row {r}: the model produced a non-finite output ({out[r, k]} at index {k}, label "
                f"{self.labels[k]!r}) for a valid input; no label is given"
            )
        return out

    def logits(self, raw: np.ndarray) -> np.ndarray:
        """The runtime's raw output as float logits ``[labels]``."""
        if self._out_q is not None:
            out: np.ndarray = (raw.reshape(-1).astype(np.float32) - self._out_zero) * self._out_scale
            return out
        return np.asarray(raw, dtype=np.float32).reshape(-1)

    def output(self, raw: np.ndarray) -> np.ndarray:
        """Float logits ``[labels]`` from the runtime's raw output, checked finite.

        Raises:
            ModelOutputError: an output is NaN or inf.
        """
        if self._lut is not None:  # dequantized integers are always finite
            out: np.ndarray = self._lut.take(raw.view(np.uint8).reshape(-1))
            return out
        if self._out_q is not None:
            return self.logits(raw)
        out = raw.reshape(-1)
        if out.dtype != _F32:
            out = out.astype(np.float32)
        if not math.isfinite(float(out.dot(self._ones_out))) and not np.isfinite(out).all():
            bad = int(np.flatnonzero(~np.isfinite(out))[0])
            raise ModelOutputError(
                f"the model produced a non-finite output ({out[bad]} at index {bad}, label "
                f"{self.labels[bad]!r}) for a valid input; no label is given"
            )
        return out

    def sample(self, values: Any) -> np.ndarray:
        """A flattened sample (a self-test vector's ``input``) as a float32 array of ``sample_shape``."""
        return np.asarray(values, dtype=np.float32).reshape(self.sample_shape)

    def verdict(self, score: float) -> int:
        """An anomaly model's verdict on a score: 1 (anomaly) if it is above the threshold, else 0."""
        return 1 if self.threshold is not None and score > self.threshold else 0

    def self_test(self) -> int:
        """Run the manifest's self-test vectors through the serving path; the number passed.

        Every output must be within ``atol`` of the expected one; a classifier must also give
        the expected top-1 class, and an anomaly model the expected verdict whenever the
        expected score is more than ``atol`` away from the threshold (closer, either verdict
        is within the tolerance).

        Raises:
            SelfTestError: a vector's output is off by more than ``atol``, or its top-1 or verdict differs.
        """
        st = self.manifest.self_test
        for i, v in enumerate(st.vectors):
            try:
                _, tensor = self.prepare(self.sample(v.input))
            except (TensorInputError, ValueError) as exc:
                raise SelfTestError(f"self-test vector {i} is not a valid input: {exc}") from exc
            out = self.logits(self.runtime.invoke(tensor))
            if not np.isfinite(out).all():
                # NaN compares false with everything (diff > atol would pass) and argmax of
                # all-NaN is 0: a non-finite output is a failure, whatever was expected.
                raise SelfTestError(f"self-test vector {i} fails on this device: the model output is non-finite ({out.tolist()})")
            expected = np.asarray(v.expected, dtype=np.float32)
            diff = float(np.abs(out - expected).max())
            if not diff <= st.atol:
                raise SelfTestError(
                    f"self-test vector {i} fails on this device: max |output - expected| {diff:.4g} (tolerance {st.atol:.4g})"
                )
            if self.classifier and int(out.argmax()) != v.label:
                raise SelfTestError(
                    f"self-test vector {i} fails on this device: max |output - expected| {diff:.4g} "
                    f"(tolerance {st.atol:.4g}), top-1 {int(out.argmax())} vs expected {v.label}"
                )
            if self.anomaly and self.threshold is not None:
                score = float(out[0])
                if abs(float(expected[0]) - self.threshold) > st.atol and self.verdict(score) != v.label:
                    raise SelfTestError(
                        f"self-test vector {i} fails on this device: score {score:.6g} gives verdict {self.verdict(score)} "
                        f"(threshold {self.threshold:.6g}), expected {v.label}"
                    )
        return len(st.vectors)


def _dims(shape: tuple[int, ...]) -> str:
    return ", ".join(str(d) for d in shape)
