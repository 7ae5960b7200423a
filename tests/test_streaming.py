"""Streamed statistics: one batch of per-example records at a time, the same pruning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_fls import prune_one_shot
from lightning_fls.baselines import BlockWoodburyInverse, MFACInverse
from lightning_fls.batches import Batch
from lightning_fls.calibration import GradientCollector, GradientStream, StepData
from lightning_fls.engine import PruningEngine
from lightning_fls.fishleg import relative_damping
from lightning_fls.layers import prunable_layers
from lightning_fls.methods import FLS, KFAC, MFAC, DiagFisher, OBert
from lightning_fls.methods._fishleg import LayerStatisticsStream
from lightning_fls.methods._gradients import minibatch_gradients
from lightning_fls.options import build_options


class Recorded:
    """Reads the recorded batches (the path before streaming): no stream, no layer groups."""

    def stream(self, engine: PruningEngine, keys: Any = None) -> GradientStream | None:
        return None

    def layer_group_bytes(self, engine: PruningEngine) -> None:
        return None


@dataclass
class RecordedFLS(Recorded, FLS):
    """FLS as the reference."""

    name: ClassVar[str] = "recorded_fls"


@dataclass
class RecordedKFAC(Recorded, KFAC):
    name: ClassVar[str] = "recorded_kfac"


@dataclass
class WoodburyOBert(Recorded, OBert):
    """oBERT as published: the recorded gradients fed to the Woodbury recursion, 4 at a time."""

    name: ClassVar[str] = "woodbury_obert"

    def estimate(self, engine: PruningEngine, step: StepData, gamma: float) -> Any:
        estimates: dict[str, Any] = {}
        for key, adapter in engine.layers.items():
            mask = engine.canonical_mask(key).float()
            grads = minibatch_gradients([g[key] for g in step.batches], self.gradient_batch_size)
            woodbury = BlockWoodburyInverse(adapter.canonical_shape, num_gradients=len(grads),
                                            damping=gamma, block_size=self.block_size)  # fmt: skip
            for chunk in torch.split(grads * mask, 4):
                woodbury.update(chunk)
            estimates[key] = woodbury
        return estimates, 0.0


@dataclass
class RecordedMFAC(Recorded, MFAC):
    """M-FAC from every recorded batch's gradients at once (the path before streaming)."""

    name: ClassVar[str] = "recorded_mfac"

    def estimate(self, engine: PruningEngine, step: StepData, gamma: float) -> Any:
        estimates: dict[str, Any] = {}
        for key in engine.layers:
            mask = engine.canonical_mask(key).float()
            grads = minibatch_gradients([g[key] for g in step.batches], self.gradient_batch_size)
            estimates[key] = MFACInverse(grads * mask, damping=gamma, block_size=self.block_size)
        return estimates, 0.0


@dataclass
class RecordedDiagFisher(Recorded, DiagFisher):
    name: ClassVar[str] = "recorded_diag_fisher"


def _task() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 20), nn.Tanh(),
                          nn.Linear(20, 4))  # fmt: skip
    x = torch.randn(96, 12)
    y = torch.randint(0, 4, (96,))
    return model, [(x[i : i + 16], y[i : i + 16]) for i in range(0, 96, 16)]


@pytest.mark.parametrize(
    ("streamed", "recorded"),
    [
        (FLS(), RecordedFLS()),
        (KFAC(), RecordedKFAC()),
        (OBert(gradient_batch_size=4, block_size=7), WoodburyOBert(4, block_size=7)),
        (MFAC(gradient_batch_size=4, block_size=30), RecordedMFAC(4, block_size=30)),
        (DiagFisher(), RecordedDiagFisher()),
    ],
)
def test_streamed_statistics_prune_exactly_like_recorded_batches(
    streamed: Any, recorded: Any
) -> None:
    results = []
    for method in (streamed, recorded):
        model, batches = _task()
        report = prune_one_shot(model, batches, F.cross_entropy, sparsity=0.7, method=method,
                                steps=3, samples_per_step=48, progress=False)  # fmt: skip
        results.append((report, model))
    (a, model_a), (b, model_b) = results
    assert a.damping == pytest.approx(b.damping, rel=1e-5)
    assert a.predicted_loss_increase == pytest.approx(b.predicted_loss_increase, rel=1e-4)
    for key in a.masks:
        assert torch.equal(a.masks[key], b.masks[key])
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_a_streaming_collector_keeps_no_records_and_sums_the_fisher_trace() -> None:
    model, batches = _task()
    layers = prunable_layers(model)
    for p in model.parameters():
        p.requires_grad_(True)
    engine = PruningEngine(layers, build_options(FLS(), sparsity=0.5), torch.device("cpu"))
    stream = engine.method.stream(engine)
    assert isinstance(stream, LayerStatisticsStream)
    streaming = GradientCollector(model, F.cross_entropy, layers, stream=stream)
    recording = GradientCollector(model, F.cross_entropy, layers)
    for x, y in batches[:3]:
        streaming.observe(Batch(x, y, keywords=False))
        recording.observe(Batch(x, y, keywords=False))
    streamed, recorded = streaming.result(), recording.result()
    assert streamed.batches == []
    assert streamed.statistics is stream
    assert streamed.samples == recorded.samples == 48
    assert streamed.traces is not None
    _, _, gamma, _ = engine.curvature(streamed)
    expected = next(iter(relative_damping(recorded.batches).values()))
    assert gamma == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("method", [OBert(gradient_batch_size=4), MFAC(gradient_batch_size=4)])
def test_obert_and_mfac_streams_keep_no_records(method: Any) -> None:
    model, batches = _task()
    layers = prunable_layers(model)
    engine = PruningEngine(layers, build_options(method, sparsity=0.5), torch.device("cpu"))
    stream = engine.method.stream(engine, ["2.weight"])
    collector = GradientCollector(model, F.cross_entropy, layers, stream=stream)
    for x, y in batches[:3]:
        collector.observe(Batch(x, y, keywords=False))
    step = collector.result()
    assert step.batches == []
    assert step.statistics is stream
    assert stream.counts == {"2.weight": 3 * 4}  # 16 examples a batch, 4 a gradient
    estimates, _, _, _ = engine.curvature(step)
    assert list(estimates) == ["2.weight"]
    assert stream.held() == []  # each layer's state handed to its estimate


def test_fls_with_auxiliary_passes_still_reads_the_records() -> None:
    model, _ = _task()
    layers = prunable_layers(model)
    engine = PruningEngine(layers, build_options(FLS(refine_passes=1), sparsity=0.5),
                           torch.device("cpu"))  # fmt: skip
    assert engine.method.stream(engine) is None
    engine = PruningEngine(layers, build_options(FLS(), sparsity=0.5), torch.device("cpu"))
    assert engine.method.stream(engine) is not None


def test_trace_of_token_sequences_matches_the_formed_gradients() -> None:
    from lightning_fls.layers import OuterProductGradients

    generator = torch.Generator().manual_seed(0)
    grads = OuterProductGradients(
        torch.randn(3, 5, 1, 40, generator=generator), torch.randn(3, 5, 1, 30, generator=generator)
    )
    formed = grads.materialise(0, 3)  # [B, d_out, d_in']
    expected = formed.square().sum() / 3
    torch.testing.assert_close(grads.trace(), expected, rtol=1e-5, atol=0.0)
