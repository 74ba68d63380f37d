"""``edgeops evaluate``: a signed bundle's accuracy on labelled field rows.

The bundle is verified exactly as ``edgeops verify`` does, then its model runs in its own
runtime through :class:`~edgeops_toolchain.validate.Evaluator` (the agent's runtime
adapters, one row at a time, the manifest's preprocessing and tensor specs), which is also
what the build's ``field_holdout_accuracy`` is measured with: the same bundle and dataset
give the same number here and in the manifest.

The rows are the labelled rows of the field datasets, merged and deduplicated as the build
merges them (:func:`edgeops_toolchain.data.field_rows`): ``holdout`` (the default) takes
the held-out split, which no build trained on, ``all`` every labelled row.

Field datasets hold flat feature vectors: a bundle whose input is an N-d sample
(``[1, 1, 8, 8]``) is refused with a :class:`DataError`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeops_core import InputError, Manifest, TrustedKey, apply_preprocessing, verify_bundle
from edgeops_toolchain.data import check_field_names, field_rows, load_field_data
from edgeops_toolchain.errors import DataError
from edgeops_toolchain.validate import Evaluator

__all__ = ["EVALUATE_SPLITS", "ClassAccuracy", "Evaluation", "evaluate_bundle"]

#: The row selections ``--split`` accepts (the first is the default).
EVALUATE_SPLITS = ("holdout", "all")


@dataclass(frozen=True)
class ClassAccuracy:
    """Rows of one true class and the share of them predicted right (``None`` without rows)."""

    rows: int
    accuracy: float | None


@dataclass(frozen=True)
class Evaluation:
    """The result of :func:`evaluate_bundle`.

    Attributes:
        bundle: the bundle file.
        manifest: its verified manifest.
        signer: fingerprint of the key that verified it.
        split: ``holdout`` or ``all``.
        field_datasets: digests of the datasets evaluated on, sorted.
        rows: labelled rows evaluated.
        accuracy: share predicted right; ``None`` when there was no row.
        per_class: by label name, in the manifest's label order.
    """

    bundle: Path
    manifest: Manifest
    signer: str
    split: str
    field_datasets: tuple[str, ...]
    rows: int
    accuracy: float | None
    per_class: Mapping[str, ClassAccuracy]

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` object (a contract: docs/cli.md)."""
        m = self.manifest
        return {
            "ok": True,
            "bundle": str(self.bundle),
            "name": m.name,
            "version": m.version,
            "release": m.release,
            "target": m.target,
            "split": self.split,
            "field_datasets": list(self.field_datasets),
            "rows": self.rows,
            "accuracy": self.accuracy,
            "per_class": {label: {"rows": c.rows, "accuracy": c.accuracy} for label, c in self.per_class.items()},
            "signer": self.signer,
        }


def evaluate_bundle(
    bundle: Path, field_data: Sequence[Path], trusted: Sequence[TrustedKey], *, split: str = "holdout"
) -> Evaluation:
    """Verify ``bundle`` and measure its model on the labelled rows of ``field_data``.

    Args:
        bundle: the ``.edgeops`` file.
        field_data: field dataset files (at least one).
        trusted: the keys the bundle must verify against.
        split: ``holdout`` or ``all`` (:data:`EVALUATE_SPLITS`).

    Raises:
        InputError: no such bundle file, no dataset, or an unknown split.
        FieldDataError: a dataset file cannot be read or is refused.
        DataError: a dataset's feature or label names differ from the manifest's, or the
            bundle's input is an N-d sample (field datasets hold flat feature vectors), or
            its model is not a classifier (field datasets hold class labels).
        BundleError: the bundle fails verification (a subclass says how).
        BuildError: the bundle's runtime is not installed or refuses the model.
    """
    if split not in EVALUATE_SPLITS:
        raise InputError(f"split must be one of {', '.join(EVALUATE_SPLITS)}, got {split!r}")
    if not field_data:
        raise InputError("no field dataset given (--field-data PATH)")
    if not bundle.exists() and not bundle.is_symlink():
        raise InputError(f"{bundle}: no such bundle file")  # the caller's typo (2), not a rejected bundle (4)
    verified = verify_bundle(bundle, list(trusted))
    m = verified.manifest
    if len(m.sample_shape) > 1:
        raise DataError(
            f"{bundle.name}: its model takes samples of shape {list(m.sample_shape)}, but field datasets hold flat "
            "feature vectors: evaluate supports flat [1, n_features] models only"
        )
    if m.task.kind != "classification":
        raise DataError(
            f"{bundle.name}: its model is a {m.task.kind} model, but field datasets hold class labels: "
            "evaluate measures classifiers only"
        )
    datasets = load_field_data(field_data)
    for path, dataset in datasets:
        check_field_names(path, dataset, m.feature_names, m.labels, against=f"the manifest of {bundle.name}")
    x, y = field_rows([dataset for _, dataset in datasets], split)
    accuracy: float | None = None
    correct = np.zeros(0, dtype=bool)
    if x.shape[0]:
        evaluator = Evaluator(m.runtime, verified.model, int(m.metrics.get("threads", 1)) or 1, spec=(m.inputs[0], m.outputs[0]))
        correct = evaluator.predict(apply_preprocessing(m.preprocessing, x)).argmax(axis=1) == y
        accuracy = float(correct.mean())
    per_class = {}
    for index, label in enumerate(m.labels):
        mine = correct[y == index]
        per_class[label] = ClassAccuracy(rows=int(mine.size), accuracy=float(mine.mean()) if mine.size else None)
    return Evaluation(
        bundle=bundle,
        manifest=m,
        signer=verified.signer,
        split=split,
        field_datasets=tuple(dataset.digest for _, dataset in datasets),
        rows=int(x.shape[0]),
        accuracy=accuracy,
        per_class=per_class,
    )
