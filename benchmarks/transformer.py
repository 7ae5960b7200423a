"""Transformer benchmark: a patch transformer on Fashion-MNIST pruned one-shot and gradually.

For each seed a dense :class:`~lightning_fls.models.PatchTransformer` (pre-norm, 16 tokens of
7×7 patches, d = 64, 2 blocks, ``nn.MultiheadAttention``) is trained for ``--dense-epochs``.
From that same dense state, for every method and target:

* **one-shot**: :func:`~lightning_fls.prune_one_shot` with ``--samples-per-step`` training
  images of calibration (16 recomputation steps for fls and obert, one for sparsegpt and
  magnitude), no fine-tuning;
* **gradual**: ``--prune-epochs + --finetune-epochs`` more epochs of training with
  :class:`~lightning_fls.FLSPruningCallback` (cubic schedule, pruning at the end of each of the
  first ``--prune-epochs`` epochs, then fine-tuning at the target); the dense reference for it
  is the dense model trained as many more epochs without pruning.

Targets: unstructured 50/70/90% and the semi-structured ``2:4`` pattern. Pruned: every
weight inside the transformer blocks (attention in-projection, out-projection, MLP), the
library's default for attention models; the patch embedding and the head stay dense. The
metric is test accuracy (10 000 images).

    .venv/bin/python -m benchmarks.transformer --seeds 3     # about an hour on 2 cores
    .venv/bin/python -m benchmarks.transformer --quick       # a minute (smoke run)

Results go to ``docs/results/transformer.json`` (``transformer_quick.json`` with ``--quick``)
after every run; an interrupted run resumes where it stopped under the same protocol.
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
from lightning_fls import FLSPruningCallback, prunable_layers, prune_one_shot
from lightning_fls.data import FashionMNISTDataModule
from lightning_fls.models import PatchTransformer
from lightning_fls.patterns import NMPattern, follows_pattern, parse_pattern

METHODS = ("fls", "obert", "sparsegpt", "magnitude")
TARGETS = ("0.5", "0.7", "0.9", "2:4")
MODES = ("oneshot", "gradual")


def target_options(target: str) -> tuple[float, str | None]:
    """``(sparsity, pattern)`` of a target such as ``"0.9"`` or ``"2:4"``."""
    pattern = parse_pattern(target) if ":" in target else None
    return (pattern.sparsity, target) if pattern is not None else (float(target), None)


def pruned_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    layers = prunable_layers(model, None, None)
    return {key: getattr(a.module, a.key_parameter).detach() for key, a in layers.items()}


def measure(model: pl.LightningModule, data: FashionMNISTDataModule, pattern: str | None) -> dict:
    [metrics] = trainer(1, []).test(model, datamodule=data, verbose=False)
    weights = pruned_weights(model)
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    result: dict[str, Any] = {
        "metric": float(metrics["test_acc"]),
        "test_loss": float(metrics["test_loss"]),
        "sparsity": zeros / sum(w.numel() for w in weights.values()),
    }
    nm = parse_pattern(pattern)
    if isinstance(nm, NMPattern):
        result["follows_pattern"] = all(follows_pattern(w, nm) for w in weights.values())
    return result


def run(args: argparse.Namespace) -> Path:
    name = "transformer" + ("_quick" if args.quick else "")
    path = RESULTS_DIR / f"{name}.json" if args.out is None else Path(args.out) / f"{name}.json"
    protocol = {
        "model": "PatchTransformer(patch_size=7, d_model=64, num_heads=4, depth=2, mlp_dim=128)",
        "dense_epochs": args.dense_epochs,
        "prune_epochs": args.prune_epochs,
        "finetune_epochs": args.finetune_epochs,
        "train_images": args.train_size or 60000,
        "batch_size": 100,
        "samples_per_step": args.samples_per_step,
        "aux_every_n_steps": args.aux_every_n_steps,
        **({} if args.token_fraction is None else {"token_fraction": args.token_fraction}),
    }
    previous = json.loads(path.read_text()) if path.is_file() else None
    runs: list[dict[str, Any]] = []
    if previous is not None and previous.get("protocol") == protocol and not args.restart:
        check_resumable(path, previous)
        runs = previous["runs"]  # resume: keep what was measured with the same code and protocol
    done = {(r["mode"], r["method"], r["target"], r["seed"]) for r in runs}

    def save() -> None:
        payload = {
            "command": "python -m benchmarks.transformer " + " ".join(sys.argv[1:]),
            "metric": "test_acc",
            "better": "higher",
            "protocol": protocol,
            "runs": runs,
        }
        write_json(name, payload, out=path)

    data = FashionMNISTDataModule(
        args.data_dir, task="classification", batch_size=100, train_size=args.train_size
    )
    data.setup("fit")
    for seed in range(args.seeds):
        todo = [("dense", "dense", "0")] + [
            (mode, method, target)
            for mode in args.modes
            for target in args.targets
            for method in args.methods
        ]
        if "gradual" in args.modes:  # the dense model trained as many more epochs, unpruned
            todo.append(("gradual", "dense", "0"))
        todo = [t for t in todo if (*t, seed) not in done]
        if not todo:
            continue
        pl.seed_everything(seed, verbose=False)
        dense = PatchTransformer()
        start = time.perf_counter()
        trainer(args.dense_epochs, []).fit(dense, datamodule=data)
        dense_seconds = time.perf_counter() - start
        print(f"[seed {seed}] dense trained in {dense_seconds:.0f} s", flush=True)
        for mode, method, target in todo:
            own: dict[str, Any] = {}  # fls/kfac's token_fraction, where given
            if args.token_fraction is not None and method in ("fls", "kfac"):
                own["token_fraction"] = args.token_fraction
            model = copy.deepcopy(dense)
            sparsity, pattern = target_options(target)
            pl.seed_everything(seed, verbose=False)
            start = time.perf_counter()
            if mode == "oneshot":
                calibration = torch.utils.data.DataLoader(
                    data.train, batch_size=100, shuffle=True,
                    generator=torch.Generator().manual_seed(seed),
                )  # fmt: skip
                model.eval()
                prune_one_shot(
                    model,
                    calibration,
                    model.loss,
                    sparsity=sparsity,
                    method=method,  # type: ignore[arg-type]
                    pattern=pattern,
                    samples_per_step=args.samples_per_step,
                    seed=seed,
                    progress=False,
                    **own,
                )
            elif mode == "gradual" and method == "dense":
                trainer(args.prune_epochs + args.finetune_epochs, []).fit(model, datamodule=data)
            elif mode == "gradual":
                pruning = FLSPruningCallback(
                    target_sparsity=sparsity,
                    pattern=pattern,
                    start_epoch=0,
                    end_epoch=args.prune_epochs,
                    method=method,  # type: ignore[arg-type]
                    samples_per_step=args.samples_per_step,
                    aux_every_n_steps=args.aux_every_n_steps,
                    verbose=False,
                    **own,
                )
                trainer(args.prune_epochs + args.finetune_epochs, [pruning]).fit(
                    model, datamodule=data
                )
            seconds = time.perf_counter() - start
            result = measure(model, data, pattern)
            if mode == "dense":
                seconds = dense_seconds
            runs.append(
                {"mode": mode, "method": method, "target": target, "seed": seed,
                 "seconds": seconds, **result}
            )  # fmt: skip
            save()
            print(
                f"[seed {seed}] {mode:8s} {method:9s} {target:4s}: acc {result['metric']:.4f}, "
                f"sparsity {result['sparsity']:.3f}, {seconds:.0f} s",
                flush=True,
            )
    save()
    return path


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--targets", nargs="+", default=list(TARGETS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 … n-1")
    parser.add_argument("--dense-epochs", type=int, default=6)
    parser.add_argument("--prune-epochs", type=int, default=2)
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--train-size", type=int, default=None, help="default: all 60 000")
    parser.add_argument("--samples-per-step", type=int, default=1024)
    parser.add_argument("--aux-every-n-steps", type=int, default=10)
    parser.add_argument(
        "--token-fraction",
        type=float,
        default=None,
        help="fls/kfac: fraction of each image's 16 patch tokens in the Kronecker statistics "
        "(default: the method's own)",
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
        help="smoke run: 1 seed, 2 000 images, 1+1+1 epochs, 256 samples",
    )
    args = parser.parse_args(argv)
    for target in args.targets:
        target_options(target)  # refuses a bad target before any training
    if args.quick:
        args.seeds = 1
        args.train_size = args.train_size or 2000
        args.dense_epochs = args.prune_epochs = args.finetune_epochs = 1
        args.samples_per_step = 256
        args.methods = ["fls", "sparsegpt", "magnitude"]
    return run(args)


if __name__ == "__main__":
    main()
