"""How far low-precision rarity banks move a line's scores from float32 banks (issue 7's 1e-3 rule).

Usage (repository root):
    PYTHONPATH=. python benchmarks/bank_precision.py --config configs/detector-tiny.yaml --frames 60
    PYTHONPATH=. python benchmarks/bank_precision.py --config configs/detector-paper.yaml \\
        --images /data/mvtec/bottle/test/broken_large --device cuda     # real weights, real frames

The frames (a folder of images in name order, or synthetic stripe frames) go through the
backbone once; the same features then stream through one detector per bank dtype (float32 as
the reference, then each of --dtypes), so only the banks' storage precision differs. Printed per
dtype: the largest and 99th-percentile |score - float32 score| over the stream, the largest
|anomaly map - float32 map|, the first frame after which the kept features are no longer the
float32 run's (IPRB: an SCS choice flipped on a near-tie, after which the memories differ), and
the banks' memory. Last line: ``<dtype>: max_score_diff=<x>`` for each dtype.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
from pathlib import Path

import numpy as np
import torch

from benchmarks.step_latency import synthetic_frames
from rareclip_core.data.frames import decode_frame
from rareclip_core.detectors.rareclip.config import RareCLIPConfig
from rareclip_core.detectors.rareclip.detector import RareCLIPDetector
from rareclip_core.detectors.rareclip.memory import PatchRarityBank


def folder_frames(folder: Path, n: int) -> list[np.ndarray]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))[:n]
    if not files:
        raise SystemExit(f"--images {folder}: no files")
    return [decode_frame(p.read_bytes()) for p in files]


def bank_mb(detector: RareCLIPDetector) -> float:
    return sum(v.numel() * v.element_size() for v in detector.banks.state_dict().values()) / 2**20


def kept_features_equal(reference: RareCLIPDetector, other: RareCLIPDetector) -> bool:
    a, b = reference.banks, other.banks
    return a.features is None or torch.equal(a.features.to(b.features.dtype), b.features)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--frames", type=int, default=60, help="frames in the stream")
    parser.add_argument("--images", default=None, help="a folder of images (default: synthetic frames)")
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"], choices=["float16", "bfloat16"])
    parser.add_argument("--branch", default=None, choices=["iprb", "dprb"], help="override rarity_branch")
    parser.add_argument("--device", default=None)
    parser.add_argument("--pretrained", default=None, help="override: 'none' for random weights, or a path")
    args = parser.parse_args()

    cfg = RareCLIPConfig.from_yaml(args.config)
    update = {"bank_dtype": "float32"}
    if args.device:
        update["device"] = args.device
    if args.branch:
        update["rarity_branch"] = args.branch
    if args.pretrained is not None:
        update["pretrained"] = None if args.pretrained.lower() in ("none", "null", "random") else args.pretrained
    cfg = cfg.model_copy(update=update)
    frames = folder_frames(Path(args.images), args.frames) if args.images else synthetic_frames(args.frames, cfg.image_size)

    reference = RareCLIPDetector(cfg)
    others = {dtype: RareCLIPDetector(cfg.model_copy(update={"bank_dtype": dtype})) for dtype in args.dtypes}
    print(f"date={datetime.date.today()} host={platform.node()} cpu_cores={os.cpu_count()} torch={torch.__version__} "
          f"device={reference.device}")
    print(f"config={args.config} model={cfg.model} pretrained={cfg.pretrained} branch={cfg.rarity_branch} "
          f"sampler={cfg.sampler} M={reference.n_patches} N_F={cfg.max_features} N_I,max={cfg.max_images} "
          f"frames={len(frames)} ({args.images or 'synthetic'})")

    iprb = isinstance(reference.banks, PatchRarityBank)
    score_diff = {dtype: [] for dtype in others}
    map_diff = {dtype: 0.0 for dtype in others}
    diverged_at = {dtype: None for dtype in others}
    for i, frame in enumerate(frames):
        features = reference.encode([frame])[0]
        expected = reference.step_features(features)
        for dtype, detector in others.items():
            got = detector.step_features(features)
            score_diff[dtype].append(abs(got.score - expected.score))
            map_diff[dtype] = max(map_diff[dtype], float(np.abs(got.anomaly_map - expected.anomaly_map).max()))
            if iprb and diverged_at[dtype] is None and not kept_features_equal(reference, detector):
                diverged_at[dtype] = i

    print(f"float32 banks: {bank_mb(reference):.1f} MB")
    for dtype in others:
        diffs = np.array(score_diff[dtype])
        print(f"{dtype} banks: {bank_mb(others[dtype]):.1f} MB; |score diff| max {diffs.max():.2e} "
              f"p99 {np.percentile(diffs, 99):.2e} median {np.median(diffs):.2e}; |map diff| max {map_diff[dtype]:.2e}; "
              f"kept features first differ after frame {diverged_at[dtype] if iprb else 'n/a (DPRB)'}; "
              f"within 1e-3 of float32: {'yes' if diffs.max() <= 1e-3 else 'NO'}")
    print("; ".join(f"{dtype}: max_score_diff={max(score_diff[dtype]):.2e}" for dtype in others))


if __name__ == "__main__":
    main()
