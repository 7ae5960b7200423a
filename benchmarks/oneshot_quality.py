"""One-shot pruning quality on real data: FLS against the baselines, no fine-tuning.

Models trained on Fashion-MNIST (the Debian package ``dataset-fashion-mnist``; trained models are
cached under ``benchmarks/.cache``). Two well-conditioned tasks, the FishLeg paper's kind:

* ``autoencoder``: the FishLeg benchmark autoencoder 784-1000-500-250-30-250-500-1000-784 on
  the full training set, Bernoulli likelihood; metric: test loss (per-image summed binary
  cross-entropy; lower is better);
* ``classifier``: LeNet-300-100 (784-300-100-10) on the full training set; metric: test
  accuracy.

And four ill-conditioned ones, of the kind users bring (each trained on a small subset until it
fits it almost perfectly, so the empirical Fisher is tiny and carried by a few examples; metric:
test accuracy on the 10 000 test images):

* ``padded``: images zero-padded to 36×36 (512 of 1296 inputs always zero), MLP 1296-64-64-10,
  2 000 training images;
* ``raw``: unnormalised pixels (0–255), LeNet-300-100, 5 000 training images;
* ``duplicated``: every pixel twice (exactly collinear inputs) into tiny layers 1568-16-8-10,
  whose 50-blocks cross rows, 2 000 training images;
* ``wide``: a very wide last hidden layer and head, 784-32-2048-10, 2 000 training images.

Each (method, sparsity, seed) prunes a fresh copy of the trained model with
``lightning_fls.prune_one_shot``; the seed draws the calibration batch order (and the probes),
and every method gets the same examples per recomputation step. Besides the test metric, each
run records the predicted loss increase and the realised increase of the training loss on the
first 2 000 training examples (the calibration data's distribution).

    .venv/bin/python -m benchmarks.oneshot_quality --tasks padded raw   # writes one JSON per task
    .venv/bin/python -m benchmarks.oneshot_quality --quick              # seconds-scale smoke run
"""

from __future__ import annotations

import argparse
import ast
import copy
import itertools
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.common import autoencoder, bernoulli_loss, write_json
from lightning_fls import StructurePolicy
from lightning_fls.datasets import load_fashion_mnist
from lightning_fls.oneshot import METHODS, prune_one_shot

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "obert+joint": ("obert", {"joint": True}),
    "fls+kronecker": ("fls", {"structure": StructurePolicy(), "refine_passes": 1, "joint": False}),
    "fls+block16": ("fls", {"structure": StructurePolicy("block_diagonal", block_size=16)}),
    "kfac+rows": ("kfac", {"joint": True}),
}
"""Method variants: a name for the table, the method, and extra prune_one_shot arguments."""


def resolve(name: str) -> tuple[str, dict[str, Any]]:
    if name in VARIANTS:
        return VARIANTS[name]
    if name not in METHODS:
        raise SystemExit(f"unknown method {name!r}; choose from {METHODS + tuple(VARIANTS)}")
    return name, {}


CACHE = Path(__file__).resolve().parent / ".cache"
REALISED_EXAMPLES = 2000
"""Training examples on which the realised loss increase is measured."""


