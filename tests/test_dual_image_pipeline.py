"""Dual-Image CLIP through the Ray jobs: a replay gives one ok row per frame with the scores of
the detector run in-process (with the line's own product name), and a line actor killed
mid-stream resumes from its snapshot (bank, scores, RNG state) with bitwise the same rows."""
import pytest

from pipelines.drill import compare_results
from pipelines.replay import run_replay
from rareclip_core import build_detector, detector_config_from_yaml
from tests.conftest import REPO
from tests.pipeline_helpers import KillPlan, line_frames, pipeline_config, read_rows, run_planned, write_folder

LINE, FRAMES = "d0", 20


@pytest.fixture(scope="module")
def frames():
    return line_frames(5, FRAMES)


@pytest.fixture(scope="module")
def source(tmp_path_factory, frames):
    root = tmp_path_factory.mktemp("dual-src")
    write_folder(root, LINE, frames)
    return root


def line_config(tmp_path_factory, source, name, **kw):
    config = detector_config_from_yaml(REPO / "configs" / "detector-dual-image-tiny.yaml")
    config = config.model_copy(update={"text_cache_dir": str(tmp_path_factory.getbasetemp() / "dual-text")})
    # snapshots every 4 frames and few frames in flight: a restart restores mid-stream
    return pipeline_config(config, source, tmp_path_factory.mktemp(name), snapshot={"every_frames": 4},
                           gap_timeout_s=600.0, max_in_flight=2, line_detector={LINE: {"product": "metal disc"}}, **kw)


@pytest.fixture(scope="module")
def replayed(local_ray, tmp_path_factory, source):
    cfg = line_config(tmp_path_factory, source, "replay")
    assert run_replay(cfg, progress=False).counts == {LINE: FRAMES}
    return cfg


def test_replay_scores_every_frame_as_the_detector_does(replayed, frames):
    rows = read_rows(replayed.results_dir)
    assert [(r["line_id"], r["seq"], r["status"]) for r in rows] == [(LINE, s, "ok") for s in range(FRAMES)]
    settings = replayed.detector_for(LINE)
    assert settings.product == "metal disc" and {r["model_id"] for r in rows} == {settings.model_id}
    detector = build_detector(settings)
    assert [r["score"] for r in rows] == [detector.step(frame).score for frame in frames]  # bitwise


def test_a_killed_dual_image_line_resumes_bitwise(replayed, tmp_path_factory, source):
    """The drill on one line, killed once after its first snapshot; frames go through the
    backbone two at a time here and one at a time in the replay: every row bitwise equal."""
    cfg = line_config(tmp_path_factory, source, "crashed", backbone_batch=2)
    plan, summary = run_planned(cfg, lambda cluster: KillPlan(cluster, [(f"line:{LINE}", LINE, 6)], min_snapshots=1, margin=8))
    assert summary.counts == {LINE: FRAMES}
    events = summary.events
    assert [name for name, _ in plan.killed] == [f"line:{LINE}"]
    restarts = [int(e.rsplit(" ", 1)[1]) for e in events if e.startswith(f"line {LINE} restarted")]
    assert len(restarts) == 1 and 0 < restarts[0] <= plan.killed[0][1], events  # restored a snapshot, not afresh
    verdict = compare_results(replayed.results_dir, cfg.results_dir)
    assert verdict["ok"] and verdict["rows"] == FRAMES, verdict
    assert [r["seq"] for r in read_rows(cfg.results_dir)] == list(range(FRAMES))
