"""Pruning methods behind one interface: the registry, typed options, a user's own method."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lightning_fls
from lightning_fls import FLSPruningCallback, PruningMethod, prune_one_shot, register_method
from lightning_fls.batches import Batch
from lightning_fls.calibration import Calibration, InputCollector, StepData, input_hessians_of
from lightning_fls.engine import PruningEngine
from lightning_fls.layers import prunable_layers
from lightning_fls.methods import (
    BUILTIN_METHODS,
    FLS,
    OBert,
    Wanda,
    method_names,
    resolve_method,
    unregister_method,
)
from lightning_fls.obs import InverseCurvature
from lightning_fls.options import build_options
from tests.callback_models import TinyClassifier

ROOT = Path(__file__).resolve().parents[1]


class _ColumnMeans:
    """``Q = diag(1/mean|x_j|)``: a toy saliency ``½ w²·mean|x_j|`` (no correction)."""

    def __init__(self, scale: Tensor, rows: int) -> None:
        self.q = (1.0 / scale.clamp_min(1e-12)).expand(rows, -1).clone()

    def qv(self, V: Tensor) -> Tensor:
        return self.q * V

    def diag_q(self) -> Tensor:
        return self.q


@dataclass
class ToyInputScaled(PruningMethod):
    """A user's method: forward inputs only, layer scope, one option of its own."""

    power: float = 1.0

    name: ClassVar[str] = "toy_input_scaled"
    calibration: ClassVar[Calibration] = "inputs"
    scopes = ("layer", "global")
    default_steps: ClassVar[int] = 1
    corrects: ClassVar[bool] = False
    uses_damping: ClassVar[bool] = False
    calls: ClassVar[list[int]] = []

    def estimate(self, engine: PruningEngine, step: StepData, gamma: float):  # type: ignore[no-untyped-def]
        hessians = input_hessians_of(step, engine.layers, self.name)
        type(self).calls.append(step.samples)
        estimates: dict[str, InverseCurvature] = {
            key: _ColumnMeans(hessians[key].diagonal().float() ** self.power, a.canonical_shape[0])
            for key, a in engine.layers.items()
        }
        return estimates, 0.0


@pytest.fixture
def toy_method() -> Iterator[type[ToyInputScaled]]:
    ToyInputScaled.calls.clear()
    register_method("toy_input_scaled", ToyInputScaled)
    yield ToyInputScaled
    unregister_method("toy_input_scaled")


