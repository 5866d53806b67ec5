"""What the evaluation protocol alone changes in the pixel metrics (`evaluate --protocol`), on
synthetic square frames: blob masks at the model's input size S, and maps shaped as a model's (a
37 x 37 grid of noise plus a signal on the defects, upsampled to S and blurred with sigma 4,
as RareCLIP's map is). Each map goes to 256 as each protocol's line stores it (bilinear with
aligned corners, or area), each mask as each protocol samples it, then the protocol's metrics.
Not a test; the maps are made up, so the figures say how far apart the protocols can read, not
what they read on real data.

    python benchmarks/protocol_effect.py --images 40 --signals 0.3 0.6 1.2
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.evaluate import MAP_RESOLUTION, PROTOCOLS  # noqa: E402
from rareclip_core.metrics import pixel_metrics  # noqa: E402


def synthetic(images: int, size: int, signal: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Masks (N, S, S) bool with about 3 % defect pixels in half of the images; maps (N, S, S)."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal((images, size, size)), sigma=(0, size / 40, size / 40))
    masks = noise > np.quantile(noise, 0.97, axis=(1, 2), keepdims=True)
    masks[: images // 2] = False
    grid = F.interpolate(torch.from_numpy(masks[:, None].astype(np.float32)), size=(37, 37), mode="area")
    coarse = rng.random((images, 1, 37, 37)).astype(np.float32) + signal * grid.numpy()
    maps = F.interpolate(torch.from_numpy(coarse), size=(size, size), mode="bilinear", align_corners=True)[:, 0].numpy()
    return masks, ndimage.gaussian_filter(maps, sigma=(0, 4, 4))


def stored(maps: np.ndarray, resize: str) -> np.ndarray:
    """The maps at MAP_RESOLUTION as a line stores them (actors/line_sequencer.py)."""
    t = torch.from_numpy(maps)[:, None]
    size = (MAP_RESOLUTION,) * 2
    out = F.interpolate(t, size=size, mode="bilinear", align_corners=True) if resize == "bilinear" else F.interpolate(t, size=size, mode="area")
    return out[:, 0].numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--size", type=int, default=518, help="the model's input side S")
    parser.add_argument("--signals", type=float, nargs="+", default=[0.3, 0.6, 1.2], help="map strength on defects")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    names = ("auroc", "ap", "f1_max", "pro")
    print(f"{args.images} square {args.size} px frames, metrics in % (authors / aligned / difference)")
    for signal in args.signals:
        masks, maps = synthetic(args.images, args.size, signal, args.seed)
        got = {name: pixel_metrics(masks, stored(maps, p.map_resize), MAP_RESOLUTION, p.pixels) for name, p in PROTOCOLS.items()}
        cells = [f"{k} {100 * got['authors'][k]:.2f} / {100 * got['aligned'][k]:.2f} / "
                 f"{100 * (got['authors'][k] - got['aligned'][k]):+.2f}" for k in names]
        print(f"signal {signal}: " + "; ".join(cells))


if __name__ == "__main__":
    main()
