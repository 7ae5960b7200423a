"""The README's main example, measured: ``examples/prune_autoencoder.py`` run and recorded.

Runs the example (dense and FLS-pruned autoencoder, same seed and length) and writes its
figures to ``docs/results/main_example_<preset>.json``, so that the README's table has a
committed result and the commit that produced it.

    .venv/bin/python -m benchmarks.main_example                   # the quick preset, ~5 min
    .venv/bin/python -m benchmarks.main_example --preset full     # ~26 min
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.common import write_json

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--method", default="fls")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(EXAMPLES))
    import prune_autoencoder  # the example is a script, not a package module

    results = prune_autoencoder.main(["--preset", args.preset, "--method", args.method])
    dense, pruned = results["dense"], results["pruned"]
    payload = {
        "command": "python -m benchmarks.main_example " + " ".join(argv or sys.argv[1:]),
        "preset": {"name": args.preset, **prune_autoencoder.PRESETS[args.preset]},
        "method": args.method,
        "results": results,
        "test_loss_change": pruned["test_loss"] / dense["test_loss"] - 1,
        "time_ratio": pruned["seconds"] / dense["seconds"],
    }
    suffix = "" if args.method == "fls" else f"_{args.method}"
    path = write_json(f"main_example_{args.preset}{suffix}", payload)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
