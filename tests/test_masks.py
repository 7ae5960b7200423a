from __future__ import annotations

import pytest
import torch

from lightning_fls.masks import (
    CastMasks,
    apply_masks_,
    full_masks,
    layer_sparsities,
    match_names,
    select_masks,
    sparsity_of,
)


def test_match_names_globs_and_rejects_patterns_matching_nothing() -> None:
    names = ["enc.0.weight", "enc.2.weight", "dec.0.weight"]
    assert match_names(names) == names
    assert match_names(names, include=["enc.*"]) == ["enc.0.weight", "enc.2.weight"]
    assert match_names(names, exclude=["*.2.*"]) == ["enc.0.weight", "dec.0.weight"]
    with pytest.raises(ValueError, match=r"'encoder\.\*'"):
        match_names(names, include=["encoder.*"])
    with pytest.raises(ValueError, match="exclude"):
        match_names(names, exclude=["head.weight"])


def test_global_selection_is_exact_and_prunes_lowest_scores() -> None:
    scores = {"a": torch.tensor([[5.0, 1.0], [3.0, 4.0]]), "b": torch.tensor([0.5, 2.0, 6.0])}
    masks = select_masks(scores, full_masks(scores), 3 / 7)
    assert masks["a"].tolist() == [[True, False], [True, True]]
    assert masks["b"].tolist() == [False, False, True]
    assert sparsity_of(masks) == pytest.approx(3 / 7)


def test_layer_scope_prunes_each_layer_to_the_target() -> None:
    torch.manual_seed(0)
    scores = {"a": torch.rand(10, 10), "b": torch.rand(7)}
    masks = select_masks(scores, full_masks(scores), 0.5, scope="layer")
    assert int((~masks["a"]).sum()) == 50
    assert int((~masks["b"]).sum()) == round(3.5)
    assert set(layer_sparsities(masks)) == {"a", "b"}


def test_masks_are_monotone_and_exact_for_rising_sparsity() -> None:
    torch.manual_seed(0)
    scores = {"a": torch.rand(30, 20), "b": torch.rand(50)}
    masks = full_masks(scores)
    total = 650
    for target in (0.1, 0.35, 0.35, 0.6, 0.9):
        # New scores every time: previously pruned weights must stay pruned regardless.
        scores = {k: torch.rand_like(v) for k, v in scores.items()}
        new = select_masks(scores, masks, target)
        for name in masks:
            assert not bool((new[name] & ~masks[name]).any())  # nothing revived
        assert sum(int((~m).sum()) for m in new.values()) == round(target * total)
        masks = new
    lower = select_masks(scores, masks, 0.2)  # a lower target changes nothing
    assert all(torch.equal(lower[n], masks[n]) for n in masks)


def test_ties_break_by_position_deterministically() -> None:
    scores = {"a": torch.zeros(6)}
    masks = select_masks(scores, full_masks(scores), 0.5)
    assert masks["a"].tolist() == [False, False, False, True, True, True]


