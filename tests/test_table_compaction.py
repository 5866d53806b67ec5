"""Merging a partition's small files: the same rows in fewer files, readers never see a row twice
or miss one, and a merge stopped at any point is finished or undone when the writer starts."""
import datetime as dt
import os
import threading
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from actors import result_table, table_compaction
from actors.result_table import partition_dir, partition_files, read_results
from actors.table_compaction import CompactionSettings, compact_partition
from actors.writer import ResultWriterCore, WriterSettings
from pipelines import query
from pipelines.dashboard import ResultFeed
from pipelines.line_cluster import LineCluster
from pipelines.query import query_table
from tests.pipeline_helpers import line_frames, pipeline_config, write_folder

DAY1, DAY2 = "2026-11-23", "2026-11-24"


def row(seq: int, date: str = DAY1, line: str = "x") -> dict:
    scored = dt.datetime(2026, 11, 23, 8, tzinfo=dt.timezone.utc) + dt.timedelta(seconds=seq)
    return {"line_id": line, "seq": seq, "uri": f"/frames/{seq}.png", "scored_time": scored, "latency_ms": 2.5,
            "score": seq / 7, "is_anomaly": seq % 5 == 0, "threshold": 0.5, "status": "ok", "error": None,
            "model_id": "m", "map_uri": None, "date": date}


def writer(root: Path, files: int = 4, rows: int = 1000) -> ResultWriterCore:
    """One file per call of `write` (batch_rows 2, two rows a call)."""
    return ResultWriterCore(str(root), WriterSettings(batch_rows=2, flush_s=3600, compaction=CompactionSettings(files, rows)))


def write_pairs(w: ResultWriterCore, seqs: range, date: str = DAY1, line: str = "x") -> None:
    for seq in seqs:
        w.write([row(seq, date, line), row(seq + 1, date, line)])


def table_rows(root: Path) -> list[dict]:
    return sorted(read_results(root).to_pylist(), key=lambda r: (r["line_id"], r["seq"]))


def files_of(root: Path, date: str = DAY1, line: str = "x") -> list[str]:
    return [p.name for p in partition_files(partition_dir(root, line, date))]


def hidden_entries(root: Path) -> list[str]:
    return [p.name for p in root.glob("line_id=*/.*")] + [p.name for p in root.glob("line_id=*/date=*/.*")]


def test_merged_table_equals_the_unmerged_one_in_a_file_per_line_and_date(tmp_path):
    merged, plain = writer(tmp_path / "merged"), writer(tmp_path / "plain", files=0)
    for w in (merged, plain):
        write_pairs(w, range(0, 22, 2))  # 11 files of DAY1: merged at the 4th and 8th
        write_pairs(w, range(22, 26, 2), DAY2)  # the line moves on to DAY2: DAY1 is merged for good
        write_pairs(w, range(0, 6, 2), DAY1, line="y")
    assert len(files_of(tmp_path / "plain")) == 11 and len(files_of(tmp_path / "merged")) == 1
    assert files_of(tmp_path / "merged")[0].startswith("part-0000000000-")
    assert len(files_of(tmp_path / "merged", DAY2)) == 2  # the day still being written
    assert len(files_of(tmp_path / "merged", line="y")) == 3
    assert table_rows(tmp_path / "merged") == table_rows(tmp_path / "plain")
    assert merged.compact_all() == 2 + 3  # what a job's end merges
    assert [len(files_of(tmp_path / "merged", d, l)) for d, l in [(DAY1, "x"), (DAY2, "x"), (DAY1, "y")]] == [1, 1, 1]
    assert table_rows(tmp_path / "merged") == table_rows(tmp_path / "plain")
    assert hidden_entries(tmp_path / "merged") == []


