"""Structured pruning: coupled groups found by tracing and by rules, masks, and compaction.

Each model is tiny; member indices are checked against the ones worked out by hand for its
sizes. Compaction is checked on a model whose random half of every family's units were zeroed
with ``structured_masks``: the compacted model computes the same outputs, has exactly the
expected number of parameters fewer, and its ``state_dict`` loads into another compacted copy.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import Tensor, nn

import lightning_fls
from lightning_fls import GroupFamily, GroupMember, compact, find_groups, structured_masks
from lightning_fls.structured import (
    PrunedMultiheadAttention,
    register_group_rule,
    unregister_group_rule,
    zero_units,
)
from lightning_fls.structured.groups import unit_indices

ATOL = 1e-5


# --- helpers -------------------------------------------------------------------------------------


def column(n: int) -> Tensor:
    """``[[0], [1], ..., [n-1]]``: one position per unit."""
    return torch.arange(n).reshape(n, 1)


def members(family: GroupFamily) -> dict[tuple[str, int, str], Tensor]:
    return {(m.parameter, m.dim, m.role): m.indices for m in family.members}


def assert_members(family: GroupFamily, expected: dict[tuple[str, int, str], Tensor]) -> None:
    found = members(family)
    assert set(found) == set(expected), family.name
    for key, indices in expected.items():
        assert torch.equal(found[key], indices), (family.name, key)


def halve(families: Sequence[GroupFamily]) -> dict[str, Tensor]:
    """A random half of each family's units flagged for removal."""
    removed = {}
    for family in families:
        flags = torch.zeros(family.units, dtype=torch.bool)
        flags[torch.randperm(family.units)[: family.units // 2]] = True
        removed[family.name] = flags
    return removed


@torch.no_grad()
def apply(model: nn.Module, masks: dict[str, Tensor]) -> None:
    for name, param in model.named_parameters():
        if name in masks:
            param.mul_(masks[name])


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, Tensor]) -> None:
    after = model.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=key)


