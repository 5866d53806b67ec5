"""The detector contract: what every detector kind provides, and the one result type they return.

Every job (live, replay, evaluate, drill, snapshots) drives a line's detector only through this
interface, and builds it only through the registry (`rareclip_core.build_detector`):

- `encode(images)`: stateless and batchable (a replay runs the backbone on several consecutive
  frames of a line at once); returns opaque per-frame features.
- `step_features(features, update)`: stateful, one frame at a time, in the line's order; `update`
  None means the detector's own default (RareCLIP: its `mode`).
- `state_dict()` / `load_state_dict()` / `reset()`: everything the line has learned, as a flat
  dict of CPU tensors (safetensors-ready: snapshots never pickle), and back.
- `config` (the kind's `DetectorSettings`): `config.fingerprint()` guards snapshots,
  `model_id` names the model in the result table.
- Optional capabilities are declared, not probed: `supports_references` says whether
  `add_normal_references(images)` (k normal images of the line) is available, and
  `references_mid_stream` whether it may also be called after frames, adding to what the
  detector holds (otherwise references come before the first frame: a line given references
  mid-stream starts afresh with them).
- `paper_figures(dataset, config, shots)`: the paper's reference figures for `evaluate`, where
  the paper reports some for that dataset, setting and number of normal references.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import numpy as np
import torch

from .config import DetectorSettings


@dataclass
class DetectionResult:
    """One frame's verdict: the image score, the anomaly map at the model's input resolution
    (S x S float32, covering the centre crop the model saw) and named parts for inspection
    (each kind documents its own; e.g. RareCLIP's `text_map`, `preliminary_score`)."""

    score: float
    anomaly_map: np.ndarray
    parts: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PaperFigures:
    """A paper's reported figures for one dataset and setting, in %: per metric name (the
    `evaluate` table's columns) a (mean, std or None) pair, or None where the paper reports the
    metric but its value is not readable from our copy. Metrics absent were not reported."""

    source: str  # e.g. "RareCLIP paper, Table 1"
    row: str  # e.g. "RareCLIP, online"
    values: dict[str, Optional[tuple[float, Optional[float]]]]
    note: str = ""  # how the paper's setting differs from a run here, if it does


class Detector(ABC):
    """One product line's anomaly detector (see the module docstring for the contract)."""

    kind: ClassVar[str]
    supports_references: ClassVar[bool] = False
    references_mid_stream: ClassVar[bool] = False
    config: DetectorSettings

    @abstractmethod
    def encode(self, images: list, timings: Optional[dict[str, float]] = None) -> list[Any]:
        """Per-frame features of PIL images or H x W x 3 uint8 arrays; no state involved."""

    @abstractmethod
    def step_features(
        self, features: Any, update: Optional[bool] = None, timings: Optional[dict[str, float]] = None
    ) -> DetectionResult:
        """Score one encoded frame and, with `update`, learn from it. `timings`: when a dict is
        given, seconds per named stage are added to it (see `rareclip_core.timing`)."""

    def step(self, image, update: Optional[bool] = None, timings: Optional[dict[str, float]] = None) -> DetectionResult:
        """`encode` then `step_features` for one frame."""
        return self.step_features(self.encode([image], timings)[0], update, timings)

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything the line has learned, as a flat dict of CPU tensors."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a `state_dict()` of a detector with the same config; ValueError if it does not fit."""

    @abstractmethod
    def reset(self) -> None:
        """Forget everything the line has learned (e.g. after a product changeover)."""

    @property
    def model_id(self) -> str:
        return self.config.model_id

    def add_normal_references(self, images: list) -> None:
        """Learn from k known-good images of the line; only where `supports_references`."""
        raise NotImplementedError(f"detector kind {self.kind!r} takes no normal references")

    @classmethod
    def paper_figures(cls, dataset: str, config: DetectorSettings, shots: int = 0) -> Optional[PaperFigures]:
        """The paper's figures for `dataset` with this config's setting and `shots` normal
        references, or None."""
        return None
