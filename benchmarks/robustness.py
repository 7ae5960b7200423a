"""Hyperparameter robustness of one-shot FLS: how far are the defaults from the best setting?

One parameter at a time is moved away from ``prune_one_shot``'s defaults (damping 1e-2, 1024
samples per step, 16 recomputation steps, no auxiliary refinement) on the models of
``benchmarks.oneshot_quality`` (trained on full Fashion-MNIST, cached), pruned one-shot to
``--sparsity`` with no fine-tuning. The parameters:

* ``damping`` (γ relative to mean diag F);
* ``samples_per_step``: the gradients behind each estimate — what the callback's auxiliary
  cadence (``aux_every_n_steps``) controls in a training run;
* ``steps``: recomputation steps (the curvature re-estimated on the survivors between them);
* ``aux_lr``: the learning rate of the FishLeg auxiliary (Adam) fit, with ``refine_passes=1``
  (by default ``fls`` has no such fit). The stored results were measured with the block-diagonal
  Q, the default until 2026-12, whose start is the auxiliary loss's exact optimum.

For each task the JSON gives every setting's metric (mean ± std over seeds) and the gap between
the defaults and the best setting found, relative to the dense model's distance from it
(autoencoder loss) or as accuracy points (classifier).

    .venv/bin/python -m benchmarks.robustness                       # classifier, 3 seeds
    .venv/bin/python -m benchmarks.robustness --tasks autoencoder --seeds 1 --params damping
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.common import RESULTS_DIR, write_json
from benchmarks.oneshot_quality import evaluate, task_setup
from lightning_fls import prune_one_shot

DEFAULTS: dict[str, Any] = {"damping": 1e-2, "samples_per_step": 1024, "steps": 16, "aux_lr": None}
GRID: dict[str, list[Any]] = {
    "damping": [1e-4, 1e-3, 1e-2, 1e-1, 1.0],
    "samples_per_step": [128, 256, 1024, 4096],
    "steps": [1, 4, 16, 32],
    "aux_lr": [None, 1e-4, 1e-3, 1e-2],
}
LOWER_IS_BETTER = {"autoencoder": True, "classifier": False}


def options(param: str, value: Any, quick: bool) -> dict[str, Any]:
    chosen = {**DEFAULTS, param: value}
    aux_lr = chosen.pop("aux_lr")
    if aux_lr is not None:
        chosen.update(aux_lr=aux_lr, refine_passes=1)
    if quick:
        chosen["steps"] = min(chosen["steps"], 2)
    return chosen


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["classifier"])
    parser.add_argument("--params", nargs="+", choices=list(GRID), default=list(GRID))
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="5 000 images, 1 seed, 2 steps")
    args = parser.parse_args(argv)
    name = "robustness" + ("_quick" if args.quick else "")
    path = RESULTS_DIR / f"{name}.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    tasks: dict[str, Any] = previous.get("tasks", {})
    for task in args.tasks:
        setup = task_setup(task, args.quick)
        test_x, test_t = setup["test"]
        dense = evaluate(task, setup["model"], test_x, test_t)
        rows: dict[str, dict[str, Any]] = {}
        seen: dict[str, dict[str, Any]] = {}
        for param in args.params:
            for value in GRID[param]:
                chosen = options(param, value, args.quick)
                key = json.dumps(chosen, sort_keys=True)
                if key not in seen:
                    values, seconds = [], []
                    for seed in range(1 if args.quick else args.seeds):
                        model = copy.deepcopy(setup["model"])
                        loader = DataLoader(
                            TensorDataset(*setup["train"]),
                            batch_size=100,
                            shuffle=True,
                            generator=torch.Generator().manual_seed(seed),
                        )
                        start = time.perf_counter()
                        prune_one_shot(
                            model, loader, setup["loss_fn"], sparsity=args.sparsity,
                            seed=seed, progress=False, **chosen,
                        )  # fmt: skip
                        seconds.append(time.perf_counter() - start)
                        values.append(evaluate(task, model, test_x, test_t))
                    seen[key] = {
                        "options": chosen,
                        "mean": statistics.mean(values),
                        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                        "values": values,
                        "seconds": statistics.mean(seconds),
                    }
                    print(
                        f"{task} {param}={value}: {seen[key]['mean']:.4f} ± "
                        f"{seen[key]['std']:.4f} ({seen[key]['seconds']:.0f} s)",
                        flush=True,
                    )
                rows[f"{param}={value}"] = {"param": param, "value": value, **seen[key]}
        lower = LOWER_IS_BETTER[task]
        default_key = json.dumps(
            options("damping", DEFAULTS["damping"], args.quick), sort_keys=True
        )
        default = seen.get(default_key)
        best_label, best = min(
            rows.items(), key=lambda item: item[1]["mean"] if lower else -item[1]["mean"]
        )
        summary: dict[str, Any] = {"best": best_label, "best_mean": best["mean"]}
        if default is not None:
            summary["default_mean"] = default["mean"]
            if lower:  # loss: the default's excess over the best, relative to the best
                summary["default_gap_percent"] = (
                    100 * (default["mean"] - best["mean"]) / best["mean"]
                )
            else:  # accuracy: the best's advantage in percent of the default
                summary["default_gap_percent"] = (
                    100 * (best["mean"] - default["mean"]) / default["mean"]
                )
        tasks[task] = {
            "metric": "test loss (nats per image)" if lower else "test accuracy",
            "dense": dense,
            "sparsity": args.sparsity,
            "seeds": 1 if args.quick else args.seeds,
            "rows": rows,
            "summary": summary,
        }
        print(f"{task}: {summary}")
        write_json(
            name,
            {
                "command": "python -m benchmarks.robustness " + " ".join(sys.argv[1:]),
                "defaults": DEFAULTS,
                "grid": GRID,
                "tasks": tasks,
            },
        )


if __name__ == "__main__":
    main()
