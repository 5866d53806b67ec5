"""The result table, and the one owner of its layout: one row per (line_id, seq) in a
Hive-partitioned Parquet dataset `<results>/line_id=<id>/date=<YYYY-MM-DD>/part-*.parquet`, the
anomaly maps beside it under `_maps/` and the jobs' event log in `_events.jsonl`, files written
atomically, and reading it back with `line_id` always a string and only complete files (names
starting with '.' or '_' are files being written, or not part of the table). The writer merges a partition's small files now and
then (`table_compaction`): a reader that finds a listed file gone lists again (`read_through_merges`)."""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable, Optional, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from rareclip_core.data.files import append_whole, atomic_write

STATUS_OK = "ok"
STATUS_ERROR = "error"

# Columns stored in each Parquet file; `line_id` and `date` are the Hive partition keys
# (directories `line_id=<id>/date=<YYYY-MM-DD>/`) and come back as columns when read.
RESULT_SCHEMA = pa.schema(
    [
        pa.field("line_id", pa.string(), nullable=False),
        pa.field("seq", pa.int64(), nullable=False),
        pa.field("uri", pa.string()),
        pa.field("ingest_time", pa.timestamp("us", tz="UTC")),
        pa.field("scored_time", pa.timestamp("us", tz="UTC")),
        pa.field("latency_ms", pa.float64()),
        pa.field("score", pa.float64()),
        pa.field("is_anomaly", pa.bool_()),
        pa.field("threshold", pa.float64()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("model_id", pa.string()),
        pa.field("map_uri", pa.string()),
        pa.field("date", pa.string(), nullable=False),
    ]
)
PARTITION_COLUMNS = ("line_id", "date")
FILE_SCHEMA = pa.schema([f for f in RESULT_SCHEMA if f.name not in PARTITION_COLUMNS])
# what reading gives: the file's columns, then the partition keys
READ_SCHEMA = pa.schema([*FILE_SCHEMA, *(RESULT_SCHEMA.field(name) for name in PARTITION_COLUMNS)])
# partition values are read as strings: a line named `001` stays `001`
PARTITIONING = pads.partitioning(pa.schema([(name, pa.string()) for name in PARTITION_COLUMNS]), flavor="hive")
# the complete Parquet files, as a glob relative to the results folder (for DuckDB)
VISIBLE_FILE = "[!._]*.parquet"  # a complete file of a partition
VISIBLE_PARQUET = os.path.join("line_id=*", "date=*", VISIBLE_FILE)
MAPS_DIR = "_maps"
MAPS_PER_FOLDER = 10_000  # a line's maps go in folders of consecutive seqs, so no folder grows without end
EVENTS_FILE = "_events.jsonl"  # the jobs' recoveries and notices, a JSON object a line (`append_event`)
EVENTS_TAIL_BYTES = 1 << 16  # `read_events` reads this much of the log's end
# a line id is a folder name of the table: letters, digits, '.', '_' and '-', not starting with
# '.' or '_' (hidden or ignored names), at most 128 characters; '001' stays the string '001'
LINE_ID = re.compile(r"[A-Za-z0-9-][A-Za-z0-9._-]{0,127}")


def line_id_problem(line_id: str) -> Optional[str]:
    """Why `line_id` cannot name a line of the table, or None."""
    if LINE_ID.fullmatch(line_id):
        return None
    return (f"line id {line_id!r} is not allowed: use letters, digits, '.', '_' and '-' (not starting with '.' or '_'), "
            "at most 128 characters (it names a folder of the result table)")


def map_path(line_id: str, seq: int) -> str:
    """Where a row's anomaly map is stored, relative to the results folder (its `map_uri`)."""
    return f"{MAPS_DIR}/line_id={line_id}/{seq // MAPS_PER_FOLDER:06d}/{seq:010d}.npy"


def write_map(results_dir: Path, line_id: str, seq: int, anomaly_map: np.ndarray) -> str:
    rel = map_path(line_id, seq)
    atomic_write(Path(results_dir) / rel, lambda p: np.save(p, anomaly_map, allow_pickle=False))
    return rel


class MapUnavailable(Exception):
    """A row's anomaly map cannot be read; the message says why."""


def read_map(results_dir, map_uri: Optional[str]) -> np.ndarray:
    """A row's stored anomaly map (2-D), or MapUnavailable naming why there is none."""
    if not map_uri:
        raise MapUnavailable("no anomaly map stored for this frame")
    path = Path(results_dir) / map_uri
    try:
        anomaly_map = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise MapUnavailable(f"anomaly map file not found: {path} (a job deletes maps older than its maps_keep_days)") from None
    except (OSError, ValueError) as exc:
        raise MapUnavailable(f"anomaly map unreadable ({path}): {exc}") from None
    if anomaly_map.ndim != 2 or 0 in anomaly_map.shape:
        raise MapUnavailable(f"anomaly map has shape {anomaly_map.shape}, expected a 2-D array ({path})")
    return anomaly_map


def delete_old_maps(results_dir, line_id: str, keep_days: int) -> int:
    """Delete a line's maps of rows dated more than `keep_days` days before its newest date (the
    rows stay, their `map_uri` then names no file); returns how many files were deleted. Seqs
    grow with dates, so these are the maps up to the last seq of the newest such date."""
    dates = sorted(p.name.removeprefix("date=") for p in Path(results_dir, f"line_id={line_id}").glob("date=*"))
    if not dates:
        return 0
    cutoff = (dt.date.fromisoformat(dates[-1]) - dt.timedelta(days=keep_days)).isoformat()
    old = [date for date in dates if date < cutoff]
    if not old:
        return 0
    files = partition_files(partition_dir(results_dir, line_id, old[-1]))
    last_seq = max(pq.read_table(f, columns=["seq"])["seq"].to_numpy().max() for f in files) if files else -1
    deleted = 0
    maps = Path(results_dir, MAPS_DIR, f"line_id={line_id}")
    for folder in sorted(maps.glob("[0-9]*")) if maps.is_dir() else []:
        first_seq = int(folder.name) * MAPS_PER_FOLDER
        if first_seq > last_seq:
            break
        if first_seq + MAPS_PER_FOLDER - 1 <= last_seq:  # the whole folder (and what a crash left half-written)
            deleted += sum(1 for f in folder.iterdir() if f.stem.isdigit())
            shutil.rmtree(folder, ignore_errors=True)
            continue
        done = [f for f in folder.iterdir() if f.stem.isdigit() and int(f.stem) <= last_seq]
        for file in done:
            file.unlink(missing_ok=True)
        deleted += len(done)
    return deleted


def append_event(results_dir, kind: str, text: str) -> None:
    """Add one line `{"time", "kind", "text"}` (UTC, ISO 8601) to the table's event log: what
    happened to the jobs that wrote it (recoveries, notices), for people to read."""
    record = {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "kind": kind, "text": text}
    Path(results_dir).mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record) + "\n").encode("utf-8")
    append_whole(Path(results_dir) / EVENTS_FILE, lambda size: line, fsync=False)  # a full disk tears no line


