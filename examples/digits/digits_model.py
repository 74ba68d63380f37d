"""Model entry point of the digits example: a two-layer CNN of a few thousand parameters."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """[n, 1, 8, 8] images → 2 x (conv 3x3, ReLU, max-pool 2) → linear."""

    def __init__(self, n_classes: int, channels: Sequence[int]) -> None:
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(c2 * 2 * 2, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[n, classes]`` for images ``[n, 1, 8, 8]``."""
        return self.classifier(self.features(x).flatten(1))


def build_model(sample_shape: tuple[int, ...], n_classes: int, channels: Sequence[int] = (8, 16)) -> nn.Module:
    """The project's model entry point: edgeops passes the sample shape (``(1, 8, 8)``) of N-d data."""
    if tuple(sample_shape) != (1, 8, 8):
        raise ValueError(f"the digits CNN takes one-channel 8x8 images [1, 8, 8], got samples of shape {list(sample_shape)}")
    return DigitsCNN(n_classes, channels)
