"""LineActor: one product line's detector, scoring frames strictly in sequence order, once each."""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import ray
import torch
import torch.nn.functional as F

from configs.pipeline import SnapshotConfig, config_default
from rareclip_core import Detector, DetectorSettings, build_detector
from rareclip_core.data.frames import FrameDecoding
from rareclip_core.ops.threshold import robust_threshold

from .frames import Frame
from .reference_log import ReferenceAddition, ReferenceLog, reference_images
from .result_table import STATUS_ERROR, STATUS_OK
from .snapshots import SnapshotStore

log = logging.getLogger(__name__)
CALIBRATION_KEY = "line.threshold_calibration"  # in a snapshot's state beside the detector's tensors


def utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc)


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
    backbone_batch: int = config_default("backbone_batch")  # frames per backbone call
    gap_timeout_s: float = config_default("gap_timeout_s")  # wait this long for a missing seq, then an error row
    snapshot_root: Optional[str] = None  # None: no snapshots
    snapshot_keep: int = config_default("keep", SnapshotConfig)
    supervisor_name: Optional[str] = None
    references: tuple[str, ...] = ()  # normal reference images the line learns first (k-shot)
    reference_log: Optional[str] = None  # folder of the references added while it runs (ReferenceLog)
    decoding: FrameDecoding = FrameDecoding()  # how reference images are decoded (as the line's frames are)


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
            start_afresh(self.detector, self.configured_references + addition.files, self.decoding)
            self.restart_calibration()

    def _calibrate(self, score: float) -> None:
        """With `auto`, collect ok scores until there are `frames`, then fix the threshold."""
        if self.auto is None or self.threshold is not None:
            return
        self.calibration.append(float(score))
        if len(self.calibration) == self.auto.frames:
            self.threshold = robust_threshold(self.calibration, self.auto.mads)

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
        return F.interpolate(m, size=(self.map_resolution,) * 2, mode="area")[0, 0].numpy().astype(self.map_dtype)

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


