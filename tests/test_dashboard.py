"""`dashboard`: its JSON against the table read directly, rows appearing while it runs, frame
images, and the real server answering on a free port of 127.0.0.1."""
import datetime as dt
import io
import json
import os
import shutil
import subprocess
import threading
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from result_fixture import write_results_fixture
from werkzeug.serving import make_server

from actors import result_table
from actors.result_table import EVENTS_FILE, FILE_SCHEMA, append_event, read_events, read_results, write_rows
from actors.table_compaction import CompactionSettings, compact_partition
from pipelines import dashboard
from pipelines.dashboard import LAST_ANOMALIES, TIMELINE_FRAMES, ResultFeed, create_app


@pytest.fixture
def results(tmp_path):
    return write_results_fixture(tmp_path)


def lines_json(client) -> dict:
    response = client.get("/api/lines")
    assert response.status_code == 200
    return response.get_json()["lines"]


def append_rows(results, line: str, seqs, score: float) -> None:
    """A new file of `line` dated today, written as the ResultWriter does (temporary name, rename)."""
    now = dt.datetime.now(dt.timezone.utc)
    rows = [{"seq": s, "uri": None, "ingest_time": now, "scored_time": now, "latency_ms": 1.0, "score": score,
             "is_anomaly": True, "threshold": 0.7, "status": "ok", "error": None, "model_id": "m", "map_uri": None}
            for s in seqs]
    directory = results / f"line_id={line}" / f"date={now.date().isoformat()}"
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=FILE_SCHEMA), directory / ".tmp-new.parquet")
    os.replace(directory / ".tmp-new.parquet", directory / f"part-{seqs[0]:010d}-new.parquet")


def test_every_line_with_its_counts_threshold_and_latest_frames(results):
    lines = lines_json(create_app(results).test_client())
    table = read_results(results).to_pylist()
    assert sorted(lines) == sorted({r["line_id"] for r in table})
    for line, view in lines.items():
        rows = sorted((r for r in table if r["line_id"] == line), key=lambda r: r["seq"])
        flagged = [r for r in rows if r["is_anomaly"]]
        assert view["frames"] == len(rows)
        assert view["errors"] == sum(r["status"] == "error" for r in rows)
        assert view["anomalies"] == len(flagged) and view["anomalies_today"] == 0  # the fixture's dates are past
        assert view["threshold"] == rows[-1]["threshold"]
        assert [f["seq"] for f in view["latest"]] == [r["seq"] for r in rows[::-1][:len(view["latest"])]]
        assert [f["seq"] for f in view["last_anomalies"]] == [r["seq"] for r in flagged[::-1][:LAST_ANOMALIES]]
        assert [p[0] for p in view["timeline"]] == [r["seq"] for r in rows]
        errors = [p[0] for p in view["timeline"] if p[4]]  # errors: their own strip, no score
        assert errors == [r["seq"] for r in rows if r["status"] == "error"]


def test_rows_written_while_it_runs_appear_and_count_today(results):
    app = create_app(results)
    client = app.test_client()
    before = lines_json(client)["cable"]
    append_rows(results, "cable", [40, 41, 42], score=0.9)
    after = lines_json(client)["cable"]
    assert after["frames"] == before["frames"] + 3
    assert after["anomalies_today"] == 3 and after["anomalies"] == before["anomalies"] + 3
    assert [f["seq"] for f in after["latest"][:3]] == [42, 41, 40]
    assert lines_json(client)["cable"]["frames"] == after["frames"]  # each file is read once


def test_a_merge_of_files_already_read_counts_no_row_twice(results):
    client = create_app(results).test_client()
    append_rows(results, "cable", [40, 41], score=0.9)
    before = lines_json(client)["cable"]
    append_rows(results, "cable", [42], score=0.9)  # not read yet, merged with the rest
    today = dt.datetime.now(dt.timezone.utc).date().isoformat()
    assert compact_partition(results, "cable", today, CompactionSettings(files=2)) == 2
    after = lines_json(client)["cable"]
    assert after["frames"] == before["frames"] + 1 and after["anomalies_today"] == 3
    assert [f["seq"] for f in after["latest"][:3]] == [42, 41, 40]


