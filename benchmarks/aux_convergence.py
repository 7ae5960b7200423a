"""How fast the auxiliary fit approaches (F + γI)⁻¹, by setting: the evidence for the defaults.

A 784-200-100-10 MLP is trained for two epochs on Fashion-MNIST and frozen. For each setting
(block structure, probe kind, initialisation, preconditioning, learning rate) the blocks are fitted
with per-batch empirical Fisher–vector products (batch 100, γ = 1e-2 · mean diag F) and scored by
the expected auxiliary loss ``Â = γ (½ tr(Q F_γ Q) − tr Q) / n`` on a held-out Fisher (1000 other
examples), estimated with the same 32 fixed probes for every setting. Lower is better; the value
for the exact inverse is ``-½ γ tr(F_γ⁻¹)/n``, which no structured block reaches.

    .venv/bin/python -m benchmarks.aux_convergence          # -> docs/results/aux_convergence.json
    .venv/bin/python -m benchmarks.aux_convergence --quick  # fewer settings and steps
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import write_json
from lightning_fls.datasets import load_fashion_mnist
from lightning_fls.fishleg import (
    AuxiliaryOptimizer,
    CurvatureBlock,
    StatisticsAccumulator,
    StructurePolicy,
    relative_damping,
)
from lightning_fls.layers import ExampleGradients, GradientCapture, find_layers


def train_mlp(images: torch.Tensor, labels: torch.Tensor, epochs: int) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(784, 200), nn.ReLU(), nn.Linear(200, 100), nn.ReLU(), nn.Linear(100, 10)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(images)).split(100):
            optimizer.zero_grad()
            F.cross_entropy(model(images[idx]), labels[idx]).backward()
            optimizer.step()
    return model


def batch_gradients(
    model: nn.Module, capture: GradientCapture, x: torch.Tensor, y: torch.Tensor
) -> dict[str, ExampleGradients]:
    with capture:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
    return capture.example_gradients()


def held_out_score(
    blocks: dict[str, CurvatureBlock],
    held: dict[str, ExampleGradients],
    gamma: float,
    probes: dict[str, torch.Tensor],
) -> float:
    """Mean over layers of γ(½ uᵀQF_γQu − uᵀQu)/‖u‖² with fixed Gaussian probes."""
    scores = []
    with torch.no_grad():
        for key, block in blocks.items():
            u = probes[key]
            v = block.operator()(u)
            Fv = held[key].fvp(v) + gamma * v
            scores.append(float(gamma * (v * (0.5 * Fv - u)).sum() / u.square().sum()))
    return sum(scores) / len(scores)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    images, labels = load_fashion_mnist("train")
    model = train_mlp(images[:50000], labels[:50000], epochs=1 if args.quick else 2)
    for p in model.parameters():
        p.requires_grad_(True)
    adapters = find_layers(model)
    capture = GradientCapture(adapters)
    held_x, held_y = images[50000:51000], labels[50000:51000]
    held = batch_gradients(model, capture, held_x, held_y)
    gamma = next(iter(relative_damping(held, 1e-2).values()))
    generator = torch.Generator().manual_seed(1)
    probes = {
        k: torch.randn(32, *a.canonical_shape, generator=generator) for k, a in adapters.items()
    }
    train_x, train_y = images[:50000], labels[:50000]
    stream_gen = torch.Generator().manual_seed(2)

    def batches(n: int):  # type: ignore[no-untyped-def]
        for _ in range(n):
            idx = torch.randint(0, len(train_x), (100,), generator=stream_gen)
            yield batch_gradients(model, capture, train_x[idx], train_y[idx])

    stats: dict[str, StatisticsAccumulator] = {
        k: StatisticsAccumulator({"in_cov", "out_cov"}) for k in adapters
    }
    for grads in batches(16):
        for key, g in grads.items():
            stats[key].update(g)

    checkpoints = (0, 10, 50, 200) if args.quick else (0, 10, 50, 200, 600)
    grid: dict[str, tuple[Any, ...]] = {
        "structure": ("kronecker", "kronecker_no_scale"),
        "probe": ("gaussian", "outer"),
        "init": ("paper", "kfac"),
        "precondition": (False, True),
        "lr": (1e-3, 1e-2) if args.quick else (3e-4, 1e-3, 3e-3, 1e-2),
    }
    results = []
    for values in itertools.product(*grid.values()):
        setting = dict(zip(grid, values, strict=True))
        if setting["probe"] == "outer" and setting["structure"] == "kronecker":
            continue  # outer probes only pay for pure Kronecker blocks
        torch.manual_seed(3)
        policy = StructurePolicy(use_scale=setting["structure"] == "kronecker")
        blocks = {
            k: policy.make_block("kronecker", a.canonical_shape, init_scale=1 / gamma)
            for k, a in adapters.items()
        }
        if setting["init"] == "kfac":
            for key, block in blocks.items():
                block.init_from_statistics(stats[key].result(), gamma)
        aux = AuxiliaryOptimizer(
            blocks,
            lr=setting["lr"],
            probe=setting["probe"],
            precondition=setting["precondition"],
            seed=4,
        )
        curve, start, done = {}, time.perf_counter(), 0
        for target in checkpoints:
            for grads in batches(target - done):
                aux.step({k: g.fvp for k, g in grads.items()}, gamma)
            done = target
            curve[str(target)] = held_out_score(blocks, held, gamma, probes)
        results.append(
            {
                **setting,
                "held_out_aux_loss": curve,
                "seconds": time.perf_counter() - start,
                "skipped": aux.num_skipped,
            }
        )
        print(setting, {k: round(v, 4) for k, v in curve.items()})

    def best(filter_fn):  # type: ignore[no-untyped-def]
        rows = [r for r in results if filter_fn(r)]
        return min(rows, key=lambda r: r["held_out_aux_loss"][str(checkpoints[-1])])

    payload = {
        "command": "python -m benchmarks.aux_convergence" + (" --quick" if args.quick else ""),
        "model": "MLP 784-200-100-10, Fashion-MNIST, trained then frozen",
        "damping": gamma,
        "checkpoints": list(checkpoints),
        "results": results,
        "best_overall": best(lambda r: True),
        "best_without_preconditioning": best(lambda r: not r["precondition"]),
        "best_with_preconditioning": best(lambda r: r["precondition"]),
    }
    name = "aux_convergence_quick" if args.quick else "aux_convergence"
    print(f"wrote {write_json(name, payload, args.out)}")


if __name__ == "__main__":
    main()
