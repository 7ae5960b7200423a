"""The callback under DDP (2 CPU processes, gloo).

Each rank records the per-example gradients of its share of every global batch; at a pruning
point the shares are gathered, so every rank makes the decision a single process makes on the
same global batches, and the masks agree bit for bit. Checkpoints written by rank 0 resume on
another world size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_fls import FLSPruningCallback
from tests.callback_models import TinyClassifier

pytestmark = [
    pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs gloo"),
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`"),
]
PER_RANK = 8  # examples per rank and step; a global batch holds 2 × 8
OPTIONS: dict[str, Any] = {
    "target_sparsity": 0.7,
    "start_epoch": 0,
    "end_epoch": 2,
    "aux_every_n_steps": 1,
    "samples_per_step": 48,  # the newest 3 global batches
    "verbose": False,
}


class GlobalBatches(TinyClassifier):
    """Global batch i holds examples 2(8i + j) (rank 0's share) and 2(8i + j) + 1 (rank 1's).

    Under DDP each rank loads its own share (``use_distributed_sampler=False``); one process
    loads the whole global batch, rank 0's share first.
    """

    def __init__(self) -> None:
        super().__init__(optimizer="sgd", batch_size=PER_RANK)

    def train_dataloader(self) -> DataLoader[Any]:
        world = self.trainer.world_size
        ranks = [self.global_rank] if world > 1 else [0, 1]
        steps = len(self.data) // (2 * PER_RANK)
        batches = [
            [rank + 2 * (i * PER_RANK + j) for rank in ranks for j in range(PER_RANK)]
            for i in range(steps)
        ]
        return DataLoader(self.data, batch_sampler=batches)


class SaveRankState(pl.Callback):
    def __init__(self, directory: Path, pruning: FLSPruningCallback) -> None:
        self.directory = directory
        self.pruning = pruning

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state: dict[str, Any] = {
            "masks": {k: m.cpu() for k, m in self.pruning.masks.items()},
            "weights": {k: v.detach().cpu() for k, v in pl_module.state_dict().items()},
            "history": self.pruning.history,
        }
        torch.save(state, self.directory / f"rank{trainer.global_rank}.pt")


def run(
    directory: Path,
    devices: int,
    max_epochs: int,
    ckpt_path: str | None = None,
    options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Fit GlobalBatches on 1 or 2 processes; each rank's final masks, weights and history."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = GlobalBatches()
    pruning = FLSPruningCallback(**(options or OPTIONS))
    checkpoints = ModelCheckpoint(dirpath=directory / "ckpt", every_n_epochs=1, save_top_k=-1)
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        callbacks=[pruning, SaveRankState(directory, pruning), checkpoints],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        use_distributed_sampler=False,
        default_root_dir=str(directory),
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    return [torch.load(directory / f"rank{r}.pt", weights_only=True) for r in range(devices)]


def assert_same_pruning(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["masks"]
    for key, mask in a["masks"].items():
        assert torch.equal(mask, b["masks"][key]), key
    for key, value in a["weights"].items():
        # DDP averages per-rank mean gradients, one process takes one mean: rounding differs.
        torch.testing.assert_close(value, b["weights"][key], rtol=1e-4, atol=1e-5)
    assert [h["fls/sparsity"] for h in a["history"]] == [h["fls/sparsity"] for h in b["history"]]


def test_ddp_masks_are_bit_identical_and_equal_a_single_process(tmp_path: Path) -> None:
    ranks = run(tmp_path / "ddp", devices=2, max_epochs=3)
    for key, mask in ranks[0]["masks"].items():
        assert torch.equal(mask, ranks[1]["masks"][key]), key
    for key, value in ranks[0]["weights"].items():
        assert torch.equal(value, ranks[1]["weights"][key]), key  # replicas stay equal
    assert ranks[0]["history"][-1]["fls/sparsity"] == pytest.approx(0.7, abs=1 / 384)

    [single] = run(tmp_path / "single", devices=1, max_epochs=3)
    assert_same_pruning(ranks[0], single)
    # The logged curvature quantities come from the same gathered gradients.
    for ddp_point, single_point in zip(ranks[0]["history"], single["history"], strict=True):
        for name in ("fls/predicted_loss_increase", "fls/aux_loss", "fls/damping"):
            assert ddp_point[name] == pytest.approx(single_point[name], rel=1e-3), name

    # Rank 0's checkpoint after the first pruning point resumes on one process ...
    [checkpoint] = (tmp_path / "ddp" / "ckpt").glob("epoch=0*.ckpt")
    [resumed] = run(tmp_path / "resumed1", devices=1, max_epochs=3, ckpt_path=str(checkpoint))
    assert_same_pruning(ranks[0], resumed)
    # ... and a single process's checkpoint resumes on two.
    [checkpoint] = (tmp_path / "single" / "ckpt").glob("epoch=0*.ckpt")
    resumed2 = run(tmp_path / "resumed2", devices=2, max_epochs=3, ckpt_path=str(checkpoint))
    assert_same_pruning(single, resumed2[0])
    for key, mask in resumed2[0]["masks"].items():
        assert torch.equal(mask, resumed2[1]["masks"][key]), key


def test_ddp_structured_pruning_removes_the_same_neurons_as_one_process(tmp_path: Path) -> None:
    options = {**OPTIONS, "target_sparsity": 0.5, "granularity": "neuron"}
    ranks = run(tmp_path / "ddp", devices=2, max_epochs=3, options=options)
    for key, value in ranks[0]["weights"].items():
        assert torch.equal(value, ranks[1]["weights"][key]), key  # replicas stay equal
    [single] = run(tmp_path / "single", devices=1, max_epochs=3, options=options)
    assert_same_pruning(ranks[0], single)
    for state in (ranks[0], single):
        weights = state["weights"]
        gone = (weights["net.0.weight"] == 0).all(1) & (weights["net.0.bias"] == 0)
        assert int(gone.sum()) == 12  # half of the 24 hidden neurons, biases included
        assert bool((weights["net.2.weight"][:, gone] == 0).all())
    assert [h["fls/units_removed"] for h in ranks[0]["history"]][-1] == pytest.approx(0.5)


def test_sharded_strategies_are_refused() -> None:
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    fake_trainer = SimpleNamespace(strategy=FSDPStrategy(), max_epochs=1)  # FSDP needs a GPU
    model = TinyClassifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="sharded strategy FSDPStrategy"):
        FLSPruningCallback(verbose=False).setup(fake_trainer, model, "fit")  # type: ignore[arg-type]
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_compact_on_train_end_is_refused_under_a_spawned_strategy(tmp_path: Path) -> None:
    options = {**OPTIONS, "target_sparsity": 0.5, "granularity": "neuron"}
    with pytest.raises(Exception, match="compact_on_train_end=True` does not work"):
        run(tmp_path, devices=2, max_epochs=1, options=options | {"compact_on_train_end": True})
