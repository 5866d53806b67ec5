"""What a NATS line's history costs its ingestion actor as the line's subject holds more frames:
its first start (it records the stream sequence of each frame in the line's ledger), a restart
(it reads the ledger, then looks for messages past the newest), and one poll of a live line with
nothing new. Starts a local nats-server; prints figures; not a test.

    python benchmarks/nats_index.py --frames 10000 50000
"""
from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.nats_server import start_nats_server  # noqa: E402
from rareclip_core.data.nats_stream import NatsFrameSource, NatsLink, StreamSettings  # noqa: E402


def publish(link: NatsLink, settings: StreamSettings, count: int, payload: bytes) -> None:
    """`count` frames to line `line`, acknowledged by the stream in windows of 1,000."""

    async def send():
        js = link.js
        for start in range(0, count, 1000):
            acks = [await js.publish_async(settings.subject("line"), payload) for _ in range(start, min(count, start + 1000))]
            await asyncio.gather(*acks)

    link.call(send(), timeout=600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[10_000, 50_000], help="frames in the line's subject")
    parser.add_argument("--frame-bytes", type=int, default=1000)
    parser.add_argument("--polls", type=int, default=20)
    args = parser.parse_args()
    store = Path(tempfile.mkdtemp(prefix="nats-index-"))
    server = start_nats_server(str(store))
    link = NatsLink(server.url)
    try:
        settings = StreamSettings(server.url, "FRAMES", "frames")
        link.ensure_stream(settings)
        present = 0
        for frames in sorted(args.frames):
            publish(link, settings, frames - present, b"x" * args.frame_bytes)
            present = frames
            ledger = store / f"ledger-{frames}"
            figures = []
            for _ in range(2):  # the first start records every frame in the ledger; a restart reads it
                start = time.perf_counter()
                source = NatsFrameSource(settings, ["line"], live=True, ledger_dir=str(ledger))
                assert source.frame_count("line") == frames
                figures.append(time.perf_counter() - start)
                polls = []
                try:
                    for _ in range(args.polls):
                        start = time.perf_counter()
                        assert not list(source.frames("line", frames))
                        polls.append(time.perf_counter() - start)
                finally:
                    source.close()
            print(f"{frames} frames: first start {figures[0] * 1000:.0f} ms, restart {figures[1] * 1000:.0f} ms, "
                  f"poll with nothing new p50 {statistics.median(polls) * 1000:.1f} ms")
    finally:
        link.close()
        server.stop()
        shutil.rmtree(store)


if __name__ == "__main__":
    main()
