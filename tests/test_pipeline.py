"""The Ray pipeline on a real local Ray: order, exactly-once, error rows, replay determinism."""
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
from PIL import Image

from actors.frames import Frame
from actors.ingest import frames_per_submit
from actors.line import LineActor
from actors.line_sequencer import start_afresh
from actors.line_settings import LineSettings
from actors.writer import ResultWriter, ResultWriterCore, WriterSettings
from pipelines.job_lock import JobLock
from pipelines.line_cluster import LineCluster
from pipelines.replay import run_replay
from pipelines.report import write_report
from rareclip_core.config import ConfigError
from rareclip_core.data.frames import decode_frame
from rareclip_core.detectors.rareclip.detector import RareCLIPDetector
from rareclip_core.registry import detector_config_from_dict
from tests.pipeline_helpers import line_frames, pipeline_config, read_rows, write_folder
from tests.trivial_detector import BrightnessConfig

REPO = Path(__file__).resolve().parents[1]


def in_process_scores(tiny_config, images) -> list[float]:
    detector = RareCLIPDetector(tiny_config)
    return [detector.step(im).score for im in images]


def test_lines_score_out_of_order_frames_in_sequence_once(local_ray, tiny_config, tmp_path):
    writer = ResultWriter.options(name=f"writer-{tmp_path.name}").remote(str(tmp_path / "results"), WriterSettings(16, 0.5))
    lines = {f"line{i}": line_frames(i, 30) for i in range(3)}
    actors = {
        name: LineActor.options(num_cpus=0.5).remote(
            name, tiny_config, f"writer-{tmp_path.name}", LineSettings(threshold=1.5, map_resolution=16, gap_timeout_s=30.0)
        )
        for name in lines
    }
    rng = random.Random(0)
    calls = []
    for name, images in lines.items():
        frames = [Frame(name, seq, f"mem://{name}/{seq}", time.time(), im) for seq, im in enumerate(images)]
        chunks = [frames[i : i + 3] for i in range(0, 30, 3)]
        rng.shuffle(chunks)
        chunks.append(frames[4:9])  # a repeated delivery must not give second rows
        calls += [(name, c) for c in chunks]
    rng.shuffle(calls)
    ray.get([actors[name].submit.remote(chunk) for name, chunk in calls])
    ray.get([a.wait_until.remote(30) for a in actors.values()])
    ray.get(writer.flush.remote())
    rows = read_rows(tmp_path / "results")
    for name, images in lines.items():
        got = [r for r in rows if r["line_id"] == name]
        assert [r["seq"] for r in got] == list(range(30))
        assert [r["score"] for r in got] == in_process_scores(tiny_config, images)
        assert all(r["status"] == "ok" and r["map_uri"] for r in got)
        stored = np.load(tmp_path / "results" / got[0]["map_uri"], allow_pickle=False)
        assert stored.shape == (16, 16) and stored.dtype == np.float16


def test_missing_frame_ends_in_an_error_row_after_the_gap_timeout(local_ray, tiny_config, tmp_path):
    writer = ResultWriter.options(name=f"writer-{tmp_path.name}").remote(str(tmp_path / "results"), WriterSettings(1, 0.1))
    actor = LineActor.options(num_cpus=0.5).remote(
        "gap", tiny_config, f"writer-{tmp_path.name}", LineSettings(map_resolution=None, gap_timeout_s=1.0)
    )
    images = line_frames(5, 4)
    frames = [Frame("gap", s, f"mem://{s}", time.time(), images[s]) for s in (0, 1, 3)]
    ray.get(actor.submit.remote(frames))
    assert ray.get(actor.wait_until.remote(4)) == 4
    ray.get(writer.flush.remote())
    rows = read_rows(tmp_path / "results")
    assert [r["status"] for r in rows] == ["ok", "ok", "error", "ok"]
    assert "never arrived" in rows[2]["error"]
    # the missing frame never touched the detector: frame 3 scores as the third image
    assert rows[3]["score"] == in_process_scores(tiny_config, [images[0], images[1], images[3]])[2]


