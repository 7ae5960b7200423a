r"""``nn.MultiheadAttention`` as two Linear maps, and how its gradients are recorded.

``nn.MultiheadAttention`` computes, for query, key and value inputs ``x_q, x_k, x_v``
(``[B, T, E]``),

.. math::

    [q\,|\,k\,|\,v] = [x_q W_q^\top\,|\,x_k W_k^\top\,|\,x_v W_v^\top] + b_{in},\qquad
    y = \mathrm{softmax}(q k^\top/\sqrt{d_h})\, v\; W_o^\top + b_o

per head, with the packed ``in_proj_weight = [W_q; W_k; W_v]`` (``[3E, E]``) and the
``out_proj`` Linear. Its forward runs inside one fused function, so neither projection is a
module call that hooks could see. While gradients are recorded, the module's forward is
replaced by :func:`explicit_attention_forward`, the same computation written with ordinary
operations, where the packed in-projection is one Linear call (self-attention, ``x_q = x_k =
x_v``) or three (each input times the whole packed weight, then sliced: the other two slices'
output gradients are zero, so the per-example gradient ``Σ_t g_t a_tᵀ`` still has the right
rows), and ``out_proj`` is called as a module. Outside recording, the module is untouched.

So ``in_proj_weight`` gets a canonical matrix ``[3E, E (+1)]`` (:class:`MultiheadAttentionAdapter`)
and ``out_proj.weight`` ``[E, E (+1)]`` (:class:`AttentionOutputAdapter`), both handled like any
Linear layer: per-example gradients sum over sequence positions.
"""

from __future__ import annotations

import math
import types
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from lightning_fls.layers.adapters import ForwardHook, HookHandle, LinearAdapter

_COUNT = "_fls_explicit_count"
_RECORDERS = "_fls_in_proj_hooks"


def check_attention_supported(module: nn.MultiheadAttention) -> None:
    """Refuse the options the explicit forward does not implement.

    Args:
        module: The attention module.

    Raises:
        ValueError: For ``add_bias_kv=True`` or ``add_zero_attn=True`` (the caller adds the
            layer's name).
    """
    if module.bias_k is not None or module.add_zero_attn:
        raise ValueError(
            "nn.MultiheadAttention uses add_bias_kv=True or add_zero_attn=True, which "
            "lightning_fls cannot record gradients through; leave its weights out with "
            "`exclude`."
        )


