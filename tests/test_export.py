from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from lightning_fls import export_pruned, load_pruned, sparse_size_report
from lightning_fls.export import _index_dtype


def test_export_round_trip_and_sizes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Conv2d(3, 4, 3))
    with torch.no_grad():
        model[0].weight[torch.rand(30, 40) < 0.9] = 0
        model[2].weight[torch.rand(4, 3, 3, 3) < 0.6] = 0
    report = export_pruned(model, tmp_path / "model.pt")
    assert report.parameters == ("0.weight", "2.weight")
    nonzeros = int((model[0].weight != 0).sum() + (model[2].weight != 0).sum())
    assert report.nonzeros == nonzeros
    assert report.weights == 1200 + 108
    assert report.dense_mb == pytest.approx(1308 * 4 / 2**20)
    assert report.sparse_mb == pytest.approx((nonzeros * 12 + (31 + 5) * 8) / 2**20)
    assert report.sparse_mb < report.dense_mb
    state = load_pruned(tmp_path / "model.pt")
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value), key
    with pytest.raises(KeyError, match=r"nothing\.weight"):
        sparse_size_report(model, ["nothing.weight"])
    assert report.file_mb == (tmp_path / "model.pt").stat().st_size / 2**20
    assert f"file written {report.file_mb * 1024:.1f} kB" in str(report)


