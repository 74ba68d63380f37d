"""The agent's runtime adapters and ModelRunner on the session's real ECU bundle."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import Built
from edgeops_agent.errors import ModelLoadError, RuntimeUnavailableError, TensorInputError
from edgeops_agent.runtime import ModelRunner, dequantize, open_runtime, quantize
from edgeops_core import Manifest, QuantParams, read_members


@pytest.fixture(scope="module")
def runner(built: Built) -> ModelRunner:
    members = read_members(built.bundle.read_bytes())
    return ModelRunner.from_manifest(Manifest.from_json(members["manifest.json"]), members["model.onnx"])


def test_self_test_vectors_pass_in_onnxruntime(runner: ModelRunner, built: Built) -> None:
    manifest = Manifest.from_json(read_members(built.bundle.read_bytes())["manifest.json"])
    for v in manifest.self_test.vectors:
        out = runner.predict(np.asarray(v.input))
        assert np.abs(out - np.asarray(v.expected)).max() <= manifest.self_test.atol and int(out.argmax()) == v.label


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros(5, dtype=np.float32), "must have 106 features"),
        (np.zeros((2, 106), dtype=np.float32), r"got shape \[2, 106\]"),
        (np.array(["a"] * 106), "must be numeric"),
        (np.r_[np.zeros(40), np.nan, np.zeros(65)].astype(np.float32), "input feature 40 is nan"),
        (np.r_[np.zeros(3), np.inf, np.zeros(102)], "input feature 3 is inf"),
    ],
)
def test_bad_inputs_are_typed_errors(runner: ModelRunner, bad: np.ndarray, message: str) -> None:
    with pytest.raises(TensorInputError, match=message):
        runner.predict(bad)
    assert runner.predict(np.zeros(106, dtype=np.float32)).shape == (5,)  # still serving


def test_unknown_runtime_and_garbage_model() -> None:
    with pytest.raises(RuntimeUnavailableError, match="unknown runtime 'tvm'"):
        open_runtime("tvm", b"", 1)
    for runtime in ("onnxruntime", "litert", "tflite-micro"):
        with pytest.raises(ModelLoadError):
            open_runtime(runtime, b"\x00garbage model bytes" * 10, 1)


def test_quantize_round_trip_saturates() -> None:
    q = QuantParams(scale=0.5, zero_point=-3)
    x = np.array([-1000.0, -1.0, 0.0, 0.26, 1000.0], dtype=np.float32)
    raw = quantize(x, q, "int8")
    assert raw.dtype == np.int8 and raw.tolist() == [-128, -5, -3, -2, 127]
    assert dequantize(raw, q).tolist() == [-62.5, -1.0, 0.0, 0.5, 65.0]
