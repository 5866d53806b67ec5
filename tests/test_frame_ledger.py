"""The ledger of each line's frames: a frame's seq is given once and kept, in files of which a
restart reads only the newest, and a watched folder's ledger remembers a bounded window of
frames without ever taking a file twice."""
import logging
import os
from pathlib import Path

import pytest

from rareclip_core.data import files, sources
from rareclip_core.data.sources import FolderSource, FrameLedger, ManifestSource, Source


class Clock:
    """Stands in for the `time` module of `sources`: ingestion's clock, set by the test."""

    def __init__(self, now: float):
        self.now = now

    def time(self) -> float:
        return self.now


def names(frames) -> list[str]:
    return [Path(ref.uri).name for ref in frames]


def test_seqs_are_kept_whatever_later_listings_say(tmp_path):
    ledger = FrameLedger(tmp_path / "l", "l")
    assert ledger.extend(["IMG_9998.png", "IMG_9999.png"]) == 2
    # a name that sorts first (IMG_10000 < IMG_9998), and one file listed twice by a manifest
    assert ledger.extend(["IMG_10000.png", "IMG_9998.png", "IMG_9999.png", "x.png", "x.png"]) == 3
    assert ledger.uris_from(0) == ["IMG_9998.png", "IMG_9999.png", "IMG_10000.png", "x.png", "x.png"]
    again = FrameLedger(tmp_path / "l", "l")  # what a restarted ingest reads
    assert again.uris_from(0) == ledger.uris_from(0) and again.extend(ledger.uris_from(0)) == 0
    # the ledger folder is a manifest: replaying it gives the same frames with the same seqs
    manifest = Source(ManifestSource(str(tmp_path)))
    assert [(r.seq, r.uri) for r in manifest.frames("l")] == list(enumerate(ledger.uris_from(0)))


def test_the_ledger_is_written_in_files_of_fixed_rows_and_reads_back_any_seq(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "LEDGER_SEGMENT_ROWS", 3)
    ledger = FrameLedger(tmp_path / "l", "l")
    ledger.extend(["a", "b"])
    ledger.extend(["a", "b", "c", "d", "e", "f", "g"])  # fills the first file, then two more
    files = sorted((tmp_path / "l").iterdir())
    assert [f.name for f in files] == ["000000000000.csv", "000000000003.csv", "000000000006.csv"]
    assert [len(f.read_text().splitlines()) - 1 for f in files] == [3, 3, 1]
    again = FrameLedger(tmp_path / "l", "l")
    assert len(again) == 7 and again.uris_from(5) == ["f", "g"] and again.uris_from(0) == list("abcdefg")
    manifest = Source(ManifestSource(str(tmp_path)))
    assert [(r.seq, r.uri) for r in manifest.frames("l")] == list(enumerate("abcdefg"))


def test_a_watched_lines_ledger_forgets_frames_recorded_long_before_its_newest(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "LEDGER_SEGMENT_ROWS", 2)
    clock = Clock(1000.0)
    monkeypatch.setattr(sources, "time", clock)
    ledger = FrameLedger(tmp_path / "l", "l", remember_s=200)
    assert ledger.newest_taken_at is None
    ledger.extend(["a", "b"])  # file 0, recorded at 1000
    clock.now = 1150.0
    ledger.extend(["a", "b", "c", "d"])  # file 2, at 1150: file 0 is 150 s older, within 200
    assert ledger.newest_taken_at == 1150.0 and set(ledger.recorded) == {"a", "b", "c", "d"}
    clock.now = 1250.0
    ledger.extend(["c", "d", "e"])  # file 4, at 1250: file 0 (1000 < 1250 - 200) is forgotten
    assert [s.first_seq for s in ledger.segments] == [2, 4] and set(ledger.recorded) == {"c", "d", "e"}
    assert ledger.uris_from(1) == list("bcde")  # forgotten seqs are read back from the files
    again = FrameLedger(tmp_path / "l", "l", remember_s=200)  # a restart reads what it remembers
    assert [s.first_seq for s in again.segments] == [2, 4] and again.newest_taken_at == 1250.0 and len(again) == 5
    assert [s.first_seq for s in FrameLedger(tmp_path / "l", "l", remember_s=0).segments] == [4]  # the newest only
    assert [s.first_seq for s in FrameLedger(tmp_path / "l", "l").segments] == [0, 2, 4]  # every file


