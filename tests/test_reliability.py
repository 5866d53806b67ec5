"""Nothing lost, nothing doubled in real use: one job per output folder, files taken once
complete, Ctrl-C, line ids, checks before Ray, the pixel limit, high-bit frames and EXIF, and the
job's report of what happened (the ledger of each line's frames: test_frame_ledger.py)."""
import io
import json
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from PIL import Image

import run_cluster
from actors.result_table import (
    FILE_SCHEMA,
    line_id_problem,
    persisted_last_seqs,
    read_results,
    write_rows,
)
from configs.pipeline import PipelineConfig
from pipelines.common import load_config_or_exit
from pipelines.drill import compare_results
from pipelines.job_lock import JobLock, JobLockError
from pipelines.line_cluster import LineCluster, SupervisorLost
from rareclip_core.config import ConfigError
from rareclip_core.data.frames import FrameDecoding, FrameError, decode_frame
from rareclip_core.data.sources import FolderSource, Source
from tests.pipeline_helpers import (
    KillPlan,
    line_frames,
    pipeline_config,
    read_rows,
    run_planned,
    write_folder,
)

REPO = Path(__file__).resolve().parents[1]


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_config(path: Path, source_root: Path, out: Path, **extra) -> Path:
    config = {
        "detector": "detector-tiny.yaml",
        "source": {"kind": "folder", "root": str(source_root), **extra.pop("source", {})},
        "out": str(out),
        "map_resolution": None,
        "line_num_cpus": 0.5,
        "snapshot": {"every_frames": 5},
        **extra,
    }
    path.write_text(json.dumps(config))  # JSON is YAML
    # `detector: detector-tiny.yaml` is resolved beside the config file
    (path.parent / "detector-tiny.yaml").write_text((REPO / "configs" / "detector-tiny.yaml").read_text())
    return path


def start(args: list[str], progress: bool = False) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "run_cluster.py", *args, *([] if progress else ["--no-progress"])], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_rows(results: Path, n: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if read_results(results, columns=["seq"]).num_rows >= n:
            return
        time.sleep(0.1)
    raise AssertionError(f"fewer than {n} rows in {results} after {timeout}s")


# ---- one job per output folder ------------------------------------------------------------------
def test_the_drill_counts_a_row_whose_threshold_or_verdict_changed_as_differing(tmp_path):
    rows = [{"seq": i, "status": "ok", "score": 0.5 + i / 10, "threshold": 0.65, "is_anomaly": i >= 2} for i in range(3)]
    changed = [dict(r) for r in rows]
    changed[1].update(threshold=0.55, is_anomaly=True)  # same score, another threshold and verdict
    write_rows(tmp_path / "a", "l", "2026-12-04", rows)
    write_rows(tmp_path / "b", "l", "2026-12-04", changed)
    verdict = compare_results(tmp_path / "a", tmp_path / "b")
    assert verdict["differing"] == [("l", 1)] and not verdict["ok"] and verdict["max_score_diff"] == 0.0
    assert compare_results(tmp_path / "a", tmp_path / "a")["ok"]


def test_the_drill_fails_on_a_duplicated_row_and_on_any_score_difference(tmp_path):
    rows = [{"seq": i, "status": "ok", "score": 0.5, "threshold": None, "is_anomaly": None} for i in range(2)]
    write_rows(tmp_path / "a", "l", "2026-12-04", rows)
    write_rows(tmp_path / "b", "l", "2026-12-04", rows)
    write_rows(tmp_path / "b", "l", "2026-12-04", rows[1:])  # seq 1 written twice
    verdict = compare_results(tmp_path / "a", tmp_path / "b")
    assert verdict["duplicated"] == [("l", 1)] and not verdict["ok"]
    write_rows(tmp_path / "c", "l", "2026-12-04", [rows[0], {**rows[1], "score": 0.5 + 2**-40}])  # the last bit
    verdict = compare_results(tmp_path / "a", tmp_path / "c")
    assert verdict["differing"] == [("l", 1)] and verdict["max_score_diff"] == 2**-40 and not verdict["ok"]


def test_the_job_lock_refuses_a_second_holder_and_dies_with_its_process(tmp_path):
    first = JobLock(tmp_path).acquire()
    with pytest.raises(JobLockError, match=f"another job is writing to {tmp_path}: pid {os.getpid()} on "):
        JobLock(tmp_path).acquire()
    first.release()
    JobLock(tmp_path).acquire().release()
    # a holder killed with SIGKILL leaves no stale lock
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, '.'); "
                               "from pipelines.job_lock import JobLock; "
                               f"JobLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(JobLockError, match=f"pid {holder.pid}"):
        JobLock(tmp_path).acquire()
    holder.kill()
    holder.wait()
    JobLock(tmp_path).acquire().release()


