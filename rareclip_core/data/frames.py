"""Decoding and validating one frame's bytes: a clear reason for every frame we refuse."""
from __future__ import annotations

import io
import threading

import numpy as np
from PIL import Image, ImageOps

from .images import HIGH_BIT_MODES

MIN_SIDE = 8
MAX_PIXELS = 100_000_000  # the default of the pipeline's `max_pixels`
_PILLOW_LIMIT = threading.Lock()  # Pillow's own pixel limit is a module global, lifted while it is held


class FrameError(ValueError):
    """A frame that cannot be scored; the message says why and what to do."""


def decode_frame(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Image file bytes -> H x W x 3 uint8 RGB, upright (EXIF orientation applied).

    Grayscale, palette and RGBA frames are converted to RGB; empty, non-image, truncated,
    16-bit/float, tiny and larger than `max_pixels` frames raise FrameError. `max_pixels` is the
    only pixel limit: Pillow's own decompression-bomb limit is lifted where it would apply, so that
    the project's (configurable) one applies instead. Safe to call from several threads at once.
    """
    if not data:
        raise FrameError("empty file (0 bytes)")
    try:
        with _PILLOW_LIMIT:
            pillow_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                image = Image.open(io.BytesIO(data))
                width, height = image.size
                if width * height > max_pixels:
                    raise FrameError(
                        f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}; "
                        "raise `max_pixels` in the pipeline config to accept it"
                    )
                if pillow_limit is not None and width * height > pillow_limit:
                    image.load()  # some formats check Pillow's limit while decoding: decode with it lifted
            finally:
                Image.MAX_IMAGE_PIXELS = pillow_limit
        image.load()  # outside the lock, so that threads decode frames side by side
    except FrameError:
        raise
    except Image.UnidentifiedImageError:
        raise FrameError("not an image file PIL can read (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise FrameError(f"corrupt or truncated image: {err}") from None
    if image.mode in HIGH_BIT_MODES:
        raise FrameError(f"{image.mode} image (more than 8 bits per channel) is not supported; export 8-bit frames")
    if min(width, height) < MIN_SIDE:
        raise FrameError(f"image is {width}x{height}, smaller than {MIN_SIDE} pixels on a side")
    image = ImageOps.exif_transpose(image)
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
