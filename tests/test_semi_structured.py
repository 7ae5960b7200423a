from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from lightning_fls import semi_structured
from lightning_fls.models import PatchTransformer
from lightning_fls.patterns import NMPattern, follows_pattern
from lightning_fls.semi_structured import (
    NO_CUDA_MESSAGE,
    semi_structured_support,
    to_semi_structured,
)


def two_four(weight: Tensor) -> Tensor:
    """``weight`` with the 2 smallest |w| of every 4 consecutive along a row zeroed."""
    groups = weight.detach().reshape(weight.shape[0], -1, 4)
    drop = groups.abs().topk(2, dim=-1, largest=False).indices
    return groups.scatter(-1, drop, 0.0).reshape(weight.shape)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 32)
        self.b = nn.Linear(32, 64)
        self.c = nn.Linear(64, 32)
        with torch.no_grad():
            self.a.weight.copy_(two_four(self.a.weight))  # b and c are dense


@pytest.fixture
def pretend_support(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(semi_structured, "semi_structured_support", lambda device=None: (True, ""))


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {name: value.clone() for name, value in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert type(after[name]) is torch.Tensor, name
        assert torch.equal(after[name], value), name
    assert all(type(p) is nn.Parameter and p.requires_grad for p in model.parameters())


def test_helper_masks_follow_two_four() -> None:
    assert follows_pattern(two_four(torch.randn(8, 16)), NMPattern(2, 4))
    assert follows_pattern(Net().a.weight, NMPattern(2, 4))
    assert not follows_pattern(Net().b.weight, NMPattern(2, 4))


# --- semi_structured_support ------------------------------------------------------------------


def test_no_cuda_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    supported, reason = semi_structured_support()
    assert not supported
    assert reason == NO_CUDA_MESSAGE
    assert "compute capability 8.0 or newer (Ampere, Hopper)" in reason
    assert "no CUDA device" in reason
    assert "dense zeros, with no speed-up" in reason


def test_unsupported_machine_refuses_and_leaves_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = Net().half()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"Cannot convert .*this machine has no CUDA device"):
        to_semi_structured(model)
    assert_unchanged(model, before)


def fake_gpu(monkeypatch: pytest.MonkeyPatch, name: str, capability: tuple[int, int]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


def test_old_gpu_is_named_with_its_capability(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpu(monkeypatch, "Tesla T4", (7, 5))
    supported, reason = semi_structured_support("cuda")
    assert not supported
    assert "cuda:0 is a Tesla T4 of compute capability 7.5" in reason
    assert "8.0 or newer" in reason


def test_recent_gpu_is_supported(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpu(monkeypatch, "NVIDIA A100", (8, 0))
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: True)
    assert semi_structured_support() == (True, "")
    assert semi_structured_support(torch.device("cuda", 0)) == (True, "")
    supported, reason = semi_structured_support("cuda:1")
    assert not supported
    assert "no CUDA device 1" in reason
    supported, reason = semi_structured_support("cpu")
    assert not supported
    assert "on cpu" in reason
    assert "model.cuda()" in reason


def test_missing_cusparselt_points_to_cutlass(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpu(monkeypatch, "NVIDIA H100", (9, 0))
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: False)
    supported, reason = semi_structured_support()
    assert not supported
    assert "no cuSPARSELt" in reason
    assert "_FORCE_CUTLASS = True" in reason


def test_torch_without_the_api_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(torch.sparse, "to_sparse_semi_structured")
    supported, reason = semi_structured_support()
    assert not supported
    assert "has no torch.sparse.to_sparse_semi_structured" in reason


# --- to_semi_structured: checks, all before any change -----------------------------------------


@pytest.mark.usefixtures("pretend_support")
def test_two_four_violations_are_listed_and_nothing_changes() -> None:
    model = Net().half()
    with torch.no_grad():
        model.c.weight[0, :4] = torch.tensor([1.0, 2.0, 0.0, 0.0])  # c is dense anyway
    groups_c = 32 * 64 // 4
    expected_c = int(((model.c.weight != 0).reshape(32, -1, 4).sum(-1) > 2).sum())
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"do not follow 2:4") as info:
        to_semi_structured(model)
    message = str(info.value)
    assert "`a.weight`" not in message  # a follows 2:4
    assert f"`b.weight` ({64 * 32 // 4} of {64 * 32 // 4} groups)" in message
    assert f"`c.weight` ({expected_c} of {groups_c} groups)" in message
    assert 'pattern="2:4"' in message
    assert_unchanged(model, before)


@pytest.mark.usefixtures("pretend_support")
def test_include_restricts_the_checks() -> None:
    model = Net().half()
    with pytest.raises(ValueError, match=r"`c.weight`") as info:
        to_semi_structured(model, include=["a.*", "c.*"])
    assert "b.weight" not in str(info.value)


@pytest.mark.usefixtures("pretend_support")
def test_wrong_dtype_says_to_call_half() -> None:
    model = Net()  # float32
    model.b.half()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"model\.half\(\)") as info:
        to_semi_structured(model)
    message = str(info.value)
    assert "`a.weight` (torch.float32)" in message
    assert "`c.weight` (torch.float32)" in message
    assert "b.weight" not in message
    assert "torch.bfloat16" in message
    assert_unchanged(model, before)


@pytest.mark.usefixtures("pretend_support")
def test_shapes_the_kernels_refuse_are_named() -> None:
    model = PatchTransformer(attention="linear").half()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"refuse these Linear weights") as info:
        to_semi_structured(model)
    message = str(info.value)
    # With torch's default backend (cuSPARSELt, fp16: multiples of 16 × 16).
    assert "`embed.weight` of shape (64, 49)" in message
    assert "`head.weight` of shape (10, 64)" in message
    assert "`blocks." not in message
    assert "include=['blocks.*']" in message
    assert_unchanged(model, before)


