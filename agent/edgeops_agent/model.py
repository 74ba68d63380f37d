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

A model whose output is not finite (NaN or inf) for a valid input raises
:class:`ModelOutputError` rather than letting ``argmax`` pick a label from NaN.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any, NamedTuple

import numpy as np

from edgeops_agent.errors import ModelOutputError, SelfTestError, TensorInputError
from edgeops_agent.runtime import ModelRunner, Runtime, open_runtime
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
#: TFLite Micro arena headroom over the build's measured minimum (bytes).
ARENA_HEADROOM = 256


class Prediction(NamedTuple):
    """One inference result (a tuple: cheap to make on the serving path)."""

    label: str
    class_index: int
    logits: list[float]
    latency_ms: float
    #: The prediction's id: a label that arrives later is attached to it (:meth:`Agent.feedback`).
    id: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the local endpoint's reply; its ``id`` is the request's, so this is ``prediction_id``)."""
        return {
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
        self.n_features = len(manifest.feature_names)
        spec_in, spec_out = manifest.inputs[0], manifest.outputs[0]
        pre = manifest.preprocessing
        shape = self.runtime.input.shape
        # The same float32 arrays apply_preprocessing builds per call, built once.
        standardize = pre.kind == "standardize"
        self._mean = np.asarray(pre.mean, dtype=np.float32).reshape(shape) if standardize else None
        self._std = np.asarray(pre.std, dtype=np.float32).reshape(shape) if standardize else None
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
        self._ones = np.ones(self.n_features, dtype=np.float32)
        self._ones_out = np.ones(len(self.labels), dtype=np.float32)
        self._shape = shape
        self._flat, self._row = (self.n_features,), (1, self.n_features)
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
        """``(raw row as float32 [features], runtime input tensor)``.

        Raises:
            TensorInputError: wrong size or shape, not numeric, NaN or inf.
        """
        x = features
        if x.__class__ is not np.ndarray or x.dtype != _F32 or (x.shape != self._flat and x.shape != self._row):
            x = self.runner.check(x)
        if not math.isfinite(float(x.reshape(-1).dot(self._ones))):
            self.runner.check(x)  # names the bad feature; a finite input only overflowed the sum
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

    def prepare_batch(self, rows: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(raw rows as float32 [n, features], runtime input tensors [n, *input shape])``.

        Raises:
            TensorInputError: not a non-empty ``[n, features]`` numeric array, or a NaN/inf
                (the message names the row and the feature).
        """
        x = np.asarray(rows)
        if x.dtype.kind not in "fiu":
            raise TensorInputError(f"rows must be numeric, got dtype {x.dtype}")
        if x.ndim != 2 or x.shape[1] != self.n_features or x.shape[0] == 0:
            raise TensorInputError(f"rows must have shape [n, {self.n_features}] with n >= 1, got shape {list(x.shape)}")
        x = x.astype(np.float32, copy=False)
        finite = np.isfinite(x)
        if not finite.all():
            r, f = (int(i) for i in np.argwhere(~finite)[0])
            raise TensorInputError(f"row {r}: input feature {f} is {x[r, f]}; NaN and inf are not accepted")
        t = x.reshape((x.shape[0], *self._shape))
        if self._mean is not None:
            t = t - self._mean
            t /= self._std
        if self._int_in:
            t = t / self._scale
            np.rint(t, out=t)
            t += self._zero
            np.maximum(t, self._lo, out=t)
            np.minimum(t, self._hi, out=t)
            return x, t.astype(self._in_dtype)
        return x, t

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

    def self_test(self) -> int:
        """Run the manifest's self-test vectors through the serving path; the number passed.

        Raises:
            SelfTestError: a vector's output is off by more than ``atol`` or its top-1 differs.
        """
        st = self.manifest.self_test
        for i, v in enumerate(st.vectors):
            try:
                _, tensor = self.prepare(np.asarray(v.input, dtype=np.float32))
            except TensorInputError as exc:
                raise SelfTestError(f"self-test vector {i} is not a valid input: {exc}") from exc
            out = self.logits(self.runtime.invoke(tensor))
            if not np.isfinite(out).all():
                # NaN compares false with everything (diff > atol would pass) and argmax of
                # all-NaN is 0: a non-finite output is a failure, whatever was expected.
                raise SelfTestError(f"self-test vector {i} fails on this device: the model output is non-finite ({out.tolist()})")
            diff = float(np.abs(out - np.asarray(v.expected, dtype=np.float32)).max())
            if not diff <= st.atol or int(out.argmax()) != v.label:
                raise SelfTestError(
                    f"self-test vector {i} fails on this device: max |output - expected| {diff:.4g} "
                    f"(tolerance {st.atol:.4g}), top-1 {int(out.argmax())} vs expected {v.label}"
                )
        return len(st.vectors)
