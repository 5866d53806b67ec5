"""What the training jobs (train-tpb, train-afrclip, train-adaptclip) share: their dataset arguments and the
choice of annotated images. As in the papers, the learned parts are trained on one dataset's
test images with their masks (all categories) and used on another (VisA -> MVTec AD and back)."""
from __future__ import annotations

import sys

from rareclip_core.data.datasets import Sample, load_dataset


def add_dataset_arguments(parser) -> None:
    parser.add_argument("--dataset", required=True, choices=("mvtec", "visa", "folder"), help="dataset layout")
    parser.add_argument("--root", required=True, help="dataset root folder")
    parser.add_argument(
        "--limit", type=int, default=None, metavar="N",
        help="train on N images spread evenly over the test split (quick runs)",
    )


def annotated_samples(dataset: str, root: str, limit: int | None) -> list[Sample]:
    """The test split's images that can be trained on (anomalous ones need a mask; those
    without are skipped with a message), `limit` of them spread evenly when given. Raises
    FileNotFoundError / ValueError for a missing or malformed dataset."""
    samples = [s for category in load_dataset(dataset, root, "test").values() for s in category]
    unmasked = [s for s in samples if s.label and s.mask_path is None]
    if unmasked:
        print(f"skipping {len(unmasked)} anomalous images without a mask", file=sys.stderr)
        samples = [s for s in samples if not (s.label and s.mask_path is None)]
    if limit is not None and limit < len(samples):
        samples = [samples[i * len(samples) // limit] for i in range(limit)]
    return samples
