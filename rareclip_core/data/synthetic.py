"""Synthetic industrial product lines with known defects, for demos and tests.

A :class:`SyntheticLine` renders frame ``i`` deterministically from ``(seed, i)``: an
object (a machined disc with a bore, bolt holes, a groove and a notch on a plain
background) or a texture (a woven fabric), each with small per-frame pose and lighting
changes. Defective frames carry one defect with its exact pixel mask: the defect repaints
exactly the mask pixels, and frame ``i`` with a defect equals its defect-free version
(``defect_type='good'``) outside the mask. Defects cover roughly 0.5%-5% of the image.

Images are rendered in normalized coordinates (the image spans [-0.5, 0.5)), so a line
looks the same at any ``size``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "SyntheticFrame",
    "SyntheticLine",
    "DEFECT_TYPES",
    "write_line_folder",
    "write_mvtec_dataset",
]

GOOD = "good"
DEFECT_TYPES = {
    "object": ("scratch", "stain", "missing_piece", "contamination"),
    "texture": ("scratch", "stain", "contamination"),
}
_KIND_ID = {"object": 0, "texture": 1}
_PALETTE = np.array([[0.9, 0.15, 0.1], [0.1, 0.75, 0.2], [0.15, 0.3, 0.95], [0.95, 0.8, 0.05]])


@dataclass(frozen=True)
class SyntheticFrame:
    """One rendered frame: image (H, W, 3) uint8, mask (H, W) bool, label 0/1, defect type or 'good'."""

    image: np.ndarray
    mask: np.ndarray
    label: int
    defect_type: str


class SyntheticLine:
    """A product line of ``kind`` 'object' or 'texture' whose frames are defective with
    probability ``defect_rate``; appearance is fixed by ``seed``, frame ``i`` by ``(seed, i)``."""

    def __init__(self, kind: str = "object", seed: int = 0, size: int = 128, defect_rate: float = 0.1):
        if kind not in DEFECT_TYPES:
            raise ValueError(f"kind must be one of {sorted(DEFECT_TYPES)}, got {kind!r}")
        if not 0.0 <= defect_rate <= 1.0:
            raise ValueError(f"defect_rate must be in [0, 1], got {defect_rate}")
        if size < 32:
            raise ValueError(f"size must be at least 32, got {size}")
        self.kind, self.seed, self.size, self.defect_rate = kind, seed, size, defect_rate
        rng = np.random.default_rng([seed, _KIND_ID[kind], 0])
        if kind == "object":
            self._background = rng.uniform(0.08, 0.18) + rng.uniform(-0.03, 0.03, 3)
            self._color = rng.uniform(0.55, 0.72) + rng.uniform(-0.05, 0.05, 3)
            self._radius = rng.uniform(0.30, 0.34)
            self._n_holes = int(rng.integers(4, 7))
        else:
            self._color = rng.uniform(0.35, 0.7, 3)
            self._period = rng.uniform(1 / 14, 1 / 9)  # weave cell, in image widths
        # the vivid colour farthest from the product colour
        self._contaminant = _PALETTE[np.argmax(np.abs(_PALETTE - self._color).sum(1))]
        c = (np.arange(size) + 0.5) / size - 0.5
        self._y, self._x = np.meshgrid(c, c, indexing="ij")  # (H, W) pixel centres

    def frame(self, i: int, *, defect_type: str | None = None) -> SyntheticFrame:
        """Frame ``i``; ``defect_type`` ('good' or a defect name) overrides the random choice."""
        rng = self._frame_rng(i)
        drng = np.random.default_rng([self.seed, _KIND_ID[self.kind], 2, i])  # defect geometry
        types = DEFECT_TYPES[self.kind]
        drawn = self._drawn_defect(rng)
        defect = drawn if defect_type is None else defect_type
        if defect != GOOD and defect not in types:
            raise ValueError(f"defect_type must be 'good' or one of {types}, got {defect!r}")
        if self.kind == "object":
            image, mask = self._render_object(rng, drng, defect)
        else:
            image, mask = self._render_texture(rng, drng, defect)
        gain = rng.uniform(0.9, 1.1)
        ang, slope = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.15)
        light = gain * (1 + slope * (self._x * np.cos(ang) + self._y * np.sin(ang)))  # (H, W)
        image = image * light[..., None] + rng.normal(0, 0.012, image.shape)
        image = np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)
        return SyntheticFrame(image, mask, int(defect != GOOD), defect)

    def defect_type(self, i: int) -> str:
        """The defect frame ``i`` carries ('good' for none), without rendering it."""
        return self._drawn_defect(self._frame_rng(i))

    def _frame_rng(self, i: int) -> np.random.Generator:
        """Frame ``i``'s draws, in order: the defect choice, then pose and light."""
        return np.random.default_rng([self.seed, _KIND_ID[self.kind], 1, i])

    def _drawn_defect(self, rng: np.random.Generator) -> str:
        types = DEFECT_TYPES[self.kind]
        return types[rng.integers(len(types))] if rng.random() < self.defect_rate else GOOD

    def _render_object(self, rng, drng, defect):
        """Disc part: (H, W, 3) float image and (H, W) defect mask."""
        R, px = self._radius, 1.0 / self.size
        cx, cy = rng.uniform(-0.02, 0.02, 2)
        theta = np.deg2rad(rng.uniform(-6, 6))
        X, Y = self._x - cx, self._y - cy
        Xr = np.cos(theta) * X + np.sin(theta) * Y  # part coordinates (rotated)
        Yr = -np.sin(theta) * X + np.cos(theta) * Y
        r, phi = np.hypot(Xr, Yr), np.arctan2(Yr, Xr)
        step = 2 * np.pi / self._n_holes
        hole_dist = np.sqrt(np.maximum(r**2 + (0.62 * R) ** 2  # distance to nearest bolt hole
                                       - 2 * r * 0.62 * R * np.cos(phi - step * np.round(phi / step)), 0))

        def inside(d):  # anti-aliased indicator of d < 0, one pixel wide
            return np.clip(0.5 - d / px, 0, 1)

        notch = inside(np.maximum(R - 0.05 - Xr, np.abs(Yr) - 0.025))
        alpha = inside(r - R) * (1 - inside(r - 0.28 * R)) * (1 - inside(hole_dist - 0.07 * R)) * (1 - notch)
        shade = 0.8 + 0.25 * (1 - r / R) + 0.1 * np.cos(phi - 0.8)  # radial + directional sheen
        shade = shade - 0.15 * (np.abs(r - 0.83 * R) < 0.012)  # groove
        part = self._color * shade[..., None]  # (H, W, 3)
        mask = np.zeros(r.shape, dtype=bool)
        if defect == "missing_piece":
            a, rc = drng.uniform(0, 2 * np.pi), drng.uniform(0.07, 0.1)
            d = R - 0.4 * rc  # bite centre just inside the rim
            mask = (np.hypot(X - d * np.cos(a), Y - d * np.sin(a)) < rc) & (alpha >= 0.5)
            alpha = np.where(mask, 0.0, alpha)
        image = self._background * (1 - alpha[..., None]) + part * alpha[..., None]
        if defect in ("scratch", "stain", "contamination"):
            rho, a = drng.uniform(0.45, 0.6) * R, drng.uniform(0, 2 * np.pi)
            centre = (cx + rho * np.cos(a), cy + rho * np.sin(a))
            direction = a + np.pi / 2 + drng.uniform(-0.35, 0.35)  # about tangential
            image, mask = self._surface_defect(drng, image, defect, centre, direction)
        return image, mask

    def _render_texture(self, rng, drng, defect):
        """Plain-weave fabric: (H, W, 3) float image and (H, W) defect mask."""
        p = self._period
        theta = np.deg2rad(rng.uniform(-2, 2))
        ox, oy = rng.uniform(0, 2 * p, 2)  # random placement of the weave
        u = (np.cos(theta) * self._x + np.sin(theta) * self._y + ox) / p  # in weave cells
        v = (-np.sin(theta) * self._x + np.cos(theta) * self._y + oy) / p
        over = (np.floor(u) + np.floor(v)) % 2 == 0  # which thread lies on top in each cell
        across = np.where(over, np.sin(np.pi * (v % 1)), np.sin(np.pi * (u % 1)))  # thread profile
        along = np.where(over, np.cos(2 * np.pi * 3 * u), np.cos(2 * np.pi * 3 * v))  # fibre twist
        pattern = 0.55 + 0.4 * np.sqrt(across) + 0.04 * along + rng.normal(0, 0.03, u.shape)
        image = self._color * pattern[..., None]  # (H, W, 3)
        mask = np.zeros(u.shape, dtype=bool)
        if defect != GOOD:
            centre = drng.uniform(-0.25, 0.25, 2)
            image, mask = self._surface_defect(drng, image, defect, centre, drng.uniform(0, np.pi))
        return image, mask

    def _surface_defect(self, rng, image, defect, centre, direction):
        """Paint a scratch, stain or contamination centred at ``centre`` (normalized x, y)."""
        X, Y = self._x - centre[0], self._y - centre[1]
        if defect == "scratch":
            half, width = rng.uniform(0.14, 0.21), rng.uniform(0.025, 0.035)
            along = X * np.cos(direction) + Y * np.sin(direction)
            across = -X * np.sin(direction) + Y * np.cos(direction)
            dist = np.hypot(np.maximum(np.abs(along) - half, 0), across)  # to the segment
            mask = dist < width / 2
            tone = 0.95 if rng.random() < 0.5 else 0.05  # bright or dark mark
            colour, strength = np.full(3, tone), 0.85
        else:
            phi = np.arctan2(Y, X)
            if defect == "stain":
                a, b, rot = rng.uniform(0.05, 0.08), rng.uniform(0.05, 0.08), rng.uniform(0, np.pi)
                ex = (X * np.cos(rot) + Y * np.sin(rot)) / a
                ey = (-X * np.sin(rot) + Y * np.cos(rot)) / b
                mask = np.hypot(ex, ey) < 1 + 0.15 * np.sin(3 * phi + rng.uniform(0, 2 * np.pi))
                colour, strength = np.array([0.25, 0.17, 0.08]), 0.7
            else:  # contamination: an irregular patch of foreign colour
                r0, p1, p2 = rng.uniform(0.05, 0.075), *rng.uniform(0, 2 * np.pi, 2)
                mask = np.hypot(X, Y) < r0 * (1 + 0.25 * np.sin(2 * phi + p1) + 0.15 * np.sin(5 * phi + p2))
                colour, strength = self._contaminant, 0.65
        image = np.where(mask[..., None], (1 - strength) * image + strength * colour, image)
        return image, mask