def test_a_watched_folder_takes_each_file_once_while_its_ledger_forgets(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(sources, "LEDGER_SEGMENT_ROWS", 1)
    clock = Clock(10_000.0)
    monkeypatch.setattr(sources, "time", clock)
    folder = tmp_path / "src" / "l"
    folder.mkdir(parents=True)

    def put(name: str, modified: float) -> None:
        (folder / name).write_bytes(b"")
        os.utime(folder / name, (modified, modified))

    def start() -> Source:
        return Source(FolderSource(str(tmp_path / "src"), live=True, max_file_age_s=100), str(tmp_path / "ledger"))

    put("f0", 9_990.0)
    live = start()
    assert names(live.frames("l")) == ["f0"]  # recorded at 10,000
    clock.now = 10_300.0
    put("f1", 10_290.0)
    assert names(live.frames("l", 1)) == ["f1"]  # and f0, recorded 300 s before f1, is forgotten
    assert "f0" not in {Path(uri).name for uri in live._ledgers["l"].recorded}
    put("late", 10_150.0)  # appears modified 150 s before the newest frame: left out, and said
    with caplog.at_level(logging.WARNING, logger=sources.__name__):
        assert names(live.frames("l", 2)) == []  # f0, still in the folder, is not taken again
        assert "late" in caplog.text and "max_file_age_s" in caplog.text
        caplog.clear()
        assert names(live.frames("l", 2)) == [] and caplog.text == ""  # said once
    restarted = start()
    assert [(r.seq, Path(r.uri).name) for r in restarted.frames("l")] == [(0, "f0"), (1, "f1")]
    clock.now = 10_400.0
    put("f2", 10_395.0)
    assert [(r.seq, Path(r.uri).name) for r in restarted.frames("l", 2)] == [(2, "f2")]


def test_a_row_cut_short_by_a_crash_is_dropped_and_a_damaged_ledger_is_named(tmp_path):
    FrameLedger(tmp_path / "l", "l").extend(["a", "b"])
    file = tmp_path / "l" / "000000000000.csv"
    with file.open("a") as fh:
        fh.write("l,2,/half/writ")  # the crash came before the fsync: this frame was never fed
    again = FrameLedger(tmp_path / "l", "l")
    assert again.uris_from(0) == ["a", "b"] and again.extend(["a", "b", "c"]) == 1
    assert FrameLedger(tmp_path / "l", "l").uris_from(0) == ["a", "b", "c"]
    file.write_text(file.read_text().replace("l,1,b", "l,7,b"))
    with pytest.raises(ValueError, match=r"000000000000\.csv: row 2 has seq 7, expected 1"):
        FrameLedger(tmp_path / "l", "l")


def test_an_append_that_fails_on_a_full_disk_leaves_the_file_as_it_was_and_the_retry_appends_whole_rows(
        tmp_path, monkeypatch):
    ledger = FrameLedger(tmp_path / "l", "l")
    ledger.extend(["a.png", "b.png"])
    [file] = (tmp_path / "l").iterdir()
    before = file.read_bytes()
    real_write = os.write

    def half_then_full(fd, data):  # the disk fills part way through the rows
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "write", half_then_full)
    with pytest.raises(OSError, match="No space left"):
        ledger.extend(["c.png", "d.png", "e.png"])
    assert file.read_bytes() == before  # no part of a row stays
    monkeypatch.setattr(files.os, "write", real_write)
    assert ledger.extend(["c.png", "d.png", "e.png"]) == 3  # what ingestion retries
    assert FrameLedger(tmp_path / "l", "l").uris_from(0) == ["a.png", "b.png", "c.png", "d.png", "e.png"]


def test_a_ledger_written_as_one_file_per_line_is_read_on(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "LEDGER_SEGMENT_ROWS", 2)
    (tmp_path / "l.csv").write_text("line_id,seq,uri\nl,0,a\nl,1,b\nl,2,c\n")  # the layout before ledger files
    ledger = FrameLedger(tmp_path / "l", "l", remember_s=200)
    assert ledger.uris_from(0) == ["a", "b", "c"] and not (tmp_path / "l.csv").exists()
    assert ledger.extend(["a", "b", "c", "d", "e"]) == 2
    assert sorted(f.name for f in (tmp_path / "l").iterdir()) == ["000000000000.csv", "000000000002.csv", "000000000004.csv"]
    assert FrameLedger(tmp_path / "l", "l").uris_from(1) == ["b", "c", "d", "e"]


def test_a_line_fed_by_another_ingestion_actor_meanwhile_is_read_again_after_forget(tmp_path):
    # a line that left one ingestion actor and rejoined on another, then came back to the first
    line = tmp_path / "src" / "a"
    line.mkdir(parents=True)
    (line / "1.png").write_bytes(b"x")
    first, second = (Source(FolderSource(str(tmp_path / "src"), live=True), str(tmp_path / "ledger")) for _ in range(2))
    assert names(first.frames("a")) == ["1.png"]
    (line / "0.png").write_bytes(b"x")
    assert names(second.frames("a")) == ["1.png", "0.png"]  # the other actor recorded 0.png as seq 1
    (line / "2.png").write_bytes(b"x")
    first.forget("a")
    assert [(ref.seq, Path(ref.uri).name) for ref in first.frames("a")] == [(0, "1.png"), (1, "0.png"), (2, "2.png")]
    assert names(Source(ManifestSource(str(tmp_path / "ledger"))).frames("a")) == ["1.png", "0.png", "2.png"]
