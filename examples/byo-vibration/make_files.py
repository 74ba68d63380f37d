"""Make this example's files: a trained model (``model.pt``) and its data (``data.npz``).

Run once, from anywhere: ``python examples/byo-vibration/make_files.py``. The outputs are
committed with this script; ``edgeops build`` never runs it (it is not an entry point).

It stands in for a team's own training code: it draws windows from the vibration example's
generator with fixed seeds, trains a small MLP (106-64-32-5) on 6000 of them and saves its
``state_dict``. The model is trained on inputs standardized with the mean and std of the
shipped training split (what ``[preprocessing] kind = "standardize"`` recomputes in the
build), so the bundle's preprocessing is exactly what the model was trained with. Only a
few hundred rows per split are shipped, to keep ``data.npz`` small: they are what the build
calibrates int8 on, profiles for the drift reference and measures accuracy with.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "vibration"))

import vibration_data  # noqa: E402  (the generator of the sibling example)
from byo_model import build_model  # noqa: E402

#: Rows shipped per split (float32, 106 features: 424 bytes a row).
SHIPPED = {"train": 320, "val": 80, "test": 400}
TRAIN_ROWS = 6000
EPOCHS = 40


def main() -> None:
    """Write ``data.npz`` and ``model.pt`` next to this script."""
    x_train, y_train = vibration_data.generate(TRAIN_ROWS, 101)
    x_val, y_val = vibration_data.generate(SHIPPED["val"], 102)
    x_test, y_test = vibration_data.generate(SHIPPED["test"], 103)
    n = SHIPPED["train"]
    np.savez(
        HERE / "data.npz",
        x_train=x_train[:n].astype(np.float32),
        y_train=y_train[:n].astype(np.int64),
        x_val=x_val.astype(np.float32),
        y_val=y_val.astype(np.int64),
        x_test=x_test.astype(np.float32),
        y_test=y_test.astype(np.int64),
        feature_names=np.array(vibration_data.feature_names()),
        label_names=np.array(vibration_data.LABELS),
    )
    # The statistics edgeops computes from the shipped training split (float64, population std).
    shipped = x_train[:n].astype(np.float32).astype(np.float64)
    mean, std = shipped.mean(axis=0), shipped.std(axis=0)
    std[std < 1e-12] = 1.0
    x = torch.from_numpy(((x_train - mean) / std).astype(np.float32))
    y = torch.from_numpy(y_train.astype(np.int64))
    torch.manual_seed(0)
    model = build_model(x.shape[1], len(vibration_data.LABELS))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    shuffle = torch.Generator().manual_seed(0)
    for _ in range(EPOCHS):
        model.train()
        order = torch.randperm(x.shape[0], generator=shuffle)
        for start in range(0, x.shape[0], 128):
            idx = order[start : start + 128]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        xt = torch.from_numpy(((x_test - mean) / std).astype(np.float32))
        accuracy = float((model(xt).argmax(dim=1).numpy() == y_test).mean())
    torch.save(model.state_dict(), HERE / "model.pt")
    print(f"wrote data.npz and model.pt; float accuracy on the shipped test split {accuracy:.4f}")


if __name__ == "__main__":
    main()
