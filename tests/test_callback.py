from __future__ import annotations

import csv
import math
import struct
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_fls import FLSPruningCallback
from lightning_fls import engine as engine_module
from tests.callback_models import TinyClassifier, TwoOptimizerClassifier
from tests.helpers import trainer


def weights(model: pl.LightningModule) -> dict[str, torch.Tensor]:
    return {"net.0.weight": model.net[0].weight, "net.2.weight": model.net[2].weight}


class MaskChecker(pl.Callback):
    """After every optimizer step: every masked weight exactly zero, sparsity as scheduled."""

    def __init__(self, pruning: FLSPruningCallback, check_schedule: bool = True) -> None:
        self.pruning = pruning
        self.check_schedule = check_schedule and pruning.prune_every_n_steps is None
        self.checks = 0
        self.handles: list[Any] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for optimizer in trainer.optimizers:  # registered after the pruning callback's hooks
            self.handles.append(optimizer.register_step_post_hook(self.check(pl_module)))

    def check(self, pl_module: pl.LightningModule) -> Any:
        def hook(*_: Any) -> None:
            masks = self.pruning.masks
            for key, mask in masks.items():
                assert torch.all(weights(pl_module)[key][~mask] == 0), key
            if self.check_schedule:
                # Epoch e runs after e completed epochs: the sparsity of the last pruning point.
                expected = self.pruning.schedule(float(pl_module.trainer.current_epoch))
                total = sum(m.numel() for m in masks.values())
                pruned = sum(int((~m).sum()) for m in masks.values())
                assert abs(pruned / total - expected) <= 1 / total
            self.checks += 1

        return hook

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for handle in self.handles:
            handle.remove()


def fit(
    tmp_path: Path,
    model: pl.LightningModule | None = None,
    epochs: int = 4,
    trainer_kwargs: dict[str, Any] | None = None,
    check_schedule: bool = True,
    **kwargs: Any,
) -> tuple[pl.LightningModule, FLSPruningCallback, MaskChecker]:
    torch.manual_seed(0)
    model = model or TinyClassifier()
    options: dict[str, Any] = {
        "target_sparsity": 0.8,
        "start_epoch": 0,
        "end_epoch": 3,
        "aux_every_n_steps": 1,
        "verbose": False,
    }
    options.update(kwargs)
    pruning = FLSPruningCallback(**options)
    checker = MaskChecker(pruning, check_schedule)
    trainer(tmp_path, [pruning, checker], epochs, **(trainer_kwargs or {})).fit(model)
    return model, pruning, checker


def test_cubic_run_reaches_each_scheduled_sparsity_exactly(tmp_path: Path) -> None:
    model, pruning, checker = fit(tmp_path)
    total = sum(m.numel() for m in pruning.masks.values())
    assert [h["epoch"] for h in pruning.history] == [1.0, 2.0, 3.0]
    for record in pruning.history:
        assert abs(record["fls/sparsity"] - record["fls/target_sparsity"]) <= 1 / total
    assert pruning.history[-1]["fls/target_sparsity"] == pytest.approx(0.8)
    zeros = sum(int((w == 0).sum()) for w in weights(model).values())
    assert abs(zeros / total - 0.8) <= 1 / total
    assert checker.checks == 4 * 8
    for record in pruning.history:
        assert record["fls/predicted_loss_increase"] > 0
        assert record["fls/damping"] > 0
        assert "fls/aux_loss" in record
        assert "fls/realised_loss_increase" in record


def test_nothing_is_left_on_the_model_or_optimizers(tmp_path: Path) -> None:
    model, pruning, _ = fit(tmp_path, epochs=2, end_epoch=1)
    for module in model.modules():
        assert not module._forward_hooks
        assert not module._forward_pre_hooks
        assert not module._backward_hooks
    assert set(model.state_dict()) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
    assert pruning._optimizer_hooks == []


