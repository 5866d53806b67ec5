"""Step latency of one line's RareCLIPDetector, with a per-section breakdown, once its memories are full.

Usage (repository root):
    PYTHONPATH=. python benchmarks/step_latency.py --config configs/detector-tiny.yaml --steps 50 --fill
    PYTHONPATH=. python benchmarks/step_latency.py --config configs/detector-paper.yaml --pretrained none \\
        --steps 3 --warmup 1 --fill        # ViT-L-14-336 at 518 with random weights (same cost)

Each measured step is `detector.step(image)` on a synthetic H x W x 3 uint8 frame: preprocess,
backbone, text branch, the 8 rarity banks (incl. SCS sampling), image rarity + re-scoring,
upsample + blur, results to the host. Latency is wall time per step (CUDA synchronized by the
results' transfer to the host). The breakdown comes from `step(..., timings=dict)`, which
synchronizes CUDA at section boundaries; on CUDA it is therefore taken in a second pass over
the same number of steps, so that the latency figures are free of those syncs.

`--fill` first brings the line to steady state: max(N_I,max, ceil(N_F / M)) + margin cheap
synthetic frames (noisy copies of the backbone features of a few frames, no backbone pass) go
through `step_features`, so every bank holds N_F features and N_I,max PSM rows; then the image
memory (IRB / re-scoring, capacity 1000 in the paper) is topped up to its capacity with noisy
copies of its entries added directly (its per-step cost depends only on its size). Without
`--fill` the figures are for a line that is still filling up (and say so).

Memory: on CUDA, torch.cuda.max_memory_allocated over the measured steps (weights, line state
and step work space of this one line). On CPU, the peak RSS (VmHWM, reset before the measured
steps) minus the RSS before the detector was built: weights + state + work space + allocator
slack of the process, a rougher figure.

`--profile DIR` then profiles a few more calls of the backbone and of the whole step
(benchmarks/profiling.py): device busy time against wall time, kernels and launch calls per call,
top-ops tables and Chrome traces in DIR.

Last line printed: ``p50_ms=<x> p99_ms=<y> peak_mem_mb=<z>`` (p99 by linear interpolation; with
few steps it is close to the max).
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.* when run as a script

from benchmarks.profiling import describe, profile_calls  # noqa: E402
from benchmarks.records import append_records, device_name  # noqa: E402
from benchmarks.weights import with_weights  # noqa: E402
from rareclip_core.detectors.rareclip.config import RareCLIPConfig  # noqa: E402
from rareclip_core.detectors.rareclip.detector import FrameFeatures, RareCLIPDetector  # noqa: E402
from rareclip_core.detectors.rareclip.memory import PatchRarityBank  # noqa: E402

SECTIONS = ["preprocess", "backbone", "text", "banks", "image_rarity", "fusion", "rescore", "output"]


def synthetic_frames(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """Stripe textures with noise and small shifts; every 7th frame has a bright blob."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    frames = []
    for i in range(n):
        shift = rng.integers(0, 6)
        base = 120 + 60 * np.sin((xx + shift) / (size / 36))
        img = np.stack([base, base * 0.8, base * 0.6], axis=-1) + rng.normal(0, 6, (size, size, 3))
        if i % 7 == 3:
            cy, cx = rng.integers(size // 5, 4 * size // 5, size=2)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < (size / 15) ** 2] = [250, 20, 20]
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
    return frames


def rss_mb(field: str = "VmRSS") -> float:
    """Resident set size (or its high-water mark, VmHWM) of this process in MiB, from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def state_mb(detector: RareCLIPDetector) -> float:
    return sum(v.numel() * v.element_size() for v in detector.state_dict().values()) / 2**20


def fill(detector: RareCLIPDetector, frames: list[np.ndarray], margin: int, seed: int) -> dict:
    """Stream cheap synthetic feature frames until the banks are full, then top up the image memory."""
    cfg = detector.config
    m = detector.n_patches
    n_frames = max(cfg.max_images, math.ceil(cfg.max_features / m)) + margin
    gen = torch.Generator().manual_seed(seed)
    bases = detector.encode(frames[:2])
    t0 = time.perf_counter()
    for i in range(n_frames):
        base = bases[i % len(bases)]
        tokens = {}
        for b, tok in base.tokens.items():
            noise = torch.randn(tok.shape, generator=gen).to(tok.device)
            tokens[b] = tok + 0.1 * tok.std() * noise
        noise = torch.randn(base.embedding.shape, generator=gen).to(base.embedding.device)
        embedding = torch.nn.functional.normalize(base.embedding + 0.05 * noise, dim=0)
        detector.step_features(FrameFeatures(embedding, tokens), update=True)
    fill_s = time.perf_counter() - t0
    memory = detector.image_memory
    topped = 0
    with torch.inference_mode():
        while len(memory) < memory.capacity:
            j = int(torch.randint(0, len(memory), (1,), generator=gen))
            emb = memory.embeddings[j] + 0.02 * torch.randn(memory.embeddings.shape[1], generator=gen).to(memory.embeddings.device)
            laif = memory.laifs[:, j] + 0.02 * torch.randn(memory.laifs[:, j].shape, generator=gen).to(memory.laifs.device)
            memory.add(
                torch.nn.functional.normalize(emb, dim=0),
                torch.nn.functional.normalize(laif, dim=-1),
                memory.scores[j].clone(),
            )
            topped += 1
    return {"frames": n_frames, "seconds": fill_s, "image_memory_topped_up": topped}


def banks_full(detector: RareCLIPDetector) -> bool:
    cfg, bank = detector.config, detector.banks
    if isinstance(bank, PatchRarityBank) and len(bank) < cfg.max_features:
        return False
    return bank.n_images >= cfg.max_images


class TorchCallCounter(TorchFunctionMode):
    """Counts the torch functions and tensor methods called (a proxy for kernel launches and
    Python dispatch overhead, which bound a small step on a GPU)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def torch_calls_per_step(detector: RareCLIPDetector, frame) -> int:
    """Torch calls of one `step_features` after the backbone (the state is changed by it)."""
    features = detector.encode([frame])[0]
    counter = TorchCallCounter()
    with counter:
        detector.step_features(features)
    return counter.calls


def aten_ops_per_step(detector: RareCLIPDetector, frame) -> int:
    """Top-level aten ops of one `step_features` after the backbone (torch.profiler; an op called
    by another is not counted): a proxy for kernel launches that also sees inside compiled code."""
    features = detector.encode([frame])[0]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        detector.step_features(features)
    return sum(
        e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
        for e in prof.events()
    )


def run_steps(detector, frames, n, timings_on, device):
    latencies, sections, stale = [], [], []
    for i in range(n):
        timings = {} if timings_on else None
        t0 = time.perf_counter()
        detector.step(frames[i % len(frames)], timings=timings)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        latencies.append(time.perf_counter() - t0)
        if timings_on:
            sections.append(timings)
        stale.append(getattr(detector.banks, "last_stale", 0))
    return np.array(latencies) * 1000, sections, stale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="detector YAML (e.g. configs/detector-tiny.yaml)")
    parser.add_argument("--steps", type=int, default=50, help="measured steps")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps after the fill")
    parser.add_argument("--fill", action="store_true", help="fill banks and image memory first (steady state)")
    parser.add_argument("--fill-margin", type=int, default=5)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: the config's)")
    parser.add_argument("--pretrained", default=None, help="override: 'none' for random weights, or a path")
    parser.add_argument("--precision", default=None, choices=["auto", "fp32", "fp16", "bf16"], help="backbone precision override")
    parser.add_argument("--bank-dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--cuda-graphs", action="store_true", help="replay the backbone as a CUDA graph (CUDA only)")
    parser.add_argument("--compile-banks", action="store_true",
                        help="step the full bank stack through torch.compile (compiled while the detector is built)")
    parser.add_argument("--resize-on-device", action="store_true", help="resize frames on the device, not with PIL")
    parser.add_argument("--branch", default=None, choices=["iprb", "dprb"], help="override rarity_branch (dprb: RareCLIP-d)")
    parser.add_argument("--frame-size", type=int, default=None, help="synthetic frame side (default: image_size)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="append the figures as a record to this JSON list")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="after the measured steps, profile the backbone and the whole step (torch.profiler): "
                             "device busy time, kernels and launches per call; top-ops tables and traces in DIR")
    parser.add_argument("--profile-calls", type=int, default=5, help="profiled calls of each (with --profile)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = RareCLIPConfig.from_yaml(args.config)
    if args.pretrained is not None:
        cfg = with_weights(cfg, args.pretrained)
    update = {}
    if args.device:
        update["device"] = args.device
    if args.precision:
        update["precision"] = args.precision
    if args.bank_dtype:
        update["bank_dtype"] = args.bank_dtype
    if args.branch:
        update["rarity_branch"] = args.branch
    if args.resize_on_device:
        update["resize_on_device"] = True
    if args.cuda_graphs:
        update["cuda_graphs"] = True
    if args.compile_banks:
        update["compile_banks"] = True
    cfg = cfg.model_copy(update=update)

    rss_before = rss_mb()
    t0 = time.perf_counter()
    detector = RareCLIPDetector(cfg)
    device = detector.device
    build_s = time.perf_counter() - t0
    weights_mb = sum(p.numel() * p.element_size() for p in detector.backbone.parameters()) / 2**20
    weights_mb += sum(p.numel() * p.element_size() for p in detector.text_projection.parameters()) / 2**20
    frames = synthetic_frames(max(8, min(args.steps + args.warmup, 32)), args.frame_size or cfg.image_size, args.seed)

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    print(f"date={datetime.date.today()} host={platform.node()} cpu_cores={os.cpu_count()} torch={torch.__version__} "
          f"threads={torch.get_num_threads()} device={device}{' (' + gpu + ')' if gpu else ''}")
    print(f"config={args.config} model={cfg.model} pretrained={cfg.pretrained} image_size={cfg.image_size} "
          f"M={detector.n_patches} N_F={cfg.max_features} N_I,max={cfg.max_images} image_memory={cfg.image_memory_size} "
          f"banks={len(detector.bank_keys)} ({cfg.rarity_branch}, {cfg.sampler}) precision={cfg.precision} ({detector.backbone.dtype}) bank_dtype={cfg.bank_dtype} "
          f"cuda_graphs={cfg.cuda_graphs and device.type == 'cuda'} compile_banks={cfg.compile_banks} resize_on_device={cfg.resize_on_device} frame={frames[0].shape[1]}x{frames[0].shape[0]}")
    print(f"build: {build_s:.1f} s, weights {weights_mb:.1f} MB")

    if args.fill:
        info = fill(detector, frames, args.fill_margin, args.seed)
        print(f"fill: {info['frames']} synthetic feature frames through step_features in {info['seconds']:.1f} s "
              f"({1000 * info['seconds'] / info['frames']:.1f} ms each, no backbone), then "
              f"{info['image_memory_topped_up']} image-memory entries added directly")
    for i in range(args.warmup):
        detector.step(frames[i % len(frames)])
    full = banks_full(detector)
    bank = detector.banks
    psm = tuple(bank.image_similarity.shape) if isinstance(bank, PatchRarityBank) else None
    print(f"state before measuring: images_seen={detector.images_seen} bank features={len(bank) if isinstance(bank, PatchRarityBank) else '-'} "
          f"PSM={psm} image_memory={len(detector.image_memory)}/{cfg.image_memory_size} state={state_mb(detector):.1f} MB "
          f"-> banks full: {'yes' if full else 'NO (not steady state; use --fill)'}")

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        allocated_before = torch.cuda.memory_allocated(device) / 2**20
    peak_reset = reset_peak_rss()

    on_cpu = device.type != "cuda"
    lat, sections, stale = run_steps(detector, frames, args.steps, timings_on=on_cpu, device=device)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
        mem_note = (f"peak_mem_mb = torch.cuda.max_memory_allocated over the measured steps "
                    f"({allocated_before:.0f} MB allocated before them: weights + state)")
        _, sections, _ = run_steps(detector, frames, args.steps, timings_on=True, device=device)
    else:
        peak_mb = rss_mb("VmHWM") - rss_before
        mem_note = (f"peak_mem_mb = CPU peak RSS delta: VmHWM during the measured steps"
                    f"{'' if peak_reset else ' (could not reset: whole run)'} minus RSS before building the detector "
                    f"({rss_before:.0f} MB); not GPU memory")

    print(f"\nper step over {args.steps} steps (ms): p50 {np.percentile(lat, 50):.2f}  p99 {np.percentile(lat, 99):.2f}  "
          f"mean {lat.mean():.2f}  min {lat.min():.2f}  max {lat.max():.2f}")
    print(f"breakdown ({'second pass, CUDA synchronized per section' if device.type == 'cuda' else 'same steps'}), ms:")
    print(f"  {'section':<22}{'p50':>10}{'p99':>10}{'mean':>10}{'share':>8}")
    total = sum(np.mean([s.get(k, 0.0) for s in sections]) for k in SECTIONS)
    for key in SECTIONS:
        values = np.array([s.get(key, 0.0) for s in sections]) * 1000
        print(f"  {key:<22}{np.percentile(values, 50):>10.2f}{np.percentile(values, 99):>10.2f}{values.mean():>10.2f}"
              f"{values.mean() / 10 / total:>7.1f}%")
    print(f"incremental SCS: stale rows recomputed per step (all banks): mean {np.mean(stale):.1f} max {max(stale)}")
    if cfg.compile_banks:
        print(f"compiled banks: {'in use' if detector.banks.compiles else 'NOT in use: compiling failed (see the warning above)'}")
    print(f"torch calls per step after the backbone: {torch_calls_per_step(detector, frames[0])}; "
          f"top-level aten ops: {aten_ops_per_step(detector, frames[1])}")
    profiles = []
    if args.profile:
        frame_iter = itertools.cycle(frames)
        profiles = [
            profile_calls("backbone", lambda: detector.encode([frames[0]]), args.profile_calls, device, args.profile),
            profile_calls("step", lambda: detector.step(next(frame_iter)), args.profile_calls, device, args.profile),
        ]
        for summary in profiles:
            print(describe(summary))
        print(f"profile tables and traces (chrome://tracing, Perfetto): {args.profile}")
    print(f"state after: images_seen={detector.images_seen} state={state_mb(detector):.1f} MB")
    print(mem_note)
    print(f"p50_ms={np.percentile(lat, 50):.2f} p99_ms={np.percentile(lat, 99):.2f} peak_mem_mb={peak_mb:.1f}")
    append_records(args.json, [{
        "what": "step_latency", "device": device_name(device), "config": args.config, "model": cfg.model,
        "image_size": cfg.image_size, "lines": 1, "precision": str(detector.backbone.dtype), "bank_dtype": cfg.bank_dtype,
        "rarity_branch": cfg.rarity_branch, "cuda_graphs": cfg.cuda_graphs and device.type == "cuda", "compile_banks": cfg.compile_banks and detector.banks.compiles,
        "resize_on_device": cfg.resize_on_device, "frame_size": frames[0].shape[0], "banks_full": full, "steps": args.steps,
        "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
        "max_memory_mb": peak_mb if device.type == "cuda" else None, "cpu_peak_rss_rise_mb": None if device.type == "cuda" else peak_mb,
        "images_per_s": 1000 / float(np.percentile(lat, 50)),
        "breakdown_p50_ms": {k: float(np.percentile([s.get(k, 0.0) for s in sections], 50) * 1000) for k in SECTIONS},
        "profile": profiles or None,
    }])


if __name__ == "__main__":
    main()