def test_bad_files_become_error_rows_and_leave_scores_unchanged(local_ray, tiny_config, tmp_path):
    images = line_frames(7, 8)
    write_folder(tmp_path / "clean", "a", images)
    png = (tmp_path / "clean" / "a" / "frame_0000_b.png").read_bytes()
    gray16 = tmp_path / "g16.png"
    Image.fromarray(np.full((20, 20), 4000, dtype=np.uint16)).save(gray16)
    extras = {
        "frame_0002_a.png": png[: len(png) // 2],  # truncated
        "frame_0004_a.txt": b"not an image at all",
        "frame_0005_a.png": b"",
        "frame_0006_a.png": gray16.read_bytes(),  # 16-bit
    }
    write_folder(tmp_path / "dirty", "a", images, extras)
    clean_summary = run_replay(pipeline_config(tiny_config, tmp_path / "clean", tmp_path / "out-clean"), progress=False)
    dirty_config = pipeline_config(tiny_config, tmp_path / "dirty", tmp_path / "out-dirty")
    summary = run_replay(dirty_config, progress=False)
    said = summary.describe(dirty_config.results_dir)
    assert said[:2] == ["  a: 12 of 12 frames scored; table 12 rows, 4 error rows",
                        f"  why each error row: python run_cluster.py query --results {dirty_config.results_dir} "
                        "\"SELECT line_id, seq, uri, error FROM results WHERE status = 'error'\""]
    assert clean_summary.describe(tmp_path / "out-clean" / "results")[0] == "  a: 8 of 8 frames scored; table 8 rows, 0 error rows"
    clean = read_rows(tmp_path / "out-clean" / "results")
    dirty = read_rows(tmp_path / "out-dirty" / "results")
    assert len(dirty) == len(clean) + 4 and [r["seq"] for r in dirty] == list(range(12))
    errors = {Path(r["uri"]).name: r["error"] for r in dirty if r["status"] == "error"}
    assert set(errors) == set(extras)
    assert "truncated" in errors["frame_0002_a.png"] and "not an image" in errors["frame_0004_a.txt"]
    assert "empty" in errors["frame_0005_a.png"] and "8-bit" in errors["frame_0006_a.png"]
    assert [r["score"] for r in dirty if r["status"] == "ok"] == [r["score"] for r in clean]


def test_a_line_of_12_bit_frames_with_frame_bits_scores_as_its_8_bit_twin(local_ray, tiny_config, tmp_path):
    gray = [im.mean(axis=2).round().astype(np.uint8) for im in line_frames(3, 7)]
    mono12 = [((g.astype(np.uint32) * 4095 + 127) // 255).astype(np.uint16) for g in gray]  # 8-bit levels spread over 12 bits
    for name, images in (("8-bit", gray), ("12-bit", mono12)):
        paths = write_folder(tmp_path / name, "a", images)
        cfg = pipeline_config(tiny_config, tmp_path / name, tmp_path / f"out-{name}", frame_bits=12,
                              references={"a": [str(paths[0])]})
        run_replay(cfg, progress=False)
    rows = {name: read_rows(tmp_path / f"out-{name}" / "results") for name in ("8-bit", "12-bit")}
    assert [r["status"] for r in rows["12-bit"]] == ["ok"] * 7
    assert [r["score"] for r in rows["12-bit"]] == [r["score"] for r in rows["8-bit"]]
    # the report shows the frames as they were scored (not clipped to white)
    pictures = {}
    for name in rows:
        report = write_report(tmp_path / f"out-{name}" / "results", "a", tmp_path / f"report-{name}", top=2)
        pictures[name] = [np.asarray(Image.open(p)) for p in sorted(report.parent.glob("frame-*.png"))]
    assert len(pictures["12-bit"]) == len(pictures["8-bit"]) == 2
    assert all(np.array_equal(a, b) for a, b in zip(pictures["12-bit"], pictures["8-bit"]))


def test_replay_is_deterministic_and_batching_changes_nothing(local_ray, tiny_config, tmp_path):
    for i in range(2):
        write_folder(tmp_path / "src", f"line{i}", line_frames(10 + i, 12))
    scores = []  # bitwise equal across backbone batches: a replay depends on nothing but its frames
    for out, batch in (("r1", 1), ("r4", 4)):
        run_replay(pipeline_config(tiny_config, tmp_path / "src", tmp_path / out, backbone_batch=batch), progress=False)
        scores.append([(r["line_id"], r["seq"], r["score"]) for r in read_rows(tmp_path / out / "results")])
    assert len(scores[0]) == 24
    assert scores[0] == scores[1]


def test_a_line_with_references_learns_them_first_and_again_after_a_reset(local_ray, tiny_config, tmp_path):
    images = line_frames(21, 8)
    write_folder(tmp_path / "src", "k", images[3:])
    references = write_folder(tmp_path / "refs", "k", images[:3])
    cfg = pipeline_config(tiny_config, tmp_path / "src", tmp_path / "out", references={"k": [str(p) for p in references]})
    run_replay(cfg, progress=False)
    detector = RareCLIPDetector(tiny_config)
    detector.add_normal_references([decode_frame(p.read_bytes()) for p in references])
    expected = [detector.step(decode_frame(p.read_bytes())).score for p in sorted((tmp_path / "src" / "k").iterdir())]
    assert [r["score"] for r in read_rows(tmp_path / "out" / "results")] == expected
    # a reset (product changeover, or a fresh start without a snapshot) keeps the references only
    start_afresh(detector, tuple(str(p) for p in references))
    assert detector.images_seen == detector.n_references == 3


def test_a_call_to_a_line_carries_whole_backbone_batches_of_four_frames_or_more_within_max_in_flight():
    assert [frames_per_submit(batch, 8) for batch in (1, 2, 3, 4, 8)] == [4, 4, 6, 4, 8]
    assert [frames_per_submit(1, max_in_flight) for max_in_flight in (1, 2, 3, 16)] == [1, 2, 3, 4]
    assert frames_per_submit(8, 4) == 8  # a backbone batch is never split


def test_a_slow_line_holds_back_no_other_line_of_its_ingestion_actor(local_ray, tmp_path):
    write_folder(tmp_path / "src", "fast", line_frames(1, 40))
    write_folder(tmp_path / "src", "slow", line_frames(2, 16))
    config = detector_config_from_dict({"kind": "brightness"})
    assert isinstance(config, BrightnessConfig)
    cfg = pipeline_config(config, tmp_path / "src", tmp_path / "out", line_detector={"slow": {"step_sleep_s": 0.5}})
    assert cfg.ingest_actors == 1
    run_replay(cfg, progress=False)
    rows = read_rows(tmp_path / "out" / "results")
    fast = [r["scored_time"] for r in rows if r["line_id"] == "fast"]
    slow = [r["scored_time"] for r in rows if r["line_id"] == "slow"]
    assert len(fast) == 40 and len(slow) == 16
    # the slow line takes 0.5 s a frame and is given at most max_in_flight (8) frames at a time;
    # the fast line is fed as fast as it scores, not one call per call of the slow line
    assert max(fast) < slow[3]


def test_the_supervisor_follows_a_fast_line_while_slow_lines_are_mid_step(local_ray, tmp_path):
    write_folder(tmp_path / "src", "fast", line_frames(1, 60))
    for slow in ("slow1", "slow2"):
        write_folder(tmp_path / "src", slow, line_frames(2, 3))
    config = detector_config_from_dict({"kind": "brightness"})
    slow_steps = {"step_sleep_s": 4.0}  # longer than the supervisor's 2 s wait for an answer
    line_detector = {"fast": {"step_sleep_s": 0.1}, "slow1": slow_steps, "slow2": slow_steps}
    cfg = pipeline_config(config, tmp_path / "src", tmp_path / "out", line_detector=line_detector)
    reported: list[int] = []  # the fast line's progress as the supervisor reports it, twice a second
    cluster = LineCluster(cfg)
    try:
        cluster.run(progress=False, on_poll=lambda status: reported.append(status["progress"]["fast"]))
    finally:
        cluster.shutdown()
    fast = [r["scored_time"].timestamp() for r in read_rows(tmp_path / "out" / "results") if r["line_id"] == "fast"]
    assert max(fast) - min(fast) > 5  # the fast line's 6 s of steps run while the slow lines step
    # polled one line after another, the slow lines' unanswered calls made a round last ~4 s:
    # the fast line's progress then changed at most twice while it ran
    assert len(set(reported) - {0, 60}) >= 5


def test_writer_keeps_one_row_per_seq_and_no_holes(tmp_path):
    writer = ResultWriterCore(str(tmp_path), WriterSettings(batch_rows=2, flush_s=60))
    row = lambda s: {"line_id": "x", "seq": s, "status": "ok", "score": float(s), "date": "2026-11-23"}
    writer.write([row(0), row(1), row(1), row(3), row(2)])
    writer.flush()
    assert [r["seq"] for r in read_rows(tmp_path)] == [0, 1, 2]
    assert not list(tmp_path.rglob(".tmp-*"))
    again = ResultWriterCore(str(tmp_path))  # a restarted writer knows what is on disk
    again.write([row(2), row(3)])
    again.flush()
    assert [r["seq"] for r in read_rows(tmp_path)] == [0, 1, 2, 3]


def test_a_writer_without_verdicts_holds_no_row_once_it_is_written(tmp_path):
    """A live job writes rows for days: once written, a row and its map must leave the writer's
    memory (rows used to stay, kept for verdicts that no stream was there to publish: ~9 KiB a row)."""
    import gc
    import pathlib
    import tracemalloc

    writer = ResultWriterCore(str(tmp_path), WriterSettings(batch_rows=100, flush_s=60))
    row = lambda s: {"line_id": "x", "seq": s, "status": "ok", "score": 1.0, "date": "2026-11-23",
                     "anomaly_map": np.zeros((64, 64), np.float16)}  # 8 KiB each
    writer.write([row(s) for s in range(100)])  # the first flush's one-off allocations
    def traced() -> int:
        """Bytes traced, but for pathlib's interning of the map paths' parts: the interpreter's table
        of interned strings grows in one block now and then (7.5 MB after a Ray test), not per row."""
        gc.collect()  # what is held, not garbage a collection has not reached yet
        snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, pathlib.__file__)])
        return sum(stat.size for stat in snapshot.statistics("filename"))

    tracemalloc.start()
    try:
        before = traced()
        for start in range(100, 1100, 100):
            writer.write([row(s) for s in range(start, start + 100)])
        held = traced() - before
    finally:
        tracemalloc.stop()
    assert len(read_rows(tmp_path)) == 1100
    assert held < 1_000_000, f"{held} bytes still held after 1,000 rows (8 MB of maps) were written"


