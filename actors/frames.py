"""What travels between actors: one frame, decoded or refused."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass
class Frame:
    line_id: str
    seq: int
    uri: str
    ingest_time: float  # unix seconds
    image: Optional[np.ndarray]  # H x W x 3 uint8; None when the frame was refused
    error: Optional[str] = None  # why it was refused
