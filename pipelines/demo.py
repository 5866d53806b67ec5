"""demo: an embedded local Ray, three synthetic lines on CPU with the tiny model, a Parquet
result table and a per-line summary. Needs no arguments, no GPU, no download."""
from __future__ import annotations

import sys
import time

import ray

from configs.loading import load_detector_config
from configs.pipeline import CONFIG_DIR
from rareclip_core.config import ConfigError

from .common import EXIT_INTERRUPTED, load_config_or_exit
from .query import format_table, lines_summary
from .replay import run_replay

DEMO_CONFIG = CONFIG_DIR / "demo.yaml"


def add_arguments(parser) -> None:
    parser.add_argument("--out", help="output folder (default: the demo config's, out/demo)")
    parser.add_argument("--config", default=str(DEMO_CONFIG), help="pipeline YAML (default: configs/demo.yaml)")
    parser.add_argument("--detector", help="a detector YAML to run instead of the config's (e.g. another kind's tiny config)")
    parser.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    parser.add_argument("--no-progress", action="store_true")


def main(args) -> int:
    try:
        detector = load_detector_config(args.detector) if args.detector else None
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cfg = load_config_or_exit(args.config, out=args.out, detector=detector)
    if cfg is None:
        return 2
    started = time.monotonic()
    summary = run_replay(cfg, args.address, progress=not args.no_progress)
    ray.shutdown()
    if summary.interrupted:
        print("\n".join(summary.describe(cfg.results_dir)))
        return EXIT_INTERRUPTED
    counts = summary.counts
    summary = lines_summary(str(cfg.results_dir)).select(
        ["line_id", "frames", "errors", "anomalies", "score_p50", "score_max", "latency_p50_ms"]
    )
    print(format_table(summary, "table"))
    print(
        f"\n{sum(counts.values())} frames of {len(counts)} lines in {time.monotonic() - started:.0f}s. "
        f"Results: {cfg.results_dir} (Parquet, partitioned by line_id/date).\n"
        f"Try: python run_cluster.py lines --results {cfg.results_dir}\n"
        f"     python run_cluster.py report --line {next(iter(counts))} --results {cfg.results_dir} --out {cfg.out}/report"
    )
    return 0
