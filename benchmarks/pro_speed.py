"""Time pixel_metrics and PRO alone on 100 random 256x256 maps with blob masks, one thread.

Usage (repository root): PYTHONPATH=. python benchmarks/pro_speed.py [--n 100] [--size 256] [--repeats 3]
Last line printed: ``pro_s=<seconds> pixel_metrics_s=<seconds>`` (best of the repeats).
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy/torch load their thread pools

import argparse
import time

import numpy as np
import torch
from scipy import ndimage

from rareclip_core.metrics import pixel_metrics, pro_score


def make_inputs(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Blob masks (n, size, size) bool, from smoothed noise, and noisy maps correlated with them."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal((n, size, size)), sigma=(0, 6, 6))
    masks = noise > np.quantile(noise, 0.97, axis=(1, 2), keepdims=True)  # ~3% anomalous per image
    masks[: n // 2] = False  # half the images are normal
    maps = (rng.random((n, size, size)) + 0.8 * masks).astype(np.float32)
    return masks, maps


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    masks, maps = make_inputs(args.n, args.size)
    regions = sum(ndimage.label(m, structure=np.ones((3, 3)))[1] for m in masks)
    print(f"n={args.n} size={args.size} anomalous_pixels={masks.mean():.4f} regions={regions}")
    print("pixel_metrics:", pixel_metrics(masks, maps, size=args.size))
    pro_s = best_time(lambda: pro_score(masks, maps), args.repeats)
    pix_s = best_time(lambda: pixel_metrics(masks, maps, size=args.size), args.repeats)
    print(f"pro_s={pro_s:.3f} pixel_metrics_s={pix_s:.3f}")


if __name__ == "__main__":
    main()
