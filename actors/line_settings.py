"""How one line actor scores, stores and recovers: settings the driver builds from the pipeline
config and hands to the actor (light: no torch, so that the driver and the actor's module stay so)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from configs.pipeline import SnapshotConfig, config_default
from rareclip_core.data.frames import FrameDecoding


@dataclass(frozen=True)
class AutoThreshold:
    """`threshold: auto`: calibrated on the line's first `frames` ok scores (`robust_threshold`
    with `mads`), then fixed; rows before it is known have neither threshold nor is_anomaly."""

    frames: int = 20
    mads: float = 3.0


@dataclass(frozen=True)
class LineSettings:
    """How one line actor scores, stores and recovers (from the pipeline config)."""

    threshold: Optional[float] = None  # is_anomaly = score >= threshold; None leaves it empty
    auto_threshold: Optional[AutoThreshold] = None  # calibrate the threshold from the first scores instead
    map_resolution: Optional[int] = config_default("map_resolution")  # side of the stored anomaly map; None: none
    map_dtype: str = config_default("map_dtype")
    map_resize: str = config_default("map_resize")  # "area" | "bilinear" (align_corners=True)
    backbone_batch: int = config_default("backbone_batch")  # frames per backbone call
    gap_timeout_s: float = config_default("gap_timeout_s")  # wait this long for a missing seq, then an error row
    snapshot_root: Optional[str] = None  # None: no snapshots
    snapshot_keep: int = config_default("keep", SnapshotConfig)
    supervisor_name: Optional[str] = None
    references: tuple[str, ...] = ()  # normal reference images the line learns first (k-shot)
    reference_log: Optional[str] = None  # folder of the references added while it runs (ReferenceLog)
    decoding: FrameDecoding = FrameDecoding()  # how reference images are decoded (as the line's frames are)
