"""live: stream the configured lines until stopped (Ctrl-C); folder and NATS sources are watched
for new frames."""
from __future__ import annotations

from .common import (
    EXIT_INTERRUPTED,
    add_cluster_arguments,
    load_config_or_exit,
)
from .line_cluster import LineCluster, start_ray, stop_ray


def add_arguments(parser) -> None:
    add_cluster_arguments(parser)
    parser.add_argument("--lines", nargs="+", help="only these lines (default: every line of the source)")


def main(args) -> int:
    cfg = load_config_or_exit(args.config, lines=args.lines, live=True, out=args.out)
    if cfg is None:
        return 2
    start_ray(args.address)
    cluster = LineCluster(cfg, args.lines)
    print(f"live: {len(cluster.lines)} lines -> {cfg.results_dir} (Ctrl-C to stop)")
    try:
        summary = cluster.run(progress=not args.no_progress, flush_every_s=cfg.writer_flush_s)
    finally:
        cluster.shutdown()
    stop_ray()
    print(f"stopped after {sum(summary.counts.values())} frames")
    print("\n".join(summary.describe(cfg.results_dir)))
    return EXIT_INTERRUPTED if summary.interrupted else 0
