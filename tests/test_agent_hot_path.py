"""The agent's per-message shortcuts give exactly what the general code they replace gives.

Telemetry percentiles, the packed PUBLISH properties and the drift detector's binning run once
per message on every device (a simulated fleet runs hundreds per process), so each has a
cheaper form; these tests pin each to the library behaviour it stands in for.
"""

from __future__ import annotations

import numpy as np
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeops_agent.agent import percentiles
from edgeops_agent.drift import DriftDetector
from edgeops_agent.transport import PublishProperties
from edgeops_core.manifest import DriftReference, FeatureReference


@pytest.mark.parametrize("n", [1, 2, 3, 7, 100, 4096])
def test_percentiles_equal_numpy(n: int) -> None:
    rng = np.random.default_rng(n)
    for scale in (1e-3, 1.0, 1e4):
        values = rng.exponential(size=n) * scale
        assert percentiles(values, (0, 50, 95, 99, 100)) == np.percentile(values, (0, 50, 95, 99, 100)).tolist()


@pytest.mark.parametrize("seq", [0, 1, 127, 128, 99_999, 2**63 - 1])
def test_publish_properties_pack_like_paho(seq: int) -> None:
    reference = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    reference.UserProperty = ("seq", str(seq))
    reference.PayloadFormatIndicator = 1
    reference.ContentType = "application/json"
    packed = PublishProperties(seq).pack()
    assert packed == reference.pack()  # type: ignore[no-untyped-call]
    back = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    back.unpack(packed)  # type: ignore[no-untyped-call]
    assert back.UserProperty == [("seq", str(seq))] and back.ContentType == "application/json"


def test_drift_bins_are_numpy_searchsorted_right() -> None:
    """A value's bin is the number of edges <= it, as the build computed the reference."""
    rng = np.random.default_rng(5)
    edges = [np.sort(rng.normal(size=k)).tolist() for k in (3, 9, 1)]  # ragged: padded with +inf
    ref = DriftReference(
        sample_count=1000,
        features=tuple(
            FeatureReference(f"f{i}", 0.0, 1.0, -3.0, 3.0, tuple(e), tuple([1 / (len(e) + 1)] * (len(e) + 1)))
            for i, e in enumerate(edges)
        ),
        prediction_fractions=(0.5, 0.5),
    )
    detector = DriftDetector(ref, 2)
    rows = np.concatenate([rng.normal(size=(50, 3)), np.array([[e[0] for e in edges], [e[-1] for e in edges]])])
    detector.update_batch(rows, np.zeros(len(rows), dtype=np.int64))
    expected = np.zeros((3, detector._nbins), dtype=np.int64)
    for j, e in enumerate(edges):
        np.add.at(expected[j], np.searchsorted(e, rows[:, j], side="right"), 1)
    assert np.array_equal(detector._counts, expected)
