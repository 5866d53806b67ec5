"""Readers for the evaluation datasets (MVTec AD, VisA, generic folders) and the paper's
shuffled-sequence protocol (docs/algorithms/rareclip.md sections 1 and 7)."""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

__all__ = [
    "Sample",
    "load_mvtec",
    "load_visa",
    "load_folder",
    "load_dataset",
    "shuffled",
    "load_mask",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
GOOD = "good"

MVTEC_LAYOUT = ("<root>/<category>/test/<good|defect_type>/*.png with masks at "
                "<root>/<category>/ground_truth/<defect_type>/<stem>_mask.png")
FOLDER_LAYOUT = ("<root>/<category>/test/<good|defect_type>/<images> with optional masks at "
                 "<root>/<category>/ground_truth/<defect_type>/<stem>.png or <stem>_mask.png")
VISA_LAYOUT = ("<root>/split_csv/1cls.csv with columns object,split,label,image,mask "
               "(label normal|anomaly, paths relative to <root>)")


@dataclass(frozen=True)
class Sample:
    """One evaluation image: label 0 = good, 1 = anomalous; mask_path None when there is no mask."""

    path: str
    label: int
    mask_path: str | None
    defect_type: str
    category: str


def load_mvtec(root: str | Path, split: str = "test") -> dict[str, list[Sample]]:
    """MVTec AD test (or train/good) samples per category, in the official order:
    categories, defect-type folders and files each sorted by name."""
    return _load_tree(root, split, mask_names=("{stem}_mask.png",), masks_required=True,
                      layout=MVTEC_LAYOUT)


def load_folder(root: str | Path, split: str = "test") -> dict[str, list[Sample]]:
    """Generic MVTec-like tree; masks are optional per defect type and matched by file stem.

    A defect type without a ``ground_truth/<defect_type>`` folder gets ``mask_path=None``;
    if that folder exists every image of the defect type must have a mask there.
    """
    return _load_tree(root, split, mask_names=("{stem}.png", "{stem}_mask.png"),
                      masks_required=False, layout=FOLDER_LAYOUT)


def load_visa(root: str | Path, split: str = "test") -> dict[str, list[Sample]]:
    """VisA samples of ``split`` per object from ``split_csv/1cls.csv``, in CSV order.

    The CSV has no defect type: samples are typed ``good`` or ``anomaly``.
    """
    root = _existing_dir(root, VISA_LAYOUT)
    csv_path = root / "split_csv" / "1cls.csv"
    if not csv_path.is_file():
        raise FileNotFoundError(f"VisA split file {csv_path} not found; expected {VISA_LAYOUT}")
    out: dict[str, list[Sample]] = {}
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = {"object", "split", "label", "image", "mask"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{csv_path} lacks columns {sorted(missing)}; expected {VISA_LAYOUT}")
        for line, row in enumerate(reader, start=2):
            if row["split"] != split:
                continue
            if row["label"] not in ("normal", "anomaly"):
                raise ValueError(f"{csv_path}:{line}: label {row['label']!r} is not normal|anomaly")
            label = int(row["label"] == "anomaly")
            image = _existing_file(root / row["image"], f"{csv_path}:{line} image")
            mask = None
            if label:
                if not row["mask"]:
                    raise ValueError(f"{csv_path}:{line}: anomaly sample {row['image']} has no mask")
                mask = str(_existing_file(root / row["mask"], f"{csv_path}:{line} mask"))
            out.setdefault(row["object"], []).append(
                Sample(str(image), label, mask, "anomaly" if label else GOOD, row["object"]))
    if not out:
        raise ValueError(f"{csv_path} has no rows with split={split!r}")
    return out


def load_dataset(kind: str, root: str | Path, split: str = "test") -> dict[str, list[Sample]]:
    """Dispatch to :func:`load_mvtec`, :func:`load_visa` or :func:`load_folder` by ``kind``."""
    loaders = {"mvtec": load_mvtec, "visa": load_visa, "folder": load_folder}
    if kind not in loaders:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {sorted(loaders)}")
    return loaders[kind](root, split)


def shuffled(samples: Sequence[Sample], seed: int) -> list[Sample]:
    """A copy of ``samples`` in the order of ``random.seed(seed); random.shuffle(lst)``
    (the paper's protocol), without touching the global random state."""
    out = list(samples)
    random.Random(seed).shuffle(out)
    return out


def load_mask(sample: Sample, image_size: int, view: str = "center_crop") -> np.ndarray:
    """Ground truth as an (image_size, image_size) bool array, aligned with the image transform.

    Any non-zero mask pixel is a defect (MVTec masks are 0/255; VisA masks hold small
    defect indices), giving a 0/1 float mask. With `view` "center_crop" it is resized so the
    shorter side is ``image_size`` (PIL bilinear, longer side truncated as torchvision's Resize
    does), center cropped to ``image_size`` (torchvision's CenterCrop offsets); with "squash"
    it is resized to ``image_size`` x ``image_size`` whatever its aspect, as the 0/255 8-bit
    image that torchvision's ``Resize`` gets in the authors' evaluation codes (PIL bilinear,
    rounded to 8 bits). Then binarized at > 0.5. A sample without a mask must be good and gives
    all False.
    """
    if sample.mask_path is None:
        if sample.label:
            raise ValueError(f"anomalous sample {sample.path} has no mask")
        return np.zeros((image_size, image_size), dtype=bool)
    return fit_mask(read_mask(sample), image_size, view)


def read_mask(sample: Sample) -> np.ndarray:
    """The sample's mask as it is on disk, H x W bool (any non-zero pixel a defect); all False
    for a good sample without one."""
    if sample.mask_path is None:
        if sample.label:
            raise ValueError(f"anomalous sample {sample.path} has no mask")
        with Image.open(sample.path) as im:
            return np.zeros((im.height, im.width), dtype=bool)
    path = _existing_file(Path(sample.mask_path), f"mask of {sample.path}")
    with Image.open(path) as im:
        return np.asarray(im.convert("L")) > 0


def fit_mask(raw: np.ndarray, image_size: int, view: str = "center_crop") -> np.ndarray:
    """An H x W bool mask brought to the model's input as `load_mask` says."""
    if view == "squash":
        eight_bit = Image.fromarray(raw.astype(np.uint8) * 255)  # mode "L"
        return np.asarray(eight_bit.resize((image_size, image_size), Image.BILINEAR)) > 127
    mask = Image.fromarray(raw.astype(np.float32))  # mode "F"
    w, h = mask.size
    long_side = int(image_size * max(w, h) / min(w, h))
    new_w, new_h = (image_size, long_side) if w <= h else (long_side, image_size)
    mask = mask.resize((new_w, new_h), Image.BILINEAR)
    top, left = int(round((new_h - image_size) / 2.0)), int(round((new_w - image_size) / 2.0))
    mask = mask.crop((left, top, left + image_size, top + image_size))
    return np.asarray(mask) > 0.5


def _load_tree(root, split, mask_names, masks_required, layout) -> dict[str, list[Sample]]:
    """Shared reader for MVTec-like trees ``<root>/<category>/<split>/<type>/<images>``."""
    if split not in ("test", "train"):
        raise ValueError(f"unknown split {split!r}; expected 'test' or 'train'")
    root = _existing_dir(root, layout)
    categories = sorted(p for p in root.iterdir() if (p / "test").is_dir())
    if not categories:
        raise FileNotFoundError(f"no <category>/test folder under {root}; expected {layout}")
    out = {}
    for cat in categories:
        if split == "train":
            type_dirs = [_existing_dir(cat / "train" / GOOD, f"{cat.name}/train/good for split='train'")]
        else:
            type_dirs = sorted(p for p in (cat / "test").iterdir() if p.is_dir())
        samples = []
        for type_dir in type_dirs:
            defect = type_dir.name
            gt_dir = cat / "ground_truth" / defect
            for img in _images(type_dir):
                mask = None
                if defect != GOOD and (masks_required or gt_dir.is_dir()):
                    mask = str(_find_mask(gt_dir, img.stem, mask_names, img, layout))
                samples.append(Sample(str(img), int(defect != GOOD), mask, defect, cat.name))
        if not samples:
            raise ValueError(f"no images under {cat / split}; expected {layout}")
        out[cat.name] = samples
    return out


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _find_mask(gt_dir: Path, stem: str, names: Sequence[str], image: Path, layout: str) -> Path:
    candidates = [gt_dir / n.format(stem=stem) for n in names]
    for c in candidates:
        if c.is_file():
            return c
    tried = " or ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"mask for {image} not found: {tried}; expected {layout}")


def _existing_dir(path, expected: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"directory {path} not found; expected {expected}")
    return path


def _existing_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: file {path} not found")
    return path
