"""prune_one_shot: exactness, state handling, bad input, and a quality sanity check."""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fls import prune_one_shot
from lightning_fls.oneshot import METHODS
from tests.helpers import classifier_and_loader

FAST = {"steps": 2, "samples_per_step": 100, "progress": False}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_reaches_the_exact_target(method: str) -> None:
    model, loader = classifier_and_loader()
    biases = [m.bias.detach().clone() for m in model if isinstance(m, nn.Linear)]
    report = prune_one_shot(model, loader, F.cross_entropy, sparsity=0.6, method=method, **FAST)
    weights = [m.weight for m in model if isinstance(m, nn.Linear)]
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros == round(0.6 * total)
    assert report.sparsity == pytest.approx(zeros / total)
    assert set(report.layer_sparsity) == {"0.weight", "2.weight", "4.weight"}
    for key, mask in report.masks.items():
        weight = dict(model.named_parameters())[key]
        assert torch.all(weight[~mask] == 0)
    assert math.isfinite(report.predicted_loss_increase)
    assert report.curvature_seconds >= 0
    if method == "magnitude":
        for bias, module in zip(
            biases, [m for m in model if isinstance(m, nn.Linear)], strict=True
        ):
            assert torch.equal(bias, module.bias)  # no correction for magnitude pruning


def test_layer_scope_prunes_every_layer_to_the_target() -> None:
    model, loader = classifier_and_loader()
    report = prune_one_shot(model, loader, F.cross_entropy, sparsity=0.5, scope="layer", **FAST)
    for module in (m for m in model if isinstance(m, nn.Linear)):
        assert int((module.weight == 0).sum()) == round(0.5 * module.weight.numel())
    assert all(s == pytest.approx(0.5, abs=0.02) for s in report.layer_sparsity.values())


def test_zero_sparsity_is_a_no_op() -> None:
    model, loader = classifier_and_loader()
    before = copy.deepcopy(model.state_dict())
    report = prune_one_shot(model, loader, F.cross_entropy, sparsity=0.0, progress=False)
    assert report.sparsity == 0.0
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_model_mode_flags_and_grads_are_kept() -> None:
    model, loader = classifier_and_loader()
    model.train()
    model[0].weight.requires_grad_(False)  # a user's frozen layer is still pruned, stays frozen
    model.zero_grad(set_to_none=True)
    model[2].weight.grad = torch.ones_like(model[2].weight)
    prune_one_shot(model, loader, F.cross_entropy, sparsity=0.5, **FAST)
    assert model.training
    assert not model[0].weight.requires_grad
    assert model[2].weight.requires_grad
    assert torch.equal(model[2].weight.grad, torch.ones_like(model[2].weight))
    assert model[4].weight.grad is None
    assert int((model[0].weight == 0).sum()) > 0


def test_pruning_is_monotone_across_calls() -> None:
    model, loader = classifier_and_loader()
    prune_one_shot(model, loader, F.cross_entropy, sparsity=0.4, **FAST)
    zero_before = {n: p == 0 for n, p in model.named_parameters() if n.endswith("weight")}
    report = prune_one_shot(model, loader, F.cross_entropy, sparsity=0.7, **FAST)
    for name, was_zero in zero_before.items():
        assert torch.all(dict(model.named_parameters())[name][was_zero] == 0)
    assert report.sparsity == pytest.approx(round(0.7 * 248) / 248)  # exact to one weight


def test_include_and_exclude() -> None:
    model, loader = classifier_and_loader()
    report = prune_one_shot(model, loader, F.cross_entropy, sparsity=0.5, exclude=["4.*"], **FAST)
    assert set(report.layer_sparsity) == {"0.weight", "2.weight"}
    assert int((model[4].weight == 0).sum()) == 0
    with pytest.raises(ValueError, match="matches no prunable parameter"):
        prune_one_shot(model, loader, F.cross_entropy, sparsity=0.5, include=["head.*"], **FAST)