@pytest.mark.parametrize(
    "method", ["fls", "kfac", "obert", "mfac", "diag_fisher", "sparsegpt", "magnitude"]
)
def test_every_method_prunes_in_the_trainer(tmp_path: Path, method: str) -> None:
    _, pruning, _ = fit(tmp_path, epochs=3, end_epoch=2, method=method, target_sparsity=0.6)
    assert pruning.history[-1]["fls/sparsity"] == pytest.approx(0.6, abs=1 / 384)


@pytest.mark.parametrize(
    ("row_update", "solver"),
    [(None, "refined_sweep"), ("sweep", "sweep"), ("joint", "joint")],
)
def test_the_callback_solves_kronecker_rows_as_told(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, row_update: str | None, solver: str
) -> None:
    """Fine-tuning follows every pruning point, so by default the callback refines the column
    sweep instead of solving each row exactly where affordable (``prune_one_shot``'s default);
    either on request."""
    calls = dict.fromkeys(engine_module.ROW_UPDATES, 0)
    for name, solve in list(engine_module.ROW_UPDATES.items()):

        def counted(*args: Any, name: str = name, solve: Any = solve) -> Any:
            calls[name] += 1
            return solve(*args)

        monkeypatch.setitem(engine_module.ROW_UPDATES, name, counted)
    _, pruning, _ = fit(tmp_path, epochs=3, end_epoch=2, target_sparsity=0.6,
                        **({} if row_update is None else {"row_update": row_update}))  # fmt: skip
    assert pruning.options.row_update == solver
    assert calls[solver] > 0
    assert sum(calls.values()) == calls[solver]
    assert pruning.history[-1]["fls/sparsity"] == pytest.approx(0.6, abs=1 / 384)
    assert FLSPruningCallback(method="kfac").options.row_update == "auto"  # kfac: summed updates


@pytest.mark.parametrize(
    ("optimizer", "trainer_kwargs"),
    [
        ("sgd-momentum", {}),
        ("sgd", {}),
        ("adam", {}),
        ("adamw", {"gradient_clip_val": 0.5}),
        ("adam-scheduler", {}),
        ("adam", {"accumulate_grad_batches": 3}),
        ("adam", {"precision": "bf16-mixed"}),
        pytest.param(
            "adam",
            {"precision": "16-mixed"},  # Lightning runs fp16 AMP as bf16 on CPU, and says so
            marks=pytest.mark.filterwarnings("ignore:.*AMP with fp16 is not supported on CPU"),
        ),
        ("sgd", {"precision": "bf16-mixed", "accumulate_grad_batches": 2}),
    ],
    ids=[
        "sgd-momentum",
        "sgd-nesterov-wd",
        "adam-32",
        "adamw-wd-clip",
        "adam-lr-scheduler",
        "adam-accumulate",
        "bf16-mixed",
        "16-mixed",
        "sgd-bf16-accumulate",
    ],
)
def test_masks_hold_after_every_optimizer_step(
    tmp_path: Path, optimizer: str, trainer_kwargs: dict[str, Any]
) -> None:
    model, pruning, checker = fit(
        tmp_path, TinyClassifier(optimizer=optimizer), trainer_kwargs=trainer_kwargs
    )
    assert checker.checks > 0
    assert pruning.history[-1]["fls/sparsity"] == pytest.approx(0.8, abs=1 / 384)
    for key, mask in pruning.masks.items():
        assert torch.all(weights(model)[key][~mask] == 0)


def test_manual_optimization_with_two_optimizers(tmp_path: Path) -> None:
    _model, pruning, checker = fit(tmp_path, TwoOptimizerClassifier())
    assert checker.checks == 2 * 4 * 8
    assert pruning.history[-1]["fls/sparsity"] == pytest.approx(0.8, abs=1 / 384)
    assert "fls/realised_loss_increase" not in pruning.history[-1]  # needs automatic optimization


def test_pruning_every_n_steps(tmp_path: Path) -> None:
    _, pruning, _ = fit(tmp_path, epochs=3, end_epoch=2, prune_every_n_steps=4)
    points = [h["epoch"] for h in pruning.history]
    assert len(points) >= 3
    assert points == sorted(points)
    assert pruning.history[-1]["fls/sparsity"] == pytest.approx(0.8, abs=1 / 384)


