"""replay: score a finite stream (folder, manifest or dataset) as fast as the cluster allows,
lines in parallel, with the same results a live run gives."""
from __future__ import annotations

import sys
import time

from .common import (
    EXIT_INTERRUPTED,
    add_cluster_arguments,
    at_least,
    load_config_or_exit,
)
from .line_cluster import LineCluster, RunSummary, start_ray, stop_ray


def run_replay(cfg, address=None, progress=True) -> RunSummary:
    """Replay every line of `cfg.source` once (or what is left of it after an interrupted run)."""
    start_ray(address)
    cluster = LineCluster(cfg)
    try:
        return cluster.run(progress=progress)
    finally:
        cluster.shutdown()


def add_arguments(parser) -> None:
    add_cluster_arguments(parser)
    parser.add_argument("--batch", type=at_least(1), help="frames per backbone call (scores are unchanged)")


def main(args) -> int:
    cfg = load_config_or_exit(args.config, out=args.out, backbone_batch=args.batch)
    if cfg is None:
        return 2
    started = time.monotonic()
    summary = run_replay(cfg, args.address, progress=not args.no_progress)
    stop_ray()
    total = sum(summary.counts.values())
    verb = "stopped after" if summary.interrupted else "replayed"
    print(f"{verb} {total} frames of {len(summary.counts)} lines in {time.monotonic() - started:.1f}s; "
          f"results in {cfg.results_dir}", file=sys.stderr if summary.interrupted else sys.stdout)
    print("\n".join(summary.describe(cfg.results_dir)))
    return EXIT_INTERRUPTED if summary.interrupted else 0
