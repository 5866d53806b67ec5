"""A live job over a watched folder whose lines are not named takes a line folder that appears
while it runs as a new line: its own actor, fed by an ingestion actor, snapshotted and recovered
like the lines it started with, one row per frame; a folder that cannot be a line is named.
Settings may name a line yet to appear only where lines can join. (NATS: tests/test_nats.py.)"""
import re

import pytest
import ray
from PIL import Image

from actors.names import line_actor_name
from actors.snapshots import SnapshotStore

from pipelines.drill import compare_results
from pipelines.line_cluster import LineCluster
from pipelines.preflight import job_problems
from tests.pipeline_helpers import line_frames, pipeline_config, read_rows, run_planned, write_folder

FIRST, JOINING = 6, 10  # frames of the line there from the start, of the line that joins


@pytest.fixture(scope="module")
def fault_free(local_ray, tiny_config, tmp_path_factory):
    """The result table of a replay of both lines' frames without faults, lines or folders
    coming or going (the tests compare their tables with it)."""
    root = tmp_path_factory.mktemp("fault-free")
    write_folder(root / "src", "a", line_frames(60, FIRST))
    write_folder(root / "src", "b", line_frames(61, JOINING))
    reference = pipeline_config(tiny_config, root / "src", root / "out", max_in_flight=2)
    cluster = LineCluster(reference, ["a", "b"])
    try:
        assert cluster.run(progress=False).counts == {"a": FIRST, "b": JOINING}
    finally:
        cluster.shutdown()
    return reference.results_dir


