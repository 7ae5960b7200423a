"""OBS saliencies and updates on quadratic losses with known Hessians (float64)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_fls.obs as obs_module
from lightning_fls import prune_one_shot
from lightning_fls.baselines import BlockWoodburyInverse
from lightning_fls.fishleg import AuxiliaryOptimizer, BlockDiagonalBlock
from lightning_fls.masks import full_masks, select_masks
from lightning_fls.obs import (
    SWEEP_REFINE_STEPS,
    joint_block_obs_update,
    kronecker_auto_obs_update,
    kronecker_row_obs_update,
    kronecker_sweep_obs_update,
    obs_saliency,
    obs_update,
    row_update_flops,
)
from tests.helpers import DenseCurvature, random_spd
from tests.reference import dense_fvp

F64 = torch.float64


def constrained_optimum(H: torch.Tensor, w: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """argmin_δ ½ δᵀ H δ subject to (w + δ)_P = 0, by the KKT system."""
    P, Fr = pruned, ~pruned
    delta = torch.zeros_like(w)
    delta[P] = -w[P]
    delta[Fr] = -torch.linalg.solve(H[Fr][:, Fr], H[Fr][:, P] @ delta[P])
    return w + delta


def loss_increase(H: torch.Tensor, w0: torch.Tensor, w: torch.Tensor) -> float:
    d = w - w0
    return float(0.5 * d @ H @ d)


def test_single_weight_obs_reaches_the_constrained_optimum() -> None:
    shape = (3, 4)
    H = random_spd(12)
    w = torch.randn(shape, dtype=F64)
    curvature = DenseCurvature(torch.linalg.inv(H), shape)
    saliency = obs_saliency(w, curvature.diag_q())
    q = int(saliency.argmin())
    prune = torch.zeros(12, dtype=torch.bool)
    prune[q] = True
    update = obs_update(w, curvature, prune.reshape(shape), ~prune.reshape(shape))
    expected = constrained_optimum(H, w.reshape(-1), prune)
    torch.testing.assert_close(update.weight.reshape(-1), expected)
    assert update.weight.reshape(-1)[q] == 0.0
    realised = loss_increase(H, w.reshape(-1), update.weight.reshape(-1))
    assert realised == pytest.approx(update.predicted_increase, rel=1e-10)
    assert update.predicted_increase == pytest.approx(float(saliency.min()), rel=1e-12)


def test_joint_block_obs_is_exact_for_a_set_of_weights() -> None:
    shape = (2, 5)
    H = random_spd(10)
    w = torch.randn(shape, dtype=F64)
    prune = torch.tensor([[True, False, True, False, False], [False, False, False, True, False]])
    update = joint_block_obs_update(w, DenseCurvature(torch.linalg.inv(H), shape), prune, ~prune)
    expected = constrained_optimum(H, w.reshape(-1), prune.reshape(-1))
    torch.testing.assert_close(update.weight.reshape(-1), expected)
    realised = loss_increase(H, w.reshape(-1), update.weight.reshape(-1))
    assert realised == pytest.approx(update.predicted_increase, rel=1e-10)


def test_sum_of_singles_is_exact_when_weights_do_not_interact() -> None:
    shape = (3, 3)
    H = torch.diag(torch.rand(9, dtype=F64) + 0.5)
    w = torch.randn(shape, dtype=F64)
    prune = torch.rand(shape) < 0.5
    update = obs_update(w, DenseCurvature(torch.linalg.inv(H), shape), prune, ~prune)
    realised = loss_increase(H, w.reshape(-1), update.weight.reshape(-1))
    assert realised == pytest.approx(update.predicted_increase, rel=1e-10)
    assert torch.all(update.weight[prune] == 0)


def test_previously_pruned_weights_stay_exactly_zero_and_get_no_correction() -> None:
    shape = (2, 4)
    Q = torch.linalg.inv(random_spd(8))
    w = torch.randn(shape, dtype=F64)
    already = torch.tensor([[False, True, False, False], [False, False, False, False]])
    w[already] = 0.0
    prune = torch.tensor([[True, False, False, False], [False, False, True, False]])
    keep = ~(already | prune)
    update = obs_update(w, DenseCurvature(Q, shape), prune, keep)
    assert torch.all(update.weight[~keep] == 0)
    no_correction = obs_update(w, DenseCurvature(Q, shape), prune, keep, correct=False)
    torch.testing.assert_close(no_correction.weight, w * keep)


def test_woodbury_blocks_support_joint_obs() -> None:
    shape = (2, 3)
    grads = torch.randn(5, *shape, dtype=F64)
    estimate = BlockWoodburyInverse(shape, num_gradients=5, damping=0.5, block_size=6, dtype=F64)
    estimate.update(grads)
    flat = grads.reshape(5, -1)
    H = 0.5 * torch.eye(6, dtype=F64) + flat.T @ flat / 5
    w = torch.randn(shape, dtype=F64)
    prune = torch.tensor([[True, False, False], [False, True, False]])
    update = joint_block_obs_update(w, estimate, prune, ~prune)
    torch.testing.assert_close(
        update.weight.reshape(-1), constrained_optimum(H, w.reshape(-1), prune.reshape(-1))
    )


def test_fls_with_a_converged_q_picks_the_same_weights_as_exact_obs() -> None:
    shape, n, gamma = (3, 4), 12, 0.1
    U, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64))
    F = U @ torch.diag(torch.logspace(-2, 1, n, dtype=F64)) @ U.T
    exact = torch.linalg.inv(F + gamma * torch.eye(n, dtype=F64))
    block = BlockDiagonalBlock(shape, block_size=n, init_scale=1 / gamma, dtype=F64)
    aux = AuxiliaryOptimizer({"l": block}, lr=3e-2)
    probes = torch.eye(n, dtype=F64).reshape(n, *shape)
    steps = 1500
    for t in range(steps):
        for group in aux.optimizer.param_groups:
            group["lr"] = 3e-2 * 0.5 * (1 + math.cos(math.pi * t / steps))
        aux.step({"l": dense_fvp(F)}, gamma, probes={"l": probes})
    w = torch.randn(shape, dtype=F64)
    fls = {"l": obs_saliency(w, block.diag_q().detach())}
    obs = {"l": obs_saliency(w, torch.diagonal(exact).reshape(shape))}
    for sparsity in (0.25, 0.5, 0.75):
        chosen = select_masks(fls, full_masks(fls), sparsity)
        reference = select_masks(obs, full_masks(obs), sparsity)
        assert torch.equal(chosen["l"], reference["l"])


@pytest.mark.parametrize("block_size", [3, 10])
@pytest.mark.parametrize("every_block", [False, True])
def test_joint_block_obs_from_factors_matches_the_dense_optimum(
    every_block: bool, block_size: int
) -> None:
    """Q held as factors c·L Lᵀ, solved in chunks, some blocks losing nothing.

    With blocks of 10 the blocks losing 1–4 weights are solved on sides 4 and 8, the others on
    their full side; with blocks of 3, every block on its full side.
    """
    from lightning_fls.methods._fishleg import FrozenBlockMatrices

    shape = (30, 40)  # n = 1200: 400 blocks of 3 or 120 of 10
    block = BlockDiagonalBlock(shape, block_size=block_size, init_scale=0.7, dtype=F64)
    with torch.no_grad():
        block.factors.add_(0.3 * torch.randn_like(block.factors))
    frozen = FrozenBlockMatrices(block)
    assert frozen.block_factors() is not None
    Q = block.to_dense().detach()
    w = torch.randn(shape, dtype=F64)
    prune = torch.rand(shape) < 0.3
    if not every_block:
        prune.reshape(-1)[:300] = False  # the first blocks lose nothing
    else:
        prune.reshape(-1)[::block_size] = True  # every block loses a weight
    prune.reshape(-1)[-20:] = True  # the last blocks lose all or most of their weights
    update = joint_block_obs_update(w, frozen, prune, ~prune)
    H = torch.linalg.inv(Q)
    expected = constrained_optimum(H, w.reshape(-1), prune.reshape(-1))
    torch.testing.assert_close(update.weight.reshape(-1), expected)
    realised = loss_increase(H, w.reshape(-1), update.weight.reshape(-1))
    assert realised == pytest.approx(update.predicted_increase, rel=1e-8)
    explicit = joint_block_obs_update(w, DenseBlocks(block), prune, ~prune)  # Q's own blocks
    torch.testing.assert_close(explicit.weight, update.weight)


class DenseBlocks:
    """A block-diagonal estimate seen only through its explicit blocks (no factors)."""

    def __init__(self, block: BlockDiagonalBlock) -> None:
        self.block = block

    def block_matrices(self) -> tuple[torch.Tensor, int]:
        with torch.no_grad():
            return self.block.block_matrices()

    def qv(self, V: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.block.qv(V)

    def diag_q(self) -> torch.Tensor:
        with torch.no_grad():
            return self.block.diag_q()


def row_problem(
    d_out: int, d_in: int, fraction: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(G_o, G_i, W, keep)`` with about ``fraction`` removed, row 1 keeping everything, row 4
    nothing, and row 0's removals made earlier (already zero)."""
    torch.manual_seed(0)
    G_o, G_i = random_spd(d_out), random_spd(d_in)
    W = torch.randn(d_out, d_in, dtype=torch.float64)
    keep = torch.rand(d_out, d_in) > fraction
    keep[1] = True
    keep[4] = False
    W[0, ~keep[0]] = 0.0
    return G_o, G_i, W, keep


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.8])
def test_kronecker_row_update_is_the_dense_joint_obs_of_its_row_blocks(fraction: float) -> None:
    """Against ``Q = c · diag(G_o) ⊗ G_i`` written out: the joint update over every removed entry
    (earlier removals held at zero), on both of its forms (solved on the removed entries or,
    where fewer, on the kept ones), with rows that lose nothing and a row that loses all."""
    d_out, d_in, c = 6, 9, 0.7
    G_o, G_i, W, keep = row_problem(d_out, d_in, fraction)
    update = kronecker_row_obs_update(W, (G_o, G_i, c), keep)
    assert update is not None
    Q = c * torch.kron(torch.diag(G_o.diagonal()), G_i)
    S = (~keep).reshape(-1).nonzero().squeeze(1)
    w = W.reshape(-1)
    x = torch.linalg.solve(Q[S][:, S], w[S])
    expected = (w - Q[:, S] @ x).reshape(d_out, d_in) * keep
    torch.testing.assert_close(update.weight, expected, rtol=1e-10, atol=1e-10)
    assert bool((update.weight[~keep] == 0).all())
    assert update.predicted_increase == pytest.approx(0.5 * float(w[S] @ x), rel=1e-10)
    assert kronecker_row_obs_update(W, (G_o, G_i, c), torch.ones_like(keep)) is None


