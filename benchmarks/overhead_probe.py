"""A detector kind that does no work (`kind: overhead_probe`), so that a pipeline run measures the
pipeline's own ceiling: decoding, the Ray calls between ingestion, line and writer actors, and
the result writer. With `step_ms` each frame's step takes that long, as a device-bound step would
(sleeping, the GIL released) or a host-bound one (`step_holds_gil`: spinning in Python), which
shows how much of a line's per-frame pipeline work overlaps its steps. Registers itself when
imported (as a Ray worker does when it receives the settings). Benchmarks only: its score is
always 0."""
from __future__ import annotations

import time
from typing import Literal, Optional

import numpy as np
import torch

from rareclip_core import DetectionResult, Detector, DetectorSettings, register_detector


class OverheadProbeConfig(DetectorSettings):
    kind: Literal["overhead_probe"] = "overhead_probe"
    model: str = "none (overhead probe)"
    pretrained: Optional[str] = None
    image_size: int = 32
    step_ms: float = 0.0
    step_holds_gil: bool = False


class OverheadProbeDetector(Detector):
    """Scores every frame 0 with an all-zero map; counts the frames it has seen (its state)."""

    kind = "overhead_probe"

    def __init__(self, config: OverheadProbeConfig):
        self.config = config
        self.reset()

    def reset(self) -> None:
        self.seen = 0

    def encode(self, images, timings=None):
        return [None] * len(images)

    def step_features(self, features, update=None, timings=None):
        self.seen += update is not False
        if self.config.step_holds_gil:
            end = time.perf_counter() + self.config.step_ms / 1000
            while time.perf_counter() < end:
                pass
        elif self.config.step_ms:
            time.sleep(self.config.step_ms / 1000)
        size = self.config.image_size
        return DetectionResult(0.0, np.zeros((size, size), dtype=np.float32), {})

    def state_dict(self):
        return {"seen": torch.tensor(self.seen)}

    def load_state_dict(self, state):
        self.seen = int(state["seen"])


register_detector("overhead_probe", OverheadProbeConfig, OverheadProbeDetector)
