"""How long it takes, on a machine that cannot reach the Hugging Face Hub, to learn that named
weights ('openai', ...) cannot load: the project's path (`create_clip_model`: a connection probe,
then the local cache only) against OpenCLIP's own call (huggingface_hub retries each file).
Run it where the Hub is unreachable and the weights are not cached; prints figures, not a test.

    python benchmarks/offline_weights.py --model ViT-B-32 --tag openai
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import open_clip  # noqa: E402

from benchmarks.records import append_records  # noqa: E402
from rareclip_core.backbone.clip import create_clip_model  # noqa: E402
from rareclip_core.backbone.hub_access import hub_unreachable  # noqa: E402
from rareclip_core.detectors.rareclip.config import RareCLIPConfig  # noqa: E402


def seconds_to_fail(load) -> tuple[float, str]:
    """Seconds until `load()` raised, and the first line of what it raised."""
    start = time.perf_counter()
    try:
        load()
    except Exception as err:  # noqa: BLE001 - whatever each path raises is the figure's subject
        return time.perf_counter() - start, f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    raise SystemExit("the weights loaded: run this where the Hub is unreachable and they are not cached")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--tag", default="openai")
    parser.add_argument("--json", help="append the records to this JSON list (docs/benchmarks/...)")
    args = parser.parse_args(argv)
    reason = hub_unreachable()
    if reason is None:
        raise SystemExit("the Hub is reachable here: this measures a machine without network")
    logging.disable(logging.CRITICAL)  # the library's per-retry warnings are not the figure
    config = RareCLIPConfig(model=args.model, pretrained=args.tag, device="cpu")
    paths = {
        "project (probe, then the cache only)": lambda: create_clip_model(config),
        "OpenCLIP alone (huggingface_hub retries)": lambda: open_clip.create_model(args.model, pretrained=args.tag),
    }
    records = []
    print(f"Hub unreachable: {reason}")
    for name, load in paths.items():
        seconds, error = seconds_to_fail(load)
        print(f"{name:<42} {seconds:7.2f} s  {error}")
        records.append({"path": name, "model": args.model, "tag": args.tag, "seconds_to_fail": round(seconds, 3),
                        "error": error, "unreachable": reason})
    append_records(args.json, records)


if __name__ == "__main__":
    main()
