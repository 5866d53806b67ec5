"""What one poll of a watched folder costs an ingestion actor as the folder fills: a live folder
line is listed again every `poll_s` (1 s) while nothing new is there, so a folder a camera has
written into all day is listed whole each second. Prints figures; not a test.

    python benchmarks/folder_poll.py --files 10000 50000 --settle-s 1
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rareclip_core.data.sources import FolderSource, Source  # noqa: E402


def fill(folder: Path, start: int, stop: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    old = time.time() - 3600  # written an hour ago: settled
    for index in range(start, stop):
        path = folder / f"frame-{index:08d}.png"
        path.write_bytes(b"")
        os.utime(path, (old, old))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, nargs="+", default=[10_000, 50_000], help="frames in the folder")
    parser.add_argument("--settle-s", type=float, default=1.0)
    parser.add_argument("--polls", type=int, default=20)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="folder-poll-"))
    try:
        present = 0
        for files in sorted(args.files):
            fill(root / "src" / "line", present, files)
            present = files
            source = Source(FolderSource(str(root / "src"), live=True, settle_s=args.settle_s), str(root / "ledger"))
            start = time.perf_counter()
            assert sum(1 for _ in source.frames("line")) == files
            first = time.perf_counter() - start
            polls = []
            for _ in range(args.polls):  # nothing new: what each second of a quiet line costs
                start = time.perf_counter()
                assert not list(source.frames("line", files))
                polls.append(time.perf_counter() - start)
            fill(root / "src" / "line", files, files + 1)  # one new frame
            start = time.perf_counter()
            assert len(list(source.frames("line", files))) == 1
            new = time.perf_counter() - start
            (root / "src" / "line" / f"frame-{files:08d}.png").unlink()
            shutil.rmtree(root / "ledger")
            print(f"{files} files: first listing {first * 1000:.0f} ms, poll with nothing new p50 "
                  f"{statistics.median(polls) * 1000:.1f} ms, poll with one new frame {new * 1000:.1f} ms")
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
