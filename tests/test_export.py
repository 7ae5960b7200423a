from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_fls import export_pruned, load_pruned, sparse_size_report


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
