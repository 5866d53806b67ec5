"""LineActor: one product line's detector, scoring frames strictly in sequence order, once each.

Every process that holds a handle to a line actor imports this module (Ray loads the actor's
class to make the handle: the ingestion actors, the supervisor, the driver), so it stays light:
the actor imports its sequencer, and with it torch, when it is constructed."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Optional

import ray

from rareclip_core import DetectorSettings, build_detector

from .frames import Frame
from .line_settings import LineSettings
from .reference_log import reference_images
from .snapshots import SnapshotStore

if TYPE_CHECKING:
    from .line_sequencer import LineSequencer

log = logging.getLogger(__name__)


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
        from .line_sequencer import LineSequencer  # here: the module of every handle's class stays light

        self.sequencer: LineSequencer = LineSequencer(line_id, detector, settings)
        self.writer = ray.get_actor(writer_name)
        self.gap_timeout_s = settings.gap_timeout_s
        self.gap_since: Optional[float] = None
        self.writes: list = []
        self.watcher = None
        self.store = SnapshotStore(settings.snapshot_root, line_id) if settings.snapshot_root else None
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
        state = self.sequencer.state()
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
            self.sequencer.learn_afresh()
        else:
            self.sequencer.load_state(state)
        self.sequencer.next_seq = info.next_seq if info else 0
        self.sequencer.pending.clear()
        self.gap_since = None
        return self.sequencer.next_seq

    async def reset(self) -> int:
        """Start the line's learning afresh from its current seq (e.g. a product changeover),
        with only its configured normal references: a snapshot of that state is taken, then the older snapshots are deleted (so a
        restart can never bring back what the line had learned). Returns the seq of the first
        frame scored with the empty state."""
        self.generation += 1
        self.sequencer.learn_afresh()
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