def test_torch_save_file_holds_what_the_report_counts(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Linear(256, 256)
    with torch.no_grad():
        model.weight[torch.rand(256, 256) < 0.5] = 0
    report = export_pruned(model, tmp_path / "model.pt", names=["weight"])
    assert report.sparse_mb == pytest.approx(report.nonzeros * 12 / 2**20 + 257 * 8 / 2**20)
    stored = (report.file_mb - report.sparse_mb) * 2**20  # bias, pickle and zip headers
    assert 256 * 4 < stored < 256 * 4 + 4096


class Pruned(nn.Module):
    """Linear, 4-D Conv2d and BatchNorm (its running statistics are buffers)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(40, 30)
        self.conv = nn.Conv2d(3, 6, 3)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [batch, 3, 6, 6]
        h = torch.relu(self.bn(self.conv(x))).flatten(1)  # [batch, 96]
        return self.fc(h[:, :40])


def pruned_model(sparsity: float, seed: int = 0) -> Pruned:
    torch.manual_seed(seed)
    model = Pruned()
    model.train()
    model(torch.randn(4, 3, 6, 6))  # running statistics away from their initial values
    model.eval()
    with torch.no_grad():
        for weight in (model.fc.weight, model.conv.weight):
            weight[torch.rand_like(weight) < sparsity] = 0
    return model


def stored_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(path, framework="pt") as file:
        metadata: dict[str, str] = file.metadata()
    return load_file(path), metadata


def test_safetensors_round_trip_is_exact(tmp_path: Path) -> None:
    model = pruned_model(0.8)
    path = tmp_path / "model.safetensors"
    report = export_pruned(model, path)
    assert report.parameters == ("fc.weight", "conv.weight")
    expected = model.state_dict()
    assert expected["bn.num_batches_tracked"] == 1
    state = load_pruned(path)
    assert list(state) == list(expected)
    for key, value in expected.items():
        assert state[key].dtype == value.dtype, key
        assert torch.equal(state[key], value), key
    stored, metadata = stored_tensors(path)
    # Sparse weights are three plain tensors, everything else as it is.
    assert "conv.weight" not in stored
    assert stored["conv.weight.csr_row_pointers"].shape == (6 + 1,)
    assert stored["conv.weight.csr_values"].numel() == int((model.conv.weight != 0).sum())
    assert json.loads(metadata["lightning_fls.sparse_shapes"])["conv.weight"] == [6, 3, 3, 3]
    assert metadata["lightning_fls.format_version"] == "1"
    assert torch.equal(stored["bn.running_var"], model.bn.running_var)
    # The report counts exactly the bytes of the CSR tensors written.
    csr_bytes = sum(t.numel() * t.element_size() for k, t in stored.items() if ".csr_" in k)
    assert report.sparse_mb * 2**20 == csr_bytes


def test_safetensors_file_is_smaller_at_high_sparsity(tmp_path: Path) -> None:
    model = pruned_model(0.9)
    dense = tmp_path / "dense.safetensors"
    save_file(model.state_dict(), dense)
    sparse = tmp_path / "sparse.safetensors"
    report = export_pruned(model, sparse)
    assert report.sparsity > 0.85
    assert sparse.stat().st_size < 0.5 * dense.stat().st_size
    assert report.file_mb == sparse.stat().st_size / 2**20
    assert f"file written {report.file_mb * 1024:.1f} kB" in str(report)
    assert sparse_size_report(model, report.parameters).file_mb is None


def test_small_layers_get_int32_indices(tmp_path: Path) -> None:
    model = pruned_model(0.5)
    report = export_pruned(model, tmp_path / "model.safetensors", names=["fc.weight"])
    stored, _ = stored_tensors(tmp_path / "model.safetensors")
    assert stored["fc.weight.csr_col_indices"].dtype == torch.int32
    assert stored["fc.weight.csr_row_pointers"].dtype == torch.int32
    assert "conv.weight" in stored  # not named: dense
    nonzeros = int((model.fc.weight != 0).sum())
    assert report.sparse_mb == (nonzeros * (4 + 4) + (30 + 1) * 4) / 2**20
    assert sparse_size_report(model, ["fc.weight"], int32_indices=True) == dataclasses.replace(
        report, file_mb=None
    )
    # Indices past int32 are int64 (a meta tensor: no memory for a [1, 2**31] matrix).
    assert _index_dtype(torch.empty(1, 2**31 - 1, device="meta"), 10) == torch.int32
    assert _index_dtype(torch.empty(1, 2**31, device="meta"), 10) == torch.int64


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.hidden = nn.Linear(8, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.embed.weight  # one nn.Parameter, two state_dict names

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # tokens: [batch] → [batch, 20]
        return self.head(torch.tanh(self.hidden(self.embed(tokens))))


@pytest.mark.parametrize("sparse_tied", [True, False])
def test_tied_weights_are_stored_once_and_both_names_load(
    tmp_path: Path, sparse_tied: bool
) -> None:
    torch.manual_seed(0)
    model = Tied()
    with torch.no_grad():
        model.embed.weight[torch.rand(20, 8) < 0.7] = 0
        model.hidden.weight[torch.rand(8, 8) < 0.7] = 0
    # named_parameters() gives the tied parameter under its first name only.
    names = ["embed.weight", "hidden.weight"] if sparse_tied else ["hidden.weight"]
    path = tmp_path / "tied.safetensors"
    export_pruned(model, path, names=names)
    stored, metadata = stored_tensors(path)
    assert json.loads(metadata["lightning_fls.aliases"]) == {"head.weight": "embed.weight"}
    assert not any(key.startswith("head.") for key in stored)
    assert ("embed.weight.csr_values" in stored) == sparse_tied
    state = load_pruned(path)
    assert torch.equal(state["head.weight"], model.embed.weight)
    assert torch.equal(state["embed.weight"], model.embed.weight)
    assert state["head.weight"] is state["embed.weight"]
    torch.manual_seed(1)
    fresh = Tied()
    fresh.load_state_dict(state)
    assert fresh.head.weight is fresh.embed.weight
    tokens = torch.arange(20)
    assert torch.equal(fresh(tokens), model(tokens))


def test_other_views_of_shared_memory_are_stored_separately(tmp_path: Path) -> None:
    model = nn.Module()
    memory = torch.arange(10.0)
    model.register_buffer("low", memory[:4])
    model.register_buffer("high", memory[4:])
    model.register_buffer("strided", memory[::3])  # not contiguous
    export_pruned(model, tmp_path / "views.safetensors")
    state = load_pruned(tmp_path / "views.safetensors")
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value), key


def test_reloaded_model_gives_identical_outputs(tmp_path: Path) -> None:
    model = pruned_model(0.9)
    export_pruned(model, tmp_path / "model.safetensors")
    fresh = pruned_model(0.0, seed=1)
    x = torch.randn(5, 3, 6, 6)
    assert not torch.equal(fresh(x), model(x))
    fresh.load_state_dict(load_pruned(tmp_path / "model.safetensors"))
    assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_bad_input_fails_before_writing(tmp_path: Path, suffix: str) -> None:
    model = pruned_model(0.9)
    missing = tmp_path / "missing" / f"model{suffix}"
    with pytest.raises(ValueError, match=r"path=.*missing.*directory does not exist"):
        export_pruned(model, missing)
    assert not missing.parent.exists()
    with pytest.raises(ValueError, match="is a directory"):
        export_pruned(model, tmp_path)
    path = tmp_path / f"model{suffix}"
    with pytest.raises(KeyError, match=r"nothing\.weight"):
        export_pruned(model, path, names=["fc.weight", "nothing.weight"])
    assert not path.exists()


def test_safetensors_is_optional(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The package imports without it...
    code = "import sys, lightning_fls; assert 'safetensors' not in sys.modules, 'imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # ...and a .safetensors path without it says what to install, writing nothing.
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    path = tmp_path / "model.safetensors"
    with pytest.raises(ImportError, match=r"pip install 'lightning_fls\[hf\]'"):
        export_pruned(pruned_model(0.9), path)
    assert not path.exists()
    export_pruned(pruned_model(0.9), tmp_path / "model.pt")  # the torch.save format needs nothing


def test_load_pruned_refuses_foreign_safetensors_files(tmp_path: Path) -> None:
    model = pruned_model(0.9)
    save_file(model.state_dict(), tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="not written by export_pruned"):
        load_pruned(tmp_path / "plain.safetensors")
    path = tmp_path / "model.safetensors"
    export_pruned(model, path)
    tensors, metadata = stored_tensors(path)
    save_file(tensors, path, metadata={**metadata, "lightning_fls.format_version": "2"})
    with pytest.raises(ValueError, match="format version 2"):
        load_pruned(path)
