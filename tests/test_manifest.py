"""Manifest schema: round trip and rejection of malformed manifests, field by field."""

from __future__ import annotations

import json
from typing import Any

import pytest

from edgeops_core import (
    DriftReference,
    FeatureReference,
    Lineage,
    Manifest,
    ManifestError,
    Preprocessing,
    QuantParams,
    SelfTest,
    SelfTestVector,
    TensorSpec,
)


def make_manifest(**overrides: Any) -> Manifest:
    fields: dict[str, Any] = {
        "name": "demo",
        "version": "1.2.3",
        "release": 4,
        "target": "ecu",
        "runtime": "onnxruntime",
        "model_file": "model.onnx",
        "precision": "int8",
        "inputs": (TensorSpec("features", "float32", (1, 2), QuantParams(0.1, -3)),),
        "outputs": (TensorSpec("logits", "float32", (1, 3)),),
        "feature_names": ("f0", "f1"),
        "labels": ("a", "b", "c"),
        "preprocessing": Preprocessing("standardize", (0.5, -1.0), (2.0, 0.25)),
        "drift_reference": DriftReference(
            sample_count=100,
            features=tuple(FeatureReference(f"f{i}", 0.0, 1.0, -2.0, 2.0, (0.0,), (0.5, 0.5)) for i in range(2)),
            prediction_fractions=(0.2, 0.3, 0.5),
        ),
        "self_test": SelfTest(atol=0.01, vectors=(SelfTestVector((1.0, 2.0), (0.1, 0.7, 0.2), 1),)),
        "metrics": {"accuracy_deployed": 0.97},
        "lineage": Lineage("d" * 64, "c" * 64, {"train": {"epochs": 3}}, "0.1.0", 3),
        "created": "2026-01-01T00:00:00Z",
        "expires": "2027-01-01T00:00:00Z",
    }
    fields.update(overrides)
    return Manifest(**fields)


def test_round_trip() -> None:
    m = make_manifest()
    again = Manifest.from_json(m.to_json())
    assert again == m
    assert again.bundle_filename() == "demo-1.2.3-ecu.edgeops"
    assert json.loads(m.to_json())["schema_version"] == 1


def _mutated(path: list[str | int], value: Any) -> bytes:
    doc = json.loads(make_manifest().to_json())
    node = doc
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (["release"], 0, r"field 'release' must be an integer >= 1, got int 0"),
        (["release"], "7", r"field 'release' must be an integer, got str '7'"),
        (["version"], "1.2", r"version '1.2' is not a semantic version"),
        (["schema_version"], 2, r"schema_version 2 is not supported"),
        (["inputs", 0, "shape"], [1, 3], r"inputs\[0\].shape must be \[1, 2, \.\.\.\]"),
        (["inputs", 0, "dtype"], "float64", r"field 'inputs\[0\].dtype' must be one of"),
        (["inputs", 0, "quantization", "scale"], 0, r"'inputs\[0\].quantization.scale' must be a number > 0"),
        (["labels"], ["a", "b"], r"outputs\[0\].shape must be \[1, 2\]"),
        (["preprocessing", "std"], [1.0, 0.0], r"preprocessing.std entries must all be > 0"),
        (["drift_reference", "features", 1, "name"], "zz", r"features\[1\].name is 'zz', expected 'f1'"),
        (["drift_reference", "features", 0, "bin_fractions"], [0.5, 0.6], r"bin_fractions must sum to 1"),
        (["self_test", "vectors"], [], r"self_test.vectors must hold at least one vector"),
        (["self_test", "vectors", 0, "input"], [1.0], r"self_test.vectors\[0\] must have 2 inputs"),
        (["expires"], "2025-01-01T00:00:00Z", r"expires 2025-01-01T00:00:00Z is not after created"),
        (["created"], "yesterday", r"created/expires must be UTC timestamps"),
        (["lineage"], KeyError, r"missing field 'lineage'"),
        (["metrics", "latency_ms"], "fast", r"'metrics.latency_ms' must be a finite number"),
    ],
)
def test_invalid_manifests_name_the_field(path: list[str | int], value: Any, message: str) -> None:
    with pytest.raises(ManifestError, match=message) as info:
        Manifest.from_json(_mutated(path, value))
    assert info.value.member == "manifest.json"


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b"\xff\xfe", b'{"schema_version": NaN}'])
def test_not_json_or_not_an_object(raw: bytes) -> None:
    with pytest.raises(ManifestError, match=r"manifest\.json"):
        Manifest.from_json(raw)


def test_nan_metric_cannot_be_written() -> None:
    # Issue 7: the constructor refuses it, so no such manifest exists to be written.
    with pytest.raises(ManifestError, match=r"metrics\.accuracy_deployed' must be a finite number"):
        make_manifest(metrics={"accuracy_deployed": float("nan")})
