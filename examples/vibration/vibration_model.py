"""The model of the vibration example: a multilayer perceptron over standardized features.

Sized like a production ECU classifier (about 110 k parameters: ~430 KB in fp32, ~115 KB
in int8), small enough for a domain controller's model partition and large enough that the
weights, not the graph, dominate the file.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def build_model(n_features: int, n_classes: int, hidden: Sequence[int] = (256, 256, 64), dropout: float = 0.1) -> nn.Module:
    """Build the classifier.

    Args:
        n_features: width of the (standardized) input vector.
        n_classes: number of output classes (logits).
        hidden: widths of the hidden layers.
        dropout: dropout after each hidden layer during training.
    """
    layers: list[nn.Module] = []
    width = n_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
        width = h
    layers.append(nn.Linear(width, n_classes))
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for module in model:
            if isinstance(module, nn.Linear):
                nn.init.kaiming_uniform_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)
    return model
