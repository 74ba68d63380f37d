"""The anomaly example's dataset: normal windows to learn from, fault windows only to measure with.

The windows come from the vibration example's generator (``vibration_data.py``, a copy of
``examples/vibration/vibration_data.py`` kept identical by a test, so that this folder is a
complete project whose code digest covers its generator). Training and validation hold
normal windows only, as a plant that has not yet seen a fault would; the test split holds
held-out normal windows (for the false-positive rate) and windows of every fault class (for
the detection rate). Each split is an independent draw with its own seed.
"""

from __future__ import annotations

import numpy as np
from vibration_data import LABELS, Shift, feature_names, generate

NORMAL_ONLY = Shift(class_weights=(1.0, 0.0, 0.0, 0.0, 0.0))
FAULTS_ONLY = Shift(class_weights=(0.0, 1.0, 1.0, 1.0, 1.0))


def load_dataset(
    n_train: int = 4000, n_val: int = 2000, n_test_normal: int = 2000, n_test_faults: int = 2000, seed: int = 11
) -> dict[str, object]:
    """The project's dataset entry point (see the module docstring)."""
    x_train, y_train = generate(n_train, seed, NORMAL_ONLY)
    x_val, y_val = generate(n_val, seed + 1, NORMAL_ONLY)
    x_normal, y_normal = generate(n_test_normal, seed + 2, NORMAL_ONLY)
    x_faults, y_faults = generate(n_test_faults, seed + 3, FAULTS_ONLY)
    return {
        "x_train": x_train,
        "y_train": y_train,
        "x_val": x_val,
        "y_val": y_val,
        "x_test": np.concatenate([x_normal, x_faults]),
        "y_test": np.concatenate([y_normal, y_faults]),
        "feature_names": feature_names(),
        "label_names": LABELS,
    }