@ray.remote(max_restarts=-1)
class LineActor:
    """Ray wrapper of a LineSequencer; rows go to the ResultWriter. A gap (a missing seq while
    later ones wait) lasting `gap_timeout_s` ends in an error row for the missing frame.

    On (re)start the actor restores the newest valid snapshot of its line and tells the
    supervisor, which has ingestion replay the frames after it."""

    def __init__(self, line_id: str, detector_config: DetectorSettings, writer_name: str, settings: LineSettings):
        """`writer_name`: the ResultWriter's actor name (a name, not a handle: a restart must not
        depend on a constructor argument kept in the object store)."""
        self.error: Optional[str] = None  # why the detector could not be built (reported by `progress`)
        try:
            detector = build_detector(detector_config)
        except Exception as err:  # noqa: BLE001 - reported to the driver, which stops the job with it
            self.error = f"{type(err).__name__}: {err}"
            return
        self.sequencer = LineSequencer(line_id, detector, settings)
        self.writer = ray.get_actor(writer_name)
        self.gap_timeout_s = settings.gap_timeout_s
        self.gap_since: Optional[float] = None
        self.writes: list = []
        self.watcher = None
        self.store = SnapshotStore(settings.snapshot_root, line_id) if settings.snapshot_root else None
        self.references = settings.references
        self.snapshot_keep = settings.snapshot_keep
        self.generation = 0  # bumped by restore/reset: a snapshot taken across one is stale
        restored = self.restore()
        if settings.supervisor_name:
            try:
                rejected = self.store.rejected if self.store else []
                ray.get_actor(settings.supervisor_name).line_started.remote(line_id, restored, rejected)
            except ValueError:
                pass  # first start: the supervisor is created after the lines

    async def submit(self, frames: list[Frame]) -> int:
        if self.watcher is None:
            self.watcher = asyncio.get_running_loop().create_task(self._watch_gaps())
        self.sequencer.buffer(frames)
        while rows := self.sequencer.score_next():
            self._send(rows)  # each batch's rows at once (a verdict waits for no later frame)
            await asyncio.sleep(0)  # and other calls (progress, snapshot) are served between batches
        self._send([])  # frames that wait for a missing seq start the gap clock
        return self.sequencer.next_seq

    def _send(self, rows: list[dict]) -> None:
        if rows:
            self.writes.append(self.writer.write.remote(rows))
            if len(self.writes) >= 256:  # without snapshots nothing else clears finished writes
                _, self.writes = ray.wait(self.writes, num_returns=len(self.writes), timeout=0)
        if not self.sequencer.pending:
            self.gap_since = None
        elif rows or self.gap_since is None:
            self.gap_since = time.monotonic()  # a gap starts (or restarts after progress)

    async def _watch_gaps(self) -> None:
        while True:
            await asyncio.sleep(min(0.25, self.gap_timeout_s / 4))
            if self.gap_since is not None and time.monotonic() - self.gap_since >= self.gap_timeout_s:
                seq = self.sequencer.next_seq
                log.warning("line %s: frame %d did not arrive within %.1fs", self.sequencer.line_id, seq, self.gap_timeout_s)
                self._send(self.sequencer.skip_missing(f"frame {seq} never arrived within {self.gap_timeout_s}s"))

    async def wait_until(self, seq: int) -> int:
        """Return once every frame before `seq` is scored and its row handed to the writer."""
        while self.sequencer.next_seq < seq:
            await asyncio.sleep(0.02)
        writes, self.writes = self.writes, []
        await asyncio.gather(*writes)
        return self.sequencer.next_seq

    def add_references(self, uris: list[str]) -> int:
        """Normal references for this line from the next frame on (an operator's `references
        add`): recorded in the line's reference log first, so a restore applies them again at
        the same seq. Returns that seq."""
        if not self.sequencer.detector.supports_references:
            raise ValueError(f"detector kind {self.sequencer.detector.kind!r} takes no normal references")
        if self.sequencer.reference_log is None:
            raise ValueError("this job keeps no reference log (LineSettings.reference_log)")
        detector = self.sequencer.detector
        if detector.references_mid_stream:  # a refusal (too many references, say) comes now, not at the frame
            state = detector.state_dict()
            try:
                detector.add_normal_references(reference_images(uris, self.sequencer.decoding))
            finally:
                detector.load_state_dict(state)
        at_seq = self.sequencer.next_seq
        self.sequencer.reference_log.add(at_seq, uris)
        return at_seq

    def progress(self) -> dict:
        if self.error:
            return {"error": self.error}
        return {
            "next_seq": self.sequencer.next_seq,
            "pending": len(self.sequencer.pending),
        }

    async def snapshot(self) -> Optional[int]:
        """Save the line's state once the writer has persisted every row before it; returns
        the seq the snapshot reaches, or None when it was not taken. Rows are flushed first so
        that a snapshot never gets ahead of the result table (a writer crash then only needs a
        replay from it). Not taken: when the writer has not persisted every row before it (it
        restarted and lost buffered rows, which the replay it triggers writes again), or when
        the line restored or reset meanwhile (the state captured is no longer the line's)."""
        state = {**self.sequencer.detector.state_dict(), **self.sequencer.threshold_state()}
        next_seq = self.sequencer.next_seq
        generation = self.generation
        writes, self.writes = self.writes, []
        await asyncio.gather(*writes)
        await self.writer.flush.remote()
        persisted = (await self.writer.status.remote())["last_seq"].get(self.sequencer.line_id, -1)
        if generation != self.generation or persisted < next_seq - 1:
            log.info("line %s: snapshot at seq %d not taken (table at %d)", self.sequencer.line_id, next_seq, persisted)
            return None
        config = self.sequencer.detector.config
        self.store.save(state, next_seq, config.fingerprint(), config.fingerprinted_settings())
        self.store.prune(self.snapshot_keep)
        return next_seq

    def node_id(self) -> str:
        """The Ray node this actor runs on."""
        return ray.get_runtime_context().get_node_id()

    def restore(self, at_most: Optional[int] = None) -> int:
        """Load the newest valid snapshot (covering at most `at_most` frames), or start fresh
        at seq 0; frames waiting in the buffer are dropped (ingestion replays them). Snapshots
        past `at_most` are deleted: they belong to the timeline being left (an operator's
        restore), and a later restart must not go back to them."""
        self.generation += 1
        detector = self.sequencer.detector
        info, state = self.store.load_latest(detector.config.fingerprint(), at_most) if self.store else (None, {})
        if self.store and at_most is not None:
            for newer in self.store.list():
                if newer.next_seq > at_most:
                    self.store.delete(newer)
        if info is None:
            self._start_afresh()
        else:
            self.sequencer.load_threshold_state(state)
            detector.load_state_dict({k: v for k, v in state.items() if k != CALIBRATION_KEY})
        self.sequencer.next_seq = info.next_seq if info else 0
        self.sequencer.pending.clear()
        self.gap_since = None
        return self.sequencer.next_seq

    def _start_afresh(self) -> None:
        start_afresh(self.sequencer.detector, self.references, self.sequencer.decoding)
        self.sequencer.restart_calibration()

    async def reset(self) -> int:
        """Start the line's learning afresh from its current seq (e.g. a product changeover),
        with only its configured normal references: a snapshot of that state is taken, then the older snapshots are deleted (so a
        restart can never bring back what the line had learned). Returns the seq of the first
        frame scored with the empty state."""
        self.generation += 1
        self._start_afresh()
        reset_at = self.sequencer.next_seq  # frames from here on see the empty state
        if self.store:
            seq = await self.snapshot()
            if seq is None:
                raise RuntimeError(
                    f"line {self.sequencer.line_id}: reset, but its snapshot could not be taken (the result "
                    "table is behind the line, or it restored meanwhile); older snapshots are kept: reset again"
                )
            for info in self.store.list():
                if info.next_seq != seq:
                    self.store.delete(info)
        return reset_at
