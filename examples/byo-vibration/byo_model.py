"""The module whose ``state_dict`` ``model.pt`` holds: a 106-64-32-5 MLP (9 093 parameters).

edgeops calls :func:`build_model` as ``build_model(n_features, n_classes)`` and loads the
weights into it; it never trains it (the project has no ``[train]`` table).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def build_model(n_features: int, n_classes: int, hidden: Sequence[int] = (64, 32)) -> nn.Module:
    """The architecture ``model.pt`` was trained with.

    Args:
        n_features: width of the standardized input vector.
        n_classes: number of output classes (logits).
        hidden: widths of the hidden layers (must match the saved weights).
    """
    layers: list[nn.Module] = []
    width = n_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)
