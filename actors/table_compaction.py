"""Merging a partition's small Parquet files into one, so that a table fed for months stays fast.

The writer writes one file per (line, date) at every flush (every `writer_flush_s` while rows
come): a line streaming all day leaves tens of thousands of files of a few rows, and every
reader (queries, the dashboard, a restarted writer) opens each one. A merge reads the
partition's small files (fewer than `rows` rows each), writes their rows as one file in a
hidden folder beside the partition, links the partition's large files in too, and swaps the
two folders in one rename. Readers see the old files or the new one, never both nor neither
(a reader that listed the old files and opens one after the swap fails to find it, and lists
again: `read_results`, the queries, the dashboard).

The swap is Linux's renameat2(RENAME_EXCHANGE). Where it is missing (another OS, a file system
without it) two renames take its place: for an instant the partition is absent to readers,
never doubled. A merge interrupted at any point is finished or undone by `recover` (the writer
calls it when it starts): the merged folder is complete only once its marker file is in it.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from configs.pipeline import config_default
from rareclip_core.data.files import atomic_write

from .result_table import FILE_SCHEMA, partition_dir, partition_files

log = logging.getLogger(__name__)

NEW_PREFIX = ".compacting-"  # line_id=L/.compacting-date=D: the merged partition being built
OLD_PREFIX = ".compacted-"  # line_id=L/.compacted-date=D: the replaced partition (two-rename path)
COMPLETE_MARKER = ".compaction-complete"  # in the merged folder once every file is in it


@dataclass(frozen=True)
class CompactionSettings:
    files: int = config_default("writer_compact_files")  # small files of a partition that start a merge; 0: never
    rows: int = config_default("writer_compact_rows")  # a file with at least this many rows is not merged again


def compact_partition(results_dir, line_id: str, date: str, settings: CompactionSettings) -> int:
    """Merge the small files of (line_id, date) into one; returns how many were merged (0 when
    fewer than two). The rows, their values and their order stay as they were (files are named
    by their first seq, so their name order is seq order)."""
    partition = partition_dir(results_dir, line_id, date)
    files = partition_files(partition)
    small = [f for f in files if pq.read_metadata(f).num_rows < settings.rows] if len(files) > 1 else []
    if len(small) < 2:
        return 0
    merged = pa.concat_tables([pq.read_table(f, schema=FILE_SCHEMA) for f in small])
    building = partition.parent / f"{NEW_PREFIX}{partition.name}"
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir()
    for kept in (f for f in files if f not in small):
        _link_or_copy(kept, building / kept.name)
    first_seq = merged.column("seq")[0].as_py()
    name = f"part-{first_seq:010d}-{uuid.uuid4().hex[:8]}.parquet"
    atomic_write(building / name, lambda p: pq.write_table(merged, p))
    atomic_write(building / COMPLETE_MARKER, lambda p: p.write_bytes(b""))
    _swap_in(building, partition)
    (partition / COMPLETE_MARKER).unlink(missing_ok=True)
    return len(small)


def recover(results_dir) -> None:
    """Finish or undo every merge that was interrupted (a crash, a kill) under `results_dir`."""
    for line in Path(results_dir).glob("line_id=*"):
        for hidden in sorted(line.glob(f"{NEW_PREFIX}*")) + sorted(line.glob(f"{OLD_PREFIX}*")):
            name = hidden.name.removeprefix(NEW_PREFIX).removeprefix(OLD_PREFIX)
            partition = line / name
            if not partition.exists():  # stopped between the two renames of the fallback
                merged = line / f"{NEW_PREFIX}{name}"
                source = merged if (merged / COMPLETE_MARKER).exists() else line / f"{OLD_PREFIX}{name}"
                if source.exists():
                    os.rename(source, partition)
                    log.warning("%s: an interrupted merge was %s", partition, "finished" if source == merged else "undone")
            (partition / COMPLETE_MARKER).unlink(missing_ok=True)  # a merge stopped after its swap
            shutil.rmtree(hidden, ignore_errors=True)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _swap_in(building: Path, partition: Path) -> None:
    """Make `building` the partition; the old files are removed."""
    if _exchange(building, partition):
        shutil.rmtree(building)  # it now holds the old files
        return
    old = partition.parent / f"{OLD_PREFIX}{partition.name}"
    os.rename(partition, old)
    os.rename(building, partition)
    shutil.rmtree(old)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_LIBC = ctypes.CDLL(None, use_errno=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the system cannot."""
    renameat2 = getattr(_LIBC, "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))
