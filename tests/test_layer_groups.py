"""Layer groups: one group's statistics at a time, the same pruning as all layers at once."""

from __future__ import annotations

import weakref
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_fls.engine as engine_module
import lightning_fls.methods._fishleg as fishleg_methods
import lightning_fls.safeguard as safeguard_module
from lightning_fls import prune_one_shot
from lightning_fls.layer_groups import default_budget_mb, plan_groups
from lightning_fls.methods import FLS, KFAC, MFAC, DiagFisher, OBert
from lightning_fls.methods._fishleg import LayerStatisticsStream

MB = 2**20


def test_plan_groups_keeps_order_and_fits_the_budget() -> None:
    sizes = {"a": 3 * MB, "b": 2 * MB, "c": 4 * MB, "d": 1 * MB, "e": 9 * MB, "f": 1 * MB}
    groups = plan_groups(sizes, budget_mb=5)
    assert groups == [["a", "b"], ["c", "d"], ["e"], ["f"]]
    assert [key for group in groups for key in group] == list(sizes)
    for group in groups:
        assert len(group) == 1 or sum(sizes[k] for k in group) <= 5 * MB
    assert plan_groups(sizes, budget_mb=100) == [list(sizes)]


def test_the_default_budget_is_twice_the_largest_layer_with_a_floor() -> None:
    assert default_budget_mb({"a": 400 * MB, "b": 100 * MB}) == 800
    assert default_budget_mb({"a": 1 * MB}) == 512


def _task() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 20), nn.Tanh(),
                          nn.Linear(20, 4))  # fmt: skip
    x = torch.randn(96, 12)
    y = torch.randint(0, 4, (96,))
    return model, [(x[i : i + 16], y[i : i + 16]) for i in range(0, 96, 16)]


CASES = [
    pytest.param(FLS(), {}, id="fls-global"),
    pytest.param(FLS(), {"fisher": "sampled", "likelihood": "categorical"}, id="fls-sampled"),
    pytest.param(FLS(), {"scope": "layer"}, id="fls-layer"),
    pytest.param(FLS(), {"max_layer_sparsity": 0.75}, id="fls-capped"),
    pytest.param(FLS(), {"pattern": "2:4", "sparsity": 0.5}, id="fls-2:4"),
    pytest.param(KFAC(), {"fisher": "sampled", "likelihood": "categorical"}, id="kfac-sampled"),
    pytest.param(KFAC(), {"joint": True}, id="kfac-rows"),
    pytest.param(KFAC(), {"joint": True, "pattern": "2:4", "sparsity": 0.5}, id="kfac-rows-2:4"),
    pytest.param(OBert(gradient_batch_size=4, block_size=7), {}, id="obert"),
    pytest.param(OBert(gradient_batch_size=4), {"pattern": "2:4", "sparsity": 0.5}, id="obert-2:4"),
    pytest.param(MFAC(gradient_batch_size=4, block_size=30), {}, id="mfac"),
    pytest.param(DiagFisher(), {}, id="diag_fisher"),
]


@pytest.mark.parametrize(("method", "options"), CASES)
def test_layer_groups_prune_exactly_like_all_layers_at_once(
    method: Any, options: dict[str, Any]
) -> None:
    kwargs: dict[str, Any] = {"sparsity": 0.7, "steps": 3, "samples_per_step": 48, **options}
    results = []
    for budget in (None, 1e-6):  # one group; every layer a group of its own
        model, batches = _task()
        report = prune_one_shot(model, batches, F.cross_entropy, method=method.fresh(),
                                memory_budget_mb=budget, progress=False, **kwargs)  # fmt: skip
        results.append((report, model))
    (one, model_one), (grouped, model_grouped) = results
    assert (one.layer_groups, grouped.layer_groups) == (1, 3)
    assert grouped.samples == one.samples
    assert grouped.damping == pytest.approx(one.damping, rel=1e-6)
    assert grouped.predicted_loss_increase == pytest.approx(one.predicted_loss_increase, rel=1e-5)
    assert one.realised_loss_increase is not None
    assert grouped.realised_loss_increase == pytest.approx(one.realised_loss_increase, rel=1e-5)
    for key in one.masks:
        assert torch.equal(grouped.masks[key], one.masks[key]), key
    for p, q in zip(model_grouped.parameters(), model_one.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_one_group_of_estimates_is_alive_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    live: weakref.WeakSet[Any] = weakref.WeakSet()
    streams: list[tuple[list[str], int]] = []
    build = fishleg_methods.build_blocks
    init = LayerStatisticsStream.__init__

    def tracked_build(*args: Any, **kwargs: Any) -> Any:
        blocks = build(*args, **kwargs)
        live.update(blocks.values())
        return blocks

    def tracked_init(self: LayerStatisticsStream, accumulators: Any, masks: Any) -> None:
        streams.append((list(accumulators), len(live)))  # blocks alive as a stream starts
        init(self, accumulators, masks)

    monkeypatch.setattr(fishleg_methods, "build_blocks", tracked_build)
    monkeypatch.setattr(LayerStatisticsStream, "__init__", tracked_init)
    model, batches = _task()
    prune_one_shot(model, batches, F.cross_entropy, sparsity=0.5, steps=1, samples_per_step=32,
                   memory_budget_mb=1e-6, progress=False)  # fmt: skip
    keys = ["0.weight", "2.weight", "4.weight"]
    # Saliency pass over every group, then the corrections' pass over all but the last.
    assert [s[0] for s in streams] == [[k] for k in keys] + [[k] for k in keys[:2]]
    assert [s[1] for s in streams] == [0] * 5


@pytest.mark.parametrize("budget", [0, -1.0, float("nan"), "64"])
def test_a_bad_memory_budget_is_refused_by_name(budget: Any) -> None:
    model, batches = _task()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises((ValueError, TypeError), match="memory_budget_mb"):
        prune_one_shot(model, batches, F.cross_entropy, sparsity=0.5, memory_budget_mb=budget,
                       progress=False)  # fmt: skip
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)


