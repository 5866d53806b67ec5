"""`report`: the page, its PNG files, and the stored maps overlaid on the frames they belong to.

Uses the fixture from result_fixture.py, or the dataset named by $RARECLIP_TEST_RESULTS.
"""
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from result_fixture import results_dir_under_test, write_results_fixture

import run_cluster
from actors.result_table import MapUnavailable, read_map
from pipelines.query import lines_summary, query_table, top_anomalies
from pipelines.report import map_view, overlay_map


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    return results_dir_under_test(tmp_path_factory)


def write_report(results_dir, line, out, top=8) -> str:
    """Run `report` through run_cluster; return the page's HTML."""
    argv = ["report", "--line", line, "--report-dir", str(out), "--results", str(results_dir), "--top", str(top)]
    assert run_cluster.main(argv) == 0
    return (Path(out) / "index.html").read_text(encoding="utf-8")


def referenced_files(page: str) -> list:
    return re.findall(r'(?:src|href)="([^"]+)"', page)


def test_report_files_exist_and_overlays_have_frame_size(results_dir, tmp_path):
    summary = lines_summary(results_dir).to_pylist()
    line = max(summary, key=lambda r: r["ok"])["line_id"]
    page = write_report(results_dir, line, tmp_path)

    references = referenced_files(page)
    assert {"timeline.png", "histogram.png"} <= set(references)
    assert all((tmp_path / name).is_file() for name in references), references
    frame_pngs = {p.name for p in tmp_path.glob("frame-*.png")}
    assert frame_pngs <= set(references)

    top = top_anomalies(results_dir, line, top=8).to_pylist()
    with_image = [row for row in top if row["uri"] and os.path.isfile(row["uri"])]
    assert len(frame_pngs) == len(with_image)
    for row in with_image:
        with Image.open(tmp_path / f"frame-{row['seq']}.png") as overlay, Image.open(row["uri"]) as frame:
            assert overlay.size == frame.size


def test_report_lists_error_rows(results_dir, tmp_path):
    summary = max(lines_summary(results_dir).to_pylist(), key=lambda r: r["errors"])
    page = write_report(results_dir, summary["line_id"], tmp_path, top=1)
    assert f"Errors ({summary['errors']})" in page or f"of {summary['errors']})" in page
    errors = query_table(
        "SELECT uri FROM results WHERE line_id = $line AND status = 'error'", results_dir, {"line": summary["line_id"]}
    ).column("uri").to_pylist()
    assert all(os.path.basename(uri) in page for uri in errors if uri)  # the file of each error row is named


def test_missing_frame_or_map_gives_a_note(tmp_path):
    results = write_results_fixture(tmp_path / "data")
    first, second, third = top_anomalies(results, "cable", top=3).to_pylist()
    os.remove(first["uri"])
    os.remove(results / second["map_uri"])
    page = write_report(results, "cable", tmp_path / "report", top=3)

    assert "frame image not found" in page and "anomaly map file not found" in page
    assert not (tmp_path / "report" / f"frame-{first['seq']}.png").exists()
    for row in (second, third):  # the bare frame, and the overlay: both at the frame's size
        with Image.open(tmp_path / "report" / f"frame-{row['seq']}.png") as shown, Image.open(row["uri"]) as frame:
            assert shown.size == frame.size
    assert all((tmp_path / "report" / name).is_file() for name in referenced_files(page))


def test_overlay_covers_only_the_centre_square():
    frame = Image.new("RGB", (160, 120), (128, 128, 128))
    anomaly_map = np.zeros((64, 64), dtype=np.float16)
    anomaly_map[:16, :16] = 1.0  # hot top-left corner of the square

    overlay = np.asarray(overlay_map(frame, anomaly_map, (0.0, 1.0))).astype(int)

    assert overlay.shape == (120, 160, 3)
    assert (overlay[:, :20] == 128).all() and (overlay[:, 140:] == 128).all()  # outside the square: untouched
    hot, cold = overlay[10, 30], overlay[100, 120]  # inside: the corner is red, the rest blue
    assert hot[0] > hot[2] and cold[2] > cold[0]
    # a squashed-input kind's map covers the whole frame: its hot corner is the frame's
    assert map_view("adaptclip:ViT-L-14-336:openai:0123") == "squash" and map_view("rareclip:x") == "center_crop"
    squashed = np.asarray(overlay_map(frame, anomaly_map, (0.0, 1.0), "squash")).astype(int)
    assert squashed[5, 5, 0] > squashed[5, 5, 2] and squashed[5, 150, 2] > squashed[5, 150, 0]


def test_unknown_line_exits_2(results_dir, tmp_path, capsys):
    code = run_cluster.main(["report", "--line", "no-such-line", "--report-dir", str(tmp_path), "--results", str(results_dir)])
    assert code == 2 and "no-such-line" in capsys.readouterr().err


def test_a_report_folder_that_cannot_be_made_is_named_with_the_option(results_dir, tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    line = lines_summary(results_dir).column("line_id")[0].as_py()
    code = run_cluster.main(["report", "--line", str(line), "--report-dir", str(tmp_path / "a-file" / "rep"), "--results", str(results_dir)])
    assert code == 2
    assert capsys.readouterr().err == (f"error: cannot make the report folder {tmp_path / 'a-file' / 'rep'} (Not a directory); "
                                       "give another --report-dir\n")


def test_a_stored_map_is_read_back_or_its_absence_named(tmp_path):
    np.save(tmp_path / "good.npy", np.arange(6, dtype=np.float16).reshape(2, 3))
    np.save(tmp_path / "flat.npy", np.zeros(4, dtype=np.float16))
    assert read_map(tmp_path, "good.npy").tolist() == [[0, 1, 2], [3, 4, 5]]
    for uri, reason in [(None, "no anomaly map stored for this frame"), ("gone.npy", "anomaly map file not found"),
                        ("flat.npy", "anomaly map has shape (4,), expected a 2-D array")]:
        with pytest.raises(MapUnavailable, match=re.escape(reason)):
            read_map(tmp_path, uri)


def test_frames_without_a_verdict_are_shown_as_not_judged(tmp_path):
    """A line without a threshold (or still calibrating one) has no verdicts: its frames are
    neither anomalous nor normal."""
    from actors.writer import ResultWriterCore

    frame = tmp_path / "f.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(frame)
    writer = ResultWriterCore(str(tmp_path / "results"))
    writer.write([{"line_id": "fresh", "seq": s, "uri": str(frame), "status": "ok", "score": float(s), "threshold": None,
                   "is_anomaly": None, "date": "2026-12-07", "anomaly_map": np.zeros((8, 8), np.float16)} for s in range(3)])
    writer.flush()
    page = write_report(tmp_path / "results", "fresh", tmp_path / "report", top=3)
    assert page.count(">not judged<") == 3 and ">normal<" not in page and ">anomaly<" not in page
