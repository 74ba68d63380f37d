"""TFLite export and int8 quantization for the LiteRT (mobile) and TFLite Micro (wearable) targets.

* :func:`export_tflite` — the float model through ``litert-torch`` (``torch.export`` →
  StableHLO → TFLite flatbuffer), batch fixed at 1. It is the fp32 reference for size and
  float accuracy in the target runtime.
* :func:`quantize_tflite` — PT2E static post-training quantization with litert-torch's
  ``PT2EQuantizer``: per-channel symmetric int8 weights, int8 activations calibrated
  (histogram observers) on training rows, int8 model input and output. The result runs
  in LiteRT and in TFLite Micro alike. See docs/adr/0005-tflite-export.md.
* :func:`tflite_ops`, :func:`tflite_mac_count` — read the operator codes and the layer
  shapes straight from the flatbuffer, without a runtime.

A conversion failure names the module that fails: the exporter's own error points into
torch internals, so the model's leaf modules are converted one at a time to find it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeops_core import QuantParams
from edgeops_toolchain.errors import ExportError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["export_tflite", "quantize_tflite", "tflite_io", "tflite_mac_count", "tflite_ops"]


def export_tflite(model: nn.Module, sample_shape: int | Sequence[int], n_classes: int) -> bytes:
    """The float model as TFLite bytes: input ``[1, *sample_shape]`` float32, output ``[1, n_classes]``.

    ``sample_shape`` is one sample's shape (an int ``n``: a flat vector of ``n`` features).
    The input keeps the data's layout: litert-torch converts an NCHW convolution model by
    transposing inside the graph (``TRANSPOSE`` to NHWC after the input), so the model's input
    tensor is ``[1, C, H, W]`` as the data and the manifest give it; :func:`_check_io` holds it to that.

    Raises:
        ExportError: litert-torch cannot convert the model (the message names the module), or
            the converted model's input or output has another shape.
    """
    import torch

    from edgeops_toolchain.onnx_export import sample_dims

    dims = sample_dims(sample_shape)
    example = (torch.zeros(1, *dims, dtype=torch.float32),)

    def convert(m: nn.Module, args: tuple[torch.Tensor, ...]) -> bytes:
        import litert_torch

        return _serialize(litert_torch.convert(m.eval(), args))

    data = _guarded(model, example, convert, "litert-torch conversion")
    _check_io(data, dims, n_classes)
    return data


def quantize_tflite(model: nn.Module, calibration: np.ndarray, n_classes: int) -> bytes:
    """The model quantized to int8 (PT2E static, per-channel) as TFLite bytes with int8 I/O.

    Args:
        calibration: preprocessed training rows ``[n, *sample_shape]``; each is run once
            through the observed model to fix the activation ranges.

    Raises:
        ExportError: PT2E preparation or conversion fails (the message names the module).
    """
    import torch

    example = (torch.from_numpy(np.ascontiguousarray(calibration[:1], dtype=np.float32)),)

    def convert(m: nn.Module, args: tuple[torch.Tensor, ...]) -> bytes:
        import litert_torch
        from litert_torch.quantize import pt2e_quantizer as pq
        from litert_torch.quantize.quant_config import QuantConfig
        from torchao.quantization.pt2e import allow_exported_model_train_eval, quantize_pt2e

        quantizer = pq.PT2EQuantizer().set_global(pq.get_symmetric_quantization_config(is_per_channel=True))
        exported = torch.export.export(m.eval(), args).module()
        prepared = quantize_pt2e.prepare_pt2e(exported, quantizer)
        rows = calibration if m is model else None
        with torch.no_grad():
            if rows is None:
                prepared(*args)
            else:
                for i in range(rows.shape[0]):
                    prepared(torch.from_numpy(np.ascontiguousarray(rows[i : i + 1], dtype=np.float32)))
        converted = allow_exported_model_train_eval(quantize_pt2e.convert_pt2e(prepared, fold_quantize=False))
        converted.eval()  # inference behaviour for dropout/batch-norm, and litert-torch checks the flag
        return _serialize(litert_torch.convert(converted, args, quant_config=QuantConfig(pt2e_quantizer=quantizer)))

    data = _guarded(model, example, convert, "litert-torch int8 quantization")
    _check_io(data, tuple(int(d) for d in calibration.shape[1:]), n_classes)
    return data


def _serialize(edge_model: Any) -> bytes:
    with tempfile.TemporaryDirectory(prefix="edgeops-tflite-") as tmp:
        path = os.path.join(tmp, "model.tflite")
        edge_model.export(path)
        with open(path, "rb") as fh:
            return fh.read()


def _guarded(
    model: nn.Module,
    example: tuple[torch.Tensor, ...],
    convert: Callable[[nn.Module, tuple[torch.Tensor, ...]], bytes],
    what: str,
) -> bytes:
    try:
        with _quiet():
            return convert(model, example)
    except ExportError:
        raise
    except Exception as exc:  # the converter raises many unrelated types
        culprit = _failing_module(model, example, convert)
        where = f" in module {culprit}" if culprit else ""
        raise ExportError(f"{what} of {type(model).__name__} failed{where}: {_first_line(exc)}") from exc


def _failing_module(
    model: nn.Module, example: tuple[torch.Tensor, ...], convert: Callable[[nn.Module, tuple[torch.Tensor, ...]], bytes]
) -> str | None:
    """The first leaf module (in call order) that fails to convert on its own, as ``name (Type)``.

    ``None`` when no leaf fails alone (the failure is in how they are combined) or all do.
    """
    import torch

    inputs: dict[str, tuple[Any, ...]] = {}
    hooks = []
    for name, module in model.named_modules():
        if name and not list(module.children()):
            hooks.append(module.register_forward_pre_hook(lambda m, args, name=name: inputs.setdefault(name, args)))
    try:
        with torch.no_grad():
            model.eval()(*example)
    except Exception:  # noqa: BLE001  the forward itself fails: the caller's message says so
        return None
    finally:
        for hook in hooks:
            hook.remove()
    modules = dict(model.named_modules())
    failing = []
    for name, args in inputs.items():
        if not all(isinstance(a, torch.Tensor) for a in args):
            continue
        try:
            with _quiet():
                convert(modules[name], tuple(args))
        except Exception:  # noqa: BLE001  any failure marks a suspect
            failing.append(f"{name} ({type(modules[name]).__name__})")
    # When every module fails on its own, the fault is not in one of them (the converter
    # or the environment is): name none rather than blame the first.
    return failing[0] if failing and len(failing) < len(inputs) else None


def _first_line(exc: BaseException) -> str:
    inner = exc
    while inner.__cause__ is not None:
        inner = inner.__cause__
    lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
    return f"{type(inner).__name__}: {lines[0]}" if lines else type(inner).__name__


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the converter's progress lines, logs and warnings (Python and C level)."""
    from edgeops_toolchain.validate import quiet_fds

    chatter = io.StringIO()
    for name in ("litert_torch", "absl", "torch._dynamo", "torch.export", "torch._export", "torchao", "jax"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with quiet_fds(), warnings.catch_warnings(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        warnings.simplefilter("ignore")
        yield


def _schema() -> Any:
    from ai_edge_litert import schema_py_generated

    return schema_py_generated


def _root(data: bytes) -> Any:
    s = _schema()
    try:
        return s.Model.GetRootAsModel(data, 0)
    except Exception as exc:  # flatbuffers raises struct/index errors on garbage
        raise ExportError(f"not a TFLite flatbuffer: {exc}") from exc


def _op_names() -> dict[int, str]:
    return {v: k for k, v in vars(_schema().BuiltinOperator).items() if not k.startswith("_")}


def tflite_ops(data: bytes) -> set[str]:
    """Builtin operator names the model uses (``FULLY_CONNECTED``…); custom ops as ``CUSTOM:<name>``."""
    names = _op_names()
    model = _root(data)
    ops: set[str] = set()
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        # Codes above 127 live in BuiltinCode; older files only fill the deprecated byte.
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        name = names.get(builtin, f"BUILTIN_{builtin}")
        if name == "CUSTOM":
            name = "CUSTOM:" + (code.CustomCode() or b"?").decode(errors="replace")
        ops.add(name)
    return ops


def tflite_mac_count(data: bytes) -> int:
    """Multiply-accumulates of one inference, from the fully-connected and convolution layers."""
    names = _op_names()
    model = _root(data)
    graph = model.Subgraphs(0)

    def shape(index: int) -> list[int]:
        return [int(d) for d in graph.Tensors(index).ShapeAsNumpy()] if index >= 0 else []

    total = 0
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        code = model.OperatorCodes(op.OpcodeIndex())
        name = names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "")
        if op.InputsLength() < 2 or op.OutputsLength() < 1:
            continue
        weights, out = shape(op.Inputs(1)), shape(op.Outputs(0))
        if name == "FULLY_CONNECTED" and len(weights) == 2:
            rows = int(np.prod(out[:-1])) if out else 1
            total += rows * weights[0] * weights[1]
        elif name == "CONV_2D" and len(weights) == 4:  # weights [out, h, w, in]
            total += int(np.prod(out)) * weights[1] * weights[2] * weights[3]
        elif name == "DEPTHWISE_CONV_2D" and len(weights) == 4:  # weights [1, h, w, out]
            total += int(np.prod(out)) * weights[1] * weights[2]
        elif name == "BATCH_MATMUL" and len(weights) >= 2 and out:
            total += int(np.prod(out)) * weights[-2]
    return total


def _check_io(data: bytes, sample_shape: tuple[int, ...], n_classes: int) -> None:
    model = _root(data)
    graph = model.Subgraphs(0)
    if graph.InputsLength() != 1 or graph.OutputsLength() != 1:
        raise ExportError(
            f"model must take one tensor and return one tensor, got {graph.InputsLength()} inputs and "
            f"{graph.OutputsLength()} outputs"
        )
    out = [int(d) for d in graph.Tensors(graph.Outputs(0)).ShapeAsNumpy()]
    if out != [1, n_classes]:
        raise ExportError(f"model output has shape {out} for one input row, expected [1, {n_classes}] (one logit per label)")
    inp = [int(d) for d in graph.Tensors(graph.Inputs(0)).ShapeAsNumpy()]
    # The full shape, not only the element count: a [1, 8, 8, C] (NHWC) input would take the
    # data's [1, C, 8, 8] values in another order.
    if inp != [1, *sample_shape]:
        raise ExportError(f"model input has shape {inp}, expected {[1, *sample_shape]} (one sample of the data, in its layout)")


def tflite_io(data: bytes) -> tuple[tuple[str, QuantParams | None], tuple[str, QuantParams | None]]:
    """``((dtype, quantization), (dtype, quantization))`` of the model's input and output tensors."""
    s = _schema()
    types = {v: k.lower() for k, v in vars(s.TensorType).items() if not k.startswith("_")}
    graph = _root(data).Subgraphs(0)

    def describe(index: int) -> tuple[str, QuantParams | None]:
        tensor = graph.Tensors(index)
        dtype = {"float32": "float32", "int8": "int8", "uint8": "uint8", "int32": "int32"}.get(types.get(tensor.Type(), ""), "")
        if not dtype:
            raise ExportError(f"model I/O tensor has type {types.get(tensor.Type(), tensor.Type())}, expected float32 or int8")
        q = tensor.Quantization()
        if q is None or q.ScaleLength() != 1:
            return dtype, None
        zero = int(q.ZeroPoint(0)) if q.ZeroPointLength() else 0
        return dtype, QuantParams(scale=float(q.Scale(0)), zero_point=zero)

    return describe(graph.Inputs(0)), describe(graph.Outputs(0))