@pytest.fixture
def full_disk(monkeypatch):
    """The writer's table writes fail as on a full disk while `full_disk[0]` is True."""
    from actors import writer as writer_module

    real_write_rows, full = writer_module.write_rows, [True]

    def write_rows(*args):
        if full[0]:
            raise OSError(28, "No space left on device")
        real_write_rows(*args)

    monkeypatch.setattr(writer_module, "write_rows", write_rows)
    return full


def test_a_writer_that_cannot_write_holds_its_rows_says_so_once_and_writes_them_later(tmp_path, full_disk, caplog):
    writer = ResultWriterCore(str(tmp_path), WriterSettings(batch_rows=1, flush_s=60))
    row = lambda s: {"line_id": "x", "seq": s, "status": "ok", "score": float(s), "date": "2026-11-23"}
    with caplog.at_level("WARNING", logger="actors.supervisor"):
        assert writer.write([row(0)]) == {"x": 0} and writer.write([row(1)]) == {"x": 1}  # no error to the lines
        with pytest.raises(OSError):
            writer.flush()  # an explicit flush (a snapshot's) fails: its rows are not on disk
        told = [r.getMessage() for r in caplog.records]
        assert len(told) == 1 and "cannot write to" in told[0] and "No space left on device" in told[0]
        full_disk[0] = False
        writer.write([row(2)])
    assert [r["seq"] for r in read_rows(tmp_path)] == [0, 1, 2]
    assert "writes to" in caplog.records[-1].getMessage() and "3 rows held written" in caplog.records[-1].getMessage()


