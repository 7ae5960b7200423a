"""Structured OBS (``granularity=``): group saliencies against dense references, end to end.

Every unit's saliency ``½ w_Sᵀ ([Q]_SS)⁻¹ w_S`` is checked against the explicit matrix of a
block-diagonal Q on small sizes (blocks that straddle rows, units that share blocks), and
``prune_one_shot(granularity=...)`` is checked to remove exactly whole units, correct the
survivors, and give a model that :func:`~lightning_fls.compact` shrinks without changing it.
"""

from __future__ import annotations

import copy
import csv
import functools
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn

from lightning_fls import (
    BlockDiagonalBlock,
    FLSPruningCallback,
    compact,
    find_groups,
    prune_one_shot,
)
from lightning_fls.fishleg.diagonal import DiagonalBlock
from lightning_fls.fishleg.kronecker import KroneckerBlock
from lightning_fls.layers import prunable_layers
from lightning_fls.methods._fishleg import frozen_block
from lightning_fls.obs import joint_kronecker_obs_update
from lightning_fls.structured.saliency import (
    _kronecker_saliencies,
    unit_layouts,
    unit_saliencies,
)
from tests.callback_models import TinyClassifier
from tests.helpers import trainer


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))


def _random_block(shape: tuple[int, int], block_size: int, seed: int) -> BlockDiagonalBlock:
    generator = torch.Generator().manual_seed(seed)
    block = BlockDiagonalBlock(shape, block_size=block_size, dtype=torch.float64)
    with torch.no_grad():
        block.factors.copy_(
            torch.randn(block.factors.shape, generator=generator, dtype=torch.float64)
        )
        block.base_scale.fill_(0.7)
    return block


def _dense_q(block: BlockDiagonalBlock) -> Tensor:
    matrices, _size = block.block_matrices()
    n = block.shape[0] * block.shape[1]
    return torch.block_diag(*matrices.detach())[:n, :n]


@pytest.mark.parametrize("block_size", [5, 8, 50])
def test_unit_saliency_equals_the_dense_group_formula(block_size: int) -> None:
    """Producer rows (with bias) and consumer columns, blocks straddling rows and shared."""
    model = _mlp()
    layers = prunable_layers(model)
    families = find_groups(model, "neuron")
    layouts, skipped = unit_layouts(model, layers, families)
    assert [layout.family.name for layout in layouts] == ["0", "2"]
    assert not skipped
    curvature, dense, weights = {}, {}, {}
    for seed, (key, adapter) in enumerate(layers.items()):
        block = _random_block(adapter.canonical_shape, block_size, seed)
        curvature[key] = frozen_block(block)
        dense[key] = _dense_q(block)
        weights[key] = adapter.canonical_weight().double()
    for layout in layouts:
        got = unit_saliencies(layout, weights, curvature)
        expected = torch.zeros(layout.units, dtype=torch.float64)
        for key, positions in layout.positions.items():
            w = weights[key].reshape(-1)
            for u in range(layout.units):
                S = positions[u]
                Q_SS = dense[key][S][:, S]
                expected[u] += 0.5 * w[S] @ torch.linalg.solve(Q_SS, w[S])
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_kronecker_unit_saliency_equals_the_dense_group_formula() -> None:
    """Whole rows (one or two per unit) and whole columns, against ``c · kron(G_o, G_i)``."""
    model = _mlp()
    layers = prunable_layers(model)
    layouts, _ = unit_layouts(model, layers, find_groups(model, "neuron"))
    generator = torch.Generator().manual_seed(3)
    curvature, dense, weights = {}, {}, {}
    for key, adapter in layers.items():
        block = KroneckerBlock(adapter.canonical_shape, dtype=torch.float64)
        with torch.no_grad():
            for factor in (block.out_factor, block.in_factor):
                factor.add_(
                    0.3 * torch.randn(factor.shape, generator=generator, dtype=torch.float64)
                )
            block.base_scale.fill_(0.8)
        frozen = frozen_block(block)
        G_o, G_i, c = frozen.kronecker_factors()  # type: ignore[attr-defined]
        curvature[key], dense[key] = frozen, c * torch.kron(G_o, G_i)
        weights[key] = adapter.canonical_weight().double()

    def dense_cost(key: str, positions: torch.Tensor) -> torch.Tensor:
        w = weights[key].reshape(-1)
        return torch.stack(
            [0.5 * w[S] @ torch.linalg.solve(dense[key][S][:, S], w[S]) for S in positions]
        )

    for layout in layouts:  # "0": rows of 0.weight and columns of 2.weight; "2": likewise
        got = unit_saliencies(layout, weights, curvature)
        expected = sum(dense_cost(k, p) for k, p in layout.positions.items())
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-12)
    # Two rows per unit (as a head's q/k/v rows), and units that are not whole rows or columns.
    pairs = layouts[0].positions["0.weight"].reshape(3, -1)
    G_o, G_i, c = curvature["0.weight"].kronecker_factors()  # type: ignore[attr-defined]
    got = _kronecker_saliencies(weights["0.weight"], G_o, G_i, c, pairs)
    torch.testing.assert_close(got, dense_cost("0.weight", pairs), rtol=1e-8, atol=1e-12)
    assert _kronecker_saliencies(weights["0.weight"], G_o, G_i, c, pairs[:, :5]) is None


