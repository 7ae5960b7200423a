"""GPU check of the transformer and N:M code paths (CUDA only; random data, no download).

On a CUDA device: trains a small :class:`~lightning_fls.models.PatchTransformer` on random
images for a few hundred steps, prunes copies one-shot to 2:4 with every method of the
benchmark (fls, obert, sparsegpt, magnitude) **on the GPU**, checks that every pruned weight
follows 2:4 and compares with the same pruning on the CPU (sparsity, loss); runs the callback to
2:4 in a GPU ``Trainer``; then converts the 2:4 MLP weights of the fls model with
:func:`~lightning_fls.to_semi_structured` (fp16), checks its outputs against the dense fp16
model, and times the model's forward both ways.

    python -m benchmarks.gpu_transformer_check --out docs/results/gpu_transformer_check.json

Elsewhere it prints why on one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs/results/gpu_transformer_check.json"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--dry-run-on-cpu", action="store_true", help="check the script itself")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.dry_run_on_cpu:
        print("gpu_transformer_check: no CUDA device on this machine", file=sys.stderr)
        raise SystemExit(2)

    import lightning.pytorch as pl

    from lightning_fls import (
        FLSPruningCallback,
        follows_pattern,
        parse_pattern,
        prunable_layers,
        prune_one_shot,
        semi_structured_support,
        to_semi_structured,
    )
    from lightning_fls.models import PatchTransformer

    two_four = parse_pattern("2:4")
    assert two_four is not None
    gpu = torch.device("cpu" if args.dry_run_on_cpu else "cuda")
    torch.manual_seed(0)
    x = torch.rand(4096, 784)
    teacher = torch.randn(784, 10)
    y = (x @ teacher).argmax(1)
    model = PatchTransformer().to(gpu)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(args.steps):
        idx = torch.randint(0, len(x), (256,))
        loss = F.cross_entropy(model(x[idx].to(gpu)), y[idx].to(gpu))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    loader = [(x[i : i + 256], y[i : i + 256]) for i in range(0, 2048, 256)]

    def evaluate(m: torch.nn.Module, device: torch.device) -> dict[str, Any]:
        with torch.no_grad():
            out = m(x[2048:].to(device))
            loss = float(F.cross_entropy(out, y[2048:].to(device)))
        weights = {k: getattr(a.module, a.key_parameter).detach()
                   for k, a in prunable_layers(m, None, None).items()}  # fmt: skip
        zeros = sum(int((w == 0).sum()) for w in weights.values())
        return {
            "loss": loss,
            "sparsity": zeros / sum(w.numel() for w in weights.values()),
            "follows_2_4": all(follows_pattern(w, two_four) for w in weights.values()),
        }

    result: dict[str, Any] = {
        "device": "cpu" if args.dry_run_on_cpu else torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "dense": evaluate(model, gpu),
        "oneshot_2_4": {},
    }
    pruned: dict[str, torch.nn.Module] = {}
    for method in ("fls", "obert", "sparsegpt", "magnitude"):
        row: dict[str, Any] = {}
        for device in dict.fromkeys((gpu, torch.device("cpu"))):
            m = copy.deepcopy(model).to(device)
            start = time.perf_counter()
            prune_one_shot(m, loader, F.cross_entropy, sparsity=0.5, method=method,
                           pattern="2:4", samples_per_step=1024, progress=False)  # fmt: skip
            if device.type == "cuda":
                torch.cuda.synchronize()
            row["gpu" if device == gpu else "cpu"] = {
                **evaluate(m, device),
                "seconds": time.perf_counter() - start,
            }
            if device == gpu:
                pruned[method] = m
        result["oneshot_2_4"][method] = row
        print(method, json.dumps(row), flush=True)

    class Wrapped(PatchTransformer):
        def train_dataloader(self) -> Any:
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=256)

    trained = Wrapped()
    trained.load_state_dict(model.state_dict())
    callback = FLSPruningCallback(pattern="2:4", start_epoch=0, end_epoch=2, aux_every_n_steps=1,
                                  samples_per_step=512, verbose=False)  # fmt: skip
    pl.Trainer(max_epochs=3, accelerator=gpu.type, devices=1, callbacks=[callback], logger=False,
               enable_checkpointing=False, enable_progress_bar=False).fit(trained)  # fmt: skip
    result["callback_2_4"] = {**evaluate(trained.to(gpu).eval(), gpu),
                              "history": [h["fls/sparsity"] for h in callback.history]}  # fmt: skip
    print("callback", json.dumps(result["callback_2_4"]), flush=True)

    supported, reason = semi_structured_support(gpu)
    result["semi_structured"] = {"supported": supported, "reason": reason}
    if supported:
        dense16 = copy.deepcopy(pruned["fls"]).half()
        sparse16 = copy.deepcopy(pruned["fls"]).half()
        converted = to_semi_structured(sparse16, include=["blocks.*"])
        tokens = x[2048:].to(gpu).half()
        with torch.inference_mode():
            a, b = dense16(tokens), sparse16(tokens)
            timings = {}
            for name, m in (("dense", dense16), ("sparse", sparse16)):
                for _ in range(10):
                    m(tokens)
                torch.cuda.synchronize()
                times = []
                for _ in range(30):
                    start_event = torch.cuda.Event(enable_timing=True)
                    end_event = torch.cuda.Event(enable_timing=True)
                    start_event.record()
                    m(tokens)
                    end_event.record()
                    torch.cuda.synchronize()
                    times.append(start_event.elapsed_time(end_event))
                timings[name] = sorted(times)[len(times) // 2]
        result["semi_structured"].update(
            {
                "converted": converted,
                "max_abs_diff": float((a - b).abs().max()),
                "max_abs_logit": float(a.abs().max()),
                "same_predictions": float((a.argmax(1) == b.argmax(1)).float().mean()),
                "forward_ms_dense": timings["dense"],
                "forward_ms_sparse": timings["sparse"],
                "images": int(tokens.shape[0]),
            }
        )
        print("semi_structured", json.dumps(result["semi_structured"]), flush=True)
    result["command"] = "python -m benchmarks.gpu_transformer_check"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