def assert_state_dict_round_trip(
    compacted: nn.Module, fresh: nn.Module, run: Callable[[nn.Module], Tensor]
) -> None:
    """``compacted``'s saved state_dict loads into ``fresh`` (another compacted copy)."""
    with torch.no_grad():
        for param in fresh.parameters():
            param.normal_()
    buffer = io.BytesIO()
    torch.save(compacted.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(run(fresh), run(compacted), rtol=0, atol=0)


def prune_and_compact(
    model: nn.Module,
    granularities: Sequence[str],
    run: Callable[[nn.Module], Tensor],
    example_inputs: Tensor | None = None,
) -> tuple[nn.Module, nn.Module, list[GroupFamily]]:
    """Zero half of every family's units, compact, and check the outputs are unchanged.

    Returns:
        ``(masked model, compacted model, families)``.
    """
    model.eval()
    families = [f for g in granularities for f in find_groups(model, g, example_inputs)]
    masks = structured_masks(model, families, halve(families))
    apply(model, masks)
    before = snapshot(model)
    compacted = compact(model, example_inputs)
    assert_unchanged(model, before)
    assert compacted is not model
    with torch.no_grad():
        torch.testing.assert_close(run(compacted), run(model), rtol=0, atol=ATOL)
    return model, compacted, families


# --- MLP -----------------------------------------------------------------------------------------


def make_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def test_mlp_neuron_groups_and_compaction() -> None:
    model = make_mlp()
    x = torch.randn(4, 6)
    families = find_groups(model, "neuron", x)
    assert [f.name for f in families] == ["0", "2"]  # "4" feeds the model output
    assert all(f.units == 8 and f.granularity == "neuron" for f in families)
    assert_members(
        families[0],
        {
            ("0.weight", 0, "producer"): column(8),
            ("0.bias", 0, "producer"): column(8),
            ("2.weight", 1, "consumer"): column(8),
        },
    )
    assert_members(
        families[1],
        {
            ("2.weight", 0, "producer"): column(8),
            ("2.bias", 0, "producer"): column(8),
            ("4.weight", 1, "consumer"): column(8),
        },
    )
    assert find_groups(model, "channel", x) == []
    assert find_groups(model, "neuron", x, exclude=["2"]) == families[:1]

    masked, compacted, _ = prune_and_compact(model, ["neuron"], lambda m: m(x), x)
    # 155 = (6·8 + 8) + (8·8 + 8) + (8·3 + 3); 4 of 8 neurons kept in "0" and "2":
    # (6·4 + 4) + (4·4 + 4) + (4·3 + 3) = 63.
    assert count(masked) == 155
    assert count(compacted) == 63
    assert (compacted[0].out_features, compacted[2].in_features) == (4, 4)
    assert (compacted[2].out_features, compacted[4].in_features) == (4, 4)
    assert_state_dict_round_trip(compacted, compact(masked, x), lambda m: m(x))
    # The compacted model has no all-zero unit left.
    with pytest.raises(ValueError, match="nothing can be removed"):
        compact(compacted, x)


def test_structured_masks_cover_producers_and_consumers_only() -> None:
    model = make_mlp()
    families = find_groups(model, "neuron", torch.randn(2, 6))
    flags = torch.tensor([True, False, False, True, False, False, False, False])
    masks = structured_masks(model, families, {"0": flags})
    assert set(masks) == {"0.weight", "0.bias", "2.weight", "2.bias", "4.weight"}
    expected_rows = (~flags)[:, None].expand(8, 6)
    assert torch.equal(masks["0.weight"], expected_rows)
    assert torch.equal(masks["0.bias"], ~flags)
    assert torch.equal(masks["2.weight"], (~flags)[None, :].expand(8, 8))
    assert masks["2.bias"].all()
    assert masks["4.weight"].all()
    # A Linear both consuming "0" and producing "2": the masks combine.
    both = structured_masks(model, families, {"0": flags, "2": flags})
    assert torch.equal(both["2.weight"], (~flags)[:, None] & (~flags)[None, :])
    apply(model, both)
    assert torch.equal(zero_units(dict(model.named_parameters()), families[0]), flags)


# --- CNN -----------------------------------------------------------------------------------------


def make_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 10),
        nn.ReLU(),
        nn.Linear(10, 5),
    )


def test_cnn_channel_and_neuron_groups_and_compaction() -> None:
    model = make_cnn()
    x = torch.randn(3, 3, 8, 8)
    model.train()
    with torch.no_grad():
        model(x)  # non-trivial BatchNorm running statistics
    before = snapshot(model)
    channels = find_groups(model, "channel", x)
    assert_unchanged(model, before)  # the forward recording shapes ran in eval mode
    assert model.training
    assert model[1].training
    assert [f.name for f in channels] == ["0", "4"]
    passive = {(f"{bn}.{t}", 0, "passive") for bn in "1" for t in ("weight", "bias")}
    passive |= {(f"1.{t}", 0, "passive") for t in ("running_mean", "running_var")}
    assert_members(
        channels[0],
        {
            ("0.weight", 0, "producer"): column(4),
            ("0.bias", 0, "producer"): column(4),
            **dict.fromkeys(passive, column(4)),
            ("4.weight", 1, "consumer"): column(4),
        },
    )
    # After the 2×2 max-pool the maps are 4×4: channel c owns Linear columns 16c … 16c + 15.
    assert_members(
        channels[1],
        {
            ("4.weight", 0, "producer"): column(6),
            ("4.bias", 0, "producer"): column(6),
            **{(f"5.{t}", 0, "passive"): column(6) for t in ("weight", "bias")},
            **{(f"5.{t}", 0, "passive"): column(6) for t in ("running_mean", "running_var")},
            ("8.weight", 1, "consumer"): torch.arange(96).reshape(6, 16),
        },
    )
    assert [f.name for f in find_groups(model, "neuron", x)] == ["8"]

    masked, compacted, _ = prune_and_compact(model, ["channel", "neuron"], lambda m: m(x), x)
    # Before: conv 3·4·9 + 4 = 112, bn 8, conv 4·6·9 + 6 = 222, bn 12, linear 96·10 + 10 = 970,
    # linear 10·5 + 5 = 55: 1379. Keeping 2 of 4, 3 of 6 channels and 5 of 10 neurons:
    # 3·2·9 + 2 = 56, 4, 2·3·9 + 3 = 57, 6, 48·5 + 5 = 245, 5·5 + 5 = 30: 398.
    assert count(masked) == 1379
    assert count(compacted) == 398
    assert compacted[1].num_features == 2
    assert compacted[1].running_mean.shape == (2,)
    assert (compacted[4].in_channels, compacted[4].out_channels) == (2, 3)
    assert (compacted[8].in_features, compacted[8].out_features) == (48, 5)
    assert_state_dict_round_trip(compacted, compact(masked, x), lambda m: m(x))


