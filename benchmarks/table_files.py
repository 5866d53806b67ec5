"""What a live job's many small result files cost the table's readers, and what merging them
(`writer_compact_files`) costs the writer. Prints figures; not a test.

A live line flushes a file of its few newest rows every `writer_flush_s`: at one frame per
second and the default 2 s, a file of 2 rows, 1800 files an hour. This writes such a stream of
LINES lines through the real ResultWriterCore twice, with merging off and on, and times what
reads the whole table: a restarted writer (`persisted_last_seqs`), a DuckDB query (what
`lines`, `query` and the dashboard's frame lookups run), the dashboard's first read; then the
largest merge the writer makes (a file just under `writer_compact_rows` rows and
`writer_compact_files` small ones).

    python benchmarks/table_files.py --lines 4 --files 5000 --rows-per-file 2
"""
from __future__ import annotations

import argparse
import datetime as dt
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.result_table import persisted_last_seqs, write_rows  # noqa: E402
from actors.table_compaction import CompactionSettings, compact_partition  # noqa: E402
from actors.writer import ResultWriterCore, WriterSettings  # noqa: E402
from pipelines.dashboard import ResultFeed  # noqa: E402
from pipelines.query import lines_summary  # noqa: E402


def row(line: str, seq: int) -> dict:
    scored = dt.datetime(2026, 12, 6, tzinfo=dt.timezone.utc) + dt.timedelta(seconds=seq)
    return {"line_id": line, "seq": seq, "uri": f"/frames/{line}/{seq:08d}.png", "ingest_time": scored,
            "scored_time": scored, "latency_ms": 30.0, "score": 1.0 + (seq % 97) / 100, "is_anomaly": seq % 97 == 0,
            "threshold": 1.9, "status": "ok", "error": None, "model_id": "rareclip-0123456789ab", "map_uri": None,
            "date": "2026-12-06"}


def write_stream(root: Path, args, compaction: CompactionSettings) -> tuple[float, int]:
    """The stream through a writer; returns seconds and the files left in the table."""
    writer = ResultWriterCore(str(root), WriterSettings(batch_rows=args.rows_per_file * args.lines, flush_s=3600,
                                                        compaction=compaction))
    start = time.perf_counter()
    for index in range(args.files):
        seqs = range(index * args.rows_per_file, (index + 1) * args.rows_per_file)
        writer.write([row(f"line{n}", s) for n in range(args.lines) for s in seqs])
    return time.perf_counter() - start, len(list(root.glob("line_id=*/date=*/*.parquet")))


def merge_at_the_cap(root: Path, args) -> float:
    """Seconds of the largest merge: a file just under `compact_rows` rows and `compact_files` small ones."""
    big = args.compact_rows - 1
    write_rows(root, "line0", "2026-12-06", [row("line0", s) for s in range(big)])
    for index in range(args.compact_files):
        first = big + index * args.rows_per_file
        write_rows(root, "line0", "2026-12-06", [row("line0", s) for s in range(first, first + args.rows_per_file)])
    settings = CompactionSettings(args.compact_files, args.compact_rows)
    return timed(lambda: compact_partition(root, "line0", "2026-12-06", settings))


def timed(read) -> float:
    start = time.perf_counter()
    read()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=4)
    parser.add_argument("--files", type=int, default=5000, help="files per line (flushes)")
    parser.add_argument("--rows-per-file", type=int, default=2)
    parser.add_argument("--compact-files", type=int, default=CompactionSettings.files)
    parser.add_argument("--compact-rows", type=int, default=CompactionSettings.rows)
    args = parser.parse_args()
    rows = args.lines * args.files * args.rows_per_file
    print(f"{args.lines} lines x {args.files} flushes x {args.rows_per_file} rows = {rows} rows")
    folder = Path(tempfile.mkdtemp(prefix="table-files-"))
    try:
        for label, compaction in [("unmerged", CompactionSettings(files=0)),
                                  ("merged", CompactionSettings(args.compact_files, args.compact_rows))]:
            root = folder / label
            write_s, files = write_stream(root, args, compaction)
            size_mb = sum(p.stat().st_size for p in root.rglob("*.parquet")) / 2**20
            restart_s = timed(lambda: persisted_last_seqs(root))
            query_s = timed(lambda: lines_summary(root))
            dashboard_s = timed(lambda: ResultFeed(root).refresh())
            print(f"{label}: write {write_s:.1f} s ({write_s / args.files * 1000:.2f} ms per flush), {files} files, "
                  f"{size_mb:.1f} MiB; writer restart {restart_s * 1000:.0f} ms, lines query {query_s * 1000:.0f} ms, "
                  f"dashboard first read {dashboard_s * 1000:.0f} ms")
        largest = merge_at_the_cap(folder / "cap", args)
        print(f"largest merge ({args.compact_rows - 1} rows + {args.compact_files} files of {args.rows_per_file}): "
              f"{largest * 1000:.0f} ms")
    finally:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
