"""Normal references given to a line while it runs (`references add`): recorded at a seq, applied
before exactly that frame, again after a crash and restore, so the table equals an uncrashed run."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from actors.frames import Frame
from actors.line_sequencer import LineSequencer, start_afresh
from actors.line_settings import LineSettings
from actors.reference_log import ReferenceLog
from pipelines.drill import compare_results
from pipelines.line_cluster import LineCluster
from pipelines.references import add_references
from rareclip_core import build_detector, detector_config_from_yaml
from rareclip_core.data.frames import decode_frame
from rareclip_core.data.frames import FrameError
from tests.pipeline_helpers import KillPlan, line_frames, pipeline_config, read_rows, write_folder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def reference_file(tmp_path):
    return write_folder(tmp_path / "refs", "r", line_frames(90, 2))


def test_the_log_copies_images_and_keeps_additions_in_seq_order(tmp_path, reference_file):
    log = ReferenceLog(tmp_path / "log")
    first = log.add(3, [str(reference_file[0])])
    log.add(3, [str(reference_file[1])])
    reference_file[0].unlink()  # the copy is what a replay reads
    again = ReferenceLog(tmp_path / "log")
    assert [a.at_seq for a in again.additions] == [3, 3] and again.at(3) == log.at(3)
    assert Path(first.files[0]).read_bytes() == Path(again.additions[0].files[0]).read_bytes()
    with pytest.raises(ValueError, match="before the last addition's"):
        again.add(2, [str(reference_file[1])])
    (tmp_path / "bad.png").write_bytes(b"not an image")
    copied = sorted((tmp_path / "log").iterdir())
    with pytest.raises(FrameError, match="bad.png"):
        again.add(5, [str(reference_file[1]), str(tmp_path / "bad.png")])
    assert len(ReferenceLog(tmp_path / "log").additions) == 2  # nothing recorded for the refused batch
    assert sorted((tmp_path / "log").iterdir()) == copied  # nor its good image copied


def _rows(sequencer, images, start):
    frames = [Frame("a", seq, f"f{seq}", 0.0, images[seq]) for seq in range(start, len(images))]
    return [(r["seq"], r["score"]) for r in sequencer.add(frames)]


def _given_at_4(detector, addition):
    """What an addition means by hand: AdaptCLIP adds the references to those it holds; RareCLIP
    (its k-shot references come first) starts afresh with them."""
    if detector.kind == "adaptclip":
        detector.add_normal_references([decode_frame(Path(f).read_bytes()) for f in addition.files])
    else:
        start_afresh(detector, addition.files)


@pytest.mark.parametrize("kind", ["rareclip", "adaptclip"])
def test_an_addition_applies_before_its_frame_also_after_a_restore(kind, tiny_config, tmp_path, reference_file):
    config = tiny_config if kind == "rareclip" else detector_config_from_yaml(REPO / "configs" / "detector-adaptclip-tiny.yaml")
    images = line_frames(91, 9)
    log = ReferenceLog(tmp_path / "log")
    addition = log.add(4, [str(reference_file[0])])
    settings = LineSettings(map_resolution=None, reference_log=str(tmp_path / "log"))
    detector = build_detector(config)
    expected = [(s, detector.step(images[s]).score) for s in range(4)]
    _given_at_4(detector, addition)
    expected += [(s, detector.step(images[s]).score) for s in range(4, 9)]
    assert expected[4][1] != build_detector(config).step(images[4]).score  # the references count

    whole = LineSequencer("a", build_detector(config), settings)
    assert _rows(whole, images, 0) == expected
    for restored_at in (2, 6):  # a snapshot before the addition, and one after it
        detector = build_detector(config)
        for seq in range(restored_at):
            if seq == 4:
                _given_at_4(detector, addition)
            detector.step(images[seq])
        state = detector.state_dict()
        resumed = build_detector(config)
        resumed.load_state_dict(state)
        sequencer = LineSequencer("a", resumed, settings, next_seq=restored_at)
        assert _rows(sequencer, images, restored_at) == expected[restored_at:]


def test_references_added_while_running_survive_a_crash_bitwise(local_ray, tiny_config, tmp_path, reference_file, capsys):
    write_folder(tmp_path / "src", "a", line_frames(92, 60))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    faulty = pipeline_config(tiny_config, tmp_path / "src", tmp_path / "faulty", snapshot={"every_frames": 4},
                             gap_timeout_s=600.0, max_in_flight=2)
    cluster = LineCluster(faulty)
    added = {}
    try:
        # the second kill counts from the snapshot the line restored, which can lag the first
        # kill by a few snapshots on a loaded machine: 16 frames take it past the references' seq
        plan = KillPlan(cluster, [("line:a", "a", 2), ("line:a", "a", 16)], min_snapshots=1)

        def add_then_kill(status):
            if not added:
                while ray.get(cluster.line_actors["a"].progress.remote())["next_seq"] < 5:
                    time.sleep(0.01)
                # the command's errors: a line that does not run, an image the line refuses
                assert add_references(faulty, "b", [str(reference_file[0])], address="this-cluster") == 1
                assert add_references(faulty, "a", [str(tmp_path / "bad.png")], address="this-cluster") == 1
                assert add_references(faulty, "a", [str(reference_file[0])], address="this-cluster") == 0
                added["at"] = ReferenceLog(faulty.reference_log_dir("a")).additions[0].at_seq
                added["stderr"] = capsys.readouterr().err
                # the first kill comes once a frame has been scored with the references
                while ray.get(cluster.line_actors["a"].progress.remote())["next_seq"] <= added["at"]:
                    time.sleep(0.01)
            plan(status)

        summary = cluster.run(progress=False, on_poll=add_then_kill)
    finally:
        cluster.shutdown()
    assert summary.counts == {"a": 60} and len(plan.killed) == 2
    assert all(seq > added["at"] for _, seq in plan.killed), (plan.killed, added)
    assert "no running line actor for b of this job on this-cluster" in added["stderr"], added["stderr"]
    assert "line a: add_references failed:" in added["stderr"], added["stderr"]
    # the uncrashed run, given the same references at the same seq before it starts
    clean = pipeline_config(tiny_config, tmp_path / "src", tmp_path / "clean", snapshot={"every_frames": 4})
    ReferenceLog(clean.reference_log_dir("a")).add(added["at"], [str(reference_file[0])])
    cluster = LineCluster(clean)
    try:
        cluster.run(progress=False)
    finally:
        cluster.shutdown()
    verdict = compare_results(clean.results_dir, faulty.results_dir)
    assert verdict["ok"] and verdict["rows"] == 60, verdict
    # and the references made a difference from the frame they were given at
    plain = read_rows(tmp_path / "clean" / "results")
    assert plain[added["at"]]["score"] != pytest.approx(plain[added["at"] - 1]["score"], abs=0)


def test_the_command_records_references_for_a_stopped_job(tmp_path, reference_file):
    write_folder(tmp_path / "src", "a", line_frames(93, 3))
    (tmp_path / "detector-tiny.yaml").write_text((REPO / "configs" / "detector-tiny.yaml").read_text())
    config = tmp_path / "job.yaml"
    config.write_text(json.dumps({"detector": "detector-tiny.yaml", "source": {"kind": "folder", "root": str(tmp_path / "src")},
                                  "out": str(tmp_path / "out"), "map_resolution": None}))
    run = [sys.executable, "run_cluster.py", "references"]
    proc = subprocess.run(run + ["add", "--config", str(config), "--line", "a", "--seq", "7"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "line a has no scored frame in" in proc.stderr and "(its lines: none yet)" in proc.stderr, proc.stderr
    proc = subprocess.run(run + ["add", "--config", str(config), "--line", "a", "--image", str(tmp_path / "nope.png")],
                          cwd=REPO, capture_output=True, text=True)
    assert (proc.returncode, proc.stderr) == (2, f"error: --image {tmp_path / 'nope.png'}: no such file\n")
    proc = subprocess.run(run + ["add", "--config", str(config), "--line", "a", "--image", str(reference_file[1])],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and "take effect at seq 0" in proc.stdout, proc.stderr
    listed = subprocess.run(run + ["list", "--config", str(config)], cwd=REPO, capture_output=True, text=True)
    assert "a  from seq 0: 0-0-0.png" in listed.stdout, listed.stdout + listed.stderr
