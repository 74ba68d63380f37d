"""ONNX export, int8 quantization and graph inspection for the onnxruntime targets.

* :func:`export_onnx` — ``torch.onnx.export`` (the torch.export-based exporter) to a single
  file (no external data), batch fixed at 1 as a device runs it, input ``[1, *sample_shape]``
  in the data's own layout, checked with ``onnx.checker`` in full mode (shape inference included).
* :func:`quantize_int8` — onnxruntime static quantization: ``quant_pre_process`` then
  ``quantize_static`` in QDQ format, per-channel symmetric int8 weights, int8 activations
  calibrated (MinMax) on training windows. See docs/adr/0003-quantization.md.
* :func:`strip_model` — drops what the runtime never reads (doc strings, node names,
  value_info, metadata, the exporter's stack traces with the builder's absolute paths) and
  renames internal tensors to short names, so the bytes do not depend on the build folder. On a 100 k-parameter
  model the exporter's long tensor names and inferred shapes are several kilobytes.
* :func:`mac_count`, :func:`op_types`, :func:`io_quantization` — what validation reads.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgeops_core import QuantParams
from edgeops_toolchain.errors import ExportError

if TYPE_CHECKING:
    import onnx
    from torch import nn

__all__ = ["export_onnx", "io_quantization", "mac_count", "op_types", "quantize_int8", "strip_model"]

INPUT_NAME = "features"
OUTPUT_NAME = "logits"
OPSET = 18


def sample_dims(sample_shape: int | Sequence[int]) -> tuple[int, ...]:
    """A sample's shape as a tuple: an int ``n`` is a flat vector ``(n,)``."""
    return (int(sample_shape),) if isinstance(sample_shape, int) else tuple(int(d) for d in sample_shape)


def export_onnx(model: nn.Module, sample_shape: int | Sequence[int], n_classes: int) -> bytes:
    """Export a trained model to ONNX bytes: input ``features[1, *sample_shape]``, output
    ``logits[1, n_classes]``.

    Args:
        model: the trained model (eval mode is set here).
        sample_shape: one sample's shape (an int ``n``: a flat vector of ``n`` features).
        n_classes: the number of outputs.

    Raises:
        ExportError: the exporter fails, the input or output has another shape, or the
            checker rejects the graph; the message names the failing module or operator as
            torch reports it.
    """
    import onnx
    import torch

    dims = sample_dims(sample_shape)
    example = (torch.zeros(1, *dims, dtype=torch.float32),)
    with tempfile.TemporaryDirectory(prefix="edgeops-export-") as tmp:
        path = Path(tmp) / "model.onnx"
        chatter = io.StringIO()
        try:
            # The exporter prints graphs and warns about optional torchvision ops and its own
            # deprecations; none of it concerns the user, and the CLI promises one line.
            with warnings.catch_warnings(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
                warnings.simplefilter("ignore")
                _quiet("torch.onnx", "torch._dynamo", "torch.export", "torch._export", "onnxscript")
                torch.onnx.export(
                    model,
                    example,
                    str(path),
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    opset_version=OPSET,
                    dynamo=True,
                    external_data=False,
                    verbose=False,
                )
        except Exception as exc:  # the exporter raises many unrelated types
            raise ExportError(f"ONNX export of {type(model).__name__} failed: {_root_cause(exc)}") from exc
        proto = onnx.load(str(path))
    if len(proto.graph.input) != 1 or len(proto.graph.output) != 1:
        raise ExportError(
            f"model must take one tensor and return one tensor, got {len(proto.graph.input)} inputs and "
            f"{len(proto.graph.output)} outputs"
        )
    in_shape = [d.dim_value if d.HasField("dim_value") else None for d in proto.graph.input[0].type.tensor_type.shape.dim]
    if in_shape != [1, *dims]:
        raise ExportError(f"exported model input has shape {in_shape}, expected {[1, *dims]} (one sample of the data)")
    out_shape = [d.dim_value if d.HasField("dim_value") else None for d in proto.graph.output[0].type.tensor_type.shape.dim]
    if out_shape != [1, n_classes]:
        raise ExportError(
            f"model output has shape {out_shape} for one input row, expected [1, {n_classes}] (one logit per label)"
        )
    proto = strip_model(proto)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"exported ONNX graph fails onnx.checker: {str(exc).splitlines()[0]}") from exc
    return bytes(proto.SerializeToString())


def _root_cause(exc: BaseException) -> str:
    """The innermost error's first line, plus the model source line torch blames, if any."""
    inner = exc
    while inner.__cause__ is not None:
        inner = inner.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(inner)).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(inner).__name__
    where = next((line for line in lines if line.startswith("Caused by:")), "")
    return f"{lines[0]} {where}".strip()


def _quiet(*loggers: str) -> None:
    for name in loggers:
        logging.getLogger(name).setLevel(logging.ERROR)


