"""Property tests on ill-conditioned data: every method, no error, finite weights, exact sparsity.

Random small models are trained until they fit their data almost perfectly (the empirical
Fisher is then tiny and carried by a few examples), on inputs with the defects users' data has:
always-zero features, unnormalised features (values in the hundreds), exactly duplicated
features; with tiny layers whose 50-blocks cross rows, or a very wide last layer. Calibration
batches come in a random order. These are the conditions under which ``fls`` used to raise a
Cholesky error or lose tens of points of accuracy (issue 14).
"""

from __future__ import annotations

import copy
import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fls import FLSPruningCallback, prune_one_shot
from lightning_fls.oneshot import METHODS

SHAPES = {
    "tiny": (24, 7),  # layers of 24×11, 7×25 and 4×8 entries: 50-blocks cross rows
    "wide": (256,),  # a last layer of 4×257
}


def ill_conditioned_data(seed: int, n: int = 128, d: int = 10) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=generator)
    x[:, 0] = 0.0  # always zero
    x[:, 1] = 0.0
    x[:, 2] = 300.0 * x[:, 2].abs()  # unnormalised, in the hundreds
    x[:, 3] = x[:, 4]  # exactly duplicated
    teacher = torch.randn(d, 4, generator=generator)
    y = (x[:, 3:] @ teacher[3:]).argmax(1)
    return x, y


def fitted_model(seed: int, shape: str, x: Tensor, y: Tensor) -> nn.Module:
    torch.manual_seed(seed)
    widths = (x.shape[1], *SHAPES[shape], 4)
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(nn.GELU())
    model = nn.Sequential(*layers)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    # Adam on these unnormalised inputs is spiky, and where a spike falls depends on the CPU's
    # rounding: the fit returned is the best state seen, not the last one.
    best, best_loss = copy.deepcopy(model.state_dict()), math.inf
    for _ in range(1500):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if float(loss) < best_loss:
            best, best_loss = copy.deepcopy(model.state_dict()), float(loss)
        loss.backward()
        optimizer.step()
    if training_loss(model, x, y) > best_loss:
        model.load_state_dict(best)
    return model


def training_loss(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


# Data seeds on which both small models reach a near-perfect fit in 1500 Adam steps (seeds 1 and
# 6 leave the tiny one stuck near a loss of 1: a training failure, not the regime tested here).
CASES = [(seed, shape) for seed in (0, 2, 3) for shape in SHAPES]


@pytest.mark.parametrize(("seed", "shape"), CASES)
def test_every_method_prunes_ill_conditioned_models_without_error(seed: int, shape: str) -> None:
    x, y = ill_conditioned_data(seed)
    model = fitted_model(seed, shape, x, y)
    dense_loss = training_loss(model, x, y)
    assert dense_loss < 0.05  # the regime of the bug: a near-perfect fit
    realised = {}
    for method in METHODS:
        pruned = copy.deepcopy(model)
        loader = DataLoader(
            TensorDataset(x, y), batch_size=16, shuffle=True,
            generator=torch.Generator().manual_seed(100 + seed),
        )  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # counted fallbacks may warn
            report = prune_one_shot(
                pruned, loader, F.cross_entropy, sparsity=0.8, method=method, progress=False,
                **({} if method in ("magnitude", "sparsegpt") else {"steps": 4}),
                samples_per_step=96, seed=seed,
            )  # fmt: skip
        for name, p in pruned.named_parameters():
            assert bool(torch.isfinite(p).all()), f"{method}: {name} is not finite"
        assert report.sparsity == pytest.approx(0.8, abs=5e-3), method  # layer scope rounds
        realised[method] = training_loss(pruned, x, y) - dense_loss
    # FLS's damage is never far above oBERT's, whose estimator is the closest to its own.
    assert realised["fls"] <= 2.0 * realised["obert"] + 0.05, realised


def test_default_fls_survives_a_fisher_carried_by_one_batch() -> None:
    # The original failure: γ set from the first batch, whose Fisher is orders of magnitude
    # below the step's, left the float32 blocks indefinite (Cholesky error at step 7 of 16).
    x, y = ill_conditioned_data(0)
    model = fitted_model(0, "tiny", x, y)
    order = torch.argsort(F.cross_entropy(model(x), y, reduction="none").detach())
    loader = DataLoader(TensorDataset(x[order], y[order]), batch_size=16)  # easiest first
    report = prune_one_shot(model, loader, F.cross_entropy, sparsity=0.9, progress=False)
    assert report.factorisation_fallbacks == 0
    assert report.sparsity == pytest.approx(0.9, abs=1e-3)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


class IllConditionedModule(pl.LightningModule):
    """A near-perfect fit of the ill-conditioned data, trained on further under the callback."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.x, self.y = ill_conditioned_data(seed)
        self.net = fitted_model(seed, "tiny", self.x, self.y)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=16, shuffle=False)


@pytest.mark.parametrize("method", ["fls", "kfac", "obert", "mfac", "sparsegpt"])
def test_every_factorising_method_prunes_ill_conditioned_data_in_a_trainer(method: str) -> None:
    module = IllConditionedModule(seed=0)
    pruning = FLSPruningCallback(
        target_sparsity=0.9, start_epoch=0, end_epoch=2, aux_every_n_steps=1, method=method,
        verbose=False,
    )  # fmt: skip
    trainer = pl.Trainer(
        max_epochs=3, callbacks=[pruning], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # counted fallbacks or reverts may warn
        trainer.fit(module)
    assert pruning.history[-1]["fls/sparsity"] == pytest.approx(0.9, abs=5e-3)
    assert all(bool(torch.isfinite(p).all()) for p in module.parameters())
    for key, mask in pruning.masks.items():
        weight = dict(module.named_parameters())[key]
        assert torch.all(weight[~mask] == 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_method_prunes_ill_conditioned_models_on_cuda(shape: str) -> None:
    # The float64 factorisations, their eigenvalue fallbacks and the safeguard on CUDA tensors.
    x, y = ill_conditioned_data(0)
    model = fitted_model(0, shape, x, y).cuda()
    x, y = x.cuda(), y.cuda()
    dense_loss = training_loss(model, x, y)
    realised = {}
    for method in METHODS:
        pruned = copy.deepcopy(model)
        loader = DataLoader(TensorDataset(x, y), batch_size=16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            report = prune_one_shot(
                pruned, loader, F.cross_entropy, sparsity=0.8, method=method, progress=False,
                **({} if method in ("magnitude", "sparsegpt") else {"steps": 4}),
                samples_per_step=96,
            )  # fmt: skip
        assert all(p.is_cuda and bool(torch.isfinite(p).all()) for p in pruned.parameters())
        assert report.sparsity == pytest.approx(0.8, abs=5e-3), method
        realised[method] = training_loss(pruned, x, y) - dense_loss
    assert realised["fls"] <= 2.0 * realised["obert"] + 0.05, realised
