"""Where a call's time goes: torch.profiler over a few calls, reduced to the figures that tell a
host-bound call from a device-bound one, plus the top-ops table and a Chrome trace for a person.

Per call: wall time (inflated a little by the profiler itself), device busy time (the union of
the intervals in which a kernel or copy ran, so overlapping streams count once), kernels and
copies run, and the host's launch calls (`cudaLaunchKernel` and kin, `cudaGraphLaunch`). A call
whose device busy time is far below its wall time is bound by the host: by Python dispatch and
launches, which CUDA graphs remove. On a CPU there are no device events: only the table.
"""
from __future__ import annotations

import gzip
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchCooperativeKernel")
GRAPH_LAUNCH_CALLS = ("cudaGraphLaunch", "cuGraphLaunch")
COPY_PREFIXES = ("Memcpy", "Memset")
# the profiler's own log lines (profiler_start/stop markers; on a CPU-only machine an error for
# the missing GPU): silent without CUDA, errors only with it; a caller's setting wins
os.environ.setdefault("KINETO_LOG_LEVEL", "4" if torch.cuda.is_available() else "6")


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by `intervals` ((start, end) pairs), each point counted once."""
    covered, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        covered += end - max(start, reach)
        reach = end
    return covered


def profile_calls(name: str, call: Callable[[], object], n: int, device: torch.device, out_dir: str | Path) -> dict:
    """Profile `n` calls of `call` (after one unprofiled call); write `<name>-top-ops.txt` and
    `<name>-trace.json.gz` under `out_dir`; return the per-call figures."""
    on_cuda = device.type == "cuda"

    def sync() -> None:
        if on_cuda:
            torch.cuda.synchronize(device)

    call()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            call()
        sync()
        wall_s = time.perf_counter() - t0
    events = prof.events()
    device_events = [e for e in events if e.device_type == DeviceType.CUDA]
    copies = [e for e in device_events if e.name.startswith(COPY_PREFIXES)]
    summary = {
        "name": name,
        "calls": n,
        "wall_ms": 1000 * wall_s / n,
        "device_busy_ms": union_length([(e.time_range.start, e.time_range.end) for e in device_events]) / 1000 / n
        if on_cuda
        else None,
        "kernels": (len(device_events) - len(copies)) / n if on_cuda else None,
        "copies": len(copies) / n if on_cuda else None,
        "launch_calls": sum(e.name in LAUNCH_CALLS for e in events) / n,
        "graph_launches": sum(e.name in GRAPH_LAUNCH_CALLS for e in events) / n,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sort_by = "self_device_time_total" if on_cuda else "self_cpu_time_total"
    (out / f"{name}-top-ops.txt").write_text(prof.key_averages().table(sort_by=sort_by, row_limit=30) + "\n")
    trace = out / f"{name}-trace.json"
    prof.export_chrome_trace(str(trace))
    with trace.open("rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    trace.unlink()
    return summary


def describe(summary: dict) -> str:
    """One line: `profile <name>: wall, device busy (share), kernels, copies, launches per call`."""
    text = f"profile {summary['name']}: per call over {summary['calls']} calls: wall {summary['wall_ms']:.2f} ms"
    if summary["device_busy_ms"] is None:
        return text + " (no device events: CPU)"
    share = 100 * summary["device_busy_ms"] / summary["wall_ms"] if summary["wall_ms"] else 0.0
    return (
        f"{text}, device busy {summary['device_busy_ms']:.2f} ms ({share:.0f}%), kernels {summary['kernels']:.0f}, "
        f"copies {summary['copies']:.0f}, launch calls {summary['launch_calls']:.0f}, graph launches {summary['graph_launches']:.0f}"
    )
