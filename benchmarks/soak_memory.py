"""Whether a long live job's actors hold more memory the longer it runs: a watched folder job
scores `--frames` frames on each of `--lines` lines as fast as it can (anomaly maps stored,
snapshots on), and the resident memory (RSS) of every actor's process and of the driver is
read from /proc every 2 s. Prints, per actor kind, the RSS once the first `--warm` frames are
scored, at the end, the highest between, and the growth per 1,000 frames (a line fitted to the
samples). Linux only; not a test.

    python benchmarks/soak_memory.py --lines 2 --frames 3000
    python benchmarks/soak_memory.py --source nats --lines 2 --frames 3000   # NATS in, verdicts out

With `--source nats` a local nats-server (from the `nats` extra) holds the frames in a stream
that keeps 2,000 per line, a camera thread publishes them up to 200 ahead of the slowest line,
and every row's verdict is published.

A line's memories fill within its first frames (RareCLIP: `max_images` images), so a steady
line should stop growing after the warm-up; what still grows is what a line streaming for days
would pay.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.pipeline_throughput import gpu_name, write_lines  # noqa: E402
from benchmarks.records import append_records, rss_mb  # noqa: E402
from configs.loading import load_detector_config  # noqa: E402
from configs.pipeline import PipelineConfig  # noqa: E402
from pipelines.line_cluster import LineCluster, start_ray, stop_ray  # noqa: E402

ACTORS = ("LineActor", "IngestActor", "ResultWriter", "Supervisor")
KINDS = (*ACTORS, "driver")
SAMPLE_EVERY_S = 2.0


def actor_rss_mb() -> dict[str, list[float]]:
    """Kind -> the RSS (MiB) of each of its processes: the actors, found by the title Ray gives
    them (`ray::LineActor.submit`, `ray::IngestActor`, ...), and this driver."""
    found: dict[str, list[float]] = defaultdict(list)
    found["driver"].append(rss_mb(Path("/proc/self")))
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            kind = next((k for k in ACTORS if title.startswith(f"ray::{k}")), None)
            if kind:
                found[kind].append(rss_mb(proc))
        except OSError:  # gone meanwhile
            continue
    return found


class Sampler:
    """`on_poll`: reads every actor's RSS every 2 s, with the frames scored then, tells a NATS
    camera how far the lines are; stops the job once every line has scored its frames."""

    def __init__(self, cluster: LineCluster, frames: int, camera: "NatsCamera | None" = None):
        self.cluster, self.frames, self.camera = cluster, frames, camera
        self.samples: list[tuple[int, dict[str, list[float]]]] = []  # (frames scored in all, RSS by kind)
        self.last = 0.0

    def __call__(self, status: dict) -> None:
        scored = sum(status["progress"].values())
        if time.monotonic() - self.last >= SAMPLE_EVERY_S:
            self.samples.append((scored, actor_rss_mb()))
            self.last = time.monotonic()
        if self.camera:
            self.camera.scored = min(status["progress"].values())
        if min(status["progress"].values()) >= self.frames:
            self.cluster.supervisor.stop.remote()


def growth(samples: list[tuple[int, dict[str, list[float]]]], warm: int) -> list[dict]:
    """Per kind, over the samples past `warm` frames (of its largest process): the RSS at the
    first and the last, the highest, and the growth per 1,000 frames as the slope of a
    least-squares line (two samples alone move with the allocator's mood)."""
    past = [s for s in samples if s[0] >= warm]
    rows = []
    for kind in KINDS:
        points = [(frames, max(rss[kind])) for frames, rss in past if kind in rss]
        if len(points) < 2:
            continue
        x, y = np.array(points, dtype=float).T
        slope = np.polyfit(x, y, 1)[0]
        rows.append({"actor": kind, "frames_from": int(x[0]), "frames_to": int(x[-1]), "rss_from_mb": round(y[0], 1),
                     "rss_to_mb": round(y[-1], 1), "rss_max_mb": round(y.max(), 1), "samples": len(points),
                     "mb_per_1000_frames": round(slope * 1000, 2)})
    return rows


class NatsCamera(threading.Thread):
    """Publishes each line's frames to its NATS subject (the lines interleaved, as cameras
    would), at most `ahead` frames past the slowest line's progress, which the sampler updates."""

    def __init__(self, url: str, lines: list[str], frames: int, images: list[bytes], ahead: int = 200):
        super().__init__(daemon=True)
        self.url, self.lines, self.frames, self.images, self.ahead = url, lines, frames, images, ahead
        self.scored = 0  # the slowest line's progress

    def run(self) -> None:
        from rareclip_core.data.nats_stream import NatsLink, StreamSettings, publish_frame

        link, settings = NatsLink(self.url), StreamSettings(self.url, "FRAMES", "frames")
        try:
            for i in range(self.frames):
                while i - self.scored > self.ahead:
                    time.sleep(0.05)
                for line in self.lines:
                    publish_frame(link, settings, line, self.images[i % len(self.images)], msg_id=f"{line}:{i}")
        finally:
            link.close()


def bounded_frame_stream(url: str, per_line: int) -> None:
    """Stream FRAMES keeping each line's newest `per_line` messages (file storage), as a
    deployment that streams for days would set it (README: the stream may drop old frames)."""
    from nats.js.api import StorageType, StreamConfig

    from rareclip_core.data.nats_stream import NatsLink

    link = NatsLink(url)
    try:
        link.call(link.js.add_stream(StreamConfig(name="FRAMES", subjects=["frames.>"], storage=StorageType.FILE,
                                                  max_msgs_per_subject=per_line)))
    finally:
        link.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/detector-tiny.yaml")
    parser.add_argument("--source", choices=("folder", "nats"), default="folder",
                        help="nats: a local nats-server, frames published by a camera thread, verdicts published")
    parser.add_argument("--lines", type=int, default=2)
    parser.add_argument("--frames", type=int, default=3000, help="frames per line")
    parser.add_argument("--warm", type=int, default=500, help="frames (all lines together) before the first figure")
    parser.add_argument("--size", type=int, default=256, help="side of the PNG frames")
    parser.add_argument("--json", default=None, help="append the figures as records to this JSON list")
    args = parser.parse_args()
    detector = load_detector_config(args.config).model_copy(update={"device": "auto"})
    lines = [f"line{i:02d}" for i in range(args.lines)]
    start_ray()
    work = Path(tempfile.mkdtemp(prefix="rareclip-soak-"))
    server = camera = None
    try:
        device = gpu_name()
        if args.source == "folder":
            write_lines(work, lines, args.frames, args.size)
            source = {"kind": "folder", "root": str(work / "src"), "watch": True, "poll_s": 0.5, "settle_s": 0.0}
            extra = {}
        else:
            from pipelines.nats_server import start_nats_server

            write_lines(work, lines[:1], 6, args.size)
            images = [p.read_bytes() for p in sorted((work / "src" / lines[0]).iterdir())]
            server = start_nats_server(str(work / "jetstream"))
            bounded_frame_stream(server.url, per_line=2000)
            camera = NatsCamera(server.url, lines, args.frames, images)
            camera.start()
            source = {"kind": "nats", "url": server.url, "lines": lines, "watch": True}
            extra = {"verdicts": {"kind": "nats"}}
        cfg = PipelineConfig(detector=detector, out=str(work / "out"), source=source, **extra)
        print(f"{args.lines} lines x {args.frames} frames from a {args.source} source, {args.size}px, model "
              f"{detector.model} @ {detector.image_size}, {device}")
        cluster = LineCluster(cfg)
        started = time.monotonic()
        try:
            sampler = Sampler(cluster, args.frames, camera)
            cluster.run(progress=False, on_poll=sampler)
        finally:
            cluster.shutdown()
        seconds = time.monotonic() - started
    finally:
        stop_ray()
        if server:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    rows = growth(sampler.samples, args.warm)
    print(f"{args.lines * args.frames} frames in {seconds:.0f} s")
    for r in rows:
        print(f"{r['actor']:>12}: {r['rss_from_mb']:.0f} MiB at {r['frames_from']} frames, {r['rss_to_mb']:.0f} MiB at "
              f"{r['frames_to']}, at most {r['rss_max_mb']:.0f}; fitted {r['mb_per_1000_frames']:+.2f} MiB per 1,000 frames")
    append_records(args.json, [{"what": "soak memory", "device": device, "config": args.config, "source": args.source,
                                "image_size": detector.image_size, "lines": args.lines, "frames": args.frames,
                                "seconds": round(seconds, 1), **r} for r in rows])


if __name__ == "__main__":
    main()
