"""``edgeops export --format c``: a verified TFLite Micro bundle as C/C++ source for firmware.

A wearable's firmware has no Python and no bundle reader: it links TensorFlow Lite Micro and
compiles the model in. This module turns a bundle into the files such firmware needs:

=====================  ============  ======================================================
file                   TFLM headers  contents
=====================  ============  ======================================================
model_data.h / .cc     no            the flatbuffer as ``alignas(16) const unsigned char``,
                                     its length, its sha256 (hex string and 32 bytes)
model_config.h         no            arena bytes, input/output shapes, types and int8
                                     quantization, preprocessing, labels, operator list;
                                     the task of a regression or anomaly model (the
                                     anomaly threshold as the float the device compares)
self_test_data.h / .cc no            the manifest's self-test vectors: raw, as the device
                                     feeds them (preprocessed, quantized), expected outputs
model_ops.h / .cc      yes           ``edgeops_register_ops``: fills a
                                     ``tflite::MicroMutableOpResolver<N>`` with exactly the
                                     model's N operators
self_test.h / .cc      yes           ``edgeops_self_test``: runs the vectors through a
                                     ``tflite::MicroInterpreter``, returns how many failed
README.md              -             the TFLite Micro version the bundle was validated with,
                                     and how to link
=====================  ============  ======================================================

Invariants:

* Nothing is written unless the bundle verifies with the same code as ``edgeops verify``
  (signature, digests, member set, manifest, expiry) and is a TFLite Micro bundle.
* Files marked "no" compile as C11 and as C++11 with nothing but the compiler's own headers;
  the others include TFLite Micro's headers, say so in their first lines, and are never
  given stand-in headers.
* The resolver gets exactly the operators the flatbuffer's operator codes list (the same
  reading the build's operator-set budget uses), each through the method TFLite Micro's
  ``micro_mutable_op_resolver.h`` defines for it; an operator without one is an error that
  names it, never a guess.
* ``edgeops_self_test`` judges a vector as the agent's ``Model.self_test`` does: every output
  within ``atol``, then by task the top-1 class (classification), nothing more (regression),
  or the verdict ``score > EDGEOPS_ANOMALY_THRESHOLD`` when the expected score is more than
  ``atol`` from the threshold (anomaly). A classifier's files are what they were before tasks.
* The self-test inputs are computed with the agent's own preprocessing and quantization
  (:func:`edgeops_core.apply_preprocessing`, :func:`edgeops_agent.runtime.quantize`), so the
  device feeds the exact tensors the build's self-test ran.
* The output folder appears complete or not at all: a new one is written and fsynced in a
  hidden folder beside it, which is then renamed into place; into an existing empty one
  (a mount point, the working directory) the files are staged in a hidden folder inside it
  and renamed in one by one, ``README.md`` last: a folder without ``README.md`` is not a
  complete export. Same bundle, same bytes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import math
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeops_core import InputError, KeyFileError, Manifest, TrustedKey, apply_preprocessing, verify_bundle_file
from edgeops_toolchain import __version__
from edgeops_toolchain.errors import BuildError, ExportError, FirmwareExportError
from edgeops_toolchain.signing import edgeops_home

__all__ = [
    "FILES",
    "OPERATOR_METHODS",
    "TFLM_FILES",
    "ExportResult",
    "GeneratedFile",
    "default_trusted_keys",
    "export_c",
    "render_c_sources",
    "resolver_methods",
    "self_test_tensors",
]

#: TFLite builtin operator → the ``tflite::MicroMutableOpResolver`` method that registers it,
#: as ``tensorflow/lite/micro/micro_mutable_op_resolver.h`` names them. Every entry has a
#: ``Register_<OP>`` kernel in the tflite-micro build the toolchain validates with
#: (``tests/test_export_c.py`` checks both against the installed TFLite Micro and schema).
OPERATOR_METHODS: Mapping[str, str] = {
    "ABS": "AddAbs",
    "ADD": "AddAdd",
    "ADD_N": "AddAddN",
    "ARG_MAX": "AddArgMax",
    "ARG_MIN": "AddArgMin",
    "ASSIGN_VARIABLE": "AddAssignVariable",
    "AVERAGE_POOL_2D": "AddAveragePool2D",
    "BATCH_MATMUL": "AddBatchMatMul",
    "BATCH_TO_SPACE_ND": "AddBatchToSpaceNd",
    "BROADCAST_ARGS": "AddBroadcastArgs",
    "BROADCAST_TO": "AddBroadcastTo",
    "CALL_ONCE": "AddCallOnce",
    "CAST": "AddCast",
    "CEIL": "AddCeil",
    "CONCATENATION": "AddConcatenation",
    "CONV_2D": "AddConv2D",
    "COS": "AddCos",
    "CUMSUM": "AddCumSum",
    "DEPTH_TO_SPACE": "AddDepthToSpace",
    "DEPTHWISE_CONV_2D": "AddDepthwiseConv2D",
    "DEQUANTIZE": "AddDequantize",
    "DIV": "AddDiv",
    "DYNAMIC_UPDATE_SLICE": "AddDynamicUpdateSlice",
    "ELU": "AddElu",
    "EMBEDDING_LOOKUP": "AddEmbeddingLookup",
    "EQUAL": "AddEqual",
    "EXP": "AddExp",
    "EXPAND_DIMS": "AddExpandDims",
    "FILL": "AddFill",
    "FLOOR": "AddFloor",
    "FLOOR_DIV": "AddFloorDiv",
    "FLOOR_MOD": "AddFloorMod",
    "FULLY_CONNECTED": "AddFullyConnected",
    "GATHER": "AddGather",
    "GATHER_ND": "AddGatherNd",
    "GREATER": "AddGreater",
    "GREATER_EQUAL": "AddGreaterEqual",
    "HARD_SWISH": "AddHardSwish",
    "IF": "AddIf",
    "L2_NORMALIZATION": "AddL2Normalization",
    "L2_POOL_2D": "AddL2Pool2D",
    "LEAKY_RELU": "AddLeakyRelu",
    "LESS": "AddLess",
    "LESS_EQUAL": "AddLessEqual",
    "LOG": "AddLog",
    "LOGICAL_AND": "AddLogicalAnd",
    "LOGICAL_NOT": "AddLogicalNot",
    "LOGICAL_OR": "AddLogicalOr",
    "LOGISTIC": "AddLogistic",
    "LOG_SOFTMAX": "AddLogSoftmax",
    "MAXIMUM": "AddMaximum",
    "MAX_POOL_2D": "AddMaxPool2D",
    "MEAN": "AddMean",
    "MINIMUM": "AddMinimum",
    "MIRROR_PAD": "AddMirrorPad",
    "MUL": "AddMul",
    "NEG": "AddNeg",
    "NOT_EQUAL": "AddNotEqual",
    "PACK": "AddPack",
    "PAD": "AddPad",
    "PADV2": "AddPadV2",
    "PRELU": "AddPrelu",
    "QUANTIZE": "AddQuantize",
    "READ_VARIABLE": "AddReadVariable",
    "REDUCE_ALL": "AddReduceAll",
    "REDUCE_MAX": "AddReduceMax",
    "REDUCE_MIN": "AddReduceMin",
    "RELU": "AddRelu",
    "RELU6": "AddRelu6",
    "RESHAPE": "AddReshape",
    "RESIZE_BILINEAR": "AddResizeBilinear",
    "RESIZE_NEAREST_NEIGHBOR": "AddResizeNearestNeighbor",
    "REVERSE_V2": "AddReverseV2",
    "ROUND": "AddRound",
    "RSQRT": "AddRsqrt",
    "SELECT_V2": "AddSelectV2",
    "SHAPE": "AddShape",
    "SIN": "AddSin",
    "SLICE": "AddSlice",
    "SOFTMAX": "AddSoftmax",
    "SPACE_TO_BATCH_ND": "AddSpaceToBatchNd",
    "SPACE_TO_DEPTH": "AddSpaceToDepth",
    "SPLIT": "AddSplit",
    "SPLIT_V": "AddSplitV",
    "SQRT": "AddSqrt",
    "SQUARE": "AddSquare",
    "SQUARED_DIFFERENCE": "AddSquaredDifference",
    "SQUEEZE": "AddSqueeze",
    "STRIDED_SLICE": "AddStridedSlice",
    "SUB": "AddSub",
    "SUM": "AddSum",
    "SVDF": "AddSvdf",
    "TANH": "AddTanh",
    "TRANSPOSE": "AddTranspose",
    "TRANSPOSE_CONV": "AddTransposeConv",
    "UNIDIRECTIONAL_SEQUENCE_LSTM": "AddUnidirectionalSequenceLSTM",
    "UNPACK": "AddUnpack",
    "VAR_HANDLE": "AddVarHandle",
    "WHILE": "AddWhile",
    "ZEROS_LIKE": "AddZerosLike",
}

#: Every file an export writes, in the order it writes them.
FILES = (
    "model_data.h",
    "model_data.cc",
    "model_config.h",
    "self_test_data.h",
    "self_test_data.cc",
    "model_ops.h",
    "model_ops.cc",
    "self_test.h",
    "self_test.cc",
    "README.md",
)
#: The files that include TensorFlow Lite Micro's headers (all others compile on their own).
TFLM_FILES = frozenset({"model_ops.h", "model_ops.cc", "self_test.h", "self_test.cc"})

#: The C element type of each tensor dtype the export supports.
_C_TYPES = {"int8": "int8_t", "uint8": "uint8_t", "float32": "float"}
#: The ``TfLiteTensor::data`` union member and ``TfLiteType`` of each.
_TFLM_TYPES = {"int8": ("int8", "kTfLiteInt8"), "uint8": ("uint8", "kTfLiteUInt8"), "float32": ("f", "kTfLiteFloat32")}
#: Where ``build`` keeps the per-user development key (see :func:`edgeops_toolchain.signing.dev_key`).
_DEV_PUBLIC_KEY = Path("keys") / "dev-signing.pub.pem"
_BYTES_PER_LINE = 12
_VALUES_PER_LINE = 8


@dataclass(frozen=True)
class GeneratedFile:
    """One file of an export.

    Attributes:
        name: file name inside the output folder.
        needs_tflm: whether it includes TensorFlow Lite Micro's headers.
        data: its bytes.
    """

    name: str
    needs_tflm: bool
    data: bytes


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_c` wrote.

    Attributes:
        out: the output folder.
        manifest: the verified bundle's manifest.
        signer: fingerprint of the trusted key that signed the bundle.
        model_sha256: the signed sha256 of the model member, as ``model_data`` holds it.
        model_bytes: length of the model.
        operators: the model's operators, in resolver order.
        files: the files written.
    """

    out: Path
    manifest: Manifest
    signer: str
    model_sha256: str
    model_bytes: int
    operators: tuple[str, ...]
    files: tuple[GeneratedFile, ...]