def test_max_layer_sparsity_caps_each_layer() -> None:
    scores = {"a": torch.zeros(10), "b": torch.ones(10)}
    masks = select_masks(scores, full_masks(scores), 0.6, max_layer_sparsity=0.8)
    assert int((~masks["a"]).sum()) == 8
    assert int((~masks["b"]).sum()) == 4
    with pytest.raises(ValueError, match="max_layer_sparsity"):
        select_masks(scores, full_masks(scores), 0.9, max_layer_sparsity=0.5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sparsity": 1.0}, "sparsity"),
        ({"sparsity": -0.1}, "sparsity"),
        ({"sparsity": 0.5, "scope": "model"}, "scope"),
        ({"sparsity": 0.5, "max_layer_sparsity": 0.0}, "max_layer_sparsity"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    scores = {"a": torch.rand(4)}
    with pytest.raises(ValueError, match=match):
        select_masks(scores, full_masks(scores), **kwargs)


def test_apply_masks_zeroes_pruned_entries_in_place() -> None:
    param = torch.nn.Parameter(torch.ones(2, 3))
    mask = torch.tensor([[True, False, True], [False, True, True]])
    apply_masks_({"w": param}, {"w": mask})
    assert param.tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]


def _reference_selection(
    scores: list[torch.Tensor], masks: list[torch.Tensor], caps: list[int | None], needed: int
) -> list[torch.Tensor]:
    """Dense reference: a stable sort on (score, layer, position) over every candidate."""
    entries = []  # (is NaN, value, layer, position): NaN sorts last, -0.0 equals 0.0
    for layer, (score, mask, cap) in enumerate(zip(scores, masks, caps, strict=True)):
        values = score.reshape(-1).double()
        alive = [int(i) for i in mask.reshape(-1).nonzero().squeeze(-1)]
        ordered = sorted(
            (bool(values[i].isnan()), 0.0 if values[i].isnan() else float(values[i]), layer, i)
            for i in alive
        )
        room = len(alive) if cap is None else cap - int((~mask).sum())
        entries += ordered[:room]
    entries.sort()
    new = [m.clone() for m in masks]
    for _, _, layer, i in entries[:needed]:
        new[layer].view(-1)[i] = False
    return new


@pytest.mark.parametrize("seed", range(6))
def test_global_selection_matches_a_sorted_reference_with_ties_signs_and_nan(seed: int) -> None:
    """The bisection over order keys picks exactly what a stable global sort picks."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(6, 10), (4, 5), (8, 3)]
    scores, masks = [], []
    for index, shape in enumerate(shapes):
        dtype = torch.float64 if seed % 2 and index == 1 else torch.float32
        values = torch.randint(-3, 4, shape, generator=generator).to(dtype) / 2  # many ties
        values[0, 0] = -0.0
        values[1, 1] = float("nan") if seed % 3 == 0 else float("-inf")
        values[-1, -1] = float("inf")
        scores.append(values)
        masks.append(torch.rand(shape, generator=generator) > 0.2)
    total = sum(m.numel() for m in masks)
    caps: list[int | None] = [None] * 3 if seed < 3 else [int(0.7 * m.numel()) for m in masks]
    for sparsity in (0.3, 0.55):
        needed = round(sparsity * total) - sum(int((~m).sum()) for m in masks)
        new = select_masks(
            {f"l{i}": s for i, s in enumerate(scores)},
            {f"l{i}": m for i, m in enumerate(masks)},
            sparsity,
            max_layer_sparsity=None if caps[0] is None else 0.7,
        )
        expected = _reference_selection(scores, masks, caps, needed)
        for i in range(3):
            assert torch.equal(new[f"l{i}"], expected[i]), (seed, sparsity, i)


def test_cast_masks_follow_every_change_of_the_masks() -> None:
    """The cast mask is reused while the mask is unchanged and made again when it changes."""
    cast = CastMasks()
    weight = torch.ones(3, 4)
    mask = torch.ones(3, 4, dtype=torch.bool)
    cast.apply_({"w": weight}, {"w": mask})
    assert bool((weight == 1).all())  # a mask keeping everything changes nothing
    mask[0, 1] = False  # written in place: the cast follows
    cast.apply_({"w": weight}, {"w": mask})
    assert weight[0, 1] == 0
    assert int((weight == 0).sum()) == 1
    weight.fill_(2.0)  # an optimizer step revives the entry; the cached cast zeroes it again
    cast.apply_({"w": weight}, {"w": mask})
    assert weight[0, 1] == 0
    assert int((weight == 2).sum()) == 11
    other = torch.zeros(3, 4, dtype=torch.bool)  # a new mask tensor
    other[2, 3] = True
    cast.apply_({"w": weight}, {"w": other})
    assert int((weight != 0).sum()) == 1
    double = torch.full((3, 4), 5.0, dtype=torch.float64)  # the parameter changed dtype
    cast.apply_({"w": double}, {"w": other})
    assert double.dtype == torch.float64
    assert double[2, 3] == 5.0
    assert int((double != 0).sum()) == 1