def strip_model(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Remove what the runtime does not read and shorten internal tensor names (in place)."""
    graph = proto.graph
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        if name not in names:
            names[name] = _base36(len(names))
        return names[name]

    _drop_zero_points(proto)
    for init in graph.initializer:
        init.name = short(init.name)
        init.doc_string = ""
        del init.metadata_props[:]
    for node in graph.node:
        node.name = ""
        node.doc_string = ""
        # The exporter records stack traces with absolute paths of the build machine: they
        # leak the builder's file layout and make the bytes depend on where one builds.
        del node.metadata_props[:]
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
        for attr in node.attribute:
            attr.doc_string = ""
    del graph.value_info[:]
    del graph.metadata_props[:]
    for value in [*graph.input, *graph.output]:
        del value.metadata_props[:]
        value.doc_string = ""
    graph.doc_string = ""
    graph.name = "g"
    used = {"", "ai.onnx"} | {n.domain for n in graph.node}
    kept_opsets = [o for o in proto.opset_import if o.domain in used]
    del proto.opset_import[:]
    proto.opset_import.extend(kept_opsets)
    proto.doc_string = ""
    del proto.metadata_props[:]
    proto.producer_name = "edgeops"
    proto.producer_version = ""
    return proto


_DEFAULT_ATTRS = {"Gemm": {"alpha": 1.0, "beta": 1.0, "transA": 0}}


def _drop_zero_points(proto: onnx.ModelProto) -> None:
    """Drop all-zero zero points of DequantizeLinear on constants, and default attributes.

    Symmetric int8 weights and int32 biases have zero points that are all 0, which is the
    operator's default when the input is omitted: one int8 per weight channel and one int32
    per bias element saved. Activations keep theirs (QuantizeLinear needs it for its type).
    """
    from onnx import numpy_helper

    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and len(node.input) == 3 and node.input[0] in inits:
            zp = inits.get(node.input[2])
            if zp is not None and not numpy_helper.to_array(zp).any():
                del node.input[2]
        defaults = _DEFAULT_ATTRS.get(node.op_type, {})
        kept = [a for a in node.attribute if not (a.name in defaults and (a.f if a.type == a.FLOAT else a.i) == defaults[a.name])]
        del node.attribute[:]
        node.attribute.extend(kept)
    used = {name for node in graph.node for name in node.input}
    kept_inits = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)


def _base36(i: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        i, r = divmod(i, 36)
        out = digits[r] + out
        if i == 0:
            return "t" + out


class _Calibration:
    """onnxruntime CalibrationDataReader over preprocessed training rows (one per call)."""

    def __init__(self, rows: np.ndarray) -> None:
        self._rows: Iterator[np.ndarray] = iter(rows)

    def get_next(self) -> dict[str, np.ndarray] | None:
        row = next(self._rows, None)
        return None if row is None else {INPUT_NAME: row[None, ...].astype(np.float32)}


def quantize_int8(fp32: bytes, calibration: np.ndarray) -> bytes:
    """Statically quantize an fp32 ONNX model to int8 QDQ, per-channel, and strip it.

    Args:
        fp32: the exported fp32 model.
        calibration: preprocessed input rows ``[n, *sample_shape]`` for activation ranges.

    Raises:
        ExportError: onnxruntime cannot quantize the graph.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="edgeops-quant-") as tmp:
        src, pre, out = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(fp32)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _quiet("root", "onnxruntime")
                quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
                quantize_static(
                    str(pre),
                    str(out),
                    _Calibration(calibration),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
                )
        except Exception as exc:  # onnxruntime raises assorted types from deep inside
            raise ExportError(f"int8 quantization failed: {type(exc).__name__}: {exc}") from exc
        proto = onnx.load(str(out))
    return bytes(strip_model(proto).SerializeToString())


def op_types(model: bytes) -> set[str]:
    """Operator types used by the graph (``domain::Op`` for non-default domains)."""
    import onnx

    proto = onnx.load_model_from_string(model)
    return {n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in proto.graph.node}


def io_quantization(model: bytes) -> tuple[QuantParams | None, QuantParams | None]:
    """Quantization of the graph input and output in a QDQ model, if they are quantized.

    The input's parameters are those of the ``QuantizeLinear`` that reads the graph input;
    the output's are those of the ``DequantizeLinear`` that writes the graph output.
    """
    import onnx
    from onnx import numpy_helper

    proto = onnx.load_model_from_string(model)
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    g_in, g_out = proto.graph.input[0].name, proto.graph.output[0].name

    def params(node: onnx.NodeProto) -> QuantParams | None:
        scale, zero = inits.get(node.input[1]), inits.get(node.input[2]) if len(node.input) > 2 else None
        if scale is None or scale.size != 1:
            return None
        return QuantParams(scale=float(scale.reshape(())), zero_point=int(zero.reshape(())) if zero is not None else 0)

    q_in = next((params(n) for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == g_in), None)
    q_out = next((params(n) for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == g_out), None)
    return q_in, q_out


def mac_count(model: bytes) -> int:
    """Multiply-accumulates of one inference, from shape-inferred Gemm/MatMul/Conv nodes."""
    import onnx

    proto = onnx.shape_inference.infer_shapes(onnx.load_model_from_string(model))
    shapes: dict[str, list[int]] = {}
    for vi in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        shapes[vi.name] = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    for init in proto.graph.initializer:
        shapes[init.name] = list(init.dims)
    total = 0
    for node in proto.graph.node:
        ins = [shapes.get(n, []) for n in node.input]
        outs = [shapes.get(n, []) for n in node.output]
        if node.op_type in ("Gemm", "MatMul") and len(ins) >= 2 and ins[0] and outs and outs[0]:
            k = ins[0][-1]
            trans_a = any(a.name == "transA" and a.i for a in node.attribute)
            if trans_a and len(ins[0]) >= 2:
                k = ins[0][-2]
            total += int(np.prod(outs[0])) * k
        elif node.op_type == "Conv" and len(ins) >= 2 and ins[1] and outs and outs[0]:
            total += int(np.prod(outs[0])) * int(np.prod(ins[1][1:]))
    return total
