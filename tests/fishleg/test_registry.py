from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from torch import nn

from lightning_fls.fishleg import (
    BlockDiagonalBlock,
    DiagonalBlock,
    KroneckerBlock,
    StructurePolicy,
    build_blocks,
)
from lightning_fls.fishleg.statistics import StatisticsAccumulator
from lightning_fls.layers import (
    LayerAdapter,
    LinearAdapter,
    adapter_for,
    find_layers,
    register_layer,
    registered_types,
    unregister_layer,
)
from lightning_fls.layers.gradients import DenseGradients, OuterProductGradients


class Scale(nn.Module):
    """A toy layer y = w ⊙ x, registered by a user through a custom adapter."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x


class ScaleAdapter(LayerAdapter):
    module_type = Scale

    @property
    def canonical_shape(self) -> tuple[int, int]:
        return (1, self.module.weight.shape[0])

    @property
    def parameter_names(self) -> tuple[str, ...]:
        return ("weight",)

    def to_canonical(self, tensors):  # type: ignore[no-untyped-def]
        return tensors["weight"].unsqueeze(-2)

    def from_canonical(self, matrix):  # type: ignore[no-untyped-def]
        return {"weight": matrix[..., 0, :]}

    def example_gradients(self, calls: Sequence, *, dtype=torch.float32):  # type: ignore[no-untyped-def]
        grads = sum(x * g for x, g in calls)
        return DenseGradients(grads.to(dtype).unsqueeze(1))


def test_registry_is_open_to_users_and_refuses_silent_replacement() -> None:
    assert nn.Linear in registered_types()
    assert nn.Conv2d in registered_types()
    model = nn.Sequential(nn.Linear(3, 4), Scale(4))
    assert list(find_layers(model)) == ["0.weight"]
    register_layer(Scale, ScaleAdapter)
    try:
        assert list(find_layers(model)) == ["0.weight", "1.weight"]
        with pytest.raises(ValueError, match="overwrite=True"):
            register_layer(Scale, ScaleAdapter)
        register_layer(Scale, ScaleAdapter, overwrite=True)
        blocks = build_blocks(
            find_layers(model), policy=StructurePolicy(by_type={"Scale": "diagonal"})
        )
        assert isinstance(blocks["1.weight"], DiagonalBlock)
        assert blocks["1.weight"].shape == (1, 4)
    finally:
        unregister_layer(Scale)
    assert Scale not in registered_types()
    with pytest.raises(TypeError, match="module_type"):
        register_layer(int, ScaleAdapter)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="adapter"):
        register_layer(Scale, int)  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="Scale"):
        unregister_layer(Scale)


def test_register_block_is_a_deprecated_alias_of_register_layer() -> None:
    from lightning_fls import register_block, unregister_block

    with pytest.warns(DeprecationWarning, match="register_layer"):
        register_block(Scale, ScaleAdapter)
    try:
        assert Scale in registered_types()
    finally:
        with pytest.warns(DeprecationWarning, match="unregister_layer"):
            unregister_block(Scale)
    assert Scale not in registered_types()


def test_subclasses_of_registered_types_are_found() -> None:
    class MyLinear(nn.Linear):
        pass

    assert isinstance(adapter_for(MyLinear(2, 3)), LinearAdapter)
    assert adapter_for(nn.ReLU()) is None


def test_policy_chooses_by_name_then_type_then_size() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Conv2d(2, 3, 3), nn.Linear(5000, 2), nn.Linear(4, 4))
    policy = StructurePolicy(
        by_name={"3.*": "block_diagonal"}, by_type={"Conv2d": "diagonal"}, max_kronecker_side=4096
    )
    blocks = build_blocks(find_layers(model), policy=policy, init_scale=3.0)
    assert isinstance(blocks["0.weight"], KroneckerBlock)
    assert isinstance(blocks["1.weight"], DiagonalBlock)
    assert isinstance(blocks["2.weight"], DiagonalBlock)  # 5001 input columns: oversize
    assert isinstance(blocks["3.weight"], BlockDiagonalBlock)
    assert blocks["1.weight"].shape == (3, 2 * 3 * 3 + 1)
    assert all(float(b.base_scale) == 3.0 for b in blocks.values())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"default": "full"}, "default"),
        ({"oversize": "dense"}, "oversize"),
        ({"by_type": {"Linear": "lowrank"}}, "Linear"),
        ({"max_kronecker_side": 0}, "max_kronecker_side"),
        ({"block_size": 0}, "block_size"),
    ],
)
def test_bad_policy_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        StructurePolicy(**kwargs)


def test_adapters_round_trip_canonical_layout() -> None:
    for module in (nn.Linear(3, 2), nn.Linear(3, 2, bias=False), nn.Conv2d(4, 2, 3, groups=2)):
        adapter = adapter_for(module)
        assert adapter is not None
        M = adapter.canonical_weight()
        assert M.shape == adapter.canonical_shape
        parts = adapter.from_canonical(M)
        for name, value in parts.items():
            assert torch.equal(value, getattr(module, name).detach())
    with pytest.raises(TypeError, match="Linear"):
        LinearAdapter(nn.Conv2d(1, 1, 1))
    with pytest.raises(RuntimeError, match="no gradient"):
        adapter_for(nn.Linear(2, 2)).canonical_grad()  # type: ignore[union-attr]


def test_canonical_positions_say_where_each_parameter_entry_lands() -> None:
    modules = (nn.Linear(3, 2), nn.Linear(3, 2, bias=False), nn.Conv2d(4, 2, 3, groups=2))
    for module in modules:
        adapter = adapter_for(module)
        assert adapter is not None
        canonical = adapter.canonical_weight().reshape(-1)
        for name in adapter.parameter_names:
            value = getattr(module, name).detach()
            where = adapter.canonical_positions(name)
            assert where.shape == value.shape
            assert torch.equal(canonical[where], value)


@pytest.mark.parametrize("structure", ["block_diagonal", "kronecker", "diagonal"])
@pytest.mark.parametrize("owned", [False, True])
def test_uninitialised_blocks_are_fully_set_by_their_statistics(
    structure: str, owned: bool
) -> None:
    """``uninitialised=True`` leaves nothing undefined once ``init_from_statistics`` has run."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 9))
    adapters = find_layers(model)
    policy = StructurePolicy(structure, block_size=8)  # type: ignore[arg-type]
    x, g = torch.randn(16, 1, 1, 8), torch.randn(16, 1, 1, 9)
    x[..., -1] = 1.0  # the bias column
    grads = OuterProductGradients(x, g)
    states = []
    for uninitialised in (False, True):
        [block] = build_blocks(adapters, policy=policy, uninitialised=uninitialised).values()
        accumulator = StatisticsAccumulator(type(block).statistics_needed, block_size=8)
        accumulator.update(grads)
        block.init_from_statistics(accumulator.result(release=owned), damping=0.1)
        states.append(block.state_dict())
    assert states[0].keys() == states[1].keys()
    for name, value in states[0].items():
        assert torch.equal(value, states[1][name]), name
