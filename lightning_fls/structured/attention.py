"""Multi-head attention with fewer heads than ``embed_dim / head_dim``.

``nn.MultiheadAttention`` ties its inner width to ``embed_dim`` (``head_dim = embed_dim /
num_heads``), so it cannot lose a head. :class:`PrunedMultiheadAttention` computes the same
function with ``num_heads · head_dim < embed_dim``; :func:`~lightning_fls.compact` puts it in
place of an ``nn.MultiheadAttention`` whose heads it removes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PrunedMultiheadAttention(nn.Module):
    r"""Self- or cross-attention of ``num_heads`` heads of width ``head_dim`` on ``embed_dim``.

    For inputs ``x_q [N, L, E]`` and ``x_k, x_v [N, S, E]`` (batch first; ``[L, N, E]`` otherwise,
    or unbatched ``[L, E]``), with ``I = num_heads · head_dim``:

    .. math::

        [q\,|\,k\,|\,v] = [x_q W_q^\top + b_q\,|\,x_k W_k^\top + b_k\,|\,x_v W_v^\top + b_v],\qquad
        y = \mathrm{concat}_h\big(\mathrm{softmax}(q_h k_h^\top/\sqrt{d} + M)\,v_h\big)\,
            W_o^\top + b_o

    where ``in_proj_weight = [W_q; W_k; W_v]`` is ``[3I, E]`` and ``out_proj`` maps ``I → E``.
    The parameter names are those of ``nn.MultiheadAttention``, and :meth:`forward` takes its
    arguments and returns ``(output, weights)``, so it can stand in ``nn.TransformerEncoderLayer``
    as ``self_attn``. ``_qkv_same_embed_dim`` is False so that PyTorch's fused encoder fast path,
    which assumes ``I = E``, is never taken.

    Args:
        embed_dim: ``E``.
        num_heads: Heads kept.
        head_dim: ``d``, the width of a head.
        kept_heads: Index of each kept head among the original heads, used to pick the rows of
            a per-head ``attn_mask`` ``[N · original_heads, L, S]``.
        original_heads: Heads of the module this one was cut from.
        dropout: Dropout on the attention weights while training.
        bias: Whether the projections have biases.
        batch_first: Inputs are ``[N, L, E]`` (else ``[L, N, E]``).

    Raises:
        ValueError: If the head indices are inconsistent.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int,
        *,
        kept_heads: tuple[int, ...],
        original_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        batch_first: bool = False,
    ) -> None:
        super().__init__()
        if len(kept_heads) != num_heads or not all(0 <= h < original_heads for h in kept_heads):
            raise ValueError(
                f"`kept_heads` must list {num_heads} heads below {original_heads}, got "
                f"{kept_heads!r}."
            )
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.kept_heads = tuple(kept_heads)
        self.original_heads = original_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self._qkv_same_embed_dim = False
        inner = num_heads * head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner)) if bias else None
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def extra_repr(self) -> str:
        """The sizes, shown by ``repr``."""
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"kept_heads={self.kept_heads}, batch_first={self.batch_first}"
        )

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Attention of ``query`` over ``key``/``value``, as ``nn.MultiheadAttention`` computes it.

        Args:
            query: ``[N, L, E]`` (batch first), ``[L, N, E]``, or unbatched ``[L, E]``.
            key: ``[N, S, E]`` likewise.
            value: ``[N, S, E]`` likewise.
            key_padding_mask: Optional ``[N, S]`` (``[S]`` unbatched): True (bool) marks keys to
                ignore; a float mask is added to the scores.
            need_weights: Also return the attention weights.
            attn_mask: Optional ``[L, S]`` or ``[N · original_heads, L, S]``, bool (True =
                masked) or float (added).
            average_attn_weights: Average the returned weights over the kept heads.
            is_causal: Causal attention when no mask is given (a hint otherwise, as in
                ``nn.MultiheadAttention``).

        Returns:
            ``(output, weights)``: output shaped like ``query``; weights ``[N, L, S]`` (averaged)
            or ``[N, num_heads, L, S]``, without the batch dimension for unbatched inputs, or
            None when ``need_weights`` is false.
        """
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        inner = self.num_heads * self.head_dim
        w_q, w_k, w_v = _thirds(self.in_proj_weight, inner)
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = _thirds(self.in_proj_bias, inner)
        q = self._heads(F.linear(query, w_q, b_q))
        k = self._heads(F.linear(key, w_k, b_k))
        v = self._heads(F.linear(value, w_v, b_v))
        mask = self._mask(attn_mask, key_padding_mask, q)
        dropout = self.dropout if self.training else 0.0
        weights: Tensor | None = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores + mask
            elif is_causal:
                causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device)
                scores = scores.masked_fill(~causal.tril(), float("-inf"))
            weights = F.dropout(torch.softmax(scores, dim=-1), dropout, self.training)
            heads = weights @ v
        else:
            heads = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal and mask is None
            )
        batch, length = heads.shape[0], heads.shape[2]
        output = self.out_proj(heads.transpose(1, 2).reshape(batch, length, inner))
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if unbatched:
            return output.squeeze(0), None if weights is None else weights.squeeze(0)
        if not self.batch_first:
            output = output.transpose(0, 1)
        return output, weights

    def _heads(self, x: Tensor) -> Tensor:
        """``[N, T, heads · d]`` → ``[N, heads, T, d]``."""
        return x.reshape(*x.shape[:-1], self.num_heads, self.head_dim).transpose(1, 2)

    def _mask(
        self, attn_mask: Tensor | None, key_padding_mask: Tensor | None, q: Tensor
    ) -> Tensor | None:
        """The additive mask ``[N or 1, heads or 1, L, S]`` from both masks (None if neither)."""
        mask: Tensor | None = None
        if attn_mask is not None:
            mask = _additive(attn_mask, q.dtype)
            if mask.dim() == 3:  # [N · original_heads, L, S]: keep the rows of the kept heads
                mask = mask.reshape(-1, self.original_heads, *mask.shape[1:])
                mask = mask[:, list(self.kept_heads)]
        if key_padding_mask is not None:
            padding = _additive(key_padding_mask, q.dtype)[:, None, None, :]
            mask = padding if mask is None else mask + padding
        return mask


def _thirds(packed: Tensor, inner: int) -> tuple[Tensor, Tensor, Tensor]:
    """The q, k and v blocks of ``inner`` rows of a packed ``[3 · inner, ...]`` tensor."""
    return packed[:inner], packed[inner : 2 * inner], packed[2 * inner :]


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool mask (True = masked) as ``-inf``/``0``; a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf")
        )
    return mask.to(dtype)