def test_frozen_kronecker_gram_matrices_are_reused_until_a_factor_changes() -> None:
    block = KroneckerBlock((4, 3), dtype=torch.float64)
    frozen = frozen_block(block)
    G_o, G_i, _ = frozen.kronecker_factors()  # type: ignore[attr-defined]
    again = frozen.kronecker_factors()  # type: ignore[attr-defined]
    assert again[0] is G_o
    assert again[1] is G_i
    with torch.no_grad():
        block.out_factor.mul_(2.0)
    G_o2, G_i2, _ = frozen.kronecker_factors()  # type: ignore[attr-defined]
    torch.testing.assert_close(G_o2, block.out_factor @ block.out_factor.T)
    torch.testing.assert_close(G_o2, 4.0 * G_o)
    torch.testing.assert_close(G_i2, block.in_factor @ block.in_factor.T)
    frozen.release_cache()
    G_o3, G_i3, _ = frozen.kronecker_factors()  # type: ignore[attr-defined]
    assert G_o3 is not G_o2
    assert G_i3 is not G_i2
    torch.testing.assert_close(G_o3, G_o2, rtol=0, atol=0)
    torch.testing.assert_close(G_i3, G_i2, rtol=0, atol=0)


@pytest.mark.parametrize("axis", ["rows", "columns"])
def test_joint_kronecker_update_equals_the_dense_group_formula(axis: str) -> None:
    generator = torch.Generator().manual_seed(3)

    def spd(n: int) -> Tensor:
        a = torch.randn(n, n, generator=generator, dtype=torch.float64)
        return a @ a.T + n * torch.eye(n, dtype=torch.float64)

    d_out, d_in, scale = 5, 4, 0.7
    out_gram, in_gram = spd(d_out), spd(d_in)
    weight = torch.randn(d_out, d_in, generator=generator, dtype=torch.float64)
    keep = torch.ones(d_out, d_in, dtype=torch.bool)
    if axis == "rows":
        keep[[1, 3]] = False
        weight[3] = 0.0  # removed at an earlier point: it must stay zero
    else:
        keep[:, [0, 2]] = False
    update = joint_kronecker_obs_update(weight, (out_gram, in_gram, scale), keep)
    assert update is not None
    Q = scale * torch.kron(out_gram, in_gram)  # Q·vec(V) = c·vec(G_o V G_i), row-major
    S = (~keep).reshape(-1).nonzero().squeeze(1)
    w = weight.reshape(-1)
    x = torch.linalg.solve(Q[S][:, S], w[S])
    torch.testing.assert_close(update.weight.reshape(-1), w - Q[:, S] @ x)
    assert bool((update.weight[~keep] == 0).all())
    assert update.predicted_increase == pytest.approx(0.5 * float(w[S] @ x))
    # Rows and columns at once are no Kronecker-shaped set: the caller falls back.
    mixed = keep.clone()
    mixed[:, 1] = False
    mixed[0] = False
    assert joint_kronecker_obs_update(weight, (out_gram, in_gram, scale), mixed) is None


def test_unit_positions_are_the_rows_bias_and_consumer_columns() -> None:
    model = _mlp()
    layers = prunable_layers(model)
    layouts, _ = unit_layouts(model, layers, find_groups(model, "neuron"))
    first = layouts[0]  # "0": 6 neurons; canonical [6, 8] of layer 0, [4, 7] of layer 2
    rows = first.positions["0.weight"]
    assert torch.equal(rows[2], torch.arange(2 * 8, 3 * 8))  # row 2: 7 weights and the bias
    columns = first.positions["2.weight"]
    assert torch.equal(columns[2], torch.arange(4) * 7 + 2)