def default_trusted_keys(keys: Sequence[Path]) -> tuple[list[TrustedKey], bool]:
    """The keys to verify with: ``keys``, else the per-user development key that ``build`` signs with.

    Returns:
        ``(trusted keys, whether the development key was used)``.

    Raises:
        KeyFileError: a key file is unusable, or no key was given and there is no development key.
    """
    from edgeops_core import load_public_key

    if keys:
        return [load_public_key(k) for k in keys], False
    dev = edgeops_home() / _DEV_PUBLIC_KEY
    if not dev.is_file():
        raise KeyFileError(
            f"no --key given and no development key at {dev}; pass the public key the bundle was signed with (--key PUBLIC.pem)"
        )
    return [load_public_key(dev)], True


def resolver_methods(operators: Iterable[str]) -> list[tuple[str, str]]:
    """``(operator, resolver method)`` for each operator, sorted by operator name (see :data:`OPERATOR_METHODS`).

    Raises:
        FirmwareExportError: an operator has no ``MicroMutableOpResolver`` method (custom
            operators and builtins TFLite Micro lacks); the message names every such one.
    """
    ops = sorted(set(operators))
    unknown = [op for op in ops if op not in OPERATOR_METHODS]
    if unknown:
        names = ", ".join(unknown)
        raise FirmwareExportError(
            f"the model uses operator(s) {names} with no TFLite Micro MicroMutableOpResolver method; "
            "the firmware could not register them (custom operators need your own AddCustom registration)"
        )
    return [(op, OPERATOR_METHODS[op]) for op in ops]


def export_c(bundle: Path, out: Path, trusted: Sequence[TrustedKey], *, force: bool = False) -> ExportResult:
    """Verify ``bundle`` and write its firmware source files into the folder ``out``.

    Args:
        bundle: a ``.edgeops`` bundle of a TFLite Micro target.
        out: the folder to create; it may exist if it is empty.
        trusted: public keys the bundle must be signed with.
        force: replace ``out`` when it holds a previous export (only files an export writes).

    Raises:
        InputError: the bundle file does not exist.
        BundleError: the bundle does not verify (the same failures as ``edgeops verify``).
        FirmwareExportError: not a TFLite Micro bundle, a tensor or operator the export cannot
            express, or ``out`` is not usable (not empty, not a folder, a link).
        BuildError: the files cannot be written.
    """
    out = Path(os.path.abspath(out))
    _check_out(out, force=force)  # before the work, so a wrong folder fails fast
    if not bundle.exists() and not bundle.is_symlink():
        raise InputError(f"{bundle}: no such bundle file")  # the caller's typo (2), not a rejected bundle (4)
    verified = verify_bundle_file(bundle, trusted)
    manifest = verified.manifest
    if manifest.runtime != "tflite-micro":
        raise FirmwareExportError(
            f"{bundle.name}: runtime is {manifest.runtime!r} (target {manifest.target!r}); --format c exports "
            "TFLite Micro bundles only (runtime 'tflite-micro', e.g. a --target wearable build)"
        )
    model = verified.read_model()
    files = render_c_sources(manifest, model, source=bundle.name, signer=verified.signer)
    _publish(out, files, force=force)
    from edgeops_toolchain.tflite_export import tflite_ops

    return ExportResult(
        out=out,
        manifest=manifest,
        signer=verified.signer,
        model_sha256=verified.model_sha256,
        model_bytes=len(model),
        operators=tuple(sorted(tflite_ops(model))),  # render_c_sources has mapped each one
        files=tuple(files),
    )


