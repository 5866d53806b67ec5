"""Turning user images into model input: accepted kinds, clear errors for the rest."""
from __future__ import annotations

import numpy as np
from PIL import Image

# PIL modes that hold more than 8 bits per channel: no safe automatic mapping to RGB.
HIGH_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def to_rgb_image(image) -> Image.Image:
    """A PIL image or an H x W x 3 (or H x W) uint8 array -> 8-bit RGB PIL image.

    Grayscale, palette and RGBA images are converted (MVTec AD has grayscale categories);
    16-bit and float images are rejected, since their bit depth would have to be guessed.
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"image array must be uint8, got {image.dtype}; scale it to 0-255 first")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
            raise ValueError(f"image array must be H x W x 3 (or H x W gray), got shape {image.shape}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image or a uint8 numpy array, got {type(image).__name__}")
    if image.mode in HIGH_BIT_MODES:
        raise ValueError(f"{image.mode} images ({'16-bit' if image.mode.startswith('I') else 'float'}) are not supported; convert to 8-bit RGB")
    if min(image.size) < 1:
        raise ValueError(f"image has no pixels (size {image.size})")
    return image if image.mode == "RGB" else image.convert("RGB")


def rgb_array(image) -> np.ndarray:
    """As `to_rgb_image`, as an H x W x 3 uint8 array (an RGB array is returned as it is)."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return image
    return np.asarray(to_rgb_image(image))
