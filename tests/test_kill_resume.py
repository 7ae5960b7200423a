"""A run killed (SIGKILL or SIGTERM) between checkpoints resumes to the unbroken run's result."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run(mode: str, directory: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "tests.kill_resume_run", mode, str(directory), *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_mid_schedule_then_resumed_gives_the_unbroken_result(
    tmp_path: Path, sig: signal.Signals
) -> None:
    straight = run("straight", tmp_path)
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = run("killed", tmp_path, sig.name)
    if sig == signal.SIGKILL:
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    else:  # Lightning stops the fit at the next batch with SystemExit (status 0)
        assert "Received SIGTERM" in killed.stderr, killed.stderr[-2000:]
    assert not (tmp_path / "killed.pt").exists()
    assert (tmp_path / "ckpt" / "last.ckpt").exists()
    resumed = run("resume", tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(tmp_path / "straight.pt", weights_only=True)
    b = torch.load(tmp_path / "resume.pt", weights_only=True)
    assert a["masks"]
    for key, mask in a["masks"].items():
        assert torch.equal(mask, b["masks"][key]), key
    for key, value in a["weights"].items():
        assert torch.equal(value, b["weights"][key]), key
    assert [h["epoch"] for h in b["history"]] == [1.0, 2.0, 3.0, 4.0]
