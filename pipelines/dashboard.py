"""`dashboard`: a local web page of every line, refreshed as rows land.

Above the lines, the newest entries of the jobs' event log (restarts, notices). Per line: its
latest frames with score and verdict, a score timeline with the threshold (error
rows in a strip below), anomalies today, errors, and its last anomalies as thumbnails with their
stored heat map; a click shows a frame full size (`#frame=<line>/<seq>` links to it). The page asks for `/api/lines` every few
seconds; each request first reads the result files that appeared since the last one (files are
written atomically and never change, so each is read once), so it works while a job writes and
after it ends. Served by Flask on 127.0.0.1 by default.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import glob
import html
import io
import json
import os
import sys
import threading
from collections import Counter, deque
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
from flask import Flask, Response, abort, jsonify, request
from PIL import Image

from actors.result_table import STATUS_ERROR, STATUS_OK, VISIBLE_PARQUET, MapUnavailable, read_events, read_map
from pipelines import page_style as style
from pipelines.common import port_number
from pipelines import query
from pipelines.report import overlay_map
from rareclip_core.config import ConfigError
from rareclip_core.data.frames import viewable_rgb

TIMELINE_FRAMES = 300  # frames of a line's timeline (its latest)
LATEST_FRAMES = 8  # rows of a line's "latest frames" table
LAST_ANOMALIES = 6  # thumbnails per line
THUMB_WIDTH = 240
REFRESH_S = 2.0  # how often the page asks for new rows
EVENTS_SHOWN = 8  # the newest entries of the jobs' event log (restarts, notices) above the lines
COLUMNS = ("seq", "uri", "scored_time", "score", "is_anomaly", "threshold", "status", "error", "map_uri")


@dataclass
class FreshRows:
    """One line's rows that the feed had not read: counts per date, and of its rows only those
    the page shows (the newest TIMELINE_FRAMES, the newest LAST_ANOMALIES anomalies), in seq order."""

    counts: list[dict] = field(default_factory=list)  # {date, frames, errors, anomalies, last_seq}
    recent: list[dict] = field(default_factory=list)
    anomalies: list[dict] = field(default_factory=list)


class LineFeed:
    """What the page shows of one line: counts over all its rows, its latest rows and last anomalies."""

    def __init__(self):
        self.last_seq = -1
        self.frames = 0
        self.errors = 0
        self.anomalies_by_date: Counter = Counter()
        self.recent: deque = deque(maxlen=TIMELINE_FRAMES)
        self.anomalies: deque = deque(maxlen=LAST_ANOMALIES)

    def add(self, fresh: FreshRows) -> None:
        """What the line's new rows (those past `last_seq`) change."""
        for count in fresh.counts:
            self.frames += count["frames"]
            self.errors += count["errors"]
            self.anomalies_by_date[count["date"]] += count["anomalies"]
            self.last_seq = max(self.last_seq, count["last_seq"])
        self.recent.extend(fresh.recent)
        self.anomalies.extend(fresh.anomalies)

    def view(self, today: str) -> dict:
        """The line as the page's JSON."""
        rows = list(self.recent)
        thresholds = [r["threshold"] for r in rows if r["threshold"] is not None]
        last = rows[-1] if rows else None
        return {
            "frames": self.frames,
            "errors": self.errors,
            "anomalies_today": self.anomalies_by_date[today],
            "anomalies": sum(self.anomalies_by_date.values()),
            "threshold": thresholds[-1] if thresholds else None,
            "last_seq": last["seq"] if last else None,
            "last_scored": style.utc_time(last["scored_time"]) if last else None,
            "timeline": [[r["seq"], r["score"], r["threshold"], r["is_anomaly"], r["status"] == STATUS_ERROR] for r in rows],
            "latest": [_frame_json(r) for r in rows[-LATEST_FRAMES:][::-1]],
            "last_anomalies": [_frame_json(r) for r in list(self.anomalies)[::-1]],
        }


