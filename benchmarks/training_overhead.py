"""Training overhead of FLSPruningCallback: the same Trainer with and without it, in one run.

The FishLeg autoencoder on Fashion-MNIST (batch 100, Adam), a whole gradual run: ``epochs``
epochs, pruned to 90% with the cubic schedule between the end of epoch 1 and the start of the
last epoch. Each configuration starts from the same initial weights and data order; the dense
run is timed first and last and its mean is the reference. Reported per configuration: wall
time of ``fit`` and its ratio to dense, time in the callback (recording + pruning) and its
parts at the pruning points (building Q: statistics and factorisation; pruning with it:
saliencies, OBS, the safeguard), final test loss and sparsity. ``in_run_ratio`` is the fit's
time over the same fit less the callback's own seconds (``fls/callback_seconds``): one run
against itself, so the machine's drift between runs cannot move it; it leaves out what the
callback costs outside its hooks' timers (the capture hooks' work inside recorded steps, the
masks re-applied after each optimizer step). The ``row_update`` rows solve the default Kronecker
Q's joint OBS update inside each row exactly (what ``prune_one_shot``'s default ``"auto"`` does
on this model's layers) or by SparseGPT's column sweep alone, where the callback's default
refines the sweep; the block-diagonal row measures FLS's former default structure; ``kfac`` the
same Kronecker Q with the cheaper summed OBS update instead of the joint one inside each row.

    .venv/bin/python -m benchmarks.training_overhead          # docs/results/training_overhead.json
    .venv/bin/python -m benchmarks.training_overhead --quick    # 5 000 images, 3 epochs
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from benchmarks.common import write_json
from lightning_fls import FLSPruningCallback
from lightning_fls.data import FashionMNISTDataModule
from lightning_fls.fishleg import StructurePolicy
from lightning_fls.methods import FLS
from lightning_fls.models import FishLegAutoencoder

CONFIGS: dict[str, dict[str, Any] | None] = {
    "dense": None,
    "fls (default: Kronecker, refined sweep, every 10 steps, 1024 samples)": {},
    "fls, row_update=joint (exact row solves; prune_one_shot's default)": {"row_update": "joint"},
    "fls, row_update=sweep (SparseGPT's column sweep alone)": {"row_update": "sweep"},
    "fls, 256 samples": {"samples_per_step": 256},
    "fls, block-diagonal B = 50 (the default before 2026-12)": {
        "method": FLS(structure=StructurePolicy("block_diagonal"))
    },
    "kfac (Kronecker, summed single OBS updates)": {"method": "kfac"},
    "magnitude": {"method": "magnitude"},
}


def run(
    initial: FishLegAutoencoder,
    data: FashionMNISTDataModule,
    epochs: int,
    options: dict[str, Any] | None,
) -> dict[str, Any]:
    model = copy.deepcopy(initial)
    callbacks: list[pl.Callback] = []
    pruning = None
    if options is not None:
        pruning = FLSPruningCallback(
            target_sparsity=0.9, start_epoch=1, end_epoch=epochs - 1, verbose=False, **options
        )
        callbacks.append(pruning)
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        accelerator="cpu",
    )
    pl.seed_everything(0, verbose=False)
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    [metrics] = trainer.test(model, datamodule=data, verbose=False)
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    result: dict[str, Any] = {
        "seconds": seconds,
        "test_loss": metrics["test_loss"],
        "sparsity": sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights),
    }
    if pruning is not None:
        for part in ("prune", "estimate", "obs"):
            result[f"{part}_seconds"] = sum(h[f"fls/{part}_seconds"] for h in pruning.history)
        result["callback_time_fraction"] = pruning.history[-1]["fls/aux_time_fraction"]
        # The same run's fit time against itself without the callback's own seconds: free of
        # the drift between runs (the dense runs' times moved by 10-15% between benchmark runs).
        callback = pruning.history[-1]["fls/callback_seconds"]
        result["callback_seconds"] = callback
        result["in_run_ratio"] = seconds / (seconds - callback)
        result["pruning_points"] = len(pruning.history)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="default: docs/results/<name>.json")
    parser.add_argument(
        "--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS), metavar="NAME",
        help="configurations to run (dense always runs, first and last)",
    )  # fmt: skip
    args = parser.parse_args()
    epochs = args.epochs or (3 if args.quick else 8)
    data = FashionMNISTDataModule(train_size=5000 if args.quick else None)
    pl.seed_everything(0, verbose=False)
    initial = FishLegAutoencoder()
    results: dict[str, Any] = {}
    dense_times = []
    chosen = {name: CONFIGS[name] for name in ["dense", *args.configs]}
    for name, options in [*chosen.items(), ("dense", None)]:
        result = run(initial, data, epochs, options)
        print(f"{name:45s} {result['seconds']:7.1f} s  test loss {result['test_loss']:.2f}  "
              f"sparsity {result['sparsity']:.4f}", flush=True)  # fmt: skip
        if options is None:
            dense_times.append(result["seconds"])
        results[name] = result
    dense_seconds = sum(dense_times) / len(dense_times)
    results["dense"]["seconds"] = dense_seconds
    results["dense"]["seconds_each"] = dense_times
    for result in results.values():
        result["ratio_to_dense"] = result["seconds"] / dense_seconds
    payload = {
        "command": "python -m benchmarks.training_overhead " + " ".join(sys.argv[1:]),
        "epochs": epochs,
        "batch_size": 100,
        "train_images": 5000 if args.quick else 60000,
        "schedule": {
            "target_sparsity": 0.9,
            "schedule": "cubic",
            "start_epoch": 1,
            "end_epoch": epochs - 1,
        },
        "results": results,
    }
    name = "training_overhead_quick" if args.quick else "training_overhead"
    print(f"wrote {write_json(name, payload, args.out)}")


if __name__ == "__main__":
    main()
