"""SparseGPT column-by-column OBS against plain references and dense solves (float64)."""

from __future__ import annotations

import itertools

import pytest
import torch

from lightning_fls._linalg import FallbackCounter
from lightning_fls.patterns import NMPattern
from lightning_fls.sparsegpt import (
    SparseGPTResult,
    input_hessian,
    inverse_hessian_factor,
    obs_sweep,
    sparsegpt_prune,
)

F64 = torch.float64


def correlated_inputs(tokens: int, d: int, seed: int = 0) -> torch.Tensor:
    """``[tokens, d]`` inputs with strongly correlated features."""
    gen = torch.Generator().manual_seed(seed)
    latent = torch.randn(tokens, d, generator=gen, dtype=F64)
    mixing = torch.randn(d, d, generator=gen, dtype=F64) / d**0.5 + torch.eye(d, dtype=F64)
    shared = torch.randn(tokens, 1, generator=gen, dtype=F64)
    inputs: torch.Tensor = latent @ mixing + 2.0 * shared
    return inputs


def problem(
    rows: int, cols: int, tokens: int = 256, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights ``[rows, cols]``, inputs ``[tokens, cols]`` and ``H = Σ x xᵀ``."""
    gen = torch.Generator().manual_seed(seed + 1)
    W = torch.randn(rows, cols, generator=gen, dtype=F64)
    X = correlated_inputs(tokens, cols, seed)
    return W, X, input_hessian(X)


def damped(H: torch.Tensor, relative_damping: float) -> torch.Tensor:
    return H + relative_damping * H.diagonal().mean() * torch.eye(H.shape[0], dtype=F64)


def reference_sweep(
    W: torch.Tensor, H: torch.Tensor, prune: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """Plain sequential OBS with a fixed mask, from the trailing Hessian inverses (no ``U``).

    At column j (earlier columns frozen) the free weights are columns ≥ j with Hessian
    ``H[j:, j:]``; zeroing ``w_j`` optimally moves the row by ``−w_j / G_00 · G[:, 0]`` with
    ``G = H[j:, j:]⁻¹``, at a loss of ``w_j² / G_00``.
    """
    W = W.clone()
    loss = 0.0
    for j in range(W.shape[1]):
        G = torch.linalg.inv(H[j:, j:])
        for r in range(W.shape[0]):
            if prune[r, j]:
                w = float(W[r, j])
                loss += w * w / float(G[0, 0])
                W[r, j:] -= w / G[0, 0] * G[:, 0]
                W[r, j] = 0.0
    return W, 0.5 * loss


def layer_loss(W: torch.Tensor, W_new: torch.Tensor, X: torch.Tensor) -> float:
    return float((X @ (W - W_new).T).square().sum())


def group_counts(keep: torch.Tensor, m: int, columns: int | None = None) -> torch.Tensor:
    pruned = ~keep[:, : columns if columns is not None else keep.shape[1]]
    return pruned.reshape(keep.shape[0], -1, m).sum(-1)


# --------------------------------------------------------------------------- the sweep


@pytest.mark.parametrize("pattern", [None, NMPattern(2, 4), NMPattern(3, 8)])
def test_blocked_equals_unblocked(pattern: NMPattern | None) -> None:
    W, _, H = problem(6, 40)
    keep = torch.ones_like(W, dtype=torch.bool)
    keep[1, 3] = keep[4, 17] = False
    W[~keep] = 0.0
    target = 100 if pattern is None else 90
    results = [
        sparsegpt_prune(W, H, keep, target=target, pattern=pattern, block_size=b, window=8)
        for b in (1, 5, 128)
    ]
    for result in results[1:]:
        assert torch.equal(result.keep, results[0].keep)
        torch.testing.assert_close(result.weight, results[0].weight, rtol=0, atol=1e-10)
        assert result.error == pytest.approx(results[0].error, rel=1e-10)
    assert not torch.equal(results[0].weight[results[0].keep], W[results[0].keep])


@pytest.mark.parametrize("block_size", [1, 7, 64])
def test_fixed_mask_sweep_matches_the_plain_reference(block_size: int) -> None:
    W, _, H = problem(5, 24)
    prune = torch.rand(W.shape, generator=torch.Generator().manual_seed(3)) < 0.4
    relative_damping = 0.05
    U = inverse_hessian_factor(H, relative_damping=relative_damping)
    new, error = obs_sweep(W, U, prune, block_size=block_size)
    expected, expected_error = reference_sweep(W, damped(H, relative_damping), prune)
    torch.testing.assert_close(new, expected, rtol=0, atol=1e-9)
    assert error == pytest.approx(expected_error, rel=1e-9)
    assert bool((new[prune] == 0).all())


def test_one_window_selects_by_initial_saliency_and_matches_the_reference() -> None:
    W, _, H = problem(4, 16)
    relative_damping = 0.02
    Hd = damped(H, relative_damping)
    target = 29
    result = sparsegpt_prune(
        W,
        H,
        torch.ones_like(W, dtype=torch.bool),
        target=target,
        window=16,
        relative_damping=relative_damping,
    )
    # with one window, the whole mask is chosen before any correction: w² / [H_{≥j}⁻¹]_jj
    trailing = torch.stack([torch.linalg.inv(Hd[j:, j:])[0, 0] for j in range(16)])
    scores = W.square() / trailing
    expected_prune = torch.zeros(W.numel(), dtype=torch.bool)
    expected_prune[scores.flatten().argsort()[:target]] = True
    assert torch.equal(~result.keep, expected_prune.reshape(W.shape))
    expected, expected_error = reference_sweep(W, Hd, ~result.keep)
    torch.testing.assert_close(result.weight, expected, rtol=0, atol=1e-9)
    assert result.error == pytest.approx(expected_error, rel=1e-9)


def test_one_pruned_weight_gives_the_constrained_minimiser() -> None:
    W, _, H = problem(3, 10)
    row, q = 1, 4
    # min over w' of (w − w')ᵀ H (w − w') with w'_q = 0 and w'_k = w_k for k < q:
    # δ = w' − w has δ_k = 0 (k < q), δ_q = −w_q, and H_FF δ_F = −H_Fq δ_q on F = {k > q}
    free = slice(q + 1, None)
    delta = torch.zeros(10, dtype=F64)
    delta[q] = -W[row, q]
    delta[free] = torch.linalg.solve(H[free, free], -H[free, q] * delta[q])
    expected = W.clone()
    expected[row] += delta

    prune = torch.zeros_like(W, dtype=torch.bool)
    prune[row, q] = True
    new, error = obs_sweep(W, inverse_hessian_factor(H, relative_damping=0.0), prune)
    torch.testing.assert_close(new, expected, rtol=0, atol=1e-9)
    assert error == pytest.approx(0.5 * float(delta @ H @ delta), rel=1e-9)

    # the same through sparsegpt_prune: an already-pruned entry with a non-zero weight
    result = sparsegpt_prune(W, H, ~prune, target=1, relative_damping=0.0)
    assert torch.equal(result.keep, ~prune)
    torch.testing.assert_close(result.weight, expected, rtol=0, atol=1e-9)
    assert torch.equal(result.weight[[0, 2]], W[[0, 2]])


def test_error_is_half_the_layer_wise_loss() -> None:
    W, X, H = problem(8, 32, tokens=200)
    result = sparsegpt_prune(
        W, H, torch.ones_like(W, dtype=torch.bool), target=128, window=8, relative_damping=0.0
    )
    assert result.error == pytest.approx(0.5 * layer_loss(W, result.weight, X), rel=1e-8)


# --------------------------------------------------------------------------- counts and masks


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.25, 0.5, 0.9, 1.0])
def test_exact_count_and_previous_prunes_stay(fraction: float) -> None:
    W, _, H = problem(8, 20)
    keep = torch.rand(W.shape, generator=torch.Generator().manual_seed(5)) > 0.05
    W[~keep] = 0.0
    already = int((~keep).sum())
    new = round(fraction * int(keep.sum()))
    result = sparsegpt_prune(W, H, keep, target=already + new, window=6, block_size=4)
    assert int((~result.keep).sum()) == already + new
    assert not bool(result.keep[~keep].any())
    assert bool((result.weight[~result.keep] == 0).all())
    assert result.keep.dtype == torch.bool
    assert result.keep.shape == W.shape


def test_prunes_are_spread_over_windows_in_proportion_to_room() -> None:
    W, _, H = problem(6, 32)
    keep = torch.ones_like(W, dtype=torch.bool)
    keep[:, 8:16] = False  # the second window is fully pruned already: no room
    W[~keep] = 0.0
    result = sparsegpt_prune(W, H, keep, target=48 + 72, window=8)
    per_window = (~result.keep).reshape(6, 4, 8).sum((0, 2))
    assert per_window.tolist() == [24, 48, 24, 24]


@pytest.mark.parametrize("new", [4, 5, 11])
def test_window_counts_use_cumulative_rounding(new: int) -> None:
    W, _, H = problem(3, 24)
    keep = torch.ones_like(W, dtype=torch.bool)
    keep[0, :3] = False  # rooms 21, 24, 24
    W[~keep] = 0.0
    cumulative = [0, 21, 45, 69]
    marks = [round(new * c / 69) for c in cumulative]
    assert all(abs(new * c / 69 % 1 - 0.5) > 1e-6 for c in cumulative)  # no ties to round
    expected = [b - a for a, b in itertools.pairwise(marks)]
    result = sparsegpt_prune(W, H, keep, target=3 + new, window=8)
    new_per_window = (~result.keep).reshape(3, 3, 8).sum((0, 2)) - torch.tensor([3, 0, 0])
    assert new_per_window.tolist() == expected


def test_later_columns_are_never_pruned_but_corrected() -> None:
    W, _, H = problem(5, 13)
    W[:, -1] = 0.3
    keep = torch.ones_like(W, dtype=torch.bool)
    for target in (30, 60):  # 60 = every prunable entry
        result = sparsegpt_prune(W, H, keep, target=target, prunable_columns=12, window=4)
        assert bool(result.keep[:, 12:].all())
        assert int((~result.keep[:, :12]).sum()) == target
        assert not torch.allclose(result.weight[:, 12], W[:, 12])


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8)])
def test_pattern_at_full_target_prunes_exactly_n_per_group(n: int, m: int) -> None:
    rows, cols = 6, 33  # the last column (e.g. a bias input) is outside the groups
    W, _, H = problem(rows, cols)
    keep = torch.ones_like(W, dtype=torch.bool)
    keep[0, 1] = keep[3, 9] = False
    W[~keep] = 0.0
    prunable = 32
    target = n * rows * prunable // m
    result = sparsegpt_prune(
        W, H, keep, target=target, prunable_columns=prunable, pattern=NMPattern(n, m), window=3
    )
    assert bool((group_counts(result.keep, m, prunable) == n).all())
    assert not bool(result.keep[~keep].any())
    assert bool(result.keep[:, prunable:].all())


@pytest.mark.parametrize(("n", "m", "target"), [(2, 4, 50), (1, 4, 17), (4, 8, 61)])
def test_pattern_at_partial_target_is_exact_and_within_n(n: int, m: int, target: int) -> None:
    W, _, H = problem(6, 32)
    keep = torch.ones_like(W, dtype=torch.bool)
    keep[2, 0] = False
    W[~keep] = 0.0
    result = sparsegpt_prune(W, H, keep, target=target, pattern=NMPattern(n, m))
    counts = group_counts(result.keep, m)
    assert int(counts.sum()) == target
    assert bool((counts <= n).all())
    assert not bool(result.keep[2, 0])


def test_returns_the_input_dtype_with_exact_zeros() -> None:
    W, _, H = problem(4, 16)
    result = sparsegpt_prune(
        W.float(), H.float(), torch.ones(4, 16, dtype=torch.bool), target=32, window=4
    )
    assert isinstance(result, SparseGPTResult)
    assert result.weight.dtype == torch.float32
    assert bool((result.weight[~result.keep] == 0).all())
    assert bool((result.weight[result.keep] != 0).all())


def test_dead_inputs_are_handled() -> None:
    W, X, _ = problem(4, 12)
    X[:, 5] = 0.0
    H = input_hessian(X)
    result = sparsegpt_prune(W, H, torch.ones_like(W, dtype=torch.bool), target=24, window=4)
    assert bool(torch.isfinite(result.weight).all())
    assert int((~result.keep).sum()) == 24


# --------------------------------------------------------------------------- quality


def test_beats_zeroing_and_magnitude_pruning() -> None:
    W, X, H = problem(16, 64, tokens=512)
    target = W.numel() // 2
    keep = torch.ones_like(W, dtype=torch.bool)
    result = sparsegpt_prune(W, H, keep, target=target, window=16)
    sparsegpt_loss = layer_loss(W, result.weight, X)
    zeroed = torch.where(result.keep, W, 0.0)
    magnitude = W.clone()
    magnitude.view(-1)[W.abs().flatten().argsort()[:target]] = 0.0
    assert int((magnitude == 0).sum()) == target
    assert sparsegpt_loss < 0.5 * layer_loss(W, zeroed, X)
    assert sparsegpt_loss < 0.5 * layer_loss(W, magnitude, X)


def test_pattern_beats_magnitude_pattern() -> None:
    W, X, H = problem(8, 32, tokens=256)
    result = sparsegpt_prune(
        W, H, torch.ones_like(W, dtype=torch.bool), target=128, pattern=NMPattern(2, 4)
    )
    groups = W.reshape(8, 8, 4)
    ranks = groups.abs().argsort(-1).argsort(-1)
    magnitude = torch.where(ranks < 2, 0.0, groups).reshape(8, 32)
    assert layer_loss(W, result.weight, X) < layer_loss(W, magnitude, X)


def test_input_hessian_sums_outer_products_over_leading_dims() -> None:
    inputs = torch.randn(2, 3, 5)
    H = input_hessian(inputs)
    expected = sum(torch.outer(x, x) for x in inputs.reshape(-1, 5).to(F64))
    assert H.dtype == F64
    assert H.shape == (5, 5)
    assert isinstance(expected, torch.Tensor)
    torch.testing.assert_close(H, expected)
    torch.testing.assert_close(
        input_hessian(inputs[0, 0]), torch.outer(*[inputs[0, 0].double()] * 2)
    )
    with pytest.raises(ValueError, match="inputs"):
        input_hessian(torch.tensor(1.0))


# --------------------------------------------------------------------------- validation


def _call(**overrides: object) -> SparseGPTResult:
    W, _, H = problem(4, 8, tokens=64)
    keep = torch.ones_like(W, dtype=torch.bool)
    kwargs: dict[str, object] = {"weight": W, "hessian": H, "keep": keep, "target": 8}
    kwargs.update(overrides)
    return sparsegpt_prune(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"weight": torch.randn(4, 8, 2)}, "`weight`"),
        ({"weight": torch.ones(4, 8, dtype=torch.int64)}, "`weight`"),
        ({"hessian": torch.eye(7, dtype=F64)}, "`hessian`"),
        ({"keep": torch.ones(4, 7, dtype=torch.bool)}, "`keep`"),
        ({"keep": torch.ones(4, 8)}, "`keep`"),
        ({"target": -1}, r"`target` must be in \[0, 32\]"),
        ({"target": 33}, r"`target` must be in \[0, 32\]"),
        ({"keep": torch.arange(32).reshape(4, 8) >= 3, "target": 2}, r"`target`.*\[3, 32\]"),
        ({"prunable_columns": 0}, r"`prunable_columns`.*\[1, 8\]"),
        ({"prunable_columns": 9}, r"`prunable_columns`.*\[1, 8\]"),
        ({"prunable_columns": 6, "pattern": NMPattern(2, 4)}, "`prunable_columns`"),
        (
            {"keep": torch.arange(8).repeat(4, 1) >= 3, "pattern": NMPattern(2, 4), "target": 12},
            "`keep`",
        ),
        ({"target": 17, "pattern": NMPattern(2, 4)}, r"`target` must be in \[0, 16\]"),
        ({"block_size": 0}, "`block_size`"),
        ({"window": 0}, "`window`"),
        ({"relative_damping": -0.1}, "`relative_damping`"),
        ({"hessian": torch.full((8, 8), float("nan"), dtype=F64)}, "`hessian`"),
    ],
)
def test_bad_arguments_are_refused_by_name(overrides: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _call(**overrides)


def test_singular_hessian_is_a_counted_fallback_not_an_error() -> None:
    # Rank one and no damping: Cholesky fails; the eigenvalue floor takes over and says so.
    with FallbackCounter() as fallbacks:
        result = _call(hessian=torch.ones(8, 8, dtype=F64), relative_damping=0.0)
    assert fallbacks.count >= 1
    assert bool(torch.isfinite(result.weight).all())
    assert int((result.weight == 0).sum()) == 8


def test_obs_sweep_refuses_bad_arguments() -> None:
    W = torch.randn(3, 4, dtype=F64)
    U = torch.eye(4, dtype=F64)
    prune = torch.zeros(3, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="`factor`"):
        obs_sweep(W, torch.eye(3, dtype=F64), prune)
    with pytest.raises(ValueError, match="`prune`"):
        obs_sweep(W, U, prune.float())
    with pytest.raises(ValueError, match="`block_size`"):
        obs_sweep(W, U, prune, block_size=0)