class ResultFeed:
    """The result table, read incrementally: each complete Parquet file once, and of it only the
    rows past each line's last seq read (a file that merges files already read,
    `table_compaction`, is new, but its rows are not). Rows are counted by DuckDB; only those
    the page shows become Python rows, so a table of months opens in seconds."""

    def __init__(self, results_dir):
        self.results_dir = Path(results_dir)
        self.read_files: set[str] = set()
        self.lines: dict[str, LineFeed] = {}
        self.lock = threading.Lock()

    def refresh(self) -> int:
        """Read the files that appeared since the last call; returns how many."""
        with self.lock:
            listed = glob.glob(os.path.join(glob.escape(str(self.results_dir)), VISIBLE_PARQUET))
            new = [f for f in listed if f not in self.read_files]
            if not new:
                return 0
            try:
                fresh = _read_fresh(new, {line: feed.last_seq for line, feed in self.lines.items()})
            except duckdb.IOException:  # a merge swapped a partition since the listing: next time
                return 0
            for line in sorted(fresh):
                self.lines.setdefault(line, LineFeed()).add(fresh[line])
            self.read_files = set(listed)
            return len(new)

    def view(self, today: str) -> dict:
        with self.lock:
            return {line: self.lines[line].view(today) for line in sorted(self.lines)}

    def frame_row(self, line: str, seq: int):
        """The row of (line, seq), or None: from the rows the page shows, else from the table."""
        with self.lock:
            feed = self.lines.get(line)
            shown = [r for r in (*feed.recent, *feed.anomalies) if r["seq"] == seq] if feed else []
        if shown:
            return shown[0]
        try:
            rows = query.query_table(
                f"SELECT {', '.join(COLUMNS)} FROM results WHERE line_id = $line AND seq = $seq",
                self.results_dir,
                {"line": line, "seq": seq},
            ).to_pylist()
        except FileNotFoundError:  # no table yet: a job about to start
            return None
        return rows[0] if rows else None


def create_app(results_dir) -> Flask:
    """The dashboard's web app over the result table at `results_dir`."""
    feed = ResultFeed(results_dir)
    app = Flask(__name__)

    @app.get("/")
    def page():
        return Response(_page(str(results_dir)), mimetype="text/html")

    @app.get("/api/lines")
    def lines():
        feed.refresh()
        now = dt.datetime.now(dt.timezone.utc)
        return jsonify({"updated": style.utc_time(now), "lines": feed.view(now.date().isoformat()),
                        "events": read_events(results_dir, EVENTS_SHOWN)})

    @app.get("/api/frame/<line>/<int:seq>")
    def frame_info(line: str, seq: int):
        row = feed.frame_row(line, seq) or abort(404)
        anomaly_map = _load_map(Path(results_dir), row["map_uri"])
        scale = _map_scale(anomaly_map) if anomaly_map is not None else None
        return jsonify({**_frame_json(row), "line_id": line, "map_low": scale and scale[0], "map_high": scale and scale[1]})

    @app.get("/frame/<line>/<int:seq>.png")
    def frame_png(line: str, seq: int):
        data = _render(str(results_dir), line, seq, request.args.get("size") == "thumb", feed)
        if not data:
            abort(404)
        return Response(data, mimetype="image/png", headers={"Cache-Control": "max-age=86400"})  # rows never change

    return app


