"""LineSequencer: a line's ordering and scoring without Ray: frames scored strictly in sequence
order, once each, and the line's state (detector and threshold calibration) as one dict."""
from __future__ import annotations

import datetime as dt
import time
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from rareclip_core import Detector
from rareclip_core.data.frames import FrameDecoding
from rareclip_core.ops.threshold import robust_threshold

from .frames import Frame
from .line_settings import LineSettings
from .reference_log import ReferenceAddition, ReferenceLog, reference_images
from .result_table import STATUS_ERROR, STATUS_OK

CALIBRATION_KEY = "line.threshold_calibration"  # in a snapshot's state beside the detector's tensors


def utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc)


def start_afresh(detector: Detector, references: tuple[str, ...], decoding: FrameDecoding = FrameDecoding()) -> None:
    """Empty the detector, then have it learn the line's normal references (k-shot), if any."""
    detector.reset()
    if references:
        detector.add_normal_references(reference_images(references, decoding))


class LineSequencer:
    """The ordering and scoring logic of a line, without Ray: frames are buffered by seq and
    scored when contiguous; a frame whose seq was already scored is skipped; refused frames
    become error rows without touching the detector. References added at a seq (`reference_log`)
    are applied just before that frame, also when it is scored again after a restore."""

    def __init__(self, line_id: str, detector: Detector, settings: LineSettings, next_seq: int = 0):
        self.line_id = line_id
        self.detector = detector
        self.configured_references = settings.references
        self.decoding = settings.decoding
        self.reference_log = ReferenceLog(settings.reference_log, self.decoding) if settings.reference_log else None
        self.threshold = settings.threshold
        self.auto = settings.auto_threshold
        self.calibration: list[float] = []  # the first ok scores, while `auto` calibrates
        self.map_resolution = settings.map_resolution
        self.map_resize = settings.map_resize
        self.backbone_batch = settings.backbone_batch
        self.next_seq = next_seq
        self.map_dtype = np.dtype(settings.map_dtype)
        self.pending: dict[int, Frame] = {}

    def add(self, frames: list[Frame]) -> list[dict]:
        """Buffer frames and score every contiguous one; returns their result rows in order."""
        self.buffer(frames)
        rows = []
        while batch_rows := self.score_next():
            rows.extend(batch_rows)
        return rows

    def buffer(self, frames: list[Frame]) -> None:
        """Keep frames until their turn (a seq already scored is dropped)."""
        for frame in frames:
            if frame.seq >= self.next_seq:
                self.pending.setdefault(frame.seq, frame)

    def score_next(self) -> list[dict]:
        """Score the next contiguous buffered frames, one backbone batch at most; their rows in
        order ([] while the next seq has not arrived)."""
        batch = []
        while self.next_seq + len(batch) in self.pending and len(batch) < self.backbone_batch:
            batch.append(self.pending.pop(self.next_seq + len(batch)))
        rows = self._score(batch) if batch else []
        self.next_seq += len(batch)
        return rows

    def skip_missing(self, reason: str) -> list[dict]:
        """Give up on the missing next seq: an error row for it, then score what is ready."""
        row = self._row(Frame(self.line_id, self.next_seq, "", time.time(), None, reason))
        self.next_seq += 1
        return [row] + self.add([])

    def _score(self, frames: list[Frame]) -> list[dict]:
        valid = [f for f in frames if f.image is not None]
        features = iter(self.detector.encode([f.image for f in valid]) if valid else [])
        rows = []
        for frame in frames:
            for addition in self.reference_log.at(frame.seq) if self.reference_log else []:
                self._apply(addition)
            if frame.image is None:
                rows.append(self._row(frame))
                continue
            result = self.detector.step_features(next(features))
            rows.append(self._row(frame, result.score, self._stored_map(result.anomaly_map)))
            self._calibrate(result.score)
        return rows

    def _apply(self, addition: ReferenceAddition) -> None:
        """References added at a seq: a detector that takes them mid-stream adds them; any other
        starts afresh with the configured references and these (its references come first), and
        an `auto` threshold calibrates again."""
        if self.detector.references_mid_stream:
            self.detector.add_normal_references(reference_images(addition.files, self.decoding))
        else:
            self.learn_afresh(addition.files)

    def _calibrate(self, score: float) -> None:
        """With `auto`, collect ok scores until there are `frames`, then fix the threshold."""
        if self.auto is None or self.threshold is not None:
            return
        self.calibration.append(float(score))
        if len(self.calibration) == self.auto.frames:
            self.threshold = robust_threshold(self.calibration, self.auto.mads)

    def learn_afresh(self, added: tuple[str, ...] = ()) -> None:
        """Empty the detector, have it learn the configured references and `added`, and (with
        `auto`) calibrate the threshold again."""
        start_afresh(self.detector, self.configured_references + added, self.decoding)
        self.restart_calibration()

    def state(self) -> dict[str, torch.Tensor]:
        """What a snapshot keeps: the detector's tensors and the threshold's calibration."""
        return {**self.detector.state_dict(), **self.threshold_state()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Back to a snapshot (`state`)."""
        self.load_threshold_state(state)
        self.detector.load_state_dict({k: v for k, v in state.items() if k != CALIBRATION_KEY})

    def restart_calibration(self) -> None:
        """With `auto`, calibrate again from the next ok scores (a line started afresh)."""
        if self.auto is not None:
            self.threshold, self.calibration = None, []

    def threshold_state(self) -> dict[str, torch.Tensor]:
        """What a snapshot keeps of the calibration: the scores collected (the threshold follows)."""
        if self.auto is None:
            return {}
        return {CALIBRATION_KEY: torch.tensor(self.calibration, dtype=torch.float64)}

    def load_threshold_state(self, state: dict[str, torch.Tensor]) -> None:
        """Back to a snapshot's calibration: the same scores give bitwise the same threshold."""
        self.restart_calibration()
        for score in state.get(CALIBRATION_KEY, torch.zeros(0, dtype=torch.float64)).tolist():
            self._calibrate(score)

    def _stored_map(self, anomaly_map: np.ndarray) -> Optional[np.ndarray]:
        if self.map_resolution is None:
            return None
        m = torch.from_numpy(anomaly_map)[None, None]
        size = (self.map_resolution,) * 2
        if self.map_resize == "bilinear":
            m = F.interpolate(m, size=size, mode="bilinear", align_corners=True)
        else:
            m = F.interpolate(m, size=size, mode="area")
        return m[0, 0].numpy().astype(self.map_dtype)

    def _row(self, frame: Frame, score: Optional[float] = None, anomaly_map=None) -> dict:
        scored = time.time()
        ok = frame.image is not None
        return {
            "line_id": self.line_id,
            "seq": frame.seq,
            "uri": frame.uri,
            "ingest_time": utc(frame.ingest_time),
            "scored_time": utc(scored),
            "latency_ms": (scored - frame.ingest_time) * 1000,
            "score": score,
            "is_anomaly": None if (score is None or self.threshold is None) else bool(score >= self.threshold),
            "threshold": self.threshold,
            "status": STATUS_OK if ok else STATUS_ERROR,
            "error": frame.error,
            "model_id": self.detector.model_id,
            "map_uri": None,
            "anomaly_map": anomaly_map,
            "date": utc(scored).date().isoformat(),
        }
