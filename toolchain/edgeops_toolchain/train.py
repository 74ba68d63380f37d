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

__all__ = ["TrainResult", "build_model", "train_model"]


@dataclass
class TrainResult:
    """The trained model (eval mode) and its training curve.

    A project that brings its own model (:mod:`edgeops_toolchain.pretrained`) has an empty
    curve; an ONNX one has no torch ``model`` but its normalized ``onnx`` bytes instead.
    ``rowwise`` marks a torch model that takes one row at a time (a ``torch.export``
    program exported with a static batch of 1).
    """

    model: nn.Module | None
    parameters: int
    loss_per_epoch: list[float]
    val_accuracy: float
    onnx: bytes | None = None
    rowwise: bool = False

    def torch_model(self) -> nn.Module:
        """The torch model (export needs one).

        Raises:
            BuildError: there is none (an ONNX model reached a step that needs torch: a bug,
                since such projects are refused for TFLite targets before the build starts).
        """
        if self.model is None:
            from edgeops_toolchain.errors import BuildError

            raise BuildError("internal: this step needs a PyTorch model, the project gives an ONNX model")
        return self.model

    def logits(self, x: np.ndarray) -> np.ndarray:
        """The torch model's logits for preprocessed rows ``x`` ``[rows, n_features]``."""
        import torch

        model = self.torch_model()
        with torch.no_grad():
            if self.rowwise:
                return np.concatenate([model(torch.from_numpy(x[i : i + 1])).numpy() for i in range(x.shape[0])])
            return np.asarray(model(torch.from_numpy(x)).numpy())


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

    cfg = project.training
    if cfg is None:  # the pipeline loads a brought model instead: a bug to get here
        raise ProjectError("internal: train_model called for a project that brings its trained model")
    torch.manual_seed(cfg.seed)
    model = build_model(project, len(ds.feature_names), len(ds.label_names))
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


def build_model(project: Project, n_features: int, n_classes: int) -> nn.Module:
    """Call the project's model entry point as ``entry(n_features, n_classes, **params)``.

    Raises:
        ProjectError: the entry point raises or does not return a ``torch.nn.Module``.
    """
    from torch import nn

    entry = str(project.model_entry)
    build = load_entry(project, entry)
    try:
        model = build(n_features, n_classes, **project.model_params)
    except Exception as exc:  # the project's code may raise anything
        raise ProjectError(f"model entry {entry!r} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ProjectError(f"model entry {entry!r} must return a torch.nn.Module, got {type(model).__name__}")
    return model


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
