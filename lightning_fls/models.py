"""Example LightningModules for the ``fls`` command line and the examples.

* :class:`FishLegAutoencoder`: the FishLeg/K-FAC benchmark autoencoder
  784-1000-500-250-30-250-500-1000-784 (ReLU, linear code layer, Bernoulli output), loss = the
  per-image summed binary cross-entropy averaged over the batch;
* :class:`MLPClassifier`: LeNet-300-100 style classifier 784-300-100-10, cross-entropy, accuracy.

Both log ``train_loss`` and ``val_loss``/``test_loss`` (and ``*_acc`` for the classifier).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

AUTOENCODER_SIZES = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)


def autoencoder_network(sizes: Sequence[int] = AUTOENCODER_SIZES) -> nn.Sequential:
    """Linear layers of ``sizes``, ReLU after each but the code layer and the output layer."""
    layers: list[nn.Module] = []
    code = len(sizes) // 2
    for index, (d_in, d_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(d_in, d_out))
        if index + 1 not in (code, len(sizes) - 1):
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def bernoulli_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Per-image summed binary cross-entropy with logits, averaged over the batch."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="sum")
    return bce / logits.shape[0]


class _Module(pl.LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"`lr` must be > 0, got {lr!r}.")
        self.lr = lr

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        inputs, targets = batch
        loss = self.loss(self(inputs), targets)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch: Any, stage: str) -> None:
        inputs, targets = batch
        outputs = self(inputs)
        self.log(f"{stage}_loss", self.loss(outputs, targets), prog_bar=True)
        if outputs.shape[-1] != targets.shape[-1] or targets.dim() == 1:
            accuracy = (outputs.argmax(-1) == targets).float().mean()
            self.log(f"{stage}_acc", accuracy, prog_bar=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class FishLegAutoencoder(_Module):
    """The FishLeg benchmark autoencoder on flattened 28×28 images in ``[0, 1]``.

    Input and target ``[B, 784]``; output logits ``[B, 784]``; loss = Bernoulli negative
    log-likelihood summed over pixels, averaged over images (nats per image).

    Args:
        sizes: Layer widths, input first (default 784-1000-500-250-30-250-500-1000-784).
        lr: Adam learning rate.
    """

    def __init__(self, sizes: Sequence[int] = AUTOENCODER_SIZES, lr: float = 1e-3) -> None:
        super().__init__(lr)
        self.save_hyperparameters()
        self.net = autoencoder_network(tuple(sizes))

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction logits ``[B, 784]`` of images ``[B, 784]``."""
        output: Tensor = self.net(x)
        return output

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Bernoulli NLL per image."""
        return bernoulli_loss(outputs, targets)


class MLPClassifier(_Module):
    """A fully connected classifier (LeNet-300-100 by default) for flattened images.

    Args:
        sizes: Layer widths, input first (default 784-300-100-10).
        lr: Adam learning rate.
    """

    def __init__(self, sizes: Sequence[int] = (784, 300, 100, 10), lr: float = 1e-3) -> None:
        super().__init__(lr)
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        for d_in, d_out in itertools.pairwise(tuple(sizes)):
            layers += [nn.Linear(d_in, d_out), nn.ReLU()]
        self.net = nn.Sequential(*layers[:-1])

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``[B, classes]`` of images ``[B, 784]``."""
        output: Tensor = self.net(x)
        return output

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Cross-entropy, batch mean."""
        return F.cross_entropy(outputs.float(), targets)


class ConvClassifier(_Module):
    """A small CNN classifier for 28×28 grey images given flattened (``[B, 784]``).

    ``conv5×5(1→c₁) → ReLU → maxpool 2 → conv5×5(c₁→c₂) → ReLU → maxpool 2 → Linear(49·c₂ →
    hidden) → ReLU → Linear(hidden → classes)``, "same" padding; 83 k weights with the defaults.
    Both convolutions and both Linear layers are prunable.

    Args:
        channels: ``(c₁, c₂)``, the convolutions' output channels.
        hidden: Width of the hidden Linear layer.
        classes: Number of classes.
        lr: Adam learning rate.
    """

    def __init__(
        self,
        channels: Sequence[int] = (8, 16),
        hidden: int = 100,
        classes: int = 10,
        lr: float = 1e-3,
    ) -> None:
        super().__init__(lr)
        self.save_hyperparameters()
        c1, c2 = tuple(channels)
        self.net = nn.Sequential(
            nn.Unflatten(1, (1, 28, 28)),
            nn.Conv2d(1, c1, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(49 * c2, hidden),
            nn.ReLU(),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``[B, classes]`` of images ``[B, 784]``."""
        output: Tensor = self.net(x)
        return output

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Cross-entropy, batch mean."""
        return F.cross_entropy(outputs.float(), targets)