# -- rendering ---------------------------------------------------------------------------------


def render_c_sources(manifest: Manifest, model: bytes, *, source: str, signer: str = "") -> list[GeneratedFile]:
    """The export's files for a TFLite Micro ``manifest`` and its ``model`` bytes (in :data:`FILES` order).

    Args:
        source: the bundle's file name, quoted in the files' headers.
        signer: the fingerprint of the key that signed it (README only).

    Raises:
        FirmwareExportError: the model is not a TFLite flatbuffer, disagrees with the
            manifest, or uses a tensor type or operator the export cannot express.
        BuildError: ai-edge-litert (the TFLite schema) is not installed.
    """
    from edgeops_toolchain.tflite_export import tflite_io, tflite_ops

    try:
        ops = tflite_ops(model)
        (in_dtype, in_q), (out_dtype, out_q) = tflite_io(model)
    except ImportError as exc:  # the flatbuffer schema comes with ai-edge-litert
        raise BuildError(f"reading the TFLite model needs ai-edge-litert: pip install 'edgeops[litert]' ({exc})") from exc
    except ExportError as exc:
        raise FirmwareExportError(f"{source}: the model member cannot be read as TFLite: {exc}") from exc
    spec_in, spec_out = manifest.inputs[0], manifest.outputs[0]
    for what, spec, dtype, q in (("input", spec_in, in_dtype, in_q), ("output", spec_out, out_dtype, out_q)):
        if spec.dtype not in _C_TYPES:
            raise FirmwareExportError(f"{source}: {what} tensor type {spec.dtype} is not supported (int8, uint8 or float32)")
        if spec.dtype != dtype:
            raise FirmwareExportError(f"{source}: the manifest's {what} type {spec.dtype} differs from the model's {dtype}")
        if spec.dtype != "float32" and (spec.quantization is None or q is None):
            raise FirmwareExportError(f"{source}: the {spec.dtype} {what} tensor has no quantization parameters")
        if (
            q is not None
            and spec.quantization is not None
            and (not math.isclose(q.scale, spec.quantization.scale, rel_tol=1e-6) or q.zero_point != spec.quantization.zero_point)
        ):
            raise FirmwareExportError(f"{source}: the manifest's {what} quantization differs from the model's")
    arena = manifest.metrics.get("arena_bytes")
    if arena is None or arena <= 0 or arena != int(arena):
        raise FirmwareExportError(f"{source}: the manifest has no measured arena_bytes metric (got {arena!r})")
    _check_task(manifest, source)
    ctx = _Context(manifest, model, source, signer, resolver_methods(ops), int(arena))
    texts = {
        "model_data.h": ctx.model_data_h(),
        "model_data.cc": ctx.model_data_cc(),
        "model_config.h": ctx.model_config_h(),
        "self_test_data.h": ctx.self_test_data_h(),
        "self_test_data.cc": ctx.self_test_data_cc(),
        "model_ops.h": ctx.model_ops_h(),
        "model_ops.cc": ctx.model_ops_cc(),
        "self_test.h": ctx.self_test_h(),
        "self_test.cc": ctx.self_test_cc(),
        "README.md": ctx.readme(),
    }
    return [GeneratedFile(name, name in TFLM_FILES, texts[name].encode("utf-8")) for name in FILES]


def self_test_tensors(manifest: Manifest) -> np.ndarray:
    """The self-test inputs as the device feeds them: preprocessed, then quantized for an int input.

    The agent's own functions, so these are the tensors its health check runs.
    """
    from edgeops_agent.runtime import quantize

    spec = manifest.inputs[0]
    raw = np.asarray([v.input for v in manifest.self_test.vectors], dtype=np.float32)
    # Each vector is a sample flattened row-major: standardize it per channel in its own shape.
    sample = manifest.sample_shape
    x = apply_preprocessing(manifest.preprocessing, raw.reshape(-1, *sample), len(sample)).reshape(raw.shape)
    if spec.dtype in ("int8", "uint8") and spec.quantization is not None:
        return quantize(x, spec.quantization, spec.dtype)
    return x


def _c_float(value: float) -> str:
    """A float literal that reads back as exactly ``float32(value)``."""
    text = f"{float(np.float32(value)):.9g}"
    if not any(c in text for c in ".e"):
        text += ".0"
    return text + "f"


def _c_double(value: float) -> str:
    """A double literal that reads back as exactly ``value`` (Python's shortest round-trip form)."""
    text = repr(float(value))
    return text if any(c in text for c in ".e") else text + ".0"


def _float_at_most(value: float) -> float:
    """The largest float32 not above ``value``: ``float32(value)`` itself when ``value`` is a float32.

    For every float32 ``s``, ``s > _float_at_most(t)`` (compared in float) is ``s > t``
    (compared in double, as the agent compares an anomaly score with ``task.threshold``).
    """
    f = np.float32(value)
    if float(f) > value:
        f = np.nextafter(f, np.float32(-np.inf), dtype=np.float32)
    return float(f)


def _check_task(manifest: Manifest, source: str) -> None:
    """Refuse a task the generated self-test could not check as the agent does."""
    task = manifest.task
    if task.kind not in ("classification", "regression", "anomaly"):
        raise FirmwareExportError(f"{source}: task.kind {task.kind!r} is not one the export knows")
    if task.kind != "anomaly":
        return
    n_out = int(np.prod(manifest.outputs[0].shape))
    if len(manifest.labels) != 1 or n_out != 1:
        raise FirmwareExportError(f"{source}: an anomaly model has exactly one output, its score (got {n_out} outputs)")
    t = task.threshold
    if t is None or not math.isfinite(t) or abs(t) > float(np.finfo(np.float32).max):
        raise FirmwareExportError(f"{source}: the anomaly model's task.threshold {t!r} is not a finite float32 value")


def _c_string(text: str) -> str:
    """A C string literal for any text: printable ASCII kept, everything else octal-escaped.

    ``?`` is escaped too, so that no trigraph (``??/``…) forms under ``-std=c11``.
    """
    out = []
    for byte in text.encode("utf-8"):
        ch = chr(byte)
        if 0x20 <= byte < 0x7F and ch not in '"\\?':
            out.append(ch)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def _safe(text: str) -> str:
    """``text`` reduced to characters that cannot end or continue a comment."""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text)


def _md(text: object) -> str:
    """``text`` as one Markdown code span: on one line, without backticks, so it cannot add markup."""
    flat = " ".join(str(text).replace("`", "'").split())
    return f"`{flat}`" if flat else "`-`"


def _rows(values: Sequence[str], per_line: int, indent: str = "    ") -> str:
    lines = [indent + ", ".join(values[i : i + per_line]) + "," for i in range(0, len(values), per_line)]
    return "\n".join(lines)


def _brace(values: Sequence[str]) -> str:
    return "{" + ", ".join(values) + "}"


