"""`query`: run SQL (DuckDB) over the result dataset, where the view `results` is the whole table.

Also holds what `lines`, `anomalies` and `report` are built on: `lines_summary`,
`top_anomalies`, and the table/CSV/JSON output formatting shared by those commands.
"""
import csv
import datetime as dt
import decimal
import glob
import io
import json
import math
import os
import sys
from pathlib import Path

import duckdb
import pyarrow as pa

from actors.result_table import RESULT_SCHEMA, STATUS_ERROR, STATUS_OK, VISIBLE_PARQUET, read_through_merges
from configs.loading import load_pipeline_config
from rareclip_core.config import ConfigError

DEFAULT_OUT = "out"  # the pipeline config's default `out`
FORMATS = ("table", "csv", "json")
TOP_COLUMNS = "line_id, seq, date, scored_time, score, threshold, is_anomaly, uri, map_uri"


class QueryError(Exception):
    """The engine rejected a query (message: the engine's, on one line), or the line is unknown."""


def query_table(sql: str, results_dir, params=None, tables=None) -> pa.Table:
    """Run `sql` (DuckDB dialect, `$name` or `?` parameters) where `results` is the dataset and
    each of `tables` ({name: Arrow table}) a view of that name."""

    def run() -> pa.Table:
        connection = _connect(str(results_dir))  # DuckDB 2 reads a file's schema here already
        try:
            for name, table in (tables or {}).items():
                connection.register(name, table)
            relation = connection.sql(sql, params=params)
            return pa.table({}) if relation is None else relation.to_arrow_table()
        finally:
            connection.close()

    try:
        return read_through_merges(run, duckdb.IOException)
    except duckdb.Error as exc:
        raise QueryError(_one_line(exc)) from None


def lines_summary(results_dir) -> pa.Table:
    """One row per line: counts, anomaly rate over ok frames, score and latency percentiles of ok frames."""
    ok = f"status = '{STATUS_OK}'"
    return query_table(
        f"""
        SELECT line_id,
               count(*) AS frames,
               count(*) FILTER ({ok}) AS ok,
               count(*) FILTER (status = '{STATUS_ERROR}') AS errors,
               count(*) FILTER ({ok} AND is_anomaly) AS anomalies,
               anomalies / nullif(ok, 0) AS anomaly_rate,
               max(seq) AS last_seq,
               quantile_cont(score, 0.05) FILTER ({ok}) AS score_p05,
               quantile_cont(score, 0.50) FILTER ({ok}) AS score_p50,
               quantile_cont(score, 0.95) FILTER ({ok}) AS score_p95,
               max(score) FILTER ({ok}) AS score_max,
               quantile_cont(latency_ms, 0.50) FILTER ({ok}) AS latency_p50_ms,
               quantile_cont(latency_ms, 0.99) FILTER ({ok}) AS latency_p99_ms
        FROM results
        GROUP BY line_id
        ORDER BY line_id
        """,
        results_dir,
    )


def top_anomalies(results_dir, line: str, since=None, top=None) -> pa.Table:
    """Ok frames of `line` flagged anomalous (or, with `top`, the `top` highest scores), by score desc.

    `since` (ISO string or datetime; naive means UTC) keeps frames scored at or after it.
    Raises QueryError when the dataset has no row of `line`.
    """
    conditions = ["line_id = $line", f"status = '{STATUS_OK}'"]
    params = {"line": line}
    if since is not None:
        conditions.append("scored_time >= $since")
        params["since"] = iso_time(since) if isinstance(since, str) else since
    if top is None:
        conditions.append("is_anomaly")
    else:
        params["top"] = int(top)
    table = query_table(
        f"SELECT {TOP_COLUMNS} FROM results WHERE {' AND '.join(conditions)} "
        f"ORDER BY score DESC, seq{'' if top is None else ' LIMIT $top'}",
        results_dir,
        params,
    )
    if table.num_rows == 0:
        require_line(results_dir, line)
    return table


def require_line(results_dir, line) -> None:
    """Raise QueryError naming the lines present when the dataset has no row of `line`."""
    present = query_table("SELECT DISTINCT line_id FROM results ORDER BY line_id", results_dir)
    names = present.column("line_id").to_pylist()
    if line not in names:
        raise QueryError(f"no rows of line {line!r} in {str(results_dir)!r} (lines: {', '.join(names) or 'none'})")


def iso_time(text: str) -> dt.datetime:
    """Parse an ISO 8601 date or time; one without a zone is UTC."""
    value = dt.datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def format_table(table: pa.Table, fmt: str) -> str:
    """`table` as aligned text ('table'), CSV ('csv') or a JSON array of objects ('json')."""
    names = table.column_names
    columns = [table.column(i).to_pylist() for i in range(table.num_columns)]
    rows = list(zip(*columns))
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(names)
        writer.writerows([_csv_cell(value) for value in row] for row in rows)
        return out.getvalue()
    if fmt == "json":
        records = [json.dumps(dict(zip(names, map(_json_value, row)))) for row in rows]
        return "[\n" + ",\n".join(records) + ("\n]\n" if records else "]\n")
    return _text_table(table, names, rows)