@lru_cache(maxsize=512)
def _render_cached(results_dir: str, line: str, seq: int, thumb: bool, uri: str, map_uri) -> bytes:
    with Image.open(uri) as frame:
        frame.load()
    anomaly_map = _load_map(Path(results_dir), map_uri)
    shown = overlay_map(frame, anomaly_map, _map_scale(anomaly_map)) if anomaly_map is not None else viewable_rgb(frame)
    if thumb and shown.width > THUMB_WIDTH:
        shown = shown.resize((THUMB_WIDTH, round(shown.height * THUMB_WIDTH / shown.width)), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    shown.save(out, format="PNG")
    return out.getvalue()


def _render(results_dir: str, line: str, seq: int, thumb: bool, feed: ResultFeed):
    """The frame of (line, seq) with its heat map (its own range), as PNG bytes; None when the
    row or its image is missing. Rows never change, so renderings are cached."""
    row = feed.frame_row(line, seq)
    if row is None or not row["uri"]:
        return None
    try:
        return _render_cached(results_dir, line, seq, thumb, row["uri"], row["map_uri"])
    except (OSError, ValueError):
        return None


def _load_map(results_dir: Path, map_uri) -> np.ndarray | None:
    """The row's map, or None: the frame is then shown without one."""
    try:
        return read_map(results_dir, map_uri)
    except MapUnavailable:
        return None


def _map_scale(anomaly_map: np.ndarray) -> tuple[float, float]:
    return float(np.nanmin(anomaly_map)), float(np.nanmax(anomaly_map))


def _read_fresh(files: list[str], last_seqs: dict[str, int]) -> dict[str, FreshRows]:
    """Per line, what `files` (complete Parquet files of the table) hold past its `last_seqs` seq."""
    connection = duckdb.connect()
    try:
        connection.execute("SET TimeZone = 'UTC'")
        connection.register("seen", pa.table({"line_id": pa.array(list(last_seqs), pa.string()),
                                              "last_seq": pa.array(list(last_seqs.values()), pa.int64())}))
        fresh_rows = (
            "WITH fresh AS (SELECT r.* FROM read_parquet($files, hive_partitioning = true, "
            "hive_types = {'line_id': VARCHAR, 'date': VARCHAR}) r LEFT JOIN seen USING (line_id) "
            "WHERE r.seq > coalesce(seen.last_seq, -1)) "
        )

        def rows(sql: str) -> list[dict]:
            return connection.sql(fresh_rows + sql, params={"files": files}).to_arrow_table().to_pylist()

        columns = ", ".join(["line_id", "date", *COLUMNS])
        newest = "QUALIFY row_number() OVER (PARTITION BY line_id ORDER BY seq DESC) <= {} ORDER BY line_id, seq"
        counts = rows(
            f"SELECT line_id, date, count(*) AS frames, count(*) FILTER (status = '{STATUS_ERROR}') AS errors, "
            "count(*) FILTER (is_anomaly) AS anomalies, max(seq) AS last_seq FROM fresh GROUP BY line_id, date"
        )
        recent = rows(f"SELECT {columns} FROM fresh " + newest.format(TIMELINE_FRAMES))
        anomalies = rows(f"SELECT {columns} FROM fresh WHERE is_anomaly " + newest.format(LAST_ANOMALIES))
    finally:
        connection.close()
    fresh: dict[str, FreshRows] = {}
    for key, found in (("counts", counts), ("recent", recent), ("anomalies", anomalies)):
        for row in found:
            getattr(fresh.setdefault(row["line_id"], FreshRows()), key).append(row)
    return fresh


def _frame_json(row: dict) -> dict:
    verdict = "error" if row["status"] == STATUS_ERROR else style.verdict(row["is_anomaly"])
    return {
        "seq": row["seq"],
        "score": row["score"],
        "threshold": row["threshold"],
        "verdict": verdict,
        "file": os.path.basename(row["uri"] or "") or None,
        "uri": row["uri"],
        "time": style.utc_time(row["scored_time"]),
        "error": row["error"],
        "has_image": bool(row["uri"]) and row["status"] == STATUS_OK,
    }


def _page(results_dir: str) -> str:
    colours = {"$C_SCORE": style.SCORE, "$C_THRESHOLD": style.THRESHOLD, "$C_ANOMALY": style.ANOMALY, "$C_ERROR": style.ERROR}
    page = PAGE.replace("$RESULTS", html.escape(results_dir))
    for key, colour in colours.items():
        page = page.replace(key, colour)
    return page


def add_arguments(parser) -> None:
    query.add_results_arguments(parser)
    parser.add_argument("--port", type=port_number, default=8080, help="port (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")


def main(args) -> int:
    from werkzeug.serving import make_server

    try:
        results = query.results_dir_of(args)
    except (FileNotFoundError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):  # Werkzeug says a busy port its own way, and exits
            server = make_server(args.host, args.port, create_app(results), threaded=True)
    except (OSError, SystemExit) as exc:
        why = getattr(exc, "strerror", None) or (said.getvalue().strip().splitlines() or ["the address cannot be used"])[0]
        print(f"error: cannot listen on {args.host}:{args.port} ({why}); choose another --port", file=sys.stderr)
        return 2
    if not results.is_dir():
        print(f"note: no result table at {results} yet; the page fills in once a job writes there (check --out)",
              file=sys.stderr)
    print(f"dashboard of {results}: http://{args.host}:{server.port}/  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


PAGE = """<!DOCTYPE html>
<html lang=en><head><meta charset=utf-8><title>Lines — RareCLIP</title>
<style>""" + style.CSS + """
.lines { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 16px; }
.line { border: 1px solid #ddd; border-radius: 8px; padding: 12px 14px; }
#events table { margin: 0 0 12px; font-size: 12px; } #events td { padding: 1px 8px 1px 0; vertical-align: top; }
.line h2 { margin: 0 0 8px; } .line .figs { grid-template-columns: repeat(4, 1fr); }
.line svg { width: 100%; height: 150px; display: block; margin: 8px 0; }
.cols { display: grid; grid-template-columns: 210px 1fr; gap: 12px; }
.latest td { padding: 1px 6px; font-size: 12px; } tr[data-seq], figure[data-seq] { cursor: pointer; }
.thumbs { grid-template-columns: repeat(3, 1fr); gap: 6px; }
h3 { font-size: 13px; margin: 4px 0; color: #444; }
#modal { position: fixed; inset: 0; background: rgba(0,0,0,.6); display: none; align-items: center; justify-content: center; }
#modal.open { display: flex; } #modal div { background: #fff; padding: 12px; border-radius: 8px; max-width: 92vw; max-height: 92vh; overflow: auto; }
#modal img { max-width: 86vw; max-height: 76vh; min-width: 480px; display: block; margin: auto; }
</style></head><body>
<h1>Lines</h1>
<p class=sub id=status data-results="$RESULTS">$RESULTS · loading…</p>
<p class=sub id=legend><svg width=260 height=12 style="vertical-align:middle"><line x1=0 x2=18 y1=6 y2=6 stroke="$C_SCORE" stroke-width=1.5 /><text x=22 y=10 font-size=11>score</text><line x1=62 x2=80 y1=6 y2=6 stroke="$C_THRESHOLD" stroke-dasharray="5,3" stroke-width=1.5 /><text x=84 y=10 font-size=11>threshold</text><circle cx=148 cy=6 r=3.5 fill="$C_ANOMALY"/><text x=155 y=10 font-size=11>anomaly</text><line x1=210 x2=210 y1=0 y2=12 stroke="$C_ERROR" stroke-width=2 /><text x=215 y=10 font-size=11>error</text></svg>
· thumbnails: the stored anomaly map over the frame, each on its own range <span class=colorbar>low <i></i> high</span> · click a frame for full size</p>
<div id=events></div>
<div class=lines id=lines></div>
<div id=modal><div><img id=modal-img alt=""><p id=modal-text></p></div></div>
<script>
const RESULTS = document.getElementById("status").dataset.results;
const REFRESH_MS = """ + str(int(REFRESH_S * 1000)) + """;
const esc = s => String(s ?? "–").replace(/[&<>"']/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"}[c]));
const num = v => v === null || v === undefined ? "–" : Number(v).toPrecision(4).replace(/\\.?0+$/, "");
const COLORS = """ + json.dumps({"score": style.SCORE, "anomaly": style.ANOMALY, "threshold": style.THRESHOLD, "error": style.ERROR}) + """;

function timeline(points) {
  const W = 600, H = 150, top = 8, bottom = 112, strip = 124;
  const scored = points.filter(p => p[1] !== null);
  if (!points.length) return `<svg viewBox="0 0 ${W} ${H}"></svg>`;
  const s0 = points[0][0], s1 = Math.max(points[points.length - 1][0], s0 + 1);
  const values = scored.map(p => p[1]).concat(points.filter(p => p[2] !== null).map(p => p[2]));
  let lo = Math.min(...values), hi = Math.max(...values);
  if (!isFinite(lo)) { lo = 0; hi = 1; } const pad = (hi - lo) * 0.08 || 0.05; lo -= pad; hi += pad;
  const x = s => 44 + (W - 52) * (s - s0) / (s1 - s0), y = v => bottom - (bottom - top) * (v - lo) / (hi - lo);
  let svg = `<svg viewBox="0 0 ${W} ${H}" preserveAspectRatio="none" class=timeline>`;
  for (const v of [lo + pad, (lo + hi) / 2, hi - pad]) svg += `<text x=40 y=${y(v) + 4} font-size=10 text-anchor=end fill="#666">${num(v)}</text><line x1=44 x2=${W - 8} y1=${y(v)} y2=${y(v)} stroke="#eee"/>`;
  svg += `<polyline fill=none stroke="${COLORS.score}" stroke-width=1.2 points="${scored.map(p => x(p[0]) + "," + y(p[1])).join(" ")}"/>`;
  let th = "";
  points.forEach((p, i) => { if (p[2] !== null) { const nx = i + 1 < points.length ? points[i + 1][0] : p[0]; th += `M${x(p[0])},${y(p[2])}H${x(nx)}`; } });
  if (th) svg += `<path d="${th}" stroke="${COLORS.threshold}" stroke-dasharray="5,3" stroke-width=1.5 fill=none class=threshold />`;
  for (const p of points) if (p[3]) svg += `<circle cx=${x(p[0])} cy=${y(p[1])} r=3.5 fill="${COLORS.anomaly}" class=anomaly-dot><title>seq ${p[0]}: ${num(p[1])}</title></circle>`;
  svg += `<rect x=44 y=${strip - 8} width=${W - 52} height=16 fill="#f6f6f6"/><text x=40 y=${strip + 4} font-size=10 text-anchor=end fill="#666">errors</text>`;
  for (const p of points) if (p[4]) svg += `<line x1=${x(p[0])} x2=${x(p[0])} y1=${strip - 8} y2=${strip + 8} stroke="${COLORS.error}" stroke-width=2 class=error-tick><title>seq ${p[0]}</title></line>`;
  svg += `<text x=44 y=${H - 2} font-size=10 fill="#666">seq ${s0}</text><text x=${W - 8} y=${H - 2} font-size=10 text-anchor=end fill="#666">seq ${points[points.length - 1][0]}</text>`;
  return svg + "</svg>";
}

function card(id, l) {
  const latest = l.latest.map(f => `<tr data-line="${esc(id)}" data-seq=${f.seq} class="${f.verdict === "anomaly" ? "anomaly" : f.verdict === "error" ? "error" : ""}"><td class=num>${f.seq}</td><td class=num>${num(f.score)}</td><td>${esc(f.verdict)}</td></tr>`).join("");
  const thumbs = l.last_anomalies.map(f => `<figure class=flagged data-line="${esc(id)}" data-seq=${f.seq}><img loading=lazy src="frame/${encodeURIComponent(id)}/${f.seq}.png?size=thumb" alt="seq ${f.seq}"><figcaption>seq ${f.seq} · ${num(f.score)}</figcaption></figure>`).join("") || "<p class=sub>none yet</p>";
  return `<section class=line id="line-${esc(id)}"><h2>${esc(id)}</h2><div class=figs>
    <div class=fig><span>frames</span><b>${l.frames}</b></div>
    <div class=fig><span>anomalies today</span><b class="${l.anomalies_today ? "anomaly" : ""}">${l.anomalies_today}</b></div>
    <div class=fig><span>errors</span><b>${l.errors}</b></div>
    <div class=fig><span>threshold</span><b>${l.threshold === null ? "not set yet" : num(l.threshold)}</b></div></div>
    ${timeline(l.timeline)}
    <div class=cols><div><h3>latest frames</h3><table class=latest><tr><th>seq</th><th>score</th><th>verdict</th></tr>${latest}</table></div>
    <div><h3>last anomalies</h3><div class=thumbs>${thumbs}</div></div></div>
    <p class=sub>last seq ${l.last_seq ?? "–"} · scored ${esc(l.last_scored)} UTC · anomalies in all: ${l.anomalies}</p></section>`;
}

async function refresh() {
  try {
    const data = await (await fetch("api/lines")).json();
    const ids = Object.keys(data.lines);
    document.getElementById("events").innerHTML = data.events.length ? "<h3>job events, newest first</h3><table>" +
      data.events.slice().reverse().map(e => `<tr class="${e.kind === "notice" ? "error" : ""}"><td class=num>${esc(e.time.replace("T", " ").slice(0, 19))} UTC</td><td>${esc(e.kind)}</td><td>${esc(e.text)}</td></tr>`).join("") + "</table>" : "";
    document.getElementById("lines").innerHTML = ids.map(id => card(id, data.lines[id])).join("") || "<p>No rows yet: the page fills in as a job writes.</p>";
    document.getElementById("status").textContent = `${RESULTS} · ${ids.length} lines · updated ${data.updated} UTC · every ${REFRESH_MS / 1000}s`;
  } catch (err) {
    document.getElementById("status").textContent = `${RESULTS} · not reachable (${err}); retrying`;
  }
}

async function openFrame(line, seq) {
  const f = await (await fetch(`api/frame/${encodeURIComponent(line)}/${seq}`)).json();
  const img = document.getElementById("modal-img");
  img.style.display = f.has_image ? "block" : "none";
  img.src = f.has_image ? `frame/${encodeURIComponent(line)}/${seq}.png` : "";
  const bar = f.map_low === null ? "" : ` · anomaly map ${num(f.map_low)} <span class=colorbar><i></i></span> ${num(f.map_high)}`;
  document.getElementById("modal-text").innerHTML = `<b>${esc(line)} seq ${seq}</b> · score ${num(f.score)} · <span class="${f.verdict === "anomaly" ? "anomaly" : ""}">${esc(f.verdict)}</span> (threshold ${num(f.threshold)})${bar}<br><small>${esc(f.time)} UTC · <span title="${esc(f.uri)}">${esc(f.file)}</span>${f.error ? " · " + esc(f.error) : ""}</small>`;
  document.getElementById("modal").classList.add("open");
  history.replaceState(null, "", `#frame=${encodeURIComponent(line)}/${seq}`);
}

function closeFrame() {
  document.getElementById("modal").classList.remove("open");
  history.replaceState(null, "", location.pathname);
}

document.addEventListener("click", ev => {
  const target = ev.target.closest("[data-seq]");
  if (target) openFrame(target.dataset.line, target.dataset.seq);
  else if (ev.target.closest("#modal")) closeFrame();
});
const linked = location.hash.match(/^#frame=(.+)\/(\d+)$/);  // a link to one frame
if (linked) openFrame(decodeURIComponent(linked[1]), linked[2]);
refresh();
setInterval(refresh, REFRESH_MS);
</script></body></html>
"""
