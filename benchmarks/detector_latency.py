"""Per-frame cost of any detector kind: build it from a detector YAML through the registry, run
a stream of synthetic frames (with normal references first where asked and supported), print the
latency of `step` and the process's peak memory. Prints figures; not a test.

    PYTHONPATH=. python benchmarks/detector_latency.py --config configs/detector-tiny.yaml --frames 40
    PYTHONPATH=. python benchmarks/detector_latency.py --config configs/detector-paper.yaml --pretrained none \\
        --device cuda --frames 60 --references 4

Steps before `--warmup` are not timed. On CUDA the memory is `torch.cuda.max_memory_allocated`;
on CPU it is the rise of the peak RSS (VmHWM) over the RSS before the detector was built.
The last line: `p50_ms=<x> p99_ms=<y> peak_mem_mb=<z>`.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.* when run as a script

from benchmarks.records import append_records, device_name  # noqa: E402
from benchmarks.weights import with_weights  # noqa: E402
from configs.loading import load_detector_config  # noqa: E402
from rareclip_core import build_detector  # noqa: E402
from rareclip_core.data.synthetic import SyntheticLine  # noqa: E402


def rss_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="detector YAML (or pipeline YAML)")
    parser.add_argument("--pretrained", help="override `pretrained` ('none': random weights, also for AFR-CLIP's CNN)")
    parser.add_argument("--device", help="override `device`")
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--references", type=int, default=0, help="normal references learned first (if supported)")
    parser.add_argument("--size", type=int, default=256, help="side of the synthetic frames")
    parser.add_argument("--json", default=None, help="append the figures as a record to this JSON list")
    args = parser.parse_args()
    config = load_detector_config(args.config)
    if args.pretrained:
        config = with_weights(config, args.pretrained)
    update = {}
    if args.device:
        update["device"] = args.device
    config = config.model_copy(update=update)
    line = SyntheticLine("object", seed=0, size=args.size, defect_rate=0.1)
    frames = [line.frame(i).image for i in range(args.frames + args.references)]
    base_rss = rss_mb("VmRSS")
    detector = build_detector(config)
    cuda = torch.cuda.is_available() and str(getattr(detector, "device", "cpu")).startswith("cuda")
    if args.references:
        if not detector.supports_references:
            raise SystemExit(f"detector kind {config.kind!r} takes no normal references")
        detector.add_normal_references(frames[: args.references])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i, frame in enumerate(frames[args.references :]):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        detector.step(frame)
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append((time.perf_counter() - start) * 1000)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else rss_mb("VmHWM") - base_rss
    p50, p99 = np.percentile(times, 50), np.percentile(times, 99)
    device = device_name(detector.device if cuda else "cpu")
    print(f"{datetime.date.today()} {device}; {config.kind} {config.model} @ {config.image_size}; "
          f"{len(times)} timed steps of {args.frames}, {args.references} references")
    print(f"step latency: p50 {p50:.1f} ms, p99 {p99:.1f} ms, mean {np.mean(times):.1f} ms")
    print(f"p50_ms={p50:.2f} p99_ms={p99:.2f} peak_mem_mb={peak:.1f}")
    append_records(args.json, [{
        "what": "detector_latency", "kind": config.kind, "device": device,
        "config": args.config, "model": config.model, "image_size": config.image_size, "lines": 1,
        "references": args.references, "steps": len(times), "p50_ms": float(p50), "p99_ms": float(p99),
        "max_memory_mb": peak if cuda else None, "cpu_peak_rss_rise_mb": None if cuda else peak,
        "images_per_s": 1000 / float(p50),
    }])


if __name__ == "__main__":
    main()
