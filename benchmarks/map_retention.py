"""What deleting a day of a line's anomaly maps costs (`maps_keep_days`), and what the writer's
flushes take while its thread for old maps deletes them. Prints figures; not a test.

    python benchmarks/map_retention.py --maps 86400
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.result_table import delete_old_maps, write_map, write_rows  # noqa: E402
from actors.writer import ResultWriterCore, WriterSettings  # noqa: E402


def flush_times(writer: ResultWriterCore, first_seq: int, anomaly_map, while_deleting: bool, count: int = 0) -> list:
    """Seconds per `write` of 4 rows (each a flush): while the writer's deletion runs, or `count` of them."""
    times, seq = [], first_seq
    while (while_deleting and not all(f.done() for f in writer.map_deletions)) or len(times) < count:
        rows = [{"line_id": "line", "seq": s, "status": "ok", "date": "2026-12-02", "anomaly_map": anomaly_map}
                for s in range(seq, seq + 4)]
        start = time.perf_counter()
        writer.write(rows)
        times.append(time.perf_counter() - start)
        seq += 4
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--maps", type=int, default=86_400, help="maps of the day that goes (one frame a second)")
    parser.add_argument("--side", type=int, default=64, help="map side (the default map_resolution)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="map-retention-"))
    try:
        anomaly_map = np.zeros((args.side, args.side), dtype=np.float16)
        start = time.perf_counter()
        for seq in range(args.maps):
            write_map(root, "line", seq, anomaly_map)
        written = time.perf_counter() - start
        row = {"line_id": "line", "status": "ok"}
        write_rows(root, "line", "2026-12-01", [{**row, "seq": seq} for seq in range(args.maps)])
        write_rows(root, "line", "2026-12-02", [{**row, "seq": args.maps}])
        start = time.perf_counter()
        deleted = delete_old_maps(root, "line", keep_days=0)
        seconds = time.perf_counter() - start
        print(f"{args.maps} maps of {args.side}x{args.side} written in {written:.1f} s; "
              f"deleting {deleted} took {seconds * 1000:.0f} ms ({seconds / max(deleted, 1) * 1e6:.1f} us per map)")
        for seq in range(args.maps):  # the day's maps again, and a writer that deletes them as it starts
            write_map(root, "line", seq, anomaly_map)
        writer = ResultWriterCore(str(root), WriterSettings(batch_rows=4, flush_s=3600, maps_keep_days=0))
        flushes = flush_times(writer, args.maps + 1, anomaly_map, while_deleting=True)
        during = len(flushes)
        flushes += flush_times(writer, args.maps + 1 + 4 * during, anomaly_map, while_deleting=False, count=during)
        print(f"writer flushes of 4 rows with maps: p50 {statistics.median(flushes[:during]) * 1000:.1f} ms "
              f"(max {max(flushes[:during]) * 1000:.1f}) in {during} flushes while it deletes, "
              f"p50 {statistics.median(flushes[during:]) * 1000:.1f} ms (max {max(flushes[during:]) * 1000:.1f}) after")
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
