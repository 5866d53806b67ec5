"""A second detector kind for the registry tests: the mean brightness of each frame, with a
memory of how many frames it has seen; `step_sleep_s` makes a slow line, `load_sleep_s` a slow
restore (each load is appended to `load_log` as "start end" in epoch seconds), and
`build_fails_while` a detector that cannot be built while that file exists. It registers
itself when imported (as a Ray worker does when it receives its settings)."""
import os
import time
from typing import Literal, Optional

import numpy as np
import torch

from rareclip_core import DetectionResult, Detector, DetectorSettings, register_detector
from rareclip_core.data.images import to_rgb_image


class BrightnessConfig(DetectorSettings):
    kind: Literal["brightness"] = "brightness"
    pretrained: Optional[str] = None
    image_size: int = 32
    step_sleep_s: float = 0.0
    load_sleep_s: float = 0.0
    load_log: Optional[str] = None
    build_fails_while: Optional[str] = None


class BrightnessDetector(Detector):
    kind = "brightness"

    def __init__(self, config: BrightnessConfig):
        if config.build_fails_while and os.path.exists(config.build_fails_while):
            raise RuntimeError(f"{config.build_fails_while} exists")
        self.config = config
        self.reset()

    def reset(self) -> None:
        self.seen = 0

    def encode(self, images, timings=None):
        return [float(np.asarray(to_rgb_image(im), dtype=np.float64).mean() / 255) for im in images]

    def step_features(self, features, update=None, timings=None):
        time.sleep(self.config.step_sleep_s)
        score = features + self.seen * 1e-3
        if update is not False:
            self.seen += 1
        size = self.config.image_size
        return DetectionResult(score, np.full((size, size), features, dtype=np.float32), {"seen": self.seen})

    def state_dict(self):
        return {"seen": torch.tensor(self.seen)}

    def load_state_dict(self, state):
        start = time.time()
        time.sleep(self.config.load_sleep_s)
        self.seen = int(state["seen"])
        if self.config.load_log:
            with open(self.config.load_log, "a") as log:
                log.write(f"{start} {time.time()}\n")


register_detector("brightness", BrightnessConfig, BrightnessDetector)
