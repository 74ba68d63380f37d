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
from edgeops_toolchain.tasks import output_count, validation_metric

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["TrainResult", "build_model", "task_model", "train_model"]


@dataclass
class TrainResult:
    """The trained model (eval mode) and its training curve.

    A project that brings its own model (:mod:`edgeops_toolchain.pretrained`) has an empty
    curve; an ONNX one has no torch ``model`` but its normalized ``onnx`` bytes instead.
    ``rowwise`` marks a torch model that takes one row at a time (a ``torch.export``
    program exported with a static batch of 1). ``val_accuracy`` is the task's validation
    number (:func:`edgeops_toolchain.tasks.validation_metric`): accuracy for a classifier, MAE
    for a regression, the mean score of the normal rows for an anomaly model.
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
    task = project.task
    n_outputs = output_count(task, ds.label_names)
    model = build_model(project, ds.sample_shape, n_outputs)
    x = torch.from_numpy(apply_preprocessing(pre, ds.x_train, ds.sample_ndim))
    y = torch.from_numpy(ds.y_train)
    if task.kind == "anomaly":
        # An autoencoder learns normal rows only, reconstructing its (preprocessed) input.
        x = x[torch.from_numpy(ds.y_train == ds.label_names.index(task.normal_label))]
        y = x
    expected = tuple(x.shape[1:]) if task.kind == "anomaly" else (n_outputs,)
    _check_output_shape(project, model, x[:2], expected)
    # Deterministic kernels for this training only; the caller's setting is restored.
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        losses = _fit(model, x, y, cfg, on_epoch, loss="cross_entropy" if task.kind == "classification" else "mse")
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:  # raised by the project's model code
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ProjectError(f"training failed in model {project.model_entry!r}: {type(exc).__name__}: {first}") from exc
    finally:
        torch.use_deterministic_algorithms(previous)
    model = task_model(project, model.eval(), ds.sample_shape)
    with torch.no_grad():
        logits = model(torch.from_numpy(apply_preprocessing(pre, ds.x_val, ds.sample_ndim))).numpy()
    return TrainResult(
        model=model,
        parameters=sum(p.numel() for p in model.parameters()),
        loss_per_epoch=losses,
        val_accuracy=validation_metric(task, logits, ds.y_val, ds.label_names),
    )


def task_model(project: Project, model: nn.Module, sample_shape: tuple[int, ...]) -> nn.Module:
    """``model`` as a build exports it: itself, or for an anomaly project whose score is the
    reconstruction error, a wrapper that returns ``mean((model(x) - x) ** 2)`` over the sample,
    ``[rows, 1]`` (in eval mode).

    Every operator is one each target's list has: the mean is a fixed ``Linear(n, 1)`` with
    weights ``1/n`` over the squared differences (Gemm/MatMul, FULLY_CONNECTED; ReduceMean is
    not on the ECU's list), and the difference is ``model(x) + x * -1`` (Mul and Add; TFLite
    Micro has no SUB). The ``-1`` is a constant tensor, not a Python scalar, so that no export
    turns it back into a subtraction or a negation; it is not part of the state_dict.
    """
    if project.task.kind != "anomaly" or project.task.score != "reconstruction":
        return model
    import torch
    from torch import nn

    size = math.prod(sample_shape)

    class ReconstructionScore(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.mean = nn.Linear(size, 1, bias=False)
            with torch.no_grad():
                self.mean.weight.fill_(1.0 / size)
            self.mean.weight.requires_grad_(False)
            self.negate: torch.Tensor
            self.register_buffer("negate", torch.full(sample_shape, -1.0), persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            diff = torch.flatten(self.model(x) + x * self.negate, 1)
            return self.mean(diff * diff)  # type: ignore[no-any-return]

    return ReconstructionScore().eval()


def build_model(project: Project, sample_shape: int | tuple[int, ...], n_classes: int) -> nn.Module:
    """Call the project's model entry point as ``entry(n_features, n_classes, **params)`` for a
    flat sample (``sample_shape`` an int or ``(n_features,)``), ``entry(sample_shape, n_classes,
    **params)`` with the tuple for an N-d one (``(1, 8, 8)``).

    Raises:
        ProjectError: the entry point raises or does not return a ``torch.nn.Module``.
    """
    from torch import nn

    entry = str(project.model_entry)
    build = load_entry(project, entry)
    try:
        shape = sample_shape[0] if isinstance(sample_shape, tuple) and len(sample_shape) == 1 else sample_shape
        model = build(shape, n_classes, **project.model_params)
    except Exception as exc:  # the project's code may raise anything
        raise ProjectError(f"model entry {entry!r} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ProjectError(f"model entry {entry!r} must return a torch.nn.Module, got {type(model).__name__}")
    return model


def _check_output_shape(project: Project, model: nn.Module, x: torch.Tensor, expected: tuple[int, ...]) -> None:
    """``model(x)`` must be ``[rows, *expected]``: a logit per label, a value per regression output,
    or (an anomaly autoencoder) a reconstruction of the input."""
    import torch

    try:
        with torch.no_grad():
            out = model.eval()(x)
    except Exception as exc:  # the project's forward may raise anything
        raise ProjectError(
            f"model {project.model_entry!r} fails on a {list(x.shape)} input: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (x.shape[0], *expected):
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        per = {
            "classification": "one logit per label",
            "regression": "one value per output name in label_names",
            "anomaly": "a reconstruction of the input, task.score = 'reconstruction'",
        }[project.task.kind]
        raise ProjectError(
            f"model {project.model_entry!r} returns {got} for a {list(x.shape)} input, expected {[x.shape[0], *expected]} ({per})"
        )


def _fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: Training,
    on_epoch: Callable[[int, int], None] | None,
    *,
    loss: str = "cross_entropy",
) -> list[float]:
    """Train ``model`` on ``(x, y)``: ``loss`` is ``cross_entropy`` (class indices) or ``mse`` (values)."""
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
            criterion = nn.functional.cross_entropy if loss == "cross_entropy" else nn.functional.mse_loss
            value = criterion(model(x[idx]), y[idx])
            value.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            total += value.item() * idx.shape[0]
        schedule.step()
        losses.append(total / x.shape[0])
        if not math.isfinite(losses[-1]):
            raise ProjectError(f"training diverged: loss is {losses[-1]} at epoch {epoch + 1}; lower train.learning_rate")
        if on_epoch:
            on_epoch(epoch + 1, cfg.epochs)
    return losses
