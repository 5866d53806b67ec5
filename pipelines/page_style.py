"""The look the report and the dashboard share: colours, CSS, the heat map's colour bar and
how numbers and times are written."""
from __future__ import annotations

import datetime as dt
import html

from matplotlib import colormaps

HEAT_COLORMAP = "jet"
SCORE = "#4a78b5"  # a line's scores
ANOMALY = "#d62728"  # flagged frames
THRESHOLD = "#ff7f0e"  # the threshold
ERROR = "#7f7f7f"  # error rows

CSS = f"""
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }}
h1 {{ margin: 0 0 2px; }} h2 {{ margin: 20px 0 8px; }} .sub {{ color: #666; margin: 2px 0 8px; }}
.figs {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 8px; }}
.fig {{ background: #f4f6f8; border-radius: 6px; padding: 6px 10px; }}
.fig span {{ display: block; color: #666; font-size: 12px; }}
.fig b {{ font-size: 15px; white-space: nowrap; }}
.fig.wide {{ grid-column: span 2; }} .fig.full {{ grid-column: 1 / -1; }} .fig.full b {{ white-space: normal; }}
.anomaly {{ color: {ANOMALY}; font-weight: 600; }} .error {{ color: {ERROR}; }}
.thumbs {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 10px; align-items: start; }}
figure {{ margin: 0; border: 2px solid #ccc; border-radius: 6px; padding: 4px; background: #fff; }}
figure.flagged {{ border-color: {ANOMALY}; }} figure img {{ width: 100%; display: block; }}
figcaption {{ font-size: 12px; }} figcaption small {{ color: #666; }}
.note {{ background: #fff4e5; padding: 6px; border-radius: 4px; overflow-wrap: anywhere; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ddd; padding: 3px 8px; text-align: left; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
.colorbar {{ display: inline-flex; align-items: center; gap: 6px; font-size: 12px; color: #444; }}
.colorbar i {{ display: inline-block; width: 160px; height: 12px; border: 1px solid #999;
              background: linear-gradient(to right, {{stops}}); }}
""".replace("{stops}", ", ".join(
    "#%02x%02x%02x" % tuple(round(255 * c) for c in colormaps[HEAT_COLORMAP](i / 8)[:3]) for i in range(9)
))


def colorbar(low, high, label: str = "anomaly map") -> str:
    """The heat map's colour bar as HTML: `low` (blue) to `high` (red)."""
    return f'<span class=colorbar>{html.escape(label)} {number(low)} <i></i> {number(high)}</span>'


def verdict(is_anomaly) -> str:
    """A row's verdict in words: "not judged" where it has none (no threshold, or one still
    calibrating), which is not "normal"."""
    return "not judged" if is_anomaly is None else "anomaly" if is_anomaly else "normal"


def number(value) -> str:
    return "–" if value is None else f"{value:.4g}"


def percent(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def utc_time(value) -> str:
    """A UTC time to the second, without the zone suffix."""
    return "–" if value is None else value.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def time_range(first, last) -> str:
    """'2026-03-01 22:00:00 – 23:15:00' (the date once when both are on it)."""
    if first is None:
        return "–"
    start, end = utc_time(first), utc_time(last)
    return f"{start} – {end[11:] if end[:10] == start[:10] else end}"
