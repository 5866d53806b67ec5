"""Frames decoded per second by `decode_frame` (what an ingestion actor does per frame), by frame
side, format and number of threads decoding side by side (`decode_threads`). Prints figures; not a test.
Format MONO12 is a grayscale frame of 12-bit values in a 16-bit PNG, decoded with `frame_bits: 12`.

    python benchmarks/decode_rate.py --sides 518 1024 --formats PNG JPEG MONO12 --threads 1 2 4
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.records import append_records  # noqa: E402
from rareclip_core.data.frames import FrameDecoding, decode_frame  # noqa: E402
from rareclip_core.data.synthetic import SyntheticLine  # noqa: E402


def encoded(side: int, fmt: str) -> bytes:
    image = SyntheticLine("object", 0, side).frame(0).image  # H x W x 3 uint8
    if fmt == "MONO12":
        gray = image.mean(axis=2).round().astype(np.uint32)
        image, fmt = ((gray * 4095 + 127) // 255).astype(np.uint16), "PNG"
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


def frames_per_s(data: bytes, decoding: FrameDecoding, threads: int, frames: int) -> float:
    decode = partial(decode_frame, decoding=decoding)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(decode, [data] * threads))  # warm the threads
        start = time.perf_counter()
        list(pool.map(decode, [data] * frames))
        return frames / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[518, 1024])
    parser.add_argument("--formats", nargs="+", default=["PNG", "JPEG"], help="PIL formats, or MONO12")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--frames", type=int, default=40, help="frames decoded per figure")
    parser.add_argument("--json", default=None, help="append the figures as records to this JSON list")
    args = parser.parse_args()
    records = []
    for side in args.sides:
        for fmt in args.formats:
            data = encoded(side, fmt)
            decoding = FrameDecoding(frame_bits=12 if fmt == "MONO12" else None)
            for threads in args.threads:
                rate = frames_per_s(data, decoding, threads, args.frames)
                print(f"side={side} format={fmt} bytes={len(data)} threads={threads} frames_per_s={rate:.1f}")
                records.append({"what": "decode", "device": "cpu", "frame_size": side, "format": fmt,
                                "bytes": len(data), "decode_threads": threads, "images_per_s": rate})
    append_records(args.json, records)


if __name__ == "__main__":
    main()
