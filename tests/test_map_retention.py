"""Keeping `maps_keep_days` of anomaly maps: a line's maps of rows dated more than that before its
newest row are deleted, whole folders where they can be, the rows stay, and a report says why a
map is gone."""
import numpy as np
import pytest

from actors import result_table
from actors.result_table import MapUnavailable, delete_old_maps, read_map, read_results
from actors.writer import ResultWriterCore, WriterSettings
from tests.test_table_compaction import row

DATES = {0: "2026-12-01", 1: "2026-12-01", 2: "2026-12-01", 3: "2026-12-02", 4: "2026-12-02", 5: "2026-12-05",
         6: "2026-12-05"}


def map_seqs(root) -> list[int]:
    return sorted(int(p.stem) for p in (root / "_maps" / "line_id=x").glob("*/*.npy"))


def scored_row(seq: int) -> dict:
    return {**row(seq, DATES[seq]), "anomaly_map": np.full((4, 4), seq, dtype=np.float16)}


@pytest.fixture
def two_maps_per_folder(monkeypatch):
    monkeypatch.setattr(result_table, "MAPS_PER_FOLDER", 2)


def test_old_maps_go_by_date_and_whole_folders_where_they_can(tmp_path, two_maps_per_folder):
    ResultWriterCore(str(tmp_path), WriterSettings(batch_rows=7)).write([scored_row(seq) for seq in range(7)])
    assert map_seqs(tmp_path) == list(range(7))
    # newest date 12-05: 3 days keep 12-02 on; the maps of 12-01 go, seqs 0-2 (folder 0 whole, seq 2 of folder 1)
    assert delete_old_maps(tmp_path, "x", keep_days=3) == 3
    assert map_seqs(tmp_path) == [3, 4, 5, 6] and not (tmp_path / "_maps" / "line_id=x" / "000000").exists()
    assert delete_old_maps(tmp_path, "x", keep_days=3) == 0  # done once
    assert delete_old_maps(tmp_path, "x", keep_days=2) == 2 and map_seqs(tmp_path) == [5, 6]
    rows = read_results(tmp_path).to_pylist()
    assert len(rows) == 7  # every row stays
    with pytest.raises(MapUnavailable, match="maps_keep_days"):
        read_map(tmp_path, rows[0]["map_uri"])
    assert read_map(tmp_path, rows[6]["map_uri"]).tolist() == np.full((4, 4), 6).tolist()


def test_the_writer_keeps_maps_keep_days_as_the_dates_move_and_when_it_starts(tmp_path, two_maps_per_folder):
    writer = ResultWriterCore(str(tmp_path), WriterSettings(batch_rows=1, maps_keep_days=0))
    writer.write([scored_row(0)])
    writer.write([scored_row(1)])
    writer.wait_map_deletions()
    assert map_seqs(tmp_path) == [0, 1]  # one date so far
    writer.write([scored_row(2)])
    writer.write([scored_row(3)])  # 12-02: the maps of 12-01 go
    writer.wait_map_deletions()
    assert map_seqs(tmp_path) == [3]
    ResultWriterCore(str(tmp_path), WriterSettings(batch_rows=1)).write([scored_row(4), scored_row(5)])
    assert map_seqs(tmp_path) == [3, 4, 5]  # a writer without maps_keep_days deletes none
    ResultWriterCore(str(tmp_path), WriterSettings(batch_rows=1, maps_keep_days=0)).wait_map_deletions()
    assert map_seqs(tmp_path) == [5]  # at its start: the maps of 12-02 go