def test_a_second_job_on_the_same_out_is_refused_and_live_stops_cleanly(tmp_path):
    for i, line in enumerate(("a", "b")):
        write_folder(tmp_path / "src", line, line_frames(40 + i, 6))
    config = write_config(tmp_path / "job.yaml", tmp_path / "src", tmp_path / "out", source={"poll_s": 0.2})
    live = start(["live", "--config", str(config)])
    try:
        wait_for_rows(tmp_path / "out" / "results", 12)
        started = time.monotonic()
        second = subprocess.run([sys.executable, "run_cluster.py", "replay", "--config", str(config), "--no-progress"],
                                cwd=REPO, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and time.monotonic() - started < 30, second.stderr
        assert "another job is writing to" in second.stderr and f"pid {live.pid}" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        live.send_signal(signal.SIGINT)
        out, err = live.communicate(timeout=120)
    assert live.returncode == 130, err
    assert "interrupted: run the same command again" in out and "Traceback" not in err
    rows = read_rows(tmp_path / "out" / "results")
    assert [(r["line_id"], r["seq"]) for r in rows] == [(line, s) for line in "ab" for s in range(6)]


# ---- complete files ----------------------------------------------------------------------------
def test_a_watched_folder_takes_files_once_complete_and_lists_broken_links(tmp_path):
    folder = tmp_path / "src" / "line"
    write_folder(tmp_path / "src", "line", line_frames(1, 2))
    source = Source(FolderSource(str(tmp_path / "src"), live=True, settle_s=30), str(tmp_path / "ledger"))

    def settle(*names):  # as if the writer had last touched them a minute ago
        past = time.time() - 60
        for name in names:
            os.utime(folder / name, (past, past), follow_symlinks=False)

    assert list(source.frames("line")) == []  # just written: not yet settled
    settle("frame_0000_b.png", "frame_0001_b.png")
    (folder / "broken.png").symlink_to(folder / "nowhere.png")
    (folder / ".partial.png").write_bytes(b"hidden: still being written")
    first = [(r.seq, Path(r.uri).name) for r in source.frames("line")]
    assert first == [(0, "frame_0000_b.png"), (1, "frame_0001_b.png")]
    (folder / "aaa_early.png").write_bytes(png(line_frames(2, 1)[0]))
    settle("broken.png", "aaa_early.png", ".partial.png")
    names = [Path(r.uri).name for r in source.frames("line")]
    assert names == ["frame_0000_b.png", "frame_0001_b.png", "aaa_early.png", "broken.png"]


def test_subfolders_are_read_in_path_order_when_recursive_and_named_once_when_not(tmp_path):
    line = tmp_path / "src" / "line"
    for name in ("day2/a.png", "day1/b.png", "day1/a.png", "top.png", "day1/.partial.png", ".hidden/x.png", "day1/deep/c.png"):
        (line / name).parent.mkdir(parents=True, exist_ok=True)
        (line / name).write_bytes(b"frame")
    (line / "linked").symlink_to(line / "day2")  # a link to a folder is not walked (no cycles, no frame twice)
    recursive = FolderSource(str(tmp_path / "src"), live=True, recursive=True)
    names = [str(Path(uri).relative_to(line)) for uri in recursive.listing("line")]
    assert names == ["day1/a.png", "day1/b.png", "day1/deep/c.png", "day2/a.png", "top.png"]
    (line / "day3").mkdir()
    (line / "day3" / "a.png").write_bytes(b"frame")  # a new day's folder, while the earlier files are taken
    assert [str(Path(uri).relative_to(line)) for uri in recursive.listing("line")] == [*names[:4], "day3/a.png", "top.png"]
    assert recursive.notices == []
    flat = FolderSource(str(tmp_path / "src"), live=True)
    for _ in range(2):
        assert [Path(uri).name for uri in flat.listing("line")] == ["top.png"]
    assert flat.notices == [f"line line: 4 subfolder(s) of {line} are not read (first: day1); "
                            "set source.recursive: true to read the frames in them"]


def test_a_live_folder_gets_one_row_per_file_slow_writes_early_names_and_broken_links(tmp_path):
    src = tmp_path / "src"
    write_folder(src, "cam", line_frames(3, 3))
    config = write_config(tmp_path / "job.yaml", src, tmp_path / "out",
                          source={"poll_s": 0.2, "settle_s": 1.0, "max_file_age_s": 600})
    live = start(["live", "--config", str(config)], progress=True)  # off a terminal: plain progress lines
    images = line_frames(4, 2)
    try:
        wait_for_rows(tmp_path / "out" / "results", 3)
        (src / "cam" / "old_copy.png").write_bytes(png(images[0]))  # a copy that kept its time of an hour ago
        os.utime(src / "cam" / "old_copy.png", (time.time() - 3600, time.time() - 3600))
        data = png(images[0])
        with open(src / "cam" / "slow.png", "wb") as fh:  # written in pieces over 2 s
            for i in range(0, len(data), len(data) // 8 + 1):
                fh.write(data[i : i + len(data) // 8 + 1])
                fh.flush()
                time.sleep(0.25)
        (src / "cam" / "aaa_early.png").write_bytes(png(images[1]))
        (src / "cam" / "zz_broken.png").symlink_to(src / "cam" / "gone.png")
        wait_for_rows(tmp_path / "out" / "results", 6)
    finally:
        live.send_signal(signal.SIGINT)
        out, err = live.communicate(timeout=120)
    assert live.returncode == 130
    rows = read_rows(tmp_path / "out" / "results")
    by_name = {Path(r["uri"]).name: r for r in rows}
    # every file gets its row but the late copy, which the job names when it is seen and in its summary
    assert sorted(by_name) == sorted(p.name for p in (src / "cam").iterdir() if p.name != "old_copy.png")
    assert len(rows) == 6 and "line cam: 1 file(s) left out" in out and "(first: old_copy.png)" in out
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d line cam: 1 file\(s\) left out", err, re.MULTILINE), err
    assert [r["seq"] for r in rows] == list(range(6))
    assert by_name["slow.png"]["status"] == "ok" and by_name["aaa_early.png"]["status"] == "ok"
    assert by_name["aaa_early.png"]["seq"] > 2  # the next seq when it appeared, nothing shifted
    assert by_name["zz_broken.png"]["status"] == "error" and "cannot read" in by_name["zz_broken.png"]["error"]


# ---- Ctrl-C ---------------------------------------------------------------------------------------
# A tiny line scores ~25 frames/s: the streams are long enough that Ctrl-C lands mid-stream,
# and rows are flushed every 0.1 s so that the test sees them as they come.
def test_ctrl_c_on_replay_stops_cleanly_and_a_rerun_resumes(tmp_path):
    for i, line in enumerate(("a", "b")):
        write_folder(tmp_path / "src", line, line_frames(50 + i, 60))
    config = write_config(tmp_path / "job.yaml", tmp_path / "src", tmp_path / "out", max_in_flight=2,
                          writer_flush_s=0.1)
    replay = start(["replay", "--config", str(config)])
    wait_for_rows(tmp_path / "out" / "results", 10)
    replay.send_signal(signal.SIGINT)
    out, err = replay.communicate(timeout=90)
    assert replay.returncode == 130 and "Traceback" not in err, err
    assert "interrupted: run the same command again" in out
    stopped = read_rows(tmp_path / "out" / "results")
    assert 10 <= len(stopped) < 120
    resumed = subprocess.run([sys.executable, "run_cluster.py", "replay", "--config", str(config), "--no-progress"],
                             cwd=REPO, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr
    reference = write_config(tmp_path / "ref.yaml", tmp_path / "src", tmp_path / "ref")
    subprocess.run([sys.executable, "run_cluster.py", "replay", "--config", str(reference), "--no-progress"],
                   cwd=REPO, capture_output=True, text=True, timeout=400, check=True)
    verdict = compare_results(tmp_path / "ref" / "results", tmp_path / "out" / "results")
    assert verdict["ok"] and verdict["rows"] == 120, verdict


def test_sigterm_stops_a_live_job_as_ctrl_c_does(tmp_path):
    """systemd and `docker stop` send SIGTERM: the job stops reading, flushes, snapshots and says
    so, instead of Ray's crash report."""
    write_folder(tmp_path / "src", "a", line_frames(61, 6))
    config = write_config(tmp_path / "job.yaml", tmp_path / "src", tmp_path / "out", writer_flush_s=0.1,
                          source={"watch": True, "poll_s": 0.2, "settle_s": 0.0})
    live = start(["live", "--config", str(config)])
    wait_for_rows(tmp_path / "out" / "results", 6)
    live.send_signal(signal.SIGTERM)
    out, err = live.communicate(timeout=90)
    assert live.returncode == 130 and "Traceback" not in err and "SIGTERM received" not in err, err
    assert "interrupted: run the same command again" in out, out
    assert [r["seq"] for r in read_rows(tmp_path / "out" / "results")] == list(range(6))


def test_a_second_ctrl_c_leaves_at_once_without_a_traceback(tmp_path):
    write_folder(tmp_path / "src", "a", line_frames(60, 200))
    config = write_config(tmp_path / "job.yaml", tmp_path / "src", tmp_path / "out", max_in_flight=2,
                          writer_flush_s=0.1)
    replay = start(["replay", "--config", str(config)])
    wait_for_rows(tmp_path / "out" / "results", 3)
    replay.send_signal(signal.SIGINT)
    time.sleep(0.3)
    replay.send_signal(signal.SIGINT)
    out, err = replay.communicate(timeout=90)
    assert replay.returncode == 130 and "Traceback" not in err, err
    rows = read_rows(tmp_path / "out" / "results")
    assert [r["seq"] for r in rows] == list(range(len(rows)))  # whatever was kept is contiguous


# ---- line ids ----------------------------------------------------------------------------------
def test_line_ids_are_checked_and_read_back_as_strings(tmp_path):
    assert line_id_problem("001") is None and line_id_problem("line-7.b_2") is None
    for bad in ("a=b", "a/b", ".hidden", "_maps", "has space", ""):
        assert line_id_problem(bad), bad
    write_folder(tmp_path / "src", "001", line_frames(5, 2))
    write_folder(tmp_path / "src", "a=b", line_frames(6, 2))
    config = write_config(tmp_path / "job.yaml", tmp_path / "src", tmp_path / "out")
    assert run_cluster.main(["replay", "--config", str(config)]) == 2
    results = tmp_path / "table"
    (results / "line_id=001" / "date=2026-11-25").mkdir(parents=True)
    row = {name: None for name in FILE_SCHEMA.names} | {"seq": 4, "status": "ok"}
    pq.write_table(pa.Table.from_pylist([row], schema=FILE_SCHEMA), results / "line_id=001" / "date=2026-11-25" / "p.parquet")
    assert persisted_last_seqs(results) == {"001": 4}


def test_a_line_folder_whose_first_file_is_still_being_written_reads_as_no_rows(tmp_path):
    results = tmp_path / "table"
    part = results / "line_id=a" / "date=2026-12-05"
    part.mkdir(parents=True)
    (part / ".tmp-0123.parquet").write_bytes(b"PAR1 half written")  # the writer's temporary name
    table = read_results(results)
    assert table.num_rows == 0 and "seq" in table.column_names
    assert read_results(results, columns=["seq"]).num_rows == 0 and persisted_last_seqs(results) == {}
    row = {name: None for name in FILE_SCHEMA.names} | {"seq": 0, "status": "ok"}
    pq.write_table(pa.Table.from_pylist([row], schema=FILE_SCHEMA), part / "part-0.parquet")
    assert persisted_last_seqs(results) == {"a": 0}
    assert read_results(results).column_names == [*FILE_SCHEMA.names, "line_id", "date"]


def test_drill_on_numeric_line_ids_with_a_writer_kill_passes(local_ray, tiny_config, tmp_path):
    for i, line in enumerate(("001", "002")):
        write_folder(tmp_path / "src", line, line_frames(70 + i, 40))
    outs = {}
    # the clean run never merges files; the faulty one merges each 2 files of a line, while its writer is killed
    for name, steps, merge_files in (("clean", [], 0), ("faulty", [("writer", "001", 6)], 2)):
        cfg = pipeline_config(tiny_config, tmp_path / "src", tmp_path / name, snapshot={"every_frames": 4},
                              gap_timeout_s=600.0, max_in_flight=2, writer_compact_files=merge_files)
        plan, summary = run_planned(cfg, lambda cluster: KillPlan(cluster, steps))
        assert summary.counts == {"001": 40, "002": 40} and len(plan.killed) == len(steps)
        outs[name] = cfg.results_dir
    assert summary.event_counts.get("writer restarts") == 1, summary.events
    verdict = compare_results(outs["clean"], outs["faulty"])
    assert verdict["ok"] and verdict["rows"] == 80, verdict
    files = {name: len(list(Path(out).glob("line_id=*/date=*/*.parquet"))) for name, out in outs.items()}
    partitions = len(list(Path(outs["faulty"]).glob("line_id=*/date=*")))
    assert files["faulty"] == partitions < files["clean"], files  # one file per line and date after the job's end


class FreeTheDisk:
    """`on_poll`: once the writer says it refuses rows, the file in the way of its maps goes
    `hold_s` later; `freed_at`: the lines' progress then. With `cluster`, the writer's actor is
    killed at its first refusal, and the file goes `hold_s` after its successor's."""

    def __init__(self, blocker: Path, cluster=None, hold_s: float = 3.0):
        self.blocker, self.cluster, self.hold_s = blocker, cluster, hold_s
        self.refusals = 2 if cluster else 1
        self.killed, self.refusing_since, self.freed_at = False, None, None

    def __call__(self, status: dict) -> None:
        refusals = sum("refuses rows" in text for text in status["notices"])
        if self.cluster and refusals == 1 and not self.killed:  # its held rows go with it
            ray.kill(self.cluster.actors()["writer"], no_restart=False)
            self.killed = True
        if refusals == self.refusals and self.refusing_since is None:
            self.refusing_since = time.monotonic()
        if self.freed_at is None and self.refusing_since is not None and time.monotonic() - self.refusing_since >= self.hold_s:
            self.blocker.unlink()
            self.freed_at = dict(status["progress"])


def test_a_writer_that_cannot_write_refuses_rows_past_its_limit_and_the_lines_score_them_again(local_ray, tiny_config, tmp_path):
    for i, line in enumerate("ab"):
        write_folder(tmp_path / "src", line, line_frames(90 + i, 12))
    outs, summaries, plans = {}, {}, {}
    for name in ("clean", "blocked", "blocked, writer killed"):
        cfg = pipeline_config(tiny_config, tmp_path / "src", tmp_path / name, snapshot={"every_frames": 2},
                              max_in_flight=2, writer_batch_rows=1, writer_max_held_rows=4)
        cfg = cfg.model_copy(update={"map_resolution": 16})
        blocker = cfg.results_dir / "_maps"  # a file where the maps' folder goes: every write fails, as on a full disk
        if name != "clean":
            cfg.results_dir.mkdir(parents=True)
            blocker.write_text("in the way")
        kill = name.endswith("killed")
        plans[name], summaries[name] = run_planned(cfg, lambda cluster: FreeTheDisk(blocker, cluster if kill else None))
        assert summaries[name].counts == {"a": 12, "b": 12}, summaries[name]
        outs[name] = cfg.results_dir
    blocked, killed = summaries["blocked"], summaries["blocked, writer killed"]
    assert blocked.event_counts == {"writer refusals": 1}, blocked.events
    assert killed.event_counts == {"writer restarts": 1, "writer refusals": 1}, killed.events
    # ingestion paused: the lines scored what was in flight, not their 12 frames (~0.5 s of work)
    for plan in (plans["blocked"], plans["blocked, writer killed"]):
        assert plan.freed_at is not None and all(seq < 12 for seq in plan.freed_at.values()), plan.freed_at
    said = ("cannot write to", "4 rows it cannot write, its limit (writer_max_held_rows)", "again (4 rows held written)")
    cannot, refusing, again = [True, False, False], [False, True, False], [False, False, True]
    assert [[part in text for part in said] for text in blocked.notices] == [cannot, refusing, again], blocked.notices
    assert [[part in text for part in said] for text in killed.notices] == [cannot, refusing, cannot, refusing, again]
    for name in ("blocked", "blocked, writer killed"):
        rows = read_rows(outs[name])
        assert [(r["line_id"], r["seq"]) for r in rows] == [(line, s) for line in "ab" for s in range(12)]
        verdict = compare_results(outs["clean"], outs[name])
        assert verdict["ok"] and verdict["rows"] == 24, verdict


def test_live_stopped_on_a_full_disk_waits_for_space_says_why_and_prints_no_traceback(tmp_path):
    for i, line in enumerate("ab"):
        write_folder(tmp_path / "src", line, line_frames(90 + i, 8))
    config = write_config(tmp_path / "job.yaml", tmp_path / "src", tmp_path / "out", map_resolution=16, max_in_flight=2,
                          writer_batch_rows=1, writer_flush_s=0.2, writer_max_held_rows=4)
    results = tmp_path / "out" / "results"
    results.mkdir(parents=True)
    (results / "_maps").write_text("in the way")  # every write fails, as on a full disk
    events = results / "_events.jsonl"
    live = start(["live", "--config", str(config)], progress=True)
    try:
        deadline = time.monotonic() + 240
        while "refuses rows" not in (events.read_text() if events.exists() else ""):
            assert time.monotonic() < deadline and live.poll() is None, "the writer never refused rows"
            time.sleep(0.1)
        time.sleep(1.0)  # the job asks the writer to flush every 0.2 s: each try fails
        live.send_signal(signal.SIGINT)
        time.sleep(3.0)
        assert live.poll() is None  # the stop waits for the rows it holds to be written
        (results / "_maps").unlink()
        out, err = live.communicate(timeout=120)
    finally:
        if live.poll() is None:
            live.kill()
    assert live.returncode == 130, err
    assert "Traceback" not in err and "Unhandled error" not in err, err
    for said in ("cannot write to", "it refuses rows until it can write; ingestion pauses",
                 "the result writer cannot write (", "stopping waits until it can", "again ("):
        assert said in err, err
    rows = read_rows(results)  # what was fed before the stop, once; the next run goes on from there
    for line in "ab":
        seqs = [r["seq"] for r in rows if r["line_id"] == line]
        assert seqs == list(range(len(seqs)))
    assert rows


# ---- checks before Ray ---------------------------------------------------------------------------
def test_config_problems_are_found_before_ray_starts(tmp_path, capsys):
    write_folder(tmp_path / "src", "a", line_frames(7, 1))
    mono16 = tmp_path / "mono16.png"
    mono16.write_bytes(encoded(np.full((16, 16), 4000, np.uint16), "PNG"))
    (tmp_path / "empty" / "notes").mkdir(parents=True)
    cases = [
        ({"source": {"root": str(tmp_path / "none")}}, "source.root: source folder"),
        ({"source": {"root": str(tmp_path / "src" / "a")}}, f"source.root: source folder {tmp_path / 'src' / 'a'} has no line "
         f"subfolders (expected <root>/<line_id>/<images>); it holds 1 file(s) itself, as a line's folder does: set root "
         f"to its parent, {tmp_path / 'src'}"),
        ({"source": {"root": str(tmp_path / "empty")}}, f"source.root: the line folders under {tmp_path / 'empty'} (notes) "
         "hold no frames, so there is nothing to replay; put each line's frames in <root>/<line_id>/ (or in subfolders "
         "of it, with source.recursive: true)"),
        ({"source": {"lines": ["a", "nosuchline"]}}, "source.lines: no folder"),
        ({"thresholds": {"unknown_line": 1.0}}, "thresholds.unknown_line: no line 'unknown_line'"),
        ({"line_detector": {"ghost": {"max_images": 5}}}, "line_detector.ghost: no line 'ghost'"),
        ({"references": {"a": [str(mono16)]}}, f"references.a[0]: {mono16}: I;16 image (more than 8 bits per pixel): set `frame_bits`"),
    ]
    for i, (extra, message) in enumerate(cases):
        source = extra.pop("source", {})
        config = write_config(tmp_path / f"c{i}.yaml", tmp_path / "src", tmp_path / "out", **extra)
        data = json.loads(config.read_text())
        data["source"].update(source)
        config.write_text(json.dumps(data))
        assert run_cluster.main(["replay", "--config", str(config)]) == 2
        err = capsys.readouterr().err
        assert f"error: {config}: {message}" in err and "Traceback" not in err, err  # the pre-flight's
    assert load_config_or_exit(str(tmp_path / "c2.yaml"), live=True) is not None  # a watched empty folder waits for frames
    detector = tmp_path / "weights.yaml"
    detector.write_text((REPO / "configs" / "detector-tiny.yaml").read_text()
                        + f"tpb_weights: {tmp_path / 'tpb.pth'}\npretrained: {tmp_path / 'clip.pt'}\n")
    config = write_config(tmp_path / "w.yaml", tmp_path / "src", tmp_path / "out")
    config.write_text(config.read_text().replace('"detector-tiny.yaml"', f'"{detector.name}"'))
    assert run_cluster.main(["replay", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "detector.tpb_weights: no file at" in err and "detector.pretrained: no file at" in err
    # weights files that are there but cannot be weights, by their first bytes: an image, an empty file
    (tmp_path / "tpb.pth").write_bytes(mono16.read_bytes())
    (tmp_path / "clip.pt").write_bytes(b"")
    assert run_cluster.main(["replay", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert (f"detector.tpb_weights: {tmp_path / 'tpb.pth'} is not a weights file: neither a torch file nor "
            "safetensors (it begins b'\\x89PNG" in err), err
    assert f"detector.pretrained: {tmp_path / 'clip.pt'} is not a weights file: the file is empty" in err, err
    # an output folder that is a file, or lies under one
    (tmp_path / "a-file").write_text("x")
    for out, where in [(tmp_path / "a-file", "is a file, not a folder"),
                       (tmp_path / "a-file" / "sub", f"lies under {tmp_path / 'a-file'}, which is a file")]:
        plain = write_config(tmp_path / "o.yaml", tmp_path / "src", out)
        assert run_cluster.main(["replay", "--config", str(plain)]) == 2
        err = capsys.readouterr().err
        assert f"error: {plain}: out: {out} {where}; give the job another --out" in err and "Traceback" not in err, err


def test_a_weights_file_torch_cannot_read_is_named_without_advice_to_load_it_unsafely(tmp_path):
    from rareclip_core.config import ConfigError
    from rareclip_core.detectors.rareclip.text_branch import TextProjection, load_tpb_checkpoint

    pickled = tmp_path / "code.pth"
    pickled.write_bytes(pickle.dumps(Path("x"), protocol=2))  # a pickle of a Python object: torch refuses it with weights_only
    with pytest.raises(ConfigError) as caught:
        load_tpb_checkpoint(TextProjection(8, 4, 2), str(pickled))
    message = str(caught.value)
    assert message.startswith(f"detector.tpb_weights: {pickled} is not a readable TPB checkpoint (not a torch file, or "
                              "one that holds Python objects besides tensors, which are never unpickled here)"), message
    assert "weights_only" not in message and "False" not in message


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # it makes the archive
def test_a_torchscript_archive_as_clip_weights_is_refused_naming_the_file_to_use_instead(tmp_path, tiny_config):
    from rareclip_core.backbone.clip import create_clip_model
    from rareclip_core.config import ConfigError
    from rareclip_core.torch_files import weights_file_problem

    scripted = tmp_path / "ViT-L-14-336px.pt"  # OpenAI's own files are TorchScript archives
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(scripted))
    assert weights_file_problem(scripted).startswith("a TorchScript archive (such as OpenAI's own .pt files)")
    with pytest.raises(ConfigError) as caught:
        create_clip_model(tiny_config.model_copy(update={"pretrained": str(scripted)}))
    assert "a TorchScript archive" in str(caught.value) and "open_clip_model.safetensors" in str(caught.value)
    plain = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(2)}, plain)  # an ordinary torch.save zip is no TorchScript
    assert weights_file_problem(plain) is None


# ---- frames ------------------------------------------------------------------------------------
def test_the_projects_pixel_limit_is_the_only_one(monkeypatch):
    image = png(np.zeros((40, 40, 3), dtype=np.uint8))
    with pytest.raises(FrameError, match="over the limit of 1000; raise `max_pixels`"):
        decode_frame(image, FrameDecoding(max_pixels=1000))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # Pillow's own limit does not apply
    assert decode_frame(image, FrameDecoding(max_pixels=10_000)).shape == (40, 40, 3)
    assert Image.MAX_IMAGE_PIXELS == 500


def encoded(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_high_bit_frames_are_scaled_by_frame_bits_and_refused_without(fmt):
    mono12 = encoded(np.array([[0, 1, 8, 9, 2048, 4095] * 2] * 8, dtype=np.uint16), fmt)
    # round(v * 255 / 4095): 8 -> 0.498 -> 0, 9 -> 0.560 -> 1, 2048 -> 127.53 -> 128
    frame = decode_frame(mono12, FrameDecoding(frame_bits=12))
    assert frame.shape == (8, 12, 3) and frame.dtype == np.uint8
    assert frame[0, :6].tolist() == [[v] * 3 for v in (0, 0, 0, 1, 128, 255)]
    full16 = encoded(np.array([[0, 128, 129, 32768, 65535] * 2] * 8, dtype=np.uint16), fmt)
    # round(v * 255 / 65535): 128 -> 0.498 -> 0, 129 -> 0.502 -> 1, 32768 -> 127.50 -> 128
    assert decode_frame(full16, FrameDecoding(frame_bits=16))[0, :5, 0].tolist() == [0, 0, 1, 128, 255]
    with pytest.raises(FrameError, match="pixel value 65535 is outside the 12-bit range 0..4095"):
        decode_frame(full16, FrameDecoding(frame_bits=12))
    with pytest.raises(FrameError, match="set `frame_bits` in the pipeline config.*or export 8-bit frames"):
        decode_frame(mono12)


def rgb48_png(pixels: np.ndarray) -> bytes:
    """A 16-bit colour PNG (Pillow cannot write one): H x W x 3 uint16."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)  # 16 bits, colour type 2 (RGB)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def test_a_16_bit_colour_png_is_read_as_its_high_bytes_and_refused_for_fewer_frame_bits():
    pixels = np.zeros((8, 8, 3), np.uint16)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = 0x1234, 0xABCD, 0x0FFF
    data = rgb48_png(pixels)
    assert decode_frame(data)[0, 0].tolist() == [0x12, 0xAB, 0x0F]
    assert decode_frame(data, FrameDecoding(frame_bits=16))[0, 0].tolist() == [0x12, 0xAB, 0x0F]
    with pytest.raises(FrameError, match="16-bit RGB PNG: it is read as its high 8 bits"):
        decode_frame(data, FrameDecoding(frame_bits=12))


def test_frame_bits_is_checked_with_the_config():
    base = {"source": {"kind": "folder", "root": "x"}}
    assert PipelineConfig.from_dict({**base, "frame_bits": 12}).frame_decoding == FrameDecoding(100_000_000, 12)
    with pytest.raises(ConfigError, match="frame_bits"):
        PipelineConfig.from_dict({**base, "frame_bits": 8})


def test_threads_decode_side_by_side_and_pillows_limit_stays_lifted_for_each(monkeypatch):
    """Ingestion decodes frames in threads: one frame over Pillow's own limit (lifted while it
    decodes) must not make another thread's frame fail, nor leave the limit lifted."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    frames = {}
    for side, fmt in ((40, "PNG"), (20, "PNG"), (40, "GIF"), (24, "JPEG")):
        buffer = io.BytesIO()
        Image.fromarray(np.full((side, side, 3), side, np.uint8)).save(buffer, format=fmt)
        frames[(side, fmt)] = buffer.getvalue()
    with ThreadPoolExecutor(4) as pool:
        shapes = list(pool.map(lambda key: decode_frame(frames[key]).shape, list(frames) * 25))
    assert shapes == [(k[0], k[0], 3) for k in frames] * 25
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_exif_orientation_is_applied():
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to show
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", exif=exif, quality=95)
    frame = decode_frame(buffer.getvalue())
    assert frame.shape == (40, 20, 3)
    assert frame[:20].mean() > 200 and frame[20:].mean() < 50  # the white half is now on top


# ---- what the job reports ------------------------------------------------------------------------
def test_a_lost_supervisor_says_how_to_resume(local_ray, tiny_config, tmp_path):
    write_folder(tmp_path / "src", "a", line_frames(8, 30))
    cluster = LineCluster(pipeline_config(tiny_config, tmp_path / "src", tmp_path / "out", max_in_flight=2))

    def kill_supervisor(status):
        if sum(status["progress"].values()) >= 3:
            ray.kill(cluster.supervisor, no_restart=True)

    try:
        with pytest.raises(SupervisorLost, match="run the same command again to resume"):
            cluster.run(progress=False, on_poll=kill_supervisor)
    finally:
        cluster.shutdown()


def test_a_feed_that_keeps_failing_is_tried_again_less_often_counted_and_said_without_progress_bars(
        local_ray, tiny_config, tmp_path, capsys):
    """Ingestion that fails at once each time (here its ledger folder is a file: the disk could be
    full, a server gone) is started again after 1, 2, 4 ... s, not as fast as it fails; each
    failure is told on the console although the job draws no progress, and counted."""
    from pipelines.line_cluster import LineCluster
    from tests.pipeline_helpers import pipeline_config

    write_folder(tmp_path / "src", "a", line_frames(5, 2))
    cfg = pipeline_config(tiny_config, tmp_path / "src", tmp_path / "out")
    cfg = cfg.model_copy(update={"source": cfg.source.model_copy(update={"watch": True, "poll_s": 0.1, "settle_s": 0.0})})
    (Path(cfg.ledger_dir)).mkdir(parents=True)
    (Path(cfg.ledger_dir) / "a").write_text("not a folder")
    cluster = LineCluster(cfg)
    seen: list[float] = []

    def stop_after_four_failures(status):
        failures = [e for e in status["events"] if e.startswith("ingest 0 failed")]
        seen[len(seen):] = [time.monotonic()] * (len(failures) - len(seen))
        if len(failures) >= 4:
            cluster.supervisor.stop.remote()

    try:
        summary = cluster.run(progress=False, on_poll=stop_after_four_failures)
    finally:
        cluster.shutdown()
    failures = [e for e in summary.events if e.startswith("ingest 0 failed")]
    assert failures[0].startswith("ingest 0 failed; feeding ['a'] again from the lines' positions"), failures
    assert [f.split(" from ")[0].rsplit("again", 1)[1] for f in failures[1:4]] == [" in 1 s", " in 2 s", " in 4 s"], failures
    assert seen[3] - seen[1] >= 2.5, seen  # the waits were made (2 s, then 4 s less the polls' lag)
    assert summary.event_counts.get("feed restarts", 0) >= 4
    err = capsys.readouterr().err
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ingest 0 failed; feeding \['a'\] again in 2 s", err, re.M), err


def test_a_command_joins_an_embedded_jobs_ray_by_the_address_its_lock_names(tmp_path):
    """`references add` / `snapshots reset` with the --address a refusal names: the embedded Ray a
    job starts here uses token authentication, which Ray sends by itself only for `auto`."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time, ray\n"
         "from pipelines.line_cluster import start_ray\n"
         "start_ray(num_cpus=1)\nprint(ray.get_runtime_context().gcs_address, flush=True)\nsys.stdin.read()"],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        address = holder.stdout.readline().strip()
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
        joined = subprocess.run(
            [sys.executable, "-c", "import sys, ray\nfrom pipelines.line_cluster import start_ray, stop_ray\n"
             f"start_ray({address!r})\nprint(ray.cluster_resources()['CPU'])\nstop_ray()"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert joined.returncode == 0 and joined.stdout.strip() == "1.0", joined.stderr[-2000:]
    finally:
        holder.stdin.close()
        holder.wait(60)
