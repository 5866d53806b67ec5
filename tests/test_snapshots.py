"""Line snapshots without Ray: atomic round trip, newest-valid selection, rejection of damaged
snapshots with a logged reason, pruning; and the `snapshots` operator command."""
import json
import logging

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch
import yaml

import run_cluster
from pipelines.job_lock import JobLock
from actors.snapshots import MANIFEST_FILE, STATE_FILE, SnapshotStore, snapshot_lines
from actors.writer import ResultWriterCore
from configs.loading import load_pipeline_config
from pipelines.preflight import job_problems
from rareclip_core.detectors.rareclip.detector import RareCLIPDetector
from tests.pipeline_helpers import line_frames, write_folder

FP = "fingerprint-a"


def sample_state(k: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(k)
    return {
        "images_seen": torch.tensor(k),
        "bank.1.1.features": torch.randn(7, 5, generator=g).to(torch.float16),
        "bank.1.1.norms": torch.randn(7, generator=g, dtype=torch.float64),
        "bank.1.1.bf": torch.randn(3, 2, generator=g).to(torch.bfloat16),
        "image_memory.mask": torch.rand(4, generator=g) > 0.5,
        "image_memory.ids": torch.arange(4, dtype=torch.int64) + k,
        "empty": torch.zeros(0, 3),
        "special": torch.tensor([float("nan"), float("inf"), -0.0]),
    }


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert a[key].reshape(-1).view(torch.uint8).tolist() == b[key].reshape(-1).view(torch.uint8).tolist(), key


@pytest.fixture(params=["path", "file-uri", "mock-uri"])
def store(request, tmp_path):
    """A line's store on a local path, a file:// URI, and pyarrow's in-memory mock:// filesystem
    (an object-store stand-in: no fsync, no local paths; each instance is its own filesystem)."""
    root = {"path": str(tmp_path / "snaps"), "file-uri": (tmp_path / "snaps").as_uri(), "mock-uri": "mock:///bucket/snaps"}
    s = SnapshotStore(root[request.param], "line-a")
    assert s.local == (request.param != "mock-uri")
    return s


def read(store, info, name) -> bytes:
    with store.fs.open_input_stream(f"{store.dir}/{info.name}/{name}") as fh:
        return fh.read()


def rewrite(store, info, name, data: bytes) -> None:
    with store.fs.open_output_stream(f"{store.dir}/{info.name}/{name}") as out:
        out.write(data)


def entries(store) -> list[str]:
    return sorted(i.base_name for i in store.fs.get_file_info(pafs.FileSelector(store.dir, allow_not_found=True)))


def save_three(store):
    return [store.save(sample_state(k), next_seq, FP) for k, next_seq in enumerate((5, 10, 15))]


def test_round_trip_is_bitwise_and_atomic(store):
    state = sample_state(3)
    info = store.save(state, 42, FP)
    assert info.name == "seq-000000000041" and info.next_seq == 42
    assert entries(store) == ["seq-000000000041"]  # no .tmp-* left behind
    assert sorted(entries_of(store, info)) == [MANIFEST_FILE, STATE_FILE]
    assert_bitwise_equal(store.load(info, FP), state)
    got_info, got = store.load_latest(FP)
    assert got_info == info
    assert_bitwise_equal(got, state)
    manifest = json.loads(read(store, info, MANIFEST_FILE))
    assert manifest["line_id"] == "line-a" and manifest["next_seq"] == 42 and manifest["bytes"] == len(read(store, info, STATE_FILE))


def entries_of(store, info) -> list[str]:
    return [i.base_name for i in store.fs.get_file_info(pafs.FileSelector(f"{store.dir}/{info.name}"))]


def test_saving_the_same_seq_again_replaces_it(store):
    store.save(sample_state(1), 7, FP)
    info = store.save(sample_state(2), 7, FP)
    assert store.list() == [info]
    assert_bitwise_equal(store.load(info, FP), sample_state(2))


def test_newest_first_and_at_most(store):
    infos = save_three(store)
    assert store.list() == infos  # oldest first, by seq
    assert store.load_latest(FP)[0] == infos[2]
    assert store.load_latest(FP, at_most=14)[0] == infos[1]
    assert store.load_latest(FP, at_most=10)[0] == infos[1]
    info, state = store.load_latest(FP, at_most=5)
    assert info == infos[0]
    assert_bitwise_equal(state, sample_state(0))
    assert store.load_latest(FP, at_most=4) == (None, {})
    assert SnapshotStore(store.dir.rsplit("/", 1)[0], "never-saved").load_latest(FP) == (None, {})


def test_list_ignores_foreign_folders(store):
    save_three(store)
    store.fs.create_dir(f"{store.dir}/seq-abc", recursive=True)
    store.fs.create_dir(f"{store.dir}/.tmp-123", recursive=True)
    assert [i.next_seq for i in store.list()] == [5, 10, 15]


def truncate(store, info):
    data = read(store, info, STATE_FILE)
    rewrite(store, info, STATE_FILE, data[: len(data) // 2])


def flip_bit(store, info):
    data = bytearray(read(store, info, STATE_FILE))
    data[len(data) - 3] ^= 0x10  # in the tensor bytes: still parses, but the checksum differs
    rewrite(store, info, STATE_FILE, bytes(data))


def delete_manifest(store, info):
    store.fs.delete_file(f"{store.dir}/{info.name}/{MANIFEST_FILE}")


def garble_manifest(store, info):
    rewrite(store, info, MANIFEST_FILE, b'{"format_version": 1, "line_')


def manifest_not_an_object(store, info):
    rewrite(store, info, MANIFEST_FILE, b"[1, 2]")


def edit_manifest(**changes):
    def edit(store, info):
        manifest = json.loads(read(store, info, MANIFEST_FILE))
        manifest.update(changes)
        rewrite(store, info, MANIFEST_FILE, json.dumps(manifest).encode())

    return edit


def delete_state(store, info):
    store.fs.delete_file(f"{store.dir}/{info.name}/{STATE_FILE}")


DAMAGE = {
    "truncated state": (truncate, "checksum mismatch"),
    "bit-flipped state": (flip_bit, "checksum mismatch"),
    "deleted state": (delete_state, "unreadable"),
    "deleted manifest": (delete_manifest, "unreadable"),
    "garbled manifest": (garble_manifest, "unreadable"),
    "manifest not an object": (manifest_not_an_object, "not a JSON object"),
    "other config": (edit_manifest(config_fingerprint="fingerprint-b"), "another detector config"),
    "other format version": (edit_manifest(format_version=99), "format version 99"),
    "other line": (edit_manifest(line_id="line-b"), "manifest is for line-b"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_snapshot_is_rejected_with_a_reason_and_the_previous_one_used(store, damage, caplog):
    damage_fn, reason = DAMAGE[damage]
    infos = save_three(store)
    damage_fn(store, infos[2])
    with caplog.at_level(logging.WARNING, logger="actors.snapshots"):
        info, state = store.load_latest(FP)
    assert info == infos[1]
    assert_bitwise_equal(state, sample_state(1))
    rejected = [r.getMessage() for r in caplog.records if "snapshot rejected" in r.getMessage()]
    assert len(rejected) == 1 and reason in rejected[0] and infos[2].name in rejected[0]
    assert store.describe(infos[2], FP)["problem"] is not None and reason in store.describe(infos[2], FP)["problem"]
    assert store.describe(infos[1], FP)["problem"] is None


def test_every_snapshot_damaged_means_a_fresh_start(store, caplog):
    infos = save_three(store)
    for info in infos:
        flip_bit(store, info)
    with caplog.at_level(logging.WARNING, logger="actors.snapshots"):
        assert store.load_latest(FP) == (None, {})
    assert sum("snapshot rejected" in r.getMessage() for r in caplog.records) == 3


def test_prune_keeps_the_newest_and_removes_leftover_temporaries(store):
    infos = save_three(store) + [store.save(sample_state(9), 20, FP)]
    store.fs.create_dir(f"{store.dir}/.tmp-deadbeef", recursive=True)  # a crash mid-save
    with store.fs.open_output_stream(f"{store.dir}/.tmp-deadbeef/{STATE_FILE}") as out:
        out.write(b"half")
    store.prune(2)
    assert entries(store) == [infos[2].name, infos[3].name]
    store.prune(1)
    assert store.list() == [infos[3]]
    assert_bitwise_equal(store.load_latest(FP)[1], sample_state(9))


def test_describe_and_lines(tmp_path):
    root = str(tmp_path / "snaps")
    a, b = SnapshotStore(root, "a"), SnapshotStore(root, "b")
    info = a.save(sample_state(), 3, FP)
    b.save(sample_state(), 1, FP)
    d = a.describe(info, FP)
    assert d["problem"] is None and d["bytes"] == len(read(a, info, STATE_FILE)) and d["created_utc"]
    assert "another detector config" in a.describe(info, "other")["problem"]
    assert snapshot_lines(root) == ["a", "b"] and snapshot_lines(str(tmp_path / "none")) == []


def test_a_detector_restored_from_a_snapshot_continues_bitwise(tiny_config, frames, tmp_path):
    """The state of a real detector survives the disk: the next scores are identical."""
    store = SnapshotStore(str(tmp_path / "snaps"), "line")
    live = RareCLIPDetector(tiny_config)
    for im in frames[:6]:
        live.step(im)
    info = store.save(live.state_dict(), 6, tiny_config.fingerprint())
    restored = RareCLIPDetector(tiny_config)
    restored.load_state_dict(store.load(info, tiny_config.fingerprint()))
    assert_bitwise_equal(restored.state_dict(), live.state_dict())
    for im in frames[6:9]:
        a, b = live.step(im), restored.step(im)
        assert a.score == b.score and np.array_equal(a.anomaly_map, b.anomaly_map)


def test_turning_on_a_speed_setting_keeps_the_line_s_snapshots(tiny_config):
    """Where and how a step runs (device, CUDA graphs, compiled banks) is not part of the config
    fingerprint a snapshot is checked against, nor of the rows' model_id; what it computes is."""
    same = [{"device": "cpu"}, {"text_cache_dir": None}, {"cuda_graphs": True}, {"compile_banks": True}]
    other = [{"precision": "fp16"}, {"resize_on_device": True}, {"bank_dtype": "float16"}, {"k_neighbors": 5}]
    for update in same + other:
        changed = tiny_config.model_copy(update=update)
        kept = update in same
        assert (changed.fingerprint() == tiny_config.fingerprint()) is kept, update
        assert (changed.model_id == tiny_config.model_id) is kept, update


# ---- the `snapshots` command (no job running) ---------------------------------------------------


@pytest.fixture
def job(tiny_config, tmp_path):
    """A stopped job: its config, 10 rows of line `a` in the table and snapshots at 4 and 8."""
    out = tmp_path / "job"
    config = tmp_path / "job.yaml"
    detector = json.loads(tiny_config.model_dump_json())
    config.write_text(yaml.safe_dump({"detector": detector, "source": {"kind": "folder", "root": str(tmp_path / "src")}, "out": str(out)}))
    writer = ResultWriterCore(str(out / "results"))
    writer.write([{"line_id": "a", "seq": s, "status": "ok", "score": float(s), "date": "2026-11-23"} for s in range(10)])
    writer.flush()
    store = SnapshotStore(str(out / "snapshots"), "a")
    infos = [store.save(sample_state(n), n, tiny_config.fingerprint()) for n in (4, 8)]
    return config, store, infos


def test_list_shows_each_snapshot_and_why_one_is_rejected(job, tiny_config, capsys):
    config, store, infos = job
    truncate(store, infos[1])
    SnapshotStore(str(store.dir.rsplit("/", 1)[0]), "b").save(sample_state(), 2, "old-config")
    assert run_cluster.main(["snapshots", "list", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    a_part, b_part = out.split("b: ")
    assert "a: 2 snapshot(s)" in a_part and "1 snapshot(s)" in b_part
    lines = [ln for ln in a_part.splitlines() if "seq-" in ln]
    assert lines[0].lstrip().startswith(infos[1].name) and "seqs 0-7" in lines[0] and "REJECTED" in lines[0]
    assert "checksum mismatch" in lines[0]
    assert lines[1].lstrip().startswith(infos[0].name) and "seqs 0-3" in lines[1] and lines[1].endswith("valid")
    assert "UTC" in lines[1] and f" {store.describe(infos[0], tiny_config.fingerprint())['bytes']} B " in lines[1]
    assert "another detector config" in b_part
    assert run_cluster.main(["snapshots", "list", "--config", str(config), "--line", "a"]) == 0
    assert "b: " not in capsys.readouterr().out
    assert run_cluster.main(["snapshots", "list", "--config", str(config), "--line", "widgit"]) == 2  # a typo
    assert capsys.readouterr().err == f"error: line widgit has no snapshots under {store.dir.rsplit('/', 1)[0]} (lines with snapshots: a, b)\n"


def test_a_line_whose_snapshots_all_have_other_settings_stops_the_job_before_ray_and_is_told_the_ways_on(
        job, tiny_config, tmp_path, capsys):
    config, store, infos = job
    write_folder(tmp_path / "src", "a", line_frames(1, 10))
    assert job_problems(load_pipeline_config(config)) == []  # same settings: the job resumes from seq 8
    changed = tmp_path / "changed.yaml"
    data = yaml.safe_load(config.read_text())
    changed.write_text(yaml.safe_dump({**data, "detector": {**data["detector"], "max_images": 50}}))
    way_on = ("with these it would learn again from seq 0 and score every frame again. Go on with the earlier settings; or "
              "have it learn afresh from where it stopped: `snapshots reset --line a` with this config; or write to another out")
    # snapshots written before they recorded their settings: no difference to name
    assert job_problems(load_pipeline_config(changed)) == [
        f"line a: its snapshots in {store.dir} (the newest covers seqs 0-7) were made with other detector settings; {way_on}"]
    store.save(sample_state(), 9, tiny_config.fingerprint(), tiny_config.fingerprinted_settings())
    assert run_cluster.main(["replay", "--config", str(changed)]) == 2
    assert capsys.readouterr().err == (
        f"error: {changed}: line a: its snapshots in {store.dir} (the newest covers seqs 0-8) were made with other "
        f"detector settings (max_images: 200 then, 50 now); {way_on}\n")
    other_kind = tmp_path / "other-kind.yaml"
    other_kind.write_text(yaml.safe_dump({**data, "detector": {"kind": "dual_image", "model": "rareclip-tiny", "pretrained": None}}))
    assert "were made with other detector settings (kind: 'rareclip' then, 'dual_image' now); " in job_problems(
        load_pipeline_config(other_kind))[0]  # another kind: every setting differs, the kind says it
    assert run_cluster.main(["snapshots", "reset", "--config", str(changed), "--line", "a"]) == 0
    assert job_problems(load_pipeline_config(changed)) == []


def test_reset_writes_an_empty_state_at_the_next_seq_of_the_table(job, tiny_config, capsys):
    config, store, infos = job
    assert run_cluster.main(["snapshots", "reset", "--config", str(config), "--line", "a"]) == 0
    assert "reset at seq 10" in capsys.readouterr().out
    [info] = store.list()
    assert info.next_seq == 10
    state = store.load(info, tiny_config.fingerprint())
    assert int(state["images_seen"]) == 0
    assert_bitwise_equal(state, RareCLIPDetector(tiny_config).state_dict())
    # an unknown line is refused rather than given an empty snapshot at seq 0
    assert run_cluster.main(["snapshots", "reset", "--config", str(config), "--line", "nope"]) == 2
    assert "nothing to reset" in capsys.readouterr().err
    assert run_cluster.main(["snapshots", "reset", "--config", str(config)]) == 2


def test_reset_and_restore_are_refused_while_the_job_runs_naming_its_address(job, tiny_config, capsys):
    """A running line would write its own snapshots over an offline reset or restore: both are
    refused while the job holds its folder, and told how to act on the running job instead."""
    config, store, infos = job
    lock = JobLock(store.dir.rsplit("/snapshots/", 1)[0]).acquire("10.1.2.3:6379")  # the running job's
    try:
        for action in (["reset"], ["restore", "--snapshot", infos[0].name]):
            assert run_cluster.main(["snapshots", *action, "--config", str(config), "--line", "a"]) == 2
            err = capsys.readouterr().err
            assert "another job is writing to" in err and "Ray at 10.1.2.3:6379" in err, err
            assert err.rstrip().endswith(f"To {action[0]} the running job's line, pass --address 10.1.2.3:6379"), err
        assert store.list() == infos  # nothing deleted, nothing written
    finally:
        lock.release()
    assert run_cluster.main(["snapshots", "reset", "--config", str(config), "--line", "a"]) == 0


def test_restore_makes_a_snapshot_the_newest(job, tiny_config, capsys):
    config, store, infos = job
    infos.append(store.save(sample_state(9), 9, tiny_config.fingerprint()))
    assert run_cluster.main(["snapshots", "restore", "--config", str(config), "--line", "a", "--snapshot", infos[0].name]) == 0
    assert "2 newer deleted" in capsys.readouterr().out
    assert store.list() == [infos[0]]
    assert store.load_latest(tiny_config.fingerprint())[0] == infos[0]
    # a name it does not have, and a damaged snapshot, are refused and change nothing
    assert run_cluster.main(["snapshots", "restore", "--config", str(config), "--line", "a", "--snapshot", "seq-000000000777"]) == 2
    assert "has no snapshot" in capsys.readouterr().err
    flip_bit(store, infos[0])
    store.save(sample_state(5), 12, tiny_config.fingerprint())
    assert run_cluster.main(["snapshots", "restore", "--config", str(config), "--line", "a", "--snapshot", "3"]) == 1
    assert "checksum mismatch" in capsys.readouterr().err
    assert [i.next_seq for i in store.list()] == [4, 12]
    assert run_cluster.main(["snapshots", "restore", "--config", str(config), "--line", "a"]) == 2
