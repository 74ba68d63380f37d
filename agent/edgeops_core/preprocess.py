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


def apply_preprocessing(pre: Preprocessing, x: np.ndarray, sample_ndim: int = 1) -> np.ndarray:
    """Turn raw samples ``[..., *sample_shape]`` into model input (float32).

    ``standardize`` computes ``(x - mean[c]) / std[c]`` in float32 per channel ``c``, the
    first of the sample's ``sample_ndim`` axes (for a flat vector, ``sample_ndim = 1``, per
    feature: the last axis); ``none`` only casts.
    """
    raw = np.asarray(x, dtype=np.float32)
    if pre.kind == "none":
        return raw
    broadcast = (len(pre.mean),) + (1,) * (sample_ndim - 1)
    mean = np.asarray(pre.mean, dtype=np.float32).reshape(broadcast)
    std = np.asarray(pre.std, dtype=np.float32).reshape(broadcast)
    return ((raw - mean) / std).astype(np.float32)