def test_kronecker_fls_with_auxiliary_refinement(tmp_path: Path) -> None:
    from lightning_fls import StructurePolicy
    from lightning_fls.methods import FLS

    _, pruning, _ = fit(
        tmp_path, epochs=3, end_epoch=2, structure=StructurePolicy(), refine_passes=2,
        recompute_steps=2,
    )  # fmt: skip
    assert pruning.history[-1]["fls/sparsity"] == pytest.approx(0.8, abs=1 / 384)
    assert pruning.engine is not None
    method = pruning.engine.method
    assert isinstance(method, FLS)
    assert method.aux is not None  # the Adam auxiliary fit ran
    assert method.blocks is not None
    assert all(type(b).__name__ == "KroneckerBlock" for b in method.blocks.values())


def test_callable_schedule_and_layer_scope(tmp_path: Path) -> None:
    _, pruning, _ = fit(
        tmp_path, epochs=3, end_epoch=2, schedule=lambda t: min(0.3 * t, 0.6), scope="layer"
    )
    assert [round(h["fls/target_sparsity"], 6) for h in pruning.history] == [0.3, 0.6]
    for value in [v for k, v in pruning.history[-1].items() if k.startswith("fls/sparsity/")]:
        assert value == pytest.approx(0.6, abs=0.02)