def add_results_arguments(parser) -> None:
    """Where the result table is: a job's `--out` (as every job takes it), a pipeline `--config`
    (its `out`), or the table folder itself (`--results`)."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", help="a job's output folder; the table is <out>/results (default: ./out, "
                                     "or the one job folder under it, e.g. out/demo)")
    where.add_argument("--config", help="a pipeline YAML: the table of its `out`")
    where.add_argument("--results", help="the result table folder itself")


def add_output_arguments(parser) -> None:
    """Where the table is, and --format: the options every query command takes."""
    add_results_arguments(parser)
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format (default: %(default)s)")


def results_dir_of(args) -> Path:
    """The result table folder `args` name (see `add_results_arguments`). With none named:
    ./out/results, else the only `out/*/results` there (said on stderr); else FileNotFoundError
    naming the options."""
    if args.results:
        return Path(args.results)
    if args.out:
        return Path(args.out) / "results"
    if args.config:
        return load_pipeline_config(args.config).results_dir
    default = Path(DEFAULT_OUT) / "results"
    if default.is_dir():
        return default
    found = sorted(Path(DEFAULT_OUT).glob("*/results"))
    if len(found) == 1:
        print(f"reading {found[0]} (the one job folder under {DEFAULT_OUT}/; --out DIR names another)", file=sys.stderr)
        return found[0]
    choices = f" (job folders here: {', '.join(str(f.parent) for f in found)})" if found else ""
    raise FileNotFoundError(f"no result table at {default}: pass --out DIR, a job's output folder{choices}")


def print_result(produce, fmt: str) -> int:
    """Print the table `produce()` returns; on a query error print one line to stderr and return 2."""
    try:
        table = produce()
    except (QueryError, FileNotFoundError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(format_table(table, fmt))
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("sql", help="SQL over the view `results`, e.g. 'SELECT line_id, count(*) FROM results GROUP BY 1'")
    add_output_arguments(parser)


def main(args) -> int:
    return print_result(lambda: query_table(args.sql, results_dir_of(args)), args.format)


def _connect(results_dir: str) -> duckdb.DuckDBPyConnection:
    """A fresh in-memory connection (time zone UTC) with the view `results` over `results_dir`."""
    if not os.path.isdir(results_dir):
        raise FileNotFoundError(f"no result table at {results_dir}: check --out DIR (a job's output folder) or --results, "
                                "or run a job there first")
    connection = duckdb.connect()
    connection.execute("SET TimeZone = 'UTC'")
    if glob.glob(os.path.join(glob.escape(results_dir), VISIBLE_PARQUET)):
        pattern = os.path.join(results_dir, VISIBLE_PARQUET).replace("'", "''")
        columns = ", ".join(RESULT_SCHEMA.names)
        connection.execute(
            f"CREATE VIEW results AS SELECT {columns} FROM read_parquet('{pattern}', hive_partitioning = true, "
            "hive_types = {'line_id': VARCHAR, 'date': VARCHAR})"
        )
    else:  # no complete file yet: an empty view with the dataset's columns
        connection.register("results", RESULT_SCHEMA.empty_table())
    return connection


def _one_line(exc: Exception) -> str:
    """The engine's message without its indented details and 'LINE n: ^^^' pointer."""
    kept = []
    for line in str(exc).splitlines():
        if not line.strip():
            break
        if not line[0].isspace():
            kept.append(line.strip())
    return " ".join(kept) or type(exc).__name__


def _text_table(table: pa.Table, names: list, rows: list) -> str:
    """Aligned columns under a header; numbers right-aligned; NULL for missing values."""
    numeric = [
        pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t) for t in table.schema.types
    ]
    cells = [[_text_cell(value) for value in row] for row in rows]
    widths = [max([len(name)] + [len(row[i]) for row in cells]) for i, name in enumerate(names)]

    def render(values):
        return "  ".join(v.rjust(w) if right else v.ljust(w) for v, w, right in zip(values, widths, numeric)).rstrip()

    lines = [render(names), render(["-" * w for w in widths])] if names else []
    lines += [render(row) for row in cells]
    lines.append(f"({len(rows)} row{'' if len(rows) == 1 else 's'})")
    return "\n".join(lines) + "\n"


def _text_cell(value) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dt.datetime):
        return value.isoformat(sep=" ", timespec="milliseconds")
    return str(value)


def _csv_cell(value):
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    return value


def _json_value(value):
    """`value` as a JSON-ready Python value (times ISO, non-finite floats null, decimals numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list):
        return [_json_value(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _json_value(item) for key, item in value.items()}
    return value
