"""The 2 x 2 mosaic of the RareCLIP authors' MVTec AD training loader (APRIL-GAN's): with
probability `rate` a training image is replaced by four images of its category pasted in a
2 x 2 grid, their masks likewise. Each of the four is drawn as the authors draw it: a defect
type of the category (`good` included) uniformly, then one of its images. MVTec AD's
`misplaced` (transistor) and `missing_cable` (cable) are never drawn, and are left out of the
training images too (the authors: they weaken the model's sense of foreground and background).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .datasets import Sample, read_mask

LEFT_OUT_DEFECTS = frozenset({"misplaced", "missing_cable"})
AUTHORS_RATE = 0.2  # the authors' `combine_rate`, on whenever their `train_aug` is


@dataclass(frozen=True, eq=False)
class Mosaic:
    image: Image.Image  # RGB, 2W x 2H for tiles of W x H (the first tile's size)
    mask: np.ndarray  # 2H x 2W bool


def kept_for_mosaic_training(samples: list[Sample]) -> list[Sample]:
    """The training images without the left-out defect types."""
    return [s for s in samples if s.defect_type not in LEFT_OUT_DEFECTS]


class MosaicDraws:
    """Whether each training image is replaced, and the mosaics that replace them, drawn from
    one seeded generator in the order asked (a run is repeated exactly by its seed)."""

    def __init__(self, samples: list[Sample], rate: float, seed: int):
        if not 0 <= rate <= 1:
            raise ValueError(f"mosaic rate must lie in [0, 1], got {rate}")
        self.rate = rate
        self.rng = random.Random(seed)
        self.pool: dict[str, dict[str, list[Sample]]] = {}  # category -> defect type -> its images
        for sample in kept_for_mosaic_training(samples):
            self.pool.setdefault(sample.category, {}).setdefault(sample.defect_type, []).append(sample)

    def replaces(self) -> bool:
        """Whether the next training image is replaced by a mosaic (a draw only when rate > 0)."""
        return self.rate > 0 and self.rng.random() < self.rate

    def draw(self, category: str) -> Mosaic:
        """Four images of `category` pasted left to right, top to bottom, each at the first's
        size apart (a larger one is cut by the next, as PIL pastes)."""
        types = sorted(self.pool[category])
        tiles = [self.rng.choice(self.pool[category][self.rng.choice(types)]) for _ in range(4)]
        with Image.open(tiles[0].path) as first:
            width, height = first.size
        image = Image.new("RGB", (2 * width, 2 * height))
        mask = Image.new("L", (2 * width, 2 * height))
        for i, tile in enumerate(tiles):
            corner = ((i % 2) * width, (i // 2) * height)
            with Image.open(tile.path) as picture:
                image.paste(picture.convert("RGB"), corner)
            mask.paste(Image.fromarray(read_mask(tile).astype(np.uint8) * 255), corner)
        return Mosaic(image, np.asarray(mask) > 0)
