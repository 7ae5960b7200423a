"""The callback under DDP (2 CPU processes, gloo): masks bit-identical on every rank."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed

from lightning_fls import FLSPruningCallback
from tests.callback_models import TinyClassifier


class SaveRankState(pl.Callback):
    def __init__(self, directory: str, pruning: FLSPruningCallback) -> None:
        self.directory = directory
        self.pruning = pruning

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state: dict[str, Any] = {
            "masks": {k: m.cpu() for k, m in self.pruning.masks.items()},
            "weights": {k: v.detach().cpu() for k, v in pl_module.state_dict().items()},
            "history": self.pruning.history,
        }
        torch.save(state, Path(self.directory) / f"rank{trainer.global_rank}.pt")


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs gloo")
def test_masks_are_identical_on_every_rank(tmp_path: Path) -> None:
    torch.manual_seed(0)
    pruning = FLSPruningCallback(
        target_sparsity=0.7, start_epoch=0, end_epoch=2, aux_every_n_steps=1, verbose=False
    )
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        callbacks=[pruning, SaveRankState(str(tmp_path), pruning)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(TinyClassifier(optimizer="sgd"))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["masks"]
    for key, mask in ranks[0]["masks"].items():
        assert torch.equal(mask, ranks[1]["masks"][key]), key
        sparsity = 1 - mask.float().mean().item()
        assert 0.5 < sparsity < 0.9
    for key, value in ranks[0]["weights"].items():
        assert torch.equal(value, ranks[1]["weights"][key]), key  # DDP keeps replicas equal
    final = ranks[0]["history"][-1]["fls/sparsity"]
    assert final == pytest.approx(0.7, abs=1 / 384)


def test_sharded_strategies_are_refused() -> None:
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    fake_trainer = SimpleNamespace(strategy=FSDPStrategy(), max_epochs=1)  # FSDP needs a GPU
    with pytest.raises(ValueError, match="sharded strategy FSDPStrategy"):
        FLSPruningCallback(verbose=False).setup(fake_trainer, TinyClassifier(), "fit")  # type: ignore[arg-type]
