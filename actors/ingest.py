"""IngestActor: reads a source for some lines, decodes and validates frames (in threads, side by
side), feeds line actors in order with a bounded number of frames in flight per line."""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import ray

from configs.pipeline import config_default, open_source
from rareclip_core.data.frames import FrameDecoding, FrameError, decode_frame
from rareclip_core.data.sources import FrameRef, read_uri

from .feed_control import FeedControl
from .frames import Frame
from .names import line_actor_name
from .supervisor import tell_supervisor

log = logging.getLogger(__name__)


def load_frame(ref: FrameRef, decoding: FrameDecoding = FrameDecoding()) -> Frame:
    """Read and decode one frame; any failure becomes a refused Frame with the reason."""
    now = time.time()
    try:
        data = ref.data if ref.data is not None else read_uri(ref.uri)
        return Frame(ref.line_id, ref.seq, ref.uri, now, decode_frame(data, decoding))
    except FrameError as err:
        return Frame(ref.line_id, ref.seq, ref.uri, now, None, str(err))
    except OSError as err:
        return Frame(ref.line_id, ref.seq, ref.uri, now, None, f"cannot read {ref.uri}: {err.strerror or err}")


def unfinished(in_flight: dict[str, list]) -> dict[str, list]:
    """Per line, the submits (object refs) not finished yet; one `ray.wait` for all lines."""
    refs = [ref for line_refs in in_flight.values() for ref in line_refs]
    if not refs:
        return in_flight
    done = set(ray.wait(refs, num_returns=len(refs), timeout=0)[0])
    return {line: [ref for ref in line_refs if ref not in done] for line, line_refs in in_flight.items()}


def take(iterator, n: int) -> list[FrameRef]:
    """The next (up to) n items of `iterator`."""
    refs = []
    for ref in iterator:
        refs.append(ref)
        if len(refs) == n:
            break
    return refs


MIN_FRAMES_PER_SUBMIT = 4  # a call to a line costs more than a no-work frame (docs/BENCHMARKS.md, "The pipeline alone")


