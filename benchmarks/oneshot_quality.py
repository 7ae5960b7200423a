"""One-shot pruning quality on real data: FLS against the baselines, no fine-tuning.

Two models trained on full Fashion-MNIST (cached under ``benchmarks/.cache``):

* ``autoencoder``: the FishLeg benchmark autoencoder 784-1000-500-250-30-250-500-1000-784 with a
  Bernoulli likelihood; metric: test loss (per-image summed binary cross-entropy; lower is better);
* ``classifier``: LeNet-300-100 (784-300-100-10); metric: test accuracy.

Each (method, sparsity, seed) prunes a fresh copy of the trained model with
``lightning_fls.prune_one_shot``; every method gets the same examples per recomputation step.

    .venv/bin/python -m benchmarks.oneshot_quality                  # full grid (tens of minutes)
    .venv/bin/python -m benchmarks.oneshot_quality --quick          # seconds-scale smoke run
"""

from __future__ import annotations

import argparse
import ast
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.common import autoencoder, bernoulli_loss, write_json
from lightning_fls import StructurePolicy
from lightning_fls.datasets import load_fashion_mnist
from lightning_fls.oneshot import METHODS, prune_one_shot

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "obert+joint": ("obert", {"joint": True}),
    "fls+kronecker": ("fls", {"structure": StructurePolicy(), "refine_passes": 1, "joint": False}),
}
"""Method variants: a name for the table, the method, and extra prune_one_shot arguments."""


def resolve(name: str) -> tuple[str, dict[str, Any]]:
    if name in VARIANTS:
        return VARIANTS[name]
    if name not in METHODS:
        raise SystemExit(f"unknown method {name!r}; choose from {METHODS + tuple(VARIANTS)}")
    return name, {}


CACHE = Path(__file__).resolve().parent / ".cache"


def lenet_300_100() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
    )


def train(model: nn.Module, loader: DataLoader, loss_fn: Callable, epochs: int, lr: float) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for epoch in range(epochs):
        total = 0.0
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(x)
        print(f"  epoch {epoch + 1}/{epochs}: train loss {total / len(loader.dataset):.4f}")


@torch.no_grad()
def evaluate(task: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    if task == "autoencoder":
        return float(
            sum(
                bernoulli_loss(model(xb), yb) * len(xb)
                for xb, yb in zip(x.split(1000), y.split(1000), strict=True)
            )
            / len(x)
        )
    return float((model(x).argmax(1) == y).float().mean())


def task_setup(task: str, quick: bool) -> dict[str, Any]:
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    if task == "autoencoder":
        make, loss_fn, epochs, lr = autoencoder, bernoulli_loss, 10, 1e-3
        train_t, test_t = train_x, test_x
    else:
        make, loss_fn, epochs, lr = lenet_300_100, F.cross_entropy, 8, 1e-3
        train_t, test_t = train_y, test_y
    if quick:
        train_x, train_t, epochs = train_x[:5000], train_t[:5000], 1
        test_x, test_t = test_x[:2000], test_t[:2000]
    torch.manual_seed(0)
    model = make()
    path = CACHE / f"{task}{'_quick' if quick else ''}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path))
    else:
        print(f"training {task} ({epochs} epochs)")
        loader = DataLoader(TensorDataset(train_x, train_t), batch_size=100, shuffle=True)
        train(model, loader, loss_fn, epochs, lr)
        CACHE.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return {
        "model": model,
        "loss_fn": loss_fn,
        "train": (train_x, train_t),
        "test": (test_x, test_t),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tasks", nargs="+", default=["classifier", "autoencoder"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.7, 0.8, 0.9, 0.95])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--samples-per-step", type=int, default=1024)
    parser.add_argument("--name", default=None, help="output name (default oneshot_quality)")
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        help="extra prune_one_shot kwarg, key=value (Python literal)",
    )
    args = parser.parse_args()
    extra = {k: ast.literal_eval(v) for k, v in (o.split("=", 1) for o in args.option)}
    if args.quick:
        args.sparsities, args.seeds, args.steps, args.samples_per_step = [0.5, 0.9], 1, 2, 200
    results: dict[str, Any] = {}
    for task in args.tasks:
        setup = task_setup(task, args.quick)
        test_x, test_t = setup["test"]
        dense = evaluate(task, setup["model"], test_x, test_t)
        print(f"{task}: dense {dense:.4f}")
        rows = []
        for sparsity in args.sparsities:
            for method in args.methods:
                values, seconds = [], []
                for seed in range(args.seeds):
                    model = copy.deepcopy(setup["model"])
                    generator = torch.Generator().manual_seed(seed)
                    loader = DataLoader(
                        TensorDataset(*setup["train"]),
                        batch_size=100,
                        shuffle=True,
                        generator=generator,
                    )
                    start = time.perf_counter()
                    base, variant = resolve(method)
                    report = prune_one_shot(
                        model, loader, setup["loss_fn"], sparsity=sparsity, method=base,
                        steps=args.steps if base != "magnitude" else None,
                        samples_per_step=args.samples_per_step, seed=seed, progress=False,
                        **{**variant, **extra},
                    )  # fmt: skip
                    seconds.append(time.perf_counter() - start)
                    values.append(evaluate(task, model, test_x, test_t))
                row = {
                    "sparsity": sparsity,
                    "method": method,
                    "metric_mean": statistics.mean(values),
                    "metric_std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "values": values,
                    "seconds_mean": statistics.mean(seconds),
                    "achieved_sparsity": report.sparsity,
                }
                rows.append(row)
                mean, std, secs = row["metric_mean"], row["metric_std"], row["seconds_mean"]
                print(
                    f"  {sparsity:.2f} {method:12s} {mean:.4f} ± {std:.4f} ({secs:.1f} s)",
                    flush=True,
                )
        results[task] = {
            "metric": "test loss (per-image BCE, lower is better)"
            if task == "autoencoder"
            else "test accuracy",
            "dense": dense,
            "rows": rows,
        }
    payload = {
        "command": "python -m benchmarks.oneshot_quality " + " ".join(sys.argv[1:]),
        "steps": args.steps,
        "samples_per_step": args.samples_per_step,
        "seeds": args.seeds,
        "options": {k: repr(v) for k, v in extra.items()},
        "tasks": results,
    }
    name = args.name or ("oneshot_quality_quick" if args.quick else "oneshot_quality")
    print(f"wrote {write_json(name, payload)}")


if __name__ == "__main__":
    main()
