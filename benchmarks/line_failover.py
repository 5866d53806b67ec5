"""How long a line is blind when its actor crashes in a live job: a "camera" puts frames into a
watched folder at a steady rate; each time the line has scored `--every` more frames its actor
is killed, `--kills` times (Ray restarts it, it restores its newest snapshot, ingestion feeds it again from there). Prints
figures; not a test.

    python benchmarks/line_failover.py --config configs/detector-tiny.yaml --rate 4 --kills 3

Per kill: `blind_s`, from the kill to the first verdict on a frame the line had not scored
before it; `rescored`, the frames between the restored snapshot and the kill, scored twice
(their rows are written once); `worst_delay_s`, the longest time a frame waited from its
arrival in the folder to its verdict (the row's `scored_time`), against `normal_delay_s`, the
median delay of the frames before the first kill; `restarted_s`, from the kill to the moment
the supervisor heard that the line's new actor had started and restored its snapshot (a new
process importing torch and OpenCLIP, building the detector, loading the snapshot; read from
the job's status, polled every 0.5 s, so up to 0.5 s late). The rest of `blind_s` is the
frames since the snapshot fed and scored again.
"""
from __future__ import annotations

import argparse
import datetime as dt
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.pipeline_throughput import gpu_name, write_lines  # noqa: E402
from benchmarks.records import append_records  # noqa: E402
from actors.result_table import read_results  # noqa: E402
from configs.loading import load_detector_config  # noqa: E402
from configs.pipeline import PipelineConfig  # noqa: E402
from pipelines.line_cluster import LineCluster, start_ray, stop_ray  # noqa: E402

LINE = "camera"


class Camera(threading.Thread):
    """Moves the staged frames into the watched line folder, one every 1/rate s, and records
    when each arrived (wall clock, UTC)."""

    def __init__(self, staged: Path, folder: Path, rate: float):
        super().__init__(daemon=True)
        self.frames = sorted(staged.iterdir())
        self.folder, self.period = folder, 1.0 / rate
        self.arrived: dict[str, dt.datetime] = {}
        self.done = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        for i, frame in enumerate(self.frames):
            time.sleep(max(0.0, start + i * self.period - time.monotonic()))
            target = self.folder / frame.name
            frame.rename(target)
            self.arrived[str(target)] = dt.datetime.now(dt.timezone.utc)
        self.done.set()


class Crashes:
    """`on_poll`: kills the line's actor each time it has scored `every` more frames, `kills`
    times; stops the job once the camera is done and every frame is scored."""

    def __init__(self, cluster: LineCluster, camera: Camera, every: int, kills: int):
        self.cluster, self.camera, self.every, self.kills = cluster, camera, every, kills
        self.killed: list[tuple[dt.datetime, int]] = []  # (when, the line's next seq then)
        self.back: list[dt.datetime] = []  # when the supervisor had heard of each restart (polls: up to 0.5 s late)

    def __call__(self, status: dict) -> None:
        scored = status["progress"][LINE]
        while len(self.back) < status["event_counts"].get("line restarts", 0):
            self.back.append(dt.datetime.now(dt.timezone.utc))
        back = len(self.back) == len(self.killed)  # the previous victim is back
        if back and len(self.killed) < self.kills and scored >= self.every * (len(self.killed) + 1):
            self.killed.append((dt.datetime.now(dt.timezone.utc), scored))
            ray.kill(self.cluster.line_actors[LINE], no_restart=False)
        elif back and self.camera.done.is_set() and scored >= len(self.camera.frames):
            self.cluster.supervisor.stop.remote()


def seconds(a: dt.datetime, b: dt.datetime) -> float:
    return (a - b).total_seconds()


