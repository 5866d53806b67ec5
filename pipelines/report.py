"""`report`: a self-contained HTML page about one line, with its PNG figures beside it.

The page shows the line's summary figures, its score timeline and histogram (threshold drawn),
the top-N frames by score with their stored anomaly maps overlaid, and the latest error rows.
Maps are read as stored (never recomputed); a map covers the frame's centered min(H, W) square,
or the whole frame for kinds whose input is the squashed frame (`input_view`, e.g. adaptclip).
"""
import datetime as dt
import html
import sys
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from actors.result_table import STATUS_ERROR, STATUS_OK, MapUnavailable, read_map
from pipelines import page_style as style
from pipelines import query
from pipelines.common import at_least
from rareclip_core import DETECTORS
from rareclip_core.config import ConfigError
from rareclip_core.data.frames import viewable_rgb

DEFAULT_TOP = 8
ERRORS_SHOWN = 50
HEAT_ALPHA = (0.15, 0.65)  # opacity of the heat map where the map is lowest, highest


def add_arguments(parser) -> None:
    parser.add_argument("--line", required=True, help="line id")
    query.add_results_arguments(parser)
    parser.add_argument("--report-dir", help="where index.html and its PNG files go (default: <out>/report/<line>)")
    parser.add_argument("--top", type=at_least(1), default=DEFAULT_TOP, help="frames shown, highest scores first (default: 8)")


class ReportFolderError(Exception):
    """The report's folder cannot be made."""


def main(args) -> int:
    try:
        results = query.results_dir_of(args)
        report_dir = args.report_dir or results.parent / "report" / args.line
        page = write_report(results, args.line, report_dir, top=args.top)
    except (query.QueryError, FileNotFoundError, ConfigError, ReportFolderError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(page)
    return 0


def write_report(results_dir, line: str, out_dir, top: int = DEFAULT_TOP) -> Path:
    """Write `out_dir/index.html` and its PNG files for `line`; return the page's path."""
    query.require_line(results_dir, line)
    rows = query.query_table(
        "SELECT seq, uri, status, score, is_anomaly, threshold, scored_time, error, model_id "
        "FROM results WHERE line_id = $line ORDER BY seq",
        results_dir,
        {"line": line},
    ).to_pylist()
    summary = next(row for row in query.lines_summary(results_dir).to_pylist() if row["line_id"] == line)
    top_rows = query.top_anomalies(results_dir, line, top=top).to_pylist() if top > 0 else []

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ReportFolderError(f"cannot make the report folder {out} ({err.strerror}); give another --report-dir") from None
    for stale in out.glob("frame-*.png"):  # frames of an earlier report in the same directory
        stale.unlink()
    plot_timeline(rows, out / "timeline.png")
    plot_histogram(rows, out / "histogram.png")
    maps = {row["seq"]: _map_or_note(Path(results_dir), row["map_uri"]) for row in top_rows}
    loaded = [m for m in maps.values() if isinstance(m, np.ndarray)]
    scale = (min(float(np.nanmin(m)) for m in loaded), max(float(np.nanmax(m)) for m in loaded)) if loaded else (0, 1)
    views = {row["seq"]: map_view(row["model_id"]) for row in rows if row["model_id"] and row["seq"] in maps}
    frames = [_render_frame(row, maps[row["seq"]], scale, out, views.get(row["seq"], "center_crop")) for row in top_rows]

    page = out / "index.html"
    page.write_text(_page(line, summary, rows, frames, scale), encoding="utf-8")
    return page


def map_view(model_id) -> str:
    """What part of a frame a row's map covers ("center_crop" or "squash"), from the detector
    kind its model_id names (unknown kinds: the centre square)."""
    entry = DETECTORS.get((model_id or "").split(":")[0])
    return entry.config.input_view if entry is not None else "center_crop"


def overlay_map(frame: Image.Image, anomaly_map: np.ndarray, scale, view: str = "center_crop") -> Image.Image:
    """The frame (RGB, same size) with the map as a heat map over its centered min(W, H) square
    (`view` "center_crop") or over the whole frame ("squash")."""
    frame = viewable_rgb(frame)
    width, height = frame.size
    side = min(width, height)
    box = (0, 0, width, height) if view == "squash" else (
        (width - side) // 2, (height - side) // 2, (width - side) // 2 + side, (height - side) // 2 + side)
    low, high = scale
    values = np.nan_to_num(anomaly_map.astype(np.float32), nan=low, posinf=high, neginf=low)
    resized = np.asarray(Image.fromarray(values).resize((box[2] - box[0], box[3] - box[1]), Image.Resampling.BILINEAR))
    normalized = np.clip((resized - low) / max(high - low, 1e-12), 0.0, 1.0)
    heat = colormaps[style.HEAT_COLORMAP](normalized)[..., :3] * 255
    opacity = (HEAT_ALPHA[0] + (HEAT_ALPHA[1] - HEAT_ALPHA[0]) * normalized)[..., None]
    blended = (1 - opacity) * np.asarray(frame.crop(box), dtype=np.float32) + opacity * heat
    result = frame.copy()
    result.paste(Image.fromarray(np.round(blended).astype(np.uint8)), box[:2])
    if box != (0, 0, width, height):  # show where the map stops
        ImageDraw.Draw(result).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), outline=(255, 255, 255))
    return result


