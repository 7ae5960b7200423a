from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_curvature_quickstart_improves_on_the_identity() -> None:
    errors = load("curvature_quickstart").main(aux_steps=100)
    assert errors["kfac"] < 0.8 * errors["identity"]
    assert errors["refined"] < 0.8 * errors["identity"]
