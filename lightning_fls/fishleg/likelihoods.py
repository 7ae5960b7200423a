"""Predictive distributions p(y | f) for sampling targets and for the exact (true) Fisher.

The true Fisher ``F = E_x E_{y~p(y|x,θ)} [∇l ∇lᵀ]`` is estimated without bias by drawing
targets from the model's own predictive distribution and taking per-example gradients of the
negative log-likelihood (one extra backward). Each likelihood also gives its output-space
Fisher ``H(f) = E_y[∇_f l ∇_f lᵀ]`` so that ``F = (1/B) Σ_b J_bᵀ H_b J_b`` can be formed exactly
on small models (the generalised Gauss–Newton matrix, equal to the Fisher for these
canonical-link likelihoods).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from lightning_fls._validation import check_positive


class Likelihood(ABC):
    """A per-example negative log-likelihood ``l(f, y)`` with sampling and output Fisher."""

    name: str = ""

    @abstractmethod
    def nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-example negative log-likelihood (constants dropped), summed over non-batch dims.

        Args:
            outputs: Model outputs ``f``, shape ``[B, ...]``.
            targets: Targets ``y`` of the matching shape.

        Returns:
            Tensor of shape ``[B]``.
        """

    @abstractmethod
    def sample(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw targets ``y ~ p(y | f)``.

        Args:
            outputs: Model outputs ``f``, shape ``[B, ...]`` (no gradient needed).
            generator: Random generator, for reproducible draws.

        Returns:
            Targets accepted by :meth:`nll`.
        """

    @abstractmethod
    def output_fisher(self, outputs: Tensor) -> Tensor:
        """Output-space Fisher ``H_b = E_y[∇_f l ∇_f lᵀ]`` of every example.

        Args:
            outputs: Model outputs ``f``, shape ``[B, ...]``.

        Returns:
            Tensor of shape ``[B, O, O]`` with ``O`` the number of outputs per example.
        """


class CategoricalLikelihood(Likelihood):
    """Softmax over logits of shape ``[B, C]``; targets are class indices (``F.cross_entropy``)."""

    name = "categorical"

    @override
    def nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        loss = F.cross_entropy(outputs, targets, reduction="none")
        return loss.reshape(loss.shape[0], -1).sum(-1)

    @override
    def sample(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if outputs.dim() != 2:
            raise ValueError(f"Categorical logits must be [B, C], got {tuple(outputs.shape)}.")
        probs = torch.softmax(outputs.detach().float(), dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    @override
    def output_fisher(self, outputs: Tensor) -> Tensor:
        if outputs.dim() != 2:
            raise ValueError(f"Categorical logits must be [B, C], got {tuple(outputs.shape)}.")
        p = torch.softmax(outputs, dim=-1)
        return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)


class BernoulliLikelihood(Likelihood):
    """Independent Bernoulli outputs given by logits of any shape (``BCEWithLogits``)."""

    name = "bernoulli"

    @override
    def nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        loss = F.binary_cross_entropy_with_logits(
            outputs, targets.to(outputs.dtype), reduction="none"
        )
        return loss.reshape(loss.shape[0], -1).sum(-1)

    @override
    def sample(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return torch.bernoulli(torch.sigmoid(outputs.detach()), generator=generator)

    @override
    def output_fisher(self, outputs: Tensor) -> Tensor:
        p = torch.sigmoid(outputs.reshape(outputs.shape[0], -1))
        return torch.diag_embed(p * (1 - p))


class GaussianLikelihood(Likelihood):
    """Gaussian with mean ``f`` and fixed standard deviation σ: ``l = ‖y − f‖² / (2σ²)``.

    Args:
        sigma: Standard deviation σ > 0.
    """

    name = "gaussian"

    def __init__(self, sigma: float = 1.0) -> None:
        self.sigma = check_positive("sigma", sigma)

    @override
    def nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        residual = (targets - outputs).reshape(outputs.shape[0], -1)
        return 0.5 * residual.square().sum(-1) / self.sigma**2

    @override
    def sample(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        f = outputs.detach()
        noise = torch.randn(f.shape, generator=generator, dtype=f.dtype, device=f.device)
        return f + self.sigma * noise

    @override
    def output_fisher(self, outputs: Tensor) -> Tensor:
        flat = outputs.reshape(outputs.shape[0], -1)
        eye = torch.eye(flat.shape[1], dtype=flat.dtype, device=flat.device)
        return eye.expand(flat.shape[0], -1, -1) / self.sigma**2


LIKELIHOODS: dict[str, type[Likelihood]] = {
    "categorical": CategoricalLikelihood,
    "bernoulli": BernoulliLikelihood,
    "gaussian": GaussianLikelihood,
}
"""Likelihoods by name."""


def get_likelihood(name: str | Likelihood) -> Likelihood:
    """Return a likelihood instance from its name (or pass an instance through).

    Args:
        name: ``"categorical"``, ``"bernoulli"``, ``"gaussian"`` or a :class:`Likelihood`.

    Returns:
        The likelihood.

    Raises:
        ValueError: If the name is unknown.
    """
    if isinstance(name, Likelihood):
        return name
    if name not in LIKELIHOODS:
        raise ValueError(f"`likelihood` must be one of {tuple(LIKELIHOODS)}, got {name!r}.")
    return LIKELIHOODS[name]()
