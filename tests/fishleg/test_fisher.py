"""Fisher–vector products from captured factors against explicit per-example gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_fls.fishleg import (
    BernoulliLikelihood,
    CategoricalLikelihood,
    DiagonalBlock,
    GaussianLikelihood,
    KroneckerBlock,
    build_blocks,
)
from lightning_fls.layers import DenseGradients, GradientCapture, OuterProductGradients, find_layers
from tests.cases import LAYER_CASES, LayerCase, batch_for
from tests.reference import dense_fisher, per_example_gradients, true_fisher

F64 = torch.float64


def model_for(case: LayerCase) -> nn.Sequential:
    layer = case.make_module()
    with torch.no_grad():
        features = layer(torch.zeros(1, *case.input_shape, dtype=F64)).numel()
    return nn.Sequential(layer, nn.Flatten(), nn.Tanh(), nn.Linear(features, 3, dtype=F64))


def ce_one(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="sum")


def check_against_reference(grads: dict, reference: dict) -> None:
    for key, ref in reference.items():
        got = grads[key]
        B = ref.shape[0]
        torch.testing.assert_close(got.materialise(), ref)
        Fd = dense_fisher(ref)
        V = torch.randn(ref.shape[1:], dtype=F64)
        torch.testing.assert_close(got.fvp(V), (Fd @ V.reshape(-1)).reshape(V.shape))
        Vb = torch.randn(4, *ref.shape[1:], dtype=F64)
        expected = (Vb.reshape(4, -1) @ Fd).reshape(Vb.shape)
        torch.testing.assert_close(got.fvp(Vb), expected)
        torch.testing.assert_close(got.diagonal(), torch.diagonal(Fd).reshape(ref.shape[1:]))
        torch.testing.assert_close(got.trace(), torch.trace(Fd))
        assert got.batch_size == B


@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_empirical_fvp_matches_per_example_gradients(case: LayerCase, reduction: str) -> None:
    model = model_for(case)
    x = batch_for(case)
    y = torch.randint(0, 3, (x.shape[0],))
    adapters = find_layers(model)
    assert len(adapters) == 2
    with GradientCapture(adapters) as capture:
        loss = F.cross_entropy(model(x), y, reduction=reduction)
        loss.backward()
    grads = capture.example_gradients(loss_reduction=reduction, dtype=F64)
    reference = per_example_gradients(model, ce_one, x, y, adapters)
    check_against_reference(grads, reference)


@pytest.mark.parametrize("case", LAYER_CASES[:4], ids=lambda c: c.id)
def test_sampled_fvp_matches_per_example_gradients_of_drawn_targets(case: LayerCase) -> None:
    model = model_for(case)
    x = batch_for(case)
    adapters = find_layers(model)
    likelihood = CategoricalLikelihood()
    with GradientCapture(adapters, keep_outputs=True) as capture:
        out = model(x)
        grads = capture.sampled_gradients(
            out, likelihood, generator=torch.Generator().manual_seed(3), dtype=F64
        )
    y = likelihood.sample(out, torch.Generator().manual_seed(3))
    reference = per_example_gradients(model, ce_one, x, y, adapters)
    check_against_reference(grads, reference)
    # The sampled backward touched no parameter gradient.
    assert all(p.grad is None for p in model.parameters())


def test_sampled_then_training_backward_both_work() -> None:
    model = nn.Sequential(nn.Linear(3, 4, dtype=F64), nn.ReLU(), nn.Linear(4, 2, dtype=F64))
    x, y = torch.randn(6, 3, dtype=F64), torch.randint(0, 2, (6,))
    adapters = find_layers(model)
    with GradientCapture(adapters, keep_outputs=True) as capture:
        out = model(x)
        capture.sampled_gradients(out, CategoricalLikelihood())
        F.cross_entropy(out, y).backward()
    empirical = capture.example_gradients(dtype=F64)
    reference = per_example_gradients(model, ce_one, x, y, adapters)
    check_against_reference(empirical, reference)


def test_shared_layer_and_inplace_activation() -> None:
    shared = nn.Linear(3, 3, dtype=F64)
    head = nn.Linear(3, 2, dtype=F64)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared, self.head = shared, head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu_(self.shared(x))  # in-place right after the captured output
            h = torch.tanh(self.shared(h))
            return self.head(h)

    model = Net()
    x, y = torch.randn(5, 3, dtype=F64), torch.randint(0, 2, (5,))
    adapters = find_layers(model)
    with GradientCapture(adapters) as capture:
        F.cross_entropy(model(x), y).backward()
    grads = capture.example_gradients(dtype=F64)
    check_against_reference(grads, per_example_gradients(model, ce_one, x, y, adapters))


def test_kronecker_factors_are_mean_outer_products() -> None:
    a = torch.randn(6, 1, 1, 4, dtype=F64)
    g = torch.randn(6, 1, 1, 3, dtype=F64)
    grads = OuterProductGradients(a, g)
    A, G = grads.kronecker_factors()
    torch.testing.assert_close(A, a[:, 0, 0].T @ a[:, 0, 0] / 6)
    torch.testing.assert_close(G, g[:, 0, 0].T @ g[:, 0, 0] / 6)
    dense = DenseGradients(grads.materialise())
    V = torch.randn(3, 4, dtype=F64)
    torch.testing.assert_close(dense.fvp(V), grads.fvp(V))


def test_capture_errors_are_clear() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    adapters = find_layers(model)
    capture = GradientCapture(adapters)
    with pytest.raises(RuntimeError, match="not called"):
        capture.example_gradients()
    with capture:
        model(torch.randn(2, 3))  # no backward
    with pytest.raises(RuntimeError, match="No output gradient"):
        capture.example_gradients()
    with pytest.raises(ValueError, match="loss_reduction"):
        capture.example_gradients(loss_reduction="median")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="keep_outputs"):
        capture.sampled_gradients(torch.randn(2, 2, requires_grad=True), CategoricalLikelihood())


def test_capture_leaves_no_hooks() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    with GradientCapture(find_layers(model)) as capture:
        assert capture.attached
        assert all(len(m._forward_hooks) == 1 for m in model)
    assert all(len(m._forward_hooks) == 0 for m in model)


@pytest.mark.parametrize(
    ("likelihood", "make_output"),
    [
        (CategoricalLikelihood(), lambda: torch.randn(4, 3, dtype=F64)),
        (BernoulliLikelihood(), lambda: torch.randn(4, 2, 2, dtype=F64)),
        (GaussianLikelihood(sigma=0.5), lambda: torch.randn(4, 3, dtype=F64)),
    ],
    ids=["categorical", "bernoulli", "gaussian"],
)
def test_output_fisher_is_expected_outer_product_of_score(likelihood, make_output) -> None:
    f = make_output().requires_grad_()
    draws = 20000
    gen = torch.Generator().manual_seed(0)
    fb = f.detach().repeat(draws, *([1] * (f.dim() - 1))).requires_grad_()
    y = likelihood.sample(fb, gen)
    (score,) = torch.autograd.grad(likelihood.nll(fb, y).sum(), fb)
    score = score.reshape(draws, f.shape[0], -1)
    total = torch.einsum("dbi,dbj->bij", score, score) / draws
    expected = likelihood.output_fisher(f.detach())
    # Monte-Carlo error ~ scale / sqrt(draws) = 0.7% of the scale; allow about 8 standard errors.
    torch.testing.assert_close(total, expected, rtol=0.0, atol=0.06 * float(expected.abs().max()))


def test_true_fisher_equals_expectation_over_classes() -> None:
    """GGN reference = Σ_c p_c g_c g_cᵀ, enumerating every class (exact, no sampling)."""
    model = nn.Sequential(nn.Linear(3, 4, dtype=F64), nn.Tanh(), nn.Linear(4, 3, dtype=F64))
    x = torch.randn(5, 3, dtype=F64)
    adapters = find_layers(model)
    exact = true_fisher(model, CategoricalLikelihood(), x, adapters)
    with torch.no_grad():
        probs = torch.softmax(model(x), -1)
    expected = {key: torch.zeros_like(m) for key, m in exact.items()}
    for c in range(3):
        y = torch.full((5,), c)
        per_example = per_example_gradients(model, ce_one, x, y, adapters)
        for key, G in per_example.items():
            flat = G.reshape(5, -1)
            expected[key] += (flat.T * probs[:, c]) @ flat / 5
    for key in exact:
        torch.testing.assert_close(exact[key], expected[key])


def test_generic_adapter_covers_any_parameter_with_exact_per_example_gradients() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(7, 3, dtype=F64)
            self.norm = nn.LayerNorm(6, dtype=F64)
            self.head = nn.Linear(6, 3, dtype=F64)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.head(self.norm(self.embed(tokens).flatten(1)))

    model = Net()
    with torch.no_grad():
        model.norm.weight.add_(torch.randn(6, dtype=F64))
    tokens, y = torch.randint(0, 7, (5, 2)), torch.randint(0, 3, (5,))
    adapters = find_layers(model, fallback=True)
    assert list(adapters) == ["embed.weight", "norm.weight", "head.weight"]
    assert adapters["norm.weight"].canonical_shape == (1, 12)  # weight and bias
    with GradientCapture(adapters) as capture:
        F.cross_entropy(model(tokens), y).backward()
    grads = capture.example_gradients(dtype=F64)
    check_against_reference(grads, per_example_gradients(model, ce_one, tokens, y, adapters))
    blocks = build_blocks(adapters)
    assert isinstance(blocks["norm.weight"], DiagonalBlock)
    assert isinstance(blocks["head.weight"], KroneckerBlock)


def test_generic_adapter_refuses_batch_norm_in_training_mode() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    adapters = find_layers(model, fallback=True)
    with GradientCapture(adapters) as capture:
        F.cross_entropy(model(torch.randn(6, 3)), torch.randint(0, 2, (6,))).backward()
    with pytest.raises(ValueError, match="batch norm in training mode"):
        capture.example_gradients()
