"""Training: seeded and deterministic on CPU.

The same project, data and seed give bit-identical weights on the same machine: torch's
global and shuffling generators are seeded, deterministic algorithms are enforced, and MKL
runs in its strict reproducibility mode (``MKL_CBWR``, set when ``edgeops_toolchain`` is
imported), so a matrix product does not depend on thread splits or memory alignment.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from edgeops_core import Preprocessing, apply_preprocessing
from edgeops_toolchain.data import Dataset
from edgeops_toolchain.errors import ProjectError
from edgeops_toolchain.project import Project, Training, load_entry

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["TrainResult", "train_model"]


@dataclass
class TrainResult:
    """The trained model (eval mode) and its training curve."""

    model: nn.Module
    parameters: int
    loss_per_epoch: list[float]
    val_accuracy: float


def train_model(
    project: Project, ds: Dataset, pre: Preprocessing, *, on_epoch: Callable[[int, int], None] | None = None
) -> TrainResult:
    """Build the project's model and train it on the preprocessed training split.

    Args:
        project: supplies the model entry point and the training hyperparameters.
        ds: the checked dataset.
        pre: preprocessing computed by the data checks.
        on_epoch: called with ``(epoch, epochs)`` after each epoch, for progress.

    Raises:
        ProjectError: the model entry point does not return a ``torch.nn.Module`` or fails.
    """
    import torch
    from torch import nn

    cfg = project.training
    torch.manual_seed(cfg.seed)
    build = load_entry(project, project.model_entry)
    try:
        model = build(len(ds.feature_names), len(ds.label_names), **project.model_params)
    except Exception as exc:  # the project's code may raise anything
        raise ProjectError(f"model entry {project.model_entry!r} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ProjectError(f"model entry {project.model_entry!r} must return a torch.nn.Module, got {type(model).__name__}")
    x = torch.from_numpy(apply_preprocessing(pre, ds.x_train))
    y = torch.from_numpy(ds.y_train)
    _check_output_shape(project, model, x[:2], len(ds.label_names))
    # Deterministic kernels for this training only; the caller's setting is restored.
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        losses = _fit(model, x, y, cfg, on_epoch)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:  # raised by the project's model code
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ProjectError(f"training failed in model {project.model_entry!r}: {type(exc).__name__}: {first}") from exc
    finally:
        torch.use_deterministic_algorithms(previous)
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(apply_preprocessing(pre, ds.x_val))).numpy()
    val_acc = float((np.argmax(logits, axis=1) == ds.y_val).mean())
    return TrainResult(
        model=model,
        parameters=sum(p.numel() for p in model.parameters()),
        loss_per_epoch=losses,
        val_accuracy=val_acc,
    )


def _check_output_shape(project: Project, model: nn.Module, x: torch.Tensor, n_classes: int) -> None:
    import torch

    try:
        with torch.no_grad():
            out = model.eval()(x)
    except Exception as exc:  # the project's forward may raise anything
        raise ProjectError(
            f"model {project.model_entry!r} fails on a [2, {x.shape[1]}] input: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (x.shape[0], n_classes):
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ProjectError(
            f"model {project.model_entry!r} returns {got} for a [{x.shape[0]}, {x.shape[1]}] input, "
            f"expected [{x.shape[0]}, {n_classes}] (one logit per label)"
        )


def _fit(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: Training, on_epoch: Callable[[int, int], None] | None
) -> list[float]:
    import torch
    from torch import nn

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(x.shape[0], generator=shuffle)
        total = 0.0
        for start in range(0, x.shape[0], cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            total += loss.item() * idx.shape[0]
        schedule.step()
        losses.append(total / x.shape[0])
        if not math.isfinite(losses[-1]):
            raise ProjectError(f"training diverged: loss is {losses[-1]} at epoch {epoch + 1}; lower train.learning_rate")
        if on_epoch:
            on_epoch(epoch + 1, cfg.epochs)
    return losses