def test_files_of_enough_rows_are_never_merged_again(tmp_path):
    w = writer(tmp_path, files=2, rows=4)
    write_pairs(w, range(0, 4, 2))  # 2 files of 2 rows -> one of 4: large
    (large,) = files_of(tmp_path)
    inode = (partition_dir(tmp_path, "x", DAY1) / large).stat().st_ino
    write_pairs(w, range(4, 8, 2))  # 2 more small files -> merged beside it
    assert files_of(tmp_path)[0] == large and len(files_of(tmp_path)) == 2
    assert (partition_dir(tmp_path, "x", DAY1) / large).stat().st_ino == inode  # linked, not rewritten
    assert [r["seq"] for r in table_rows(tmp_path)] == list(range(8))


def test_without_an_atomic_exchange_two_renames_give_the_same_table(tmp_path, monkeypatch):
    monkeypatch.setattr(table_compaction, "_exchange", lambda a, b: False)
    w = writer(tmp_path)
    write_pairs(w, range(0, 8, 2))
    assert len(files_of(tmp_path)) == 1 and [r["seq"] for r in table_rows(tmp_path)] == list(range(8))
    assert hidden_entries(tmp_path) == []


def stop_before_the_swap(building: Path, partition: Path) -> None:
    raise KeyboardInterrupt


def stop_after_the_exchange(building: Path, partition: Path) -> None:
    assert table_compaction._exchange(building, partition)
    raise KeyboardInterrupt


def stop_between_the_renames(building: Path, partition: Path) -> None:
    os.rename(partition, partition.parent / f"{table_compaction.OLD_PREFIX}{partition.name}")
    raise KeyboardInterrupt


def stop_between_the_renames_of_an_unfinished_merge(building: Path, partition: Path) -> None:
    (building / table_compaction.COMPLETE_MARKER).unlink()
    stop_between_the_renames(building, partition)


@pytest.mark.parametrize("stop, files_after, readable_before", [
    (stop_before_the_swap, 4, True), (stop_after_the_exchange, 1, True), (stop_between_the_renames, 1, False),
    (stop_between_the_renames_of_an_unfinished_merge, 4, False),
])
def test_a_merge_stopped_anywhere_is_finished_or_undone_when_the_writer_starts(
    tmp_path, monkeypatch, stop, files_after, readable_before
):
    plain = writer(tmp_path / "plain", files=0)
    write_pairs(plain, range(0, 8, 2))
    root = tmp_path / "stopped"
    w = writer(root, files=0)
    write_pairs(w, range(0, 8, 2))
    monkeypatch.setattr(table_compaction, "_swap_in", stop)
    with pytest.raises(KeyboardInterrupt):
        compact_partition(root, "x", DAY1, CompactionSettings(files=4))
    assert hidden_entries(root)  # what the stop left
    # readers skip the hidden folders: the table is whole, or (two-rename path) without the partition
    assert table_rows(root) == (table_rows(tmp_path / "plain") if readable_before else [])
    assert query_table("SELECT count(*) AS n FROM results", root).to_pylist() == [{"n": 8 if readable_before else 0}]
    monkeypatch.undo()
    again = writer(root, files=0)  # merging off: what is left is the recovery's doing
    assert hidden_entries(root) == []
    assert len(files_of(root)) == files_after
    assert table_rows(root) == table_rows(tmp_path / "plain")
    write_pairs(again, range(8, 10, 2))  # it goes on from the right seq
    assert [r["seq"] for r in table_rows(root)] == list(range(10))


def test_readers_that_listed_the_files_before_a_merge_read_the_whole_table(tmp_path, monkeypatch):
    w = writer(tmp_path, files=0)
    write_pairs(w, range(0, 8, 2))
    expected = table_rows(tmp_path)
    listing = pads.dataset

    def list_then_merge(*args, **kwargs):
        dataset = listing(*args, **kwargs)
        compact_partition(tmp_path, "x", DAY1, CompactionSettings(files=2))  # the files just listed go
        return dataset

    monkeypatch.setattr(result_table.pads, "dataset", list_then_merge)
    assert table_rows(tmp_path) == expected
    assert len(files_of(tmp_path)) == 1
    monkeypatch.undo()
    write_pairs(w, range(8, 12, 2))
    connect = query._connect

    def connect_then_merge(results_dir):
        connection = connect(results_dir)
        compact_partition(tmp_path, "x", DAY1, CompactionSettings(files=2))
        return connection

    monkeypatch.setattr("pipelines.query._connect", connect_then_merge)  # DuckDB lists at the query
    assert query_table("SELECT count(*) AS n, sum(seq) AS s FROM results", tmp_path).to_pylist() == [{"n": 12, "s": 66}]