def plot_timeline(rows: list, path: Path) -> None:
    """Score against seq (anomalies in red, the threshold as a dashed step line) and, below on
    the same seq axis, a strip with a tick per error row (errors have no score)."""
    figure = Figure(figsize=(11, 3.6), dpi=100, layout="constrained")
    axes, strip = figure.subplots(2, 1, sharex=True, height_ratios=[6, 1])
    scored = [r for r in rows if r["status"] == STATUS_OK and r["score"] is not None]
    anomalous = [r for r in scored if r["is_anomaly"]]
    with_threshold = [r for r in rows if r["threshold"] is not None]
    errors = [r for r in rows if r["status"] == STATUS_ERROR]
    axes.plot([r["seq"] for r in scored], [r["score"] for r in scored], color=style.SCORE, lw=0.8,
              marker=".", ms=3, label="score")
    axes.scatter([r["seq"] for r in anomalous], [r["score"] for r in anomalous], color=style.ANOMALY, s=22,
                 zorder=3, label=f"anomaly ({len(anomalous)})")
    if with_threshold:
        axes.step([r["seq"] for r in with_threshold], [r["threshold"] for r in with_threshold], where="post",
                  color=style.THRESHOLD, ls="--", lw=1.2, label="threshold")
    axes.set_ylabel("score")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower left", bbox_to_anchor=(0, 1), fontsize=8, ncols=4, frameon=False)
    strip.vlines([r["seq"] for r in errors], 0, 1, color=style.ERROR, lw=1.5)
    strip.set_ylim(0, 1)
    strip.set_yticks([])
    strip.set_ylabel(f"errors\n({len(errors)})", rotation=0, ha="right", va="center", fontsize=8)
    strip.xaxis.get_major_locator().set_params(integer=True)
    strip.set_xlabel("seq")
    figure.savefig(path)