class NewLineFolder:
    """`on_poll`: once line a is scored, line b's folder appears with its first frames (and a
    folder that cannot name a line); once b has rows, its ingestion actor is killed, then b's own
    actor; once that is back, b's last frames arrive; once b is scored whole, the job stops."""

    def __init__(self, cluster, src):
        self.cluster, self.src = cluster, src
        self.frames = line_frames(61, JOINING)
        self.done: list[str] = []

    def __call__(self, status: dict) -> None:
        progress, recovered = status["progress"], status["event_counts"]
        step = len(self.done)
        if step == 0 and progress["a"] >= FIRST:
            write_folder(self.src, "b", self.frames[: JOINING // 2])
            (self.src / "_scratch").mkdir()
            write_folder(self.src, "c", self.frames[:1])  # a line whose snapshots have other settings
            self.done.append("folders")
        elif step == 1 and progress.get("b", 0) >= 3:
            ray.kill(self.cluster.actors()["ingest:0"], no_restart=False)
            self.done.append("ingest killed")
        elif step == 2 and progress.get("b", 0) >= JOINING // 2 and recovered.get("ingest restarts"):
            ray.kill(self.cluster.actors()["line:b"], no_restart=False)
            self.done.append("line killed")
        elif step == 3 and recovered.get("line restarts"):
            for i in range(JOINING // 2, JOINING):
                Image.fromarray(self.frames[i]).save(self.src / "b" / f"frame_{i:04d}_b.png")
            self.done.append("more frames")
        elif step == 4 and progress.get("b", 0) >= JOINING:
            ray.get(self.cluster.supervisor.stop.remote())
            self.done.append("stopped")


def test_a_line_folder_that_appears_joins_the_live_job_and_recovers_like_the_others(local_ray, tiny_config, fault_free, tmp_path):
    src = tmp_path / "src"
    write_folder(src, "a", line_frames(60, FIRST))
    cfg = pipeline_config(tiny_config, src, tmp_path / "out", snapshot={"every_frames": 2}, max_in_flight=2)
    cfg = cfg.model_copy(update={"source": cfg.source.model_copy(update={"watch": True, "poll_s": 0.2, "settle_s": 0.5})})
    SnapshotStore(cfg.snapshot_root, "c").save({}, 3, "other-settings")
    plan, summary = run_planned(cfg, lambda cluster: NewLineFolder(cluster, src))
    assert plan.done == ["folders", "ingest killed", "line killed", "more frames", "stopped"], (plan.done, summary.events)
    assert summary.counts == {"a": FIRST, "b": JOINING}
    assert f"line b added at seq 0, fed by ingest 0: folder {src / 'b'} appeared" in summary.events, summary.events
    assert {"ingest restarts", "line restarts"} <= set(summary.event_counts), summary.events
    assert any(f"line _scratch appeared (folder {src / '_scratch'}), but cannot join: line id '_scratch'" in n
               for n in summary.notices), summary.notices
    assert f"line c appeared (folder {src / 'c'}), but cannot join: its snapshots in {cfg.snapshot_root}/c (the newest " \
           "covers seqs 0-2) were made with other detector settings; with these it would learn again from seq 0 and " \
           "score every frame again. Go on with the earlier settings; or have it learn afresh from where it stopped: " \
           "`snapshots reset --line c` with this config; or write to another out; then restart the job" in summary.notices
    rows = read_rows(cfg.results_dir)
    assert [(r["line_id"], r["seq"]) for r in rows] == [("a", s) for s in range(FIRST)] + [("b", s) for s in range(JOINING)]
    verdict = compare_results(fault_free, cfg.results_dir)  # the same scores as without faults
    assert verdict["ok"] and verdict["rows"] == FIRST + JOINING, verdict


class GoneLineFolder:
    """`on_poll`: once both lines are scored, line b's folder goes away (renamed to a hidden
    name); once the job has let b's actor go, more frames arrive there and the folder comes
    back; once b is scored whole, the job stops."""

    def __init__(self, cluster, src, frames):
        self.cluster, self.src, self.frames = cluster, src, frames
        self.done: list[str] = []

    def __call__(self, status: dict) -> None:
        progress, step = status["progress"], len(self.done)
        if step == 0 and progress["a"] >= FIRST and progress.get("b", 0) >= BEFORE_GONE:
            (self.src / "b").rename(self.src / ".b-away")
            self.done.append("gone")
        elif step == 1 and "b" not in self.cluster.line_actors:
            with pytest.raises(ValueError):  # its actor has ended
                ray.get_actor(line_actor_name(self.cluster.key, "b"))
            for i in range(BEFORE_GONE, JOINING):
                Image.fromarray(self.frames[i]).save(self.src / ".b-away" / f"frame_{i:04d}_b.png")
            (self.src / ".b-away").rename(self.src / "b")
            self.done.append("back")
        elif step == 2 and progress.get("b", 0) >= JOINING:
            ray.get(self.cluster.supervisor.stop.remote())
            self.done.append("stopped")


BEFORE_GONE = 4  # frames of line b before its folder goes away


def test_a_line_whose_folder_is_gone_is_retired_and_rejoins_where_it_stopped(local_ray, tiny_config, fault_free, tmp_path):
    src = tmp_path / "src"
    frames = line_frames(61, JOINING)
    write_folder(src, "a", line_frames(60, FIRST))
    write_folder(src, "b", frames[:BEFORE_GONE])
    cfg = pipeline_config(tiny_config, src, tmp_path / "out", snapshot={"every_frames": 3}, max_in_flight=2,
                          retire_gone_lines_s=1.0)
    cfg = cfg.model_copy(update={"source": cfg.source.model_copy(update={"watch": True, "poll_s": 0.2, "settle_s": 0.5})})
    plan, summary = run_planned(cfg, lambda cluster: GoneLineFolder(cluster, src, frames))
    assert plan.done == ["gone", "back", "stopped"], (plan.done, summary.events)
    assert summary.counts == {"a": FIRST, "b": JOINING}
    retired = [e for e in summary.events if e.startswith("line b retired")]
    assert len(retired) == 1 and re.fullmatch(
        rf"line b retired at seq {BEFORE_GONE}: folder {re.escape(str(src / 'b'))} has been gone for \d+ s; its actor "
        rf"stopped, and if it comes back it restores its snapshot at seq {BEFORE_GONE}", retired[0]), summary.events
    assert f"line b added at seq {BEFORE_GONE}, fed by ingest 0: folder {src / 'b'} appeared" in summary.events
    assert not summary.event_counts, summary.events  # no recovery: nothing was scored twice
    rows = read_rows(cfg.results_dir)
    assert [(r["line_id"], r["seq"]) for r in rows] == [("a", s) for s in range(FIRST)] + [("b", s) for s in range(JOINING)]
    verdict = compare_results(fault_free, cfg.results_dir)  # the same scores as if b had stayed all along
    assert verdict["ok"] and verdict["rows"] == FIRST + JOINING, verdict


def test_settings_may_name_a_line_yet_to_appear_only_where_lines_can_join(tiny_config, tmp_path):
    write_folder(tmp_path / "src", "a", line_frames(7, 1))
    cfg = pipeline_config(tiny_config, tmp_path / "src", tmp_path / "out", thresholds={"b": 0.5, "c d": 0.5})
    watched = cfg.model_copy(update={"source": cfg.source.model_copy(update={"watch": True})})
    assert job_problems(watched) == ["thresholds: line id 'c d' is not allowed: use letters, digits, '.', '_' and '-' "
                                     "(not starting with '.' or '_'), at most 128 characters (it names a folder of the result table)"]
    for fixed, lines in ((watched, ["a"]), (cfg, None)):  # lines named, or a replay: no line joins
        assert job_problems(fixed, lines) == [f"thresholds.{line}: no line '{line}' in the source (it has a)"
                                              for line in ("b", "c d")]
