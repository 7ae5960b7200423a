r"""The FishLeg auxiliary objective and the optimiser that fits Q(λ) to (F + γI)⁻¹.

For a probe ``u`` and ``v = Q(λ) u``, the auxiliary loss is

.. math::

    A(\lambda; u) = \tfrac12\, v^\top F_\gamma v - u^\top v, \qquad F_\gamma = F + \gamma I .

For any ``u`` it is minimised where ``Q u = F_γ⁻¹ u``, and with ``u ~ N(0, I)`` its expectation
``½ tr(Q F_γ Q) − tr(Q)`` has the unique minimiser ``Q = F_γ⁻¹`` on the whole space. With a
pruning mask ``m`` the probe, ``v`` and the residual are restricted to the surviving weights,
so Q learns the inverse of the *restricted* Fisher there.

Gradient (Garcia et al. 2023): ``∇_λ A = Jᵀ r`` with ``J = ∂(Q u)/∂λ`` and ``r = F_γ v − u``,
obtained by back-propagating the surrogate ``⟨Q(λ) u, stop_grad(r)⟩``. Preconditioning (FLS)
replaces ``r`` by ``Q r``, an approximate Newton step in ``v``-space, at the cost of one more
product; it speeds up the slow, low-curvature directions where Q must grow to ``≈ 1/γ``.

Normalisation used throughout: losses and gradients are multiplied by ``γ / (P · n)`` with ``P``
probes and ``n`` surviving coordinates (``n = E‖u‖²``). The reported value
``Â = γ·A / (P·n)`` is then scale-free: ``-½`` where F is negligible next to γ, and
``-½ · mean(γ / (μ_i + γ))`` at the optimum (``μ_i`` the eigenvalues of F).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_fls._validation import check_choice, check_positive, check_positive_int
from lightning_fls.fishleg.base import CurvatureBlock, QOperator
from lightning_fls.fishleg.fisher import ExampleGradients

FisherVectorProduct = Callable[[Tensor], Tensor]
"""``V ↦ F·V`` (undamped) on canonical tensors ``[..., d_out, d_in']``."""

DEFAULT_RELATIVE_DAMPING = 1e-2
"""Default γ relative to the mean of diag F (see :func:`relative_damping`)."""


def relative_damping(
    gradients: Mapping[str, ExampleGradients],
    relative: float = DEFAULT_RELATIVE_DAMPING,
    *,
    scope: Literal["global", "layer"] = "global",
) -> dict[str, float]:
    """Damping γ set relative to the Fisher's scale: ``γ = relative · mean(diag F)``.

    γ slides OBS between magnitude pruning (γ ≫ F: Q ≈ I/γ) and full OBS (γ → 0), so it must
    follow the Fisher's scale, which varies by orders of magnitude between models and losses.
    The default 1e-2 follows the planning measurements in the method notes (section 9: 1e-3
    was too small, 1e-2 and 1e-1 both good).

    Args:
        gradients: Per-example gradients of each layer for one or more batches.
        relative: The factor (> 0).
        scope: ``"global"``: one γ from the mean of diag F over all layers' entries (saliencies
            stay comparable across layers); ``"layer"``: one γ per layer from its own mean.

    Returns:
        γ for every key of ``gradients``.

    Raises:
        ValueError: If ``gradients`` is empty, or an argument is out of range.
    """
    relative = check_positive("relative", relative)
    check_choice("scope", scope, ("global", "layer"))
    if not gradients:
        raise ValueError("`gradients` is empty: there is no layer to set a damping for.")
    traces = {key: float(g.trace()) for key, g in gradients.items()}
    sizes = {key: math.prod(g.shape) for key, g in gradients.items()}
    tiny = torch.finfo(torch.float32).tiny
    if scope == "layer":
        return {key: relative * max(traces[key] / sizes[key], tiny) for key in gradients}
    mean = sum(traces.values()) / sum(sizes.values())
    return dict.fromkeys(gradients, relative * max(mean, tiny))


@dataclass
class AuxTerms:
    """The quantities of one auxiliary evaluation.

    Attributes:
        v: ``Q u`` (masked), with its graph to λ when built with gradients enabled.
        residual: ``F_γ v − u`` (masked), detached.
        loss: The normalised auxiliary loss ``Â``, a detached 0-dim tensor.
        normaliser: ``γ / (P · n)``.
    """

    v: Tensor
    residual: Tensor
    loss: Tensor
    normaliser: float


def aux_terms(
    operator: QOperator,
    fvp: FisherVectorProduct,
    probes: Tensor,
    damping: float,
    mask: Tensor | None = None,
) -> AuxTerms:
    """Evaluate ``v = Q u``, the residual ``r = F_γ v − u`` and the normalised loss.

    Args:
        operator: Prepared Q·V product of the block.
        fvp: Undamped Fisher–vector product of the layer.
        probes: ``u``, shape ``[P, d_out, d_in']`` (already masked).
        damping: γ > 0.
        mask: Optional boolean or 0/1 mask ``[d_out, d_in']`` of surviving weights.

    Returns:
        The terms; ``loss = γ/(P·n) · Σ_p (½ v_pᵀ F_γ v_p − u_pᵀ v_p)``.
    """
    v = operator(probes)
    if mask is not None:
        v = v * mask
    with torch.no_grad():
        v_const = v.detach()
        Fv = fvp(v_const) + damping * v_const
        if mask is not None:
            Fv = Fv * mask
        residual = Fv - probes
        active = float(mask.sum()) if mask is not None else float(probes[0].numel())
        normaliser = damping / (probes.shape[0] * max(active, 1.0))
        loss = normaliser * (v_const * (0.5 * Fv - probes)).sum()
    return AuxTerms(v=v, residual=residual, loss=loss, normaliser=normaliser)


def aux_loss(
    block: CurvatureBlock,
    fvp: FisherVectorProduct,
    probes: Tensor,
    damping: float,
    mask: Tensor | None = None,
) -> Tensor:
    """The normalised auxiliary loss ``Â(λ; u)`` of a block, without gradients.

    Args:
        block: The curvature block.
        fvp: Undamped Fisher–vector product of the layer.
        probes: ``u``, shape ``[P, d_out, d_in']``.
        damping: γ > 0.
        mask: Optional mask of surviving weights ``[d_out, d_in']``.

    Returns:
        A 0-dim tensor.
    """
    with torch.no_grad():
        u = probes if mask is None else probes * mask
        return aux_terms(block.operator(), fvp, u, damping, mask).loss


@dataclass
class AuxStepResult:
    """What one :meth:`AuxiliaryOptimizer.step` did.

    Attributes:
        losses: Normalised aux loss ``Â`` per layer, before the update.
        skipped: Layers whose update was skipped because a loss or gradient was not finite.
    """

    losses: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    @property
    def mean_loss(self) -> float:
        """Mean of the finite per-layer losses (NaN if there is none)."""
        finite = [x for x in self.losses.values() if math.isfinite(x)]
        return sum(finite) / len(finite) if finite else math.nan


class AuxiliaryOptimizer:
    """Fits each block's λ to ``(F + γI)⁻¹`` by stochastic minimisation of the aux loss.

    One :meth:`step` draws Gaussian probes ``u ~ N(0, I)`` (masked) per layer, evaluates the
    auxiliary loss with the given Fisher–vector products, back-propagates the (optionally
    preconditioned) surrogate into λ with :func:`torch.autograd.grad` (so no model ``.grad`` is
    touched) and takes one Adam step. A layer whose loss or gradient is not finite is skipped for
    that step and counted in :attr:`num_skipped`; Q is then left exactly as it was.

    Probes come from the optimiser's own seeded generator, so replicas seeded alike draw the
    same probes (what data-parallel training needs).

    Args:
        blocks: Curvature blocks keyed by layer.
        lr: Adam learning rate (> 0). The blocks' parameters are of order one (their magnitude
            lives in a fixed scale), so this is a relative step size.
        betas: Adam's ``(β₁, β₂)``.
        eps: Adam's ε (> 0).
        precondition: Use the preconditioned residual ``Q r`` (FLS) instead of ``r``.
        num_probes: Probes ``u`` per layer and step (>= 1); more lowers the gradient's variance.
        seed: Seed of the probe generator.

    Raises:
        ValueError: If an argument is out of range or ``blocks`` is empty.
    """

    def __init__(
        self,
        blocks: Mapping[str, CurvatureBlock],
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        precondition: bool = True,
        num_probes: int = 1,
        seed: int = 0,
    ) -> None:
        if not blocks:
            raise ValueError("`blocks` is empty: there is nothing to fit.")
        self.blocks = dict(blocks)
        self.lr = check_positive("lr", lr)
        self.eps = check_positive("eps", eps)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"`betas` must be two numbers in [0, 1), got {betas!r}.")
        self.precondition = bool(precondition)
        self.num_probes = check_positive_int("num_probes", num_probes)
        self.seed = int(seed)
        groups = [{"params": list(block.parameters())} for block in self.blocks.values()]
        self.optimizer = torch.optim.Adam(groups, lr=self.lr, betas=betas, eps=self.eps)
        self.generator = self._make_generator()
        self.num_steps = 0
        self.num_skipped = 0

    def _make_generator(self) -> torch.Generator:
        # A CPU generator on every device: the same seed gives the same probes on CPU and GPU,
        # and its state is device-independent in checkpoints.
        generator = torch.Generator()
        generator.manual_seed(self.seed)
        return generator

    def sample_probes(self, key: str, mask: Tensor | None = None) -> Tensor:
        """Draw ``num_probes`` Gaussian probes for a layer.

        Args:
            key: The layer.
            mask: Optional mask of surviving weights.

        Returns:
            Tensor ``[num_probes, d_out, d_in']``, zero where the mask is.
        """
        block = self.blocks[key]
        u = torch.randn(
            (self.num_probes, *block.shape), generator=self.generator, dtype=block.dtype
        )
        u = u.to(block.device)
        return u if mask is None else u * mask

    def step(
        self,
        fvps: Mapping[str, FisherVectorProduct],
        damping: float | Mapping[str, float],
        *,
        masks: Mapping[str, Tensor] | None = None,
        probes: Mapping[str, Tensor] | None = None,
    ) -> AuxStepResult:
        """One auxiliary update of the layers in ``fvps``.

        Args:
            fvps: Undamped Fisher–vector product per layer (a subset of the blocks may be given).
            damping: γ, one for all layers or one per layer.
            masks: Optional masks of surviving weights per layer (``[d_out, d_in']``).
            probes: Optional probes ``[P, d_out, d_in']`` per layer instead of random ones.

        Returns:
            The per-layer losses before the update and the layers skipped.

        Raises:
            KeyError: If ``fvps`` names a layer without a block.
        """
        result = AuxStepResult()
        self.optimizer.zero_grad(set_to_none=True)
        for key, fvp in fvps.items():
            if key not in self.blocks:
                raise KeyError(f"No curvature block for layer `{key}`.")
            block = self.blocks[key]
            gamma = damping if isinstance(damping, (int, float)) else damping[key]
            gamma = check_positive("damping", gamma)
            mask = None if masks is None else masks.get(key)
            if mask is not None:
                mask = mask.to(device=block.device, dtype=block.dtype)
            if probes is not None and key in probes:
                u = probes[key].to(block.dtype)
                u = u if mask is None else u * mask
            else:
                u = self.sample_probes(key, mask)
            params = [p for p in block.parameters() if p.requires_grad]
            grads = self._surrogate_grads(block, fvp, u, gamma, mask, params)
            loss, param_grads = grads
            result.losses[key] = float(loss)
            if param_grads is None:
                result.skipped.append(key)
                continue
            for param, grad in zip(params, param_grads, strict=True):
                param.grad = grad
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.num_steps += 1
        self.num_skipped += len(result.skipped)
        return result

    def _surrogate_grads(
        self,
        block: CurvatureBlock,
        fvp: FisherVectorProduct,
        u: Tensor,
        damping: float,
        mask: Tensor | None,
        params: list[torch.nn.Parameter],
    ) -> tuple[Tensor, tuple[Tensor, ...] | None]:
        with torch.enable_grad():
            operator = block.operator()
            terms = aux_terms(operator, fvp, u, damping, mask)
            if not torch.isfinite(terms.loss) or not bool(torch.isfinite(terms.residual).all()):
                return terms.loss, None
            direction = terms.residual
            if self.precondition:
                with torch.no_grad():
                    direction = operator(direction)
                    if mask is not None:
                        direction = direction * mask
            surrogate = terms.normaliser * (terms.v * direction).sum()
            grads = torch.autograd.grad(surrogate, params, allow_unused=True)
        filled = tuple(
            torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)
        )
        if not all(bool(torch.isfinite(g).all()) for g in filled):
            return terms.loss, None
        return terms.loss, filled

    def state_dict(self) -> dict[str, Any]:
        """Optimiser state, probe-generator state and counters (not the blocks' λ).

        Returns:
            A picklable dictionary.
        """
        return {
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "num_steps": self.num_steps,
            "num_skipped": self.num_skipped,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned.

        Args:
            state: The saved state.
        """
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.num_steps = int(state["num_steps"])
        self.num_skipped = int(state["num_skipped"])

    def parameters(self) -> Iterable[torch.nn.Parameter]:
        """All auxiliary parameters being fitted.

        Yields:
            Each block's parameters.
        """
        for block in self.blocks.values():
            yield from block.parameters()