def test_kronecker_row_update_solves_float32_factors_in_float64() -> None:
    torch.manual_seed(1)
    G_i = random_spd(40)
    G_o = random_spd(8)
    W = torch.randn(8, 40, dtype=torch.float64)
    keep = torch.rand(8, 40) > 0.5
    wide = kronecker_row_obs_update(W, (G_o, G_i, 1.0), keep)
    narrow = kronecker_row_obs_update(W.float(), (G_o.float(), G_i.float(), 1.0), keep)
    assert wide is not None
    assert narrow is not None
    assert narrow.weight.dtype == torch.float32
    torch.testing.assert_close(narrow.weight.double(), wide.weight, rtol=1e-4, atol=1e-5)


def sequential_obs_rows(H: torch.Tensor, W: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Every row swept left to right: at column ``j`` the columns before it are frozen and an
    entry not kept is removed by the optimal move of the columns ``≥ j`` under ``H``, written
    as the constrained optimum of the explicit sub-problem."""
    out = W.clone()
    n = W.shape[1]
    for r in range(W.shape[0]):
        for j in range(n):
            if keep[r, j]:
                continue
            tail = torch.zeros(n - j, dtype=torch.bool)
            tail[0] = True
            out[r, j:] = constrained_optimum(H[j:, j:], out[r, j:], tail)
    return out


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.9])
def test_kronecker_sweep_is_sequential_obs_of_its_rows(fraction: float) -> None:
    """Against explicit sub-problems: column by column, each removal moves only the columns to
    its right, optimally under ``H = G_i⁻¹``; earlier removals (zero, then moved by corrections
    from their left) end zero; the predicted increase is the realised ``Σ_r ½ δᵀHδ / (c(G_o)_rr)``;
    it is never below the joint update's."""
    c = 0.7
    G_o, G_i, W, keep = row_problem(6, 9, fraction)
    update = kronecker_sweep_obs_update(W, (G_o, G_i, c), keep)
    assert update is not None
    H = torch.linalg.inv(G_i)
    expected = sequential_obs_rows(H, W, keep)
    torch.testing.assert_close(update.weight, expected, rtol=1e-10, atol=1e-10)
    assert bool((update.weight[~keep] == 0).all())

    def cost(new: torch.Tensor) -> float:
        d = new - W
        return float((0.5 * ((d @ H) * d).sum(1) / (c * G_o.diagonal())).sum())

    assert update.predicted_increase == pytest.approx(cost(update.weight), rel=1e-10)
    joint = kronecker_row_obs_update(W, (G_o, G_i, c), keep)
    assert joint is not None
    assert joint.predicted_increase <= update.predicted_increase * (1 + 1e-12)
    assert kronecker_sweep_obs_update(W, (G_o, G_i, c), torch.ones_like(keep)) is None


@pytest.mark.parametrize("fraction", [0.3, 0.7])
def test_refined_sweep_moves_from_the_sweep_to_the_joint_optimum(fraction: float) -> None:
    """Conjugate gradients from the sweep: the loss increase never rises above the sweep's nor
    falls below the joint optimum's; with as many steps as a row has kept entries they reach
    that optimum (float32 steps); the prediction stays the realised quadratic."""
    torch.manual_seed(1)
    d_out, d_in, c = 7, 12, 0.4
    G_o, G_i = random_spd(d_out), random_spd(d_in)
    W = torch.randn(d_out, d_in, dtype=torch.float64)
    keep = torch.rand(d_out, d_in) > fraction
    keep[2] = False  # everything removed: nothing to refine
    H = torch.linalg.inv(G_i)

    def cost(new: torch.Tensor) -> float:
        d = new - W
        return float((0.5 * ((d @ H) * d).sum(1) / (c * G_o.diagonal())).sum())

    joint = kronecker_row_obs_update(W, (G_o, G_i, c), keep)
    sweep = kronecker_sweep_obs_update(W, (G_o, G_i, c), keep)
    assert joint is not None
    assert sweep is not None
    previous = sweep.predicted_increase
    for steps in (1, 3, d_in):
        refined = kronecker_sweep_obs_update(W, (G_o, G_i, c), keep, refine_steps=steps)
        assert refined is not None
        assert bool((refined.weight[~keep] == 0).all())
        assert refined.predicted_increase == pytest.approx(cost(refined.weight), rel=1e-10)
        assert joint.predicted_increase * (1 - 1e-6) <= refined.predicted_increase
        assert refined.predicted_increase <= previous * (1 + 1e-6)
        previous = refined.predicted_increase
    assert sweep.predicted_increase > 1.01 * joint.predicted_increase  # there was a gap
    assert refined.predicted_increase == pytest.approx(joint.predicted_increase, rel=1e-4)
    scale = float(joint.weight.abs().max())
    torch.testing.assert_close(refined.weight, joint.weight, rtol=0, atol=1e-3 * scale)


def test_row_update_flops_count_each_rows_system_and_the_sweeps_passes() -> None:
    keep = torch.zeros(3, 10, dtype=torch.bool)
    keep[0, :2] = True  # 2 kept, 8 removed: a system of side 2
    keep[1, :6] = True  # side 4
    keep[2] = True  # nothing removed: side 0
    exact, sweep = row_update_flops(keep, refine_steps=4)
    assert exact == pytest.approx((2**3 + 4**3) / 3)
    assert sweep == pytest.approx(10**3 / 3 + 9 * 3 * 10**2)


def test_auto_row_update_is_exact_where_affordable_and_the_refined_sweep_beyond(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same layer goes either way with the cost ratio; each result is the chosen solver's."""
    d_out, d_in, c = 6, 9, 0.7
    G_o, G_i, W, keep = row_problem(d_out, d_in, 0.5)
    joint = kronecker_row_obs_update(W, (G_o, G_i, c), keep)
    refined = kronecker_sweep_obs_update(W, (G_o, G_i, c), keep, refine_steps=SWEEP_REFINE_STEPS)
    assert joint is not None
    assert refined is not None
    assert not torch.equal(joint.weight, refined.weight)  # the two are told apart
    exact, sweep = row_update_flops(keep)
    for ratio, expected in ((exact / sweep, joint), (0.99 * exact / sweep, refined)):
        monkeypatch.setattr(obs_module, "AUTO_JOINT_COST_RATIO", ratio)
        auto = kronecker_auto_obs_update(W, (G_o, G_i, c), keep)
        assert auto is not None
        assert torch.equal(auto.weight, expected.weight)
        assert auto.predicted_increase == expected.predicted_increase


def test_kronecker_sweep_equals_the_joint_update_when_removals_come_first() -> None:
    """With no kept entry left of a removal, the sweep's corrections reach every kept entry."""
    torch.manual_seed(2)
    G_o, G_i = random_spd(5), random_spd(12)
    W = torch.randn(5, 12, dtype=torch.float64)
    keep = torch.ones(5, 12, dtype=torch.bool)
    keep[:, :5] = False
    keep[2, :8] = False
    sweep = kronecker_sweep_obs_update(W, (G_o, G_i, 1.3), keep)
    joint = kronecker_row_obs_update(W, (G_o, G_i, 1.3), keep)
    assert sweep is not None
    assert joint is not None
    torch.testing.assert_close(sweep.weight, joint.weight, rtol=1e-9, atol=1e-10)
    assert sweep.predicted_increase == pytest.approx(joint.predicted_increase, rel=1e-9)


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_kfac_joint_rows_prune_with_less_loss_than_summed_updates(pattern: str | None) -> None:
    """On a regression with correlated inputs, the row-joint update of a Kronecker Q loses less
    than the sum of single (or N:M group) updates it replaces."""
    losses = []
    for joint in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 48), nn.Tanh(),
                              nn.Linear(48, 8))  # fmt: skip
        x = torch.randn(512, 32) @ torch.randn(32, 32)
        with torch.no_grad():
            y = model(x) + 0.1 * torch.randn(512, 8)
        data = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 512, 64)]
        prune_one_shot(model, data, F.mse_loss, method="kfac", joint=joint, sparsity=0.5,
                       pattern=pattern, steps=1, samples_per_step=512, progress=False)  # fmt: skip
        with torch.no_grad():
            losses.append(float(F.mse_loss(model(x), y)))
    assert losses[1] < 0.95 * losses[0]
