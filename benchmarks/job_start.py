"""What a job pays before any real work: a short `replay` from the command to its exit, and how
late each line's first frame is scored (ingest to scored). Each run is a fresh `python
run_cluster.py replay` (embedded Ray, its actors' processes and their imports) on L lines of F
small PNGs with the tiny detector; every job start pays this, and so does each end-to-end test.
Prints medians over the runs; not a test.

    python benchmarks/job_start.py --runs 3
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from actors.result_table import read_results  # noqa: E402
from benchmarks.pipeline_throughput import write_lines  # noqa: E402
from benchmarks.records import append_records, device_name  # noqa: E402


def run_job(config: Path, out: Path) -> tuple[float, float]:
    """(seconds from the command to its exit, the median latency of the lines' first frames in ms)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "run_cluster.py", "replay", "--config", str(config), "--no-progress"], cwd=REPO,
                   capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    first = [r["latency_ms"] for r in read_results(out, columns=["seq", "latency_ms"]).to_pylist() if r["seq"] == 0]
    return wall, statistics.median(first)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/detector-tiny.yaml", help="the detector file")
    parser.add_argument("--lines", type=int, default=2)
    parser.add_argument("--frames", type=int, default=2, help="frames per line")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", help="append the record to this JSON list (docs/benchmarks/...)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_lines(work, [f"line{i}" for i in range(args.lines)], args.frames, size=64)
        config = work / "job.yaml"
        config.write_text(json.dumps({  # JSON is YAML
            "detector": str((REPO / args.config).resolve()),
            "source": {"kind": "folder", "root": str(work / "src")},
            "out": str(work / "out"),
            "map_resolution": None,
        }))
        runs = []
        for _ in range(args.runs):
            runs.append(run_job(config, work / "out" / "results"))
            shutil.rmtree(work / "out")
    wall = statistics.median(w for w, _ in runs)
    first = statistics.median(f for _, f in runs)
    print(f"{args.lines} lines x {args.frames} frames, {args.config}, {args.runs} runs: "
          f"command to exit {wall:.1f} s (runs: {', '.join(f'{w:.1f}' for w, _ in runs)}); "
          f"first frame scored {first:.0f} ms after it was read")
    append_records(args.json, [{"device": device_name("cpu"), "config": args.config, "lines": args.lines,
                                "frames": args.frames, "runs": args.runs, "median_wall_s": round(wall, 2),
                                "median_first_frame_latency_ms": round(first, 1)}])


if __name__ == "__main__":
    main()
