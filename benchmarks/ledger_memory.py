"""What a watched line's ingest ledger costs after a long stream: the time to load it when the
ingestion actor (re)starts, and the memory it holds, remembering every frame (max_file_age_s 0)
or a window (the default, one day). Prints figures; not a test.

    python benchmarks/ledger_memory.py --frames 1000000 --rate 1 --max-file-age-s 0 86400
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rareclip_core.data import sources  # noqa: E402
from rareclip_core.data.sources import FrameLedger, remembered_s  # noqa: E402

BATCH = 1000  # frames recorded per poll while the ledger is written


class StreamClock:
    """The ingestion clock while the ledger is written: `rate` frames per second."""

    def __init__(self):
        self.now = time.time()

    def time(self) -> float:
        return self.now


def write_ledger(folder: Path, frames: int, rate: float) -> None:
    clock = StreamClock()
    sources.time = clock
    ledger = FrameLedger(folder, "line")
    for start in range(0, frames, BATCH):
        ledger.extend([f"/cameras/line/frame-{seq:010d}.png" for seq in range(start, min(frames, start + BATCH))])
        clock.now += BATCH / rate


def load(folder: Path, max_file_age_s: float) -> dict:
    """In a fresh process: load the ledger as a restarted ingestion actor does, once timed and
    once under tracemalloc (Python's allocations: the peak while loading, what stays held)."""
    remember_s = remembered_s(max_file_age_s)
    start = time.perf_counter()
    ledger = FrameLedger(folder, "line", remember_s)
    seconds = time.perf_counter() - start
    del ledger
    tracemalloc.start()
    ledger = FrameLedger(folder, "line", remember_s)
    held, peak = tracemalloc.get_traced_memory()
    return {
        "max_file_age_s": max_file_age_s, "frames": len(ledger), "remembered": sum(ledger.recorded.values()),
        "load_s": round(seconds, 3), "held_mb": round(held / 2**20, 1), "peak_mb": round(peak / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1_000_000, help="frames the line has recorded")
    parser.add_argument("--rate", type=float, default=1.0, help="frames per second while they were recorded")
    parser.add_argument("--max-file-age-s", type=float, nargs="+", default=[0.0, 86_400.0])
    parser.add_argument("--load", help=argparse.SUPPRESS)  # the child process: load this ledger folder
    args = parser.parse_args()
    if args.load:
        print(json.dumps(load(Path(args.load), args.max_file_age_s[0])))
        return
    root = Path(tempfile.mkdtemp(prefix="ledger-memory-"))
    try:
        start = time.perf_counter()
        write_ledger(root / "line", args.frames, args.rate)
        size = sum(p.stat().st_size for p in (root / "line").iterdir())
        print(f"{args.frames} frames at {args.rate}/s ({args.frames / args.rate / 86_400:.1f} days): "
              f"{size / 2**20:.0f} MiB of ledger files, written in {time.perf_counter() - start:.0f} s")
        for age in args.max_file_age_s:
            child = subprocess.run(
                [sys.executable, __file__, "--load", str(root / "line"), "--max-file-age-s", str(age)],
                capture_output=True, text=True, check=True,
            )
            print(child.stdout.strip())
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
