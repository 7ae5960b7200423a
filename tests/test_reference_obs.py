"""The ``fls`` path end to end against independent dense references, for both structures.

Default (Kronecker) Q: ``Q_ℓ = (Ḡ + (√γ/π)I)⁻¹ ⊗ (Ā + π√γI)⁻¹`` from the K-FAC statistics of
per-example inputs ``a`` and output gradients ``g`` (Martens & Grosse's damping split ``π``),
global saliencies ``w²/(2[Q]_qq)``, then Hassibi & Stork's group formula inside each row with
the output factor taken as diagonal.

Block-diagonal Q: on a model whose layers are each smaller than one 50-block, FLS's
block-diagonal Q is exactly ``(F_ℓ + γI)⁻¹`` for every layer ``ℓ``, with ``F_ℓ`` the
per-example empirical Fisher restricted to the surviving weights, and OBS is joint inside it.

The references rebuild every recomputation step from scratch with ``torch.func`` per-example
gradients, explicit matrices and textbook OBS, without any of the package's curvature, mask or
OBS code, and the pruned weights must agree.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

from lightning_fls import StructurePolicy, prune_one_shot
from lightning_fls.methods import FLS

F64 = torch.float64


def tiny_model_and_data() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(3)
    x = torch.randn(64, 5, dtype=F64)
    x[:, 2] = 0.0  # a dead input: its weights never see a gradient
    x[:, 4] *= 30.0  # an unnormalised one
    y = (x[:, :2] @ torch.randn(2, 3, dtype=F64)).argmax(1)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(F64)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(300):  # close to a perfect fit: a tiny, ill-conditioned Fisher
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model, x, y


def canonical(model: nn.Module, index: int) -> Tensor:
    layer = model[index]
    return torch.cat([layer.weight.detach(), layer.bias.detach()[:, None]], dim=1)


def per_example_gradients(model: nn.Module, x: Tensor, y: Tensor) -> dict[int, Tensor]:
    """Canonical per-example gradients ``[N, d_out, d_in + 1]`` (bias last) of layers 0 and 2."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(p: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(model, p, (xb[None],)), yb[None])

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return {
        i: torch.cat([grads[f"{i}.weight"], grads[f"{i}.bias"][..., None]], dim=-1) for i in (0, 2)
    }


def relative_gamma(per_example: dict[int, Tensor], damping: float) -> float:
    """γ = damping · mean of diag F over every canonical entry of every layer."""
    n = len(next(iter(per_example.values())))
    diag_sum = sum(float(g.square().sum()) for g in per_example.values()) / n
    return damping * diag_sum / sum(g[0].numel() for g in per_example.values())


def newly_pruned(
    saliency: list[Tensor], masks: dict[int, Tensor], target: float
) -> dict[int, Tensor]:
    """The weights each layer loses at a step: the lowest saliencies over all layers at once."""
    total = sum(m.numel() for m in masks.values())
    pruned_now = round(target * total) - sum(int((~m).sum()) for m in masks.values())
    flat_new = torch.zeros(total, dtype=torch.bool)
    flat_new[torch.cat(saliency).argsort()[:pruned_now]] = True
    new, offset = {}, 0
    for i, mask in masks.items():
        new[i] = flat_new[offset : offset + mask.numel()].reshape(mask.shape)
        offset += mask.numel()
    return new


def with_bias(mask: Tensor, bias: bool) -> Tensor:
    """A weight mask ``[d_out, d_in]`` in canonical form: the bias column set to ``bias``."""
    return torch.cat([mask, torch.full((len(mask), 1), bias, dtype=torch.bool)], dim=1)


Correction = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``(canonical w, weights pruned now, weights kept after the step) → corrected w``."""
Estimate = Callable[
    [nn.Module, Tensor, dict[int, Tensor], dict[int, Tensor], float],
    dict[int, tuple[Tensor, Correction]],
]
"""``(model, x, per-example gradients, masks, γ) → {layer: (diag Q, its correction)}``."""


def fisher_estimate(
    model: nn.Module, x: Tensor, per_example: dict[int, Tensor], masks: dict[int, Tensor],
    gamma: float,
) -> dict[int, tuple[Tensor, Correction]]:  # fmt: skip
    """Exact ``(F_ℓ + γI)⁻¹`` of the surviving weights, Hassibi & Stork's group update."""
    out = {}
    for i, mask in masks.items():
        G = (per_example[i] * with_bias(mask, True)).reshape(len(x), -1)
        Q = torch.linalg.inv(G.T @ G / len(x) + gamma * torch.eye(G.shape[1], dtype=F64))

        def correct(w: Tensor, new: Tensor, kept: Tensor, Q: Tensor = Q) -> Tensor:
            P = with_bias(new, False).reshape(-1)
            if not bool(P.any()):
                return w
            delta = -Q[:, P] @ torch.linalg.solve(Q[P][:, P], w.reshape(-1)[P])
            return (w.reshape(-1) + delta).reshape(w.shape)

        out[i] = (Q.diagonal().reshape(mask.shape[0], -1), correct)
    return out


