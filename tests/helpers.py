"""Helpers shared by several test modules (test modules import from here, never from each other).

Fake Fashion-MNIST IDX files, a small trained classifier with its loader, a quiet CPU Trainer, and a
dense stand-in for a curvature estimate.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fls.datasets import FASHION_MNIST_FILES

F64 = torch.float64


def write_idx(path: Path, array: np.ndarray, code: int, compress: bool) -> None:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if compress:
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def fake_fashion_mnist(directory: Path, train: int = 300, test: int = 100) -> Path:
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("test", test)):
        image_file, label_file = FASHION_MNIST_FILES[split]
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        write_idx(directory / image_file, images, 0x08, compress=True)
        write_idx(directory / label_file, rng.integers(0, 10, n, dtype=np.uint8), 0x08, True)
    return directory


def classifier_and_loader(seed: int = 0) -> tuple[nn.Module, DataLoader]:
    torch.manual_seed(seed)
    x = torch.randn(400, 6)
    y = (x @ torch.randn(6, 3)).argmax(1)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model, DataLoader(TensorDataset(x, y), batch_size=50)


def trainer(
    tmp_path: Path, callbacks: list[pl.Callback], max_epochs: int, **kwargs: Any
) -> pl.Trainer:
    options: dict[str, Any] = {
        "max_epochs": max_epochs,
        "callbacks": callbacks,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(tmp_path),
        "accelerator": "cpu",
        "deterministic": True,
    }
    options.update(kwargs)
    return pl.Trainer(**options)


class DenseCurvature:
    def __init__(self, Q: torch.Tensor, shape: tuple[int, int]) -> None:
        self.Q, self.shape = Q, shape

    def qv(self, V: torch.Tensor) -> torch.Tensor:
        return (V.reshape(-1, self.Q.shape[0]) @ self.Q).reshape(V.shape)

    def diag_q(self) -> torch.Tensor:
        return torch.diagonal(self.Q).reshape(self.shape)

    def block_matrices(self) -> tuple[torch.Tensor, int]:
        return self.Q.unsqueeze(0), self.Q.shape[0]


def random_spd(n: int) -> torch.Tensor:
    A = torch.randn(n, n, dtype=F64)
    return A @ A.T / n + 0.1 * torch.eye(n, dtype=F64)
