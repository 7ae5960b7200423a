"""Shared helpers for the benchmarks: the FishLeg autoencoder, timing, JSON output."""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

# The benchmark models are the package's own (re-exported for the benchmark scripts).
from lightning_fls.models import AUTOENCODER_SIZES, bernoulli_loss  # noqa: F401
from lightning_fls.models import autoencoder_network as autoencoder  # noqa: F401

RESULTS_DIR = Path(__file__).resolve().parent.parent / "docs" / "results"


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


def trainer(epochs: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    """A quiet CPU ``Trainer``: no logger, checkpoints, progress bar or validation."""
    return pl.Trainer(
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


def machine() -> dict[str, Any]:
    """Facts about the machine a benchmark ran on."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
    }


REPOSITORY = Path(__file__).resolve().parent.parent
CODE_PATHS = ("lightning_fls", "benchmarks", "examples", "pyproject.toml")
"""What a result depends on: a change here makes earlier results stale."""


def code_version() -> dict[str, Any]:
    """The commit the code ran from, and whether the code had uncommitted changes.

    ``{"commit": sha or None (not a git checkout), "dirty": bool}``; ``dirty`` looks only at
    :data:`CODE_PATHS` (editing the docs or the results does not make a result stale).
    """

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=REPOSITORY, capture_output=True, text=True, check=True
            )
        except (OSError, subprocess.CalledProcessError):
            return None
        return done.stdout.strip()

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--", *CODE_PATHS)
    return {"commit": commit, "dirty": bool(status)}


CODE_VERSION = code_version()
"""The code version when this process started (what it imported), recorded with every result:
a file written at the end of a long run must not describe edits made while it ran."""


def check_resumable(path: Path, previous: dict[str, Any]) -> None:
    """Refuse to add runs to a result file measured with other code (or uncommitted code).

    Resumable benchmarks call this before keeping the runs already in ``path``; it exits with a
    message saying how to measure anew (``--restart``).
    """
    now, then = CODE_VERSION, previous.get("code")
    if now["dirty"] or then is None or then.get("dirty") or then.get("commit") != now["commit"]:
        raise SystemExit(
            f"{path} holds runs measured with code {then or 'of unknown version'}; this code is "
            f"{now}. Runs from different (or uncommitted) code are never mixed in one file: "
            "commit your changes, then pass --restart to measure every run again."
        )


def write_json(name: str, payload: dict[str, Any], out: Path | None = None) -> Path:
    """Write a result file (``docs/results/<name>.json`` unless ``out`` is given).

    Every file records the machine and the code the process started from (:data:`CODE_VERSION`).
    """
    path = out or RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine(), "code": dict(CODE_VERSION), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
