"""Example LightningModules for the ``fls`` command line and the examples.

* :class:`FishLegAutoencoder`: the FishLeg/K-FAC benchmark autoencoder
  784-1000-500-250-30-250-500-1000-784 (ReLU, linear code layer, Bernoulli output), loss = the
  per-image summed binary cross-entropy averaged over the batch;
* :class:`MLPClassifier`: LeNet-300-100 style classifier 784-300-100-10, cross-entropy, accuracy;
* :class:`ConvClassifier`: a small CNN classifier for 28×28 grey images;
* :class:`PatchTransformer`: a small pre-norm transformer encoder classifying 28×28 grey images
  as a sequence of patches (built from :class:`TransformerBlock`, :class:`SelfAttention` and
  :class:`MLPBlock`).

All log ``train_loss`` and ``val_loss``/``test_loss``; the classifiers also log ``val_acc`` and
``test_acc``, the fraction of examples whose highest logit is the target class over the whole
validation or test set (a torchmetrics ``MulticlassAccuracy`` that Lightning accumulates over the
epoch).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, Literal, cast

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_fls._validation import check_choice, check_positive_int

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
    def __init__(self, lr: float, num_classes: int | None = None) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"`lr` must be > 0, got {lr!r}.")
        self.lr = lr
        # A classifier's accuracy, one metric per evaluation stage (val, test); "micro" averaging is
        # the plain fraction of correct predictions. Metric states are not in the state_dict.
        self.accuracy = nn.ModuleDict(
            {}
            if num_classes is None
            else {
                stage: MulticlassAccuracy(num_classes, average="micro") for stage in ("val", "test")
            }
        )

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
        if stage in self.accuracy:
            accuracy = cast(MulticlassAccuracy, self.accuracy[stage])
            accuracy.update(outputs, targets)
            # Logging the metric object: Lightning computes it over the epoch, then resets it.
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
        super().__init__(lr, num_classes=tuple(sizes)[-1])
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
        super().__init__(lr, num_classes=classes)
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


IMAGE_SIDE = 28
"""Side of the square grey images :class:`PatchTransformer` reads (Fashion-MNIST)."""

ATTENTION_KINDS = ("mha", "linear")
"""Accepted ``attention`` values of :class:`TransformerBlock` and :class:`PatchTransformer`."""


def _check_dropout(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`dropout` must be a number in [0, 1), got {value!r}.")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"`dropout` must be in [0, 1), got {value!r}.")
    return float(value)


def _check_heads(d_model: Any, num_heads: Any) -> None:
    check_positive_int("d_model", d_model)
    check_positive_int("num_heads", num_heads)
    if d_model % num_heads:
        raise ValueError(
            f"`d_model` ({d_model}) must be a multiple of `num_heads` ({num_heads}); accepted "
            f"`num_heads` for this `d_model`: "
            f"{[h for h in range(1, d_model + 1) if d_model % h == 0]}."
        )


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate query, key, value and output projections.

    The Hugging Face layout: four ``nn.Linear(d_model, d_model)`` (with bias) named ``q_proj``,
    ``k_proj``, ``v_proj`` and ``o_proj``, so that each projection is a prunable Linear layer of
    its own. The attention itself is ``F.scaled_dot_product_attention`` (no mask). With the
    weights copied from an ``nn.MultiheadAttention`` (``q/k/v`` = the three row blocks of its
    ``in_proj_weight`` and ``in_proj_bias``, ``o_proj`` = its ``out_proj``) the output is the
    same. ``head_dim = d / H``; :func:`~lightning_fls.compact` may later remove heads, leaving
    ``num_heads · head_dim < d`` (q/k/v rows and ``o_proj`` columns cut).

    Args:
        d_model: Token width ``d``, a multiple of ``num_heads``.
        num_heads: Number of heads ``H``; each has width ``d / H``.
        dropout: Dropout probability on the attention weights (training only), in ``[0, 1)``.
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        _check_heads(d_model, num_heads)
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.dropout = _check_dropout(dropout)
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.o_proj = nn.Linear(d_model, d_model)

    def _heads(self, x: Tensor) -> Tensor:
        """``[B, T, H · head_dim]`` → ``[B, H, T, head_dim]``."""
        batch, tokens, _ = x.shape
        return x.reshape(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        """Self-attention of tokens ``[B, T, d]``; returns ``[B, T, d]``."""
        batch, tokens, _ = x.shape
        attended = F.scaled_dot_product_attention(
            self._heads(self.q_proj(x)),
            self._heads(self.k_proj(x)),
            self._heads(self.v_proj(x)),
            dropout_p=self.dropout if self.training else 0.0,
        )
        inner = self.num_heads * self.head_dim  # d, or less once compact() removed heads
        output: Tensor = self.o_proj(attended.transpose(1, 2).reshape(batch, tokens, inner))
        return output


class MLPBlock(nn.Module):
    """The transformer feed-forward block ``fc2(dropout(GELU(fc1(x))))``, then dropout.

    Args:
        d_model: Token width ``d``.
        mlp_dim: Hidden width.
        dropout: Dropout probability after the GELU and after ``fc2``, in ``[0, 1)``.
    """

    def __init__(self, d_model: int, mlp_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("mlp_dim", mlp_dim)
        p = _check_dropout(dropout)
        self.fc1 = nn.Linear(d_model, mlp_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp_dim, d_model)
        self.dropout = nn.Dropout(p)

    def forward(self, x: Tensor) -> Tensor:
        """Tokens ``[B, T, d]`` → ``[B, T, d]``."""
        output: Tensor = self.dropout(self.fc2(self.dropout(self.act(self.fc1(x)))))
        return output


class TransformerBlock(nn.Module):
    """A pre-norm transformer encoder block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    Args:
        d_model: Token width ``d``, a multiple of ``num_heads``.
        num_heads: Number of attention heads.
        mlp_dim: Hidden width of the feed-forward block (:class:`MLPBlock`).
        dropout: Dropout probability (attention weights and feed-forward block), in ``[0, 1)``.
        attention: ``"mha"``: ``self.attn`` is ``nn.MultiheadAttention`` (one packed
            ``in_proj_weight`` ``[3d, d]`` and an ``out_proj`` Linear); ``"linear"``:
            ``self.attn`` is :class:`SelfAttention` (four separate Linear projections).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        mlp_dim: int,
        dropout: float = 0.0,
        attention: Literal["mha", "linear"] = "mha",
    ) -> None:
        super().__init__()
        _check_heads(d_model, num_heads)
        check_positive_int("mlp_dim", mlp_dim)
        p = _check_dropout(dropout)
        self.attention = check_choice("attention", attention, ATTENTION_KINDS)
        self.norm1 = nn.LayerNorm(d_model)
        self.attn: nn.Module
        if self.attention == "mha":
            self.attn = nn.MultiheadAttention(d_model, num_heads, dropout=p, batch_first=True)
        else:
            self.attn = SelfAttention(d_model, num_heads, p)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = MLPBlock(d_model, mlp_dim, p)

    def forward(self, x: Tensor) -> Tensor:
        """Tokens ``[B, T, d]`` → ``[B, T, d]``."""
        h = self.norm1(x)
        if self.attention == "mha":
            # The same tensor as query, key and value: self-attention (and MHA's fast path).
            attended: Tensor = self.attn(h, h, h, need_weights=False)[0]
        else:
            attended = self.attn(h)
        x = x + attended
        output: Tensor = x + self.mlp(self.norm2(x))
        return output