def test_cnn_reshape_flatten_and_functional_ops_are_followed() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3)
            self.pool = nn.AdaptiveAvgPool2d(2)
            self.fc = nn.Linear(16, 3)

        def forward(self, x: Tensor) -> Tensor:
            h = torch.relu(self.conv(x)) * 0.5
            h = self.pool(h)
            return self.fc(h.view(h.size(0), -1))

    model = Net().eval()
    x = torch.randn(2, 2, 6, 6)
    (family,) = find_groups(model, "channel", x)
    assert torch.equal(members(family)[("fc.weight", 1, "consumer")], unit_indices(4, 4))
    prune_and_compact(model, ["channel"], lambda m: m(x), x)


# --- nn.TransformerEncoderLayer ------------------------------------------------------------------


def make_encoder() -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        d_model=8, nhead=2, dim_feedforward=12, dropout=0.0, batch_first=True
    )
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)


def test_transformer_encoder_neurons_and_heads() -> None:
    model = make_encoder()
    x = torch.randn(2, 5, 8)
    neurons = find_groups(model, "neuron", x)
    heads = find_groups(model, "head", x)
    assert [f.name for f in neurons] == ["layers.0.linear1", "layers.1.linear1"]
    assert [f.name for f in heads] == ["layers.0.self_attn", "layers.1.self_attn"]
    assert_members(
        neurons[1],
        {
            ("layers.1.linear1.weight", 0, "producer"): column(12),
            ("layers.1.linear1.bias", 0, "producer"): column(12),
            ("layers.1.linear2.weight", 1, "consumer"): column(12),
        },
    )
    # E = 8, 2 heads of d = 4: head h owns q rows 4h…4h+3, k rows 8+4h…, v rows 16+4h….
    rows = torch.tensor(
        [[0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19], [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23]]
    )
    assert_members(
        heads[0],
        {
            ("layers.0.self_attn.in_proj_weight", 0, "producer"): rows,
            ("layers.0.self_attn.in_proj_bias", 0, "producer"): rows,
            ("layers.0.self_attn.out_proj.weight", 1, "consumer"): torch.tensor(
                [[0, 1, 2, 3], [4, 5, 6, 7]]
            ),
        },
    )
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    padding = torch.tensor([[False] * 5, [False, False, False, True, True]])

    def run(m: nn.Module) -> Tensor:
        return torch.cat(
            [m(x), m(x, mask=causal, is_causal=True), m.layers[0](x, src_key_padding_mask=padding)]
        )

    masked, compacted, _ = prune_and_compact(model, ["neuron", "head"], run)
    # Per layer: 6 of 12 neurons (6·(8 + 1) rows and bias, 6·8 columns = 102) and 1 of 2 heads
    # (12 rows of 8 and 12 bias entries, 4 columns of 8 = 140) go: 2·242 = 484.
    assert count(masked) - count(compacted) == 484
    attention = compacted.layers[0].self_attn
    assert isinstance(attention, PrunedMultiheadAttention)
    assert (attention.num_heads, attention.in_proj_weight.shape) == (1, (12, 8))
    assert compacted.layers[0].linear1.out_features == 6
    original = masked.layers[0].self_attn
    kept = list(attention.kept_heads)
    per_head = torch.randn(2 * 2, 5, 5)  # [N · original heads, L, S]
    with torch.no_grad():  # per-head masks and weights: those of the kept heads
        y, w = attention(x, x, x, attn_mask=per_head, average_attn_weights=False)
        y_ref, w_ref = original(x, x, x, attn_mask=per_head, average_attn_weights=False)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=ATOL)
        assert w is not None
        assert w_ref is not None
        torch.testing.assert_close(w, w_ref[:, kept], rtol=0, atol=ATOL)
        fused = attention(x, x, x, attn_mask=per_head, need_weights=False)[0]
        torch.testing.assert_close(fused, y, rtol=0, atol=ATOL)
    assert_state_dict_round_trip(compacted, compact(masked), run)
    # A compacted model's heads are found again, and compact further.
    assert [f.units for f in find_groups(compacted, "head")] == [1, 1]


