"""`query`, `lines` and `anomalies` against a result dataset, checked with pyarrow/numpy directly.

The dataset is the fixture from result_fixture.py, or the one named by $RARECLIP_TEST_RESULTS
(e.g. a table written by the demo): the assertions hold for any valid dataset.
"""
import csv
import datetime as dt
import io
import json
import os
import re
import threading
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from result_fixture import results_dir_under_test

import run_cluster
from actors.result_table import FILE_SCHEMA, RESULT_SCHEMA
from pipelines.query import query_table


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    return results_dir_under_test(tmp_path_factory)


@pytest.fixture(scope="module")
def direct(results_dir) -> dict:
    """The dataset read with pyarrow alone, as {line_id: {column: numpy array}}."""
    partitioning = ds.partitioning(pa.schema([("line_id", pa.string()), ("date", pa.string())]), flavor="hive")
    table = ds.dataset(results_dir, format="parquet", partitioning=partitioning).to_table()
    lines = {}
    for line in sorted(set(table.column("line_id").to_pylist())):
        rows = table.filter(ds.field("line_id") == line)
        lines[line] = {name: rows.column(name).to_numpy(zero_copy_only=False) for name in rows.column_names}
    assert lines, f"no rows under {results_dir}"
    return lines


def run(capsys, *argv) -> tuple:
    """run_cluster's exit code, stdout and stderr for `argv`."""
    code = run_cluster.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_json(capsys, *argv) -> list:
    code, out, err = run(capsys, *argv, "--format", "json")
    assert code == 0, err
    return json.loads(out)


def test_query_counts_rows_per_line(capsys, results_dir, direct):
    sql = "SELECT line_id, count(*) AS n FROM results GROUP BY line_id ORDER BY line_id"
    rows = run_json(capsys, "query", sql, "--results", results_dir)
    assert {r["line_id"]: r["n"] for r in rows} == {line: len(c["seq"]) for line, c in direct.items()}


def test_one_row_per_line_and_seq(results_dir):
    duplicates = query_table("SELECT line_id, seq FROM results GROUP BY ALL HAVING count(*) > 1", results_dir)
    assert duplicates.num_rows == 0


def test_results_view_has_the_schema_columns(results_dir, tmp_path):
    for directory in (results_dir, tmp_path):  # a dataset, and an empty directory
        described = query_table("DESCRIBE results", directory)
        assert described.column("column_name").to_pylist() == RESULT_SCHEMA.names
    assert query_table("SELECT count(*) AS n FROM results", tmp_path).column("n").to_pylist() == [0]


def test_lines_matches_direct_computation(capsys, results_dir, direct):
    summary = {r["line_id"]: r for r in run_json(capsys, "lines", "--results", results_dir)}
    assert sorted(summary) == sorted(direct)
    for line, c in direct.items():
        ok = c["status"] == "ok"
        anomalies = int(np.sum(c["is_anomaly"][ok].astype(bool)))
        scores = c["score"][ok].astype(float)
        latencies = c["latency_ms"][ok].astype(float)
        got = summary[line]
        assert (got["frames"], got["ok"], got["errors"]) == (len(ok), ok.sum(), np.sum(c["status"] == "error"))
        assert (got["anomalies"], got["last_seq"]) == (anomalies, c["seq"].max())
        assert got["anomaly_rate"] == pytest.approx(anomalies / ok.sum())
        expected = {
            "score_p05": np.percentile(scores, 5), "score_p50": np.percentile(scores, 50),
            "score_p95": np.percentile(scores, 95), "score_max": scores.max(),
            "latency_p50_ms": np.percentile(latencies, 50), "latency_p99_ms": np.percentile(latencies, 99),
        }
        assert {k: got[k] for k in expected} == pytest.approx(expected)


def test_anomalies_top_returns_highest_scores(capsys, results_dir, direct):
    line, c = next(iter(direct.items()))
    code, out, err = run(capsys, "anomalies", "--line", line, "--top", 5, "--results", results_dir, "--format", "csv")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    expected = np.sort(c["score"][c["status"] == "ok"].astype(float))[::-1][:5]
    assert [float(r["score"]) for r in rows] == pytest.approx(list(expected))
    assert {r["line_id"] for r in rows} == {line}


def test_anomalies_since_lists_flagged_frames(capsys, results_dir, direct):
    line, c = next(iter(direct.items()))
    since = np.sort(c["scored_time"])[len(c["seq"]) // 2].astype("datetime64[us]").item().isoformat()
    rows = run_json(capsys, "anomalies", "--line", line, "--since", since, "--results", results_dir)
    flagged = (c["status"] == "ok") & (c["is_anomaly"] == True) & (c["scored_time"] >= np.datetime64(since))
    assert sorted(r["seq"] for r in rows) == sorted(c["seq"][flagged])
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)


