"""`threshold: auto`: the robust rule on hand-computed cases, the rows before and after
calibration, and a restore from a snapshot giving bitwise the same threshold and rows."""
import os
import time

import numpy as np
import pytest
import ray
from tests.trivial_detector import BrightnessConfig, BrightnessDetector

from actors.frames import Frame
from actors.line import LineActor
from actors.line_sequencer import CALIBRATION_KEY, LineSequencer
from actors.line_settings import AutoThreshold, LineSettings
from actors.result_table import read_results
from actors.snapshots import SnapshotStore
from actors.writer import ResultWriter, WriterSettings
from configs.pipeline import PipelineConfig
from rareclip_core.config import ConfigError
from rareclip_core.ops.threshold import robust_threshold

AUTO = AutoThreshold(frames=5, mads=3.0)


def test_robust_threshold_on_a_hand_computed_case():
    # median 3, |deviations| 2 1 0 1 97 -> MAD 1: one wild score moves nothing
    assert robust_threshold([1, 2, 3, 4, 100], 3.0) == 3 + 3 * 1.4826 * 1
    assert robust_threshold([5.0, 5.0, 5.0], 2.0) == 5.0
    with pytest.raises(ValueError):
        robust_threshold([], 3.0)


def frames(seqs, line="l"):
    rng = np.random.default_rng(0)
    images = {s: rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for s in range(max(seqs) + 1)}
    return [Frame(line, s, f"mem://{s}", 0.0, images[s]) for s in seqs]


def sequencer(settings=LineSettings(auto_threshold=AUTO, map_resolution=None)):
    return LineSequencer("l", BrightnessDetector(BrightnessConfig()), settings)


def columns(rows):
    return [(r["seq"], r["score"], r["threshold"], r["is_anomaly"]) for r in rows]


def test_rows_before_calibration_have_no_threshold_and_after_it_the_fixed_one():
    rows = sequencer().add(frames(range(12)))
    first = [r["score"] for r in rows[:5]]
    expected = robust_threshold(first, AUTO.mads)
    assert all(r["threshold"] is None and r["is_anomaly"] is None for r in rows[:5])
    assert all(r["threshold"] == expected for r in rows[5:])
    assert [r["is_anomaly"] for r in rows[5:]] == [r["score"] >= expected for r in rows[5:]]


def test_error_rows_do_not_count_toward_calibration():
    refused = [Frame("l", 0, "bad", 0.0, None, "corrupt")] + frames(range(1, 8))
    rows = sequencer().add(refused)
    assert rows[5]["threshold"] is None and rows[6]["threshold"] is not None  # 5 ok scores: seqs 1-5


@pytest.mark.parametrize("cut", [3, 9])  # restored mid-calibration, and after it
def test_a_restore_from_a_snapshot_gives_bitwise_the_same_threshold_and_rows(tmp_path, cut):
    whole = columns(sequencer().add(frames(range(14))))

    first = sequencer()
    first.add(frames(range(cut)))
    store = SnapshotStore(str(tmp_path), "l")
    state = {**first.detector.state_dict(), **first.threshold_state()}  # as LineActor.snapshot saves it
    info = store.save(state, first.next_seq, "fp")

    restored = sequencer()
    _, loaded = store.load_latest("fp")
    restored.load_threshold_state(loaded)  # as LineActor.restore loads it
    restored.detector.load_state_dict({k: v for k, v in loaded.items() if k != CALIBRATION_KEY})
    restored.next_seq = info.next_seq
    assert columns(restored.add(frames(range(cut, 14)))) == whole[cut:]


def test_a_restart_of_calibration_forgets_the_threshold():
    line = sequencer()
    line.add(frames(range(8)))
    line.restart_calibration()  # a reset (product changeover)
    rows = line.add(frames(range(8, 12)))
    assert [r["seq"] for r in rows] == [8, 9, 10, 11] and all(r["threshold"] is None for r in rows)


def test_config_accepts_auto_or_a_number_per_line():
    cfg = PipelineConfig.from_dict(
        {"source": {"kind": "folder", "root": "x"}, "threshold": "auto", "thresholds": {"a": 1.5},
         "auto_threshold": {"frames": 30, "mads": 4}}
    )
    assert (cfg.threshold_for("a"), cfg.threshold_for("b"), cfg.auto_threshold.frames) == (1.5, "auto", 30)
    with pytest.raises(ConfigError, match="threshold"):
        PipelineConfig.from_dict({"source": {"kind": "folder", "root": "x"}, "threshold": "automatic"})


