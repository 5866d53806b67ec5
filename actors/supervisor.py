"""Supervisor: snapshots every line on schedule, notices restarts, and has lines restore and
ingestion replay so that every frame ends with exactly one row and the uncrashed score.

Ray restarts a dead actor (on another node when its node is gone) but with no state. Here:
- a line actor restores its newest valid snapshot in its constructor and calls `line_started`;
  the supervisor has that line's ingest replay from the snapshot's seq;
- a restarted writer (its buffered rows are lost) calls `writer_started`; every line restores
  its newest snapshot (never ahead of the table: lines flush before snapshotting) and replays;
- a dead ingest actor's feed fails; the supervisor starts a new feed from the lines' positions.
Rows a replay produces twice are dropped by the writer."""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Optional

import ray

from .result_table import append_event

log = logging.getLogger(__name__)
CALL_TIMEOUT_S = 2.0
PAUSED_FLUSH_EVERY_S = 1.0  # while ingestion is paused, how often the writer is asked to try writing again
FEED_STEADY_S = 30.0  # a feed failing sooner than this after its start counts toward the back-off
FEED_RETRY_MAX_S = 30.0  # the longest wait before a failed feed is started again
LINE_RETRY_MAX_S = 60.0  # the longest wait before a line whose detector could not be built is restarted again


def tell_supervisor(supervisor_name: Optional[str], text: str, call: str = "notice") -> None:
    """Pass a notice to the job's supervisor through its method `call` (`notice`, or one that also
    acts on it; it prints the notice as it comes and keeps it for the summary); only logged where
    there is none (no job, or the job is ending)."""
    try:
        getattr(ray.get_actor(supervisor_name), call).remote(text) if supervisor_name else log.warning(text)
    except ValueError:
        log.warning(text)


async def _call(ref, timeout: Optional[float] = CALL_TIMEOUT_S):
    """Await an actor call (`timeout` None: however long it takes); None if the actor is dead
    or restarting, or the call outlasted `timeout`."""
    try:
        return await asyncio.wait_for(ref, timeout)
    except (asyncio.TimeoutError, ray.exceptions.RayError):
        return None


