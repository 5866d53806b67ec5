"""Aggregate throughput and latency of L lines sharing one machine through the Ray pipeline,
and replay throughput with backbone batching. Prints figures; not a test.

    python benchmarks/pipeline_throughput.py --config configs/detector-tiny.yaml --lines 1 4 --frames 40
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.result_table import read_results  # noqa: E402
from configs.loading import load_detector_config  # noqa: E402
from configs.pipeline import PipelineConfig  # noqa: E402
from pipelines.line_cluster import LineCluster, start_ray  # noqa: E402
from rareclip_core import DetectorSettings  # noqa: E402
from rareclip_core.data.synthetic import write_line_folder  # noqa: E402


def run_once(detector: DetectorSettings, source_root: Path, out: Path, lines: list[str], batch: int, lines_per_gpu: int):
    cfg = PipelineConfig(
        detector=detector,
        source={"kind": "folder", "root": str(source_root), "lines": lines},
        out=str(out),
        map_resolution=None,
        backbone_batch=batch,
        lines_per_gpu=lines_per_gpu,
        max_in_flight=max(8, 2 * batch),
        snapshot={"every_frames": None},
    )
    cluster = LineCluster(cfg)
    try:
        cluster.run(progress=False)
    finally:
        cluster.shutdown()
    table = read_results(cfg.results_dir, columns=["latency_ms", "scored_time"])
    latency = np.asarray(table["latency_ms"])
    scored = np.sort(np.asarray(table["scored_time"]).astype("datetime64[us]").astype(np.int64)) / 1e6
    # throughput over the scoring itself: actor start-up (model load) is not counted
    rate = (len(scored) - 1) / (scored[-1] - scored[0])
    return rate, float(np.percentile(latency, 50)), float(np.percentile(latency, 99))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/detector-tiny.yaml")
    parser.add_argument("--pretrained", help="override detector.pretrained ('none' for random weights)")
    parser.add_argument("--lines", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--frames", type=int, default=60, help="frames per line")
    parser.add_argument("--batch", type=int, default=8, help="backbone batch for the replay figure")
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    detector = load_detector_config(args.config)
    if args.pretrained:
        detector = detector.model_copy(update={"pretrained": None if args.pretrained == "none" else args.pretrained})
    detector = detector.model_copy(update={"device": "auto"})
    work = Path(tempfile.mkdtemp(prefix="rareclip-bench-"))
    try:
        names = [f"line{i:02d}" for i in range(max(args.lines))]
        for i, name in enumerate(names):
            write_line_folder(work / "src" / name, args.frames, "object" if i % 2 else "texture", i, args.size)
        start_ray()
        print(f"{args.frames} frames per line, {args.size}px, model {detector.model}, device {detector.device}")
        for n in args.lines:
            ips, p50, p99 = run_once(detector, work / "src", work / f"out-{n}", names[:n], 1, max(n, 1))
            print(f"lines={n} aggregate_img_s={ips:.1f} latency_p50_ms={p50:.0f} latency_p99_ms={p99:.0f}")
        ips, p50, p99 = run_once(detector, work / "src", work / "out-replay", names[:1], args.batch, 1)
        print(f"replay_one_line batch={args.batch} img_s={ips:.1f}")
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