def _tflm_commit(version: str | None) -> str | None:
    """The TFLite Micro source commit in a tflite-micro package version (``0.dev…-g<commit>``)."""
    match = re.search(r"-g([0-9a-f]{7,40})$", version or "")
    return match.group(1) if match else None


class _Context:
    """Everything the templates need, computed once."""

    def __init__(
        self, manifest: Manifest, model: bytes, source: str, signer: str, methods: list[tuple[str, str]], arena: int
    ) -> None:
        self.m = manifest
        self.model = model
        self.sha256 = hashlib.sha256(model).hexdigest()
        self.source = _safe(source)
        self.signer = signer
        self.methods = methods
        self.arena = arena
        self.tflm_version = manifest.lineage.runtime_version
        st = manifest.self_test
        self.raw = np.asarray([v.input for v in st.vectors], dtype=np.float32)
        self.fed = self_test_tensors(manifest)
        self.expected = np.asarray([v.expected for v in st.vectors], dtype=np.float32)
        self.labels = [v.label for v in st.vectors]
        self.task = manifest.task.kind
        #: An anomaly model's threshold as the manifest states it (a double) and as the C float
        #: that decides as the agent does (see :func:`_float_at_most`).
        self.threshold = float(manifest.task.threshold) if manifest.task.threshold is not None else None
        self.threshold_f = _float_at_most(self.threshold) if self.threshold is not None else None

    def banner(self, name: str, what: str, *, c_comment: bool) -> str:
        m = self.m
        needs = (
            "yes: compile it inside a firmware build that has TensorFlow Lite Micro on the include path"
            if name in TFLM_FILES
            else "no (C11 or C++11, nothing but the compiler's own headers)"
        )
        lines = [
            f"{name}: {what}",
            f"Model {_safe(m.name)} {_safe(m.version)} release {m.release}, target {_safe(m.target)}, from bundle {self.source}.",
            f"Generated by `edgeops export --format c` (edgeops {_safe(__version__)}); re-export rather than edit.",
            f"Needs TensorFlow Lite Micro headers: {needs}.",
        ]
        if c_comment:
            return "/*\n" + "".join(f" * {line}\n" for line in lines) + " */\n"
        return "".join(f"// {line}\n" for line in lines)

    # -- C-compatible files ------------------------------------------------------------------

    def model_data_h(self) -> str:
        return (
            self.banner("model_data.h", "the model flatbuffer as a byte array", c_comment=True)
            + f"""#ifndef EDGEOPS_MODEL_DATA_H_
#define EDGEOPS_MODEL_DATA_H_

#ifdef __cplusplus
extern "C" {{
#endif

/* Bytes in edgeops_model_data, as a constant expression (static asserts, buffer sizes). */
#define EDGEOPS_MODEL_DATA_LEN {len(self.model)}u
/* sha256 of the model bytes: the digest the bundle's signature lists for {self.m.model_file}. */
#define EDGEOPS_MODEL_SHA256 "{self.sha256}"

/* The TFLite flatbuffer, 16-byte aligned: TFLite Micro reads it in place (from flash). */
extern const unsigned char edgeops_model_data[EDGEOPS_MODEL_DATA_LEN];
extern const unsigned int edgeops_model_data_len;
/* EDGEOPS_MODEL_SHA256 as a string (64 lowercase hex digits) and as its 32 raw bytes. */
extern const char edgeops_model_sha256[65];
extern const unsigned char edgeops_model_sha256_bytes[32];

#ifdef __cplusplus
}}
#endif

#endif /* EDGEOPS_MODEL_DATA_H_ */
"""
        )

    def model_data_cc(self) -> str:
        data = [f"0x{b:02x}" for b in self.model]
        digest = [f"0x{b:02x}" for b in bytes.fromhex(self.sha256)]
        return (
            self.banner("model_data.cc", "the model bytes (compile it as C with -x c, or as C++)", c_comment=True)
            + f"""#include "model_data.h"

#ifndef __cplusplus
#include <stdalign.h> /* alignas: a keyword in C++11 and C23, a macro in C11 */
#endif

/* Define EDGEOPS_MODEL_DATA_ATTRIBUTE to place the model, e.g.
 * __attribute__((section(".rodata.model"))) for a dedicated flash region. */
#ifndef EDGEOPS_MODEL_DATA_ATTRIBUTE
#define EDGEOPS_MODEL_DATA_ATTRIBUTE
#endif

alignas(16) EDGEOPS_MODEL_DATA_ATTRIBUTE const unsigned char edgeops_model_data[EDGEOPS_MODEL_DATA_LEN] = {{
{_rows(data, _BYTES_PER_LINE)}
}};

const unsigned int edgeops_model_data_len = EDGEOPS_MODEL_DATA_LEN;

const char edgeops_model_sha256[65] = EDGEOPS_MODEL_SHA256;

const unsigned char edgeops_model_sha256_bytes[32] = {{
{_rows(digest, 16)}
}};
"""
        )

    def _tensor_macros(self, prefix: str, index: int) -> str:
        spec = (self.m.inputs if prefix == "INPUT" else self.m.outputs)[index]
        dims = [str(d) for d in spec.shape]
        lines = [
            f"/* {prefix.lower()} tensor {_safe(spec.name)}: {spec.dtype} {list(spec.shape)} */",
            f"#define EDGEOPS_{prefix}_TYPE_{spec.dtype.upper()} 1",
            f"#define EDGEOPS_{prefix}_RANK {len(dims)}",
            f"#define EDGEOPS_{prefix}_DIMS {_brace(dims)}",
            f"#define EDGEOPS_{prefix}_ELEMENTS {int(np.prod(spec.shape))}",
        ]
        if spec.quantization is not None:
            q = spec.quantization
            lines += [
                f"/* real = EDGEOPS_{prefix}_SCALE * (q - EDGEOPS_{prefix}_ZERO_POINT) */",
                f"#define EDGEOPS_{prefix}_SCALE {_c_float(q.scale)}",
                f"#define EDGEOPS_{prefix}_ZERO_POINT ({q.zero_point})",
            ]
        lines.append(f"typedef {_C_TYPES[spec.dtype]} edgeops_{prefix.lower()}_t;")
        return "\n".join(lines)

    def model_config_h(self) -> str:
        m = self.m
        pre = m.preprocessing
        sample = m.sample_shape
        if pre.kind == "standardize" and len(sample) > 1:
            per = int(np.prod(sample[1:]))
            preprocessing = f"""/* Preprocessing before quantization, per channel (the first of the sample's axes {list(sample)}):
 * the input's element i (row-major) belongs to channel c = i / EDGEOPS_PREPROCESSING_CHANNEL_STRIDE, and
 * x'[i] = (x[i] - MEAN[c]) / STD[c] (float32). */
#define EDGEOPS_PREPROCESSING_STANDARDIZE 1
#define EDGEOPS_PREPROCESSING_CHANNELS {sample[0]}
#define EDGEOPS_PREPROCESSING_CHANNEL_STRIDE {per}
#define EDGEOPS_PREPROCESSING_MEAN {_brace([_c_float(v) for v in pre.mean])}
#define EDGEOPS_PREPROCESSING_STD {_brace([_c_float(v) for v in pre.std])}"""
        elif pre.kind == "standardize":
            preprocessing = f"""/* Preprocessing before quantization, per feature: x' = (x - MEAN[i]) / STD[i] (float32). */
#define EDGEOPS_PREPROCESSING_STANDARDIZE 1
#define EDGEOPS_PREPROCESSING_MEAN {_brace([_c_float(v) for v in pre.mean])}
#define EDGEOPS_PREPROCESSING_STD {_brace([_c_float(v) for v in pre.std])}"""
        else:
            preprocessing = """/* Preprocessing: none; the raw feature vector is the model input (before quantization). */
#define EDGEOPS_PREPROCESSING_STANDARDIZE 0"""
        feed = (
            "q = clamp(rint(x' / EDGEOPS_INPUT_SCALE) + EDGEOPS_INPUT_ZERO_POINT), rint rounding half to even"
            if m.inputs[0].quantization is not None and m.inputs[0].dtype != "float32"
            else "the preprocessed float32 values as they are"
        )
        ops = ", ".join(op for op, _ in self.methods)
        return (
            self.banner("model_config.h", "what the firmware needs to know about the model", c_comment=True)
            + f"""#ifndef EDGEOPS_MODEL_CONFIG_H_
#define EDGEOPS_MODEL_CONFIG_H_

#include <stdint.h>

#define EDGEOPS_MODEL_NAME {_c_string(m.name)}
#define EDGEOPS_MODEL_VERSION {_c_string(m.version)}
#define EDGEOPS_MODEL_RELEASE {m.release}
#define EDGEOPS_MODEL_TARGET {_c_string(m.target)}
/* The TFLite Micro the build validated the model with (the bundle's lineage.runtime_version;
 * "" when the bundle does not record it). */
#define EDGEOPS_TFLM_VERSION {_c_string(self.tflm_version or "")}

/* Tensor arena: the smallest arena (16-byte steps) in which TFLite Micro loaded and ran the
 * model on the build host (64-bit, reference kernels). Optimized kernels (CMSIS-NN) may ask
 * for scratch space on top: check on the device (docs/mcu-export.md). */
#define EDGEOPS_ARENA_BYTES {self.arena}u

{self._tensor_macros("INPUT", 0)}

{self._tensor_macros("OUTPUT", 0)}

{preprocessing}
/* Input tensor: {feed}, clamped to the type's range. */

#define EDGEOPS_LABEL_COUNT {len(m.labels)}
#define EDGEOPS_LABELS {_brace([_c_string(label) for label in m.labels])}
{self._task_macros()}
/* The model's operators ({ops}): what edgeops_register_ops (model_ops.cc) registers. */
#define EDGEOPS_OP_COUNT {len(self.methods)}
#define EDGEOPS_OPS {_brace([_c_string(op) for op, _ in self.methods])}

#endif /* EDGEOPS_MODEL_CONFIG_H_ */
"""
        )

    def _task_macros(self) -> str:
        """model_config.h's task defines; none for a classifier (its files are as before tasks existed)."""
        out = self.m.outputs[0]
        quantized = out.quantization is not None and out.dtype != "float32"
        if self.task == "regression":
            value = "EDGEOPS_OUTPUT_SCALE * (q[k] - EDGEOPS_OUTPUT_ZERO_POINT)" if quantized else "the float output k"
            return f"""
/* Task: regression. The outputs are EDGEOPS_LABEL_COUNT numbers, named by EDGEOPS_LABELS (output k is
 * {value}); the answer is the numbers, not a top class.
 * A classifier's export defines no EDGEOPS_TASK_* macro. */
#define EDGEOPS_TASK_REGRESSION 1
"""
        if self.task == "anomaly" and self.threshold is not None and self.threshold_f is not None:  # _check_task
            value = "score = EDGEOPS_OUTPUT_SCALE * (q - EDGEOPS_OUTPUT_ZERO_POINT), a float" if quantized else "a float"
            exact = (
                "is the manifest's task.threshold"
                if self.threshold_f == self.threshold
                else f"is the largest float not above the manifest's\n * task.threshold {_c_double(self.threshold)}"
            )
            fpr = self.m.task.target_fpr
            fitted, fpr_line = "", ""
            if fpr is not None:
                fitted = "\n * The build fitted it on normal data to the false-positive rate EDGEOPS_ANOMALY_TARGET_FPR."
                fpr_line = f"\n#define EDGEOPS_ANOMALY_TARGET_FPR {_c_double(fpr)}"
            return f"""
/* Task: anomaly detection. The one output is the anomaly score, higher is more anomalous
 * ({value}). The input is an anomaly when
 *     score > EDGEOPS_ANOMALY_THRESHOLD    (compared as float: the agent's verdict)
 * EDGEOPS_ANOMALY_THRESHOLD {exact}.{fitted}
 * A classifier's export defines no EDGEOPS_TASK_* macro. */
#define EDGEOPS_TASK_ANOMALY 1
#define EDGEOPS_ANOMALY_THRESHOLD ({_c_float(self.threshold_f)}){fpr_line}
"""
        return ""

    def self_test_data_h(self) -> str:
        st = self.m.self_test
        sample = self.m.sample_shape
        flattened = f" (samples {list(sample)} flattened row-major)" if len(sample) > 1 else ""
        passes, label = {
            "classification": (" and the top-1 output is the expected label.", "the top-1 label index"),
            "regression": (".\n * A regression has no top class to check (its labels are all 0).", "0 (no class)"),
            "anomaly": (
                " and, when the expected score\n * is more than EDGEOPS_SELF_TEST_ATOL from the threshold, "
                "the verdict (score > EDGEOPS_ANOMALY_THRESHOLD)\n * is the expected label (closer, either "
                "verdict is within the tolerance).",
                "the expected verdict (1 anomaly, 0 normal)",
            ),
        }[self.task]
        return (
            self.banner("self_test_data.h", "the manifest's self-test vectors", c_comment=True)
            + f"""#ifndef EDGEOPS_SELF_TEST_DATA_H_
#define EDGEOPS_SELF_TEST_DATA_H_

#include "model_config.h"

#ifdef __cplusplus
extern "C" {{
#endif

#define EDGEOPS_SELF_TEST_COUNT {len(st.vectors)}
/* A vector passes when every |output - expected| <= EDGEOPS_SELF_TEST_ATOL (compared in
 * double, as the agent does){passes} */
#define EDGEOPS_SELF_TEST_ATOL {_c_double(st.atol)}

/* Raw feature vectors{flattened}, before preprocessing, as the manifest lists them (float32). */
extern const float edgeops_self_test_raw[EDGEOPS_SELF_TEST_COUNT][EDGEOPS_INPUT_ELEMENTS];
/* The same vectors as the device feeds them: the input tensor's exact contents. */
extern const edgeops_input_t edgeops_self_test_input[EDGEOPS_SELF_TEST_COUNT][EDGEOPS_INPUT_ELEMENTS];
/* The outputs the build measured (dequantized), and {label}. */
extern const float edgeops_self_test_expected[EDGEOPS_SELF_TEST_COUNT][EDGEOPS_OUTPUT_ELEMENTS];
extern const int edgeops_self_test_label[EDGEOPS_SELF_TEST_COUNT];

#ifdef __cplusplus
}}
#endif

#endif /* EDGEOPS_SELF_TEST_DATA_H_ */
"""
        )

    def self_test_data_cc(self) -> str:
        def block(rows: np.ndarray, fmt: str) -> str:
            out = []
            for row in rows:
                values = [_c_float(v) if fmt == "f" else str(int(v)) for v in row.reshape(-1)]
                out.append("    {\n" + _rows(values, _VALUES_PER_LINE, "        ") + "\n    },")
            return "\n".join(out)

        fed_fmt = "f" if self.m.inputs[0].dtype == "float32" else "d"
        return (
            self.banner("self_test_data.cc", "the self-test vectors (compile it as C with -x c, or as C++)", c_comment=True)
            + f"""#include "self_test_data.h"

const float edgeops_self_test_raw[EDGEOPS_SELF_TEST_COUNT][EDGEOPS_INPUT_ELEMENTS] = {{
{block(self.raw, "f")}
}};

const edgeops_input_t edgeops_self_test_input[EDGEOPS_SELF_TEST_COUNT][EDGEOPS_INPUT_ELEMENTS] = {{
{block(self.fed, fed_fmt)}
}};

const float edgeops_self_test_expected[EDGEOPS_SELF_TEST_COUNT][EDGEOPS_OUTPUT_ELEMENTS] = {{
{block(self.expected, "f")}
}};

const int edgeops_self_test_label[EDGEOPS_SELF_TEST_COUNT] = {{
{_rows([str(label) for label in self.labels], 16)}
}};
"""
        )

    # -- files that need TensorFlow Lite Micro ----------------------------------------------

    def model_ops_h(self) -> str:
        return (
            self.banner("model_ops.h", "the op resolver holding exactly the model's operators", c_comment=False)
            + """#ifndef EDGEOPS_MODEL_OPS_H_
#define EDGEOPS_MODEL_OPS_H_

#include "model_config.h"
#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"

// Room for exactly the model's EDGEOPS_OP_COUNT operators.
using EdgeopsOpResolver = tflite::MicroMutableOpResolver<EDGEOPS_OP_COUNT>;

// Registers the model's operators (EDGEOPS_OPS) in a fresh resolver. kTfLiteError when one
// fails (e.g. called twice on the same resolver).
TfLiteStatus edgeops_register_ops(EdgeopsOpResolver& resolver);

#endif  // EDGEOPS_MODEL_OPS_H_
"""
        )

    def model_ops_cc(self) -> str:
        calls = "\n".join(f"  if (resolver.{method}() != kTfLiteOk) return kTfLiteError;  // {op}" for op, method in self.methods)
        return (
            self.banner("model_ops.cc", "registers the model's operators", c_comment=False)
            + f"""#include "model_ops.h"

TfLiteStatus edgeops_register_ops(EdgeopsOpResolver& resolver) {{
{calls}
  return kTfLiteOk;
}}
"""
        )

    def self_test_h(self) -> str:
        return (
            self.banner("self_test.h", "the on-device self-test", c_comment=False)
            + """#ifndef EDGEOPS_SELF_TEST_H_
#define EDGEOPS_SELF_TEST_H_

#include <stddef.h>
#include <stdint.h>

#include "tensorflow/lite/micro/micro_interpreter.h"

// Runs the EDGEOPS_SELF_TEST_COUNT vectors through `interpreter` (tensors allocated, built
// from edgeops_model_data) and returns how many failed: 0 means the model is healthy. -1 when
// the interpreter's input or output tensor is not the one this model declares.
int edgeops_self_test(tflite::MicroInterpreter& interpreter);

// Loads edgeops_model_data with the model's resolver into `tensor_arena` (16-byte aligned,
// EDGEOPS_ARENA_BYTES at least) and runs edgeops_self_test. -1 when the model does not load:
// schema version, operator registration or tensor allocation (an arena too small).
int edgeops_self_test_run(uint8_t* tensor_arena, size_t tensor_arena_bytes);

#endif  // EDGEOPS_SELF_TEST_H_
"""
        )

    def self_test_cc(self) -> str:
        in_member, in_type = _TFLM_TYPES[self.m.inputs[0].dtype]
        out_member, out_type = _TFLM_TYPES[self.m.outputs[0].dtype]
        if self.m.outputs[0].quantization is not None and self.m.outputs[0].dtype != "float32":
            dequantize = (
                f"(static_cast<float>(output->data.{out_member}[k]) - static_cast<float>(EDGEOPS_OUTPUT_ZERO_POINT)) "
                "* EDGEOPS_OUTPUT_SCALE"
            )
        else:
            dequantize = f"output->data.{out_member}[k]"
        return (
            self.banner("self_test.cc", "runs the manifest's self-test vectors on the device", c_comment=False)
            + f"""#include "self_test.h"

#include <string.h>

#include "model_config.h"
#include "model_data.h"
#include "model_ops.h"
#include "self_test_data.h"
#include "tensorflow/lite/schema/schema_generated.h"

int edgeops_self_test(tflite::MicroInterpreter& interpreter) {{
  TfLiteTensor* input = interpreter.input(0);
  TfLiteTensor* output = interpreter.output(0);
  if (input == nullptr || output == nullptr || input->type != {in_type} || output->type != {out_type} ||
      input->bytes != sizeof(edgeops_self_test_input[0]) ||
      output->bytes != EDGEOPS_OUTPUT_ELEMENTS * sizeof(output->data.{out_member}[0])) {{
    return -1;
  }}
  int failed = 0;
  for (int v = 0; v < EDGEOPS_SELF_TEST_COUNT; ++v) {{
    memcpy(input->data.{in_member}, edgeops_self_test_input[v], sizeof(edgeops_self_test_input[v]));
    if (interpreter.Invoke() != kTfLiteOk) {{
      ++failed;
      continue;
    }}
{self._self_test_check(dequantize)}
  }}
  return failed;
}}

int edgeops_self_test_run(uint8_t* tensor_arena, size_t tensor_arena_bytes) {{
  const tflite::Model* model = tflite::GetModel(edgeops_model_data);
#ifdef TFLITE_SCHEMA_VERSION  // not every TFLite Micro port's headers define it
  if (model->version() != TFLITE_SCHEMA_VERSION) return -1;
#endif
  EdgeopsOpResolver resolver;
  if (edgeops_register_ops(resolver) != kTfLiteOk) return -1;
  tflite::MicroInterpreter interpreter(model, resolver, tensor_arena, tensor_arena_bytes);
  if (interpreter.AllocateTensors() != kTfLiteOk) return -1;
  return edgeops_self_test(interpreter);
}}
"""
        )

    def _self_test_check(self, dequantize: str) -> str:
        """The loop body of ``edgeops_self_test`` that judges vector ``v``: the agent's ``self_test`` per task."""
        per_output = {
            "classification": """
      if (k == 0 || y > best) {  // the first maximum, as numpy's argmax
        best = y;
        top = k;
      }""",
            "regression": "",
            "anomaly": """
      if (k == 0) score = y;""",
        }[self.task]
        before, after = {
            "classification": (
                """
    float best = 0.0f;
    int top = 0;""",
                """
    if (!within || top != edgeops_self_test_label[v]) ++failed;""",
            ),
            "regression": (
                "",
                """
    // A regression's answer is its numbers: there is no top class to compare.
    if (!within) ++failed;""",
            ),
            "anomaly": (
                """
    float score = 0.0f;  // the one output""",
                f"""
    // The verdict (score > EDGEOPS_ANOMALY_THRESHOLD, in float) must be the expected label whenever the
    // expected score is more than EDGEOPS_SELF_TEST_ATOL from the manifest's threshold (compared in
    // double, as the agent does); closer, either verdict is within the tolerance.
    const double threshold = {_c_double(self.threshold or 0.0)};  // the manifest's task.threshold
    const double margin = static_cast<double>(edgeops_self_test_expected[v][0]) - threshold;
    const bool checked = margin > EDGEOPS_SELF_TEST_ATOL || margin < -EDGEOPS_SELF_TEST_ATOL;
    const int verdict = score > EDGEOPS_ANOMALY_THRESHOLD ? 1 : 0;
    if (!within || (checked && verdict != edgeops_self_test_label[v])) ++failed;""",
            ),
        }[self.task]
        return f"""    bool within = true;{before}
    for (int k = 0; k < EDGEOPS_OUTPUT_ELEMENTS; ++k) {{
      const float y = {dequantize};
      const float diff = y > edgeops_self_test_expected[v][k] ? y - edgeops_self_test_expected[v][k]
                                                            : edgeops_self_test_expected[v][k] - y;
      // Written so that a NaN output fails: NaN compares false.
      if (!(static_cast<double>(diff) <= EDGEOPS_SELF_TEST_ATOL)) within = false;{per_output}
    }}{after}"""

    # -- README -----------------------------------------------------------------------------

    def readme(self) -> str:
        m = self.m
        commit = _tflm_commit(self.tflm_version)
        if self.tflm_version is None:
            validated = (
                "**The bundle does not record the TFLite Micro version it was validated with** (it was built by "
                f"edgeops {_md(m.lineage.toolchain_version)}, before bundles recorded it). Rebuild it to have the version here."
            )
        else:
            validated = f"Validated with **TFLite Micro {_md(self.tflm_version)}** (the tflite-micro package the build ran"
            validated += (
                f"; TFLite Micro source commit {_md(commit)}: build your firmware from the same commit"
                " of https://github.com/tensorflow/tflite-micro to run exactly what was validated)."
                if commit
                else ")."
            )
        rows = "\n".join(
            f"| `{name}` | {'**yes**' if name in TFLM_FILES else 'no'} | {desc} |"
            for name, desc in (
                ("model_data.h", "`edgeops_model_data` (alignas(16)), `EDGEOPS_MODEL_DATA_LEN`, `EDGEOPS_MODEL_SHA256`"),
                ("model_data.cc", "the model bytes and their sha256"),
                ("model_config.h", "arena size, tensor shapes/types/quantization, preprocessing, labels, operators"),
                ("self_test_data.h", "self-test vectors: raw, as fed, expected, labels, tolerance"),
                ("self_test_data.cc", "their values"),
                ("model_ops.h", "`EdgeopsOpResolver` = `tflite::MicroMutableOpResolver<EDGEOPS_OP_COUNT>`"),
                ("model_ops.cc", "`edgeops_register_ops()`: exactly the model's operators"),
                ("self_test.h", "`edgeops_self_test()`, `edgeops_self_test_run()`"),
                ("self_test.cc", "runs the vectors through a `tflite::MicroInterpreter`"),
            )
        )
        ops = ", ".join(f"`{op}` ({method})" for op, method in self.methods)
        q_in = m.inputs[0].quantization
        quant = f"scale {q_in.scale:.9g}, zero point {q_in.zero_point}" if q_in is not None else "none (float32)"
        signer = f"\n- Signed by key `sha256:{self.signer}`." if self.signer else ""
        names = ", ".join(_md(label) for label in m.labels)
        if self.task == "regression":
            outputs = f"a regression: one value per output\n  ({names}), `EDGEOPS_TASK_REGRESSION`"
            read = "the output values (one per EDGEOPS_LABELS name)"
        elif self.task == "anomaly":
            threshold = _c_float(self.threshold_f or 0.0)
            outputs = (
                f"an anomaly detector: one output, the anomaly score\n  ({names}); the input is an anomaly when "
                f"score > `EDGEOPS_ANOMALY_THRESHOLD` (`{threshold}`)\n  (`EDGEOPS_TASK_ANOMALY`, model_config.h)"
            )
            read = "the anomaly score (score > EDGEOPS_ANOMALY_THRESHOLD: an anomaly)"
        else:
            outputs = f"one logit per label\n  ({names})"
            read = "one logit per label"
        return f"""# {_md(m.name)} {_md(m.version)} (release {m.release}) for TensorFlow Lite Micro

Generated by `edgeops export --format c` (edgeops {__version__}) from {_md(self.source)}, after
verifying its signature. Re-export rather than edit these files.

{validated}

- Model: {len(self.model)} bytes, sha256 `{self.sha256}` (the digest the bundle's signature lists).{signer}
- Target {_md(m.target)}, bundle created {_md(m.created)}, expires {_md(m.expires)}.
- Tensor arena: `EDGEOPS_ARENA_BYTES` = {self.arena} bytes, measured on the build host with
  the reference kernels; optimized kernels (CMSIS-NN) may need scratch space on top, so
  check with the self-test on the device.
- Input {_md(m.inputs[0].dtype)} {list(m.inputs[0].shape)}, quantization {quant}; preprocessing
  {_md(m.preprocessing.kind)}. Output {_md(m.outputs[0].dtype)} {list(m.outputs[0].shape)}: {outputs}.
- Operators ({len(self.methods)}): {ops}.

| file | needs TFLite Micro headers | contents |
|---|---|---|
{rows}

## Linking

Add the `.cc` files to the firmware build that compiles TensorFlow Lite Micro (its source
tree on the include path). `model_data.*`, `model_config.h` and `self_test_data.*` need
nothing else: a C part of the firmware can use them too (compile the `.cc` files with
`-x c`, C11). The others include TFLite Micro's headers, C++11 or later.

```c++
#include "model_config.h"
#include "model_data.h"
#include "model_ops.h"
#include "self_test.h"

alignas(16) static uint8_t tensor_arena[EDGEOPS_ARENA_BYTES];

// At boot, or after flashing a new model: 0 vectors failed means the model is healthy.
if (edgeops_self_test_run(tensor_arena, sizeof(tensor_arena)) != 0) {{ /* keep the old model */ }}

// Serving.
static EdgeopsOpResolver resolver;
edgeops_register_ops(resolver);
static tflite::MicroInterpreter interpreter(tflite::GetModel(edgeops_model_data), resolver,
                                            tensor_arena, sizeof(tensor_arena));
interpreter.AllocateTensors();
// Fill interpreter.input(0) with the preprocessed, quantized features (model_config.h),
// Invoke(), then read {read} from interpreter.output(0).
```

See docs/mcu-export.md in the edgeops repository for the details.
"""