# --- Hugging Face --------------------------------------------------------------------------------


def test_bert_neurons_and_heads() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=32,
    )
    model = transformers.BertModel(config)
    ids = torch.randint(0, 50, (2, 7))
    neurons = find_groups(model, "neuron")
    heads = find_groups(model, "head")
    assert [f.name for f in neurons] == [f"encoder.layer.{i}.intermediate.dense" for i in (0, 1)]
    assert [f.name for f in heads] == [f"encoder.layer.{i}.attention.self" for i in (0, 1)]
    layer = "encoder.layer.0"
    assert_members(
        neurons[0],
        {
            (f"{layer}.intermediate.dense.weight", 0, "producer"): column(24),
            (f"{layer}.intermediate.dense.bias", 0, "producer"): column(24),
            (f"{layer}.output.dense.weight", 1, "consumer"): column(24),
        },
    )
    per_head = torch.arange(16).reshape(2, 8)  # d = 16 / 2 = 8 consecutive rows per head
    expected = {
        (f"{layer}.attention.self.{p}.{t}", 0, "producer"): per_head
        for p in ("query", "key", "value")
        for t in ("weight", "bias")
    }
    expected[(f"{layer}.attention.output.dense.weight", 1, "consumer")] = per_head
    assert_members(heads[0], expected)

    def run(m: nn.Module) -> Tensor:
        out = m(input_ids=ids)
        return torch.cat([out.last_hidden_state.flatten(), out.pooler_output.flatten()])

    assert [f.name for f in find_groups(model, "neuron", include=["encoder.layer.1.*"])] == [
        "encoder.layer.1.intermediate.dense"
    ]
    with pytest.raises(ValueError, match=r"'pooler.dense', which no group rule covers"):
        find_groups(model, "neuron", include=["pooler.dense"])
    with pytest.raises(
        ValueError,
        match=r"'encoder.layer.0.output.dense', which the group rule for BertLayer "
        r"'encoder.layer.0' does not make a neuron group",
    ):
        find_groups(model, "neuron", include=["encoder.layer.0.output.dense"])

    masked, compacted, _ = prune_and_compact(model, ["neuron", "head"], run)
    # Per layer: 12 of 24 neurons (16 + 1 + 16 each: 396) and 1 of 2 heads (3·(8·16 + 8) +
    # 8·16 = 536) go: 2·932 = 1864.
    assert count(masked) - count(compacted) == 1864
    attention = compacted.encoder.layer[0].attention.self
    assert (attention.num_attention_heads, attention.all_head_size) == (1, 8)
    assert compacted.config.num_attention_heads == 2  # the shared config is left alone
    assert_state_dict_round_trip(compacted, compact(masked), run)


