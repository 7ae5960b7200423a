from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_fls.models import (
    MLPBlock,
    PatchTransformer,
    SelfAttention,
    TransformerBlock,
)

ATTENTIONS = ["mha", "linear"]


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("layout", [(1, 28, 28), (28, 28), (784,)])
def test_output_shape_for_every_input_layout(attention: str, layout: tuple[int, ...]) -> None:
    model = PatchTransformer(num_classes=7, attention=attention)  # type: ignore[arg-type]
    logits = model(torch.rand(3, *layout))
    assert logits.shape == (3, 7)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("patch_size", [1, 4, 14, 28])
def test_patch_sizes_give_the_right_token_count(patch_size: int) -> None:
    model = PatchTransformer(patch_size=patch_size, d_model=8, num_heads=2, mlp_dim=8)
    tokens = (28 // patch_size) ** 2
    assert model.pos.shape == (1, tokens, 8)
    assert model.patches(torch.rand(2, 784)).shape == (2, tokens, patch_size**2)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_patches_are_row_major() -> None:
    model = PatchTransformer(patch_size=14, d_model=8, num_heads=2)
    image = torch.arange(784.0).reshape(1, 28, 28)
    patches = model.patches(image)
    assert torch.equal(patches[0, 1], image[0, :14, 14:].reshape(-1))  # top right
    assert torch.equal(patches[0, 2], image[0, 14:, :14].reshape(-1))  # bottom left


def test_layers_are_named_as_documented() -> None:
    model = PatchTransformer(attention="linear", depth=3)
    assert len(model.blocks) == 3
    block = model.blocks[0]
    assert isinstance(block, TransformerBlock)
    assert isinstance(block.attn, SelfAttention)
    assert isinstance(block.mlp, MLPBlock)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        layer = getattr(block.attn, name)
        assert isinstance(layer, nn.Linear)
        assert layer.bias is not None
    assert block.mlp.fc1.weight.shape == (128, 64)
    assert block.mlp.fc2.weight.shape == (64, 128)
    assert model.embed.weight.shape == (64, 49)
    assert model.head.weight.shape == (10, 64)
    mha = PatchTransformer().blocks[0]
    assert isinstance(mha.attn, nn.MultiheadAttention)
    assert mha.attn.batch_first
    assert 0.0 < float(PatchTransformer().pos.detach().std()) < 0.04  # std 0.02 initialisation


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"patch_size": 5}, ValueError, r"`patch_size` must divide 28 \(one of \[1, 2, 4, 7, 14"),
        ({"patch_size": 0}, ValueError, r"`patch_size` must be an integer >= 1"),
        ({"d_model": 62}, ValueError, r"`d_model` \(62\) must be a multiple of `num_heads` \(4\)"),
        ({"num_heads": 0}, ValueError, r"`num_heads` must be an integer >= 1"),
        ({"depth": 0}, ValueError, r"`depth` must be an integer >= 1"),
        ({"mlp_dim": -1}, ValueError, r"`mlp_dim` must be an integer >= 1"),
        ({"num_classes": 0}, ValueError, r"`num_classes` must be an integer >= 1"),
        ({"dropout": 1.0}, ValueError, r"`dropout` must be in \[0, 1\)"),
        ({"dropout": -0.1}, ValueError, r"`dropout` must be in \[0, 1\)"),
        ({"attention": "flash"}, ValueError, r"`attention` must be one of \('mha', 'linear'\)"),
        ({"d_model": 64.0}, TypeError, r"`d_model` must be an integer"),
        ({"depth": True}, TypeError, r"`depth` must be an integer"),
        ({"lr": 0.0}, ValueError, r"`lr` must be > 0"),
    ],
)
def test_invalid_arguments_are_named(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        PatchTransformer(**kwargs)


def test_wrong_image_size_is_refused() -> None:
    with pytest.raises(ValueError, match=r"expects images .* got shape \(2, 100\)"):
        PatchTransformer()(torch.rand(2, 100))


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_few_steps_lower_the_loss(attention: str, optimizer: str) -> None:
    model = PatchTransformer(attention=attention, dropout=0.1)  # type: ignore[arg-type]
    images, labels = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    opt: torch.optim.Optimizer = (
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if optimizer == "sgd"
        else torch.optim.Adam(model.parameters(), lr=3e-3)
    )
    model.eval()
    with torch.no_grad():
        before = float(model.loss(model(images), labels))
    model.train()
    for _ in range(15):
        opt.zero_grad()
        model.loss(model(images), labels).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        after = float(model.loss(model(images), labels))
    assert after < 0.8 * before


def _copy_mha_into_linear(mha: PatchTransformer, linear: PatchTransformer) -> None:
    state = {}
    for name, value in mha.state_dict().items():
        if ".attn.in_proj_" in name:
            prefix, kind = name.split(".attn.in_proj_")  # kind: "weight" or "bias"
            for part, chunk in zip(("q", "k", "v"), value.chunk(3, dim=0), strict=True):
                state[f"{prefix}.attn.{part}_proj.{kind}"] = chunk
        else:
            state[name.replace(".attn.out_proj.", ".attn.o_proj.")] = value
    linear.load_state_dict(state)  # strict: every parameter copied, none left over


@pytest.mark.parametrize("grad", [False, True])  # no grad: MultiheadAttention's fast path
def test_linear_attention_equals_mha_with_copied_weights(grad: bool) -> None:
    mha = PatchTransformer(attention="mha", depth=2).eval()
    linear = PatchTransformer(attention="linear", depth=2).eval()
    _copy_mha_into_linear(mha, linear)
    images = torch.rand(5, 784)
    with torch.set_grad_enabled(grad):
        expected, got = mha(images), linear(images)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_self_attention_matches_functional_multi_head_attention() -> None:
    attn = SelfAttention(16, 4).eval()
    x = torch.randn(2, 5, 16)
    in_w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    in_b = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
    expected, _ = F.multi_head_attention_forward(
        *(x.transpose(0, 1),) * 3,
        16,
        4,
        in_w,
        in_b,
        None,
        None,
        False,
        0.0,
        attn.o_proj.weight,
        attn.o_proj.bias,
        need_weights=False,
    )
    torch.testing.assert_close(attn(x), expected.transpose(0, 1), rtol=1e-5, atol=1e-5)


def test_block_arguments_are_checked_too() -> None:
    with pytest.raises(ValueError, match=r"`attention` must be one of"):
        TransformerBlock(8, 2, 16, attention="sparse")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`d_model` \(10\) must be a multiple of `num_heads`"):
        SelfAttention(10, 4)