def test_metrics_arrive_in_csv_logger_files(tmp_path: Path) -> None:
    logger = CSVLogger(str(tmp_path), name="csv")
    fit(tmp_path, trainer_kwargs={"logger": logger})
    with open(Path(logger.log_dir) / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    columns = set(rows[0])
    for name in [
        "fls/sparsity",
        "fls/aux_loss",
        "fls/predicted_loss_increase",
        "fls/realised_loss_increase",
        "fls/damping",
        "fls/aux_time_fraction",
        "fls/callback_seconds",
        "fls/sparsity/net.0.weight",
        "fls/dense_mb",
        "fls/sparse_mb",
    ]:
        assert name in columns, name
    sparsities = [float(r["fls/sparsity"]) for r in rows if r["fls/sparsity"]]
    assert sparsities == sorted(sparsities)
    for row in (r for r in rows if r["fls/prune_seconds"]):  # the phases fit in the whole
        estimate, obs = float(row["fls/estimate_seconds"]), float(row["fls/obs_seconds"])
        assert estimate > 0
        assert obs > 0
        assert estimate + obs <= float(row["fls/prune_seconds"])
    assert sparsities[-1] == pytest.approx(0.8, abs=1 / 384)
    points = [r for r in rows if r["fls/prune_seconds"]]
    for i, row in enumerate(points):  # recording and pruning so far, every point's time in it
        pruned = sum(float(r["fls/prune_seconds"]) for r in points[: i + 1])
        assert float(row["fls/callback_seconds"]) >= pruned


def _wandb_history(run_file: Path) -> dict[str, list[str]]:
    """History items of an offline W&B run file (LevelDB log blocks of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    position, block, pending = 7, 32768, b""
    history: dict[str, list[str]] = {}
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0 and length == 0:
            position += left
            continue
        payload = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (2, 3):
            pending = payload if kind == 2 else pending + payload
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending + payload if kind == 4 else payload)
        pending = b""
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                history.setdefault(key, []).append(item.value_json)
    return history


def test_metrics_arrive_in_an_offline_wandb_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="fls-test")
    try:
        fit(tmp_path, epochs=2, end_epoch=1, target_sparsity=0.5, trainer_kwargs={"logger": logger})
    finally:
        wandb.finish()
    [run_file] = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    # wandb's service process may still be flushing the file when finish() returns: wait for
    # the records (a condition, bounded), not for a fixed time.
    deadline = time.monotonic() + 60
    history = _wandb_history(run_file)
    while "fls/sparsity" not in history and time.monotonic() < deadline:
        time.sleep(0.2)
        history = _wandb_history(run_file)
    assert "fls/sparsity" in history, sorted(history)
    assert float(history["fls/sparsity"][-1]) == pytest.approx(0.5, abs=1 / 384)
    for name in [
        "fls/aux_loss",
        "fls/predicted_loss_increase",
        "fls/realised_loss_increase",
        "fls/sparsity/net.2.weight",
    ]:
        assert name in history, name


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_resume_from_a_mid_schedule_checkpoint_gives_the_same_weights_and_masks(
    tmp_path: Path,
) -> None:
    options = {
        "target_sparsity": 0.8,
        "start_epoch": 0,
        "end_epoch": 4,
        "aux_every_n_steps": 2,
        "verbose": False,
    }

    def run(
        max_epochs: int, ckpt_path: str | None, save: bool
    ) -> tuple[pl.LightningModule, FLSPruningCallback]:
        torch.manual_seed(0)
        model = TinyClassifier(optimizer="sgd")
        pruning = FLSPruningCallback(**options)  # type: ignore[arg-type]
        callbacks: list[pl.Callback] = [pruning]
        if save:
            callbacks.append(
                ModelCheckpoint(
                    dirpath=tmp_path / "ckpt", save_last=True, every_n_epochs=1, save_top_k=-1
                )
            )
        t = trainer(tmp_path, callbacks, max_epochs, enable_checkpointing=save)
        t.fit(model, ckpt_path=ckpt_path)
        return model, pruning

    straight, straight_pruning = run(5, None, save=False)
    run(2, None, save=True)  # stops after 2 of 4 pruning epochs
    [checkpoint] = list((tmp_path / "ckpt").glob("epoch=1*.ckpt"))
    state = torch.load(checkpoint, weights_only=True)
    assert any("FLSPruningCallback" in key for key in state["callbacks"])
    # A version-1 state (before the fault counters) is upgraded and resumes alike.
    [key] = [key for key in state["callbacks"] if "FLSPruningCallback" in key]
    assert state["callbacks"][key]["version"] == 3
    for name in (
        "skipped_aux_updates", "rollbacks", "damping_scale", "safeguard_reverts",
        "factorisation_fallbacks",
    ):  # fmt: skip
        del state["callbacks"][key][name]
    state["callbacks"][key]["version"] = 1
    old_checkpoint = tmp_path / "version1.ckpt"
    torch.save(state, old_checkpoint)
    for path in (checkpoint, old_checkpoint):
        resumed, resumed_pruning = run(5, str(path), save=False)
        for key in straight_pruning.masks:
            assert torch.equal(straight_pruning.masks[key], resumed_pruning.masks[key])
        for key, value in straight.state_dict().items():
            assert torch.equal(value, resumed.state_dict()[key]), key
        assert [h["epoch"] for h in resumed_pruning.history] == [1.0, 2.0, 3.0, 4.0]


def _state(masks: dict[str, torch.Tensor], version: int = 3) -> dict[str, Any]:
    return {
        "version": version,
        "masks": masks,
        "last_point": 1.0,
        "history": [],
        "generator": torch.Generator().get_state(),
        "skipped_records": 0,
        "skipped_aux_updates": 0,
        "rollbacks": 0,
        "damping_scale": 1.0,
        "safeguard_reverts": 0,
        "factorisation_fallbacks": 0,
    }


@pytest.mark.parametrize(
    ("masks", "message"),
    [
        (
            {"other.weight": torch.ones(2, 2, dtype=torch.bool)},
            r"other layers: missing \['net.0.weight', 'net.2.weight'\], unexpected "
            r"\['other.weight'\]",
        ),
        (
            {
                "net.0.weight": torch.ones(24, 12, dtype=torch.bool),
                "net.2.weight": torch.ones(5, 24, dtype=torch.bool),
            },
            r"`net.2.weight` has shape \(5, 24\), the model's weight has \(4, 24\)",
        ),
    ],
    ids=["names", "shapes"],
)
def test_checkpoint_from_another_model_is_refused(
    tmp_path: Path, masks: dict[str, torch.Tensor], message: str
) -> None:
    pruning = FLSPruningCallback(verbose=False)
    pruning.load_state_dict(_state(masks))
    model = TinyClassifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        trainer(tmp_path, [pruning], 1).fit(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_unknown_or_incomplete_states_are_refused() -> None:
    with pytest.raises(ValueError, match=r"version 99 is not supported.*versions 1 to 3"):
        FLSPruningCallback().load_state_dict({"version": 99})
    incomplete = _state({})
    del incomplete["generator"]
    with pytest.raises(ValueError, match=r"lacks \['generator'\]"):
        FLSPruningCallback().load_state_dict(incomplete)


def test_version_1_and_2_states_are_upgraded() -> None:
    from lightning_fls.callback import upgrade_state

    old = _state({}, version=1)
    for name in (
        "skipped_aux_updates", "rollbacks", "damping_scale", "safeguard_reverts",
        "factorisation_fallbacks",
    ):  # fmt: skip
        del old[name]
    new = upgrade_state(old)
    assert new["version"] == 3
    assert (new["skipped_aux_updates"], new["rollbacks"], new["damping_scale"]) == (0, 0, 1.0)
    assert (new["safeguard_reverts"], new["factorisation_fallbacks"]) == (0, 0)
    assert old["version"] == 1  # the caller's dictionary is left alone
    two = _state({}, version=2)
    two["damping_scale"] = 10.0
    del two["safeguard_reverts"], two["factorisation_fallbacks"]
    new = upgrade_state(two)
    assert new["version"] == 3
    assert new["damping_scale"] == 10.0
    assert (new["safeguard_reverts"], new["factorisation_fallbacks"]) == (0, 0)


class NoLayers(TinyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Identity())
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :4] * self.scale


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"target_sparsity": 1.0}, ValueError, r"target_sparsity.*\[0, 1\)"),
        ({"target_sparsity": -0.1}, ValueError, r"target_sparsity.*\[0, 1\)"),
        ({"target_sparsity": "0.5"}, TypeError, "target_sparsity"),
        ({"start_epoch": 3, "end_epoch": 3}, ValueError, "end_epoch.*greater than.*start_epoch"),
        ({"start_epoch": -1}, ValueError, "start_epoch"),
        ({"schedule": "exponential"}, ValueError, r"schedule.*'cubic', 'linear', 'oneshot'"),
        ({"method": "sparse"}, ValueError, r"method.*'fls'.*'magnitude'"),
        ({"scope": "row"}, ValueError, r"scope.*'global', 'layer'"),
        ({"fisher": "sampled"}, ValueError, r"fisher.*'empirical'"),
        ({"aux_every_n_steps": 0}, ValueError, "aux_every_n_steps"),
        ({"prune_every_n_steps": 0}, ValueError, "prune_every_n_steps"),
        ({"samples_per_step": 0}, ValueError, "samples_per_step"),
        ({"damping": 0.0}, ValueError, "damping"),
        ({"damping": -1.0}, ValueError, "damping"),
        ({"aux_lr": 0.0}, ValueError, "aux_lr"),
        ({"token_fraction": 0.0}, ValueError, r"token_fraction.*\(0, 1\]"),
        (
            {"method": "obert", "token_fraction": 0.5},
            ValueError,
            r"`token_fraction` does not apply to method='obert'",
        ),
        ({"refine_passes": -1}, ValueError, "refine_passes"),
        ({"recompute_steps": 0}, ValueError, "recompute_steps"),
        ({"max_layer_sparsity": 1.5}, ValueError, "max_layer_sparsity"),
        ({"row_update": "exact"}, ValueError, r"row_update.*'joint', 'refined_sweep', 'sweep'"),
        ({"method": "magnitude", "row_update": "sweep"}, ValueError, "row_update.*'magnitude'"),
    ],
)
def test_bad_arguments_are_refused_at_construction(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        FLSPruningCallback(**kwargs)


@pytest.mark.parametrize(
    ("model", "kwargs", "message"),
    [
        (TinyClassifier, {"include": ["encoder.*"]}, "encoder"),
        (TinyClassifier, {"exclude": ["nothing.*"]}, "nothing"),
        (NoLayers, {}, "no prunable layer"),
        (TinyClassifier, {"schedule": lambda t: 0.5 - 0.1 * t}, "never decrease"),
        (TinyClassifier, {"schedule": lambda t: 0.5 * t}, r"\[0, 1\)"),
    ],
)
def test_bad_setups_are_refused_before_training(
    tmp_path: Path, model: type[pl.LightningModule], kwargs: dict[str, Any], message: str
) -> None:
    module = model()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        trainer(tmp_path, [FLSPruningCallback(verbose=False, **kwargs)], 3).fit(module)
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key])


def test_loss_scaling_and_accumulation_are_undone() -> None:
    from types import SimpleNamespace

    from lightning_fls.callback import _loss_scale

    class Scaler:
        def is_enabled(self) -> bool:
            return True

        def get_scale(self) -> float:
            return 1024.0

    module = SimpleNamespace(automatic_optimization=True)
    fake = SimpleNamespace(
        lightning_module=module, accumulate_grad_batches=3,
        precision_plugin=SimpleNamespace(scaler=Scaler()),
    )  # fmt: skip
    assert _loss_scale(fake) == pytest.approx(3 / 1024)  # type: ignore[arg-type]
    module.automatic_optimization = False  # manual: the user's own backward, no 1/k
    fake.precision_plugin = SimpleNamespace()
    assert _loss_scale(fake) == 1.0  # type: ignore[arg-type]


class SometimesNaN(TinyClassifier):
    """Every other batch's loss is NaN (its backward gives non-finite gradients)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if batch_idx % 2 == 1 else loss

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
    ) -> None:  # type: ignore[override]
        optimizer_closure()  # forward + backward; the step is skipped on non-finite gradients
        if all(bool(torch.isfinite(p.grad).all()) for p in self.parameters() if p.grad is not None):
            optimizer.step()


