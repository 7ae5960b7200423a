"""Time-to-quality: how long FLS needs to match oBERT's one-shot quality with m = 1024 gradients.

LeNet-300-100 trained on Fashion-MNIST (the cached model of ``benchmarks.oneshot_quality``),
one-shot to 90% in 16 recomputation steps. oBERT uses m = 1024 gradients of batches of 16 per
step (16 384 samples), its published default. FLS runs with a growing number of samples per
step; the table gives each run's accuracy and wall time, and the first FLS setting that matches
oBERT's accuracy.

    .venv/bin/python -m benchmarks.time_to_quality     # -> docs/results/time_to_quality.json
"""

from __future__ import annotations

import copy
import sys
import time
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.common import write_json
from benchmarks.oneshot_quality import evaluate, task_setup
from lightning_fls import prune_one_shot

SPARSITY = 0.9
STEPS = 16


def run(setup: dict[str, Any], method: str, samples: int, seed: int = 0) -> dict[str, Any]:
    model = copy.deepcopy(setup["model"])
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        TensorDataset(*setup["train"]), batch_size=100, shuffle=True, generator=generator
    )
    start = time.perf_counter()
    report = prune_one_shot(
        model, loader, setup["loss_fn"], sparsity=SPARSITY, method=method, steps=STEPS,
        samples_per_step=samples, seed=seed, progress=False,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    accuracy = evaluate("classifier", model, *setup["test"])
    print(
        f"{method:6s} samples/step {samples:6d}: accuracy {accuracy:.4f} in {seconds:.1f} s",
        flush=True,
    )
    return {"method": method, "samples_per_step": samples, "accuracy": accuracy, "seconds": seconds,
            "curvature_seconds": report.curvature_seconds}  # fmt: skip


def main() -> None:
    quick = "--quick" in sys.argv
    setup = task_setup("classifier", quick)
    reference = run(setup, "obert", 1024 if quick else 16 * 1024)
    fls_runs = []
    for samples in [128, 256] if quick else [128, 256, 512, 1024, 2048, 4096]:
        fls_runs.append(run(setup, "fls", samples))
    matching = next((r for r in fls_runs if r["accuracy"] >= reference["accuracy"]), None)
    payload = {
        "command": "python -m benchmarks.time_to_quality" + (" --quick" if quick else ""),
        "sparsity": SPARSITY,
        "steps": STEPS,
        "obert_m1024": reference,
        "fls": fls_runs,
        "fls_first_matching": matching,
        "speedup_at_match": None
        if matching is None
        else reference["seconds"] / matching["seconds"],
    }
    print(f"wrote {write_json('time_to_quality_quick' if quick else 'time_to_quality', payload)}")


if __name__ == "__main__":
    main()
