"""How far lower precision moves a line's scores from float32: the backbone's precision and the
rarity banks' storage dtype (issue 7's 1e-3 rule; issue 18's "what precision costs").

Usage (repository root):
    PYTHONPATH=. python benchmarks/precision_effect.py --config configs/detector-tiny.yaml --frames 60
    PYTHONPATH=. python benchmarks/precision_effect.py --config configs/detector-tiny.yaml --frames 60 --branch dprb
    PYTHONPATH=. python benchmarks/precision_effect.py --config configs/detector-paper.yaml --device cuda \
        --variants fp16/float32 fp16/float16 --images /data/mvtec/bottle/test/broken_large

Each variant is `backbone precision/bank dtype`; the reference is fp32/float32. The frames (a
folder of images in name order, or synthetic stripe frames) go through each backbone precision
once; each variant's line then steps on its own backbone's features, so a variant that keeps the
fp32 backbone differs from the reference only in its banks. Printed per variant: the largest and
99th-percentile |score - reference score| over the stream, the largest |anomaly map - reference
map|, the first frame after which the kept features are no longer the reference's (IPRB: an SCS
choice flipped on a near-tie, after which the memories differ), and the banks' memory. Last line:
``<variant>: max_score_diff=<x>`` for each variant.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.* when run as a script

from benchmarks.records import append_records, device_name  # noqa: E402
from benchmarks.weights import with_weights  # noqa: E402
from benchmarks.step_latency import synthetic_frames  # noqa: E402
from rareclip_core.data.frames import decode_frame  # noqa: E402
from rareclip_core.detectors.rareclip.config import RareCLIPConfig  # noqa: E402
from rareclip_core.detectors.rareclip.detector import RareCLIPDetector  # noqa: E402
from rareclip_core.detectors.rareclip.memory import PatchRarityBank  # noqa: E402

REFERENCE = "fp32/float32"


def folder_frames(folder: Path, n: int) -> list[np.ndarray]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))[:n]
    if not files:
        raise SystemExit(f"--images {folder}: no files")
    return [decode_frame(p.read_bytes()) for p in files]


def variant(text: str) -> tuple[str, str]:
    precision, _, bank_dtype = text.partition("/")
    if precision not in ("fp32", "fp16", "bf16") or bank_dtype not in ("float32", "float16", "bfloat16"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected PRECISION/BANK_DTYPE, e.g. fp16/float32")
    return precision, bank_dtype


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
    parser.add_argument("--variants", nargs="+", type=variant, default=[("fp32", "float16"), ("fp32", "bfloat16")],
                        help="PRECISION/BANK_DTYPE pairs compared with fp32/float32 (default: fp32/float16 fp32/bfloat16)")
    parser.add_argument("--branch", default=None, choices=["iprb", "dprb"], help="override rarity_branch")
    parser.add_argument("--device", default=None)
    parser.add_argument("--pretrained", default=None, help="override: 'none' for random weights, or a path")
    parser.add_argument("--json", default=None, help="append the figures as records to this JSON list")
    args = parser.parse_args()

    cfg = RareCLIPConfig.from_yaml(args.config)
    update = {"bank_dtype": "float32", "precision": "fp32"}
    if args.device:
        update["device"] = args.device
    if args.branch:
        update["rarity_branch"] = args.branch
    cfg = cfg.model_copy(update=update)
    if args.pretrained is not None:
        cfg = with_weights(cfg, args.pretrained)
    frames = folder_frames(Path(args.images), args.frames) if args.images else synthetic_frames(args.frames, cfg.image_size)

    reference = RareCLIPDetector(cfg)
    others = {f"{p}/{d}": RareCLIPDetector(cfg.model_copy(update={"precision": p, "bank_dtype": d})) for p, d in args.variants}
    encoders = {"fp32": reference}  # one detector per backbone precision encodes the frames
    for name, detector in others.items():
        encoders.setdefault(name.split("/")[0], detector)
    print(f"date={datetime.date.today()} host={platform.node()} cpu_cores={os.cpu_count()} torch={torch.__version__} "
          f"device={reference.device} ({device_name(reference.device)})")
    print(f"config={args.config} model={cfg.model} pretrained={cfg.pretrained} branch={cfg.rarity_branch} "
          f"sampler={cfg.sampler} M={reference.n_patches} N_F={cfg.max_features} N_I,max={cfg.max_images} "
          f"frames={len(frames)} ({args.images or 'synthetic'}); reference {REFERENCE}")

    iprb = isinstance(reference.banks, PatchRarityBank)
    score_diff = {name: [] for name in others}
    map_diff = {name: 0.0 for name in others}
    diverged_at = {name: None for name in others}
    for i, frame in enumerate(frames):
        features = {precision: detector.encode([frame])[0] for precision, detector in encoders.items()}
        expected = reference.step_features(features["fp32"])
        for name, detector in others.items():
            got = detector.step_features(features[name.split("/")[0]])
            score_diff[name].append(abs(got.score - expected.score))
            map_diff[name] = max(map_diff[name], float(np.abs(got.anomaly_map - expected.anomaly_map).max()))
            if iprb and diverged_at[name] is None and not kept_features_equal(reference, detector):
                diverged_at[name] = i

    print(f"{REFERENCE}: banks {bank_mb(reference):.1f} MB")
    records = []
    for name, detector in others.items():
        diffs = np.array(score_diff[name])
        print(f"{name}: banks {bank_mb(detector):.1f} MB; |score diff| max {diffs.max():.2e} "
              f"p99 {np.percentile(diffs, 99):.2e} median {np.median(diffs):.2e}; |map diff| max {map_diff[name]:.2e}; "
              f"kept features first differ after frame {diverged_at[name] if iprb else 'n/a (DPRB)'}; "
              f"within 1e-3 of {REFERENCE}: {'yes' if diffs.max() <= 1e-3 else 'NO'}")
        records.append({
            "what": "precision_effect", "device": device_name(reference.device), "config": args.config, "model": cfg.model,
            "image_size": cfg.image_size, "rarity_branch": cfg.rarity_branch, "frames": len(frames),
            "variant": name, "reference": REFERENCE, "max_score_diff": float(diffs.max()),
            "p99_score_diff": float(np.percentile(diffs, 99)), "max_map_diff": map_diff[name],
            "kept_features_differ_after_frame": diverged_at[name], "bank_mb": bank_mb(detector),
        })
    append_records(args.json, records)
    print("; ".join(f"{name}: max_score_diff={max(score_diff[name]):.2e}" for name in others))


if __name__ == "__main__":
    main()
