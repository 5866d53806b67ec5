"""A live job over a watched folder whose lines are not named takes a line folder that appears
while it runs as a new line: its own actor, fed by an ingestion actor, snapshotted and recovered
like the lines it started with, one row per frame; a folder that cannot be a line is named.
Settings may name a line yet to appear only where lines can join. (NATS: tests/test_nats.py.)"""
import ray
from PIL import Image

from pipelines.drill import compare_results
from pipelines.line_cluster import LineCluster
from pipelines.preflight import job_problems
from tests.pipeline_helpers import line_frames, pipeline_config, read_rows, run_planned, write_folder

FIRST, JOINING = 6, 10  # frames of the line there from the start, of the line that joins


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


def test_a_line_folder_that_appears_joins_the_live_job_and_recovers_like_the_others(local_ray, tiny_config, tmp_path):
    src = tmp_path / "src"
    write_folder(src, "a", line_frames(60, FIRST))
    cfg = pipeline_config(tiny_config, src, tmp_path / "out", snapshot={"every_frames": 2}, max_in_flight=2)
    cfg = cfg.model_copy(update={"source": cfg.source.model_copy(update={"watch": True, "poll_s": 0.2, "settle_s": 0.5})})
    plan, summary = run_planned(cfg, lambda cluster: NewLineFolder(cluster, src))
    assert plan.done == ["folders", "ingest killed", "line killed", "more frames", "stopped"], (plan.done, summary.events)
    assert summary.counts == {"a": FIRST, "b": JOINING}
    assert f"line b added at seq 0, fed by ingest 0: folder {src / 'b'} appeared" in summary.events, summary.events
    assert {"ingest restarts", "line restarts"} <= set(summary.event_counts), summary.events
    assert any(f"line _scratch appeared (folder {src / '_scratch'}), but cannot join: line id '_scratch'" in n
               for n in summary.notices), summary.notices
    rows = read_rows(cfg.results_dir)
    assert [(r["line_id"], r["seq"]) for r in rows] == [("a", s) for s in range(FIRST)] + [("b", s) for s in range(JOINING)]

    # the same frames scored by a replay without faults: the same scores
    reference = pipeline_config(tiny_config, src, tmp_path / "reference", max_in_flight=2)
    cluster = LineCluster(reference, ["a", "b"])
    try:
        assert cluster.run(progress=False).counts == {"a": FIRST, "b": JOINING}
    finally:
        cluster.shutdown()
    verdict = compare_results(reference.results_dir, cfg.results_dir)
    assert verdict["ok"] and verdict["rows"] == FIRST + JOINING, verdict


def test_settings_may_name_a_line_yet_to_appear_only_where_lines_can_join(tiny_config, tmp_path):
    write_folder(tmp_path / "src", "a", line_frames(7, 1))
    cfg = pipeline_config(tiny_config, tmp_path / "src", tmp_path / "out", thresholds={"b": 0.5, "c d": 0.5})
    watched = cfg.model_copy(update={"source": cfg.source.model_copy(update={"watch": True})})
    assert job_problems(watched) == ["thresholds: line id 'c d' is not allowed: use letters, digits, '.', '_' and '-' "
                                     "(not first), at most 128 characters (it names a folder of the result table)"]
    for fixed, lines in ((watched, ["a"]), (cfg, None)):  # lines named, or a replay: no line joins
        assert job_problems(fixed, lines) == [f"thresholds.{line}: no line '{line}' in the source (it has a)"
                                              for line in ("b", "c d")]