def kronecker_estimate(
    model: nn.Module, x: Tensor, per_example: dict[int, Tensor], masks: dict[int, Tensor],
    gamma: float, sweep: bool = False,
) -> dict[int, tuple[Tensor, Correction]]:  # fmt: skip
    """K-FAC Kronecker inverses (Martens & Grosse's damping split), joint update in each row;
    with ``sweep``, each row swept left to right instead (SparseGPT's order), every removal
    moving only the columns after it."""
    with torch.no_grad():
        inputs = {0: x, 2: torch.tanh(model[0](x))}
    out = {}
    for i in masks:
        a = torch.cat([inputs[i], torch.ones(len(x), 1, dtype=F64)], dim=1)
        g = per_example[i][:, :, -1]  # the bias column: the output gradient itself
        A, G = a.T @ a / len(x), g.T @ g / len(x)
        pi = (A.diagonal().mean() / G.diagonal().mean()).sqrt()
        root = gamma**0.5
        M = A + pi * root * torch.eye(len(A), dtype=F64)  # the damped input covariance
        H = torch.linalg.inv(M)
        out_inverse = torch.linalg.inv(G + root / pi * torch.eye(len(G), dtype=F64))

        def correct(w: Tensor, new: Tensor, kept: Tensor, H: Tensor = H) -> Tensor:
            for r in range(w.shape[0]):
                S = ~with_bias(kept, True)[r]  # earlier removals are in S too: they stay at zero
                if bool(S.any()):
                    w[r] -= H[:, S] @ torch.linalg.solve(H[S][:, S], w[r, S])
            return w

        def sweep_rows(w: Tensor, new: Tensor, kept: Tensor, M: Tensor = M) -> Tensor:
            S = ~with_bias(kept, True)
            for r, j in S.nonzero().tolist():  # row by row, columns ascending
                tail = torch.linalg.inv(M[j:, j:])[:, 0]  # the columns >= j free, the rest frozen
                w[r, j:] -= w[r, j] * tail / tail[0]
            return w

        out[i] = (
            torch.outer(out_inverse.diagonal(), H.diagonal()),
            sweep_rows if sweep else correct,
        )
    return out


def kronecker_sweep_estimate(
    model: nn.Module, x: Tensor, per_example: dict[int, Tensor], masks: dict[int, Tensor],
    gamma: float,
) -> dict[int, tuple[Tensor, Correction]]:  # fmt: skip
    """The same Kronecker inverses, each row's update by the column sweep."""
    return kronecker_estimate(model, x, per_example, masks, gamma, sweep=True)


def reference_prune(
    model: nn.Module, x: Tensor, y: Tensor, sparsity: float, steps: int, damping: float,
    estimate: Estimate,
) -> None:  # fmt: skip
    """Global OBS with ``estimate``'s per-layer inverses, re-estimated at every step."""
    masks = {i: torch.ones_like(model[i].weight, dtype=torch.bool) for i in (0, 2)}
    for step in range(steps):
        target = 1.0 - (1.0 - sparsity) ** ((step + 1) / steps)
        per_example = per_example_gradients(model, x, y)
        layers = estimate(model, x, per_example, masks, relative_gamma(per_example, damping))
        saliency = []
        for i, (diag_q, _) in layers.items():
            rho = canonical(model, i).square() / (2 * diag_q)
            saliency.append(
                torch.where(with_bias(masks[i], True), rho, torch.inf)[:, :-1].reshape(-1)
            )
        new = newly_pruned(saliency, masks, target)
        with torch.no_grad():
            for i, (_, correct) in layers.items():
                masks[i] &= ~new[i]
                w = correct(canonical(model, i), new[i], masks[i])
                w[:, :-1] *= masks[i]
                model[i].weight.copy_(w[:, :-1])
                model[i].bias.copy_(w[:, -1])


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize(
    ("method", "estimate", "options"),
    [
        # The default: Kronecker Q, joint OBS inside each row.
        pytest.param("fls", kronecker_estimate, {}, id="default-kronecker-rows"),
        # The callback's default row update: the same Q, each row swept column by column.
        pytest.param(
            "fls", kronecker_sweep_estimate, {"row_update": "sweep"}, id="kronecker-sweep"
        ),
        # Block-diagonal Q: exact OBS with the dense empirical Fisher of each layer.
        pytest.param(
            FLS(structure=StructurePolicy("block_diagonal")),
            fisher_estimate,
            {},
            id="block-diagonal",
        ),
    ],
)
def test_fls_equals_its_dense_reference(
    method: str | FLS, estimate: Estimate, options: dict[str, str], steps: int
) -> None:
    model, x, y = tiny_model_and_data()
    expected = copy.deepcopy(model)
    reference_prune(expected, x, y, 0.5, steps, 1e-2, estimate)

    loader = DataLoader(TensorDataset(x, y), batch_size=16)  # the same 64 examples every step
    report = prune_one_shot(
        model, loader, F.cross_entropy, sparsity=0.5, steps=steps, samples_per_step=64,
        method=method, progress=False, **options,
    )  # fmt: skip
    assert report.method == "fls"
    assert report.factorisation_fallbacks == 0
    assert report.safeguard_reverts == 0  # else the reference would not apply
    for i in (0, 2):
        mine, theirs = canonical(model, i), canonical(expected, i)
        assert torch.equal(mine[:, :-1] == 0, theirs[:, :-1] == 0), f"layer {i}: masks differ"
        scale = float(theirs.abs().max())
        assert torch.allclose(mine, theirs, rtol=0, atol=1e-4 * scale), f"layer {i}"
