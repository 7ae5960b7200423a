"""N:M semi-structured sparsity: patterns, capped selection, group OBS, and every method."""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_fls import FLSPruningCallback, prune_one_shot
from lightning_fls.baselines import BlockWoodburyInverse, DiagonalInverse, MFACInverse
from lightning_fls.fishleg import BlockDiagonalBlock, KroneckerBlock
from lightning_fls.masks import full_masks, select_masks
from lightning_fls.obs import (
    choose_group_prunes,
    group_index,
    group_obs_update,
    q_sub_blocks,
)
from lightning_fls.patterns import (
    NMPattern,
    follows_pattern,
    parse_pattern,
    pruned_per_group,
)
from lightning_fls.sparsegpt import InputHessian
from tests.callback_models import TinyClassifier
from tests.helpers import DenseCurvature, random_spd, trainer

F64 = torch.float64
METHODS = ["fls", "kfac", "obert", "mfac", "diag_fisher", "sparsegpt", "magnitude"]


def test_parse_pattern() -> None:
    assert parse_pattern("2:4") == NMPattern(2, 4)
    assert parse_pattern(" 4 : 8 ").sparsity == 0.5
    assert parse_pattern(None) is None
    for bad in ("2-4", "4:4", "0:4", "2:64", "x", 2):
        with pytest.raises(ValueError, match="pattern"):
            parse_pattern(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("pattern", [NMPattern(2, 4), NMPattern(1, 4), NMPattern(4, 8)])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_capped_selection_is_exact_and_fills_every_group(pattern: NMPattern, scope: str) -> None:
    torch.manual_seed(0)
    saliency = {"a": torch.rand(6, 16), "b": torch.rand(4, 3, 2, 4), "c": torch.rand(32)}
    masks = full_masks(saliency)
    total = sum(m.numel() for m in masks.values())
    for sparsity in (0.3 * pattern.sparsity, 0.7 * pattern.sparsity, pattern.sparsity):
        new = select_masks(saliency, masks, sparsity, scope=scope, pattern=pattern)  # type: ignore[arg-type]
        for name, mask in new.items():
            assert bool((mask <= masks[name]).all()), "never revives"
            assert int(pruned_per_group(mask, pattern).max()) <= pattern.n
        pruned = sum(int((~m).sum()) for m in new.values())
        if scope == "global":
            assert pruned == round(sparsity * total)
        masks = new
    for mask in masks.values():  # at n/m: exactly n in every group
        assert bool((pruned_per_group(mask, pattern) == pattern.n).all())
        assert follows_pattern(mask, pattern)


def test_capped_selection_takes_the_lowest_allowed() -> None:
    saliency = {"w": torch.tensor([[0.1, 0.2, 0.3, 5.0, 4.0, 6.0, 7.0, 8.0]])}
    masks = select_masks(saliency, full_masks(saliency), 0.25, pattern=NMPattern(2, 4))
    # the third-lowest (0.3) is in a full group: the next allowed one (4.0) goes instead
    assert masks["w"].tolist() == [[False, False, True, True, True, True, True, True]]
    masks = select_masks(saliency, full_masks(saliency), 0.375, pattern=NMPattern(2, 4))
    assert masks["w"].tolist() == [[False, False, True, True, False, True, True, True]]


def test_pattern_errors_name_the_layer_and_the_limit() -> None:
    saliency = {"odd": torch.rand(3, 6)}
    with pytest.raises(ValueError, match=r"multiple of 4, but `odd`"):
        select_masks(saliency, full_masks(saliency), 0.5, pattern=NMPattern(2, 4))
    saliency = {"w": torch.rand(3, 8)}
    with pytest.raises(ValueError, match="above what pattern 2:4 allows"):
        select_masks(saliency, full_masks(saliency), 0.6, pattern=NMPattern(2, 4))


def test_group_obs_matches_the_dense_formula() -> None:
    """δ = −Q Σ_g E_Pg (Q_PgPg)⁻¹ w_Pg, and the exact joint optimum when Q has group blocks."""
    torch.manual_seed(1)
    shape = (3, 9)  # 8 weight columns + a bias column
    n = shape[0] * shape[1]
    Q = random_spd(n)
    curvature = DenseCurvature(Q, shape)
    w = torch.randn(shape, dtype=F64)
    index = group_index(shape, 8, 4)
    assert index.tolist()[:3] == [[0, 1, 2, 3], [4, 5, 6, 7], [9, 10, 11, 12]]
    pruned = torch.zeros(index.shape, dtype=torch.bool)
    for g in range(index.shape[0]):
        pruned[g, torch.randperm(4)[:2]] = True
    keep = torch.ones(n, dtype=torch.bool)
    keep[index[pruned]] = False
    keep = keep.reshape(shape)
    update = group_obs_update(w, curvature, index, pruned, keep)
    V = torch.zeros(n, dtype=F64)
    predicted = 0.0
    for g in range(index.shape[0]):
        P = index[g][pruned[g]]
        x = torch.linalg.solve(Q[P][:, P], w.reshape(-1)[P])
        V[P] += x
        predicted += 0.5 * float(w.reshape(-1)[P] @ x)
    expected = (w.reshape(-1) - Q @ V).reshape(shape) * keep
    torch.testing.assert_close(update.weight, expected)
    assert update.predicted_increase == pytest.approx(predicted)
    # With Q block-diagonal over the groups the group form is the exact joint OBS optimum.
    Qb = torch.zeros(n, n, dtype=F64)
    for members in [*index.tolist(), [8], [17], [26]]:
        Qb[torch.tensor(members).unsqueeze(-1), torch.tensor(members)] = random_spd(len(members))
    H = torch.linalg.inv(Qb)
    update = group_obs_update(w, DenseCurvature(Qb, shape), index, pruned, keep)
    P = ~keep.reshape(-1)
    free = ~P
    optimum = w.reshape(-1).clone()
    optimum[P] = 0
    optimum[free] += torch.linalg.solve(H[free][:, free], H[free][:, P] @ w.reshape(-1)[P])
    torch.testing.assert_close(update.weight.reshape(-1), optimum)
    delta = optimum - w.reshape(-1)
    assert update.predicted_increase == pytest.approx(0.5 * float(delta @ H @ delta))


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (3, 8)])
def test_group_choice_is_the_least_joint_cost(n: int, m: int) -> None:
    torch.manual_seed(2)
    G = 20
    w = torch.randn(G, m, dtype=F64)
    Q = torch.stack([random_spd(m) for _ in range(G)])
    pruned = torch.zeros(G, m, dtype=torch.bool)
    pruned[::3, 0] = True  # some groups already hold a pruned entry
    w[pruned] = 0
    chosen = choose_group_prunes(w, pruned, Q, n)
    for g in range(G):
        best, best_set = math.inf, None
        for subset in itertools.combinations(range(m), n):
            S = list(subset)
            if not set(pruned[g].nonzero().flatten().tolist()) <= set(S):
                continue
            cost = 0.5 * float(w[g, S] @ torch.linalg.solve(Q[g][S][:, S], w[g, S]))
            if cost < best - 1e-12:
                best, best_set = cost, S
        assert sorted(chosen[g].nonzero().flatten().tolist()) == best_set


