"""The anomaly example's model: an autoencoder over the standardized window features.

It learns to reconstruct normal windows through a narrow bottleneck; a fault window, which
it never saw, reconstructs worse. edgeops wraps it (``[task] score = "reconstruction"``) so
the deployed model outputs the window's mean squared reconstruction error, the anomaly score.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import nn


def build_model(n_features: int, n_outputs: int, hidden: Sequence[int] = (128, 32)) -> nn.Module:
    """Build the autoencoder ``n_features -> hidden... -> reversed(hidden[:-1]) -> n_features``.

    Args:
        n_features: width of the (standardized) input vector, which the model reconstructs.
        n_outputs: 1, the score edgeops computes from the reconstruction (unused here).
        hidden: widths of the encoder's layers; the last is the bottleneck.
    """
    del n_outputs  # the reconstruction has the input's width; edgeops derives the one score
    widths = [n_features, *hidden, *reversed(hidden[:-1]), n_features]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for module in model:
            if isinstance(module, nn.Linear):
                nn.init.kaiming_uniform_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)
    return model