def test_files_merged_between_listing_and_reading_are_read_at_the_next_poll(results, monkeypatch):
    client = create_app(results).test_client()
    before = lines_json(client)["cable"]
    append_rows(results, "cable", [40], score=0.9)
    append_rows(results, "cable", [41], score=0.9)
    today = dt.datetime.now(dt.timezone.utc).date().isoformat()
    read = dashboard._read_fresh

    def merge_then_read(files, last_seqs):
        compact_partition(results, "cable", today, CompactionSettings(files=2))  # the listed files go
        return read(files, last_seqs)

    monkeypatch.setattr(dashboard, "_read_fresh", merge_then_read)
    assert lines_json(client)["cable"]["frames"] == before["frames"]  # nothing read this time
    monkeypatch.undo()
    assert lines_json(client)["cable"]["frames"] == before["frames"] + 2


def test_a_long_line_shows_its_newest_rows_and_counts_them_all(tmp_path):
    def write(seqs):
        rows = [{"line_id": "long", "seq": q, "status": "error" if q % 50 == 7 else "ok", "score": q / 10,
                 "is_anomaly": q % 9 == 0, "threshold": 1.0, "date": "2026-12-0" + str(1 + q // 400)} for q in seqs]
        for date in sorted({r["date"] for r in rows}):
            write_rows(tmp_path, "long", date, [r for r in rows if r["date"] == date])

    feed = ResultFeed(tmp_path)
    for chunk in range(5):
        write(range(chunk * 100, chunk * 100 + 100))
    feed.refresh()
    write(range(500, 700))
    compact_partition(tmp_path, "long", "2026-12-02", CompactionSettings(files=2))  # seqs 400-699: 100 already read
    feed.refresh()
    table = sorted(read_results(tmp_path).to_pylist(), key=lambda r: r["seq"])
    view = feed.view("2026-12-02")["long"]
    assert view["frames"] == 700 and view["errors"] == sum(r["status"] == "error" for r in table) == 14
    assert view["anomalies"] == sum(r["is_anomaly"] for r in table) == 78
    assert view["anomalies_today"] == sum(r["is_anomaly"] for r in table if r["date"] == "2026-12-02") == 33
    assert [t[0] for t in view["timeline"]] == list(range(700 - TIMELINE_FRAMES, 700))
    assert [f["seq"] for f in view["last_anomalies"]] == [q for q in range(699, -1, -1) if q % 9 == 0][:LAST_ANOMALIES]


def test_frame_images_full_size_and_thumbnail(results):
    client = create_app(results).test_client()
    row = next(r for r in read_results(results, line_id="bottle").to_pylist() if r["is_anomaly"])
    with Image.open(row["uri"]) as frame:
        size = frame.size
    full = client.get(f"/frame/bottle/{row['seq']}.png")
    assert full.status_code == 200 and full.mimetype == "image/png"
    assert Image.open(io.BytesIO(full.data)).size == size
    thumb = Image.open(io.BytesIO(client.get(f"/frame/bottle/{row['seq']}.png?size=thumb").data))
    assert thumb.width <= 240
    info = client.get(f"/api/frame/bottle/{row['seq']}").get_json()
    assert info["verdict"] == "anomaly" and info["file"] == os.path.basename(row["uri"]) and info["map_high"] > info["map_low"]
    assert client.get("/frame/bottle/9999.png").status_code == 404
    assert client.get("/frame/no-such-line/0.png").status_code == 404


def test_the_server_answers_on_a_free_local_port(results):
    server = make_server("127.0.0.1", 0, create_app(results), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        with urllib.request.urlopen(f"{base}/", timeout=10) as response:
            page = response.read().decode()
        assert 'id=lines' in page and 'id=modal' in page and "api/lines" in page
        with urllib.request.urlopen(f"{base}/api/lines", timeout=10) as response:
            assert sorted(json.loads(response.read())["lines"]) == ["bottle", "cable", "screw"]
    finally:
        server.shutdown()
        thread.join()


def test_the_dashboard_command_prints_its_address_and_no_line_per_request(results):
    import signal
    import sys
    import time

    from pipelines.nats_server import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "run_cluster.py", "dashboard", "--results", str(results), "--port", str(port)],
                            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                for path in ("/", "/api/lines", "/api/lines"):
                    urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10).read()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else "no answer"
                time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and out.startswith(f"dashboard of {results}: http://127.0.0.1:{port}/"), (out, err)
    assert "GET" not in out + err and "werkzeug" not in out + err, (out, err)


def test_a_busy_port_is_said_plainly_with_the_option_to_change(tmp_path, capsys):
    import socket

    import run_cluster

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert run_cluster.main(["dashboard", "--out", str(tmp_path / "typo"), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: cannot listen on 127.0.0.1:{port} (Address already in use); choose another --port\n", err


BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(BROWSER is None, reason="no headless browser installed (apt-get install chromium)")
def test_a_headless_browser_renders_every_line_with_its_elements(results, tmp_path):
    server = make_server("127.0.0.1", 0, create_app(results), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    shot = tmp_path / "dashboard.png"
    browser = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=8000",
               "--window-size=1400,1200", f"--user-data-dir={tmp_path / 'profile'}"]
    url = f"http://127.0.0.1:{server.port}/"
    try:
        dom = subprocess.run([*browser, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
        subprocess.run([*browser, f"--screenshot={shot}", url], capture_output=True, timeout=120)
    finally:
        server.shutdown()
        thread.join()
    for line in ("bottle", "cable", "screw"):  # the page as the script drew it from the JSON
        assert f'id="line-{line}"' in dom
    assert dom.count('class="timeline"') == 3 and "anomaly-dot" in dom and "error-tick" in dom
    assert 'class="flagged"' in dom and "size=thumb" in dom
    with Image.open(shot) as image:
        assert image.size == (1400, 1200)


def test_the_newest_job_events_come_with_the_lines_oldest_first(results):
    client = create_app(results).test_client()
    assert client.get("/api/lines").get_json()["events"] == []
    for i in range(dashboard.EVENTS_SHOWN + 3):
        append_event(results, "line restarts", f"line cable restarted, restored at seq {i}")
    with open(results / EVENTS_FILE, "a") as fh:
        fh.write('{"time": "2026-12-06T01:0')  # a line being written: left out until complete
    events = client.get("/api/lines").get_json()["events"]
    assert [e["text"][-2:].strip() for e in events] == [str(i) for i in range(3, dashboard.EVENTS_SHOWN + 3)]
    assert {e["kind"] for e in events} == {"line restarts"} and all(e["time"].endswith("+00:00") for e in events)


def test_the_event_log_is_read_from_its_end(tmp_path, monkeypatch):
    monkeypatch.setattr(result_table, "EVENTS_TAIL_BYTES", 200)  # a few records' worth
    for i in range(50):
        append_event(tmp_path, "notice", f"notice {i}")
    assert [e["text"] for e in read_events(tmp_path, 2)] == ["notice 48", "notice 49"]
    assert 0 < len(read_events(tmp_path, 50)) < 50  # only what the tail holds, no record cut in half


def test_before_any_row_the_page_is_empty_not_broken(tmp_path):
    client = create_app(tmp_path / "not-yet" / "results").test_client()
    assert lines_json(client) == {}
    assert client.get("/api/frame/a/0").status_code == 404 and client.get("/").status_code == 200


def test_an_event_the_disk_had_no_room_for_tears_no_line(tmp_path, monkeypatch):
    from rareclip_core.data import files

    append_event(tmp_path, "job", "started")
    real_write = os.write

    def half_then_full(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "write", half_then_full)
    with pytest.raises(OSError):
        append_event(tmp_path, "feed restarts", "ingest 0 failed")
    monkeypatch.setattr(files.os, "write", real_write)
    append_event(tmp_path, "job", "stopped")  # once there is room: whole, after the last whole line
    assert [e["text"] for e in read_events(tmp_path, 10)] == ["started", "stopped"]
