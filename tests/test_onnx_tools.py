"""ONNX helpers: stripping keeps outputs identical; MAC count and op set are exact."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgeops_toolchain.onnx_export import export_onnx, io_quantization, mac_count, op_types, quantize_int8, strip_model


@pytest.fixture(scope="module")
def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


@pytest.fixture(scope="module")
def fp32(mlp: nn.Module) -> bytes:
    return export_onnx(mlp, 12, 4)


def _run(model: bytes, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"features": x[i : i + 1]})[0] for i in range(len(x))])


def test_export_is_single_file_with_fixed_io(fp32: bytes, mlp: nn.Module) -> None:
    proto = onnx.load_model_from_string(fp32)
    assert [i.name for i in proto.graph.input] == ["features"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [1, 12]
    assert all(i.data_location != onnx.TensorProto.EXTERNAL for i in proto.graph.initializer)
    x = np.random.default_rng(0).normal(size=(16, 12)).astype(np.float32)
    with torch.no_grad():
        expected = mlp(torch.from_numpy(x)).numpy()
    assert np.abs(_run(fp32, x) - expected).max() < 1e-5


def test_wrong_output_width_is_an_export_error(mlp: nn.Module) -> None:
    from edgeops_toolchain.errors import ExportError

    with pytest.raises(ExportError, match=r"model output has shape \[1, 4\] for one input row, expected \[1, 5\]"):
        export_onnx(mlp, 12, 5)


def test_mac_count_matches_layer_sizes(fp32: bytes) -> None:
    assert mac_count(fp32) == 12 * 32 + 32 * 16 + 16 * 4


def test_int8_quantization_and_stripping(fp32: bytes) -> None:
    rng = np.random.default_rng(1)
    calib = rng.normal(size=(64, 12)).astype(np.float32)
    int8 = quantize_int8(fp32, calib)
    assert {"QuantizeLinear", "DequantizeLinear"} <= op_types(int8)
    q_in, q_out = io_quantization(int8)
    assert q_in is not None and q_in.scale > 0
    assert q_out is not None and q_out.scale > 0
    x = rng.normal(size=(32, 12)).astype(np.float32)
    ref, out = _run(fp32, x), _run(int8, x)
    # int8 tracks fp32 within a tenth of the output range, and moves on the output grid.
    assert np.abs(ref - out).max() < 0.1 * np.ptp(ref)
    steps = out / q_out.scale + q_out.zero_point
    assert np.allclose(steps, np.round(steps), atol=1e-3)
    proto = onnx.load_model_from_string(int8)
    assert all(not n.name and not n.doc_string and not n.metadata_props for n in proto.graph.node)
    assert len(proto.graph.value_info) == 0
    assert not proto.graph.metadata_props and not proto.metadata_props
    assert all(not v.metadata_props for v in [*proto.graph.input, *proto.graph.output])
    for model in (fp32, int8):  # no trace of the build machine's file layout
        assert b"site-packages" not in model and b'File "' not in model
    assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}  # unused domains dropped
    # Stripping again changes nothing the runtime computes.
    again = strip_model(onnx.load_model_from_string(int8)).SerializeToString()
    assert np.array_equal(_run(again, x), out)


def test_strip_model_shortens_internal_names_only(fp32: bytes) -> None:
    proto = onnx.load_model_from_string(fp32)
    for init in proto.graph.initializer:
        init.name = "a_very_long_exporter_generated_name_" + init.name
    for node in proto.graph.node:
        node.input[:] = [
            "a_very_long_exporter_generated_name_" + n if n and not n.startswith(("features", "logits", "t")) else n
            for n in node.input
        ]
    before = len(proto.SerializeToString())
    stripped = strip_model(proto)
    assert len(stripped.SerializeToString()) < before
    assert [i.name for i in stripped.graph.input] == ["features"]
    assert [o.name for o in stripped.graph.output] == ["logits"]


def test_peak_memory_probe_sees_the_model(fp32: bytes) -> None:
    """A model with 4 MB more weights measures at least 4 MB more peak RAM, repeatably."""
    from edgeops_toolchain.validate import measure_peak_memory

    torch.manual_seed(0)
    big = export_onnx(nn.Sequential(nn.Linear(12, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 4)), 12, 4)
    small_peak = measure_peak_memory(fp32, 1, 12)
    big_peak = measure_peak_memory(big, 1, 12)
    assert 0 < small_peak < big_peak
    assert big_peak - small_peak >= 0.9 * (len(big) - len(fp32))
    assert abs(measure_peak_memory(fp32, 1, 12) - small_peak) < 256 * 1024
