"""Aggregate throughput and latency of L lines sharing one machine through the Ray pipeline,
and replay throughput of one line with backbone batching. Prints figures; not a test.

    python benchmarks/pipeline_throughput.py --config configs/detector-tiny.yaml --lines 1 4 --frames 40
    python benchmarks/pipeline_throughput.py --no-model --lines 1 4 --frames 200   # the pipeline alone
    python benchmarks/pipeline_throughput.py --config configs/detector-paper.yaml --pretrained none \
        --lines 1 4 8 16 --replay-batches 1 8 32 --json docs/benchmarks/DATE-pipeline.json

With L lines the L line actors share the machine's GPU(s) at lines_per_gpu = L. Images/s is
counted over the scoring itself (first to last scored frame), so actor start-up (model load) is
left out, and so are each line's first `--warmup-frames` frames (a new process's first CUDA
calls load kernels and build handles, which would count against a short run). Latency is each row's `latency_ms`: ingest to scored, so it includes the wait in the
line's queue (up to max_in_flight frames). GPU memory is the peak of `nvidia-smi`'s used memory
over the run, all processes together (weights, state, work space and each process's CUDA context);
GPU utilization (nvidia-smi's, the share of time a kernel ran) and the 1-minute load average are
means over the samples taken while frames were being scored.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.result_table import read_results  # noqa: E402
from benchmarks.overhead_probe import OverheadProbeConfig  # noqa: E402
from benchmarks.records import append_records  # noqa: E402
from benchmarks.weights import with_weights  # noqa: E402
from configs.loading import load_detector_config  # noqa: E402
from configs.pipeline import PipelineConfig  # noqa: E402
from pipelines.line_cluster import LineCluster, start_ray, stop_ray  # noqa: E402
from rareclip_core import DetectorSettings  # noqa: E402
from rareclip_core.data.synthetic import write_line_folder  # noqa: E402


class MachineSampler:
    """Samples, every 0.2 s while active: nvidia-smi's used memory (MiB, all GPUs summed) and
    utilization (%, mean over GPUs), and the 1-minute load average. GPU figures are None where
    nvidia-smi is missing."""

    def __init__(self):
        self.samples: list[tuple[float, float | None, float | None, float]] = []  # (time, MiB, %, load)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def gpu_now() -> tuple[float | None, float | None]:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used,utilization.gpu", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            return None, None
        rows = [[float(v) for v in line.split(",")] for line in out.strip().splitlines()]
        return sum(r[0] for r in rows), sum(r[1] for r in rows) / len(rows)

    def _sample(self):
        while not self._stop.wait(0.2):
            self.samples.append((time.time(), *self.gpu_now(), os.getloadavg()[0]))

    def peak_memory_mb(self) -> float | None:
        used = [s[1] for s in self.samples if s[1] is not None]
        return max(used) if used else None

    def means(self, start: float, end: float) -> tuple[float | None, float | None]:
        """Mean GPU utilization and mean load average over the samples within [start, end]."""
        window = [s for s in self.samples if start <= s[0] <= end]
        util = [s[2] for s in window if s[2] is not None]
        return (float(np.mean(util)) if util else None), (float(np.mean([s[3] for s in window])) if window else None)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def write_lines(work: Path, names: list[str], frames: int, size: int, unique: int = 6) -> None:
    """`work/src/<line>/` with `frames` PNGs each: hard links to `unique` synthetic frames per kind
    (object lines and texture lines alternate; copies where links fail). Decoding a link costs
    what a new frame would; making a 1024 px frame takes about 0.6 s, too long for 16 lines on a
    short lease, and links keep long runs (hundreds of frames per line) off the disk."""
    templates = {kind: [Path(p) for p, _ in write_line_folder(work / "templates" / kind, min(frames, unique), kind, seed, size)]
                 for seed, kind in enumerate(("texture", "object"))}
    for i, name in enumerate(names):
        folder = work / "src" / name
        folder.mkdir(parents=True)
        kind = templates["object" if i % 2 else "texture"]
        for j in range(frames):
            template, frame = kind[j % len(kind)], folder / f"frame_{j:06d}.png"
            try:
                os.link(template, frame)
            except OSError:
                shutil.copyfile(template, frame)


def gpu_name():
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "no GPU (CPU)"


def run_once(detector: DetectorSettings, source_root: Path, out: Path, lines: list[str], *, batch: int, lines_per_gpu: int,
             warmup_frames: int, decode_threads: int, ingest_actors: int, map_resolution: int | None):
    cfg = PipelineConfig(
        detector=detector,
        source={"kind": "folder", "root": str(source_root), "lines": lines},
        out=str(out),
        map_resolution=map_resolution,
        backbone_batch=batch,
        lines_per_gpu=lines_per_gpu,
        decode_threads=decode_threads,
        ingest_actors=ingest_actors,
        max_in_flight=max(8, 2 * batch),
        snapshot={"every_frames": None},
    )
    cluster = LineCluster(cfg)
    try:
        with MachineSampler() as machine:
            cluster.run(progress=False)
    finally:
        cluster.shutdown()
    table = read_results(cfg.results_dir, columns=["line_id", "seq", "latency_ms", "scored_time"])
    warm = np.asarray(table["seq"]) >= warmup_frames  # each line's first frames are left out
    if warm.sum() < 2:
        raise SystemExit(f"--warmup-frames {warmup_frames} leaves fewer than 2 frames to time; give more --frames")
    latency = np.asarray(table["latency_ms"])[warm]
    scored = np.sort(np.asarray(table["scored_time"]).astype("datetime64[us]").astype(np.int64)[warm]) / 1e6
    # throughput over the scoring itself: actor start-up (model load) is not counted
    rate = (len(scored) - 1) / (scored[-1] - scored[0])
    line_ids = np.asarray(table["line_id"])[warm]
    per_line_p50 = [float(np.percentile(latency[line_ids == line], 50)) for line in lines]
    gpu_util, load = machine.means(scored[0], scored[-1])
    return {
        "images": len(scored), "warmup_frames_per_line": warmup_frames, "images_per_s": rate, "p50_ms": float(np.percentile(latency, 50)),
        "p99_ms": float(np.percentile(latency, 99)), "worst_line_p50_ms": max(per_line_p50),
        "max_memory_mb": machine.peak_memory_mb(),
        "gpu_utilization_pct": gpu_util, "load_average": load,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/detector-tiny.yaml")
    parser.add_argument("--no-model", action="store_true",
                        help="lines use a detector that does no work (benchmarks/overhead_probe.py): the pipeline's own "
                             "ceiling (decoding, Ray calls, the writer); --config is then ignored")
    parser.add_argument("--probe-step-ms", type=float, default=0.0,
                        help="with --no-model: each step takes this long, sleeping like a device-bound step")
    parser.add_argument("--probe-holds-gil", action="store_true",
                        help="with --probe-step-ms: spin in Python instead, like a host-bound step")
    parser.add_argument("--pretrained", help="override detector.pretrained ('none' for random weights)")
    parser.add_argument("--lines", type=int, nargs="*", default=[1, 4, 16, 32])
    parser.add_argument("--frames", type=int, default=60, help="frames per line")
    parser.add_argument("--warmup-frames", type=int, default=5, help="each line's first frames, left out of the figures")
    parser.add_argument("--replay-batches", type=int, nargs="*", default=[8], help="backbone batches for the replay figures")
    parser.add_argument("--size", type=int, default=256, help="side of the PNG frames the lines read")
    parser.add_argument("--decode-threads", type=int, default=PipelineConfig.model_fields["decode_threads"].default,
                        help="threads per ingestion actor decoding frames")
    parser.add_argument("--ingest-actors", type=int, default=PipelineConfig.model_fields["ingest_actors"].default,
                        help="ingestion actors sharing the lines (each decodes and feeds its share)")
    parser.add_argument("--cuda-graphs", action="store_true", help="lines replay their backbone as CUDA graphs (RareCLIP)")
    parser.add_argument("--compile-banks", action="store_true",
                        help="lines step their full banks through torch.compile, compiled as each line starts (RareCLIP)")
    parser.add_argument("--resize-on-device", action="store_true", help="lines resize frames on the device, not with PIL")
    parser.add_argument("--map-resolution", type=int, default=None,
                        help="store each frame's anomaly map at this side, as jobs do (default: none stored)")
    parser.add_argument("--json", default=None, help="append the figures as records to this JSON list")
    args = parser.parse_args()
    if (args.probe_step_ms or args.probe_holds_gil) and not args.no_model:
        raise SystemExit("--probe-step-ms and --probe-holds-gil go with --no-model")
    detector = (OverheadProbeConfig(step_ms=args.probe_step_ms, step_holds_gil=args.probe_holds_gil) if args.no_model
                else load_detector_config(args.config))
    if args.pretrained and not args.no_model:  # the probe has no weights
        detector = with_weights(detector, args.pretrained)
    switched_on = {name: True for name in ("cuda_graphs", "compile_banks") if getattr(args, name)}
    for name in switched_on:
        if name not in type(detector).model_fields:
            raise SystemExit(f"--{name.replace('_', '-')}: detector kind {detector.kind!r} has no {name} setting")
    detector = detector.model_copy(update={"device": "auto", "resize_on_device": args.resize_on_device, **switched_on})
    work = Path(tempfile.mkdtemp(prefix="rareclip-bench-"))
    try:
        names = [f"line{i:02d}" for i in range(max(args.lines + [1]))]
        write_lines(work, names, args.frames, args.size)
        start_ray()
        device = gpu_name()
        print(f"{args.frames} frames per line (the first {args.warmup_frames} not timed), {args.size}px, model {detector.model} @ {detector.image_size}, {device}")
        settings = {"decode_threads": args.decode_threads, "ingest_actors": args.ingest_actors, "map_resolution": args.map_resolution}
        common = {"what": "pipeline", "device": device, "config": "no model" if args.no_model else args.config,
                  **({"probe_step_ms": args.probe_step_ms, "probe_holds_gil": args.probe_holds_gil} if args.no_model else {}), "model": detector.model,
                  "image_size": detector.image_size, "frames_per_line": args.frames,
                  "cuda_graphs": bool(getattr(detector, "cuda_graphs", False)),
                  "compile_banks": bool(getattr(detector, "compile_banks", False)), "resize_on_device": args.resize_on_device,
                  "frame_size": args.size, **settings}
        per_run = {"warmup_frames": args.warmup_frames, **settings}
        for n in args.lines:
            figures = run_once(detector, work / "src", work / f"out-{n}", names[:n], batch=1, lines_per_gpu=max(n, 1), **per_run)
            append_records(args.json, [{**common, "lines": n, "backbone_batch": 1, **figures}])  # each as it comes: a cut run keeps it
            print(f"lines={n} aggregate_img_s={figures['images_per_s']:.1f} latency_p50_ms={figures['p50_ms']:.0f} "
                  f"latency_p99_ms={figures['p99_ms']:.0f} worst_line_p50_ms={figures['worst_line_p50_ms']:.0f} "
                  f"gpu_mem_peak_mb={figures['max_memory_mb']} gpu_util_pct={figures['gpu_utilization_pct']} "
                  f"load_average={figures['load_average']}")
        for batch in args.replay_batches:
            figures = run_once(detector, work / "src", work / f"out-replay-{batch}", names[:1], batch=batch, lines_per_gpu=1, **per_run)
            append_records(args.json, [{**common, "what": "replay", "lines": 1, "backbone_batch": batch, **figures}])
            print(f"replay_one_line batch={batch} img_s={figures['images_per_s']:.1f} gpu_mem_peak_mb={figures['max_memory_mb']}")
        stop_ray()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