def plot_histogram(rows: list, path: Path) -> None:
    """Histogram of ok scores, normal and anomalous stacked, the latest threshold as a vertical line."""
    figure = Figure(figsize=(6, 3.4), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    scored = [r for r in rows if r["status"] == STATUS_OK and r["score"] is not None]
    if scored:
        scores = np.array([r["score"] for r in scored])
        bins = np.histogram_bin_edges(scores, bins=min(40, max(10, int(np.sqrt(len(scores))))))
        anomalous = np.array([bool(r["is_anomaly"]) for r in scored])
        axes.hist([scores[~anomalous], scores[anomalous]], bins=bins, stacked=True,
                  color=[style.SCORE, style.ANOMALY], label=["normal", "anomaly"])
    else:
        axes.text(0.5, 0.5, "no scored frames", ha="center", va="center", transform=axes.transAxes)
    thresholds = [r["threshold"] for r in rows if r["threshold"] is not None]
    if thresholds:
        axes.axvline(thresholds[-1], color=style.THRESHOLD, ls="--", lw=1.2, label=f"threshold {thresholds[-1]:.4g}")
    axes.set_xlabel("score")
    axes.set_ylabel("frames")
    axes.grid(alpha=0.3)
    if scored or thresholds:
        axes.legend(fontsize=8)
    figure.savefig(path)


def _map_or_note(results_dir: Path, map_uri):
    """The stored map as a 2-D array, or a note saying why there is none."""
    try:
        return read_map(results_dir, map_uri)
    except MapUnavailable as exc:
        return str(exc)


def _render_frame(row: dict, anomaly_map, scale, out: Path, view: str) -> dict:
    """Write frame-<seq>.png (overlay, or the bare frame when there is no map); return the card's data."""
    card = {"row": row, "image": None, "note": None if isinstance(anomaly_map, np.ndarray) else anomaly_map}
    if not row["uri"]:
        card["note"] = "no frame image path stored"
        return card
    try:
        with Image.open(row["uri"]) as frame:
            frame.load()
    except FileNotFoundError:
        card["note"] = f"frame image not found: {row['uri']}"
        return card
    except (OSError, ValueError) as exc:
        card["note"] = f"frame image unreadable ({row['uri']}): {exc}"
        return card
    shown = overlay_map(frame, anomaly_map, scale, view) if card["note"] is None else viewable_rgb(frame)
    card["image"] = f"frame-{row['seq']}.png"
    shown.save(out / card["image"])
    return card


def _page(line: str, summary: dict, rows: list, frames: list, scale) -> str:
    """The report's HTML, referring only to PNG files written beside it."""
    e = html.escape
    times = [r["scored_time"] for r in rows if r["scored_time"] is not None]
    models = sorted({r["model_id"] for r in rows if r["model_id"]})
    thresholds = [r["threshold"] for r in rows if r["threshold"] is not None]
    n = style.number
    figures = [
        ("frames", summary["frames"], ""),
        ("ok", summary["ok"], ""),
        ("errors", summary["errors"], ""),
        ("anomalies", summary["anomalies"], ""),
        ("anomaly rate", style.percent(summary["anomaly_rate"]), ""),
        ("last seq", summary["last_seq"], ""),
        ("threshold (latest)", n(thresholds[-1] if thresholds else None), ""),
        ("score max", n(summary["score_max"]), ""),
        ("score p05 / p50 / p95", " / ".join(n(summary[k]) for k in ("score_p05", "score_p50", "score_p95")), "wide"),
        ("latency p50 / p99", f"{n(summary['latency_p50_ms'])} / {n(summary['latency_p99_ms'])} ms", "wide"),
        ("scored (UTC)", style.time_range(min(times), max(times)) if times else "–", "wide"),
        ("model", ", ".join(models) or "–", "full"),
    ]
    summary_html = "".join(f"<div class='fig {w}'><span>{e(k)}</span><b>{e(str(v))}</b></div>" for k, v, w in figures)

    cards = []
    for card in frames:
        row = card["row"]
        picture = f'<img src="{e(card["image"])}" alt="frame {row["seq"]}">' if card["image"] else ""
        note = f'<p class=note>{e(card["note"])}</p>' if card["note"] else ""
        flag = style.verdict(row["is_anomaly"])
        cards.append(
            f'<figure class={"flagged" if row["is_anomaly"] else "normal"}>{picture}{note}<figcaption><b>seq {row["seq"]}</b> · score '
            f'{n(row["score"])} · <span class="{flag}">{flag}</span><br><small>{e(style.utc_time(row["scored_time"]))}'
            f'<br><span title="{e(str(row["uri"]))}">{e(_file_name(row["uri"]))}</span></small></figcaption></figure>'
        )
    frames_html = "".join(cards) or "<p>No scored frames.</p>"

    errors = [r for r in rows if r["status"] == STATUS_ERROR]
    error_rows = "".join(
        f"<tr><td class=num>{r['seq']}</td><td title='{e(str(r['uri']))}'>{e(_file_name(r['uri']))}</td>"
        f"<td>{e(style.utc_time(r['scored_time']))}</td><td>{e(str(r['error']))}</td></tr>"
        for r in errors[-ERRORS_SHOWN:]
    )
    shown = f"latest {ERRORS_SHOWN} of {len(errors)}" if len(errors) > ERRORS_SHOWN else str(len(errors))
    errors_html = (
        f"<table><tr><th>seq</th><th>file</th><th>time (UTC)</th><th>error</th></tr>{error_rows}</table>"
        if errors else "<p>None.</p>"
    )
    generated = dt.datetime.now(dt.timezone.utc)
    return f"""<!DOCTYPE html>
<html lang=en><head><meta charset=utf-8><title>Line {e(line)} — anomaly report</title>
<style>{style.CSS}
body {{ max-width: 1200px; }} .charts {{ display: flex; flex-wrap: wrap; gap: 12px; }} .charts img {{ max-width: 100%; }}
.thumbs {{ grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); }}
</style></head><body>
<h1>Line {e(line)}</h1>
<p class=sub>Anomaly report · generated {e(style.utc_time(generated))} UTC</p>
<h2>Summary</h2><div class=figs>{summary_html}</div>
<p class=sub>Anomaly rate over ok frames; score and latency figures over ok frames.</p>
<h2>Scores</h2>
<div class=charts><img src="timeline.png" alt="score timeline"><img src="histogram.png" alt="score histogram"></div>
<h2>Top {len(frames)} frames by score</h2>
<p class=sub>Stored anomaly maps over the centered square each map covers (outlined on non-square frames),
one heat scale for all frames: {style.colorbar(scale[0], scale[1])}</p>
<div class=thumbs>{frames_html}</div>
<h2>Errors ({shown})</h2>{errors_html}
</body></html>
"""


def _file_name(uri) -> str:
    """The last part of a path or URI (the whole is in the element's title)."""
    return "–" if not uri else str(uri).rstrip("/").rsplit("/", 1)[-1]
