"""Run by tests/test_kill_resume.py in subprocesses: train, be killed, resume.

python -m tests.kill_resume_run straight DIR   # 5 epochs, masks to DIR/straight.pt
python -m tests.kill_resume_run killed DIR SIG # checkpoints each epoch, sent SIG in epoch 3
python -m tests.kill_resume_run resume DIR     # resumes from DIR/ckpt/last.ckpt to 5 epochs
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_fls import FLSPruningCallback
from tests.callback_models import TinyClassifier

EPOCHS = 5


class KillAtEpoch(pl.Callback):
    def __init__(self, epoch: int, sig: signal.Signals) -> None:
        self.epoch = epoch
        self.sig = sig

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == 3:  # mid-epoch
            os.kill(os.getpid(), self.sig)


def main(mode: str, directory: Path, sig: str = "SIGKILL") -> None:
    torch.manual_seed(0)
    model = TinyClassifier(optimizer="sgd")
    pruning = FLSPruningCallback(
        target_sparsity=0.8, start_epoch=0, end_epoch=4, aux_every_n_steps=2, verbose=False
    )
    callbacks: list[pl.Callback] = [pruning]
    ckpt_path: Any = None
    if mode != "straight":
        callbacks.append(ModelCheckpoint(dirpath=directory / "ckpt", save_last=True))
    if mode == "killed":
        callbacks.append(KillAtEpoch(3, signal.Signals[sig]))
    if mode == "resume":
        ckpt_path = str(directory / "ckpt" / "last.ckpt")
    trainer = pl.Trainer(
        max_epochs=EPOCHS, callbacks=callbacks, logger=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", deterministic=True,
        enable_checkpointing=mode != "straight", default_root_dir=str(directory),
    )  # fmt: skip
    trainer.fit(model, ckpt_path=ckpt_path)
    torch.save(
        {"masks": pruning.masks, "weights": model.state_dict(), "history": pruning.history},
        directory / f"{mode}.pt",
    )


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), *sys.argv[3:])
