"""The result writer's memory over a long stream, in one process without Ray: `--lines` lines
send rows like a line actor's (a 64 px float16 map each) in calls of 10, `--rows` per line;
every `--every` rows the process's RSS and the Python memory tracemalloc follows are printed.
Prints figures; not a test.

    python benchmarks/writer_memory.py --lines 2 --rows 135000

`soak_memory.py` runs the whole pipeline, where 30,000 frames are too few to tell the writer's
allocator settling from a leak; this runs ten times as many rows in the same time.
"""
from __future__ import annotations

import argparse
import datetime as dt
import shutil
import sys
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.writer import ResultWriterCore, WriterSettings  # noqa: E402
from benchmarks.records import append_records, rss_mb  # noqa: E402

CALL_ROWS = 10  # rows per `write` call, as a line sends a backbone batch's rows


def row(line: str, seq: int, now: dt.datetime) -> dict:
    return {"line_id": line, "seq": seq, "uri": f"/cameras/{line}/frame_{seq:09d}.png", "ingest_time": now,
            "scored_time": now, "latency_ms": 12.5, "score": 1.25, "is_anomaly": False, "threshold": 1.5,
            "status": "ok", "error": None, "model_id": "rareclip-tiny", "map_uri": None,
            "anomaly_map": np.zeros((64, 64), np.float16), "date": now.date().isoformat()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=2)
    parser.add_argument("--rows", type=int, default=135000, help="rows per line")
    parser.add_argument("--every", type=int, default=15000, help="rows per line between two figures")
    parser.add_argument("--json", default=None, help="append the figures as records to this JSON list")
    args = parser.parse_args()
    lines = [f"line{i:02d}" for i in range(args.lines)]
    work = Path(tempfile.mkdtemp(prefix="rareclip-writer-"))
    records = []
    try:
        writer = ResultWriterCore(str(work), WriterSettings())
        now = dt.datetime.now(dt.timezone.utc)
        tracemalloc.start()
        for start in range(0, args.rows, CALL_ROWS):
            if start % args.every == 0:
                records.append({"rows": start * args.lines, "rss_mb": round(rss_mb(Path("/proc/self")), 1),
                                "python_mb": round(tracemalloc.get_traced_memory()[0] / 2**20, 2)})
                print(f"{records[-1]['rows']:>9} rows: RSS {records[-1]['rss_mb']:.0f} MiB, "
                      f"Python objects {records[-1]['python_mb']:.2f} MiB", flush=True)
            for line in lines:
                writer.write([row(line, seq, now) for seq in range(start, start + CALL_ROWS)])
        tracemalloc.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    append_records(args.json, [{"what": "writer memory", "lines": args.lines, **r} for r in records])


if __name__ == "__main__":
    main()