def frames_per_submit(backbone_batch: int, max_in_flight: int) -> int:
    """Frames per call to a line: whole backbone batches, at least MIN_FRAMES_PER_SUBMIT frames
    where `max_in_flight` allows. A call takes only frames already there (a live line without a
    backlog still gets one frame per call), and the line scores them one by one in any case."""
    batches = min(-(-MIN_FRAMES_PER_SUBMIT // backbone_batch), max_in_flight // backbone_batch)  # ceil, then the cap
    return max(1, batches) * backbone_batch


@dataclass(frozen=True)
class IngestSettings:
    max_in_flight: int = config_default("max_in_flight")  # frames submitted to a line but not yet scored
    frames_per_submit: int = 1  # frames per call to a line (`frames_per_submit()`: whole backbone batches)
    poll_s: float = 1.0  # a live source is listed again this often when it has nothing new
    ledger_dir: Optional[str] = None  # where each line's frames get their seqs (folder, manifest)
    decoding: FrameDecoding = FrameDecoding()  # pixel limit and high-bit frames (refused: an error row)
    decode_threads: int = config_default("decode_threads")  # frames decoded side by side (PIL: without the GIL)


@ray.remote(num_cpus=0, max_concurrency=3, max_restarts=-1)  # a feed, the one replacing it, a control call
class IngestActor:
    def __init__(
        self, source_config, lines: list[str], job: str, settings: IngestSettings,
        index: int = 0, supervisor_name: Optional[str] = None,
    ):
        """`lines`: those it feeds from the start (a live job may add more, `rewind`); `job`: the
        job's key, by which it finds each line's actor by name (names, not handles: a restart must
        not depend on constructor arguments kept in the object store)."""
        self.source = open_source(source_config, settings.ledger_dir)
        self.decoding = settings.decoding
        self.lines = lines
        self.job = job
        self.line_actors: dict[str, object] = {}  # line -> its LineActor, found by name when first fed
        self.chunk = settings.frames_per_submit
        self.max_chunks_in_flight = max(1, settings.max_in_flight // self.chunk)
        self.poll_s = settings.poll_s
        self.decode_threads = settings.decode_threads
        self.decoder = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
        self.stopped = threading.Event()
        self.paused = threading.Event()  # no new frames to the lines (`pause`)
        self.pause_lock, self.pause_number = threading.Lock(), 0
        self.control = FeedControl()  # the current `run` (an older one ends), its rewinds and drops
        self.supervisor_name = supervisor_name
        if supervisor_name:
            try:  # a restart (the first start comes before the supervisor exists)
                ray.get_actor(supervisor_name).ingest_started.remote(index)
            except ValueError:
                pass

    def ready(self) -> bool:
        """Constructed (its source open): the job waits for this before creating the supervisor,
        so that only a restart reports itself to the supervisor."""
        return True

    def totals(self) -> dict[str, int] | None:
        """Frames per line in a finite source; None for a live one (it grows)."""
        if self.source.live:
            return None
        return {line: self.source.frame_count(line) for line in self.lines}

    def stop(self) -> None:
        self.stopped.set()

    def pause(self, paused: bool, number: int) -> None:
        """Submit no new frames (the writer refuses rows) until called with False; a feed
        neither ends nor forgets where it stands meanwhile. `number`: the supervisor numbers its
        calls, and one older than a call already taken is void (queued calls may start in any order)."""
        with self.pause_lock:
            if number < self.pause_number:
                return
            self.pause_number = number
            if paused:
                self.paused.set()
            else:
                self.paused.clear()

    def rewind(self, line_id: str, seq: int, feed: int) -> bool:
        """Have feed number `feed` (running, or asked for and not begun yet) go back to `seq` for
        a line (its actor restored a snapshot), or feed a line from `seq` that it did not feed
        yet (a line added to a live job). False when that feed has ended or was replaced: the
        caller starts a new `run` instead."""
        return self.control.rewind(line_id, seq, feed)

    def drop(self, line_id: str, feed: int) -> Optional[int]:
        """Stop feeding a line (retired: its folder or subject is gone): the running feed lists it
        no more, feeds it what it already recorded, and lets it go once the line has scored all
        of it. Call again until it returns the seq the line was fed up to; None meanwhile, and
        while no feed runs, or while feed number `feed` has not begun. A later `rewind` of the
        line feeds it again."""
        return self.control.drop(line_id, feed)

    def run(self, start_seqs: dict[str, int], feed: int, delay_s: float = 0.0) -> dict[str, int]:
        """Feed the lines of `start_seqs` from their start seqs until the source ends (or, for a
        live source, until `stop`). Lines are interleaved round by round: each round decodes up
        to `chunks_per_round` chunks of every line that has room (fewer than `max_in_flight`
        frames submitted and not yet scored), then submits them in order; a full line is passed
        over, so a slow or stalled line holds back no other. Returns next seq per line.
        Sequence numbers are source positions, so any seq can be read again for a replay.
        `feed`: the supervisor's number for this feed (`FeedControl`). A `run` replaces an older
        one still running (the supervisor started a new feed when it could not reach this
        actor): the older one ends, so that the actor's threads stay free for `stop`; one older
        than a feed already begun returns at once. `delay_s`: wait this long first (the
        supervisor's back-off after feeds that failed at once), or until `stop`; the feed is
        this one meanwhile, so a `rewind` asked then is taken when it starts, and a newer `run`
        replaces it."""
        next_seq = dict(start_seqs)
        if not self.control.begin(feed):
            return next_seq
        if delay_s:
            self.stopped.wait(delay_s)
        lines = list(next_seq)
        for line in lines:  # another ingestion actor may have fed a line since (it left and rejoined)
            self.source.forget(line)
        iterators = {line: self.source.frames(line, next_seq[line]) for line in lines}
        listed_at = {line: time.monotonic() for line in lines}
        in_flight: dict[str, list] = {line: [] for line in lines}
        while not self.stopped.is_set() and self.control.is_current(feed):
            progressed = False
            rewinds, drops = self.control.take(feed)
            for line, seq in rewinds.items():
                self.line_actors.pop(line, None)  # found by name again: a retired line that rejoins has a new actor
                if line not in in_flight:  # a line added to the job, or one that rejoined
                    lines.append(line)
                    in_flight[line] = []
                    self.source.forget(line)
                iterators[line] = self.source.frames(line, seq)
                next_seq[line] = seq
                listed_at[line] = time.monotonic()
                progressed = True
            if self.paused.is_set():
                time.sleep(0.05)
                continue
            in_flight = unfinished(in_flight)
            room = {line: self.max_chunks_in_flight - len(in_flight[line]) for line in lines}
            # chunks a line may have decoded per round: a few lines keep every thread busy too
            chunks_per_round = max(1, self.decode_threads // (len(lines) * self.chunk))
            taken = {
                line: take(iterators[line], self.chunk * min(chunks_per_round, room[line]))
                for line in lines
                if room[line] > 0
            }
            for line, refs in taken.items():
                if not refs and line in drops and not in_flight[line]:  # all it was fed is scored
                    self.control.let_go(line, feed, next_seq.pop(line))
                    self.line_actors.pop(line, None)
                    lines.remove(line)
                    del iterators[line], in_flight[line], listed_at[line]
                    progressed = True
                elif not refs and line not in drops and self.source.live and time.monotonic() - listed_at[line] >= self.poll_s:
                    iterators[line] = self.source.frames(line, next_seq[line])  # look for new files
                    listed_at[line] = time.monotonic()
            for text in self.source.notices():  # files the source left out
                tell_supervisor(self.supervisor_name, text)
            refs = [ref for line_refs in taken.values() for ref in line_refs]
            decoded = iter(self.decoder.map(lambda ref: load_frame(ref, self.decoding), refs))
            for line, line_refs in taken.items():
                for start in range(0, len(line_refs), self.chunk):
                    frames = [next(decoded) for _ in line_refs[start : start + self.chunk]]
                    in_flight[line].append(self._line_actor(line).submit.remote(frames))
                if line_refs:
                    progressed = True
                    next_seq[line] = line_refs[-1].seq + 1
            if not progressed:
                full = [ref for line in lines if room[line] <= 0 for ref in in_flight[line]]
                if full:  # the lines with frames left may all be full: wait for one to take more
                    ray.wait(full, num_returns=1, timeout=min(0.2, self.poll_s))
                    continue
                if not self.source.live and self.control.end_unless_asked(feed):
                    break
                time.sleep(min(0.2, self.poll_s))
        for line, seq in self.control.end(feed).items():  # taken too late (a stop): the feed ends there
            next_seq[line] = min(seq, next_seq.get(line, seq))
        if not self.control.is_current(feed):  # replaced: the newer feed sees to the lines
            return next_seq
        for ref in [r for refs in in_flight.values() for r in refs]:
            try:
                ray.get(ref)
            except ray.exceptions.RayError as err:  # a line died: its restart triggers a rewind
                log.info("a submit failed: %s", type(err).__name__)
        return next_seq

    def _line_actor(self, line: str):
        if line not in self.line_actors:
            self.line_actors[line] = ray.get_actor(line_actor_name(self.job, line))
        return self.line_actors[line]