def test_gpt2_neurons_and_heads() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    model = transformers.GPT2Model(config)
    ids = torch.randint(0, 40, (2, 6))
    neurons = find_groups(model, "neuron")
    heads = find_groups(model, "head")
    assert [f.name for f in neurons] == ["h.0.mlp.c_fc", "h.1.mlp.c_fc"]
    assert [f.name for f in heads] == ["h.0.attn", "h.1.attn"]
    assert_members(
        neurons[0],
        {  # Conv1D weights are [in, out]: a neuron is a column of c_fc, a row of c_proj.
            ("h.0.mlp.c_fc.weight", 1, "producer"): column(64),
            ("h.0.mlp.c_fc.bias", 0, "producer"): column(64),
            ("h.0.mlp.c_proj.weight", 0, "consumer"): column(64),
        },
    )
    q = torch.arange(16).reshape(2, 8)
    qkv = torch.cat([q, q + 16, q + 32], dim=1)  # columns of q, k and v of each head
    assert_members(
        heads[1],
        {
            ("h.1.attn.c_attn.weight", 1, "producer"): qkv,
            ("h.1.attn.c_attn.bias", 0, "producer"): qkv,
            ("h.1.attn.c_proj.weight", 0, "consumer"): q,
        },
    )

    def run(m: nn.Module) -> Tensor:
        return m(input_ids=ids).last_hidden_state

    masked, compacted, _ = prune_and_compact(model, ["neuron", "head"], run)
    # Per layer: 32 of 64 neurons (16 + 1 + 16 each: 1056) and 1 of 2 heads (24 columns of 16,
    # 24 bias entries, 8 rows of 16: 536) go: 2·1592 = 3184.
    assert count(masked) - count(compacted) == 3184
    block = compacted.h[0]
    assert (block.mlp.c_fc.nf, block.mlp.c_proj.nx) == (32, 32)
    assert (block.attn.num_heads, block.attn.split_size, block.attn.c_attn.nf) == (1, 8, 24)
    assert_state_dict_round_trip(compacted, compact(masked), run)


# --- the package's own PatchTransformer -----------------------------------------------------------


@pytest.mark.parametrize("attention", ["linear", "mha"])
def test_patch_transformer_neurons_and_heads(attention: str) -> None:
    from lightning_fls.models import PatchTransformer, SelfAttention

    torch.manual_seed(0)
    model = PatchTransformer(d_model=8, num_heads=2, depth=2, mlp_dim=12, attention=attention)
    x = torch.rand(3, 784)
    neurons = find_groups(model, "neuron", x)
    heads = find_groups(model, "head", x)
    assert [f.name for f in neurons] == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]
    assert [f.name for f in heads] == ["blocks.0.attn", "blocks.1.attn"]
    if attention == "linear":
        q = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])  # 2 heads of d = 4
        expected = {
            (f"blocks.1.attn.{p}_proj.{t}", 0, "producer"): q
            for p in ("q", "k", "v")
            for t in ("weight", "bias")
        }
        expected[("blocks.1.attn.o_proj.weight", 1, "consumer")] = q
        assert_members(heads[1], expected)
    masked, compacted, _ = prune_and_compact(model, ["neuron", "head"], lambda m: m(x), x)
    # Per block: 6 of 12 neurons (6·(8 + 1) rows and bias, 6·8 columns = 102) and 1 of 2 heads
    # (12 rows of 8 and 12 bias entries over q/k/v, 4 columns of 8 = 140) go: 2·242 = 484.
    assert count(masked) - count(compacted) == 484
    attn = compacted.blocks[0].attn
    if attention == "linear":
        assert isinstance(attn, SelfAttention)
        assert (attn.num_heads, attn.head_dim, attn.q_proj.out_features) == (1, 4, 4)
    else:
        assert isinstance(attn, PrunedMultiheadAttention)
    assert_state_dict_round_trip(compacted, compact(masked, x), lambda m: m(x))
    assert [f.units for f in find_groups(compacted, "head")] == [1, 1]