def explicit_attention_forward(
    self: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``nn.MultiheadAttention.forward`` with its projections as visible Linear calls.

    Same arguments and results as ``nn.MultiheadAttention.forward`` for batched inputs
    (``[B, L, E]`` with ``batch_first``, else ``[L, B, E]``); boolean masks mark positions that
    may **not** be attended, float masks are added to the scores; attention dropout applies in
    training mode. The recorded in-projection calls and the ``out_proj`` call see batch-first
    tensors.

    Raises:
        ValueError: For unbatched inputs, or ``is_causal`` without ``attn_mask`` (as PyTorch).
    """
    if query.dim() != 3:
        raise ValueError(
            "lightning_fls records attention gradients for batched inputs only, got a query of "
            f"shape {tuple(query.shape)}."
        )
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
    same = query is key and key is value
    if not self.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    batch, length, embed = query.shape
    source = key.shape[1]
    heads = self.num_heads
    head_dim = embed // heads
    hooks: list[ForwardHook] = getattr(self, _RECORDERS, [])

    def project(x: Tensor, part: int | None) -> Tensor:
        """The packed projection of ``x`` (all three parts), recorded, then sliced."""
        out = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        for hook in hooks:
            hook(self, (x,), out)
        return out if part is None else out[..., part * embed : (part + 1) * embed]

    if self._qkv_same_embed_dim:
        if same:
            q, k, v = project(query, None).chunk(3, dim=-1)
        else:
            q, k, v = project(query, 0), project(key, 1), project(value, 2)
    else:
        bias = self.in_proj_bias
        parts = (None, None, None) if bias is None else bias.chunk(3)
        q = F.linear(query, self.q_proj_weight, parts[0])
        k = F.linear(key, self.k_proj_weight, parts[1])
        v = F.linear(value, self.v_proj_weight, parts[2])
    q = q.reshape(batch, length, heads, head_dim).transpose(1, 2)
    k = k.reshape(batch, source, heads, head_dim).transpose(1, 2)
    v = v.reshape(batch, source, heads, head_dim).transpose(1, 2)
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(head_dim)
    if attn_mask is not None:
        mask = (
            attn_mask.reshape(batch, heads, length, source) if attn_mask.dim() == 3 else attn_mask
        )
        scores = _add_mask(scores, mask)
    if key_padding_mask is not None:
        scores = _add_mask(scores, key_padding_mask.reshape(batch, 1, 1, source))
    weights = torch.softmax(scores, dim=-1)
    if self.training and self.dropout > 0.0:
        weights = F.dropout(weights, p=self.dropout)
    context = torch.matmul(weights, v).transpose(1, 2).reshape(batch, length, embed)
    out: Tensor = self.out_proj(context)
    if not self.batch_first:
        out = out.transpose(0, 1)
    if not need_weights:
        return out, None
    return out, weights.mean(dim=1) if average_attn_weights else weights


def _add_mask(scores: Tensor, mask: Tensor) -> Tensor:
    if mask.dtype == torch.bool:
        return scores.masked_fill(mask, float("-inf"))
    return scores + mask.to(scores.dtype)


class _Handle:
    """Undoes one :func:`_use_explicit_forward` (and optionally removes more)."""

    def __init__(self, module: nn.MultiheadAttention, *extra: HookHandle) -> None:
        self.module = module
        self.extra = extra
        self.removed = False

    def remove(self) -> None:
        if self.removed:
            return
        self.removed = True
        for handle in self.extra:
            handle.remove()
        _release_explicit_forward(self.module)


def _use_explicit_forward(module: nn.MultiheadAttention) -> None:
    """Swap in the explicit forward (reference-counted: several adapters may ask)."""
    check_attention_supported(module)
    count = getattr(module, _COUNT, 0)
    if count == 0:
        module.forward = types.MethodType(explicit_attention_forward, module)  # type: ignore[method-assign]
        setattr(module, _RECORDERS, [])
    setattr(module, _COUNT, count + 1)


def _release_explicit_forward(module: nn.MultiheadAttention) -> None:
    count = getattr(module, _COUNT, 0) - 1
    if count <= 0:
        module.__dict__.pop("forward", None)
        module.__dict__.pop(_RECORDERS, None)
        module.__dict__.pop(_COUNT, None)
    else:
        setattr(module, _COUNT, count)


class _RecorderHandle:
    def __init__(self, module: nn.MultiheadAttention, hook: ForwardHook) -> None:
        self.module = module
        self.hook = hook

    def remove(self) -> None:
        hooks: list[ForwardHook] = getattr(self.module, _RECORDERS, [])
        if self.hook in hooks:
            hooks.remove(self.hook)


class MultiheadAttentionAdapter(LinearAdapter):
    """``nn.MultiheadAttention``'s packed in-projection: canonical ``[3E, E (+1)]``.

    The rows are ``[W_q; W_k; W_v]``, the last column ``in_proj_bias``. Keyed by
    ``"<module>.in_proj_weight"``. Modules with different key/value sizes (separate
    ``q_proj_weight`` …) have no packed weight and get no adapter; their ``out_proj`` still does.
    """

    module_type: ClassVar[type[nn.Module]] = nn.MultiheadAttention
    key_parameter: ClassVar[str] = "in_proj_weight"
    bias_parameter: ClassVar[str] = "in_proj_bias"

    @override
    def check_supported(self) -> None:
        assert isinstance(self.module, nn.MultiheadAttention)
        check_attention_supported(self.module)

    @override
    def install_hook(self, hook: ForwardHook) -> HookHandle:
        module = self.module
        assert isinstance(module, nn.MultiheadAttention)
        _use_explicit_forward(module)
        getattr(module, _RECORDERS).append(hook)
        return _Handle(module, _RecorderHandle(module, hook))


class AttentionOutputAdapter(LinearAdapter):
    """``nn.MultiheadAttention.out_proj``: a Linear that its parent's fused forward never calls.

    Recording installs the parent's explicit forward, which calls ``out_proj`` as a module.

    Args:
        module: The ``out_proj`` Linear.
        parent: The attention module that owns it.
    """

    def __init__(self, module: nn.Module, parent: nn.MultiheadAttention) -> None:
        super().__init__(module)
        self.parent = parent

    @override
    def check_supported(self) -> None:
        check_attention_supported(self.parent)

    @override
    def install_hook(self, hook: ForwardHook) -> HookHandle:
        _use_explicit_forward(self.parent)
        return _Handle(self.parent, self.module.register_forward_hook(hook))


ATTENTION_SUFFIX = "Attention"
"""Modules whose class name ends with this (or ``nn.MultiheadAttention``) count as attention."""


def is_attention(module: nn.Module) -> bool:
    """Whether a module is an attention module.

    That is ``nn.MultiheadAttention`` or a class whose name ends in ``Attention``, as Hugging
    Face's ``BertSelfAttention`` or ``LlamaAttention``.

    Args:
        module: Any module.

    Returns:
        True for attention modules.
    """
    return isinstance(module, nn.MultiheadAttention) or type(module).__name__.endswith(
        ATTENTION_SUFFIX
    )


def transformer_blocks(model: nn.Module) -> list[str]:
    """Names of the transformer blocks: the parents of the outermost attention modules.

    Args:
        model: Any model.

    Returns:
        Module names (``""`` for the model itself), in ``named_modules`` order; empty when the
        model has no attention module.
    """
    blocks: list[str] = []
    attention: list[str] = []
    for name, module in model.named_modules():
        if not is_attention(module) or any(_below(name, outer) for outer in attention):
            continue
        attention.append(name)
        parent = name.rpartition(".")[0]
        if parent not in blocks:
            blocks.append(parent)
    return blocks


def _below(name: str, ancestor: str) -> bool:
    return ancestor == "" or name.startswith(ancestor + ".")


def in_blocks(key: str, blocks: list[str]) -> bool:
    """Whether a layer key (``"<module>.<parameter>"``) lies inside one of ``blocks``."""
    return any(_below(key, block) for block in blocks)


def attention_parents(model: nn.Module) -> dict[int, nn.MultiheadAttention]:
    """``id(out_proj) → its nn.MultiheadAttention`` for every such module of ``model``."""
    return {
        id(module.out_proj): module
        for module in model.modules()
        if isinstance(module, nn.MultiheadAttention)
    }
