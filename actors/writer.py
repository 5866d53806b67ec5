"""ResultWriter: batches result rows into the Hive-partitioned Parquet dataset, atomically."""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import ray

from configs.pipeline import config_default

from .result_table import delete_old_maps, persisted_last_seqs, write_map, write_rows
from .supervisor import tell_supervisor
from .table_compaction import CompactionSettings, compact_partition, recover

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WriterSettings:
    batch_rows: int = config_default("writer_batch_rows")  # buffered rows that make a flush
    flush_s: float = config_default("writer_flush_s")  # ... or the age of the oldest buffered row that makes one
    compaction: CompactionSettings = field(default_factory=CompactionSettings)
    maps_keep_days: int | None = config_default("maps_keep_days")  # None: keep every map
    max_held_rows: int = config_default("writer_max_held_rows")  # held while it cannot write; past them, refused


class ResultWriterCore:
    """Accepts each line's rows in sequence order only: a row whose seq is already written (a
    replay after a restore) is dropped, and so is one past a hole (it comes again with the
    replay that fills the hole). So the table never holds a (line_id, seq) twice or a gap.

    Each flush writes a file per (line, date). Once a partition has gained
    `compaction.files` of them, they are merged into one (`table_compaction`); so is a line's
    partition of an earlier date once the line's rows move on to a new date, and every
    partition at `compact_all` (a job's end, a writer's start). With `maps_keep_days`, a line's
    old anomaly maps are deleted in a thread of their own when its rows reach a new date, and at
    a writer's start.

    With `verdicts` (a NATS stream), each accepted row is published as a verdict at once, and a
    row is written to the table only once its verdict is stored: a row persisted always has its
    verdict, and one lost with the buffer is replayed and its verdict not published twice.

    While it cannot write (a full disk), it holds the rows in memory up to `max_held_rows`, then
    refuses rows, and ingestion pauses (the supervisor's `writer_refusing`); once it writes
    again, the lines with refused rows restore their snapshots and score those frames again, and
    ingestion goes on (`writer_refused`), as after a writer restart."""

    def __init__(self, results_dir: str, settings: WriterSettings = WriterSettings(), supervisor_name: str | None = None,
                 verdicts=None):
        self.root = Path(results_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        self.supervisor_name = supervisor_name
        self.cannot_write: str | None = None  # why the last flush failed, until one succeeds
        self.unmerged: dict[tuple[str, str], int] = {}  # (line, date) -> files written since its last merge
        self.newest_date: dict[str, str] = {}  # line -> date of its newest rows (on disk when it starts)
        # old maps are deleted beside the writing (a day of a line's maps: seconds, docs/BENCHMARKS.md)
        self.map_deleter = ThreadPoolExecutor(1, thread_name_prefix="old-maps")
        self.map_deletions: list[Future] = []
        recover(self.root)
        self.compact_all()
        for folder in sorted(self.root.glob("line_id=*")):
            dates = [p.name.removeprefix("date=") for p in folder.glob("date=*")]
            if dates:
                self.newest_date[folder.name.removeprefix("line_id=")] = max(dates)
        for line in self.newest_date:
            self._delete_old_maps(line)
        self.last_seq = persisted_last_seqs(self.root)  # written or buffered
        self.buffer: list[dict] = []
        self.oldest = None
        self.dropped = 0
        self.publisher = None
        if verdicts is not None:
            from rareclip_core.data.nats_stream import VerdictPublisher

            self.publisher = VerdictPublisher(verdicts)
        self.unpublished: list[dict] = []
        self.refused: dict[str, int] = {}  # line -> rows refused since it could last write (see the class docstring)
        if supervisor_name:
            try:  # a restarted writer lost its buffered rows: the supervisor has the lines replay them
                ray.get_actor(supervisor_name).writer_started.remote(dict(self.last_seq))
            except ValueError:
                pass  # first start: the job creates the supervisor once the writer is constructed

    def write(self, rows: list[dict]) -> dict[str, int]:
        """Buffer rows; returns the highest accepted seq per line touched."""
        for row in rows:
            line, seq = row["line_id"], row["seq"]
            if self.cannot_write is not None and len(self.buffer) >= self.settings.max_held_rows:
                self._refuse(line)
                continue
            expected = self.last_seq.get(line, -1) + 1
            if seq != expected:
                self.dropped += 1
                if seq > expected:
                    log.warning("line %s: row %d arrived before %d; dropped until replayed", line, seq, expected)
                continue
            self.buffer.append(row)
            if self.publisher:
                self.unpublished.append(row)
            self.last_seq[line] = seq
            self.oldest = self.oldest or time.monotonic()
        if self.publisher and self.publisher.connected:
            self._publish()
        if len(self.buffer) >= self.settings.batch_rows or (
            self.oldest and time.monotonic() - self.oldest >= self.settings.flush_s
        ):
            self.try_flush()
        return {r["line_id"]: self.last_seq.get(r["line_id"], -1) for r in rows}

    def try_flush(self) -> bool:
        """`flush`, for a caller that needs nothing back: False where the rows stay buffered for the
        next try (verdicts not published yet, or the table cannot be written, which the job has
        heard from `flush`)."""
        try:
            self.flush()
            return True
        except ConnectionError as err:  # verdicts not published
            log.warning("flush deferred: %s", err)
        except OSError:  # a full disk, say
            pass
        return False

    def _refuse(self, line: str) -> None:
        if not self.refused:
            tell_supervisor(self.supervisor_name, (
                f"the result writer holds {len(self.buffer)} rows it cannot write, its limit (writer_max_held_rows): "
                "it refuses rows until it can write; ingestion pauses until then, and the lines score the refused "
                "frames again"), call="writer_refusing")
        self.refused[line] = self.refused.get(line, 0) + 1

    def flush(self) -> int:
        """Write buffered rows (see `_write_buffer`); the job hears when the table cannot be
        written (an OSError: a full disk, say), and when it can again. Raises what failed: a
        snapshot waits for its rows to be on disk."""
        try:
            written = self._write_buffer()
        except OSError as err:
            if self.cannot_write is None:
                tell_supervisor(self.supervisor_name, (
                    f"the result writer cannot write to {self.root}: {err}; it holds the rows in memory "
                    f"({len(self.buffer)} now) and tries again at each write (free space, or set maps_keep_days)"))
            self.cannot_write = str(err)
            raise
        if self.cannot_write is not None:
            self.cannot_write = None
            tell_supervisor(self.supervisor_name, f"the result writer writes to {self.root} again ({written} rows held written)")
        if self.refused:
            self._replay_refused()
        return written

    def _replay_refused(self) -> None:
        """Have the lines whose rows were refused score those frames again (from their snapshots)."""
        refused, self.refused = self.refused, {}
        persisted = {line: self.last_seq.get(line, -1) for line in refused}
        if self.supervisor_name:
            try:
                ray.get_actor(self.supervisor_name).writer_refused.remote(persisted, refused)
                return
            except ValueError:  # the job is ending
                pass
        log.warning("rows refused and not replayed (no job): %s; persisted up to %s", refused, persisted)

    def _write_buffer(self) -> int:
        """Maps first, then one Parquet file per (line_id, date). Rows leave the buffer only once
        their file is in place, so a failed flush loses nothing. With verdicts, their publishing
        is retried first (raises ConnectionError when it fails)."""
        self._publish(raise_error=True)
        groups: dict[tuple[str, str], list[dict]] = {}
        for row in self.buffer:
            image_map = row.get("anomaly_map")
            if image_map is not None and row.get("map_uri") is None:
                row["map_uri"] = write_map(self.root, row["line_id"], row["seq"], image_map)
            groups.setdefault((row["line_id"], row["date"]), []).append(row)
        written = 0
        for (line, date), group in groups.items():
            write_rows(self.root, line, date, group)
            done = {id(r) for r in group}
            self.buffer = [r for r in self.buffer if id(r) not in done]
            written += len(group)
            if self.newest_date.get(line) != date:
                self._moved_on(line, date)
            self._count_file(line, date)
        self.oldest = time.monotonic() if self.buffer else None
        return written

    def compact_all(self) -> int:
        """Merge the small files of every partition of the table; returns how many were merged."""
        merged = 0
        for partition in sorted(self.root.glob("line_id=*/date=*")):
            merged += self._compact(partition.parent.name.removeprefix("line_id="), partition.name.removeprefix("date="))
        self.unmerged = {}
        return merged

    def _moved_on(self, line: str, date: str) -> None:
        """The line's rows reached a new date: merge its partitions of other dates for good and
        delete its maps that are now too old."""
        self.newest_date[line] = date
        for earlier in [key for key in self.unmerged if key[0] == line and key[1] != date]:
            del self.unmerged[earlier]
            self._compact(*earlier)
        self._delete_old_maps(line)

    def _count_file(self, line: str, date: str) -> None:
        """A file was written to (line, date): merge it with the partition's other small files once
        there are enough of them."""
        if not self.settings.compaction.files:
            return
        self.unmerged[(line, date)] = self.unmerged.get((line, date), 0) + 1
        if self.unmerged[(line, date)] >= self.settings.compaction.files:
            self.unmerged[(line, date)] = 0
            self._compact(line, date)

    def _compact(self, line: str, date: str) -> int:
        """A merge that fails (a full disk, ...) leaves the small files, which stay correct."""
        if not self.settings.compaction.files:
            return 0
        try:
            return compact_partition(self.root, line, date, self.settings.compaction)
        except OSError as err:
            log.warning("line %s, %s: small files not merged (%s); the table stays correct", line, date, err)
            return 0

    def _delete_old_maps(self, line: str) -> None:
        """Keep `maps_keep_days` of a line's maps (`delete_old_maps`, in the background)."""
        if self.settings.maps_keep_days is None:
            return
        self.map_deletions = [f for f in self.map_deletions if not f.done()]
        self.map_deletions.append(self.map_deleter.submit(self._delete_old_maps_now, line))

    def _delete_old_maps_now(self, line: str) -> None:
        try:
            delete_old_maps(self.root, line, self.settings.maps_keep_days)
        except OSError as err:  # left for the line's next date or the writer's next start
            log.warning("line %s: old anomaly maps not deleted (%s)", line, err)

    def wait_map_deletions(self) -> None:
        """Return once the old maps being deleted are gone."""
        for future in self.map_deletions:
            future.result()

    def _publish(self, raise_error: bool = False) -> None:
        if not (self.publisher and self.unpublished):
            return
        try:
            self.publisher.publish(self.unpublished)
            self.unpublished = []
        except ConnectionError as err:
            if raise_error:
                raise
            log.warning("verdicts not published yet: %s", err)

    def status(self) -> dict:
        return {"last_seq": dict(self.last_seq), "buffered": len(self.buffer), "dropped": self.dropped,
                "cannot_write": self.cannot_write}


ResultWriter = ray.remote(num_cpus=0, max_restarts=-1)(ResultWriterCore)