# -- writing -----------------------------------------------------------------------------------

#: The staging folder's name prefix; a fixed-length name (prefix + 16 hex digits), so any
#: --out name the file system accepts works, and one an interrupted export leaves is known.
_STAGING = ".edgeops-export-"
_STAGING_RE = re.compile(re.escape(_STAGING) + r"[0-9a-f]{16}")


def _check_out(out: Path, *, force: bool) -> None:
    """Refuse an output path that is a link or a file, or a non-empty folder (without ``force``).

    A staging folder an interrupted export left inside ``out`` does not count (it is removed).
    """
    if out.is_symlink():
        raise FirmwareExportError(f"{out} is a symbolic link; give the real folder")
    if not out.exists():
        return
    if not out.is_dir():
        raise FirmwareExportError(f"{out} exists and is not a folder")
    try:
        entries = sorted(name for name in os.listdir(out) if not _STAGING_RE.fullmatch(name))
    except OSError as exc:
        raise FirmwareExportError(f"{out}: cannot list the folder: {exc.strerror or exc}") from exc
    if not entries:
        return
    if not force:
        raise FirmwareExportError(
            f"{out} is not empty; choose a new or empty folder, or pass --force to replace an earlier export"
        )
    foreign = [name for name in entries if name not in FILES or not (out / name).is_file() or (out / name).is_symlink()]
    if foreign:
        listed = ", ".join(foreign[:5]) + (", …" if len(foreign) > 5 else "")
        raise FirmwareExportError(
            f"{out} holds files an export does not write ({listed}); --force replaces only an earlier export, "
            "so nothing was changed"
        )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _stage(staging: Path, out: Path, files: Sequence[GeneratedFile]) -> None:
    """Write ``files`` into the new folder ``staging`` and fsync them and it."""
    try:
        for f in files:
            with open(staging / f.name, "wb") as fh:
                fh.write(f.data)
                fh.flush()
                os.fsync(fh.fileno())
        _fsync_dir(staging)
    except OSError as exc:
        raise BuildError(f"{out}: cannot write the export: {exc.strerror or exc}") from exc


