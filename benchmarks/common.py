"""Shared helpers for the benchmarks: the FishLeg autoencoder, timing, JSON output."""

from __future__ import annotations

import itertools
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

RESULTS_DIR = Path(__file__).resolve().parent.parent / "docs" / "results"

AUTOENCODER_SIZES = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)


def autoencoder(sizes: Sequence[int] = AUTOENCODER_SIZES) -> nn.Sequential:
    """The FishLeg benchmark autoencoder: ReLU everywhere but the code layer and the output."""
    layers: list[nn.Module] = []
    code = len(sizes) // 2
    for i, (d_in, d_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(d_in, d_out))
        if i + 1 not in (code, len(sizes) - 1):
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def bernoulli_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-example summed binary cross-entropy, averaged over the batch."""
    bce = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="sum")
    return bce / logits.shape[0]


def time_interleaved(
    functions: dict[str, Callable[[], Any]], *, repeats: int, warmup: int = 2
) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved round-robin.

    Interleaving spreads the machine's background noise evenly over the candidates, so their
    ratios are fairer than with back-to-back loops.
    """
    for fn in functions.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def machine() -> dict[str, Any]:
    """Facts about the machine a benchmark ran on."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
    }


def write_json(name: str, payload: dict[str, Any], out: Path | None = None) -> Path:
    """Write a result file (``docs/results/<name>.json`` unless ``out`` is given)."""
    path = out or RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
