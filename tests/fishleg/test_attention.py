"""nn.MultiheadAttention: the explicit forward, its adapters, and exact per-example gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_fls.fishleg import build_blocks
from lightning_fls.fishleg.registry import StructurePolicy
from lightning_fls.layers import (
    AttentionOutputAdapter,
    GradientCapture,
    MultiheadAttentionAdapter,
    explicit_attention_forward,
    find_layers,
    transformer_blocks,
)
from tests.reference import dense_fisher, per_example_gradients

F64 = torch.float64


class AttentionNet(nn.Module):
    """Tokens → attention (self or cross) → mean pool → 3 classes."""

    def __init__(self, *, batch_first: bool = True, cross: bool = False, bias: bool = True):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first, bias=bias, dtype=F64)
        self.memory = nn.Linear(5, 8, dtype=F64)
        self.head = nn.Linear(8, 3, dtype=F64)
        self.batch_first = batch_first
        self.cross = cross

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, 8]
        seq = x if self.batch_first else x.transpose(0, 1)
        if self.cross:
            memory = self.memory(x[..., :5]).flip(1)
            mem = memory if self.batch_first else memory.transpose(0, 1)
            out = self.attn(seq, mem, mem, need_weights=False)[0]
        else:
            out = self.attn(seq, seq, seq, need_weights=False)[0]
        if not self.batch_first:
            out = out.transpose(0, 1)
        return self.head(torch.tanh(out).mean(1))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"need_weights": True},
        {"need_weights": True, "average_attn_weights": False},
        {"key_padding_mask": "bool"},
        {"attn_mask": "float"},
        {"attn_mask": "causal", "is_causal": True},
        {"attn_mask": "per_head"},
    ],
    ids=lambda o: "-".join(o) or "plain",
)
def test_explicit_forward_equals_pytorch(batch_first: bool, options: dict) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, dtype=F64).eval()
    B, L, S = 3, 5, 4
    q = torch.randn(B, L, 8, dtype=F64)
    kv = torch.randn(B, S, 8, dtype=F64)
    kwargs: dict = {"need_weights": options.get("need_weights", False)}
    if "average_attn_weights" in options:
        kwargs["average_attn_weights"] = options["average_attn_weights"]
    if options.get("key_padding_mask") == "bool":
        kwargs["key_padding_mask"] = torch.tensor([[0, 0, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]).bool()
    if options.get("attn_mask") == "float":
        kwargs["attn_mask"] = torch.randn(L, S, dtype=F64)
    if options.get("attn_mask") == "causal":
        kv = torch.randn(B, L, 8, dtype=F64)
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(L, dtype=F64)
        kwargs["is_causal"] = True
    if options.get("attn_mask") == "per_head":
        kwargs["attn_mask"] = torch.rand(B * 2, L, S) > 0.7
        kwargs["attn_mask"][..., 0] = False
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    expected, expected_w = mha(q, kv, kv, **kwargs)
    got, got_w = explicit_attention_forward(mha, q, kv, kv, **kwargs)
    torch.testing.assert_close(got, expected)
    if kwargs["need_weights"]:
        torch.testing.assert_close(got_w, expected_w)
    else:
        assert got_w is None


def test_find_layers_sees_packed_and_output_projections() -> None:
    model = AttentionNet()
    layers = find_layers(model)
    assert list(layers) == ["attn.in_proj_weight", "attn.out_proj.weight", "memory.weight",
                            "head.weight"]  # fmt: skip
    assert isinstance(layers["attn.in_proj_weight"], MultiheadAttentionAdapter)
    assert isinstance(layers["attn.out_proj.weight"], AttentionOutputAdapter)
    assert layers["attn.in_proj_weight"].canonical_shape == (24, 9)
    no_bias = find_layers(AttentionNet(bias=False))
    assert no_bias["attn.in_proj_weight"].canonical_shape == (24, 8)
    odd = nn.MultiheadAttention(8, 2, kdim=5, vdim=5)  # separate q/k/v weights
    assert list(find_layers(odd)) == ["out_proj.weight"]


@pytest.mark.parametrize(
    "config",
    [{}, {"batch_first": False}, {"cross": True}, {"bias": False}],
    ids=["self", "seq-first", "cross", "no-bias"],
)
def test_per_example_gradients_of_attention_match_explicit(config: dict) -> None:
    torch.manual_seed(1)
    model = AttentionNet(**config)
    x = torch.randn(6, 5, 8, dtype=F64)
    y = torch.randint(0, 3, (6,))
    adapters = {k: a for k, a in find_layers(model).items() if k != "memory.weight" or model.cross}
    forward = model.attn.forward
    with GradientCapture(adapters) as capture:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
    assert model.attn.forward == forward, "the stock forward is back after recording"
    assert "forward" not in model.attn.__dict__
    grads = capture.example_gradients(dtype=F64)
    reference = per_example_gradients(
        model, lambda o, t: F.cross_entropy(o, t, reduction="sum"), x, y, adapters
    )
    for key in ("attn.in_proj_weight", "attn.out_proj.weight"):
        torch.testing.assert_close(grads[key].materialise(), reference[key])
        Fd = dense_fisher(reference[key])
        V = torch.randn(reference[key].shape[1:], dtype=F64)
        torch.testing.assert_close(grads[key].fvp(V), (Fd @ V.reshape(-1)).reshape(V.shape))


@pytest.mark.parametrize("structure", ["kronecker", "block_diagonal", "diagonal"])
def test_attention_block_qv_matches_its_dense_matrix(structure: str) -> None:
    """The in_proj block is a block over [3E, E+1]: Q·V equals its explicit matrix."""
    torch.manual_seed(2)
    model = AttentionNet()
    layers = {k: v for k, v in find_layers(model).items() if k == "attn.in_proj_weight"}
    block = build_blocks(layers, policy=StructurePolicy(default=structure), dtype=F64)[
        "attn.in_proj_weight"
    ]
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
    d = 24 * 9
    dense = torch.stack([block.qv(e.reshape(24, 9)).reshape(-1) for e in torch.eye(d, dtype=F64)])
    V = torch.randn(24, 9, dtype=F64)
    torch.testing.assert_close(block.qv(V).reshape(-1), dense.T @ V.reshape(-1))
    torch.testing.assert_close(block.diag_q().reshape(-1), torch.diagonal(dense))


def test_transformer_blocks_are_parents_of_outermost_attention() -> None:
    class SelfAttention(nn.Module):  # Hugging Face style, by name
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = nn.Linear(4, 4)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = SelfAttention()
            self.fc = nn.Linear(4, 4)

    model = nn.Sequential(nn.Linear(4, 4), Block(), Block(), nn.Linear(4, 2))
    assert transformer_blocks(model) == ["1", "2"]
    assert transformer_blocks(nn.Sequential(nn.Linear(2, 2))) == []
    layer = nn.TransformerEncoderLayer(8, 2, 16)
    assert transformer_blocks(nn.Sequential(layer)) == ["0"]


def test_unsupported_attention_options_are_refused() -> None:
    mha = nn.MultiheadAttention(8, 2, add_bias_kv=True)
    adapter = find_layers(mha)["in_proj_weight"]
    with pytest.raises(ValueError, match="add_bias_kv"):
        adapter.check_supported()
