"""Soak: a long gradual schedule over many short epochs, cut into checkpoint/resume cycles.

Checks that the cut run ends with the unbroken run's masks and weights, and that memory stays
flat: the tensors the callback holds, and the tensors alive in the process, do not grow from
one pruning point to the next.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_fls import FLSPruningCallback
from tests.callback_models import TinyClassifier


def held_tensor_bytes(root: object) -> int:
    """Bytes of the distinct tensor storages reachable from ``root``'s attributes."""
    seen_objects: set[int] = set()
    storages: dict[int, int] = {}
    stack: list[Any] = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen_objects:
            continue
        seen_objects.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            stack.extend(obj)
        elif isinstance(obj, nn.Module):
            stack.extend(obj.state_dict(keep_vars=True).values())
        elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("lightning_fls"):
            stack.extend(vars(obj).values())
    return sum(storages.values())


def live_tensors() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


class Probe(pl.Callback):
    """Measures, at every epoch end after pruning, what the callback and the process hold."""

    def __init__(self, pruning: FLSPruningCallback) -> None:
        self.pruning = pruning
        self.held: list[int] = []
        self.alive: list[int] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.held.append(held_tensor_bytes(self.pruning))
        self.alive.append(live_tensors())


def fit(
    tmp_path: Path, epochs: int, end_epoch: int, ckpt_path: str | None = None
) -> tuple[pl.LightningModule, FLSPruningCallback, Probe]:
    torch.manual_seed(0)
    model = TinyClassifier(optimizer="sgd", hidden=64)
    pruning = FLSPruningCallback(
        target_sparsity=0.95,
        start_epoch=1,
        end_epoch=end_epoch,
        aux_every_n_steps=2,
        samples_per_step=64,
        verbose=False,
    )
    probe = Probe(pruning)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[pruning, probe, checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        accelerator="cpu",
        default_root_dir=str(tmp_path),
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    return model, pruning, probe


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
@pytest.mark.parametrize(
    ("epochs", "cycles"),
    [(8, 2), pytest.param(40, 8, marks=pytest.mark.slow)],
    ids=["short", "soak"],
)
def test_resume_cycles_match_an_unbroken_run_and_memory_stays_flat(
    tmp_path: Path, epochs: int, cycles: int
) -> None:
    end_epoch = epochs - 2
    straight, straight_pruning, straight_probe = fit(tmp_path / "straight", epochs, end_epoch)

    per_cycle = epochs // cycles
    held, alive = [], []
    ckpt: str | None = None
    for cycle in range(1, cycles + 1):
        model, pruning, probe = fit(tmp_path / "cut", cycle * per_cycle, end_epoch, ckpt)
        ckpt = str(tmp_path / "cut" / "ckpt" / "last.ckpt")
        held.extend(probe.held)
        alive.extend(probe.alive)

    for key, mask in straight_pruning.masks.items():
        assert torch.equal(mask, pruning.masks[key]), key
    for key, value in straight.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    assert pruning.history[-1]["fls/sparsity"] == pytest.approx(0.95, abs=2e-3)
    assert [h["epoch"] for h in pruning.history] == [h["epoch"] for h in straight_pruning.history]

    # Memory: from the first pruning point on, nothing held by the callback grows, in the
    # unbroken run and across the resumed cycles alike.
    for series in (straight_probe.held, held):
        steady = series[1:]
        assert max(steady) <= steady[0], series
    print("held bytes", straight_probe.held, "live tensors", straight_probe.alive)
    steady_alive = straight_probe.alive[2:]  # after the first pruning point has built Q
    assert max(steady_alive) <= steady_alive[0], straight_probe.alive