def test_a_line_actor_restarted_after_calibration_keeps_its_threshold(local_ray, tmp_path):
    writer_name = f"writer-{tmp_path.name}"
    writer = ResultWriter.options(name=writer_name).remote(str(tmp_path / "results"), WriterSettings(1, 0.1))
    settings = LineSettings(auto_threshold=AUTO, map_resolution=None, snapshot_root=str(tmp_path / "snapshots"))
    actor = LineActor.options(num_cpus=0.5).remote("l", BrightnessConfig(), writer_name, settings)
    stream = frames(range(12))
    ray.get(actor.submit.remote(stream[:8]))
    assert ray.get(actor.snapshot.remote()) == 8  # calibrated at the 5th frame: the snapshot has it
    pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
    ray.kill(actor, no_restart=False)  # the line's process dies; Ray starts it again, it restores seq 8
    deadline = time.monotonic() + 120
    while os.path.exists(f"/proc/{pid}"):  # the old process must not take the next frames
        assert time.monotonic() < deadline, "the line actor's process did not end"
        time.sleep(0.05)
    while True:
        try:
            assert ray.get(actor.submit.remote(stream[8:])) == 12
            break
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):  # restarting
            assert time.monotonic() < deadline, "the line actor did not come back"
            time.sleep(0.5)
    ray.get(actor.wait_until.remote(12))
    ray.get(writer.flush.remote())
    rows = sorted(read_results(tmp_path / "results").to_pylist(), key=lambda r: r["seq"])
    assert columns(rows) == columns(sequencer().add(stream))  # bitwise: scores, thresholds, verdicts


def test_a_score_equal_to_the_threshold_is_an_anomaly():
    line = LineSequencer("l", BrightnessDetector(BrightnessConfig()), LineSettings(threshold=0.2, map_resolution=None))
    rows = line.add([Frame("l", 0, "m", 0.0, np.full((8, 8, 3), 51, np.uint8))])  # mean brightness 51/255 = 0.2
    assert rows[0]["score"] == 0.2 and rows[0]["is_anomaly"] is True


def noise_frames(seqs) -> list[Frame]:
    rng = np.random.default_rng(0)
    images = {s: rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for s in range(max(seqs) + 1)}
    return [Frame("l", s, f"mem://{s}", 0.0, images[s]) for s in seqs]


def test_a_restore_in_the_same_process_mid_calibration_equals_the_straight_run():
    """What `LineActor.restore` does after the writer refused rows: the calibration goes back to
    the snapshot's scores, without those of the frames scored since."""
    settings = LineSettings(auto_threshold=AutoThreshold(frames=5, mads=3.0), map_resolution=None)

    def columns(rows):
        return [(r["seq"], r["score"], r["threshold"], r["is_anomaly"]) for r in rows]

    whole = columns(LineSequencer("l", BrightnessDetector(BrightnessConfig()), settings).add(noise_frames(range(12))))
    line = LineSequencer("l", BrightnessDetector(BrightnessConfig()), settings)
    line.add(noise_frames(range(2)))
    state = line.state()  # 2 calibration scores
    line.add(noise_frames(range(2, 4)))  # 4 scores, then the rows are refused
    line.load_state(state)
    line.next_seq = 2
    assert columns(line.add(noise_frames(range(2, 12)))) == whole[2:]
    assert whole[5][2] is not None and whole[4][2] is None  # calibrated from the 6th frame on


@pytest.mark.parametrize("extra, field", [({"auto_threshold": {"frames": 2}}, "auto_threshold.frames"),
                                          ({"snapshot": {"keep": 0}}, "snapshot.keep"),
                                          ({"lines_per_gpu": 0}, "lines_per_gpu")])
def test_pipeline_settings_out_of_bounds_are_refused_by_name(extra, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        PipelineConfig.from_dict({"source": {"kind": "folder", "root": "x"}, **extra})


def test_a_seq_delivered_twice_while_it_waits_is_scored_as_first_delivered():
    """A frame held for a missing earlier seq keeps its first delivery (a replay resends it)."""
    line = LineSequencer("l", BrightnessDetector(BrightnessConfig()), LineSettings(map_resolution=None))
    first, second = np.full((8, 8, 3), 51, np.uint8), np.full((8, 8, 3), 102, np.uint8)
    assert line.add([Frame("l", 1, "m1", 0.0, first)]) == []  # waits for seq 0
    rows = line.add([Frame("l", 1, "m1-again", 0.0, second), Frame("l", 0, "m0", 0.0, first)])
    # the brightness detector adds 1e-3 per frame seen: 51/255 = 0.2, then 0.2 + 0.001 (not 102/255)
    assert [(r["seq"], r["uri"]) for r in rows] == [(0, "m0"), (1, "m1")]
    assert [r["score"] for r in rows] == pytest.approx([0.2, 0.201], abs=1e-12)
