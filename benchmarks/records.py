"""Raw benchmark figures as JSON records (docs/benchmarks/<date>-<what>.json): one list per file,
each run appends its records, so one file can hold a whole session's runs on a device."""
from __future__ import annotations

import json
import platform
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def device_name(device: torch.device | str) -> str:
    """`torch.cuda.get_device_name()` on CUDA, else the CPU and its thread count (torch is
    imported here: the scripts of the pipeline's actors and writer measure processes without it)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def rss_mb(proc: Path) -> float:
    """The resident memory (MiB) of the process at `proc` (/proc/<pid> or /proc/self; Linux)."""
    status = (proc / "status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")) / 1024


def command_line() -> str:
    return "python " + shlex.join(sys.argv)


def append_records(path: str | Path | None, records: list[dict]) -> None:
    """Append `records` (each gets the command that made it) to the JSON list at `path`."""
    if not path:
        return
    path = Path(path)
    existing = json.loads(path.read_text()) if path.exists() else []
    command = command_line()
    existing.extend({**record, "command": command} for record in records)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(existing, indent=1) + "\n")
