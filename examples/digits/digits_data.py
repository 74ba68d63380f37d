"""Dataset entry point of the digits example: scikit-learn's 8x8 digits, split three ways.

Each image is an N-d sample ``[1, 8, 8]``: one channel (``intensity``) of 8x8 grey levels,
channel first as edgeops expects. Exact duplicate images are dropped before splitting (the
set holds a few), so no test image also appears in training; the split is stratified and
seeded.
"""

from __future__ import annotations

import numpy as np


def load_dataset(seed: int = 3, val_fraction: float = 0.15, test_fraction: float = 0.2) -> dict[str, object]:
    """Train/validation/test splits of the digits images as ``[n, 1, 8, 8]`` float32 images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.data.astype(np.float32).reshape(-1, 1, 8, 8)  # pixels row by row: [n, channel, row, column]
    y = digits.target.astype(np.int64)
    _, first = np.unique(x.reshape(len(x), -1), axis=0, return_index=True)
    keep = np.sort(first)
    x, y = x[keep], y[keep]
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test, n_val = round(len(idx) * test_fraction), round(len(idx) * val_fraction)
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test : n_test + n_val])
        parts["train"].append(idx[n_test + n_val :])
    out: dict[str, object] = {}
    for split, chunks in parts.items():
        idx = np.sort(np.concatenate(chunks))
        out[f"x_{split}"], out[f"y_{split}"] = x[idx], y[idx]
    out["feature_names"] = ["intensity"]  # one name per channel
    out["label_names"] = [str(d) for d in range(10)]
    return out