def read_events(results_dir, newest: int) -> list[dict]:
    """The event log's newest `newest` records, oldest first (a line still being written is left out)."""
    path = Path(results_dir) / EVENTS_FILE
    if not path.is_file():
        return []
    with open(path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        fh.seek(max(0, size - EVENTS_TAIL_BYTES))
        lines = fh.read().split(b"\n")[1 if size > EVENTS_TAIL_BYTES else 0 :]  # the first may be cut
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:  # empty, or cut short
            continue
    return records[-newest:]


def partition_dir(results_dir, line_id: str, date: str) -> Path:
    """The folder of a line's rows of one date."""
    return Path(results_dir) / f"line_id={line_id}" / f"date={date}"


def partition_files(partition: Path) -> list[Path]:
    """A partition's complete Parquet files, in seq order (each is named by its first seq)."""
    return sorted(partition.glob(VISIBLE_FILE))


def write_rows(results_dir: Path, line_id: str, date: str, rows: list[dict]) -> None:
    """One Parquet file of a line's rows of one date (rows in seq order)."""
    table = pa.Table.from_pylist([{k: r.get(k) for k in FILE_SCHEMA.names} for r in rows], schema=FILE_SCHEMA)
    name = f"part-{rows[0]['seq']:010d}-{uuid.uuid4().hex[:8]}.parquet"
    atomic_write(partition_dir(results_dir, line_id, date) / name, lambda p: pq.write_table(table, p))


def read_results(results_dir, columns: Optional[list[str]] = None, line_id: Optional[str] = None) -> pa.Table:
    """The complete rows (all columns, or `columns`; one line's with `line_id`); an empty table
    with the result schema when there are none yet. The schema is given, not inferred: a line's
    folder whose only file is still being written reads as no rows, not as a table without columns."""
    root = Path(results_dir)
    if not root.is_dir() or not any(root.glob("line_id=*")):
        empty = READ_SCHEMA.empty_table()
        return empty.select(columns) if columns else empty
    where = None if line_id is None else pads.field("line_id") == line_id

    def read() -> pa.Table:
        dataset = pads.dataset(str(root), format="parquet", partitioning=PARTITIONING, schema=READ_SCHEMA)
        return dataset.to_table(columns=columns, filter=where)

    return read_through_merges(read, FileNotFoundError)


T = TypeVar("T")
MERGE_READ_ATTEMPTS = 8  # each failed attempt means a merge finished while that read ran


def read_through_merges(read: Callable[[], T], vanished: type[Exception]) -> T:
    """`read()` (which lists the table's files, then opens them), run again while it fails with
    `vanished` (a listed file was merged away before it was opened), up to `MERGE_READ_ATTEMPTS`
    times; the last failure is raised. A merge of one partition happens at most once every
    `writer_compact_files` flushes of its line, so a read rarely needs a second attempt."""
    for _ in range(MERGE_READ_ATTEMPTS - 1):
        try:
            return read()
        except vanished:
            continue
    return read()


def persisted_last_seqs(results_dir) -> dict[str, int]:
    """Highest seq per line already in the table (complete files only)."""
    table = read_results(results_dir, columns=["line_id", "seq"])
    if table.num_rows == 0:
        return {}
    grouped = table.group_by("line_id").aggregate([("seq", "max")]).to_pylist()
    return {r["line_id"]: int(r["seq_max"]) for r in grouped}