def test_diagonal_estimates_use_the_sum_of_single_saliencies() -> None:
    model = _mlp()
    layers = prunable_layers(model)
    layouts, _ = unit_layouts(model, layers, find_groups(model, "neuron"))
    curvature, weights = {}, {}
    for key, adapter in layers.items():
        block = DiagonalBlock(adapter.canonical_shape, dtype=torch.float64)
        with torch.no_grad():
            block.scale.copy_(torch.rand(block.scale.shape, dtype=torch.float64) + 0.5)
        curvature[key] = frozen_block(block)
        weights[key] = adapter.canonical_weight().double()
    got = unit_saliencies(layouts[1], weights, curvature)
    expected = torch.zeros(layouts[1].units, dtype=torch.float64)
    for key, positions in layouts[1].positions.items():
        w, q = weights[key].reshape(-1), curvature[key].diag_q().reshape(-1)
        expected += (w[positions] ** 2 / (2 * q[positions])).sum(1)
    torch.testing.assert_close(got, expected)


def _trained_classifier() -> tuple[nn.Sequential, list[tuple[Tensor, Tensor]]]:
    model, batches = _train_classifier()
    return copy.deepcopy(model), batches


@functools.cache
def _train_classifier() -> tuple[nn.Sequential, list[tuple[Tensor, Tensor]]]:
    torch.manual_seed(0)
    X = torch.randn(384, 12)
    y = (X @ torch.randn(12, 3)).argmax(1)
    model = nn.Sequential(
        nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 3)
    )
    optimiser = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(150):
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        optimiser.step()
    return model, [(X[i : i + 64], y[i : i + 64]) for i in range(0, 384, 64)]


def _loss(model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> float:
    with torch.no_grad():
        return sum(float(nn.functional.cross_entropy(model(x), t)) for x, t in batches) / len(
            batches
        )


@pytest.mark.parametrize("method", ["fls", "kfac", "diag_fisher", "magnitude"])
def test_neuron_pruning_removes_whole_units_and_compacts_exactly(method: str) -> None:
    model, batches = _trained_classifier()
    report = prune_one_shot(
        model, batches, nn.functional.cross_entropy, sparsity=0.5, method=method,
        granularity="neuron", steps=2, progress=False,
    )  # fmt: skip
    assert report.granularity == "neuron"
    assert report.units_removed == pytest.approx(28 / 56)
    first, second, last = model[0], model[2], model[4]
    gone_1 = (first.weight == 0).all(1) & (first.bias == 0)
    gone_2 = (second.weight == 0).all(1) & (second.bias == 0)
    assert int(gone_1.sum()) + int(gone_2.sum()) == 28
    assert gone_1.sum() < 32
    assert gone_2.sum() < 24
    assert bool((second.weight[:, gone_1] == 0).all())
    assert bool((last.weight[:, gone_2] == 0).all())
    small = compact(model)
    assert small[0].out_features == 32 - int(gone_1.sum())
    assert small[2].out_features == 24 - int(gone_2.sum())
    x = batches[0][0]
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=1e-5)


def test_fls_structured_keeps_more_of_the_loss_than_group_magnitude() -> None:
    model, batches = _trained_classifier()
    losses = {}
    for method in ("fls", "magnitude"):
        pruned = copy.deepcopy(model)
        prune_one_shot(pruned, batches, nn.functional.cross_entropy, sparsity=0.5, method=method,
                       granularity="neuron", steps=2, progress=False)  # fmt: skip
        losses[method] = _loss(pruned, batches)
    assert losses["fls"] < losses["magnitude"]


