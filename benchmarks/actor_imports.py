"""What a fresh actor process pays to import its module before its constructor runs: each
module is imported in a new Python process (as a Ray worker does), `--repeats` times; prints
the median seconds and whether torch came with it. Prints figures; not a test.

    python benchmarks/actor_imports.py --repeats 5
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.records import append_records  # noqa: E402

MODULES = {  # the actor -> the module its class lives in (a line imports its sequencer and detector when constructed)
    "line's handle": "actors.line",  # what every process holding a handle to a line imports (Ray loads the class)
    "line+rareclip": "actors.line, actors.line_sequencer, rareclip_core.detectors.rareclip.detector",
    "result writer": "actors.writer",
    "ingestion": "actors.ingest",
    "supervisor": "actors.supervisor",
}
PROBE = ("import sys, time; t = time.perf_counter(); import {module}; "
         "print(time.perf_counter() - t, 'torch' in sys.modules)")


def import_seconds(module: str) -> tuple[float, bool]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(module=module)], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.split()
    return float(out[0]), out[1] == "True"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="append the records to this JSON list (docs/benchmarks/...)")
    args = parser.parse_args(argv)
    records = []
    print(f"{'actor':<14} {'module':<78} {'median s':>8}  torch")
    for actor, module in MODULES.items():
        runs = [import_seconds(module) for _ in range(args.repeats)]
        median = statistics.median(s for s, _ in runs)
        print(f"{actor:<14} {module:<78} {median:8.2f}  {'yes' if runs[0][1] else 'no'}")
        records.append({"actor": actor, "module": module, "median_import_s": round(median, 3),
                        "imports_torch": runs[0][1], "repeats": args.repeats})
    append_records(args.json, records)


if __name__ == "__main__":
    main()