class PatchTransformer(_Module):
    """A small pre-norm transformer classifying 28×28 grey images as sequences of patches.

    The image is cut into ``T = (28 / p)²`` non-overlapping ``p × p`` patches in row-major order
    (tokens ``[B, T, p²]``), each embedded by ``embed`` (``Linear(p² → d)``), plus a learned
    position embedding ``pos`` ``[1, T, d]``; then ``depth`` :class:`TransformerBlock`, a final
    LayerNorm, the mean over tokens ``[B, d]`` and ``head`` (``Linear(d → classes)``). With the
    defaults (``p = 7``, 16 tokens, ``d = 64``) it has 72 k parameters, 69 k of them Linear
    weights; with ``attention="mha"`` 25 k of those sit in ``nn.MultiheadAttention``'s packed
    ``in_proj_weight`` ``[3d, d]`` (a Parameter, not a Linear layer).

    Args:
        num_classes: Number of classes.
        patch_size: Patch side ``p``; must divide 28 (1, 2, 4, 7, 14 or 28).
        d_model: Token width ``d``, a multiple of ``num_heads``.
        num_heads: Number of attention heads.
        depth: Number of transformer blocks.
        mlp_dim: Hidden width of each block's feed-forward layer.
        dropout: Dropout probability in ``[0, 1)``.
        attention: ``"mha"`` (``nn.MultiheadAttention``) or ``"linear"`` (:class:`SelfAttention`,
            separate ``q_proj``/``k_proj``/``v_proj``/``o_proj`` Linear layers).
        lr: Adam learning rate.
    """

    def __init__(
        self,
        num_classes: int = 10,
        patch_size: int = 7,
        d_model: int = 64,
        num_heads: int = 4,
        depth: int = 2,
        mlp_dim: int = 128,
        dropout: float = 0.0,
        attention: Literal["mha", "linear"] = "mha",
        lr: float = 1e-3,
    ) -> None:
        check_positive_int("num_classes", num_classes)
        super().__init__(lr, num_classes=num_classes)
        check_positive_int("patch_size", patch_size)
        if IMAGE_SIDE % patch_size:
            divisors = [s for s in range(1, IMAGE_SIDE + 1) if IMAGE_SIDE % s == 0]
            raise ValueError(
                f"`patch_size` must divide {IMAGE_SIDE} (one of {divisors}), got {patch_size!r}."
            )
        _check_heads(d_model, num_heads)
        check_positive_int("depth", depth)
        check_positive_int("mlp_dim", mlp_dim)
        _check_dropout(dropout)
        check_choice("attention", attention, ATTENTION_KINDS)
        self.save_hyperparameters()
        self.patch_size = patch_size
        tokens = (IMAGE_SIDE // patch_size) ** 2
        self.embed = nn.Linear(patch_size * patch_size, d_model)
        self.pos = nn.Parameter(torch.zeros(1, tokens, d_model))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(
            TransformerBlock(d_model, num_heads, mlp_dim, dropout, attention) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def patches(self, x: Tensor) -> Tensor:
        """Cut images into non-overlapping ``p × p`` patches.

        Args:
            x: Images ``[B, 1, 28, 28]``, ``[B, 28, 28]`` or ``[B, 784]``.

        Returns:
            Patches ``[B, T, p²]``, ``T = (28 / p)²``, in row-major order over the image, pixels
            row-major within a patch.

        Raises:
            ValueError: If the images do not hold 784 pixels each.
        """
        if x.dim() not in (2, 3, 4) or x[0].numel() != IMAGE_SIDE * IMAGE_SIDE:
            raise ValueError(
                f"PatchTransformer expects images [B, 1, 28, 28], [B, 28, 28] or [B, 784], "
                f"got shape {tuple(x.shape)}."
            )
        p = self.patch_size
        images = x.reshape(x.shape[0], IMAGE_SIDE, IMAGE_SIDE)
        # [B, 28/p, 28/p, p, p]: patch row, patch column, then the pixels of the patch.
        grid = images.unfold(1, p, p).unfold(2, p, p)
        return grid.reshape(x.shape[0], -1, p * p)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``[B, classes]`` of images (any layout :meth:`patches` reads).

        Args:
            x: Images ``[B, 1, 28, 28]``, ``[B, 28, 28]`` or ``[B, 784]``.

        Returns:
            Logits ``[B, num_classes]``.

        Raises:
            ValueError: If the images do not hold 784 pixels each.
        """
        tokens = self.embed(self.patches(x)) + self.pos
        for block in self.blocks:
            tokens = block(tokens)
        output: Tensor = self.head(self.norm(tokens).mean(dim=1))
        return output

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Cross-entropy, batch mean."""
        return F.cross_entropy(outputs.float(), targets)