def _publish(out: Path, files: Sequence[GeneratedFile], *, force: bool) -> None:
    """Write ``files`` into ``out`` so that it never holds a partial export without saying so.

    A new ``out`` is staged in a hidden folder beside it and renamed into place whole. An
    existing (empty, or with ``force`` earlier-export) folder is never replaced itself: it
    may be a mount point, the working directory, or have a parent this process cannot
    write. The files are staged in a hidden folder inside it and renamed in one by one,
    ``README.md`` last, as the completion marker (see :func:`_fill`).
    """
    token = secrets.token_hex(8)
    if out.exists() or out.is_symlink():
        _fill(out, files, token, force=force)
        return
    parent = out.parent
    staging = parent / f"{_STAGING}{token}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(staging)
    except OSError as exc:
        raise BuildError(f"{parent}: cannot create the output folder: {exc.strerror or exc}") from exc
    try:
        _stage(staging, out, files)
        try:
            # rename() replaces an empty folder and refuses a non-empty one, atomically: a
            # concurrent export that got there first makes this one fail, not mix files.
            os.rename(staging, out)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise FirmwareExportError(
                    f"{out} is not empty (written by another process meanwhile); this export was dropped"
                ) from exc
            if exc.errno in (errno.EBUSY, errno.ENOTDIR, errno.EISDIR):  # it appeared meanwhile: fill it instead
                _fill(out, files, token, force=force)
                return
            raise BuildError(f"{out}: cannot move the export into place: {exc.strerror or exc}") from exc
        _fsync_dir(parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fill(out: Path, files: Sequence[GeneratedFile], token: str, *, force: bool) -> None:
    """Publish ``files`` into the existing folder ``out``, one rename per file, ``README.md`` last.

    The folder is locked (``flock``) for the whole publication, so concurrent exports into it
    take turns; the checks are made again under the lock. With ``force`` the earlier export's
    files are first moved into the staging folder (``README.md`` first: the folder stops
    claiming to be complete before anything changes), then the new ones renamed in. If that
    fails, everything is moved back (:class:`BuildError`, the earlier export intact). A kill
    in between leaves ``out`` without ``README.md`` and every earlier file either in ``out``
    or in ``out/.edgeops-export-*/old``: never neither. Staging folders an interrupted export
    left are removed by the next export.
    """
    try:
        lock = os.open(out, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        _check_out(out, force=force)  # names a link or a file
        raise BuildError(f"{out}: cannot open the output folder: {exc.strerror or exc}") from exc
    try:
        with contextlib.suppress(OSError):  # a file system without flock: no turn-taking, still no mix of files
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            current = os.stat(out, follow_symlinks=False)
        except OSError:
            current = None
        held = os.fstat(lock)
        if current is None or (current.st_dev, current.st_ino) != (held.st_dev, held.st_ino):
            raise FirmwareExportError(f"{out} was replaced by another process meanwhile; this export was dropped")
        _check_out(out, force=force)  # again: another process may have written there meanwhile
        for name in os.listdir(out):
            if _STAGING_RE.fullmatch(name):  # left by an interrupted export (we hold the lock)
                shutil.rmtree(out / name, ignore_errors=True)
        staging = out / f"{_STAGING}{token}"
        try:
            os.mkdir(staging)
        except OSError as exc:
            raise BuildError(f"{out}: cannot write the export: {exc.strerror or exc}") from exc
        try:
            _stage(staging, out, files)
            _swap_in(out, staging, [f.name for f in files])
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        os.close(lock)


def _swap_in(out: Path, staging: Path, names: Sequence[str]) -> None:
    """Move the earlier export (if any) into ``staging/old`` and the staged files into ``out``."""
    ordered = sorted(names, key=lambda n: n == "README.md")  # README.md last in, first out
    aside = staging / "old"
    moved: list[str] = []  # earlier files moved aside
    placed: list[str] = []  # new files moved in
    try:
        earlier = [n for n in reversed(ordered) if os.path.lexists(out / n)]
        if earlier:
            os.mkdir(aside)
            for name in earlier:
                os.rename(out / name, aside / name)
                moved.append(name)
            _fsync_dir(out)
        for name in ordered:
            os.rename(staging / name, out / name)
            placed.append(name)
        _fsync_dir(out)
    except OSError as exc:
        for name in reversed(placed):
            with contextlib.suppress(OSError):
                os.rename(out / name, staging / name)
        for name in reversed(moved):
            with contextlib.suppress(OSError):
                os.rename(aside / name, out / name)
        with contextlib.suppress(OSError):
            _fsync_dir(out)
        raise BuildError(f"{out}: cannot move the export into place: {exc.strerror or exc}") from exc