def _dense_q(estimate: object, shape: tuple[int, int]) -> torch.Tensor:
    n = shape[0] * shape[1]
    basis = torch.eye(n, dtype=F64).reshape(n, *shape)
    with torch.no_grad():
        return torch.stack([estimate.qv(e.to(torch.float32)).reshape(-1) for e in basis]).T.to(F64)  # type: ignore[attr-defined]


def _estimates(shape: tuple[int, int]) -> dict[str, object]:
    torch.manual_seed(3)
    grads = torch.randn(6, *shape)
    kron = KroneckerBlock(shape, init_scale=1.0)
    block = BlockDiagonalBlock(shape, block_size=5, init_scale=1.0)
    with torch.no_grad():
        for p in [*kron.parameters(), *block.parameters()]:
            p.add_(0.2 * torch.randn_like(p))
    woodbury = BlockWoodburyInverse(shape, num_gradients=6, damping=0.1, block_size=7)
    woodbury.update(grads)
    x = torch.randn(40, shape[1], dtype=F64)
    return {
        "kronecker": kron,
        "block_diagonal": block,
        "woodbury": woodbury,
        "mfac": MFACInverse(grads, damping=0.1, block_size=7),
        "diagonal": DiagonalInverse(grads.square().mean(0), 0.1),
        "input_hessian": InputHessian(x.T @ x, shape),
    }


