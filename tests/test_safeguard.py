"""The realised-versus-predicted safeguard: harmful corrections are undone, named and remedied."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fls import FLSPruningCallback, prune_one_shot
from lightning_fls.engine import DAMPING_RAISE, PruningEngine
from lightning_fls.layers import prunable_layers
from lightning_fls.methods import resolve_method
from lightning_fls.options import build_options
from lightning_fls.safeguard import SAFEGUARD_RATIO, Snapshot, check_step, record, snapshot
from tests.callback_models import TinyClassifier


def regression_model() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(64, 6)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
    with torch.no_grad():
        y = model(x)
    return model, x, y


def probe(model: nn.Module, x: torch.Tensor, y: torch.Tensor):  # type: ignore[no-untyped-def]
    def loss() -> float:
        with torch.no_grad():
            return float(F.mse_loss(model(x), y))

    return loss


def step_setup():  # type: ignore[no-untyped-def]
    """A fitted model, its layers and their state before a step, the loss probe, full masks."""
    model, x, y = regression_model()
    layers = prunable_layers(model, None, None)
    loss = probe(model, x, y)
    masks = {key: torch.ones_like(a.module.weight, dtype=torch.bool) for key, a in layers.items()}
    return model, x, layers, snapshot(layers), loss, loss(), masks


def test_a_correction_worse_than_zeroing_is_undone_and_only_that_layer() -> None:
    model, x, layers, before, loss, loss_before, masks = step_setup()
    masks["0.weight"][0, :2] = False
    masks["2.weight"][1, 0] = False
    with torch.no_grad():
        for key, adapter in layers.items():
            adapter.module.weight.mul_(masks[key])
        model[0].weight[1:] += 3.0  # a wild "correction" of layer 0
        # A helpful one of layer 2: its bias takes over the mean of the pruned weight's term.
        hidden = torch.tanh(x @ before["0.weight"]["weight"].T + before["0.weight"]["bias"])
        model[2].bias[1] += before["2.weight"]["weight"][1, 0] * hidden[:, 0].mean()
        corrected_bias = model[2].bias.clone()
    outcome = check_step(layers, masks, before, loss_before, loss, predicted=1e-6)
    assert outcome.reverted == ["0.weight"]
    zeroed = before["0.weight"]["weight"] * masks["0.weight"]
    assert torch.equal(model[0].weight, zeroed)
    assert torch.equal(model[0].bias, before["0.weight"]["bias"])
    assert torch.equal(model[2].bias, corrected_bias)
    assert outcome.realised == pytest.approx(loss() - loss_before)
    assert outcome.ratio is not None
    assert outcome.ratio > SAFEGUARD_RATIO


def test_a_layer_missing_from_the_snapshot_was_not_stepped_and_is_left_alone() -> None:
    model, _, layers, before, loss, loss_before, masks = step_setup()
    masks["0.weight"][0, :2] = False
    with torch.no_grad():
        model[0].weight.mul_(masks["0.weight"])
        model[0].weight[1:] += 3.0  # a wild correction: undone when the layer is in the copy
        kept = model[0].weight.clone()
    partial = Snapshot()
    record(partial, "2.weight", layers["2.weight"])
    bias = model[2].bias.detach().clone()
    with torch.no_grad():
        model[2].bias += 1.0
        record(partial, "2.weight", layers["2.weight"])  # already there: the first copy stays
        model[2].bias.copy_(bias)
    assert torch.equal(partial["2.weight"]["bias"], before["2.weight"]["bias"])
    outcome = check_step(layers, masks, partial, loss_before, loss, predicted=1e-6)
    assert outcome.reverted == []
    assert torch.equal(model[0].weight, kept)
    outcome = check_step(layers, masks, before, loss_before, loss, predicted=1e-6)
    assert outcome.reverted == ["0.weight"]


def test_a_step_within_its_prediction_is_left_alone() -> None:
    model, _, layers, before, loss, loss_before, masks = step_setup()
    with torch.no_grad():
        model[0].weight[1:] += 3.0
    realised = loss() - loss_before
    outcome = check_step(layers, masks, before, loss_before, loss, predicted=realised)
    assert outcome.reverted == []
    assert outcome.realised == pytest.approx(realised)
    assert not torch.equal(model[0].weight, before["0.weight"]["weight"])


def test_engine_warns_naming_the_layer_and_raises_the_damping() -> None:
    model, x, y = regression_model()
    layers = prunable_layers(model, None, None)
    options = build_options(
        resolve_method("fls"), sparsity=0.5, steps=1, samples_per_step=64, damping=1e-2,
        progress=False,
    )  # fmt: skip
    engine = PruningEngine(layers, options, torch.device("cpu"))

    class Wild:
        """A curvature estimate whose corrections are far too large for layer 0."""

        def __init__(self, shape: tuple[int, int], scale: float) -> None:
            self.shape, self.scale = shape, scale

        def qv(self, V: torch.Tensor) -> torch.Tensor:
            return self.scale * V.sum() * torch.ones_like(V)

        def diag_q(self) -> torch.Tensor:
            return torch.full(self.shape, 1e3)  # ρ = w²/2000: a tiny predicted increase

    curvature = {
        key: Wild(a.canonical_shape, 5e4 if key == "0.weight" else 0.0) for key, a in layers.items()
    }
    with pytest.warns(RuntimeWarning, match=r"`0\.weight`.*larger `damping`"):
        outcome = engine.prune_step(curvature, 0.5, probe(model, x, y))  # type: ignore[arg-type]
    assert "0.weight" in outcome.reverted
    assert engine.safeguard_reverts == len(outcome.reverted)
    assert engine.damping_scale == DAMPING_RAISE
    for key, adapter in layers.items():  # masks intact, pruned weights exactly zero
        assert torch.all(adapter.module.weight[~engine.masks[key]] == 0)
    assert sum(int((~m).sum()) for m in engine.masks.values()) == round(0.5 * (30 + 10))


def test_prune_one_shot_reports_the_realised_increase_on_calibration_batches() -> None:
    model, x, y = regression_model()
    y = y + 0.1 * torch.randn_like(y)
    original = copy.deepcopy(model)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    report = prune_one_shot(
        model, loader, F.mse_loss, sparsity=0.6, steps=1, samples_per_step=64, progress=False
    )
    with torch.no_grad():
        expected = float(F.mse_loss(model(x), y)) - float(F.mse_loss(original(x), y))
    assert report.realised_loss_increase == pytest.approx(expected, rel=1e-4, abs=1e-7)
    assert "realised" in str(report)
    magnitude = prune_one_shot(
        original, loader, F.mse_loss, sparsity=0.6, method="magnitude", progress=False
    )
    assert magnitude.realised_loss_increase is None


def test_the_callback_undoes_a_harmful_correction_and_logs_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = PruningEngine._prune_step

    def harmful(self: PruningEngine, curvature, target):  # type: ignore[no-untyped-def]
        predicted = original(self, curvature, target)
        with torch.no_grad():  # a wild "correction" of the first layer's survivors
            weight = self.layers["net.0.weight"].module.weight
            weight.add_(5.0 * self.masks["net.0.weight"])
        return predicted

    monkeypatch.setattr(PruningEngine, "_prune_step", harmful)
    pruning = FLSPruningCallback(
        target_sparsity=0.6, start_epoch=0, end_epoch=2, aux_every_n_steps=1, verbose=False
    )
    trainer = pl.Trainer(
        max_epochs=3, callbacks=[pruning], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
        default_root_dir=str(tmp_path),
    )  # fmt: skip
    torch.manual_seed(0)
    model = TinyClassifier()
    with pytest.warns(RuntimeWarning, match=r"`net\.0\.weight`"):
        trainer.fit(model)
    first, second = pruning.history
    assert first["fls/safeguard_reverts"] >= 1
    assert second["fls/safeguard_reverts"] >= 2
    assert second["fls/damping"] > 3 * first["fls/damping"]  # raised after the first point
    assert pruning.state_dict()["safeguard_reverts"] == second["fls/safeguard_reverts"]
    assert first["fls/factorisation_fallbacks"] == 0
    weight = model.net[0].weight
    assert float(weight[pruning.masks["net.0.weight"]].abs().max()) < 5.0  # the +5 was undone