@pytest.mark.parametrize("merges", [result_table.MERGE_READ_ATTEMPTS - 1, result_table.MERGE_READ_ATTEMPTS])
def test_a_reader_lists_again_after_each_merge_that_beat_it_and_reports_the_last_one(tmp_path, monkeypatch, merges):
    w = writer(tmp_path, files=0)
    write_pairs(w, range(0, 4, 2))
    listing, seq = pads.dataset, [4]

    def list_then_merge(*args, **kwargs):  # a merge finishes between each listing and its read
        dataset = listing(*args, **kwargs)
        if seq[0] < 4 + 2 * merges:
            write_pairs(w, range(seq[0], seq[0] + 2, 2))
            seq[0] += 2
            compact_partition(tmp_path, "x", DAY1, CompactionSettings(files=2))
        return dataset

    monkeypatch.setattr(result_table.pads, "dataset", list_then_merge)
    if merges == result_table.MERGE_READ_ATTEMPTS:
        with pytest.raises(FileNotFoundError):
            read_results(tmp_path)
        return
    assert [r["seq"] for r in table_rows(tmp_path)] == list(range(seq[0]))


def test_readers_during_a_job_that_merges_all_the_time_never_see_a_row_twice_or_lose_one(
    local_ray, tiny_config, tmp_path
):
    for i, line in enumerate(("a", "b")):
        write_folder(tmp_path / "src", line, line_frames(80 + i, 60))
    cfg = pipeline_config(tiny_config, tmp_path / "src", tmp_path / "out", writer_batch_rows=2, writer_flush_s=0.05,
                          writer_compact_files=3)
    results, seen, problems, done = cfg.results_dir, [0], [], threading.Event()

    def read_all_the_time():
        feed = ResultFeed(results)
        while not done.is_set():
            if not Path(results).is_dir():  # the writer makes it
                time.sleep(0.01)
                continue
            try:
                table = read_results(results, columns=["line_id", "seq"])
                pairs = set(zip(table.column("line_id").to_pylist(), table.column("seq").to_pylist()))
                counted = query_table("SELECT count(*) AS n, count(DISTINCT (line_id, seq)) AS d FROM results", results)
                feed.refresh()
                shown = feed.view("today")
                if len(pairs) != table.num_rows or len(pairs) < seen[-1] or len(set(counted.to_pylist()[0].values())) > 1:
                    problems.append((table.num_rows, len(pairs), seen[-1], counted.to_pylist()))
                if any(view["frames"] != view["last_seq"] + 1 for view in shown.values()):
                    problems.append(shown)
                seen.append(len(pairs))
            except Exception as err:  # noqa: BLE001 - any failure of a reader is what this test looks for
                problems.append(repr(err))

    reader = threading.Thread(target=read_all_the_time)
    reader.start()
    cluster = LineCluster(cfg)
    try:
        assert cluster.run(progress=False).counts == {"a": 60, "b": 60}
    finally:
        cluster.shutdown()
        done.set()
        reader.join()
    assert problems == []
    assert len(set(seen)) > 10  # the readers saw the table grow while files were merged
    assert len(list(Path(results).glob("line_id=*/date=*/*.parquet"))) == len(list(Path(results).glob("line_id=*/date=*")))


def test_a_lines_maps_go_in_folders_of_ten_thousand_seqs():
    assert result_table.map_path("a", 12_345) == "_maps/line_id=a/000001/0000012345.npy"
    assert {result_table.map_path("a", s).rsplit("/", 1)[0] for s in range(10_000)} == {"_maps/line_id=a/000000"}