def test_shape_constraints_come_from_torch() -> None:
    backend, table = semi_structured._shape_constraints()
    assert backend in ("cusparselt", "cutlass")
    assert set(semi_structured.SEMI_STRUCTURED_DTYPES) <= set(table)
    fallback = semi_structured._FALLBACK_SHAPE_CONSTRAINTS[backend]
    assert {dtype: table[dtype] for dtype in fallback} == fallback  # our fallback still current


@pytest.mark.parametrize("include", [["nothing.*"], ["a.weight", "a.bias"]])
def test_include_matching_nothing_is_named(include: list[str]) -> None:
    model = Net().half()
    with pytest.raises(ValueError, match=rf"`include` pattern '{include[-1]}' matches no"):
        to_semi_structured(model, include=include)


def test_include_must_be_a_list() -> None:
    with pytest.raises(TypeError, match=r"`include` must be a list of glob patterns"):
        to_semi_structured(Net(), include="a.*")


def test_model_without_linear_layers_is_refused() -> None:
    with pytest.raises(ValueError, match=r"no nn.Linear layer"):
        to_semi_structured(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()))


def test_multihead_attention_is_not_converted() -> None:
    model = PatchTransformer(attention="mha")
    names = [name for name, _ in semi_structured._convertible_linears(model)]
    assert "blocks.0.mlp.fc1.weight" in names
    assert not any(".attn." in name for name in names)
    with pytest.raises(ValueError, match=r"`include` pattern 'blocks.\*.attn.\*' matches no"):
        to_semi_structured(model.half(), include=["blocks.*.attn.*"])


@pytest.mark.usefixtures("pretend_support")
def test_torch_refusing_a_conversion_changes_nothing() -> None:
    model = Net().half()  # on the CPU: torch's own check refuses it
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"torch refused to convert `a.weight`.*Nothing was"):
        to_semi_structured(model, include=["a.weight"])
    assert_unchanged(model, before)


# --- to_semi_structured: the swap itself (conversion faked on the CPU) -------------------------


class FakeSparse(torch.Tensor):
    pass


def test_selected_weights_are_swapped_and_frozen(
    monkeypatch: pytest.MonkeyPatch, pretend_support: None
) -> None:
    calls: list[Tensor] = []

    def convert(weight: Tensor) -> Tensor:
        calls.append(weight)
        return weight.clone().as_subclass(FakeSparse)

    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", convert)
    model = PatchTransformer(attention="linear").half()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.startswith("blocks.") and name.endswith("weight") and parameter.dim() == 2:
                parameter.copy_(two_four(parameter))
    model.blocks[1].mlp.fc2 = model.blocks[0].mlp.fc2  # a layer used twice: converted once
    dense = copy.deepcopy(model)
    names = to_semi_structured(model, include=["blocks.*"])
    assert names == [
        f"blocks.{i}.{layer}.weight"
        for i in (0, 1)
        for layer in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.fc1")
        + (("mlp.fc2",) if i == 0 else ())
    ]
    assert len(calls) == len(names)
    for name, parameter in model.named_parameters():
        if name in names:
            assert isinstance(parameter, FakeSparse)
            assert not parameter.requires_grad
            assert torch.equal(parameter.as_subclass(Tensor), dense.get_parameter(name))
        else:
            assert type(parameter) is nn.Parameter, name
            assert parameter.requires_grad, name


# --- on a GPU of compute capability 8.0+ -------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not semi_structured_support()[0], reason=semi_structured_support()[1])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_converted_transformer_matches_dense_on_gpu(dtype: torch.dtype) -> None:
    model = PatchTransformer(attention="linear", d_model=128, mlp_dim=256).to("cuda", dtype)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.startswith("blocks.") and name.endswith("weight") and parameter.dim() == 2:
                parameter.copy_(two_four(parameter))
    model.eval()
    images = torch.rand(64, 784, device="cuda", dtype=dtype)
    with torch.no_grad():
        expected = model(images).float()
        names = to_semi_structured(model, include=["blocks.*"])
        got = model(images).float()
    assert len(names) == 12
    assert isinstance(model.blocks[0].mlp.fc1.weight, torch.sparse.SparseSemiStructuredTensor)
    with pytest.raises(ValueError, match=r"pattern 'blocks\.\*' matches no"):  # converted: skipped
        to_semi_structured(model, include=["blocks.*"])
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05)
