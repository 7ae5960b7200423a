"""Exact dense references (``torch.func``) for tests and small models.

These build explicit per-example gradients and explicit Fisher matrices, so they cost
``O(B · n)`` memory and ``O(n²)`` for the matrices: use them on small layers only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

from lightning_fls.fishleg.likelihoods import Likelihood
from lightning_fls.fishleg.objective import FisherVectorProduct
from lightning_fls.layers.adapters import LayerAdapter

LossFn = Callable[[Tensor, Tensor], Tensor]


def _parameter_names(key: str, adapter: LayerAdapter) -> dict[str, str]:
    prefix = key[: len(key) - len(adapter.key_parameter)]
    return {name: prefix + name for name in adapter.parameter_names}


def per_example_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    adapters: Mapping[str, LayerAdapter],
) -> dict[str, Tensor]:
    """Per-example gradients of ``loss_fn(model(x_b), y_b)`` in canonical layout.

    Args:
        model: A model without batch-coupled layers (no batch-norm in training mode).
        loss_fn: Loss of one example given outputs and targets with a batch dimension of 1.
        inputs: Inputs ``[B, ...]``.
        targets: Targets ``[B, ...]``.
        adapters: Layers keyed as by :func:`~lightning_fls.layers.find_layers`.

    Returns:
        ``G`` of shape ``[B, d_out, d_in']`` per layer.
    """
    params = {name: p.detach() for name, p in model.named_parameters()}

    def one(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out: Tensor = functional_call(model, p, (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    grads = vmap(grad(one), in_dims=(None, 0, 0))(params, inputs, targets)
    out = {}
    for key, adapter in adapters.items():
        names = _parameter_names(key, adapter)
        out[key] = adapter.to_canonical({pname: grads[fqn] for pname, fqn in names.items()})
    return out


def dense_fisher(per_example: Tensor) -> Tensor:
    """``F = (1/B) Σ_b vec(G_b) vec(G_b)ᵀ`` from explicit per-example gradients.

    Args:
        per_example: ``[B, d_out, d_in']``.

    Returns:
        ``[n, n]`` with ``n = d_out · d_in'`` (row-major vec).
    """
    flat = per_example.reshape(per_example.shape[0], -1)
    return flat.T @ flat / flat.shape[0]


def true_fisher(
    model: nn.Module,
    likelihood: Likelihood,
    inputs: Tensor,
    adapters: Mapping[str, LayerAdapter],
) -> dict[str, Tensor]:
    """Exact Fisher blocks ``(1/B) Σ_b J_bᵀ H_b J_b`` (the GGN) of each layer.

    ``J_b`` is the Jacobian of example ``b``'s outputs with respect to the layer's canonical
    parameters and ``H_b`` the likelihood's output Fisher.

    Args:
        model: A model without batch-coupled layers.
        likelihood: The predictive distribution.
        inputs: Inputs ``[B, ...]``.
        adapters: Layers keyed as by :func:`~lightning_fls.layers.find_layers`.

    Returns:
        ``[n, n]`` per layer.
    """
    params = {name: p.detach() for name, p in model.named_parameters()}

    def outputs(p: dict[str, Tensor], x: Tensor) -> Tensor:
        out: Tensor = functional_call(model, p, (x.unsqueeze(0),))
        return out.reshape(-1)

    jacobians = vmap(jacrev(outputs), in_dims=(None, 0))(params, inputs)
    with torch.no_grad():
        H = likelihood.output_fisher(model(inputs))
    out = {}
    for key, adapter in adapters.items():
        names = _parameter_names(key, adapter)
        J = adapter.to_canonical({pname: jacobians[fqn] for pname, fqn in names.items()})
        J = J.reshape(J.shape[0], J.shape[1], -1)  # [B, O, n]
        out[key] = torch.einsum("boi,bop,bpj->ij", J, H, J) / J.shape[0]
    return out


def dense_fvp(fisher: Tensor) -> FisherVectorProduct:
    """A Fisher–vector product from an explicit ``[n, n]`` Fisher matrix.

    Args:
        fisher: The matrix (row-major vec of the canonical layout).

    Returns:
        ``V ↦ F·V`` on ``[..., d_out, d_in']`` tensors.
    """

    def fvp(V: Tensor) -> Tensor:
        flat = V.reshape(-1, fisher.shape[0]).to(fisher.dtype)
        return torch.matmul(flat, fisher.transpose(0, 1)).reshape(V.shape).to(V.dtype)

    return fvp