def test_channel_pruning_of_a_cnn_compacts_to_the_same_outputs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(), nn.Flatten(),
        nn.Linear(12 * 4 * 4, 5),
    )  # fmt: skip
    model.eval()
    x = torch.randn(64, 3, 8, 8)
    batches = [(x[i : i + 16], torch.randint(0, 5, (16,))) for i in range(0, 64, 16)]
    report = prune_one_shot(model, batches, nn.functional.cross_entropy, sparsity=0.5,
                            granularity="channel", steps=1, progress=False)  # fmt: skip
    assert report.units_removed == pytest.approx(10 / 20)
    small = compact(model, x[:2])
    assert small[0].out_channels + small[4].out_channels == 10
    assert small[8].in_features == small[4].out_channels * 16
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"granularity": "row"}, "granularity"),
        ({"granularity": "neuron", "pattern": "2:4"}, "pattern"),
        ({"granularity": "neuron", "scope": "layer"}, "scope='global'"),
        ({"granularity": "neuron", "method": "sparsegpt"}, "cannot remove whole units"),
        ({"granularity": "neuron", "memory_budget_mb": 600}, "memory_budget_mb"),
        ({"granularity": "channel"}, "found no channels"),
        ({"granularity": "neuron", "sparsity": 0.99}, "would empty a layer: at most 54 of the 56"),
        (
            {"granularity": "neuron", "max_layer_sparsity": 0.25},
            "at most 14 of the 56 units can be removed",
        ),
    ],
)
def test_bad_granularity_input_is_refused_with_the_model_unchanged(
    kwargs: dict[str, object], match: str
) -> None:
    model, batches = _trained_classifier()
    before = copy.deepcopy(model.state_dict())
    kwargs = {"sparsity": 0.5, **kwargs}
    with pytest.raises(ValueError, match=match):
        prune_one_shot(model, batches, nn.functional.cross_entropy,
                       progress=False, **kwargs)  # type: ignore[arg-type]  # fmt: skip
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])


@pytest.mark.parametrize("granularity", ["neuron", "head"])
def test_hugging_face_bert_units_pruned_one_shot_and_compacted(
    granularity: str, tmp_path: Path
) -> None:
    transformers = pytest.importorskip("transformers")
    from tests.test_huggingface import bert_batches, tiny_bert

    model = tiny_bert()
    batches = bert_batches()
    report = prune_one_shot(model, batches, sparsity=0.5, granularity=granularity, steps=1,
                            samples_per_step=16, progress=False)  # fmt: skip
    assert report.units_removed == pytest.approx(0.5)
    small = compact(model)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    inputs = {k: v for k, v in batches[0].items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(
            small(**inputs).logits, model(**inputs).logits, atol=1e-5, rtol=1e-5
        )
    assert isinstance(small, transformers.BertForSequenceClassification)
    # The documented way through save_pretrained: save the masked model, compact the reloaded one.
    model.save_pretrained(tmp_path / "masked")
    reloaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "masked")
    again = compact(reloaded.eval())
    assert again.state_dict().keys() == small.state_dict().keys()
    for key, value in small.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, small(**inputs).logits)


def test_transformer_encoder_heads_pruned_one_shot_and_compacted() -> None:
    from tests.test_structured import make_encoder

    torch.manual_seed(0)
    model = make_encoder().eval()
    x = torch.randn(32, 5, 8)

    def loss_fn(out: Tensor, target: Tensor) -> Tensor:
        return (out - target).square().mean()

    batches = [(x[i : i + 8], torch.randn(8, 5, 8)) for i in range(0, 32, 8)]
    report = prune_one_shot(model, batches, loss_fn, sparsity=0.5, granularity="head",
                            steps=1, progress=False)  # fmt: skip
    assert report.units_removed == pytest.approx(0.5)
    small = compact(model)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:An OBS step of method='fls' raised the calibration loss")
def test_patch_transformer_self_attention_heads_pruned_one_shot_and_compacted() -> None:
    from lightning_fls.models import PatchTransformer

    torch.manual_seed(0)
    model = PatchTransformer(d_model=16, num_heads=4, depth=2, mlp_dim=16, attention="linear")
    model.eval()
    x, y = torch.rand(32, 784), torch.randint(0, 10, (32,))
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)]
    report = prune_one_shot(model, batches, model.loss, sparsity=0.5, granularity="head",
                            steps=2, samples_per_step=16, progress=False)  # fmt: skip
    assert report.units_removed == pytest.approx(0.5)
    small = compact(model, x)
    assert sum(block.attn.num_heads for block in small.blocks) == 4  # 4 of 8 heads kept
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=1e-5)


# --- the callback ----------------------------------------------------------------------------


