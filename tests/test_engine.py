"""The pruning engine: masks, the shared OBS step, the estimate, its own copy of the method."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_fls.batches import Batch
from lightning_fls.calibration import GradientCollector, InputCollector, StepData
from lightning_fls.engine import DAMPING_RAISE, PruningEngine
from lightning_fls.layers import prunable_layers
from lightning_fls.methods import FLS, resolve_method
from lightning_fls.options import build_options


def _setup(method: str = "magnitude", **options: object):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    layers = prunable_layers(model)
    opts = build_options(resolve_method(method), sparsity=0.5, progress=False, **options)  # type: ignore[arg-type]
    return model, layers, PruningEngine(layers, opts, torch.device("cpu"))


def test_weights_that_are_already_zero_count_as_pruned_and_bias_columns_are_kept() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    with torch.no_grad():
        model[0].weight[0, :3] = 0
    layers = prunable_layers(model)
    engine = PruningEngine(
        layers, build_options(resolve_method("fls"), sparsity=0.5), torch.device("cpu")
    )
    assert int((~engine.masks["0.weight"]).sum()) == 3
    canonical = engine.canonical_mask("0.weight")
    assert canonical.shape == (5, 7)
    assert bool(canonical[:, -1].all())  # the bias column is never pruned
    assert torch.equal(canonical[:, :-1], engine.masks["0.weight"])


def test_magnitude_step_prunes_the_smallest_weights_globally_and_predicts_half_their_square() -> (
    None
):
    model, layers, engine = _setup("magnitude")
    weights = torch.cat([model[0].weight.flatten(), model[2].weight.flatten()]).detach().clone()
    curvature, samples, gamma, _ = engine.curvature(None)
    assert (samples, gamma) == (0, 0.0)
    outcome = engine.prune_step(curvature, 0.5)
    pruned = weights.abs().sort().values[: weights.numel() // 2]
    assert outcome.predicted == pytest.approx(float((pruned.double() ** 2).sum() / 2), rel=1e-6)
    for key, adapter in layers.items():
        weight = getattr(adapter.module, adapter.key_parameter)
        assert torch.all(weight[~engine.masks[key]] == 0)
        assert torch.all(weight[engine.masks[key]] != 0)  # no correction of the survivors


def test_a_method_that_reads_data_refuses_a_step_without_any() -> None:
    _, _, engine = _setup("obert")
    with pytest.raises(ValueError, match="method='obert' needs gradients"):
        engine.curvature(StepData())
    _, _, engine = _setup("sparsegpt")
    with pytest.raises(ValueError, match="method='sparsegpt' needs layer inputs"):
        engine.curvature(None)


def test_gamma_follows_the_step_gradients_and_the_damping_scale() -> None:
    model, layers, engine = _setup("diag_fisher", damping=0.1)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    collector = GradientCollector(model, F.cross_entropy, layers)
    collector.observe(_batch(x, y))
    step = collector.result()
    # Dense reference: mean over examples and over every weight and bias entry of g_i².
    squares, entries = 0.0, sum(p.numel() for p in model.parameters())
    for i in range(16):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        squares += sum(float(p.grad.square().sum()) for p in model.parameters())  # type: ignore[union-attr]
    _, samples, gamma, _ = engine.curvature(step)
    assert samples == 16
    assert gamma == pytest.approx(0.1 * squares / 16 / entries, rel=1e-4)
    engine.raise_damping()
    _, _, raised, _ = engine.curvature(step)
    assert raised == pytest.approx(DAMPING_RAISE * gamma)


def test_methods_without_damping_get_gamma_zero_and_input_statistics() -> None:
    model, layers, engine = _setup("sparsegpt")
    collector = InputCollector(model, F.cross_entropy, layers, method="sparsegpt")
    collector.observe(_batch(torch.randn(16, 6), torch.randint(0, 3, (16,))))
    curvature, samples, gamma, mb = engine.curvature(collector.result())
    assert (samples, gamma) == (16, 0.0)
    assert set(curvature) == set(layers)
    assert mb > 0


def test_the_engine_holds_its_own_copy_of_the_method() -> None:
    method = FLS(refine_passes=1)
    model = nn.Sequential(nn.Linear(4, 3))
    options = build_options(method, sparsity=0.5)
    first = PruningEngine(prunable_layers(model), options, torch.device("cpu"))
    second = PruningEngine(prunable_layers(model), options, torch.device("cpu"))
    assert first.method is not method
    assert first.method is not second.method
    assert first.method == method  # same configuration


def _batch(inputs: torch.Tensor, targets: torch.Tensor | None) -> Batch:
    return Batch(inputs, targets, keywords=False)


def test_a_step_releases_each_kronecker_estimates_gram_matrices_after_its_correction() -> None:
    from lightning_fls.fishleg.kronecker import KroneckerBlock
    from lightning_fls.methods._fishleg import frozen_block

    _, layers, engine = _setup("fls", row_update="joint")
    generator = torch.Generator().manual_seed(1)
    curvature, kept = {}, {}
    for key, adapter in layers.items():
        block = KroneckerBlock(adapter.canonical_shape)
        with torch.no_grad():
            for factor in (block.out_factor, block.in_factor):
                factor.add_(0.2 * torch.randn(factor.shape, generator=generator))
        curvature[key] = frozen_block(block)
        kept[key] = curvature[
            key
        ].kronecker_factors()  # formed before the step, as the aux loss does
    weights = {k: a.canonical_weight().clone() for k, a in layers.items()}
    outcome = engine.prune_step(curvature, 0.5)  # type: ignore[arg-type]
    assert outcome.predicted > 0
    for key, estimate in curvature.items():
        assert not torch.equal(
            layers[key].canonical_weight(), weights[key] * engine.canonical_mask(key)
        )
        again = estimate.kronecker_factors()
        assert again[0] is not kept[key][0]  # released by the step, formed anew
        torch.testing.assert_close(again[0], kept[key][0], rtol=0, atol=0)
