"""Inference runtimes behind one small interface.

A :class:`Runtime` runs one model on raw tensors: it takes the input tensor in the model's
own dtype (``int8`` for a TFLite model with int8 I/O, ``float32`` otherwise) and returns the
output tensor as the model writes it. Quantizing features and dequantizing logits is the
caller's business (:class:`ModelRunner`), so the runtimes stay thin and interchangeable:

* ``onnxruntime``  — :class:`OnnxRuntime` (extra ``ort``)
* ``litert``       — :class:`LiteRtRuntime`, the ``ai-edge-litert`` interpreter (extra ``litert``)
* ``tflite-micro`` — :class:`TflmRuntime`, the TFLite Micro interpreter (extra ``tflm``); it
  also reports the tensor arena the model needs, measured by the interpreter's own recording
  allocator.

The host toolchain validates models with these same classes, so what the build measures is
what the device runs.

**Concurrency.** Every runtime here may be called from any number of threads and gives each
caller the answer a sequential call would. An onnxruntime session is documented
thread-safe for ``run``, so it takes no lock. A LiteRT or TFLite Micro interpreter is one
set of tensors: two threads interleaving ``set_tensor``/``invoke``/``get_tensor`` read each
other's outputs (measured before this lock: 22 wrong labels and 788 errors in 2 400 socket
calls), so each adapter serialises its whole call under a lock. A pool of interpreters was
the alternative; measured with 8 threads on the 2-core development machine (``bench/agent.py``,
docs/benchmarks.md) it served the same number of predictions per second as the lock, within
the run-to-run noise, on every target: a model call is a few microseconds, LiteRT already
uses both cores with its own threads and releases the GIL inside ``invoke`` (so the other
callers' Python runs meanwhile), and the Python around each call holds the GIL for as long
as the call itself. One interpreter also keeps memory at one arena, which matters on a
microcontroller-sized target. An uncontended lock costs about 0.1 us per call.

**Sharing.** Many agents in one process (the fleet simulator's devices) can share one runtime
per model: after :func:`share_runtimes`, :func:`open_runtime` returns the runtime already
open for the same runtime name, model bytes (sha256), threads and arena. Sharing is safe for
the reason above (each runtime serves concurrent callers); off by default, because a device
runs one agent.

Each runtime's package is imported when a runtime is opened, never at module import, and a
missing one raises :class:`RuntimeUnavailableError` naming the extra.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from edgeops_agent.errors import ModelLoadError, RuntimeUnavailableError, TensorInputError
from edgeops_core import Manifest, QuantParams, TensorSpec, apply_preprocessing

__all__ = [
    "RUNTIMES",
    "LiteRtRuntime",
    "ModelRunner",
    "OnnxRuntime",
    "Runtime",
    "TensorInfo",
    "TflmRuntime",
    "dequantize",
    "open_runtime",
    "quantize",
]

#: Runtime names a manifest may carry, with the extra that installs each.
RUNTIMES = {"onnxruntime": "ort", "litert": "litert", "tflite-micro": "tflm"}

#: Arena offered to TFLite Micro when the caller does not know the model's need (bytes).
DEFAULT_TFLM_ARENA = 1 << 20
#: Smallest arena handed to TFLite Micro: below a few hundred bytes its allocator crashes
#: the process (seen: 64 and 256 bytes segfault) instead of reporting the shortage.
MIN_TFLM_ARENA = 1024


@dataclass(frozen=True)
class TensorInfo:
    """What a runtime reports about its input or output tensor."""

    dtype: str
    shape: tuple[int, ...]
    quantization: QuantParams | None


class Runtime(Protocol):
    """One loaded model in one runtime."""

    name: str
    input: TensorInfo
    output: TensorInfo

    def invoke(self, x: np.ndarray) -> np.ndarray:
        """Run one inference on a raw input tensor (model dtype and shape); the raw output."""


def quantize(x: np.ndarray, q: QuantParams, dtype: str) -> np.ndarray:
    """Real values to the integer tensor ``q`` describes (round half to even, saturating)."""
    info = np.iinfo(np.dtype(dtype))
    out: np.ndarray = np.clip(np.rint(x / q.scale) + q.zero_point, info.min, info.max).astype(dtype)
    return out


def dequantize(x: np.ndarray, q: QuantParams) -> np.ndarray:
    """Integer tensor to the real values it stands for."""
    return ((x.astype(np.float32) - np.float32(q.zero_point)) * np.float32(q.scale)).astype(np.float32)


def _quant(params: Any) -> QuantParams | None:
    """QuantParams from a TFLite detail dict (``None`` for per-tensor float)."""
    scales = params.get("scales") if isinstance(params, dict) else None
    zeros = params.get("zero_points") if isinstance(params, dict) else None
    if scales is None or len(scales) != 1:
        return None
    return QuantParams(scale=float(scales[0]), zero_point=int(zeros[0]) if zeros is not None and len(zeros) else 0)


def _import(module: str, runtime: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise RuntimeUnavailableError(
            f"runtime {runtime!r} is not installed: pip install 'edgeops[{RUNTIMES[runtime]}]' ({exc})"
        ) from exc


class OnnxRuntime:
    """onnxruntime on the CPU with a fixed intra-op thread count."""

    name = "onnxruntime"

    def __init__(self, model: bytes, threads: int) -> None:
        """Load ``model`` (ONNX bytes) with ``threads`` intra-op threads (``invoke`` is thread-safe).

        Raises:
            RuntimeUnavailableError: onnxruntime is not installed.
            ModelLoadError: onnxruntime rejects the model.
        """
        ort = _import("onnxruntime", self.name)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ModelLoadError(f"onnxruntime cannot load the model: {exc}") from exc
        i, o = self._session.get_inputs()[0], self._session.get_outputs()[0]
        self._input_name = i.name
        self._outputs = [o.name]  # only the output we use
        # InferenceSession.run re-validates the feed on every call (input names, OrtValue
        # ownership, graph-capture options): 1.7 us of a 40 us call on the ECU example. Our
        # feed is built by LoadedModel.prepare, always one float/int array under the one
        # input name, so call the C++ session directly, with the same arguments; the public
        # call stays the fallback should an onnxruntime release rename it.
        inner_run = getattr(getattr(self._session, "_sess", None), "run", None)
        self._run = inner_run if callable(inner_run) else self._session.run
        self.input = TensorInfo(_ort_dtype(i.type), tuple(i.shape), None)
        self.output = TensorInfo(_ort_dtype(o.type), tuple(o.shape), None)

    def invoke(self, x: np.ndarray) -> np.ndarray:
        """Run one inference (onnxruntime sessions are thread-safe: no lock)."""
        out: np.ndarray = self._run(self._outputs, {self._input_name: x}, None)[0]
        return out


#: The square of float32's largest value: a float64 row whose dot product with itself is at most
#: this has no value beyond float32 (numpy's ``vdot``, unlike ``dot``, warns of no overflow).
_F32_MAX_SQ = float(np.finfo(np.float32).max) ** 2
_vdot = getattr(np.vdot, "_implementation", np.vdot)


def to_float32(x: np.ndarray, *, copy: bool = True) -> np.ndarray:
    """``x`` as float32 (``copy=False``: not copied if it is), without numpy's overflow warning for
    a value beyond float32's range: that becomes inf, which the caller refuses naming the value
    (:func:`refused_value`)."""
    if x.dtype.kind == "f" and x.dtype.itemsize > 4 and not float(_vdot(x, x)) <= _F32_MAX_SQ:
        with np.errstate(over="ignore"):
            return x.astype(np.float32)
    return x.astype(np.float32, copy=copy)


def refused_value(value: Any) -> str:
    """Why an input value is refused, from the value the caller sent."""
    v = float(value)
    if np.isfinite(v):
        return f"{v:g}, beyond float32's range (about 3.4e38); not accepted"
    return f"{v}; NaN and inf are not accepted"


def _ort_dtype(type_name: str) -> str:
    return {"tensor(float)": "float32", "tensor(int8)": "int8", "tensor(uint8)": "uint8"}.get(type_name, type_name)


class LiteRtRuntime:
    """The LiteRT interpreter (``ai-edge-litert``, XNNPACK on the CPU)."""

    name = "litert"

    def __init__(self, model: bytes, threads: int) -> None:
        """Load ``model`` (TFLite flatbuffer bytes) with ``threads`` threads.

        Raises:
            RuntimeUnavailableError: ai-edge-litert is not installed.
            ModelLoadError: the interpreter rejects the model.
        """
        interpreter = _import("ai_edge_litert.interpreter", self.name)
        self._model = model  # the interpreter may read the flatbuffer in place
        try:
            self._it = interpreter.Interpreter(model_content=model, num_threads=threads)
            self._it.allocate_tensors()
        except Exception as exc:  # the interpreter raises ValueError, RuntimeError and parser errors
            raise ModelLoadError(f"LiteRT cannot load the model: {exc}") from exc
        i, o = self._it.get_input_details()[0], self._it.get_output_details()[0]
        self._in, self._out = i["index"], o["index"]
        self.input = TensorInfo(
            np.dtype(i["dtype"]).name, tuple(int(d) for d in i["shape"]), _quant(i["quantization_parameters"])
        )
        self.output = TensorInfo(
            np.dtype(o["dtype"]).name, tuple(int(d) for d in o["shape"]), _quant(o["quantization_parameters"])
        )
        self._lock = threading.Lock()
        # The documented methods wrap the C++ wrapper's SetTensor/Invoke/GetTensor with
        # nothing but a check that no numpy view into the interpreter's buffers is alive;
        # this adapter never makes such views (GetTensor returns a copy), so it calls the
        # wrapper directly, saving about 1 us per call on a 4 us model. The public methods
        # stay the fallback should a release rename the wrapper.
        raw = getattr(self._it, "_interpreter", None)
        if raw is not None and all(hasattr(raw, n) for n in ("SetTensor", "Invoke", "GetTensor")):
            self._set, self._invoke, self._get = raw.SetTensor, raw.Invoke, raw.GetTensor
        else:  # pragma: no cover - depends on the installed ai-edge-litert
            self._set, self._invoke, self._get = self._it.set_tensor, self._it.invoke, self._it.get_tensor

    def invoke(self, x: np.ndarray) -> np.ndarray:
        """Run one inference (thread-safe: one caller at a time uses the interpreter's tensors)."""
        with self._lock:
            self._set(self._in, x)
            self._invoke()
            out: np.ndarray = self._get(self._out)  # a copy, not a view: safe after the lock
        return out


_ARENA_RE = re.compile(rb"Arena allocation total (\d+) bytes")


class TflmRuntime:
    """The TensorFlow Lite Micro interpreter (the reference kernels, as on a microcontroller).

    Attributes:
        arena_bytes: the tensor arena the model uses, as TFLite Micro's recording allocator
            measured it after the first allocation (``print_allocations()``).
    """

    name = "tflite-micro"

    def __init__(self, model: bytes, threads: int = 1, *, arena_size: int = DEFAULT_TFLM_ARENA) -> None:
        """Load ``model`` into an arena of ``arena_size`` bytes (``threads`` is ignored: MCUs have one core).

        Raises:
            RuntimeUnavailableError: tflite-micro is not installed.
            ModelLoadError: the interpreter rejects the model or the arena is too small.
        """
        if arena_size < MIN_TFLM_ARENA:
            raise ModelLoadError(f"TFLite Micro arena of {arena_size} bytes is below the minimum of {MIN_TFLM_ARENA} bytes")
        runtime = _import("tflite_micro.python.tflite_micro.runtime", self.name)
        # The interpreter reads the flatbuffer in place without owning it (as on an MCU,
        # where the model sits in flash): keep the bytes alive as long as the interpreter.
        self._model = model
        try:
            with _captured_stdout():  # the interpreter logs its errors on C stdout
                self._it = runtime.Interpreter.from_bytes(model, arena_size=arena_size)
        except Exception as exc:  # RuntimeError from C++, struct.error from its flatbuffer parser
            raise ModelLoadError(f"TFLite Micro cannot load the model (arena {arena_size} bytes): {exc}") from exc
        i, o = self._it.get_input_details(0), self._it.get_output_details(0)
        self.input = TensorInfo(
            np.dtype(i["dtype"]).name, tuple(int(d) for d in i["shape"]), _quant(i["quantization_parameters"])
        )
        self.output = TensorInfo(
            np.dtype(o["dtype"]).name, tuple(int(d) for d in o["shape"]), _quant(o["quantization_parameters"])
        )
        self._lock = threading.Lock()
        self.arena_bytes = self._measure_arena()

    def _measure_arena(self) -> int:
        # The recording allocator knows the arena's use once tensors are allocated, which
        # the first invoke does; it prints the figures at C level, so read them from fd 1.
        self.invoke(np.zeros(self.input.shape, dtype=self.input.dtype))
        with _captured_stdout() as out:
            self._it.print_allocations()
        match = _ARENA_RE.search(out.getvalue())
        if match is None:
            raise ModelLoadError("TFLite Micro did not report its arena allocation")
        return int(match.group(1))

    def invoke(self, x: np.ndarray) -> np.ndarray:
        """Run one inference (thread-safe: one caller at a time uses the interpreter's arena)."""
        with self._lock:
            try:
                self._it.set_input(x, 0)
                self._it.invoke()
            except (ValueError, RuntimeError) as exc:
                raise ModelLoadError(f"TFLite Micro failed to run the model: {exc}") from exc
            return np.array(self._it.get_output(0))


class _Captured:
    def __init__(self) -> None:
        self.data = b""

    def getvalue(self) -> bytes:
        return self.data


@contextlib.contextmanager
def _captured_stdout() -> Iterator[_Captured]:
    """Capture what C code writes to file descriptors 1 and 2 (TFLite Micro's log goes to either)."""
    libc = ctypes.CDLL(None)
    captured = _Captured()
    with tempfile.TemporaryFile() as tmp:
        libc.fflush(None)
        saved = [os.dup(1), os.dup(2)]
        os.dup2(tmp.fileno(), 1)
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            libc.fflush(None)
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            tmp.seek(0)
            captured.data = tmp.read()


_shared: dict[tuple[str, str, int, int | None], Runtime] | None = None
_shared_lock = threading.Lock()


def share_runtimes(enabled: bool = True) -> None:
    """Make :func:`open_runtime` hand out one runtime per (runtime, model, threads, arena) in this process."""
    global _shared
    with _shared_lock:
        _shared = {} if enabled else None


def open_runtime(runtime: str, model: bytes, threads: int, *, arena_size: int | None = None) -> Runtime:
    """Load ``model`` into the named runtime (or return the shared one: :func:`share_runtimes`).

    Args:
        runtime: ``onnxruntime``, ``litert`` or ``tflite-micro``.
        threads: intra-op threads (ignored by TFLite Micro).
        arena_size: TFLite Micro's tensor arena in bytes (default 1 MiB).

    Raises:
        RuntimeUnavailableError: unknown runtime, or its package is not installed.
        ModelLoadError: the runtime rejects the model.
    """
    if _shared is None:
        return _open(runtime, model, threads, arena_size)
    from edgeops_core.digest import sha256_hex

    key = (runtime, sha256_hex(model), threads, arena_size)
    with _shared_lock:
        shared = _shared.get(key)
        if shared is None:
            shared = _shared[key] = _open(runtime, model, threads, arena_size)
        return shared


def _open(runtime: str, model: bytes, threads: int, arena_size: int | None) -> Runtime:
    if runtime == "onnxruntime":
        return OnnxRuntime(model, threads)
    if runtime == "litert":
        return LiteRtRuntime(model, threads)
    if runtime == "tflite-micro":
        return TflmRuntime(model, threads, arena_size=arena_size or DEFAULT_TFLM_ARENA)
    raise RuntimeUnavailableError(f"unknown runtime {runtime!r}; this agent runs {', '.join(RUNTIMES)}")


class ModelRunner:
    """Features in, logits out: preprocessing, input quantization, the runtime, dequantization.

    The manifest's tensor specs decide the conversions: a spec of dtype ``int8``/``uint8``
    with quantization parameters is quantized on the way in and dequantized on the way out;
    a ``float32`` spec is passed through. The input is one sample: ``sample_shape`` or
    ``[1, *sample_shape]`` (a flat vector: ``[features]`` or ``[1, features]``).
    """

    def __init__(self, runtime: Runtime, inputs: TensorSpec, outputs: TensorSpec, manifest: Manifest | None = None) -> None:
        """Wrap ``runtime`` with the conversions ``inputs``/``outputs`` describe.

        ``manifest`` supplies the preprocessing for :meth:`predict`; without it only
        :meth:`predict_preprocessed` is available.
        """
        self.runtime = runtime
        self._in, self._out = inputs, outputs
        self._manifest = manifest
        #: Values in one sample (``prod(sample_shape)``).
        self.n_features = int(np.prod(inputs.shape))
        #: The input's shape without its batch axis.
        self.sample_shape: tuple[int, ...] = tuple(inputs.shape[1:]) if len(inputs.shape) > 1 else (self.n_features,)
        self._flat = len(self.sample_shape) == 1

    @classmethod
    def from_manifest(
        cls, manifest: Manifest, model: bytes, *, threads: int | None = None, arena_size: int | None = None
    ) -> ModelRunner:
        """Open the manifest's runtime on ``model`` with the manifest's tensor specs."""
        runtime = open_runtime(manifest.runtime, model, threads or 1, arena_size=arena_size)
        return cls(runtime, manifest.inputs[0], manifest.outputs[0], manifest)

    def expected_shapes(self) -> str:
        """The shapes an input may have, for error messages (``[1, 8, 8] or [1, 1, 8, 8]``)."""
        return f"{list(self.sample_shape)} or {[1, *self.sample_shape]}"

    def check(self, x: Any) -> np.ndarray:
        """``x`` as a float32 ``[1, values]`` row (the sample flattened row-major), or :class:`TensorInputError`.

        A flat model takes ``[features]`` or ``[1, features]``; an N-d one ``sample_shape`` or
        ``[1, *sample_shape]``. Nested lists are read like numpy reads them.
        """
        try:
            arr = np.asarray(x)
        except (ValueError, TypeError) as exc:  # ragged nested lists, objects numpy cannot read
            raise TensorInputError(f"input must be a numeric array of shape {self.expected_shapes()}: {str(exc)[:200]}") from None
        if arr.dtype.kind not in "fiu":
            raise TensorInputError(f"input must be numeric, got dtype {arr.dtype}")
        if self._flat:
            if arr.size != self.n_features or arr.ndim > 2 or (arr.ndim == 2 and arr.shape[0] != 1):
                raise TensorInputError(
                    f"input must have {self.n_features} features ([1, {self.n_features}]), got shape {list(arr.shape)}"
                )
        elif arr.shape != self.sample_shape and arr.shape != (1, *self.sample_shape):
            raise TensorInputError(f"input must have shape {self.expected_shapes()}, got {list(arr.shape)}")
        arr, orig = to_float32(arr).reshape(1, self.n_features), arr
        if not np.isfinite(arr).all():
            bad = int(np.flatnonzero(~np.isfinite(arr[0]))[0])
            raise TensorInputError(f"input {self.where(bad)} is {refused_value(orig.reshape(-1)[bad])}")
        return arr

    def where(self, flat_index: int) -> str:
        """Name one value of a sample by its row-major index: ``feature 3`` (flat) or ``value at [0, 2, 5]``."""
        if self._flat:
            return f"feature {flat_index}"
        return f"value at {[int(i) for i in np.unravel_index(flat_index, self.sample_shape)]}"

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Logits ``[outputs]`` for one raw sample (preprocessing applied).

        Raises:
            TensorInputError: wrong shape, non-numeric, NaN or inf.
        """
        if self._manifest is None:
            raise TensorInputError("this runner has no manifest, so no preprocessing; use predict_preprocessed")
        x = self.check(features).reshape(1, *self.sample_shape)
        return self.predict_preprocessed(apply_preprocessing(self._manifest.preprocessing, x, len(self.sample_shape)))

    def predict_preprocessed(self, x: np.ndarray) -> np.ndarray:
        """Logits ``[outputs]`` for one already preprocessed sample (any shape of the input's size)."""
        return self.dequantize_output(self.invoke_raw(self.quantize_input(x)))

    def quantize_input(self, x: np.ndarray) -> np.ndarray:
        """The preprocessed sample as the runtime's input tensor."""
        x = np.asarray(x, dtype=np.float32).reshape(self.runtime.input.shape)
        if self._in.dtype != "float32" and self._in.quantization is not None:
            return quantize(x, self._in.quantization, self._in.dtype)
        return x

    def invoke_raw(self, x: np.ndarray) -> np.ndarray:
        """The runtime's raw output for a raw input tensor."""
        return self.runtime.invoke(x)

    def dequantize_output(self, raw: np.ndarray) -> np.ndarray:
        """Raw output tensor to float logits ``[outputs]``."""
        if self._out.dtype != "float32" and self._out.quantization is not None:
            return dequantize(raw, self._out.quantization).reshape(-1)
        return np.asarray(raw, dtype=np.float32).reshape(-1)
