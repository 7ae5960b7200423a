"""The auxiliary objective: values and gradients against dense formulas, and convergence."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from lightning_fls.fishleg import (
    AuxiliaryOptimizer,
    BlockDiagonalBlock,
    CurvatureBlock,
    DiagonalBlock,
    KroneckerBlock,
    aux_gradients,
    aux_loss,
    relative_damping,
)
from lightning_fls.layers import OuterProductGradients
from tests.reference import dense_fvp

F64 = torch.float64


def random_spd(n: int, low: float, high: float) -> torch.Tensor:
    U, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64))
    return U @ torch.diag(torch.logspace(math.log10(low), math.log10(high), n, dtype=F64)) @ U.T


def dense_q(block: KroneckerBlock) -> torch.Tensor:
    """Differentiable dense Q of a Kronecker block, built from the formula (not from qv)."""
    K = torch.kron(block.out_factor @ block.out_factor.T, block.in_factor @ block.in_factor.T)
    d = block.scale.reshape(-1)
    return block.base_scale * d[:, None] * K * d[None, :]


def randomised_kronecker(shape: tuple[int, int]) -> KroneckerBlock:
    block = KroneckerBlock(shape, init_scale=0.8, use_scale=True, dtype=F64)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return block


@pytest.mark.parametrize("use_mask", [False, True])
def test_aux_loss_equals_dense_formula(use_mask: bool) -> None:
    shape, n, P, gamma = (3, 4), 12, 5, 0.3
    block = randomised_kronecker(shape)
    F = random_spd(n, 0.01, 3.0)
    u = torch.randn(P, *shape, dtype=F64)
    mask = (torch.rand(shape) > 0.3).to(F64) if use_mask else torch.ones(shape, dtype=F64)
    value = aux_loss(block, dense_fvp(F), u, gamma, mask if use_mask else None)

    M = torch.diag(mask.reshape(-1))
    Q = dense_q(block).detach()
    Fg = F + gamma * torch.eye(n, dtype=F64)
    total = 0.0
    for p in range(P):
        up = M @ u[p].reshape(-1)
        v = M @ Q @ up
        total += 0.5 * v @ Fg @ v - up @ v
    expected = gamma / (u * mask).square().sum() * total
    torch.testing.assert_close(value, expected)


@pytest.mark.parametrize("precondition", [False, True])
def test_aux_gradient_matches_dense_autograd(precondition: bool) -> None:
    shape, n, P, gamma = (2, 3), 6, 3, 0.5
    block = randomised_kronecker(shape)
    F = random_spd(n, 0.05, 2.0)
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]], dtype=F64)
    u = torch.randn(P, *shape, dtype=F64) * mask
    loss, grads = aux_gradients(block, dense_fvp(F), u, gamma, mask=mask, precondition=precondition)
    assert grads is not None

    M = torch.diag(mask.reshape(-1))
    Fg = F + gamma * torch.eye(n, dtype=F64)
    U = u.reshape(P, n).T  # columns are probes
    Q = dense_q(block)
    V = M @ Q @ U
    # The surrogate is scaled by 1 / Σ‖v_p‖², a detached positive number.
    scale = 1.0 / float((V.detach() * V.detach()).sum())
    if precondition:
        with torch.no_grad():
            R = M @ Q @ (M @ (Fg @ V - U))
        target = scale * (V * R).sum()
    else:
        target = scale * (0.5 * (V * (Fg @ V)).sum() - (U * V).sum())
    expected = torch.autograd.grad(target, list(block.parameters()))
    for got, exp in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, exp)
    with torch.no_grad():
        value = gamma / (U * U).sum() * (0.5 * (V * (Fg @ V)).sum() - (U * V).sum())
    torch.testing.assert_close(loss, value)


def fit(
    block: CurvatureBlock,
    F: torch.Tensor,
    gamma: float,
    *,
    steps: int,
    lr: float,
    precondition: bool,
    probe: str = "gaussian",
    mask: torch.Tensor | None = None,
    decay: bool = True,
) -> list[float]:
    """Adam with exact expectation over u (all basis probes), cosine-decayed learning rate."""
    n = block.numel
    aux = AuxiliaryOptimizer({"layer": block}, lr=lr, precondition=precondition, probe=probe)
    probes = torch.eye(n, dtype=F64).reshape(n, *block.shape)
    losses = []
    for t in range(steps):
        if decay:
            for group in aux.optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * t / steps))
        masks = None if mask is None else {"layer": mask}
        result = aux.step({"layer": dense_fvp(F)}, gamma, masks=masks, probes={"layer": probes})
        losses.append(result.losses["layer"])
    return losses


def relative_error(Q: torch.Tensor, target: torch.Tensor) -> float:
    return float(torch.linalg.norm(Q - target) / torch.linalg.norm(target))


@pytest.mark.parametrize("precondition", [True, False])
def test_full_capacity_block_converges_to_damped_inverse(precondition: bool) -> None:
    shape, n, gamma = (3, 4), 12, 0.1
    F = random_spd(n, 1e-3, 1.0)
    target = torch.linalg.inv(F + gamma * torch.eye(n, dtype=F64))
    block = BlockDiagonalBlock(shape, block_size=n, init_scale=1 / gamma, dtype=F64)
    fit(block, F, gamma, steps=1500, lr=3e-2, precondition=precondition)
    assert relative_error(block.to_dense(), target) <= 1e-2


@pytest.mark.parametrize("use_scale", [False, True])
def test_kronecker_block_converges_when_damped_fisher_is_kronecker(use_scale: bool) -> None:
    shape, gamma = (3, 4), 0.1
    # F + γI = G ⊗ A exactly (both factors have eigenvalues >= 1, so F = G⊗A − γI is PSD).
    G, A = random_spd(3, 1.0, 5.0), random_spd(4, 1.0, 3.0)
    Fg = torch.kron(G, A)
    F = Fg - gamma * torch.eye(12, dtype=F64)
    target = torch.linalg.inv(Fg)
    block = KroneckerBlock(shape, init_scale=1 / gamma, use_scale=use_scale, dtype=F64)
    fit(block, F, gamma, steps=1500, lr=3e-2, precondition=True)
    assert relative_error(block.to_dense(), target) <= 1e-2


def test_masked_fit_learns_inverse_of_restricted_fisher() -> None:
    shape, n, gamma = (2, 4), 8, 0.2
    F = random_spd(n, 1e-2, 2.0)
    mask = torch.tensor([[1, 0, 1, 1], [0, 1, 1, 0]], dtype=F64)
    keep = mask.reshape(-1).bool()
    Fg = F + gamma * torch.eye(n, dtype=F64)
    target = torch.linalg.inv(Fg[keep][:, keep])
    block = BlockDiagonalBlock(shape, block_size=n, init_scale=1 / gamma, dtype=F64)
    fit(block, F, gamma, steps=1500, lr=3e-2, precondition=True, mask=mask)
    Q = block.to_dense()[keep][:, keep]
    assert relative_error(Q, target) <= 1e-2


def test_from_the_identity_init_plain_gradient_is_faster_than_preconditioned() -> None:
    """When to pass ``precondition=False``: fitting from the paper's Q₀ = I/γ.

    The FLS preconditioner replaces r by Q r, a Newton step for a Q *linear* in λ. Our blocks
    are Gram products (Q = c L Lᵀ), whose plain gradient is already multiplied by Q in Q-space
    (δQ ≈ −η (R Q + Q R)). Far from the optimum (Q₀ = I/γ, a low-rank Fisher far above γ in a
    few directions, exact expectations over u) the plain gradient gets 70% of the way to the
    optimal aux loss in well under half the steps. (From a statistics-based start with noisy
    per-batch Fisher products, the default path, preconditioning helped instead:
    ``benchmarks/aux_convergence.py``.)
    """
    shape, n, gamma = (4, 5), 20, 1e-2
    grads = torch.randn(6, n, dtype=F64) * torch.logspace(0, 1.5, 6, dtype=F64)[:, None]
    F = grads.T @ grads / 6
    F = F / torch.diagonal(F).mean()
    Fg_inv = torch.linalg.inv(F + gamma * torch.eye(n, dtype=F64))
    # With all n basis probes Σ‖u_p‖² = n, so the optimal Â is -½ γ tr(F_γ⁻¹) / n.
    optimum = -0.5 * gamma / n * float(torch.trace(Fg_inv))
    threshold = 0.7 * optimum

    def steps_to_threshold(precondition: bool) -> int:
        block = BlockDiagonalBlock(shape, block_size=n, init_scale=1 / gamma, dtype=F64)
        losses = fit(block, F, gamma, steps=1500, lr=1e-2, precondition=precondition, decay=False)
        return next((t for t, loss in enumerate(losses) if loss <= threshold), len(losses))

    plain, preconditioned = steps_to_threshold(False), steps_to_threshold(True)
    assert preconditioned < 1500  # both get there ...
    assert plain <= 0.75 * preconditioned, (plain, preconditioned)  # ... plain much sooner


def test_non_finite_fisher_skips_the_update_and_is_counted() -> None:
    block = KroneckerBlock((2, 3), init_scale=2.0, use_scale=True)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    aux = AuxiliaryOptimizer({"a": block})

    def nan_fvp(V: torch.Tensor) -> torch.Tensor:
        return torch.full_like(V, float("nan"))

    result = aux.step({"a": nan_fvp}, 0.1)
    assert result.skipped == ["a"]
    assert aux.num_skipped == 1
    assert math.isnan(result.mean_loss)
    for key, value in block.state_dict().items():
        assert torch.equal(value, before[key])
    # A finite step afterwards updates Q and keeps it finite.
    result = aux.step({"a": lambda V: V}, 0.1)
    assert result.skipped == []
    assert all(torch.isfinite(p).all() for p in block.parameters())
    assert not torch.equal(block.state_dict()["scale"], before["scale"])


def test_optimizer_state_round_trip_gives_identical_continuation() -> None:
    def make() -> tuple[KroneckerBlock, AuxiliaryOptimizer]:
        torch.manual_seed(1)
        block = KroneckerBlock((3, 4), init_scale=5.0, use_scale=True)
        return block, AuxiliaryOptimizer({"l": block}, lr=1e-2, seed=7, num_probes=2)

    F = random_spd(12, 0.1, 1.0).float()
    fvp = {"l": dense_fvp(F)}
    block_a, aux_a = make()
    for _ in range(5):
        aux_a.step(fvp, 0.1)
    saved_block = copy.deepcopy(block_a.state_dict())
    saved_aux = copy.deepcopy(aux_a.state_dict())
    for _ in range(5):
        aux_a.step(fvp, 0.1)

    block_b, aux_b = make()
    block_b.load_state_dict(saved_block)
    aux_b.load_state_dict(saved_aux)
    for _ in range(5):
        aux_b.step(fvp, 0.1)
    for key, value in block_a.state_dict().items():
        assert torch.equal(value, block_b.state_dict()[key]), key
    assert aux_b.num_steps == 10


def test_relative_damping_scales_with_mean_fisher_diagonal() -> None:
    grads = {
        "a": OuterProductGradients(torch.randn(8, 1, 1, 3), torch.randn(8, 1, 1, 2)),
        "b": OuterProductGradients(torch.randn(8, 1, 1, 4), 3 * torch.randn(8, 1, 1, 5)),
    }
    diag = {k: g.diagonal() for k, g in grads.items()}
    per_layer = relative_damping(grads, 0.1, scope="layer")
    for key in grads:
        assert per_layer[key] == pytest.approx(0.1 * float(diag[key].mean()), rel=1e-5)
    global_mean = float(torch.cat([d.reshape(-1) for d in diag.values()]).mean())
    assert relative_damping(grads, 0.1) == pytest.approx(
        dict.fromkeys(grads, 0.1 * global_mean), rel=1e-5
    )
    with pytest.raises(ValueError, match="relative"):
        relative_damping(grads, 0.0)
    with pytest.raises(ValueError, match="scope"):
        relative_damping(grads, 0.1, scope="model")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        relative_damping({}, 0.1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": 0.0}, "lr"),
        ({"lr": -1.0}, "lr"),
        ({"num_probes": 0}, "num_probes"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"eps": 0.0}, "eps"),
    ],
)
def test_bad_optimizer_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AuxiliaryOptimizer({"a": DiagonalBlock((2, 2))}, **kwargs)


def test_bad_step_arguments() -> None:
    aux = AuxiliaryOptimizer({"a": DiagonalBlock((2, 2))})
    with pytest.raises(ValueError, match="damping"):
        aux.step({"a": lambda V: V}, 0.0)
    with pytest.raises(KeyError, match="b"):
        aux.step({"b": lambda V: V}, 0.1)
    with pytest.raises(ValueError, match="blocks"):
        AuxiliaryOptimizer({})


@pytest.mark.parametrize("precondition", [False, True])
def test_outer_probe_path_gives_the_same_gradient_as_the_dense_path(precondition: bool) -> None:
    shape, gamma = (3, 5), 0.2
    block = KroneckerBlock(shape, init_scale=2.0, use_scale=False, dtype=F64)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.2 * torch.randn_like(p))
    F = random_spd(15, 0.01, 1.0)
    x, y = torch.randn(2, 3, dtype=F64), torch.randn(2, 5, dtype=F64)
    u = x[:, :, None] * y[:, None, :]
    fvp = dense_fvp(F)
    loss_dense, grads_dense = aux_gradients(block, fvp, u, gamma, precondition=precondition)
    loss_outer, grads_outer = aux_gradients(
        block, fvp, u, gamma, precondition=precondition, probe_factors=(x, y)
    )
    torch.testing.assert_close(loss_outer, loss_dense)
    assert grads_dense is not None
    assert grads_outer is not None
    for a, b in zip(grads_outer, grads_dense, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("probe", ["gaussian", "outer"])
def test_random_probes_fit_the_kronecker_inverse(probe: str) -> None:
    """Stochastic probes (either kind, E[uuᵀ] = I) fit a Kronecker damped inverse to 5%."""
    shape, gamma = (3, 4), 0.1
    G, A = random_spd(3, 1.0, 5.0), random_spd(4, 1.0, 3.0)
    F = torch.kron(G, A) - gamma * torch.eye(12, dtype=F64)
    target = torch.linalg.inv(torch.kron(G, A))
    block = KroneckerBlock(shape, init_scale=1 / gamma, use_scale=False, dtype=F64)
    aux = AuxiliaryOptimizer({"l": block}, lr=1e-2, probe=probe, num_probes=4)
    steps = 3000
    for t in range(steps):
        for group in aux.optimizer.param_groups:
            group["lr"] = 1e-2 * 0.5 * (1 + math.cos(math.pi * t / steps))
        aux.step({"l": dense_fvp(F)}, gamma)
    assert relative_error(block.to_dense(), target) <= 5e-2


@pytest.mark.parametrize("product_dtype", [None, torch.bfloat16])
def test_a_frozen_kronecker_operator_is_q_from_its_cached_grams(
    product_dtype: torch.dtype | None,
) -> None:
    """``Q·V`` against the explicit ``c·G_o ⊗ G_i``, in the factors' precision (tight) or with
    bfloat16 products (bfloat16's rounding); the result keeps ``V``'s dtype, no graph."""
    from lightning_fls.methods._fishleg import FrozenKroneckerBlock

    torch.manual_seed(3)
    block = KroneckerBlock((5, 7), init_scale=0.6)
    with torch.no_grad():
        block.out_factor.add_(0.3 * torch.randn(5, 5))
        block.in_factor.add_(0.3 * torch.randn(7, 7))
    frozen = FrozenKroneckerBlock(block)
    V = torch.randn(3, 5, 7)
    Q = dense_q_plain(block)
    expected = (V.reshape(3, -1).double() @ Q.T).reshape(3, 5, 7)
    result = frozen.operator(product_dtype)(V)
    assert result.dtype == V.dtype
    assert not result.requires_grad
    tolerance = 1e-5 if product_dtype is None else 3e-2
    scale = float(expected.abs().max())
    assert float((result.double() - expected).abs().max()) <= tolerance * scale
    if product_dtype is not None:  # bfloat16 really was used: not the float32 result
        assert not torch.equal(result, frozen.operator()(V))


def dense_q_plain(block: KroneckerBlock) -> torch.Tensor:
    """Dense ``c·(L_o L_oᵀ) ⊗ (L_i L_iᵀ)`` in float64 (no elementwise scale)."""
    L_o, L_i = block.out_factor.detach().double(), block.in_factor.detach().double()
    return float(block.base_scale) * torch.kron(L_o @ L_o.T, L_i @ L_i.T)


@pytest.mark.parametrize("native", [False, True])
def test_the_logged_aux_loss_is_the_blocks_own_up_to_the_product_precision(
    monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    """``FishLegMethod.aux_loss`` through the step's estimates equals ``aux_loss`` on the
    blocks with the same probes: exactly without native bfloat16, within 1% with it."""
    import lightning_fls.methods._fishleg as fishleg_method
    from lightning_fls.calibration import StepData
    from lightning_fls.methods import FLS

    monkeypatch.setattr(fishleg_method, "native_bfloat16_products", lambda device: native)
    torch.manual_seed(4)
    shapes = {"a.weight": (6, 9), "b.weight": (4, 6)}
    grads = {
        key: OuterProductGradients(torch.randn(8, 1, 1, d_in), torch.randn(8, 1, 1, d_out))
        for key, (d_out, d_in) in shapes.items()
    }
    method = FLS()
    method.blocks = {}
    for key, shape in shapes.items():
        block = KroneckerBlock(shape, init_scale=0.5)
        with torch.no_grad():
            block.out_factor.add_(0.2 * torch.randn(shape[0], shape[0]))
            block.in_factor.add_(0.2 * torch.randn(shape[1], shape[1]))
        method.blocks[key] = block
    method.frozen = {k: fishleg_method.frozen_block(b) for k, b in method.blocks.items()}
    masks = {key: torch.rand(shape) > 0.4 for key, shape in shapes.items()}

    engine = SimpleNamespace(  # what aux_loss reads of the engine
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(0),
        layers={k: SimpleNamespace(canonical_shape=s) for k, s in shapes.items()},
        canonical_mask=lambda key: masks[key],
    )
    step = StepData(batches=[grads])
    gamma = 0.2
    value = method.aux_loss(engine, step, gamma)  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(0)
    expected = 0.0
    for key, block in method.blocks.items():
        u = torch.randn((4, *shapes[key]), generator=generator)
        expected += float(aux_loss(block, grads[key].fvp, u, gamma, mask=masks[key].float()))
    assert value is not None
    if native:
        assert value == pytest.approx(expected, rel=1e-2)
        assert value != expected
    else:
        assert value == pytest.approx(expected, rel=1e-6)
