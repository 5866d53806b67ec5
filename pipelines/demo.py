"""demo: an embedded local Ray, three synthetic lines on CPU with the tiny model, a Parquet
result table and a per-line summary. Needs no arguments, no GPU, no download."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pyarrow as pa

from configs.loading import load_detector_config
from configs.pipeline import CONFIG_DIR, SyntheticSourceConfig
from rareclip_core.config import ConfigError
from rareclip_core.data.synthetic import SyntheticLine

from .common import EXIT_INTERRUPTED, load_config_or_exit
from .query import format_table, lines_summary, query_table
from .line_cluster import stop_ray, synthetic_lines
from .replay import run_replay

DEMO_CONFIG = CONFIG_DIR / "demo.yaml"


def add_arguments(parser) -> None:
    parser.add_argument("--out", help="output folder (default: the demo config's, out/demo; with --detector, "
                                      "out/demo-<the detector file's name>, e.g. out/demo-dual-image-tiny)")
    parser.add_argument("--config", default=str(DEMO_CONFIG), help="pipeline YAML (default: configs/demo.yaml)")
    parser.add_argument("--detector", help="a detector YAML to run instead of the config's (e.g. another kind's tiny config)")
    parser.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def demo_out(config_out: str, detector_file: str) -> str:
    """Where the demo of another detector YAML writes: `out/demo` + `-dual-image-tiny` for
    `configs/detector-dual-image-tiny.yaml`."""
    return f"{config_out}-{Path(detector_file).stem.removeprefix('detector-')}"


def main(args) -> int:
    try:
        detector = load_detector_config(args.detector) if args.detector else None
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out
    if detector is not None and out is None:  # its own folder: not the default detector's rows and snapshots
        default = load_config_or_exit(args.config, check=False)
        if default is None:
            return 2
        out = demo_out(default.out, args.detector)
    cfg = load_config_or_exit(args.config, out=out, detector=detector)
    if cfg is None:
        return 2
    started = time.monotonic()
    summary = run_replay(cfg, args.address, progress=not args.no_progress)
    stop_ray()
    if summary.interrupted:
        print("\n".join(summary.describe(cfg.results_dir)))
        return EXIT_INTERRUPTED
    counts = summary.counts
    summary = lines_summary(str(cfg.results_dir)).select(
        ["line_id", "frames", "errors", "anomalies", "score_p50", "score_max", "latency_p50_ms"]
    )
    print(format_table(summary, "table"))
    if isinstance(cfg.source, SyntheticSourceConfig):
        print("Known defects (the synthetic lines drew them; the demo's model has random weights, so its "
              "scores say little):")
        print(format_table(known_defects(cfg.source, cfg.results_dir), "table"))
    out, line = cfg.out, next(iter(counts))
    print(
        f"{sum(counts.values())} frames of {len(counts)} lines in {time.monotonic() - started:.0f}s. "
        f"Results: {cfg.results_dir} (Parquet, partitioned by line_id/date).\n"
        f"Try: python run_cluster.py anomalies --line {line} --out {out}\n"
        f"     python run_cluster.py dashboard --out {out}\n"
        f"     python run_cluster.py report --line {line} --out {out}"
    )
    return 0


def known_defects(source: SyntheticSourceConfig, results_dir) -> pa.Table:
    """Each defective frame of the synthetic lines with its score, threshold and verdict read
    back from the table (not judged while an `auto` threshold calibrates), and the good frames
    that were flagged (false alarms)."""
    lines = {line: SyntheticLine(kind, seed, source.size, source.defect_rate) for line, (kind, seed) in synthetic_lines(source).items()}
    defects = [{"line_id": line, "seq": seq, "defect": drawn.defect_type(seq)}
               for line, drawn in lines.items() for seq in range(source.frames)]
    truth = pa.Table.from_pylist(defects)
    return query_table(
        """
        SELECT t.line_id, t.seq, t.defect, r.score, r.threshold,
               CASE WHEN r.is_anomaly IS NULL THEN 'not judged (calibrating)'
                    WHEN r.is_anomaly AND t.defect = 'good' THEN 'false alarm'
                    WHEN r.is_anomaly THEN 'flagged' ELSE 'missed' END AS verdict
        FROM truth t JOIN results r USING (line_id, seq)
        WHERE t.defect <> 'good' OR r.is_anomaly
        ORDER BY t.line_id, t.seq
        """,
        results_dir,
        tables={"truth": truth},
    )
