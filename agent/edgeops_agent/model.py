"""A verified bundle, loaded and ready to serve: the agent's inference hot path.

:class:`LoadedModel` holds the manifest, the runtime and everything a prediction needs
precomputed, so one prediction is: check the input, one fused multiply-add (preprocessing
and, for int8 models, input quantization in one step), the runtime call, dequantization.

The fused step: ``standardize`` then quantize is ``q = round((x − mean) / std / s) + z``,
which is ``round(x · a + b)`` with ``a = 1 / (std · s)`` and ``b = z − mean / (std · s)``
computed once at load. The result can differ from the two-step form by one float32 ulp
before rounding, so at most one input step on rare ties; the self-test tolerance (two
output steps) covers it, and every install runs the self-test through this same path.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any, NamedTuple

import numpy as np

from edgeops_agent.errors import SelfTestError, TensorInputError
from edgeops_agent.runtime import ModelRunner, Runtime, open_runtime
from edgeops_core import BundleError, ExpiredBundleError, Manifest, TrustedKey, read_members, verify_members
from edgeops_core.digest import sha256_hex

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

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the local endpoint's reply)."""
        return {"label": self.label, "index": self.class_index, "logits": self.logits, "latency_ms": self.latency_ms}


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
        mean = np.asarray(pre.mean, dtype=np.float64) if pre.kind == "standardize" else np.zeros(self.n_features)
        std = np.asarray(pre.std, dtype=np.float64) if pre.kind == "standardize" else np.ones(self.n_features)
        self._int_in = spec_in.dtype in ("int8", "uint8") and spec_in.quantization is not None
        scale, zero = (
            (spec_in.quantization.scale, spec_in.quantization.zero_point) if self._int_in and spec_in.quantization else (1.0, 0)
        )
        self._a = (1.0 / (std * scale)).astype(np.float32).reshape(self.runtime.input.shape)
        self._b = (zero - mean / (std * scale)).astype(np.float32).reshape(self.runtime.input.shape)
        info = np.iinfo(np.dtype(spec_in.dtype)) if self._int_in else None
        self._lo, self._hi = (float(info.min), float(info.max)) if info else (0.0, 0.0)
        self._in_dtype = np.dtype(spec_in.dtype)
        self._out_q = spec_out.quantization if spec_out.dtype in ("int8", "uint8") else None
        self._ones = np.ones(self.n_features, dtype=np.float32)
        self._shape = self.runtime.input.shape
        self._flat, self._row = (self.n_features,), (1, self.n_features)

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
    def from_installed(cls, data: bytes, sha256: str, *, source: str, threads: int | None = None) -> LoadedModel:
        """Load an installed slot: its bytes must hash to the ``sha256`` recorded at install.

        The signature was checked when the bundle was installed and the whole file's digest
        stored in the (checksummed) state, so start-up needs only the hash, not the
        signature stack (``cryptography`` stays out of a serving agent's memory).

        Raises:
            BundleError: the slot's bytes changed since the install.
        """

        digest = sha256_hex(data)
        if digest != sha256:
            raise BundleError(
                f"{source}: sha256 {digest[:16]}… differs from the {sha256[:16]}… recorded at install; reinstall the bundle"
            )
        members = read_members(data)
        manifest = Manifest.from_json(members["manifest.json"])
        expired = manifest.expires_at <= datetime.now(UTC)
        return cls(manifest, members[manifest.model_file], digest=digest, signer="", expired=expired, threads=threads)

    def prepare(self, features: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(raw row as float32 [features], runtime input tensor)``.

        Raises:
            TensorInputError: wrong size or shape, not numeric, NaN or inf.
        """
        x = features
        if x.__class__ is not np.ndarray or x.dtype != _F32 or (x.shape != self._flat and x.shape != self._row):
            x = self.runner.check(x)
        t = x.reshape(self._shape) * self._a
        t += self._b
        if not math.isfinite(float(t.reshape(-1).dot(self._ones))):
            self.runner.check(x)  # names the bad feature; a finite input only overflowed the sum
        if self._int_in:
            np.rint(t, out=t)
            np.clip(t, self._lo, self._hi, out=t)
            return x.reshape(-1), t.astype(self._in_dtype)
        return x.reshape(-1), t

    def logits(self, raw: np.ndarray) -> np.ndarray:
        """The runtime's raw output as float logits ``[labels]``."""
        q = self._out_q
        if q is not None:
            out: np.ndarray = (raw.reshape(-1).astype(np.float32) - np.float32(q.zero_point)) * np.float32(q.scale)
            return out
        return np.asarray(raw, dtype=np.float32).reshape(-1)

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
            diff = float(np.abs(out - np.asarray(v.expected, dtype=np.float32)).max())
            if diff > st.atol or int(out.argmax()) != v.label:
                raise SelfTestError(
                    f"self-test vector {i} fails on this device: max |output - expected| {diff:.4g} "
                    f"(tolerance {st.atol:.4g}), top-1 {int(out.argmax())} vs expected {v.label}"
                )
        return len(st.vectors)
