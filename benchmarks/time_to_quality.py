"""Time-to-quality: accuracy against wall time for FLS, oBERT and M-FAC given the same samples.

LeNet-300-100 trained on Fashion-MNIST (the cached model of ``benchmarks.oneshot_quality``),
one-shot to 90% in 16 recomputation steps. Every method runs with the same numbers of
calibration samples per step (128 to 4096); oBERT and M-FAC keep their default gradient batch of
16 examples, so they build each step's Fisher from ``m = samples / 16`` mini-batch gradients.
oBERT also runs once at its published ``m = 1024`` (16 384 samples per step): that run's
accuracy is the quality to reach. For each method the file records its curve, the first setting
that reaches the reference accuracy, and the time ratios at that accuracy.

Batches hold 128 examples, a multiple of the gradient batch, so every sample count is met
exactly and every gradient averages 16 examples. A run that fails is recorded with its error
instead of stopping the benchmark.

    .venv/bin/python -m benchmarks.time_to_quality     # -> docs/results/time_to_quality.json
    .venv/bin/python -m benchmarks.time_to_quality --quick --out /tmp/ttq.json
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.common import RESULTS_DIR, write_json
from benchmarks.oneshot_quality import evaluate, task_setup
from lightning_fls import prune_one_shot
from lightning_fls.methods import resolve_method
from lightning_fls.methods._gradients import MinibatchGradientMethod

SPARSITY = 0.9
STEPS = 16
BATCH_SIZE = 128
"""Examples per loader batch: divides every sample count and is a multiple of 16."""
METHODS = ("fls", "obert", "mfac")
SAMPLES = (128, 256, 512, 1024, 2048, 4096)
QUICK_SAMPLES = (128, 256)
REFERENCE_METHOD = "obert"
REFERENCE_SAMPLES = 16 * 1024
"""oBERT's published setting: m = 1024 gradients of 16 examples each."""
QUICK_REFERENCE_SAMPLES = 1024


def gradients_per_step(method: str, samples: int) -> int | None:
    """The number ``m`` of mini-batch gradients a method builds its Fisher from at each step.

    Args:
        method: A registered method name.
        samples: Calibration samples per step.

    Returns:
        ``m`` for oBERT-like methods (every loader batch split into gradients of the method's
        ``gradient_batch_size`` examples), None for methods that read no mini-batch gradients.
    """
    instance = resolve_method(method)
    if not isinstance(instance, MinibatchGradientMethod):
        return None
    batches = math.ceil(samples / BATCH_SIZE)
    return batches * math.ceil(BATCH_SIZE / instance.gradient_batch_size)


def run(setup: dict[str, Any], method: str, samples: int, seed: int = 0) -> dict[str, Any]:
    """Prune a copy of the model once and measure it.

    Args:
        setup: The classifier task of :func:`benchmarks.oneshot_quality.task_setup`.
        method: A registered method name.
        samples: Calibration samples per step.
        seed: Seed of the loader's shuffling and of the method.

    Returns:
        ``method``, ``samples_per_step`` and ``gradients_per_step`` (None for FLS), then either
        ``accuracy``, ``seconds`` (the whole ``prune_one_shot`` call) and ``curvature_seconds``,
        or ``error`` (the exception's type and message) when the run failed.
    """
    row: dict[str, Any] = {
        "method": method,
        "samples_per_step": samples,
        "gradients_per_step": gradients_per_step(method, samples),
    }
    model = copy.deepcopy(setup["model"])
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        TensorDataset(*setup["train"]), batch_size=BATCH_SIZE, shuffle=True, generator=generator
    )
    start = time.perf_counter()
    try:
        report = prune_one_shot(
            model, loader, setup["loss_fn"], sparsity=SPARSITY, method=method, steps=STEPS,
            samples_per_step=samples, seed=seed, progress=False,
        )  # fmt: skip
    except Exception as error:  # a failure is a result too: recorded, not hidden
        row["error"] = f"{type(error).__name__}: {error}"[:300]
        print(f"{method:6s} samples/step {samples:6d}: failed, {row['error']}", flush=True)
        return row
    seconds = time.perf_counter() - start
    accuracy = evaluate("classifier", model, *setup["test"])
    print(
        f"{method:6s} samples/step {samples:6d}: accuracy {accuracy:.4f} in {seconds:.1f} s",
        flush=True,
    )
    row.update(accuracy=accuracy, seconds=seconds, curvature_seconds=report.curvature_seconds)
    return row


def first_matching(curve: Sequence[dict[str, Any]], accuracy: float) -> dict[str, Any] | None:
    """The first successful run of a curve (fewest samples first) that reaches ``accuracy``."""
    ordered = sorted(curve, key=lambda r: r["samples_per_step"])
    return next((r for r in ordered if r.get("accuracy", -math.inf) >= accuracy), None)


def summarise(reference: dict[str, Any], curves: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Each method's first run reaching the reference accuracy, and the time ratios there.

    Args:
        reference: The reference run (it must have succeeded).
        curves: Runs by method.

    Returns:
        ``first_matching`` (run or None per method), ``speedup_vs_reference`` (reference seconds
        over the matching run's seconds) and ``seconds_vs_fls`` (the matching run's seconds over
        FLS's), None wherever a method (or FLS) never reaches the reference accuracy.
    """
    matches = {m: first_matching(curve, reference["accuracy"]) for m, curve in curves.items()}
    fls = matches.get("fls")
    return {
        "first_matching": matches,
        "speedup_vs_reference": {
            m: None if r is None else reference["seconds"] / r["seconds"]
            for m, r in matches.items()
        },
        "seconds_vs_fls": {
            m: None if r is None or fls is None else r["seconds"] / fls["seconds"]
            for m, r in matches.items()
        },
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Run the reference, then every method at every sample count, and write the JSON."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="small model, two sample counts, smaller reference"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="result file (default docs/results/time_to_quality.json, or "
        "time_to_quality_quick.json with --quick)",
    )
    args = parser.parse_args(argv)
    name = "time_to_quality_quick" if args.quick else "time_to_quality"
    out: Path = args.out or RESULTS_DIR / f"{name}.json"
    setup = task_setup("classifier", args.quick)
    reference_samples = QUICK_REFERENCE_SAMPLES if args.quick else REFERENCE_SAMPLES
    reference = run(setup, REFERENCE_METHOD, reference_samples)
    if "error" in reference:
        raise SystemExit(f"the reference run failed: {reference['error']}")
    curves: dict[str, list[dict[str, Any]]] = {method: [] for method in METHODS}
    # Sample counts outside, methods inside: the machine's drift over the run is shared.
    for samples in QUICK_SAMPLES if args.quick else SAMPLES:
        for method in METHODS:
            curves[method].append(run(setup, method, samples))
    summary = summarise(reference, curves)
    for method, match in summary["first_matching"].items():
        if match is None:
            print(f"{method}: never reaches the reference accuracy {reference['accuracy']:.4f}")
        else:
            print(
                f"{method}: reaches {reference['accuracy']:.4f} at "
                f"{match['samples_per_step']} samples/step in {match['seconds']:.1f} s, "
                f"{summary['speedup_vs_reference'][method]:.2f}x faster than the reference"
            )
    payload = {
        "command": "python -m benchmarks.time_to_quality" + (" --quick" if args.quick else ""),
        "sparsity": SPARSITY,
        "steps": STEPS,
        "batch_size": BATCH_SIZE,
        "reference": reference,
        "curves": curves,
        **summary,
    }
    print(f"wrote {write_json(name, payload, out)}")


if __name__ == "__main__":
    main()