def figures(rows: list[dict], camera: Camera, crashes: Crashes, restored: list[int]) -> list[dict]:
    """One record per kill, from the table's rows and the camera's arrival times."""
    delay = {r["seq"]: seconds(r["scored_time"], camera.arrived[r["uri"]]) for r in rows}
    killed = crashes.killed
    first_kill = killed[0][0]
    normal = statistics.median(delay[r["seq"]] for r in rows if r["scored_time"] < first_kill)
    records = []
    for k, ((when, next_seq), back, restored_at) in enumerate(zip(killed, crashes.back, restored)):
        until = killed[k + 1][0] if k + 1 < len(killed) else None
        after = [r for r in rows if r["scored_time"] > when and (until is None or r["scored_time"] < until)]
        first_new = min(after, key=lambda r: r["scored_time"])
        records.append({
            "kill": k, "next_seq_at_kill": next_seq, "restored_at_seq": restored_at,
            "rescored": next_seq - restored_at,
            "blind_s": seconds(first_new["scored_time"], when), "restarted_s": seconds(back, when),
            "worst_delay_s": max(delay[r["seq"]] for r in after), "normal_delay_s": normal,
        })
    return records


def restored_seqs(events: list[str]) -> list[int]:
    """The seqs of the supervisor's "line camera restarted, restored at seq N" events, in order."""
    prefix = f"line {LINE} restarted, restored at seq "
    return [int(e.split(prefix, 1)[1].split()[0]) for e in events if prefix in e]


def run_once(cfg: PipelineConfig, work: Path, rate: float, every: int, kills: int) -> list[dict]:
    camera = Camera(work / "staged", work / "src" / LINE, rate)
    cluster = LineCluster(cfg, lines=[LINE])
    try:
        crashes = Crashes(cluster, camera, every, kills)
        camera.start()
        summary = cluster.run(progress=False, on_poll=crashes)
    finally:
        cluster.shutdown()
    rows = read_results(cfg.results_dir, columns=["seq", "uri", "scored_time"]).to_pylist()
    if len(rows) != len(camera.frames):
        raise SystemExit(f"{len(rows)} rows for {len(camera.frames)} frames")
    return figures(rows, camera, crashes, restored_seqs(summary.events))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/detector-tiny.yaml")
    parser.add_argument("--rate", type=float, default=4.0, help="frames per second the camera writes")
    parser.add_argument("--kills", type=int, default=3, help="crashes of the line's actor, one after another")
    parser.add_argument("--every", type=int, default=40, help="frames scored between two crashes")
    parser.add_argument("--snapshot-every", type=int, default=25, help="snapshot.every_frames")
    parser.add_argument("--size", type=int, default=256, help="side of the PNG frames")
    parser.add_argument("--json", default=None, help="append the figures as records to this JSON list")
    args = parser.parse_args()
    detector = load_detector_config(args.config).model_copy(update={"device": "auto"})
    frames = args.every * (args.kills + 1)
    start_ray()
    work = Path(tempfile.mkdtemp(prefix="rareclip-failover-"))
    try:
        device = gpu_name()
        write_lines(work, [LINE], frames, args.size)
        (work / "src" / LINE).rename(work / "staged")
        (work / "src" / LINE).mkdir()
        cfg = PipelineConfig(
            detector=detector,
            source={"kind": "folder", "root": str(work / "src"), "lines": [LINE], "watch": True, "poll_s": 0.1, "settle_s": 0.0},
            out=str(work / "out"), map_resolution=None, snapshot={"every_frames": args.snapshot_every},
        )
        print(f"{frames} frames at {args.rate}/s, {args.kills} crashes, snapshots every {args.snapshot_every} frames, "
              f"model {detector.model} @ {detector.image_size}, {device}")
        records = run_once(cfg, work, args.rate, args.every, args.kills)
    finally:
        stop_ray()
        shutil.rmtree(work, ignore_errors=True)
    for r in records:
        print(f"crash {r['kill']}: blind {r['blind_s']:.1f} s (the actor restarted and restored after "
              f"{r['restarted_s']:.1f} s), {r['rescored']} frames scored again "
              f"(restored at seq {r['restored_at_seq']}, killed at {r['next_seq_at_kill']}); longest wait for a "
              f"verdict {r['worst_delay_s']:.1f} s against {r['normal_delay_s']:.2f} s normally")
    append_records(args.json, [{"what": "line failover", "device": device, "config": args.config,
                                "image_size": detector.image_size, "lines": 1, "rate": args.rate,
                                "snapshot_every": args.snapshot_every, **r} for r in records])


if __name__ == "__main__":
    main()
