"""The manifest's preprocessing, applied identically on the host and on the device.

Host validation calls :func:`apply_preprocessing`. The device agent's hot path
(:class:`edgeops_agent.model.LoadedModel`) precomputes its arrays at load but performs the
same float32 operations in the same order, so its tensors are bit-identical to this
function's (``tests/test_serving.py`` checks it): the numbers the build measured are the
numbers the device computes.
"""

from __future__ import annotations

import numpy as np

from edgeops_core.manifest import Preprocessing

__all__ = ["apply_preprocessing"]


def apply_preprocessing(pre: Preprocessing, x: np.ndarray) -> np.ndarray:
    """Turn raw feature rows ``[..., n_features]`` into model input (float32).

    ``standardize`` computes ``(x - mean) / std`` in float32; ``none`` only casts.
    """
    raw = np.asarray(x, dtype=np.float32)
    if pre.kind == "none":
        return raw
    mean = np.asarray(pre.mean, dtype=np.float32)
    std = np.asarray(pre.std, dtype=np.float32)
    return ((raw - mean) / std).astype(np.float32)