@ray.remote(num_cpus=0, max_restarts=0)
class Supervisor:
    def __init__(
        self,
        writer,
        lines: dict,
        ingest: list,
        every_frames: Optional[int] = None,
        every_s: Optional[float] = None,
        results_dir: Optional[str] = None,
    ):
        """`ingest`: list of (IngestActor handle, line ids it feeds); `results_dir`: the table whose
        event log gets every event and notice (`append_event`)."""
        self.results_dir = results_dir
        self.writer = writer
        self.lines = lines
        self.ingest = ingest
        self.ingest_of = {line: i for i, (_, group) in enumerate(ingest) for line in group}
        self.every_frames = every_frames
        self.every_s = every_s
        self.feeds: dict[int, Optional[ray.ObjectRef]] = {}
        self.feeds_started = 0  # feeds are numbered, so that an ingest actor knows the newest (`FeedControl`)
        self.feed_number: dict[int, int] = {}  # the number of each ingest actor's newest feed
        self.feed_started: dict[int, float] = {}  # when each feed last started (monotonic)
        self.feed_failures: dict[int, int] = {}  # failures in a row, each soon after its feed started
        self.fed_to: dict[str, int] = {}  # where a finished feed left each line
        self.totals: dict[str, Optional[int]] = {}
        self.progress: dict[str, int] = {line: 0 for line in lines}
        self.replays: Counter = Counter()  # per line: a progress read before a replay is stale
        self.line_failures: Counter = Counter()  # per line: restarts in a row whose detector could not be built
        self.snapshot_seq = {line: 0 for line in lines}
        self.snapshot_time = {line: time.monotonic() for line in lines}
        self.snapshotting: dict[str, asyncio.Task] = {}
        self.events: list[str] = []
        self.event_counts: Counter = Counter()  # kind of recovery -> how many
        self.notices: list[str] = []  # what actors had the operator know (`notice`)
        self.stopping = False
        self.watcher = None
        self.added_watchers: list[asyncio.Task] = []  # the watch of each line added while running
        self.feed_locks = [asyncio.Lock() for _ in ingest]  # one rewind-or-restart of a feed at a time
        self.ingest_paused = False  # while the writer refuses rows (`writer_refusing`)
        self.pause_calls = 0  # pause calls are numbered: a threaded actor may start two queued ones in either order
        self.refusing_spells = 0  # times the writer began to refuse rows
        self.flush_tried = 0.0  # when the writer last tried to write, asked while ingestion is paused
        self.retired: dict[str, int] = {}  # line -> where it stood when retired (`retire_line`), until it rejoins

    async def start(self) -> None:
        """Start feeding every line from where it stands (a line that restored a snapshot of an
        earlier run of the job resumes after it instead of reading its frames again)."""
        for line, actor in self.lines.items():
            p = await _call(actor.progress.remote(), timeout=60)
            self.progress[line] = self.snapshot_seq[line] = p["next_seq"] if p else 0
        for i, (actor, group) in enumerate(self.ingest):
            totals = await actor.totals.remote()
            self.totals.update(totals or {line: None for line in group})
            self._start_feed(i)
        self.watcher = asyncio.get_running_loop().create_task(self._watch())

    # ---- notifications from restarted actors ---------------------------------------------------
    def _event(self, kind: str, text: str, counted: bool = True) -> None:
        self.events.append(text)
        if counted:
            self.event_counts[kind] += 1
        self._log(kind, text)

    def _log(self, kind: str, text: str) -> None:
        log.info(text)
        if self.results_dir:
            try:
                append_event(self.results_dir, kind, text)
            except OSError as err:  # a full disk: the job goes on, and says it at its end
                log.warning("event not logged (%s): %s", err, text)

    async def line_started(self, line: str, next_seq: int, rejected: Optional[list] = None) -> None:
        joining = line not in self.lines  # first built while the job runs: `add_line` asks where it stands
        self.line_failures.pop(line, None)
        if not joining:
            self._event("line restarts", f"line {line} restarted, restored at seq {next_seq}")
        for reason in rejected or []:
            self._event("snapshots rejected", f"line {line} rejected a snapshot: {reason}")
        if not joining:
            await self._replay(line, next_seq)

    async def add_line(self, line: str, actor, why: str) -> None:
        """A line joins the running job (it appeared in a watched folder or stream): fed by the
        ingest actor with the fewest lines, from where its actor stands (a snapshot of an
        earlier run of the job, or 0), watched and snapshotted like the others."""
        if line in self.lines or self.stopping:
            return
        p = await _call(actor.progress.remote(), timeout=60)
        seq = p["next_seq"] if p else 0
        i = min(range(len(self.ingest)), key=lambda k: len(self.ingest[k][1]))
        self.ingest[i][1].append(line)
        self.ingest_of[line] = i
        self.lines[line] = actor
        self.retired.pop(line, None)
        self.progress[line] = self.snapshot_seq[line] = seq
        self.snapshot_time[line] = time.monotonic()
        self._event("lines added", f"line {line} added at seq {seq}, fed by ingest {i}: {why}", counted=False)
        self.added_watchers.append(asyncio.get_running_loop().create_task(self._watch_line(line, actor)))
        await self._replay(line, seq)

    async def retire_line(self, line: str, why: str, actor_name: str) -> Optional[int]:
        """Let a line go whose folder or stream subject is gone (`why`): its ingest feeds it what
        it recorded and drops it, the line scores that, is snapshotted there and its actor ends
        (its GPU share is free again). Returns the seq it stopped at once the actor's name is
        free, so that the line can rejoin (`add_line`: its new actor restores that snapshot); None
        when the job stops first."""
        if line not in self.lines:
            return None
        i = self.ingest_of[line]
        while True:
            if self.stopping:
                return None
            async with self.feed_locks[i]:
                await self._check_feed(i)
                fed = await _call(self.ingest[i][0].drop.remote(line, self.feed_number[i])) if self.feeds.get(i) is not None else None
                if fed is not None:
                    self.ingest[i][1].remove(line)
                    del self.ingest_of[line]
                    break
            await asyncio.sleep(0.2)
        actor = self.lines.pop(line)  # its watch ends
        if line in self.snapshotting:
            await self.snapshotting[line]
        p = await _call(actor.progress.remote())
        seq = p["next_seq"] if p else self.progress[line]
        snapshot = await _call(actor.snapshot.remote(), timeout=60) if seq > self.snapshot_seq[line] else self.snapshot_seq[line]
        ray.kill(actor, no_restart=True)
        for name in (self.progress, self.snapshot_seq, self.snapshot_time):
            name.pop(line, None)
        self.retired[line] = seq
        restores = f"it restores its snapshot at seq {snapshot}" if snapshot is not None else "it restores its newest snapshot"
        self._event("lines retired", f"line {line} retired at seq {seq}: {why}; its actor stopped, and if it comes back "
                    f"{restores}", counted=False)
        while True:  # the name is free once the actor is gone
            try:
                ray.get_actor(actor_name)
            except ValueError:
                return seq
            await asyncio.sleep(0.1)

    def notice(self, text: str) -> None:
        """What an actor has the operator know (files its source left out, a writer that cannot
        write): printed as it comes and kept for the job's summary."""
        self.notices.append(text)
        self._log("notice", text)

    def ingest_started(self, index: int) -> None:
        """A restarted ingest actor: a feed it ran fails and `_check_feeds` starts it again (paused
        if ingestion is)."""
        self._event("ingest restarts", f"ingest {index} restarted (feeding {self.ingest[index][1]})")
        if self.stopping:  # the stop went to the instance that died
            self.ingest[index][0].stop.remote()
        if self.ingest_paused:
            self.pause_calls += 1
            self.ingest[index][0].pause.remote(True, self.pause_calls)

    async def writer_started(self, persisted: dict) -> None:
        """A restarted writer lost the rows it held (refused ones too): every line restores and
        replays, and ingestion goes on if it was paused."""
        self._event("writer restarts", f"writer restarted with rows persisted up to {persisted}")
        spell = self.refusing_spells
        await self._restore_lines(persisted, list(self.lines))
        self._resume_ingest_unless_refusing_since(spell)

    def writer_refusing(self, text: str) -> None:
        """The writer cannot write and holds all the rows it may (`text` says so): it refuses rows
        until it can write again. Ingestion pauses until then (`writer_refused`), so that the
        lines stop scoring frames whose rows would be thrown away; only the frames already
        submitted to them are scored (and scored again later)."""
        self.notice(text)
        self.refusing_spells += 1
        self._pause_ingest(True)

    async def writer_refused(self, persisted: dict, refused: dict) -> None:
        """The writer writes again after refusing rows while it could not (`refused`: line ->
        rows): those lines restore and replay, as after a writer restart, and ingestion goes on."""
        self._event("writer refusals", f"the writer writes again after refusing rows ({refused}): those lines score "
                    f"their frames again from their snapshots (rows persisted up to {persisted})")
        spell = self.refusing_spells
        await self._restore_lines(persisted, [line for line in refused if line in self.lines])
        self._resume_ingest_unless_refusing_since(spell)

    def _pause_ingest(self, paused: bool) -> None:
        self.ingest_paused = paused
        self.pause_calls += 1
        for actor, _ in self.ingest:
            actor.pause.remote(paused, self.pause_calls)

    def _resume_ingest_unless_refusing_since(self, spell: int) -> None:
        """Ingestion goes on after a restore, unless the writer began to refuse rows again while
        the lines restored (`spell`: the count of refusals before): then its own end resumes it."""
        if self.ingest_paused and self.refusing_spells == spell:
            self._pause_ingest(False)

    async def _restore_lines(self, persisted: dict, lines: list[str]) -> None:
        """Each line restores (side by side: loading a big line's snapshot takes seconds) its newest
        snapshot not past its persisted rows, and replays from it as soon as its restore is done."""

        async def restore(line: str) -> None:
            actor = self.lines.get(line)  # None: retired meanwhile
            # no time limit: a line that restored must replay, however long its snapshot took to load
            next_seq = await _call(actor.restore.remote(persisted.get(line, -1) + 1), timeout=None) if actor else None
            if next_seq is not None:  # a line that is itself restarting reports through line_started
                await self._replay(line, next_seq)

        await asyncio.gather(*(restore(line) for line in lines))

    async def line_restored(self, line: str, next_seq: int, why: str) -> None:
        """A line was made to load a snapshot while running (an operator's restore): replay."""
        self._event("operator restores", f"line {line} restored at seq {next_seq}: {why}")
        await self._replay(line, next_seq)

    async def _replay(self, line: str, seq: int) -> None:
        """Have the line's ingest feed it again from `seq`: a rewind of the running feed, or a
        new feed from every line's position. Replays of lines sharing an ingest actor (lines
        restarting together) take turns, so that each sees the feed the previous one left."""
        if line not in self.ingest_of:  # retired meanwhile
            return
        self.progress[line] = seq
        self.replays[line] += 1
        self.snapshot_seq[line] = min(self.snapshot_seq[line], seq)
        i = self.ingest_of[line]
        actor, group = self.ingest[i]
        async with self.feed_locks[i]:
            await self._check_feed(i)  # a feed that failed since the last check is noted, not overwritten
            if self.feeds.get(i) is not None and await _call(actor.rewind.remote(line, seq, self.feed_number[i])):
                return
            self._start_feed(i)

    # ---- the watch loop ----------------------------------------------------------------------------
    async def _watch(self) -> None:
        """The feeds and every line are watched side by side: a line whose step outlasts
        CALL_TIMEOUT_S (a big model on a CPU) delays neither the others' progress nor their snapshots."""
        await asyncio.gather(self._watch_feeds(), *(self._watch_line(line, actor) for line, actor in self.lines.items()))

    async def _watch_feeds(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            await self._check_feeds()
            if self.ingest_paused and time.monotonic() - self.flush_tried >= PAUSED_FLUSH_EVERY_S:
                self.flush_tried = time.monotonic()  # no row comes to make the writer try: ask it
                await _call(self.writer.try_flush.remote(), timeout=30)

    async def _watch_line(self, line: str, actor) -> None:
        while self.lines.get(line) is actor:  # until the line is retired
            await asyncio.sleep(0.2)
            replays = self.replays[line]
            p = await _call(actor.progress.remote())
            if p is not None and "error" in p:
                await self._restart_failed_line(line, actor, p["error"])
                continue
            # read before the line restored and replayed, its position would start feeds past it
            if p is not None and self.lines.get(line) is actor and self.replays[line] == replays:
                self.progress[line] = p["next_seq"]
                self._maybe_snapshot(line, actor)

    async def _restart_failed_line(self, line: str, actor, error: str) -> None:
        """A line Ray restarted whose detector could not be built (a GPU still full, a weights
        share away: its actor says why) is said, and restarted again after a back-off until it
        builds; it then restores and replays as any restarted line."""
        self.line_failures[line] += 1
        delay = min(LINE_RETRY_MAX_S, 2.0 ** (self.line_failures[line] - 1))
        self._event("line start failures", f"line {line} could not start again ({error}); restarting it in {delay:.0f} s")
        await asyncio.sleep(delay)
        if self.lines.get(line) is actor:
            ray.kill(actor, no_restart=False)

    async def _check_feeds(self) -> None:
        for i in list(self.feeds):
            async with self.feed_locks[i]:
                await self._check_feed(i)

    async def _check_feed(self, i: int) -> None:
        """A finished feed is done with; a failed one (its ingest actor died) starts again.
        Called with the feed's lock held, so that a failure is seen and handled once."""
        ref = self.feeds.get(i)
        if ref is None or not ray.wait([ref], timeout=0)[0]:
            return
        try:
            self.fed_to.update(await ref)
            self.feeds[i] = None
        except ray.exceptions.RayError as err:
            group = self.ingest[i][1]
            cause = str(getattr(err, "cause", None) or type(err).__name__).strip().splitlines()[-1][:300]
            soon = time.monotonic() - self.feed_started.get(i, 0.0) < FEED_STEADY_S
            self.feed_failures[i] = self.feed_failures.get(i, 0) + 1 if soon else 1
            # a feed that keeps failing at once (a full disk, a server gone) is tried again less and less often
            delay = 0.0 if self.feed_failures[i] == 1 else min(FEED_RETRY_MAX_S, 2.0 ** (self.feed_failures[i] - 2))
            again = f"again in {delay:.0f} s" if delay else "again"
            self._event("feed restarts", f"ingest {i} failed; feeding {group} {again} from the lines' positions ({cause})",
                        counted=not isinstance(err, ray.exceptions.RayActorError))  # a dead actor: its restart counts
            self._start_feed(i, delay)

    def _start_feed(self, i: int, delay_s: float = 0.0) -> None:
        """A new feed of ingest actor i from its lines' positions (after `delay_s`)."""
        self.feed_started[i] = time.monotonic() + delay_s
        self.feeds_started += 1
        self.feed_number[i] = self.feeds_started
        positions = {line: self.progress[line] for line in self.ingest[i][1]}
        self.feeds[i] = self.ingest[i][0].run.remote(positions, self.feeds_started, delay_s)

    def _maybe_snapshot(self, line: str, actor) -> None:
        if self.every_frames is None and self.every_s is None or line in self.snapshotting:
            return
        seq = self.progress[line]
        due_frames = self.every_frames is not None and seq - self.snapshot_seq[line] >= self.every_frames
        due_time = self.every_s is not None and time.monotonic() - self.snapshot_time[line] >= self.every_s
        if seq > self.snapshot_seq[line] and (due_frames or due_time):
            self._start_snapshot(line, actor)

    def _start_snapshot(self, line: str, actor) -> None:
        self.snapshotting[line] = asyncio.get_running_loop().create_task(self._snapshot(line, actor))

    async def _snapshot(self, line: str, actor) -> None:
        try:
            replays = self.replays[line]
            seq = await _call(actor.snapshot.remote(), timeout=60)
            if seq is not None and self.replays[line] == replays:  # a restore since may have deleted it
                self.snapshot_seq[line], self.snapshot_time[line] = seq, time.monotonic()
        finally:
            self.snapshotting.pop(line, None)

    # ---- for the driver ----------------------------------------------------------------------------
    def status(self) -> dict:
        return {
            "progress": {**self.retired, **self.progress},
            "totals": dict(self.totals),
            "events": list(self.events),
            "event_counts": dict(self.event_counts),
            "notices": list(self.notices),
        }

    def stop(self) -> None:
        """Stop reading: the feeds end after their frames in flight, and `wait_done` waits for
        those only."""
        self.stopping = True
        for actor, _ in self.ingest:
            actor.stop.remote()

    async def snapshot_all(self) -> None:
        """A snapshot of every line now (after a stop: a re-run resumes right there)."""
        if self.every_frames is None and self.every_s is None:
            return
        for task in list(self.snapshotting.values()):
            await task
        for line, actor in self.lines.items():  # all lines side by side
            if line not in self.snapshotting and self.progress[line] > self.snapshot_seq[line]:
                self._start_snapshot(line, actor)
        await asyncio.gather(*self.snapshotting.values())

    async def wait_done(self) -> dict[str, int]:
        """Once every feed has ended, every line has scored up to its end and the writer has
        persisted every row: the number of frames per line."""
        while True:
            await asyncio.sleep(0.2)
            if any(ref is not None for ref in self.feeds.values()):
                continue
            targets = {
                line: self.fed_to.get(line, 0) if self.stopping else self.totals.get(line) or self.fed_to.get(line, 0)
                for line in self.lines
            }
            if any(self.progress[line] < targets[line] for line in self.lines):
                continue
            await _call(self.writer.try_flush.remote(), timeout=30)
            status = await _call(self.writer.status.remote())
            if status and not status["buffered"] and all(  # rows persist in seq order
                status["last_seq"].get(line, -1) >= targets[line] - 1 for line in self.lines
            ):
                for task in list(self.snapshotting.values()):
                    await task
                return {**self.retired, **targets}
