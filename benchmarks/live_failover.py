"""How long a live job is blind when one of its actors crashes, and that the crash loses or
repeats nothing: a "camera" puts frames into a watched folder at a steady rate; each time the
line has scored `--every` more frames, the next actor of `--victims` is killed (Ray restarts it;
a line restores its newest snapshot and ingestion feeds it again from there; a writer starts
from the rows it had persisted; an ingestion actor from its ledger). Once the camera is done,
the same frames are replayed without faults, and the two result tables must be equal row by row
(scores bitwise). Prints figures; not a test.

    python benchmarks/live_failover.py --config configs/detector-tiny.yaml --rate 4 --victims line line line

Per kill: `blind_s`, from the kill to the first verdict scored after it (the table's first row
scored later); `rescored` (a line's kill), the frames between the restored snapshot and the
kill, scored twice (their rows are written once); `worst_delay_s`, the longest time a frame
waited from its arrival in the folder to its verdict (the row's `scored_time`), against
`normal_delay_s`, the median delay of the frames before the first kill; `restarted_s`, from the
kill to the moment the supervisor heard that the new actor had started (a line's: after it
imported torch and OpenCLIP, built the detector and loaded the snapshot; read from the job's
status, polled every 0.5 s, so up to 0.5 s late).
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
from pipelines.drill import RESTART_KIND, compare_results  # noqa: E402
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


ACTOR = {"line": f"line:{LINE}", "ingest": "ingest:0", "writer": "writer"}  # victim -> `LineCluster.actors` name


class Crashes:
    """`on_poll`: kills the next actor of `victims` once the line has scored `every` frames
    (the first) or `every` more frames since the previous victim was back (its restart reported);
    stops the job once the camera is done, every frame is scored and the last victim is back."""

    def __init__(self, cluster: LineCluster, camera: Camera, every: int, victims: list[str]):
        self.cluster, self.camera, self.every, self.victims = cluster, camera, every, victims
        self.killed: list[tuple[str, dt.datetime, int]] = []  # (victim, when, the line's next seq then)
        self.back: list[dt.datetime] = []  # when the supervisor had reported each restart (polls: up to 0.5 s late)
        self.restarts_before = 0  # the victim's restart count when it was killed
        self.next_kill_at = every  # frames scored

    def __call__(self, status: dict) -> None:
        scored = status["progress"][LINE]
        if len(self.back) < len(self.killed):
            victim = self.killed[-1][0]
            if status["event_counts"].get(RESTART_KIND[victim], 0) > self.restarts_before:
                self.back.append(dt.datetime.now(dt.timezone.utc))
                self.next_kill_at = scored + self.every
        back = len(self.back) == len(self.killed)  # the previous victim is back
        if back and len(self.killed) < len(self.victims) and scored >= self.next_kill_at:
            victim = self.victims[len(self.killed)]
            self.restarts_before = status["event_counts"].get(RESTART_KIND[victim], 0)
            self.killed.append((victim, dt.datetime.now(dt.timezone.utc), scored))
            ray.kill(self.cluster.actors()[ACTOR[victim]], no_restart=False)
        elif back and self.camera.done.is_set() and scored >= len(self.camera.frames):
            self.cluster.supervisor.stop.remote()


def seconds(a: dt.datetime, b: dt.datetime) -> float:
    return (a - b).total_seconds()


def figures(rows: list[dict], camera: Camera, crashes: Crashes, restored: list[int]) -> list[dict]:
    """One record per kill, from the table's rows, the camera's arrival times and the seqs the
    restarted lines restored (in the order of the lines' kills)."""
    delay = {r["seq"]: seconds(r["scored_time"], camera.arrived[r["uri"]]) for r in rows}
    killed = crashes.killed
    first_kill = killed[0][1]
    normal = statistics.median(delay[r["seq"]] for r in rows if r["scored_time"] < first_kill)
    restored_at = iter(restored)
    records = []
    for k, ((victim, when, next_seq), back) in enumerate(zip(killed, crashes.back)):
        until = killed[k + 1][1] if k + 1 < len(killed) else None
        after = [r for r in rows if r["scored_time"] > when and (until is None or r["scored_time"] < until)]
        first_new = min(after, key=lambda r: r["scored_time"])
        seq = next(restored_at) if victim == "line" else None
        records.append({
            "kill": k, "victim": victim, "next_seq_at_kill": next_seq, "restored_at_seq": seq,
            "rescored": None if seq is None else next_seq - seq,
            "blind_s": seconds(first_new["scored_time"], when), "restarted_s": seconds(back, when),
            "worst_delay_s": max(delay[r["seq"]] for r in after), "normal_delay_s": normal,
        })
    return records


def restored_seqs(events: list[str]) -> list[int]:
    """The seqs of the supervisor's "line camera restarted, restored at seq N" events, in order."""
    prefix = f"line {LINE} restarted, restored at seq "
    return [int(e.split(prefix, 1)[1].split()[0]) for e in events if prefix in e]


def run_once(cfg: PipelineConfig, work: Path, rate: float, every: int, victims: list[str]) -> list[dict]:
    camera = Camera(work / "staged", work / "src" / LINE, rate)
    cluster = LineCluster(cfg, lines=[LINE])
    try:
        crashes = Crashes(cluster, camera, every, victims)
        camera.start()
        summary = cluster.run(progress=False, on_poll=crashes)
    finally:
        cluster.shutdown()
    rows = read_results(cfg.results_dir, columns=["seq", "uri", "scored_time"]).to_pylist()
    if len(rows) != len(camera.frames):
        raise SystemExit(f"{len(rows)} rows for {len(camera.frames)} frames")
    return figures(rows, camera, crashes, restored_seqs(summary.events))


def replay_without_faults(cfg: PipelineConfig, out: Path) -> Path:
    """The same folder replayed (not watched) by a job of its own; its result table."""
    replay = cfg.model_copy(update={"source": cfg.source.model_copy(update={"watch": False}), "out": str(out)})
    cluster = LineCluster(replay, lines=[LINE])
    try:
        cluster.run(progress=False)
    finally:
        cluster.shutdown()
    return replay.results_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/detector-tiny.yaml")
    parser.add_argument("--rate", type=float, default=4.0, help="frames per second the camera writes")
    parser.add_argument("--victims", nargs="+", choices=sorted(ACTOR), default=["line"] * 3,
                        help="the actors killed, one after another")
    parser.add_argument("--every", type=int, default=40, help="frames scored before the first crash, and after each victim is back")
    parser.add_argument("--snapshot-every", type=int, default=25, help="snapshot.every_frames")
    parser.add_argument("--size", type=int, default=256, help="side of the PNG frames")
    parser.add_argument("--json", default=None, help="append the figures as records to this JSON list")
    args = parser.parse_args()
    detector = load_detector_config(args.config).model_copy(update={"device": "auto"})
    # each victim's time away (up to ~8 s here) piles frames up, and the next kill waits `every` more
    frames = args.every * (len(args.victims) + 1) + int(8 * args.rate) * len(args.victims)
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
        print(f"{frames} frames at {args.rate}/s, crashes of {' '.join(args.victims)}, snapshots every "
              f"{args.snapshot_every} frames, model {detector.model} @ {detector.image_size}, {device}")
        records = run_once(cfg, work, args.rate, args.every, args.victims)
        verdict = compare_results(replay_without_faults(cfg, work / "replay"), cfg.results_dir)
    finally:
        stop_ray()
        shutil.rmtree(work, ignore_errors=True)
    for r in records:
        again = "" if r["rescored"] is None else (
            f", {r['rescored']} frames scored again (restored at seq {r['restored_at_seq']}, killed at {r['next_seq_at_kill']})")
        print(f"crash {r['kill']} ({r['victim']}): blind {r['blind_s']:.1f} s (the actor was back after "
              f"{r['restarted_s']:.1f} s){again}; longest wait for a verdict {r['worst_delay_s']:.1f} s against "
              f"{r['normal_delay_s']:.2f} s normally")
    faults = {k: v for k, v in verdict.items() if k in ("missing", "extra", "duplicated", "differing") and v}
    print(f"against a replay without faults: {verdict['rows']} rows, " + ("the same" if verdict["ok"] else f"DIFFERENT: {faults}"))
    append_records(args.json, [{"what": "live failover", "device": device, "config": args.config,
                                "image_size": detector.image_size, "lines": 1, "rate": args.rate,
                                "snapshot_every": args.snapshot_every, "same_as_replay": verdict["ok"], **r}
                               for r in records])
    if not verdict["ok"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