def test_sampled_fisher_and_joint_updates_run() -> None:
    model, loader = classifier_and_loader()
    report = prune_one_shot(
        model, loader, F.cross_entropy, sparsity=0.5, method="obert", fisher="sampled",
        likelihood="categorical", joint=True, **FAST,
    )  # fmt: skip
    assert report.sparsity == pytest.approx(0.5, abs=1e-2)


def test_obs_methods_beat_magnitude_on_correlated_linear_regression() -> None:
    """With strongly correlated inputs, OBS's weight correction must pay off."""
    torch.manual_seed(0)
    base = torch.randn(2000, 4)
    x = torch.cat([base, base + 0.05 * torch.randn(2000, 4), base - 0.05 * torch.randn(2000, 4)], 1)
    true = nn.Linear(12, 3)
    y = true(x).detach() + 0.01 * torch.randn(2000, 3)
    model = nn.Linear(12, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2000):
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()
    loader = DataLoader(TensorDataset(x, y), batch_size=200)

    def loss_after(method: str) -> float:
        pruned = copy.deepcopy(model)
        prune_one_shot(pruned, loader, F.mse_loss, sparsity=0.5, method=method, steps=4,
                       samples_per_step=1000, progress=False)  # fmt: skip
        with torch.no_grad():
            return float(F.mse_loss(pruned(x), y))

    magnitude = loss_after("magnitude")
    for method in ("fls", "kfac", "obert", "mfac"):
        assert loss_after(method) < 0.5 * magnitude, method


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"sparsity": 1.0}, ValueError, "sparsity"),
        ({"sparsity": -0.1}, ValueError, "sparsity"),
        ({"sparsity": "0.5"}, TypeError, "sparsity"),
        ({"sparsity": 0.5, "method": "sparse"}, ValueError, "method"),
        ({"sparsity": 0.5, "scope": "row"}, ValueError, "scope"),
        ({"sparsity": 0.5, "steps": 0}, ValueError, "steps"),
        ({"sparsity": 0.5, "damping": 0.0}, ValueError, "damping"),
        ({"sparsity": 0.5, "fisher": "sampled"}, ValueError, "likelihood"),
        ({"sparsity": 0.5, "fisher": "exact"}, ValueError, "fisher"),
        ({"sparsity": 0.5, "max_layer_sparsity": 1.5}, ValueError, "max_layer_sparsity"),
    ],
)
def test_bad_arguments_leave_the_model_untouched(kwargs: dict, error: type, match: str) -> None:
    model, loader = classifier_and_loader()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        prune_one_shot(model, loader, F.cross_entropy, progress=False, **kwargs)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_bad_data_and_losses_are_reported_and_leave_the_model_untouched() -> None:
    model, loader = classifier_and_loader()
    before = copy.deepcopy(model.state_dict())

    with pytest.raises(ValueError, match="empty"):
        prune_one_shot(model, [], F.cross_entropy, sparsity=0.5, progress=False)
    with pytest.raises(ValueError, match="no prunable layer"):
        prune_one_shot(nn.Sequential(nn.ReLU()), loader, F.cross_entropy, sparsity=0.5)
    with pytest.raises(TypeError, match=r"\(inputs, targets\)"):
        prune_one_shot(model, [torch.randn(4, 6)], F.cross_entropy, sparsity=0.5, progress=False)
    with pytest.raises(ValueError, match="scalar"):
        prune_one_shot(model, loader, lambda o, t: F.cross_entropy(o, t, reduction="none"),
                       sparsity=0.5, progress=False)  # fmt: skip

    calls = {"n": 0}

    def fails_later(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1  # fine for the first step's batches, NaN once pruning has begun
        loss = F.cross_entropy(outputs, targets)
        return loss * float("nan") if calls["n"] > 2 else loss

    with pytest.raises(ValueError, match="non-finite"):
        prune_one_shot(model, loader, fails_later, sparsity=0.5, **FAST)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("disk", [True, False])
def test_a_failed_run_restores_the_model_from_its_undo_copy(
    disk: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_fls import _parameter_store

    files: list[object] = []
    real = _parameter_store.tempfile.TemporaryFile

    def temporary_file(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        if not disk:  # no temporary file can be written: copies stay in memory, with a warning
            raise OSError(28, "No space left on device")
        files.append(real(*args, **kwargs))  # type: ignore[call-overload]
        return files[-1]

    monkeypatch.setattr(_parameter_store.tempfile, "TemporaryFile", temporary_file)
    model, loader = classifier_and_loader()
    before = copy.deepcopy(model.state_dict())
    steps = {"n": 0}

    def fails_in_the_second_step(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        steps["n"] += 1
        if steps["n"] > 2 and (model[0].weight == 0).any():  # the first step has pruned
            raise KeyboardInterrupt
        return F.cross_entropy(outputs, targets)

    warns = contextlib.nullcontext() if disk else pytest.warns(RuntimeWarning, match="TMPDIR")
    with pytest.raises(KeyboardInterrupt), warns:
        prune_one_shot(model, loader, fails_in_the_second_step, sparsity=0.5, **FAST)
    assert bool(files) == disk  # the undo copy (and each step's safeguard copy) went to files…
    assert all(f.closed for f in files)  # …every one deleted by the time the call returns
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_fls_with_kronecker_blocks_and_auxiliary_refinement() -> None:
    from lightning_fls import StructurePolicy

    model, loader = classifier_and_loader()
    report = prune_one_shot(
        model, loader, F.cross_entropy, sparsity=0.5, method="fls", structure=StructurePolicy(),
        refine_passes=2, reestimate=False, **FAST,
    )  # fmt: skip
    assert report.sparsity == pytest.approx(round(0.5 * 248) / 248)


@pytest.mark.parametrize("method", ["fls", "kfac", "obert"])
def test_convolutional_models_work_with_defaults(method: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, groups=2),
        nn.ReLU(), nn.Flatten(), nn.Linear(6 * 3 * 3, 3),
    )  # fmt: skip
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 3, (64,))
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    report = prune_one_shot(model, loader, F.cross_entropy, sparsity=0.7, method=method, **FAST)
    total = sum(m.weight.numel() for m in model if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert report.sparsity == pytest.approx(round(0.7 * total) / total)
    assert set(report.layer_sparsity) == {"0.weight", "2.weight", "5.weight"}


def test_defaults_shrink_for_gradient_methods_on_large_models_only() -> None:
    from lightning_fls.calibration_budget import DEFAULT_LARGE_MODEL_BUDGET
    from lightning_fls.fishleg import KroneckerBlock, StructurePolicy
    from lightning_fls.methods import FLS, OBert, SparseGPT
    from lightning_fls.options import (
        LARGE_MODEL_ONE_STEP_SPARSITY,
        LARGE_MODEL_WEIGHTS,
        build_options,
        scale_defaults,
    )

    big = LARGE_MODEL_WEIGHTS + 1
    unset = {"steps": None, "samples_per_step": None}
    low, high = LARGE_MODEL_ONE_STEP_SPARSITY, LARGE_MODEL_ONE_STEP_SPARSITY + 0.1
    generic = DEFAULT_LARGE_MODEL_BUDGET
    kronecker = KroneckerBlock.large_model_budget
    # Methods without a budget of their own, and FLS with block-diagonal Q, take the generic one.
    for method in (OBert(), FLS(structure=StructurePolicy("block_diagonal"))):
        options = build_options(method, sparsity=0.5)
        scaled = scale_defaults(options, big, sparsity=low, **unset)
        assert (scaled.steps, scaled.samples_per_step) == (generic.steps, generic.samples_per_step)
        scaled = scale_defaults(options, big, sparsity=high, **unset)
        assert scaled.steps == generic.high_sparsity_steps
    assert generic.steps < generic.high_sparsity_steps < build_options(FLS(), sparsity=0.5).steps
    # The default FLS (Kronecker Q) takes its structure's budget: more samples, fewer steps.
    fls = build_options(FLS(), sparsity=0.5)
    assert kronecker != generic
    assert kronecker.samples_per_step > generic.samples_per_step
    for sparsity, steps in ((low, kronecker.steps), (high, kronecker.high_sparsity_steps)):
        scaled = scale_defaults(fls, big, sparsity=sparsity, **unset)
        assert (scaled.steps, scaled.samples_per_step) == (steps, kronecker.samples_per_step)
    small = scale_defaults(fls, LARGE_MODEL_WEIGHTS, sparsity=0.9, **unset)
    assert (small.steps, small.samples_per_step) == (fls.steps, fls.samples_per_step)
    given = build_options(FLS(), sparsity=0.5, steps=3, samples_per_step=64)
    kept = scale_defaults(given, big, sparsity=0.9, steps=3, samples_per_step=64)
    assert (kept.steps, kept.samples_per_step) == (3, 64)
    sparsegpt = build_options(SparseGPT(), sparsity=0.5)
    assert scale_defaults(sparsegpt, big, sparsity=0.9, **unset) == sparsegpt


def test_a_calibration_budget_refuses_bad_counts() -> None:
    from lightning_fls.calibration_budget import CalibrationBudget

    with pytest.raises(ValueError, match="samples_per_step"):
        CalibrationBudget(samples_per_step=0, steps=1, high_sparsity_steps=1)
    with pytest.raises(ValueError, match="high_sparsity_steps"):
        CalibrationBudget(samples_per_step=8, steps=2, high_sparsity_steps=1)


@pytest.mark.parametrize(
    ("structure", "sparsity", "steps"),
    [("kronecker", 0.7, 1), ("block_diagonal", 0.5, 1), ("block_diagonal", 0.7, 2)],
)
def test_prune_one_shot_takes_the_large_model_defaults_of_its_structure(
    monkeypatch: pytest.MonkeyPatch, structure: str, sparsity: float, steps: int
) -> None:
    import lightning_fls.options as options
    from lightning_fls.calibration_budget import CalibrationBudget
    from lightning_fls.fishleg import KroneckerBlock, StructurePolicy
    from lightning_fls.fishleg.block_diagonal import BlockDiagonalBlock
    from lightning_fls.methods import FLS

    monkeypatch.setattr(options, "LARGE_MODEL_WEIGHTS", 0)  # every model counts as large
    # Budgets of fewer samples than the loader holds (400), so that they show too.
    monkeypatch.setattr(KroneckerBlock, "large_model_budget", CalibrationBudget(150, 1, 1))
    monkeypatch.setattr(BlockDiagonalBlock, "large_model_budget", CalibrationBudget(50, 1, 2))
    samples = {"kronecker": 150, "block_diagonal": 50}[structure]  # whole batches of 50
    model, loader = classifier_and_loader()
    method = FLS(structure=StructurePolicy(structure))  # type: ignore[arg-type]
    report = prune_one_shot(
        model, loader, F.cross_entropy, sparsity=sparsity, method=method, progress=False
    )
    assert report.steps == steps
    assert report.samples == steps * samples
    total = sum(m.weight.numel() for m in model if isinstance(m, nn.Linear))
    assert report.sparsity == pytest.approx(round(sparsity * total) / total)


def test_prune_one_shot_solves_kronecker_rows_by_cost_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``row_update="auto"`` unless told: each layer's rows are then solved by the solver its
    cost ratio picks (here every layer is narrow, so exactly)."""
    import lightning_fls.engine as engine_module
    import lightning_fls.obs as obs_module

    calls = dict.fromkeys(engine_module.ROW_UPDATES, 0)
    for name, solve in list(engine_module.ROW_UPDATES.items()):

        def counted(*args: object, name: str = name, solve: object = solve) -> object:
            calls[name] += 1
            return solve(*args)  # type: ignore[operator]

        monkeypatch.setitem(engine_module.ROW_UPDATES, name, counted)
    exact_calls = []
    exact = obs_module.kronecker_row_obs_update
    monkeypatch.setattr(
        obs_module,
        "kronecker_row_obs_update",
        lambda *args: exact_calls.append(1) or exact(*args),  # type: ignore[func-returns-value]
    )
    model, loader = classifier_and_loader()
    report = prune_one_shot(model, loader, F.cross_entropy, sparsity=0.5, steps=2, progress=False)
    assert report.sparsity == pytest.approx(0.5, abs=0.01)
    assert calls["auto"] > 0
    assert sum(calls.values()) == calls["auto"]
    assert len(exact_calls) == calls["auto"]
