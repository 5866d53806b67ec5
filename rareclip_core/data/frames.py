"""Decoding and validating one frame's bytes: a clear reason for every frame we refuse."""
from __future__ import annotations

import io
import threading
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image, ImageOps

from .images import HIGH_BIT_MODES

MIN_SIDE = 8
MAX_PIXELS = 100_000_000  # the default of the pipeline's `max_pixels`
_PILLOW_LIMIT = threading.Lock()  # Pillow's own pixel limit is a module global, lifted while it is held


class FrameError(ValueError):
    """A frame that cannot be scored; the message says why and what to do."""


@dataclass(frozen=True)
class FrameDecoding:
    """How frame bytes become 8-bit RGB (the pipeline config's `max_pixels` and `frame_bits`)."""

    max_pixels: int = MAX_PIXELS  # frames with more pixels are refused
    frame_bits: Optional[int] = None  # bits per pixel of high-bit frames (e.g. 12: Mono12 in 16-bit files); None refuses them


def scale_to_8_bits(pixels: np.ndarray, bits: int) -> np.ndarray:
    """Integer pixels of `bits` bits -> uint8: round(v * 255 / (2**bits - 1)), halves up, in exact
    integer arithmetic. A value outside 0 .. 2**bits - 1 raises FrameError (the camera uses more bits)."""
    top = 2**bits - 1
    low, high = int(pixels.min()), int(pixels.max())
    if low < 0 or high > top:
        value = low if low < 0 else high
        raise FrameError(
            f"pixel value {value} is outside the {bits}-bit range 0..{top} set by `frame_bits`; "
            "set `frame_bits` to the bits the camera really uses (16 for full-range 16-bit frames)"
        )
    wide = pixels.astype(np.int64)
    return ((wide * 255 + top // 2) // top).astype(np.uint8)


def viewable_rgb(image: Image.Image) -> Image.Image:
    """A frame as an 8-bit RGB picture (reports, dashboard): a high-bit grayscale frame is scaled by
    `scale_to_8_bits` with the bits its brightest pixel needs (a Mono12 frame as with `frame_bits: 12`)."""
    if image.mode not in HIGH_BIT_MODES or image.mode == "F":
        return image.convert("RGB")
    pixels = np.clip(np.asarray(image), 0, None)
    gray = scale_to_8_bits(pixels, max(8, int(pixels.max()).bit_length()))
    return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))


def is_16_bit_png(data: bytes) -> bool:
    """A PNG whose header says 16 bits per sample (Pillow reads its colour kinds as their high byte)."""
    return data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) > 24 and data[24] == 16


def decode_frame(data: bytes, decoding: FrameDecoding = FrameDecoding()) -> np.ndarray:
    """Image file bytes -> H x W x 3 uint8 RGB, upright (EXIF orientation applied).

    Grayscale, palette and RGBA frames are converted to RGB. High-bit grayscale frames (16-bit
    PNG or TIFF, 32-bit integer) are scaled to 8 bits by `scale_to_8_bits` when
    `decoding.frame_bits` says how many bits they use, and refused otherwise. Empty, non-image,
    truncated, float, tiny and larger than `decoding.max_pixels` frames raise FrameError.
    `max_pixels` is the only pixel limit: Pillow's own decompression-bomb limit is lifted where it
    would apply, so that the project's (configurable) one applies instead. Safe to call from several
    threads at once.
    """
    max_pixels = decoding.max_pixels
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
    if image.mode == "F":
        raise FrameError("floating-point image is not supported; export 8- or 16-bit integer frames")
    if image.mode in HIGH_BIT_MODES and decoding.frame_bits is None:
        raise FrameError(
            f"{image.mode} image (more than 8 bits per pixel): set `frame_bits` in the pipeline config to the "
            "bits the camera uses (e.g. 12 for Mono12, 16 for full range), or export 8-bit frames"
        )
    if image.mode not in HIGH_BIT_MODES and (decoding.frame_bits or 16) < 16 and is_16_bit_png(data):
        raise FrameError(
            f"16-bit {image.mode} PNG: it is read as its high 8 bits, which for {decoding.frame_bits}-bit values "
            "would be nearly black; export 8-bit frames, or 16-bit grayscale ones"
        )
    if min(width, height) < MIN_SIDE:
        raise FrameError(f"image is {width}x{height}, smaller than {MIN_SIDE} pixels on a side")
    image = ImageOps.exif_transpose(image)
    if image.mode in HIGH_BIT_MODES:
        gray = scale_to_8_bits(np.asarray(image), decoding.frame_bits)  # H x W
        return np.repeat(gray[:, :, None], 3, axis=2)
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
