"""2:4 semi-structured sparse against dense Linear layers on an NVIDIA GPU (float16).

For every weight shape ``d_out×d_in`` and token batch ``n``: a random float16 weight
``[d_out, d_in]`` is pruned to 2:4 (the 2 smallest |w| of every 4 consecutive along the input
dimension zeroed), converted with ``torch.sparse.to_sparse_semi_structured``, and
``F.linear(x, w)`` (dense, the same zeros) is timed against ``F.linear(x, w_sparse)`` for inputs
``x`` ``[n, d_in]``: CUDA events around each call, 10 warm-up calls, then the median of 50. The
sparse output is checked against the dense one (float16 rounding, relative to the output's
largest magnitude).

Default shapes: the largest Linear layers of :class:`lightning_fls.models.PatchTransformer`
with its defaults (``128×64`` and ``64×128``, the feed-forward layers; ``192×64``, the packed
query/key/value projection) and scaled-up transformer layers (``4096×4096``, ``11008×4096``,
``4096×11008``, ``16384×4096``), each with token batches 4096 and 16384.

    python -m benchmarks.semi_structured_speed --out docs/results/semi_structured_speed.json
    python -m benchmarks.semi_structured_speed --shapes 4096x4096 --tokens 8192

Needs an NVIDIA GPU of compute capability 8.0+ (Ampere, Hopper); elsewhere it prints why on one
line and exits with status 2. It imports torch, the standard library and
``lightning_fls/semi_structured.py`` only; the latter is loaded from its file, without running the
package's ``__init__`` (which imports Lightning), so the GPU machine needs nothing but torch.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "docs" / "results"
NAME = "semi_structured_speed"
DEFAULT_SHAPES = (
    "128x64",
    "64x128",
    "192x64",
    "4096x4096",
    "11008x4096",
    "4096x11008",
    "16384x4096",
)
DEFAULT_TOKENS = (4096, 16384)
TOLERANCE = 1e-2  # of the dense output's largest magnitude: float16 rounding, sums reordered


def load_semi_structured() -> ModuleType:
    """``lightning_fls/semi_structured.py`` loaded from its file (torch and stdlib only)."""
    path = ROOT / "lightning_fls" / "semi_structured.py"
    spec = importlib.util.spec_from_file_location("_fls_semi_structured", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def parse_shape(text: str) -> tuple[int, int]:
    """``"OUTxIN"`` → ``(d_out, d_in)``."""
    try:
        d_out, d_in = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a shape is d_out x d_in written OUTxIN, such as 4096x11008; got {text!r}"
        ) from None
    if d_out < 1 or d_in < 1 or d_in % 4:
        raise argparse.ArgumentTypeError(
            f"shape {text!r}: both sizes must be >= 1 and d_in a multiple of 4 (2:4 groups)"
        )
    return d_out, d_in


def prune_two_four(weight: Tensor) -> Tensor:
    """``weight`` ``[d_out, d_in]`` with the 2 smallest |w| of every 4 consecutive zeroed."""
    groups = weight.reshape(weight.shape[0], -1, 4)
    drop = groups.abs().topk(2, dim=-1, largest=False).indices
    return groups.scatter(-1, drop, 0.0).reshape(weight.shape).contiguous()


def median_ms(fn: Callable[[], Tensor], warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn`` on the GPU, timed call by call with CUDA events."""
    for _ in range(warmup):
        fn()
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(repeats)
    ]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return float(statistics.median(start.elapsed_time(end) for start, end in events))


def measure(
    to_sparse: Callable[[Tensor], Tensor],
    d_out: int,
    d_in: int,
    tokens: int,
    warmup: int,
    repeats: int,
) -> dict[str, Any]:
    """Dense and 2:4 sparse ``F.linear`` times and outputs for one shape and token batch."""
    device = torch.device("cuda")
    weight = prune_two_four(torch.randn(d_out, d_in, device=device) * d_in**-0.5).half()
    sparse_weight = to_sparse(weight)
    x = torch.randn(tokens, d_in, device=device, dtype=torch.float16)
    with torch.inference_mode():
        dense_out = F.linear(x, weight)
        sparse_out = F.linear(x, sparse_weight)
        max_abs_diff = float((sparse_out.float() - dense_out.float()).abs().max())
        scale = float(dense_out.float().abs().max())
        dense_ms = median_ms(lambda: F.linear(x, weight), warmup, repeats)
        sparse_ms = median_ms(lambda: F.linear(x, sparse_weight), warmup, repeats)
    return {
        "shape": [d_out, d_in],
        "tokens": tokens,
        "dense_ms": dense_ms,
        "sparse_ms": sparse_ms,
        "speedup": dense_ms / sparse_ms,
        "dense_tflops": 2 * tokens * d_out * d_in / dense_ms / 1e9,
        "max_abs_diff": max_abs_diff,
        "max_abs_output": scale,
        "matches_dense": max_abs_diff <= TOLERANCE * max(scale, 1.0),
    }


def machine() -> dict[str, Any]:
    """Facts about the machine and GPU the benchmark ran on."""
    major, minor = torch.cuda.get_device_capability()
    cusparselt = getattr(torch.backends, "cusparselt", None)
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
        "device": torch.cuda.get_device_name(),
        "compute_capability": f"{major}.{minor}",
        "cusparselt": cusparselt.version() if cusparselt and cusparselt.is_available() else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shapes",
        nargs="+",
        type=parse_shape,
        default=[parse_shape(s) for s in DEFAULT_SHAPES],
        metavar="OUTxIN",
        help="weight shapes d_out x d_in (default: %(default)s)",
    )
    parser.add_argument("--tokens", nargs="+", type=int, default=list(DEFAULT_TOKENS))
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="output JSON path")
    args = parser.parse_args()

    semi_structured = load_semi_structured()
    supported, reason = semi_structured.semi_structured_support()
    if not supported:
        print(f"{NAME}: cannot run: {reason}.", file=sys.stderr)
        raise SystemExit(2)

    torch.manual_seed(args.seed)
    backend, _ = semi_structured._shape_constraints()
    results = []
    for d_out, d_in in args.shapes:
        for tokens in args.tokens:
            row = measure(
                torch.sparse.to_sparse_semi_structured,
                d_out,
                d_in,
                tokens,
                args.warmup,
                args.repeats,
            )
            results.append(row)
            torch.cuda.empty_cache()
            print(
                f"{d_out:>6}x{d_in:<6} tokens {tokens:>6}: dense {row['dense_ms']:.4f} ms, "
                f"2:4 sparse {row['sparse_ms']:.4f} ms, speed-up {row['speedup']:.2f}x, "
                f"max |diff| {row['max_abs_diff']:.2e}",
                flush=True,
            )

    payload = {
        "benchmark": NAME,
        "machine": machine(),
        "command": f"python -m benchmarks.{NAME} " + " ".join(sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backend": backend,
        "dtype": "float16",
        "warmup": args.warmup,
        "repeats": args.repeats,
        "timing": "CUDA events around each call, median",
        "results": results,
    }
    path = args.out or RESULTS_DIR / f"{NAME}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
