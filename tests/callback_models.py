"""Small LightningModules and data for the callback tests."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


def classification_data(
    n: int = 256, features: int = 12, classes: int = 4, seed: int = 0
) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator)
    w = torch.randn(features, classes, generator=generator)
    y = (x @ w + 0.3 * torch.randn(n, classes, generator=generator)).argmax(1)
    return TensorDataset(x, y)


class TinyClassifier(pl.LightningModule):
    def __init__(
        self,
        optimizer: str = "adam",
        lr: float = 1e-2,
        batch_size: int = 32,
        features: int = 12,
        hidden: int = 24,
        classes: int = 4,
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))
        self.optimizer_name = optimizer
        self.lr = lr
        self.batch_size = batch_size
        self.data = classification_data(features=features, classes=classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "sgd-momentum":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        if self.optimizer_name == "adam-scheduler":
            optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
            }
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(
                self.parameters(), lr=self.lr, momentum=0.9, nesterov=True, weight_decay=1e-2
            )
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.1)
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=False)


class TwoOptimizerClassifier(TinyClassifier):
    """Manual optimization with one optimizer per layer."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        first, second = self.optimizers()  # type: ignore[misc]
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        first.zero_grad()
        second.zero_grad()
        self.manual_backward(loss)
        first.step()
        second.step()
        return loss.detach()

    def configure_optimizers(self) -> Any:
        return (
            torch.optim.SGD(self.net[0].parameters(), lr=self.lr, momentum=0.9),
            torch.optim.Adam(self.net[2].parameters(), lr=self.lr),
        )
