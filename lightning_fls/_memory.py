"""Peak-memory measurement of a block of work (CUDA allocator, or Linux process RSS)."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

import torch


def _read_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Measures the peak memory growth over a ``with`` block, in MiB.

    On CUDA devices it uses the allocator's peak; on the CPU under Linux it resets the process's
    peak resident set size (``/proc/self/clear_refs``) and reads ``VmHWM`` afterwards. Elsewhere
    :attr:`peak_mb` stays None.

    Args:
        device: The device the work runs on.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mb: float | None = None
        self._baseline: float | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = torch.cuda.memory_allocated(self.device) / 2**20
            return self
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return self
        rss = _read_status_kib("VmRSS")
        self._baseline = None if rss is None else rss / 1024
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._baseline is None:
            return
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            hwm = _read_status_kib("VmHWM")
            if hwm is None:
                return
            peak = hwm / 1024
        self.peak_mb = max(0.0, peak - self._baseline)