@ray.remote
class HeardSupervisor:
    """What a writer tells its job's supervisor, kept."""

    def __init__(self):
        self.heard = []

    def writer_started(self, persisted):
        self.heard.append(("started", persisted))

    def notice(self, text):
        self.heard.append(("notice", text))

    def writer_refusing(self, text):
        self.heard.append(("refusing", text))

    def writer_refused(self, persisted, refused):
        self.heard.append(("refused", persisted, refused))

    def everything(self):
        return self.heard


def test_a_writer_that_cannot_write_refuses_rows_past_its_limit_and_has_those_lines_replay(local_ray, tmp_path, full_disk):
    supervisor = HeardSupervisor.options(name="heard-supervisor").remote()
    writer = ResultWriterCore(str(tmp_path), WriterSettings(batch_rows=1, flush_s=60, max_held_rows=2), "heard-supervisor")
    row = lambda line, s: {"line_id": line, "seq": s, "status": "ok", "score": float(s), "date": "2026-11-23"}
    assert writer.write([row("x", 0), row("y", 0)]) == {"x": 0, "y": 0}  # held: the disk is full
    assert writer.write([row("x", 1), row("y", 1), row("x", 2)]) == {"x": 0, "y": 0}  # refused: 2 rows held
    full_disk[0] = False
    writer.write([row("x", 3)])  # refused, then the held rows are written
    assert [(r["line_id"], r["seq"]) for r in read_rows(tmp_path)] == [("x", 0), ("y", 0)]
    writer.write([row("x", 1), row("x", 2), row("x", 3), row("y", 1)])  # the lines' replays
    assert [(r["line_id"], r["seq"]) for r in read_rows(tmp_path)] == [("x", s) for s in range(4)] + [("y", 0), ("y", 1)]
    heard = ray.get(supervisor.everything.remote())
    ray.kill(supervisor)
    assert [said[0] for said in heard] == ["started", "notice", "refusing", "notice", "refused"], heard
    assert "cannot write to" in heard[1][1] and "writes to" in heard[3][1] and " again (2 rows held written)" in heard[3][1]
    assert "its limit (writer_max_held_rows): it refuses rows until it can write; ingestion pauses" in heard[2][1]
    assert heard[4] == ("refused", {"x": 0, "y": 0}, {"x": 3, "y": 1})


