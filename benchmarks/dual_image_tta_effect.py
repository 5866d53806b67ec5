"""What test-time adaptation changes in Dual-Image CLIP's maps on a stream with known defects:
a synthetic line's frames go through the detector; on each defective frame the final map (with
TTA) is compared with the joint map of the same step (the map without TTA: same references,
same text), both post-processed alike. Prints pixel AUROC and PRO over the defective frames and
how often each map's peak lies inside the defect. Prints figures; not a test.

    python benchmarks/dual_image_tta_effect.py --config configs/detector-dual-image-tiny.yaml
    python benchmarks/dual_image_tta_effect.py --config configs/detector-dual-image.yaml --frames 200

With random weights (the tiny config) the text embeddings mean nothing, so no gain is expected;
with real weights this is the check of the paper's "Ours" vs "Ours+" on one line.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.* when run as a script

from benchmarks.weights import with_weights  # noqa: E402
from configs.loading import load_detector_config  # noqa: E402
from rareclip_core import build_detector  # noqa: E402
from rareclip_core.data.synthetic import SyntheticLine  # noqa: E402
from rareclip_core.detectors.dual_image.detector import map_to_image  # noqa: E402
from rareclip_core.metrics import pixel_metrics  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a dual_image detector YAML")
    parser.add_argument("--pretrained", help="override `pretrained` ('none' for random weights)")
    parser.add_argument("--kind", default="object", choices=["object", "texture"], help="synthetic line kind")
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--defect-rate", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0, help="the synthetic line's seed")
    args = parser.parse_args()
    config = load_detector_config(args.config)
    if config.kind != "dual_image":
        raise SystemExit(f"{args.config} is kind {config.kind!r}, not dual_image")
    if args.pretrained:
        config = with_weights(config, args.pretrained)
    if config.tta_steps == 0:
        raise SystemExit("tta_steps is 0 in this config: nothing to compare")
    detector = build_detector(config)
    line = SyntheticLine(args.kind, seed=args.seed, size=config.image_size, defect_rate=args.defect_rate)
    masks, with_tta, without, peaks = [], [], [], {"with TTA": 0, "without TTA": 0}
    for i in range(args.frames):
        frame = line.frame(i)
        result = detector.step(frame.image)
        if not frame.label:
            continue
        joint = torch.from_numpy(result.parts["joint_map"]).flatten()
        _, joint_full = map_to_image(joint, detector.grid, config.map_smoothing, config.image_size)
        for name, m in (("with TTA", result.anomaly_map), ("without TTA", joint_full.numpy())):
            peaks[name] += bool(frame.mask.flat[int(np.argmax(m))])
        masks.append(frame.mask)
        with_tta.append(result.anomaly_map)
        without.append(joint_full.numpy())
    if not masks:
        raise SystemExit("no defective frame in the stream: raise --frames or --defect-rate")
    print(f"{config.kind} {config.model} ({config.pretrained or 'random weights'}), {args.kind} line seed {args.seed}: "
          f"{len(masks)} defective frames of {args.frames}")
    for name, maps in (("without TTA", without), ("with TTA", with_tta)):
        metrics = pixel_metrics(np.stack(masks), np.stack(maps))
        print(f"{name:>12}: pixel AUROC {100 * metrics['auroc']:.1f}, PRO {100 * metrics['pro']:.1f}, "
              f"peak inside the defect {peaks[name]}/{len(masks)}")


if __name__ == "__main__":
    main()