def _structured_run(
    tmp_path: Path,
    max_epochs: int,
    ckpt_path: str | None = None,
    save: bool = False,
    logger: CSVLogger | None = None,
    **options: object,
) -> tuple[TinyClassifier, FLSPruningCallback]:
    torch.manual_seed(0)
    model = TinyClassifier(optimizer="adam")
    settings: dict[str, object] = {
        "target_sparsity": 0.5, "start_epoch": 0, "end_epoch": 3, "aux_every_n_steps": 2,
        "granularity": "neuron", "verbose": False,
    }  # fmt: skip
    pruning = FLSPruningCallback(**(settings | options))  # type: ignore[arg-type]
    callbacks: list[pl.Callback] = [pruning]
    if save:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1,
                                         save_top_k=-1))  # fmt: skip
    run = trainer(
        tmp_path, callbacks, max_epochs, enable_checkpointing=save, logger=logger or False
    )
    run.fit(model, ckpt_path=ckpt_path)
    return model, pruning


def test_callback_removes_neurons_gradually_and_keeps_them_removed(tmp_path: Path) -> None:
    model, pruning = _structured_run(tmp_path, max_epochs=5)
    removed = [h["fls/units_removed"] for h in pruning.history]
    assert removed == sorted(removed)
    assert removed[-1] == pytest.approx(0.5)
    hidden, output = model.net[0], model.net[2]
    gone = (hidden.weight == 0).all(1) & (hidden.bias == 0)
    assert int(gone.sum()) == 12  # half of 24, after 2 epochs of Adam on the survivors
    assert bool((output.weight[:, gone] == 0).all())
    small = compact(model.net)
    assert small[0].out_features == 12
    x = model.data.tensors[0][:16]
    with torch.no_grad():
        torch.testing.assert_close(small(x), model.net(x))


def test_callback_resumes_structured_pruning_from_a_checkpoint(tmp_path: Path) -> None:
    straight, _ = _structured_run(tmp_path / "a", max_epochs=4)
    _structured_run(tmp_path, max_epochs=2, save=True)
    [checkpoint] = list((tmp_path / "ckpt").glob("epoch=1*.ckpt"))
    resumed, _ = _structured_run(tmp_path / "b", max_epochs=4, ckpt_path=str(checkpoint))
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_callback_compacts_the_module_in_place_at_the_end(tmp_path: Path) -> None:
    masked, _ = _structured_run(tmp_path / "a", max_epochs=5)
    logger = CSVLogger(tmp_path / "logs", name="", version="")
    model, pruning = _structured_run(
        tmp_path / "b", max_epochs=5, logger=logger, compact_on_train_end=True
    )
    expected = compact(masked.net)
    assert [type(m) for m in model.net] == [type(m) for m in expected]
    assert model.net[0].out_features == 12
    assert model.net[2].in_features == 12
    for key, value in expected.state_dict().items():
        assert torch.equal(value, model.net.state_dict()[key]), key
    x = masked.data.tensors[0][:16]
    with torch.no_grad():
        torch.testing.assert_close(model.net(x), masked.net(x))
    before = sum(p.numel() for p in masked.parameters())
    after = sum(p.numel() for p in model.parameters())
    assert after < before
    with (tmp_path / "logs" / "metrics.csv").open() as file:
        rows = [row for row in csv.DictReader(file) if row.get("fls/params")]
    assert [float(rows[-1]["fls/params"])] == [after]
    assert float(rows[-1]["fls/params_fraction"]) == pytest.approx(after / before)
    run = trainer(tmp_path / "c", [pruning], max_epochs=1)
    with pytest.raises(ValueError, match="compacted its model"):
        run.fit(model)


def test_compact_on_train_end_without_removed_units_warns_and_keeps_the_model(
    tmp_path: Path,
) -> None:
    with pytest.warns(UserWarning, match="found no removed unit"):
        model, _ = _structured_run(
            tmp_path, max_epochs=1, start_epoch=2, end_epoch=4, compact_on_train_end=True
        )
    assert model.net[0].out_features == 24


def test_compact_on_train_end_needs_a_granularity() -> None:
    with pytest.raises(ValueError, match=r"compact_on_train_end=True.*granularity"):
        FLSPruningCallback(compact_on_train_end=True)


def test_callback_refuses_granularity_with_a_pattern() -> None:
    with pytest.raises(ValueError, match="`pattern` does not apply"):
        FLSPruningCallback(pattern="2:4", granularity="neuron")
    with pytest.raises(ValueError, match="granularity"):
        FLSPruningCallback(granularity="rows")