def write_line_folder(root, n_frames: int, kind: str, seed: int, size: int = 128,
                      defect_rate: float = 0.1) -> list[tuple[str, int]]:
    """Write frames 0..n_frames-1 of a line as ``root/frame_000000.png`` ...; returns (path, label)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    line = SyntheticLine(kind, seed, size, defect_rate)
    out = []
    for i in range(n_frames):
        f = line.frame(i)
        path = root / f"frame_{i:06d}.png"
        Image.fromarray(f.image).save(path)
        out.append((str(path), f.label))
    return out


def write_mvtec_dataset(root, categories: dict[str, str] | None = None, n_train_good: int = 8,
                        n_test_good: int = 12, n_test_defect: int = 6, size: int = 128,
                        seed: int = 0) -> str:
    """Write a dataset in the MVTec AD layout (readable by ``datasets.load_mvtec``).

    ``categories`` maps name -> kind (default ``{'widget': 'object', 'fabric': 'texture'}``).
    Per category: ``train/good`` and ``test/good`` images, ``test/<defect_type>`` images
    cycling through the kind's defect types, and 0/255 masks at
    ``ground_truth/<defect_type>/<stem>_mask.png``. Returns ``root`` as a string.
    """
    categories = {"widget": "object", "fabric": "texture"} if categories is None else categories
    root = Path(root)
    for name, kind in categories.items():
        line = SyntheticLine(kind, seed=seed * 2**32 + zlib.crc32(name.encode()), size=size)
        defects = DEFECT_TYPES[kind]
        plan = ([("train", GOOD)] * n_train_good + [("test", GOOD)] * n_test_good
                + [("test", defects[k % len(defects)]) for k in range(n_test_defect)])
        counters: dict[tuple[str, str], int] = {}
        for i, (split, defect) in enumerate(plan):
            f = line.frame(i, defect_type=defect)
            stem = f"{counters.setdefault((split, defect), 0):03d}"
            counters[split, defect] += 1
            folder = root / name / split / defect
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(f.image).save(folder / f"{stem}.png")
            if defect != GOOD:
                gt = root / name / "ground_truth" / defect
                gt.mkdir(parents=True, exist_ok=True)
                Image.fromarray(f.mask.astype(np.uint8) * 255).save(gt / f"{stem}_mask.png")
    return str(root)
