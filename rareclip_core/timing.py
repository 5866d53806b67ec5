"""Stage timing for a detector step: wall time per named stage, or nothing at all."""
from __future__ import annotations

import time

import torch


class StageTimer:
    """Each `lap(name)` adds the seconds since the previous lap to `timings[name]`, after
    waiting for queued CUDA work when on CUDA (so a stage is charged for its own kernels)."""

    __slots__ = ("timings", "device", "last")

    def __init__(self, timings: dict[str, float], device: torch.device):
        self.timings, self.device = timings, device
        self._sync()
        self.last = time.perf_counter()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def lap(self, name: str) -> None:
        self._sync()
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + now - self.last
        self.last = now


class _NoTimer:
    """The timer of a plain step: no clock, no CUDA synchronization."""

    __slots__ = ()

    def lap(self, name: str) -> None:
        pass


NO_TIMER = _NoTimer()


def stage_timer(timings: dict[str, float] | None, device: torch.device) -> StageTimer | _NoTimer:
    """A StageTimer filling `timings`, or the no-op timer when `timings` is None."""
    return NO_TIMER if timings is None else StageTimer(timings, device)