def test_bad_config_fails_before_any_actor_starts(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("detector: {max_images: 0}\nsource: {kind: folder, root: x}\n")
    proc = subprocess.run(
        [sys.executable, "run_cluster.py", "replay", "--config", str(bad)], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "detector.max_images" in proc.stderr and "Traceback" not in proc.stderr


def test_a_cuda_device_on_a_cluster_without_gpus_is_refused_before_any_actor_starts(local_ray, tiny_config, tmp_path):
    if ray.cluster_resources().get("GPU"):
        pytest.skip("the cluster has a GPU")
    write_folder(tmp_path / "frames", "a", line_frames(0, 2))
    cfg = pipeline_config(tiny_config, tmp_path / "frames", tmp_path / "out", line_detector={"a": {"device": "cuda"}})
    actors_before = ray.util.list_named_actors(all_namespaces=True)
    with pytest.raises(ConfigError, match=r"^line_detector.a.device is 'cuda', but the Ray cluster has no GPU"):
        LineCluster(cfg)
    assert ray.util.list_named_actors(all_namespaces=True) == actors_before
    JobLock(cfg.out).acquire(None).release()  # the job lock was given back


def test_demo_runs_from_the_command_line(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "run_cluster.py", "demo", "--out", str(out), "--no-progress"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_rows(out / "results")
    assert len(rows) == 120 and len({(r["line_id"], r["seq"]) for r in rows}) == 120
    assert "widget" in proc.stdout and str(out / "results") in proc.stdout
    assert re.search(r"widget +5 +contamination +1\.44\d* +1\.4 +flagged", proc.stdout)  # the known defect, flagged
    assert "WARNING" not in proc.stderr and "core_worker" not in proc.stderr  # no Ray internals on the console
