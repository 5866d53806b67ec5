"""Decoding and validating one frame's bytes: a clear reason for every frame we refuse."""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

from .images import HIGH_BIT_MODES

MIN_SIDE = 8
MAX_PIXELS = 100_000_000


class FrameError(ValueError):
    """A frame that cannot be scored; the message says why and what to do."""


def decode_frame(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Image file bytes -> H x W x 3 uint8 RGB.

    Grayscale, palette and RGBA frames are converted to RGB; empty, non-image, truncated,
    16-bit/float, tiny and absurdly large frames raise FrameError.
    """
    if not data:
        raise FrameError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise FrameError(f"image is {width}x{height}, over the {max_pixels} pixel limit")
            image.load()
    except FrameError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise FrameError(f"image too large: {err}") from None
    except Image.UnidentifiedImageError:
        raise FrameError("not an image file PIL can read (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise FrameError(f"corrupt or truncated image: {err}") from None
    if image.mode in HIGH_BIT_MODES:
        raise FrameError(f"{image.mode} image (more than 8 bits per channel) is not supported; export 8-bit frames")
    if min(width, height) < MIN_SIDE:
        raise FrameError(f"image is {width}x{height}, smaller than {MIN_SIDE} pixels on a side")
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
