"""replay: score a finite stream (folder, manifest or dataset) as fast as the cluster allows,
lines in parallel, with the same results a live run gives."""
from __future__ import annotations

import time

import ray

from .common import add_cluster_arguments, load_config_or_exit, quiet_logs
from .line_cluster import LineCluster, start_ray


def run_replay(cfg, address=None, progress=True) -> dict[str, int]:
    """Replay every line of `cfg.source` once; returns frames per line."""
    start_ray(address)
    cluster = LineCluster(cfg)
    try:
        return cluster.run(progress=progress)
    finally:
        cluster.shutdown()


def add_arguments(parser) -> None:
    add_cluster_arguments(parser)
    parser.add_argument("--batch", type=int, help="frames per backbone call (scores are unchanged)")


def main(args) -> int:
    cfg = load_config_or_exit(args.config, out=args.out, backbone_batch=args.batch)
    if cfg is None:
        return 2
    quiet_logs()
    started = time.monotonic()
    counts = run_replay(cfg, args.address, progress=not args.no_progress)
    elapsed = time.monotonic() - started
    total = sum(counts.values())
    print(f"replayed {total} frames of {len(counts)} lines in {elapsed:.1f}s; results in {cfg.results_dir}")
    ray.shutdown()
    return 0
