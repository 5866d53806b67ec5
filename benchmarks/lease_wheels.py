"""Wheels for a lent GPU machine that has PyTorch but not this project's other packages, and no
network: downloads them (cp312, manylinux x86-64, the versions installed here) into `.whl/`, with
Ray's Java jars and the dashboard's source maps left out so that the folder stays under the 64 MiB
a device call may carry. Then, on the device: `python3 -m pip install -q --no-index --no-deps
--no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site`.

    python benchmarks/lease_wheels.py            # the packages such a machine lacked (2026-12)
    python benchmarks/lease_wheels.py duckdb     # others, by name
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# what the GPU suite imports that the lent machines' image lacks, with what those need in turn
MISSING_THERE = [
    "ray", "open_clip_torch", "ftfy", "wcwidth", "pydantic", "pydantic_core", "annotated_types",
    "typing_inspection", "jsonschema", "jsonschema_specifications", "referencing", "rpds_py",
]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]
NOT_NEEDED = ("ray/jars/", ".map")  # Java workers; the dashboard's source maps
LIMIT_MB = 64


def download(names: list[str], folder: Path) -> None:
    pins = [f"{name}=={version(name)}" for name in names]
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(folder), *pins],
                   check=True)


def not_needed(path: str) -> bool:
    return any(path.startswith(part) if part.endswith("/") else path.endswith(part) for part in NOT_NEEDED)


def slim(wheel: Path) -> None:
    """Rewrite `wheel` without the entries NOT_NEEDED names, and its RECORD without their lines."""
    slimmed = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as old, zipfile.ZipFile(slimmed, "w", zipfile.ZIP_DEFLATED) as new:
        for item in old.infolist():
            if not_needed(item.filename):
                continue
            data = old.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if not not_needed(line.split(",", 1)[0])).encode()
            new.writestr(item, data)
    slimmed.replace(wheel)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=MISSING_THERE, help="distributions (installed here)")
    parser.add_argument("--folder", default=str(REPO / ".whl"))
    args = parser.parse_args()
    folder = Path(args.folder)
    folder.mkdir(exist_ok=True)
    download(args.names, folder)
    for wheel in folder.glob("ray-*.whl"):
        slim(wheel)
    total_mb = sum(w.stat().st_size for w in folder.glob("*.whl")) / 2**20
    print(f"{len(list(folder.glob('*.whl')))} wheels, {total_mb:.1f} MiB in {folder}")
    if total_mb > LIMIT_MB - 4:
        print(f"error: over {LIMIT_MB - 4} MiB: the tree and the wheels must fit in {LIMIT_MB} MiB a call", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