def test_a_memory_budget_for_a_method_without_layer_groups_is_an_error() -> None:
    model, batches = _task()
    with pytest.raises(ValueError, match="`memory_budget_mb` does not apply to method='sparsegpt"):
        prune_one_shot(model, batches, F.cross_entropy, sparsity=0.5, method="sparsegpt",
                       memory_budget_mb=64, progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="refine_passes"):
        prune_one_shot(model, batches, F.cross_entropy, sparsity=0.5, refine_passes=1,
                       memory_budget_mb=64, progress=False)  # fmt: skip


def test_the_safeguard_copy_of_a_grouped_step_is_taken_layer_by_layer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No copy of the whole model up front; the copy it checks against is the step's start."""

    def no_whole_copy(*_: Any) -> None:
        raise AssertionError("the grouped step took a whole-model snapshot before pruning")

    checked: list[dict[str, dict[str, torch.Tensor]]] = []
    real_check = engine_module.check_step

    def capturing_check(layers: Any, masks: Any, before_step: Any, *args: Any) -> Any:
        checked.append({k: {n: v.clone() for n, v in p.items()} for k, p in before_step.items()})
        return real_check(layers, masks, before_step, *args)

    monkeypatch.setattr(engine_module, "snapshot", no_whole_copy)
    monkeypatch.setattr(engine_module, "check_step", capturing_check)
    model, batches = _task()
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    prune_one_shot(model, batches, F.cross_entropy, sparsity=0.5, steps=1, samples_per_step=32,
                   memory_budget_mb=1e-6, progress=False)  # fmt: skip
    [before] = checked
    assert sorted(before) == ["0.weight", "2.weight", "4.weight"]
    for key, params in before.items():
        layer = key.split(".")[0]
        for name, value in params.items():
            assert torch.equal(value, start[f"{layer}.{name}"]), (key, name)
        assert not torch.equal(params["weight"], dict(model.named_parameters())[key])


@pytest.mark.filterwarnings("ignore:.*(OBS step|eigenvalue floor):RuntimeWarning")
def test_layer_groups_match_all_layers_at_once_when_every_step_is_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the safeguard's comparison forced at every step, the grouped step's layer-by-layer
    copy undoes exactly what the one-group step's whole copy does."""
    monkeypatch.setattr(safeguard_module, "SAFEGUARD_MIN_INCREASE", 0.0)
    monkeypatch.setattr(safeguard_module, "SAFEGUARD_RATIO", 0.0)
    results = []
    for budget in (None, 1e-6):
        model, batches = _task()
        report = prune_one_shot(model, batches, F.cross_entropy, sparsity=0.8, steps=3,
                                samples_per_step=16, damping=1e-6, memory_budget_mb=budget,
                                progress=False)  # fmt: skip
        results.append((report, model))
    (one, model_one), (grouped, model_grouped) = results
    assert (one.layer_groups, grouped.layer_groups) == (1, 3)
    assert one.safeguard_reverts > 0  # the undo path ran
    assert grouped.safeguard_reverts == one.safeguard_reverts
    assert grouped.realised_loss_increase == pytest.approx(one.realised_loss_increase, rel=1e-5)
    for p, q in zip(model_grouped.parameters(), model_one.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "method",
    [FLS(token_fraction=0.4), KFAC(token_fraction=0.4)],
    ids=["fls", "kfac"],
)
def test_layer_groups_keep_the_same_token_positions_as_all_layers_at_once(method: Any) -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 7, 12)  # 7 positions per example: a fraction of them is drawn
    y = torch.randint(0, 4, (64,))
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]

    def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs.mean(1), targets)

    results = []
    for fraction, budget in ((0.4, None), (0.4, 1e-6), (1.0, None)):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 20), nn.Tanh(),
                              nn.Linear(20, 4))  # fmt: skip
        chosen = method.fresh()
        chosen.token_fraction = fraction
        report = prune_one_shot(model, batches, loss_fn, sparsity=0.7, steps=2,
                                samples_per_step=32, method=chosen, memory_budget_mb=budget,
                                progress=False)  # fmt: skip
        results.append((report, model))
    (one, model_one), (grouped, model_grouped), (full, _) = results
    assert (one.layer_groups, grouped.layer_groups) == (1, 3)
    assert grouped.predicted_loss_increase == pytest.approx(one.predicted_loss_increase, rel=1e-5)
    for key in one.masks:
        assert torch.equal(grouped.masks[key], one.masks[key]), key
    for p, q in zip(model_grouped.parameters(), model_one.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    # The draw reached the statistics: all positions give another estimate.
    assert full.predicted_loss_increase != pytest.approx(one.predicted_loss_increase, rel=1e-3)
