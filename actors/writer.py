"""ResultWriter: batches result rows into the Hive-partitioned Parquet dataset, atomically."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import ray

from .result_table import persisted_last_seqs, write_map, write_rows

log = logging.getLogger(__name__)


class ResultWriterCore:
    """Accepts each line's rows in sequence order only: a row whose seq is already written (a
    replay after a restore) is dropped, and so is one past a hole (it comes again with the
    replay that fills the hole). So the table never holds a (line_id, seq) twice or a gap.

    With `verdicts` (a NATS stream), each accepted row is published as a verdict at once, and a
    row is written to the table only once its verdict is stored: a row persisted always has its
    verdict, and one lost with the buffer is replayed and its verdict not published twice."""

    def __init__(self, results_dir: str, batch_rows: int = 256, flush_s: float = 2.0, supervisor_name: str | None = None,
                 verdicts=None):
        self.root = Path(results_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.batch_rows = batch_rows
        self.flush_s = flush_s
        self.last_seq = persisted_last_seqs(self.root)  # written or buffered
        self.buffer: list[dict] = []
        self.oldest = None
        self.dropped = 0
        self.publisher = None
        if verdicts is not None:
            from rareclip_core.data.nats_stream import VerdictPublisher

            self.publisher = VerdictPublisher(verdicts)
        self.unpublished: list[dict] = []
        if supervisor_name:
            try:  # a restarted writer lost its buffered rows: the supervisor has the lines replay them
                ray.get_actor(supervisor_name).writer_started.remote(dict(self.last_seq))
            except ValueError:
                pass  # first start: the supervisor is created after the writer

    def write(self, rows: list[dict]) -> dict[str, int]:
        """Buffer rows; returns the highest accepted seq per line touched."""
        for row in rows:
            line, seq = row["line_id"], row["seq"]
            expected = self.last_seq.get(line, -1) + 1
            if seq != expected:
                self.dropped += 1
                if seq > expected:
                    log.warning("line %s: row %d arrived before %d; dropped until replayed", line, seq, expected)
                continue
            self.buffer.append(row)
            self.unpublished.append(row)
            self.last_seq[line] = seq
            self.oldest = self.oldest or time.monotonic()
        if self.publisher and self.publisher.connected:
            self._publish()
        if len(self.buffer) >= self.batch_rows or (self.oldest and time.monotonic() - self.oldest >= self.flush_s):
            try:
                self.flush()
            except ConnectionError as err:  # verdicts not published: the rows stay buffered
                log.warning("flush deferred: %s", err)
        return {r["line_id"]: self.last_seq[r["line_id"]] for r in rows}

    def flush(self) -> int:
        """Write buffered rows: maps first, then one Parquet file per (line_id, date). Rows
        leave the buffer only once their file is in place, so a failed flush loses nothing.
        With verdicts, their publishing is retried first (raises ConnectionError when it fails)."""
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
        self.oldest = time.monotonic() if self.buffer else None
        return written

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
        return {"last_seq": dict(self.last_seq), "buffered": len(self.buffer), "dropped": self.dropped}


ResultWriter = ray.remote(num_cpus=0, max_restarts=-1)(ResultWriterCore)
