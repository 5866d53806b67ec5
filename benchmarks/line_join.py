"""How long a line that appears while a live job runs takes to join it: its folder appears (made
complete under a hidden name, then renamed) under a watched root whose lines are not named; the
job looks every 2 s, builds the line's actor (loading its detector), and the supervisor has
ingestion feed it. Prints figures; not a test.

    python benchmarks/line_join.py --config configs/detector-tiny.yaml --new-lines 1 4 --frames 20

Times are from the folder's rename to: the supervisor's "line added" event (noticed, actor
built, registered), the line's first frame scored, and all its frames scored. They are read
from the job's status, polled every 0.5 s: each is up to 0.5 s late.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.pipeline_throughput import gpu_name, write_lines  # noqa: E402
from benchmarks.records import append_records  # noqa: E402
from configs.loading import load_detector_config  # noqa: E402
from configs.pipeline import PipelineConfig  # noqa: E402
from pipelines.line_cluster import LineCluster, start_ray, stop_ray  # noqa: E402


class NewFolders:
    """`on_poll`: once the first line is scored whole, the new lines' folders appear together;
    records when each is added, first scored, scored whole; stops the job then."""

    def __init__(self, cluster: LineCluster, work: Path, first: str, new: list[str], frames: int):
        self.cluster, self.work, self.first, self.new, self.frames = cluster, work, first, new, frames
        self.appeared: float | None = None
        self.added: dict[str, float] = {}
        self.first_row: dict[str, float] = {}
        self.whole: dict[str, float] = {}

    def __call__(self, status: dict) -> None:
        now, progress = time.monotonic(), status["progress"]
        if self.appeared is None:
            if progress[self.first] >= self.frames:
                for line in self.new:  # complete under a hidden name, then in place at once
                    (self.work / "staged" / line).rename(self.work / "src" / line)
                self.appeared = time.monotonic()
            return
        for line in self.new:
            if line not in self.added and any(e.startswith(f"line {line} added") for e in status["events"]):
                self.added[line] = now - self.appeared
            if line not in self.first_row and progress.get(line, 0) >= 1:
                self.first_row[line] = now - self.appeared
            if line not in self.whole and progress.get(line, 0) >= self.frames:
                self.whole[line] = now - self.appeared
        if len(self.whole) == len(self.new):
            self.cluster.supervisor.stop.remote()


def join_once(cfg: PipelineConfig, work: Path, new: list[str], frames: int) -> dict:
    cluster = LineCluster(cfg)
    try:
        plan = NewFolders(cluster, work, "first", new, frames)
        cluster.run(progress=False, on_poll=plan)
    finally:
        cluster.shutdown()
    if len(plan.whole) < len(new):
        raise SystemExit(f"the job stopped before every new line was scored: {sorted(plan.whole)} of {new}")
    return {name: float(np.max(list(times.values())))
            for name, times in (("added_s", plan.added), ("first_scored_s", plan.first_row), ("all_scored_s", plan.whole))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/detector-tiny.yaml")
    parser.add_argument("--new-lines", type=int, nargs="+", default=[1, 4], help="lines appearing together, per run")
    parser.add_argument("--frames", type=int, default=20, help="frames per line")
    parser.add_argument("--size", type=int, default=256, help="side of the PNG frames")
    parser.add_argument("--json", default=None, help="append the figures as records to this JSON list")
    args = parser.parse_args()
    detector = load_detector_config(args.config).model_copy(update={"device": "auto"})
    start_ray()
    try:
        device = gpu_name()
        print(f"{args.frames} frames per line, {args.size}px, model {detector.model} @ {detector.image_size}, {device}")
        records = []
        for n in args.new_lines:
            work = Path(tempfile.mkdtemp(prefix="rareclip-join-"))
            try:
                new = [f"new{i:02d}" for i in range(n)]
                write_lines(work, ["first"], args.frames, args.size)
                write_lines(work / "new", new, args.frames, args.size)
                (work / "new" / "src").rename(work / "staged")
                cfg = PipelineConfig(
                    detector=detector,
                    source={"kind": "folder", "root": str(work / "src"), "watch": True, "poll_s": 0.2, "settle_s": 0.0},
                    out=str(work / "out"), map_resolution=None, snapshot={"every_frames": None},
                )
                times = join_once(cfg, work, new, args.frames)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            print(f"{n} new line(s): added after {times['added_s']:.1f} s, first frame scored after "
                  f"{times['first_scored_s']:.1f} s, all {args.frames} scored after {times['all_scored_s']:.1f} s "
                  "(the slowest line; status polled every 0.5 s)")
            records.append({"what": "line join", "device": device, "config": args.config, "image_size": detector.image_size,
                            "new_lines": n, "frames": args.frames, **times})
        append_records(args.json, records)
    finally:
        stop_ray()


if __name__ == "__main__":
    main()
