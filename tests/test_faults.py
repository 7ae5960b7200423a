"""Faults in the auxiliary fit: non-finite updates skipped, divergence rolled back."""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_fls import FLSPruningCallback, prune_one_shot
from lightning_fls.fishleg import AuxiliaryOptimizer, StructurePolicy
from tests.callback_models import TinyClassifier
from tests.helpers import classifier_and_loader

KRONECKER = {
    "structure": StructurePolicy(),
    "steps": 1,
    "samples_per_step": 100,
    "progress": False,
    "sparsity": 0.6,
}


def test_a_diverging_aux_fit_is_rolled_back_to_its_start() -> None:
    model, loader = classifier_and_loader()
    reference = copy.deepcopy(model)
    prune_one_shot(reference, loader, F.cross_entropy, refine_passes=0, **KRONECKER)  # type: ignore[arg-type]
    with pytest.warns(RuntimeWarning, match="auxiliary fit diverged"):
        prune_one_shot(model, loader, F.cross_entropy, refine_passes=3, aux_lr=100.0, **KRONECKER)  # type: ignore[arg-type]
    # Q returned to its statistics-based start: the same OBS step as without refinement.
    for (name, value), expected in zip(
        model.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        assert torch.equal(value, expected), name


def test_a_stable_aux_fit_is_kept() -> None:
    model, loader = classifier_and_loader()
    reference = copy.deepcopy(model)
    prune_one_shot(reference, loader, F.cross_entropy, refine_passes=0, **KRONECKER)  # type: ignore[arg-type]
    with warnings.catch_warnings():
        # (The safeguard may warn about this one-step 60% Kronecker prune; no divergence may.)
        warnings.filterwarnings(
            "error", message=".*auxiliary fit diverged", category=RuntimeWarning
        )
        prune_one_shot(model, loader, F.cross_entropy, refine_passes=1, aux_lr=1e-3, **KRONECKER)  # type: ignore[arg-type]
    assert any(
        not torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), reference.state_dict().values(), strict=True)
    )


def test_non_finite_aux_updates_are_skipped_and_never_reach_q(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lightning_fls.engine import PruningEngine

    model, loader = classifier_and_loader()
    original = AuxiliaryOptimizer.step
    engines: list[PruningEngine] = []
    snapshots: list[dict[str, torch.Tensor]] = []

    def poisoned_step(self: AuxiliaryOptimizer, fvps, damping, **kwargs):  # type: ignore[no-untyped-def]
        snapshots.append(
            {k: v.clone() for b in self.blocks.values() for k, v in b.state_dict().items()}
        )
        poisoned = {key: (lambda V: V * math.nan) for key in fvps}  # every product non-finite
        return original(self, poisoned, damping, **kwargs)

    monkeypatch.setattr(AuxiliaryOptimizer, "step", poisoned_step)
    init = PruningEngine.__init__

    def remember(self: PruningEngine, *args, **kwargs):  # type: ignore[no-untyped-def]
        init(self, *args, **kwargs)
        engines.append(self)

    monkeypatch.setattr(PruningEngine, "__init__", remember)
    with warnings.catch_warnings():  # skipped updates are not a divergence
        warnings.filterwarnings(
            "error", message=".*auxiliary fit diverged", category=RuntimeWarning
        )
        prune_one_shot(model, loader, F.cross_entropy, refine_passes=1, **KRONECKER)  # type: ignore[arg-type]
    [engine] = engines
    assert engine.skipped_aux_updates == 2 * 3  # two batches of 50, three layers each
    blocks = engine.method.blocks  # type: ignore[attr-defined]
    assert blocks is not None
    after = {k: v for b in blocks.values() for k, v in b.state_dict().items()}
    for key, value in snapshots[0].items():  # nothing non-finite reached λ
        assert torch.equal(after[key], value), key
    for weight in (p for n, p in model.named_parameters() if n.endswith("weight")):
        assert torch.isfinite(weight).all()


def test_the_callback_rolls_back_a_diverging_fit_and_raises_the_damping(tmp_path: Path) -> None:
    pruning = FLSPruningCallback(
        target_sparsity=0.6,
        start_epoch=0,
        end_epoch=2,
        aux_every_n_steps=1,
        structure=StructurePolicy(),
        refine_passes=2,
        aux_lr=100.0,
        verbose=False,
    )
    trainer = pl.Trainer(
        max_epochs=3,
        callbacks=[pruning],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=str(tmp_path),
    )
    torch.manual_seed(0)
    model = TinyClassifier()
    with pytest.warns(RuntimeWarning, match="auxiliary fit diverged"):
        trainer.fit(model)
    first, second = pruning.history
    assert first["fls/rollbacks"] == 1
    assert second["fls/rollbacks"] == 2
    assert pruning.state_dict()["damping_scale"] == 100.0
    # The second point's γ carries the first rollback's 10× (relative to the same scale).
    assert second["fls/damping"] > 3 * first["fls/damping"]
    assert second["fls/sparsity"] == pytest.approx(0.6, abs=1 / 384)
    for parameter in model.parameters():
        assert torch.isfinite(parameter).all()
