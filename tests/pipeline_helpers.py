"""Helpers shared by the Ray pipeline tests: frame folders, configs, result rows, fault plans,
and stopping a test module's Ray."""
import os
import signal
import time
from pathlib import Path

import numpy as np
import ray
from PIL import Image

from actors.result_table import read_results
from actors.snapshots import SnapshotStore
from configs.pipeline import PipelineConfig
from pipelines.line_cluster import LineCluster, RunSummary
from rareclip_core.data.synthetic import SyntheticLine


def read_rows(results_dir) -> list[dict]:
    table = read_results(results_dir)
    return sorted(table.to_pylist(), key=lambda r: (r["line_id"], r["seq"]))


def line_frames(seed: int, n: int) -> list[np.ndarray]:
    line = SyntheticLine("object" if seed % 2 else "texture", seed=seed, size=96, defect_rate=0.15)
    return [line.frame(i).image for i in range(n)]


def write_folder(root: Path, line: str, images, extras=None) -> list[Path]:
    folder = root / line
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        path = folder / f"frame_{i:04d}_b.png"
        Image.fromarray(im).save(path)
        paths.append(path)
    for name, data in (extras or {}).items():
        (folder / name).write_bytes(data)
    return paths


def pipeline_config(tiny_config, source_root, out, **kw) -> PipelineConfig:
    return PipelineConfig(
        detector=tiny_config,
        source={"kind": "folder", "root": str(source_root)},
        out=str(out),
        map_resolution=None,
        line_num_cpus=0.5,
        **kw,
    )


def run_planned(cfg: PipelineConfig, make_plan, lines=None) -> tuple[object, RunSummary]:
    """Run the job with `on_poll=make_plan(cluster)` (a `KillPlan`, say), always shutting it
    down: (the plan, the run's summary)."""
    cluster = LineCluster(cfg, lines)
    try:
        plan = make_plan(cluster)
        summary = cluster.run(progress=False, on_poll=plan)
    finally:
        cluster.shutdown()
    return plan, summary


def _task_state(task: Path) -> str:
    """A thread's state letter in /proc (T: stopped); "T" for one that has ended."""
    try:
        return (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return "T"


class KillPlan:
    """An `on_poll` callback for `LineCluster.run` that kills actors one after another, at
    chosen points of the stream: step (actor name, line, frames) kills the actor once `line`
    has scored `frames` frames past where it stood when the supervisor reported recovering
    from the previous kill (a new event). Deterministic up to the poll granularity: it watches
    the line actor's progress closely instead of waiting for the next poll.

    A step also waits until the line has `min_snapshots` snapshots (so that a restart restores
    one rather than starting afresh). A kill is never later than `margin` frames before the
    line's end (so the ingest still feeds it).

    A kill is a SIGKILL of the actor's process (Ray restarts it), made once the process is
    frozen (SIGSTOP): `before_kill(i)` runs while the i-th one is frozen, so that nothing the
    actor does after it is seen (to damage its newest snapshot, say: `ray.kill` returns before
    the actor stops, which may save a newer one meanwhile). `kill(name)` replaces this (to
    remove a node, say)."""

    def __init__(
        self,
        cluster,
        steps,
        before_kill=None,
        min_snapshots: int = 0,
        margin: int = 12,
        timeout_s: float = 120.0,
        kill=None,
    ):
        assert not (kill and before_kill), "before_kill runs inside the default kill"
        self.cluster = cluster
        self.kill = kill or self._kill_process
        self.min_snapshots = min_snapshots
        self.steps = list(steps)
        self.before_kill = before_kill
        self.margin = margin
        self.timeout_s = timeout_s
        self.totals = cluster.source_totals()
        self.killed: list[tuple[str, int]] = []  # (actor, the watched line's seq when killed)
        self.events_seen = 0
        self.base = None

    def __call__(self, status: dict) -> None:
        if not self.steps or len(status["events"]) < self.events_seen:
            return  # done, or the previous kill is not recovered yet
        name, line, frames = self.steps[0]
        if self.base is None:
            self.base = status["progress"][line]
        target = min(self.base + frames, self.totals[line] - self.margin)
        deadline = time.monotonic() + self.timeout_s
        seq = None
        while time.monotonic() < deadline:
            try:
                seq = ray.get(self.cluster.line_actors[line].progress.remote(), timeout=10)["next_seq"]
            except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
                return  # restarting (the writer's restart made it restore, say): next poll
            if seq >= target and self._snapshots(line) >= self.min_snapshots:
                break
            time.sleep(0.01)
        if seq is None or seq > self.totals[line] - self.margin // 2:
            return  # too close to the line's end: the caller's check of `killed` fails
        events = len(ray.get(self.cluster.supervisor.status.remote())["events"])
        self.kill(name)
        self.killed.append((name, seq))
        self.steps.pop(0)
        self.events_seen, self.base = events + 1, None

    def _kill_process(self, name: str) -> None:
        pid = ray.get(self.cluster.actors()[name].__ray_call__.remote(lambda _: os.getpid()), timeout=60)
        os.kill(pid, signal.SIGSTOP)
        while not all(_task_state(task) in "Tt" for task in Path(f"/proc/{pid}/task").glob("*")):
            time.sleep(0.001)  # the signal is delivered to each thread on its next kernel entry
        if self.before_kill:
            self.before_kill(len(self.killed))
        os.kill(pid, signal.SIGKILL)

    def _snapshots(self, line: str) -> int:
        return len(SnapshotStore(self.cluster.cfg.snapshot_root, line).list()) if self.min_snapshots else 0
