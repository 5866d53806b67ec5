"""camera: publish a folder of images to a line's NATS subject at a given rate, as a camera or a
vision PC would (each file's bytes; its path in the `Frame-Uri` header, shown in the uri column),
and print the verdicts the line publishes back (a `live` job with `verdicts:` set)."""
from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

from configs.pipeline import DEFAULT_NATS_URL, NatsSourceConfig, VerdictsConfig
from rareclip_core.data.datasets import IMAGE_SUFFIXES

from .common import existing_folder


def add_arguments(parser) -> None:
    parser.add_argument("--line", required=True, help="the line id (subject <subject-prefix>.<line>)")
    parser.add_argument("--folder", required=True, type=existing_folder, help="images to publish, in name order")
    parser.add_argument("--rate", type=float, default=2.0, help="frames per second (0: as fast as possible)")
    parser.add_argument("--loop", action="store_true", help="start over at the end, until Ctrl-C")
    parser.add_argument("--url", default=DEFAULT_NATS_URL, help="the NATS server")
    parser.add_argument("--stream", default=NatsSourceConfig.model_fields["stream"].default, help="the JetStream stream of frames")
    parser.add_argument("--subject-prefix", default=NatsSourceConfig.model_fields["subject_prefix"].default,
                        help="frames go to <this>.<line>")
    parser.add_argument("--verdicts", default=VerdictsConfig.model_fields["subject_prefix"].default,
                        help="print the verdicts published to <this>.<line> (default: verdicts)")
    parser.add_argument("--wait-s", type=float, default=30.0, help="at the end, wait this long for the last verdicts")


def main(args) -> int:
    from rareclip_core.data.nats_stream import NatsError, NatsLink, StreamSettings, publish_frame

    files = sorted(p for p in Path(args.folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if Path(args.folder).is_dir() else []
    if not files:
        print(f"error: --folder: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {args.folder}", file=sys.stderr)
        return 2
    settings = StreamSettings(args.url, args.stream, args.subject_prefix)
    run = uuid.uuid4().hex[:12]  # message ids: a retried publish is stored once, a second run is new frames
    published = 0
    try:
        link = NatsLink(args.url)
    except NatsError as err:
        print(f"error: --url: {err}", file=sys.stderr)
        return 2
    verdicts = []

    def show(data: bytes) -> None:
        verdicts.append(verdict := json.loads(data))
        flag = {True: "ANOMALY", False: "normal", None: ""}[verdict["is_anomaly"]]
        score = "-" if verdict["score"] is None else f"{verdict['score']:.4f}"
        print(f"  verdict {verdict['line_id']}#{verdict['seq']}: {verdict['status']} score {score} {flag} "
              f"{verdict['error'] or ''}".rstrip(), flush=True)

    try:
        link.subscribe(f"{args.verdicts}.{args.line}", show)
        link.ensure_stream(settings)
        print(f"publishing {len(files)} images to {settings.subject(args.line)} on {args.url} "
              f"({args.rate:g}/s{', looping' if args.loop else ''}; Ctrl-C to stop)", flush=True)
        while True:
            for path in files:
                started = time.monotonic()
                seq = publish_frame(link, settings, args.line, path.read_bytes(), str(path.resolve()), f"{run}:{published}")
                published += 1
                print(f"  {path.name} -> stream seq {seq}", flush=True)
                if args.rate > 0:
                    time.sleep(max(0.0, 1.0 / args.rate - (time.monotonic() - started)))
            if not args.loop:
                break
        deadline = time.monotonic() + args.wait_s
        while len(verdicts) < published and time.monotonic() < deadline:
            time.sleep(0.1)
    except NatsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    finally:
        link.close()
    print(f"published {published} frames to {settings.subject(args.line)}; {len(verdicts)} verdicts seen")
    return 0