def _model_and_data() -> tuple[nn.Module, list[tuple[Tensor, Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(96, 12) * torch.linspace(0.1, 3.0, 12)
    y = torch.randint(0, 4, (96,))
    return model, [(x[i : i + 32], y[i : i + 32]) for i in range(0, 96, 32)]


def test_registered_method_runs_one_shot_with_its_option(toy_method: type[ToyInputScaled]) -> None:
    assert "toy_input_scaled" in method_names()
    model, loader = _model_and_data()
    report = prune_one_shot(
        model, loader, F.cross_entropy, sparsity=0.5, method="toy_input_scaled", progress=False
    )
    assert report.method == "toy_input_scaled"
    assert report.layer_sparsity == pytest.approx({"0.weight": 0.5, "2.weight": 0.5}, abs=0.02)
    assert toy_method.calls == [1024 // 32 * 32]  # one step, whole batches
    # An instance carries its options; an option it lacks is refused naming the method.
    model, loader = _model_and_data()
    prune_one_shot(model, loader, F.cross_entropy, sparsity=0.3, method=ToyInputScaled(power=2.0),
                   progress=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"`block_size` does not apply to method='toy_input"):
        prune_one_shot(model, loader, F.cross_entropy, sparsity=0.3, method="toy_input_scaled",
                       block_size=4)  # fmt: skip


def test_registered_method_runs_in_a_trainer(
    toy_method: type[ToyInputScaled], tmp_path: Path
) -> None:
    pruning = FLSPruningCallback(
        target_sparsity=0.5, start_epoch=0, end_epoch=1, method="toy_input_scaled",
        aux_every_n_steps=1, verbose=False,
    )  # fmt: skip
    trainer = pl.Trainer(
        max_epochs=2, callbacks=[pruning], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    model = TinyClassifier()
    trainer.fit(model)
    assert toy_method.calls, "the method's estimate never ran"
    assert pruning.history[-1]["fls/sparsity"] == pytest.approx(0.5, abs=0.01)
    for key, mask in pruning.masks.items():
        weight = model.get_parameter(key)
        assert torch.all(weight[~mask] == 0), key


def test_wanda_prunes_the_least_weight_times_input_norm_per_layer() -> None:
    model, loader = _model_and_data()
    first = model[0]
    norms = torch.cat([x for x, _ in loader]).square().sum(0).sqrt()
    score = first.weight.detach().abs() * norms
    report = prune_one_shot(
        model, loader, F.cross_entropy, sparsity=0.5, method="wanda", samples_per_step=96,
        progress=False,
    )  # fmt: skip
    expected = score > score.flatten().kthvalue(score.numel() // 2).values
    assert torch.equal(report.masks["0.weight"], expected)
    assert report.layer_sparsity["2.weight"] == pytest.approx(0.5)


def test_input_collector_streams_sum_of_x_xt_without_a_backward() -> None:
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 16, 5))
    x = torch.randn(6, 2, 4, 4)
    layers = prunable_layers(model, None, None)
    collector = InputCollector(model, lambda out, t: out.square().mean(), layers, method="toy")
    assert collector.observe(_batch(x[:4], None)) == 4
    assert collector.observe(_batch(x[4:], None)) == 2
    step = collector.result()
    assert step.samples == 6
    assert step.batches == []
    assert all(p.grad is None for p in model.parameters())
    assert step.input_hessians is not None
    # Dense references: the Linear's inputs with a column of ones; the conv's 3×3 patches.
    hidden = model[1](model[0](x)).detach().double()
    rows = torch.cat([hidden, torch.ones(6, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(step.input_hessians["2.weight"], rows.T @ rows)
    patches = F.unfold(x.double(), 3, padding=1).transpose(1, 2).reshape(-1, 18)
    patches = torch.cat([patches, torch.ones(len(patches), 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(step.input_hessians["0.weight"], patches.T @ patches)


def test_input_collector_refuses_a_layer_without_a_shared_input() -> None:
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2))
    with pytest.raises(ValueError, match=r"method='wanda'.*`0.weight`.*exclude"):
        InputCollector(model, F.mse_loss, prunable_layers(model, None, None), method="wanda")


@pytest.mark.parametrize(
    ("method", "kwargs", "message"),
    [
        ("obert", {"refine_passes": 2}, r"`refine_passes` does not apply to method='obert' "
                                        r"\(its own options: block_size, gradient_batch_size\)"),
        ("fls", {"block_size": 8, "gradient_batch_size": 4},
         r"`block_size`, `gradient_batch_size` do not apply to method='fls'"),
        ("magnitude", {"aux_lr": 0.1}, r"`aux_lr` does not apply to method='magnitude'"),
        ("nope", {}, r"`method` must be one of \('fls', 'kfac'"),
        ("obert", {"block_size": 0}, r"`block_size` must be"),
    ],
)  # fmt: skip
def test_method_options_are_checked_naming_the_method(
    method: str, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_method(method, **kwargs)


def test_an_instance_takes_no_separate_options() -> None:
    with pytest.raises(TypeError, match="set the method's options on the instance"):
        resolve_method(OBert(block_size=10), block_size=20)
    with pytest.raises(TypeError, match="registered name"):
        resolve_method(3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("method", "kwargs", "message"),
    [
        ("sparsegpt", {"damping": 0.1}, r"`damping` does not apply to method='sparsegpt'"),
        ("magnitude", {"damping": 0.1}, r"`damping` does not apply to method='magnitude'"),
        ("mfac", {"joint": True}, r"`joint` does not apply to method='mfac'"),
        ("magnitude", {"row_update": "sweep"},
         r"`row_update` does not apply to method='magnitude'"),
        ("kfac", {"row_update": "sweep"},
         r"`row_update` does not apply to method='kfac' with `joint=False`"),
        ("fls", {"row_update": "exact"},
         r"`row_update` must be one of \('auto', 'joint', 'refined_sweep', 'sweep'\)"),
        ("wanda", {"fisher": "sampled", "likelihood": "categorical"},
         r"`fisher='sampled'` does not apply to method='wanda'"),
        ("sparsegpt", {"scope": "global"}, r"accepts only scope='layer'"),
        ("fls", {"scope": "row"}, r"`scope` must be one of \('global', 'layer'\)"),
        ("fls", {"fisher": "true"}, r"`fisher` must be one of \('empirical', 'sampled'\)"),
    ],
)  # fmt: skip
def test_shared_options_that_do_not_apply_are_errors(
    method: str, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        build_options(resolve_method(method), sparsity=0.5, **kwargs)  # type: ignore[arg-type]


def test_method_defaults_come_from_the_method() -> None:
    assert build_options(resolve_method("sparsegpt"), sparsity=0.5).scope == "layer"
    assert build_options(resolve_method("sparsegpt"), sparsity=0.5).steps == 1
    fls = build_options(resolve_method("fls"), sparsity=0.5)
    assert (fls.scope, fls.steps, fls.joint, fls.damping) == ("global", 16, True, 1e-2)
    assert fls.row_update == "auto"
    assert build_options(resolve_method("obert"), sparsity=0.5).joint is False


def test_the_engine_works_on_its_own_copy_of_the_method() -> None:
    model, loader = _model_and_data()
    method = FLS()
    prune_one_shot(model, loader, F.cross_entropy, sparsity=0.5, method=method, steps=2,
                   progress=False)  # fmt: skip
    assert method.blocks is None  # the caller's instance carries no run state


def test_every_builtin_method_is_registered_with_a_docstring() -> None:
    assert set(BUILTIN_METHODS) <= set(method_names())
    builtin = {"fls", "kfac", "obert", "mfac", "diag_fisher", "sparsegpt", "magnitude", "wanda"}
    assert builtin <= set(BUILTIN_METHODS)
    for name in BUILTIN_METHODS:
        cls = lightning_fls.methods.method_class(name)
        assert cls.name == name
        assert inspect.getdoc(cls), name
        assert dataclasses.is_dataclass(cls), name
    assert Wanda().option_values() == {}


def _name_comparisons(path: Path) -> list[str]:
    """String constants equal to a method name inside comparisons or ``match`` cases."""
    names = set(BUILTIN_METHODS)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            for part in [node.left, *node.comparators]:
                values = part.elts if isinstance(part, (ast.Tuple, ast.List, ast.Set)) else [part]
                for value in values:
                    if isinstance(value, ast.Constant) and value.value in names:
                        found.append(f"{path.name}:{node.lineno}: {value.value!r}")
    return found


def test_engine_callback_and_prune_one_shot_have_no_branch_on_a_method_name(
    tmp_path: Path,
) -> None:
    package = ROOT / "lightning_fls"
    for module in ("engine.py", "callback.py", "oneshot.py", "options.py", "calibration.py"):
        assert _name_comparisons(package / module) == [], module
    # The check itself finds such a branch.
    sample = tmp_path / "branch.py"
    sample.write_text('def f(method):\n    return method in ("fls", "kfac")\n')
    assert _name_comparisons(sample) == ["branch.py:2: 'fls'", "branch.py:2: 'kfac'"]


def test_a_method_instance_from_yaml(tmp_path: Path) -> None:
    from lightning.pytorch.cli import LightningCLI

    (tmp_path / "configs").mkdir()
    config = tmp_path / "configs" / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  max_epochs: 2\n"
        "  logger: false\n"
        "  enable_checkpointing: false\n"
        "  enable_progress_bar: false\n"
        f"  default_root_dir: {tmp_path}\n"
        "  callbacks:\n"
        "    - class_path: lightning_fls.FLSPruningCallback\n"
        "      init_args:\n"
        "        target_sparsity: 0.5\n"
        "        end_epoch: 1\n"
        "        aux_every_n_steps: 1\n"
        "        method:\n"
        "          class_path: lightning_fls.methods.OBert\n"
        "          init_args: {block_size: 20, gradient_batch_size: 4}\n"
    )
    cli = LightningCLI(TinyClassifier, args=["fit", "--config", str(config)])
    [pruning] = [c for c in cli.trainer.callbacks if isinstance(c, FLSPruningCallback)]
    assert pruning.options.method == OBert(block_size=20, gradient_batch_size=4)
    assert pruning.options.method_name == "obert"
    assert pruning.history[-1]["fls/sparsity"] == pytest.approx(0.5, abs=1 / 384)


def _batch(inputs: torch.Tensor, targets: torch.Tensor | None) -> Batch:
    return Batch(inputs, targets, keywords=False)