@pytest.mark.parametrize(
    "name", ["kronecker", "block_diagonal", "woodbury", "mfac", "diagonal", "input_hessian"]
)
def test_group_sub_blocks_match_the_dense_matrix(name: str) -> None:
    shape = (3, 9)
    estimate = _estimates(shape)[name]
    dense = _dense_q(estimate, shape)
    index = group_index(shape, 8, 4)
    with torch.no_grad():
        got = q_sub_blocks(estimate, index).to(F64)  # type: ignore[arg-type]
    expected = dense[index.unsqueeze(-1), index.unsqueeze(-2)]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


class ConvAttention(nn.Module):
    """A Conv2d, a self-attention layer and an MLP: every kind of grouped layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 2)  # rows of 1·2·2 = 4
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).flatten(2).transpose(1, 2)  # [B, 9, 8]
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.out(torch.relu(self.fc(h)).mean(1))


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(4)
    x = torch.randn(256, 1, 4, 4)
    y = (x.flatten(1) @ torch.randn(16, 3)).argmax(1)
    model = ConvAttention()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), [(x[i : i + 64], y[i : i + 64]) for i in range(0, 256, 64)]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pattern", ["2:4", "1:4"])
def test_every_method_prunes_to_an_exact_pattern(trained, method: str, pattern: str) -> None:
    model, loader = copy.deepcopy(trained[0]), trained[1]
    nm = parse_pattern(pattern)
    assert nm is not None
    report = prune_one_shot(
        model,
        loader,
        F.cross_entropy,
        sparsity=nm.sparsity,
        method=method,  # type: ignore[arg-type]
        pattern=pattern,
        steps=3 if method not in ("magnitude", "sparsegpt") else None,
        samples_per_step=128,
        include=["*.weight", "attn.in_proj_weight"],
        progress=False,
    )
    params = dict(model.named_parameters())
    for name in ("conv.weight", "attn.in_proj_weight", "attn.out_proj.weight", "fc.weight"):
        counts = pruned_per_group(params[name].detach() != 0, nm)
        assert bool((counts == nm.n).all()), f"{method}: {name} does not follow {pattern}"
    assert report.sparsity == pytest.approx(nm.sparsity)
    with torch.no_grad():
        loss = float(F.cross_entropy(model(torch.cat([x for x, _ in loader])),
                                     torch.cat([y for _, y in loader])))  # fmt: skip
    assert math.isfinite(loss)


def test_group_obs_beats_magnitude_at_2_4(trained) -> None:
    x = torch.cat([b[0] for b in trained[1]])
    y = torch.cat([b[1] for b in trained[1]])
    losses = {}
    for method in ("fls", "magnitude"):
        model = copy.deepcopy(trained[0])
        prune_one_shot(model, trained[1], F.cross_entropy, sparsity=0.5, method=method,
                       pattern="2:4", samples_per_step=256, progress=False)  # fmt: skip
        with torch.no_grad():
            losses[method] = float(F.cross_entropy(model(x), y))
    assert losses["fls"] < losses["magnitude"]


def test_pattern_arguments_are_refused_clearly(trained) -> None:
    model, loader = copy.deepcopy(trained[0]), trained[1]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"pattern.*2:4.*above"):
        prune_one_shot(model, loader, F.cross_entropy, sparsity=0.7, pattern="2:4")
    with pytest.raises(ValueError, match="pattern"):
        prune_one_shot(model, loader, F.cross_entropy, sparsity=0.5, pattern="2of4")
    with pytest.raises(ValueError, match=r"multiple of 8, but `conv.weight`"):
        prune_one_shot(model, loader, F.cross_entropy, sparsity=0.5, pattern="4:8",
                       include=["conv.weight"])  # fmt: skip
    with pytest.raises(ValueError, match="scope='layer'"):
        prune_one_shot(model, loader, F.cross_entropy, sparsity=0.5, method="sparsegpt",
                       scope="global")  # fmt: skip
    with pytest.raises(ValueError, match="pattern"):
        FLSPruningCallback(target_sparsity=0.75, pattern="2:4")
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_sparsegpt_refuses_layers_without_a_shared_input() -> None:
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Flatten(), nn.Linear(32, 2))
    x, y = torch.randn(16, 4, 4, 4), torch.randint(0, 2, (16,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"sparsegpt.*`0.weight`.*exclude"):
        prune_one_shot(model, [(x, y)], F.cross_entropy, sparsity=0.5, method="sparsegpt",
                       progress=False)  # fmt: skip
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_attention_with_bias_kv_is_refused_by_name() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, add_bias_kv=True, batch_first=True)
            self.head = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.attn(x, x, x)[0].mean(1))

    x, y = torch.randn(8, 3, 8), torch.randint(0, 2, (8,))
    with pytest.raises(ValueError, match=r"`attn.in_proj_weight`.*add_bias_kv.*exclude"):
        prune_one_shot(Net(), [(x, y)], F.cross_entropy, sparsity=0.5, include=["attn.*"],
                       progress=False)  # fmt: skip


@pytest.mark.parametrize("method", METHODS)
def test_callback_reaches_2_4_gradually(tmp_path: Path, method: str) -> None:
    torch.manual_seed(0)
    model = TinyClassifier()
    pruning = FLSPruningCallback(pattern="2:4", method=method, start_epoch=0, end_epoch=3,
                                 aux_every_n_steps=1, verbose=False)  # fmt: skip
    assert pruning.target_sparsity == 0.5
    trainer(tmp_path, [pruning], 4).fit(model)
    nm = NMPattern(2, 4)
    assert [record["epoch"] for record in pruning.history] == [1.0, 2.0, 3.0]
    for i, record in enumerate(pruning.history):
        assert record["fls/sparsity"] <= 0.5 + 1e-9
        if i < len(pruning.history) - 1:
            assert record["fls/sparsity"] < 0.5
    for layer in (model.net[0], model.net[2]):
        counts = pruned_per_group(layer.weight.detach() != 0, nm)
        assert bool((counts == 2).all())


@pytest.mark.parametrize("attention", ["mha", "linear"])
def test_transformer_defaults_to_the_layers_inside_its_blocks(attention: str) -> None:
    from lightning_fls import prunable_layers
    from lightning_fls.models import PatchTransformer

    model = PatchTransformer(attention=attention)  # type: ignore[arg-type]
    attn = (
        ["attn.in_proj_weight", "attn.out_proj.weight"]
        if attention == "mha"
        else [f"attn.{p}_proj.weight" for p in "qkvo"]
    )
    expected = [f"blocks.{i}.{name}" for i in range(2)
                for name in [*attn, "mlp.fc1.weight", "mlp.fc2.weight"]]  # fmt: skip
    assert list(prunable_layers(model, None, None)) == expected
    # An exclude may name a layer outside the default set; include reaches the head and,
    # by exact name, a norm.
    first_block = expected[: len(expected) // 2]
    assert list(prunable_layers(model, None, ["head.weight", "blocks.1.*"])) == first_block
    chosen = prunable_layers(model, ["head.weight", "norm.weight", "blocks.0.mlp.*"], None)
    assert list(chosen) == ["blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight", "norm.weight",
                            "head.weight"]  # fmt: skip
    with pytest.raises(ValueError, match="matches no prunable"):
        prunable_layers(model, ["norm.*"], None)  # norms only by exact name


def test_a_norm_included_by_name_is_pruned(trained) -> None:
    class Normed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 8)
            self.norm = nn.LayerNorm(8)
            self.out = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.norm(self.fc(x.flatten(1))))

    loader = trained[1]
    model = Normed()
    report = prune_one_shot(model, loader, F.cross_entropy, sparsity=0.5, scope="layer",
                            include=["fc.weight", "norm.weight"], progress=False)  # fmt: skip
    assert set(report.layer_sparsity) == {"fc.weight", "norm.weight"}
    assert int((model.norm.weight == 0).sum()) == 4


def test_an_embedding_included_by_name_is_pruned() -> None:
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.emb(x)
            return self.head(self.attn(h, h, h, need_weights=False)[0].mean(1))

    torch.manual_seed(5)
    x, y = torch.randint(0, 20, (64, 5)), torch.randint(0, 3, (64,))
    model = Tokens()
    report = prune_one_shot(model, [(x, y)], F.cross_entropy, sparsity=0.5, scope="layer",
                            include=["emb.weight", "attn.*"], progress=False)  # fmt: skip
    assert report.layer_sparsity == {
        "emb.weight": 0.5,
        "attn.in_proj_weight": 0.5,
        "attn.out_proj.weight": 0.5,
    }
    assert int((model.emb.weight == 0).sum()) == 80