def test_table_format_is_aligned(capsys, results_dir, direct):
    code, out, _ = run(capsys, "lines", "--results", results_dir)
    header, rule, *body, footer = out.splitlines()
    assert code == 0 and len(body) == len(direct) and footer.startswith(f"({len(direct)} row")
    spans = [m.span() for m in re.finditer("-+", rule)]
    assert [header[a:b].strip() for a, b in spans][:3] == ["line_id", "frames", "ok"]
    for line in [header] + body:  # every cell lies within its column, columns separated by spaces
        padded = line.ljust(len(rule))
        assert all(padded[a:b].strip() and padded[a - 1 : a] in ("", " ") for a, b in spans), line


def test_bad_sql_exits_2_with_the_engines_message(capsys, results_dir):
    code, out, err = run(capsys, "query", "SELEC line_id FROM results", "--results", results_dir)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "syntax error" in err and "Traceback" not in err
    code, _, err = run(capsys, "query", "SELECT no_such_column FROM results", "--results", results_dir)
    assert code == 2 and "no_such_column" in err and err.count("\n") == 1


def test_missing_directory_and_unknown_line_are_named(capsys, tmp_path):
    missing = tmp_path / "nowhere"
    code, _, err = run(capsys, "lines", "--results", missing)
    assert code == 2 and err == (f"error: no result table at {missing}: check --out DIR (a job's output folder) or "
                                 "--results, or run a job there first\n")
    code, _, err = run(capsys, "anomalies", "--line", "nope", "--results", tmp_path)
    assert code == 2 and "'nope'" in err


def test_the_table_is_found_from_a_jobs_out_folder(capsys, results_dir, direct, tmp_path, monkeypatch):
    job = results_dir.parent  # the fixture's table is <job>/results, as every job writes it
    expected = {line: len(c["seq"]) for line, c in direct.items()}
    assert {r["line_id"]: r["frames"] for r in run_json(capsys, "lines", "--out", job)} == expected
    config = tmp_path / "job.yaml"
    config.write_text(f"source: {{kind: folder, root: x}}\nout: {job}\n")
    assert {r["line_id"]: r["frames"] for r in run_json(capsys, "lines", "--config", config)} == expected

    monkeypatch.chdir(tmp_path)  # no --out: ./out/results, else the one job folder under ./out
    code, _, err = run(capsys, "lines")
    assert code == 2 and "--out" in err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "demo").symlink_to(job)
    rows = run_json(capsys, "anomalies", "--line", sorted(direct)[0], "--top", "1")
    assert len(rows) == 1


BATCH = 7  # rows per file written by the background writer


def _write_batch(directory, index: int) -> None:
    """Write BATCH complete rows the way the ResultWriter does: a hidden temporary name, then rename."""
    now = dt.datetime.now(dt.timezone.utc)
    rows = [
        {"seq": index * BATCH + i, "uri": f"frame-{i}.png", "ingest_time": now, "scored_time": now,
         "latency_ms": 1.0, "score": 0.5, "is_anomaly": False, "threshold": 0.7, "status": "ok",
         "error": None, "model_id": "m", "map_uri": None}
        for i in range(BATCH)
    ]
    temporary = directory / f".tmp-{uuid.uuid4().hex}.parquet"
    with pq.ParquetWriter(temporary, FILE_SCHEMA) as writer:  # several row groups: a slower, partial file
        for start in range(0, BATCH, 3):
            writer.write_table(pa.Table.from_pylist(rows[start:start + 3], schema=FILE_SCHEMA))
    os.replace(temporary, directory / f"part-{index:05d}.parquet")


def test_queries_never_see_partial_files(tmp_path):
    directories = [tmp_path / "line_id=live" / f"date=2026-03-0{day}" for day in (1, 2)]
    for directory in directories:
        directory.mkdir(parents=True)
        (directory / ".tmp-stale.parquet").write_bytes(b"PAR1 half-written")
        (directory / "_partial.parquet").write_bytes(b"not parquet")
    stop, failures, written = threading.Event(), [], []

    def keep_writing():
        try:
            while not stop.is_set() and len(written) < 300:
                _write_batch(directories[len(written) % 2], len(written))
                written.append(1)
                stop.wait(0.005)
        except Exception as exc:  # surfaced by the assertion below
            failures.append(exc)

    writer = threading.Thread(target=keep_writing)
    writer.start()
    counts = []
    try:
        for _ in range(50):
            table = query_table(
                "SELECT count(*) AS n, count(*) FILTER (WHERE score IS NULL OR uri IS NULL OR scored_time IS NULL "
                "OR status IS NULL OR seq IS NULL OR line_id IS NULL OR date IS NULL) AS nulls FROM results",
                tmp_path,
            )
            n, nulls = table.column("n")[0].as_py(), table.column("nulls")[0].as_py()
            assert n % BATCH == 0 and nulls == 0
            counts.append(n)
    finally:
        stop.set()
        writer.join()
    assert not failures
    assert counts == sorted(counts) and counts[-1] > counts[0]