def mlp(*sizes: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


def lenet_300_100() -> nn.Sequential:
    return mlp(784, 300, 100, 10)


def pad_images(x: Tensor, border: int = 4) -> Tensor:
    """28×28 images zero-padded by ``border`` pixels on every side, flattened."""
    return F.pad(x.reshape(-1, 28, 28), (border,) * 4).reshape(len(x), -1)


@dataclass(frozen=True)
class Task:
    """A model, its data and how it is trained and scored."""

    make: Callable[[], nn.Module]
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    epochs: int
    lr: float
    train_size: int | None = None  # None: all 60 000 images
    transform: Callable[[Tensor], Tensor] | None = None
    autoencoder: bool = False

    @property
    def metric(self) -> str:
        if self.autoencoder:
            return "test loss (per-image BCE, lower is better)"
        return "test accuracy"


TASKS: dict[str, Task] = {
    "autoencoder": Task(autoencoder, bernoulli_loss, epochs=10, lr=1e-3, autoencoder=True),
    "classifier": Task(lenet_300_100, F.cross_entropy, epochs=8, lr=1e-3),
    "padded": Task(
        lambda: mlp(36 * 36, 64, 64, 10),
        F.cross_entropy,
        epochs=150,
        lr=1e-3,
        train_size=2000,
        transform=pad_images,
    ),
    "raw": Task(
        lenet_300_100,
        F.cross_entropy,
        epochs=60,
        lr=1e-4,
        train_size=5000,
        transform=lambda x: (x * 255).round(),
    ),
    "duplicated": Task(
        lambda: mlp(2 * 784, 16, 8, 10),
        F.cross_entropy,
        epochs=150,
        lr=1e-3,
        train_size=2000,
        transform=lambda x: torch.cat([x, x], dim=1),
    ),
    "wide": Task(
        lambda: mlp(784, 32, 2048, 10), F.cross_entropy, epochs=60, lr=1e-3, train_size=2000
    ),
}


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
        if epoch % 10 == 9 or epoch == epochs - 1:
            print(f"  epoch {epoch + 1}/{epochs}: train loss {total / len(loader.dataset):.4g}")


@torch.no_grad()
def mean_loss(task: str, model: nn.Module, x: Tensor, t: Tensor) -> float:
    """The task's loss, averaged over ``x`` in chunks (eval mode)."""
    model.eval()
    loss_fn = TASKS[task].loss_fn
    total = sum(
        float(loss_fn(model(xb), tb)) * len(xb)
        for xb, tb in zip(x.split(1000), t.split(1000), strict=True)
    )
    return total / len(x)


@torch.no_grad()
def evaluate(task: str, model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    if TASKS[task].autoencoder:
        return mean_loss(task, model, x, y)
    return float(
        sum(
            int((model(xb).argmax(1) == yb).sum())
            for xb, yb in zip(x.split(1000), y.split(1000), strict=True)
        )
        / len(x)
    )


def task_setup(task: str, quick: bool) -> dict[str, Any]:
    spec = TASKS[task]
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    if spec.transform is not None:
        train_x, test_x = spec.transform(train_x), spec.transform(test_x)
    train_t, test_t = (train_x, test_x) if spec.autoencoder else (train_y, test_y)
    epochs = spec.epochs
    if spec.train_size is not None:
        train_x, train_t = train_x[: spec.train_size], train_t[: spec.train_size]
    if quick:
        train_x, train_t, epochs = train_x[:5000], train_t[:5000], 1
        test_x, test_t = test_x[:2000], test_t[:2000]
    torch.manual_seed(0)
    model = spec.make()
    path = CACHE / f"{task}{'_quick' if quick else ''}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path))
    else:
        print(f"training {task} ({epochs} epochs)")
        loader = DataLoader(TensorDataset(train_x, train_t), batch_size=100, shuffle=True)
        train(model, loader, spec.loss_fn, epochs, spec.lr)
        CACHE.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return {
        "model": model,
        "loss_fn": spec.loss_fn,
        "train": (train_x, train_t),
        "test": (test_x, test_t),
    }


def run_once(
    task: str, setup: dict[str, Any], method: str, sparsity: float, seed: int, args: Any,
    extra: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """One pruned copy: its metric, predicted and realised loss increase, time (or the error)."""
    model = copy.deepcopy(setup["model"])
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        TensorDataset(*setup["train"]), batch_size=100, shuffle=True, generator=generator
    )
    held = tuple(t[:REALISED_EXAMPLES] for t in setup["train"])
    before = mean_loss(task, model, *held)
    base, variant = resolve(method)
    start = time.perf_counter()
    try:
        report = prune_one_shot(
            model, loader, setup["loss_fn"], sparsity=sparsity, method=base,
            steps=args.steps if base != "magnitude" else None,
            samples_per_step=args.samples_per_step, seed=seed, progress=False,
            **{**variant, **extra},
        )  # fmt: skip
    except Exception as error:  # a crash is a result too: recorded, not hidden
        return {"error": f"{type(error).__name__}: {error}"[:300]}
    return {
        "metric": evaluate(task, model, *setup["test"]),
        "seconds": time.perf_counter() - start,
        "predicted": report.predicted_loss_increase,
        "realised": mean_loss(task, model, *held) - before,
        "fallbacks": report.factorisation_fallbacks,
        "safeguard_reverts": report.safeguard_reverts,
        "achieved_sparsity": report.sparsity,
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
    parser.add_argument(
        "--name", default=None, help="output name prefix (default oneshot_quality): <name>_<task>"
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        help="extra prune_one_shot kwarg, key=value (Python literal)",
    )
    args = parser.parse_args()
    unknown = sorted(set(args.tasks) - set(TASKS))
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; choose from {sorted(TASKS)}")
    extra = {k: ast.literal_eval(v) for k, v in (o.split("=", 1) for o in args.option)}
    if args.quick:
        args.sparsities, args.seeds, args.steps, args.samples_per_step = [0.5, 0.9], 1, 2, 200
    prefix = args.name or ("oneshot_quality_quick" if args.quick else "oneshot_quality")
    for task in args.tasks:
        setup = task_setup(task, args.quick)
        dense = evaluate(task, setup["model"], *setup["test"])
        dense_train = mean_loss(
            task, setup["model"], *(t[:REALISED_EXAMPLES] for t in setup["train"])
        )
        print(f"{task}: dense {dense:.4f} (training loss {dense_train:.3g})")
        rows = []
        for sparsity in args.sparsities:
            for method in args.methods:
                runs = [
                    run_once(task, setup, method, sparsity, seed, args, extra)
                    for seed in range(args.seeds)
                ]
                good = [r for r in runs if "error" in r] == []
                values = [r["metric"] for r in runs if "metric" in r]
                row: dict[str, Any] = {
                    "sparsity": sparsity,
                    "method": method,
                    "metric_mean": statistics.mean(values) if values else None,
                    "metric_std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "values": values,
                    "errors": [r["error"] for r in runs if "error" in r],
                    "predicted": [r["predicted"] for r in runs if "predicted" in r],
                    "realised": [r["realised"] for r in runs if "realised" in r],
                    "fallbacks": sum(r.get("fallbacks", 0) for r in runs),
                    "safeguard_reverts": [r["safeguard_reverts"] for r in runs if "metric" in r],
                    "seconds_mean": statistics.mean(r["seconds"] for r in runs if "seconds" in r)
                    if values
                    else None,
                    "achieved_sparsity": runs[-1].get("achieved_sparsity"),
                }
                rows.append(row)
                shown = (
                    f"{row['metric_mean']:.4f} ± {row['metric_std']:.4f} "
                    f"({row['seconds_mean']:.1f} s, realised/predicted "
                    + ", ".join(
                        f"{r:.3g}/{p:.3g}"
                        for r, p in zip(row["realised"], row["predicted"], strict=True)
                    )
                    + ")"
                    if values
                    else ""
                )
                errors = "" if good else f" {len(row['errors'])} error(s): {row['errors'][0]}"
                print(f"  {sparsity:.2f} {method:12s} {shown}{errors}", flush=True)
        payload = {
            "command": "python -m benchmarks.oneshot_quality " + " ".join(sys.argv[1:]),
            "steps": args.steps,
            "samples_per_step": args.samples_per_step,
            "seeds": args.seeds,
            "options": {k: repr(v) for k, v in extra.items()},
            "tasks": {
                task: {
                    "metric": TASKS[task].metric,
                    "dense": dense,
                    "dense_training_loss": dense_train,
                    "rows": rows,
                }
            },
        }
        print(f"wrote {write_json(f'{prefix}_{task}', payload)}")


if __name__ == "__main__":
    main()
