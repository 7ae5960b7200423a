"""Gradual pruning with fine-tuning: FLS against oBERT, M-FAC and magnitude in one protocol.

For each task and seed a dense model is trained for ``--dense-epochs``; then, from that same
dense state, every (method, sparsity) is trained ``--prune-epochs + --finetune-epochs`` more
epochs with ``FLSPruningCallback`` (cubic schedule from 0 to the target over the first
``--prune-epochs`` epochs, pruning at each of their ends, then fine-tuning at the target). The
dense reference is the dense state trained the same extra epochs without pruning. Every run
sees the same data order and optimizer (Adam, a fresh one at the start of the continuation).

Tasks: ``autoencoder`` (the FishLeg autoencoder, test loss in nats per image, lower is better)
and ``cnn`` (a small CNN classifier, :class:`lightning_fls.models.ConvClassifier`, test
accuracy, higher is better), both on Fashion-MNIST.

    .venv/bin/python -m benchmarks.gradual --tasks cnn autoencoder --seeds 3  # hours on 2 cores
    .venv/bin/python -m benchmarks.gradual --quick                          # minutes

Results are written after every run to ``docs/results/gradual_<task>.json`` (``_quick`` with
``--quick``); a run already in the file is not repeated, so an interrupted benchmark resumes
where it stopped. Each run keeps the callback's history (sparsity per layer at each point).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from benchmarks.common import RESULTS_DIR, check_resumable, trainer, write_json
from lightning_fls import FLSPruningCallback, PruningMethod, StructurePolicy
from lightning_fls.data import FashionMNISTDataModule
from lightning_fls.methods import FLS
from lightning_fls.models import ConvClassifier, FishLegAutoencoder

TASKS: dict[str, dict[str, Any]] = {
    "autoencoder": {"data_task": "autoencoder", "metric": "test_loss", "better": "lower"},
    "cnn": {"data_task": "classification", "metric": "test_acc", "better": "higher"},
}
METHODS = ("fls", "obert", "mfac", "magnitude")
SPARSITIES = (0.7, 0.8, 0.9, 0.95)


def make_model(task: str) -> pl.LightningModule:
    return FishLegAutoencoder() if task == "autoencoder" else ConvClassifier()


def prunable_sparsity(model: torch.nn.Module) -> float:
    weights = [
        m.weight for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
    ]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def continue_training(
    dense: pl.LightningModule,
    data: FashionMNISTDataModule,
    task: str,
    seed: int,
    epochs: int,
    pruning: FLSPruningCallback | None,
) -> dict[str, Any]:
    model = copy.deepcopy(dense)
    pl.seed_everything(seed, verbose=False)
    start = time.perf_counter()
    t = trainer(epochs, [] if pruning is None else [pruning])
    t.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    [metrics] = t.test(model, datamodule=data, verbose=False)
    result: dict[str, Any] = {
        "metric": float(metrics[TASKS[task]["metric"]]),
        "test_loss": float(metrics["test_loss"]),
        "sparsity": prunable_sparsity(model),
        "seconds": seconds,
    }
    if pruning is not None:
        result["prune_seconds"] = sum(h["fls/prune_seconds"] for h in pruning.history)
        result["history"] = pruning.history
    return result


def fls_method(method: str, block_size: int | None) -> str | PruningMethod:
    """``method``, or FLS with blocks of ``block_size`` when one is given for ``"fls"``."""
    if method != "fls" or block_size is None:
        return method
    return FLS(structure=StructurePolicy("block_diagonal", block_size=block_size))


def load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def run_task(task: str, args: argparse.Namespace) -> Path:
    name = f"gradual_{task}" + ("_quick" if args.quick else "")
    path = RESULTS_DIR / f"{name}.json" if args.out is None else Path(args.out) / f"{name}.json"
    protocol = {
        "dense_epochs": args.dense_epochs,
        "prune_epochs": args.prune_epochs,
        "finetune_epochs": args.finetune_epochs,
        "train_images": args.train_size or 60000,
        "batch_size": 100,
        "schedule": "cubic",
        "samples_per_step": args.samples_per_step,
        "aux_every_n_steps": args.aux_every_n_steps,
    }
    if args.block_size is not None:
        protocol["fls_block_size"] = args.block_size
    if args.row_update is not None:
        protocol["fls_row_update"] = args.row_update
    previous = load(path)
    runs: list[dict[str, Any]] = []
    if previous is not None and previous.get("protocol") == protocol and not args.restart:
        check_resumable(path, previous)
        runs = previous["runs"]  # resume: keep what was measured with the same code and protocol
    done = {(r["method"], r["sparsity_target"], r["seed"]) for r in runs}

    def save() -> None:
        payload = {
            "command": "python -m benchmarks.gradual " + " ".join(sys.argv[1:]),
            "task": task,
            "metric": TASKS[task]["metric"],
            "better": TASKS[task]["better"],
            "protocol": protocol,
            "runs": runs,
        }
        write_json(name, payload, out=path)

    data = FashionMNISTDataModule(
        args.data_dir,
        task=TASKS[task]["data_task"],
        batch_size=100,
        train_size=args.train_size,
    )
    extra = args.prune_epochs + args.finetune_epochs
    for seed in args.seeds_list:
        todo = [
            (method, sparsity)
            for method in ["dense", *args.methods]
            for sparsity in ([0.0] if method == "dense" else args.sparsities)
            if (method, sparsity, seed) not in done
        ]
        if not todo:
            continue
        pl.seed_everything(seed, verbose=False)
        dense = make_model(task)
        start = time.perf_counter()
        trainer(args.dense_epochs, []).fit(dense, datamodule=data)
        print(f"[{task} seed {seed}] dense trained in {time.perf_counter() - start:.0f} s")
        for method, sparsity in todo:
            pruning = None
            if method != "dense":
                pruning = FLSPruningCallback(
                    target_sparsity=sparsity,
                    schedule="cubic",
                    start_epoch=0,
                    end_epoch=args.prune_epochs,
                    method=fls_method(method, args.block_size),
                    samples_per_step=args.samples_per_step,
                    aux_every_n_steps=args.aux_every_n_steps,
                    row_update=args.row_update if method == "fls" else None,
                    verbose=False,
                )
            result = continue_training(dense, data, task, seed, extra, pruning)
            runs.append({"method": method, "sparsity_target": sparsity, "seed": seed, **result})
            save()
            print(
                f"[{task} seed {seed}] {method:9s} {sparsity:.2f}: "
                f"{TASKS[task]['metric']} {result['metric']:.4f}, sparsity "
                f"{result['sparsity']:.4f}, {result['seconds']:.0f} s",
                flush=True,
            )
    save()
    return path


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--sparsities", nargs="+", type=float, default=list(SPARSITIES))
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 … n-1")
    parser.add_argument("--dense-epochs", type=int, default=5)
    parser.add_argument("--prune-epochs", type=int, default=4)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=None, help="default: all 60 000")
    parser.add_argument("--samples-per-step", type=int, default=1024)
    parser.add_argument("--aux-every-n-steps", type=int, default=10)
    parser.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="B of fls's block-diagonal Q (default: the method's own)",
    )
    parser.add_argument(
        "--row-update",
        choices=["auto", "joint", "refined_sweep", "sweep"],
        default=None,
        help="fls's row_update (default: the callback's own, refined_sweep)",
    )
    parser.add_argument("--data-dir", default=None, help="default: the Debian package")
    parser.add_argument("--out", default=None, help="directory (default docs/results)")
    parser.add_argument(
        "--restart",
        action="store_true",
        help="discard the runs already in the result file and measure them all again",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 seed, 2 000 images, 1+1+1 epochs, fls and magnitude at 0.9",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds = 1
        args.train_size = args.train_size or 2000
        args.dense_epochs = args.prune_epochs = args.finetune_epochs = 1
        args.methods = ["fls", "magnitude"]
        args.sparsities = [0.9]
        args.samples_per_step = 256
    args.seeds_list = list(range(args.seeds))
    return [run_task(task, args) for task in args.tasks]


if __name__ == "__main__":
    main()