def test_non_finite_gradients_are_skipped_and_counted(tmp_path: Path) -> None:
    model = SometimesNaN(optimizer="sgd")
    _, pruning, _ = fit(tmp_path, model, epochs=3, end_epoch=2, target_sparsity=0.5)
    # 4 NaN batches of 8 in each of the 2 epochs that end at a pruning point
    assert pruning.skipped_records == 2 * 4
    assert [h["fls/skipped_records"] for h in pruning.history] == [4, 8]
    assert pruning.history[-1]["fls/sparsity"] == pytest.approx(0.5, abs=1 / 384)
    for record in pruning.history:
        assert math.isfinite(record["fls/predicted_loss_increase"])


def test_batches_whose_records_would_be_dropped_are_not_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counts: list[int] = []
    original = FLSPruningCallback._record

    def counted(self: FLSPruningCallback, grads: Any) -> None:
        counts.append(next(iter(grads.values())).batch_size)
        original(self, grads)

    monkeypatch.setattr(FLSPruningCallback, "_record", counted)
    # 8 batches of 32 an epoch, 64 samples kept: batches 5, 6, 7 of each pruning epoch (two
    # records needed, one spare) and batch 0 of the first, which tells the examples per record.
    model, pruning, _ = fit(tmp_path, samples_per_step=64)
    assert len(counts) == 1 + 3 * 3
    monkeypatch.setattr(FLSPruningCallback, "_among_newest", lambda *_: True)
    counts.clear()
    everything, everything_pruning, _ = fit(tmp_path, samples_per_step=64)
    assert len(counts) == 3 * 8
    for key, weight in weights(everything).items():
        assert torch.equal(weights(model)[key], weight), key
        assert torch.equal(pruning.masks[key], everything_pruning.masks[key]), key


class NoBackward(TinyClassifier):
    def training_step(self, batch: Any, batch_idx: int) -> None:  # type: ignore[override]
        return None  # skips every step: nothing is recorded


def test_a_pruning_point_without_gradients_warns_and_waits(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="no usable gradients"):
        _, pruning, _ = fit(tmp_path, NoBackward(), epochs=2, end_epoch=1, check_schedule=False)
    assert pruning.history == []
    assert all(bool(m.all()) for m in pruning.masks.values())