# --- rules ---------------------------------------------------------------------------------------


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.fc1(x))
        if h.sum() > 0:
            h = h * 2.0
        return self.fc2(h)


def branchy_rule(fqn: str, module: nn.Module, granularity: str) -> list[GroupFamily]:
    if granularity != "neuron":
        return []
    prefix = f"{fqn}." if fqn else ""
    index = unit_indices(6)
    return [
        GroupFamily(
            f"{prefix}fc1",
            "neuron",
            6,
            (
                GroupMember(f"{prefix}fc1.weight", 0, index, "producer"),
                GroupMember(f"{prefix}fc1.bias", 0, index, "producer"),
                GroupMember(f"{prefix}fc2.weight", 1, index, "consumer"),
            ),
        )
    ]


def test_registered_rule_covers_an_untraceable_model() -> None:
    model = nn.Sequential(Branchy())
    x = torch.randn(3, 4)
    register_group_rule(Branchy, branchy_rule)
    try:
        with pytest.raises(ValueError, match="has a group rule already"):
            register_group_rule(Branchy, branchy_rule)
        (family,) = find_groups(model, "neuron", x)
        assert family.name == "0.fc1"
        prune_and_compact(model, ["neuron"], lambda m: m(x), x)
    finally:
        unregister_group_rule(Branchy)


# --- bad input -----------------------------------------------------------------------------------


def test_unknown_granularity_lists_the_accepted_values() -> None:
    with pytest.raises(
        ValueError, match=r"`granularity` must be one of \('neuron', 'channel', 'head'\), got 'row'"
    ):
        find_groups(make_mlp(), "row", torch.randn(2, 6))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 4)
        self.fc3 = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x) + x
        return self.fc3(torch.cat([self.fc2(h), h], dim=-1))


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("4", "'4', whose output reaches the model output; its neurons cannot be removed"),
        ("fc1", r"'fc1', whose output reaches a residual add \(`add`\)"),
        ("fc2", r"'fc2', whose output reaches a concat \(`torch.cat`\)"),
    ],
)
def test_include_naming_a_layer_that_is_no_group(pattern: str, reason: str) -> None:
    model = make_mlp() if pattern == "4" else Residual()
    with pytest.raises(ValueError, match=f"`include` names {reason}"):
        find_groups(model, "neuron", None, include=[pattern])
    with pytest.raises(ValueError, match="matches no layer that could have neuron groups"):
        find_groups(model, "neuron", None, include=["nope*"])


class SharedAndLeaf(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 4)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.unused = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc2(torch.relu(self.fc1(x))) + self.fc2(x)
        return self.attn(h, h, h)[0]


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("fc1", r"'fc1', whose output reaches Linear 'fc2', which the forward calls 2 times"),
        (
            "attn.out_proj",
            r"'attn.out_proj', which runs inside MultiheadAttention 'attn', which torch.fx does "
            r"not trace into \(register a group rule for MultiheadAttention\)",
        ),
        ("unused", r"'unused', which the forward never calls"),
    ],
)
def test_include_naming_a_shared_consumer_or_an_untraced_layer(pattern: str, reason: str) -> None:
    with pytest.raises(ValueError, match=f"`include` names {reason}"):
        find_groups(SharedAndLeaf(), "neuron", None, include=[pattern])
    with pytest.raises(ValueError, match=r"'attn', whose heads are found only through group rules"):
        find_groups(SharedAndLeaf(), "head", None, include=["attn"])


def test_include_naming_a_grouped_conv() -> None:
    model = nn.Sequential(nn.Conv2d(2, 4, 1, groups=2), nn.ReLU(), nn.Conv2d(4, 3, 1))
    assert find_groups(model, "channel", None) == []
    with pytest.raises(ValueError, match=r"'0', which has groups=2"):
        find_groups(model, "channel", None, include=["0"])


def test_compact_refuses_an_unpruned_model() -> None:
    model = make_mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"prune_one_shot\(\.\.\., granularity=\.\.\.\)"):
        compact(model, torch.randn(2, 6))
    assert_unchanged(model, before)


def test_compact_refuses_to_empty_a_layer() -> None:
    model = make_mlp()
    families = find_groups(model, "neuron", torch.randn(2, 6))
    removed = {"0": torch.ones(8, dtype=torch.bool), "2": torch.rand(8) < 0.5}
    apply(model, structured_masks(model, families, removed))
    before = snapshot(model)
    for inplace in (False, True):
        with pytest.raises(ValueError, match=r"Every neuron of '0' \(8\).*cannot be emptied"):
            compact(model, torch.randn(2, 6), inplace=inplace)
        assert_unchanged(model, before)


def test_compact_in_place_cuts_the_model_itself() -> None:
    model = make_mlp()
    x = torch.randn(5, 6)
    families = find_groups(model, "neuron", x)
    removed = {"0": torch.arange(8) % 2 == 0, "2": torch.arange(8) < 3}
    apply(model, structured_masks(model, families, removed))
    expected = compact(model, x)
    with torch.no_grad():
        masked_out = model(x)
    first = model[0]
    assert compact(model, x, inplace=True) is model
    assert model[0] is first  # the modules keep their identity
    assert (model[0].out_features, model[2].in_features) == (4, 4)
    assert (model[2].out_features, model[4].in_features) == (5, 5)
    assert count(model) == count(expected)
    for key, value in expected.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked_out)


def test_untraceable_model_without_a_rule() -> None:
    model = Branchy()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"torch.fx cannot trace Branchy.*register_group_rule"):
        find_groups(model, "neuron", torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"torch\.fx cannot trace Branchy"):
        compact(model, torch.randn(2, 4))
    assert_unchanged(model, before)


def test_flatten_without_example_inputs() -> None:
    with pytest.raises(ValueError, match="`example_inputs` are needed to find the channel groups"):
        find_groups(make_cnn(), "channel")


def test_structured_masks_bad_input() -> None:
    model = make_mlp()
    families = find_groups(model, "neuron", torch.randn(2, 6))
    with pytest.raises(ValueError, match=r"`removed` names 'fc', which is not one of"):
        structured_masks(model, families, {"fc": torch.zeros(8, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"`removed\['0'\]` must have shape \(8,\)"):
        structured_masks(model, families, {"0": torch.zeros(7, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"`removed\['0'\]` must be a bool tensor"):
        structured_masks(model, families, {"0": torch.zeros(8)})
    other = copy.deepcopy(families[0])
    with pytest.raises(ValueError, match="not a parameter or buffer of the model"):
        structured_masks(nn.Sequential(nn.Linear(8, 8)), [other], {})


def test_group_types_validate() -> None:
    with pytest.raises(ValueError, match="`role` must be one of"):
        GroupMember("w", 0, column(2), "owner")
    with pytest.raises(ValueError, match="int64"):
        GroupMember("w", 0, column(2).float(), "producer")
    member = GroupMember("w", 0, column(2), "producer")
    assert member == GroupMember("w", 0, column(2), "producer")
    with pytest.raises(ValueError, match="has indices for 2 units, the family has 3"):
        GroupFamily("f", "neuron", 3, (member,))
    with pytest.raises(ValueError, match="no producer"):
        GroupFamily("f", "neuron", 2, (GroupMember("w", 1, column(2), "consumer"),))


def test_public_exports() -> None:
    for name in ("find_groups", "compact", "structured_masks", "GroupFamily", "GroupMember"):
        assert name in lightning_fls.__all__
    assert "register_group_rule" in lightning_fls.__all__
