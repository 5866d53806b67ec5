"""Wiring shared by the jobs: start Ray, materialize the source, create writer, line and ingest
actors from a validated PipelineConfig, and watch them with progress bars."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import ray
from tqdm import tqdm

from actors.ingest import IngestActor
from actors.line import LineActor
from actors.writer import ResultWriter
from configs.pipeline import FolderSourceConfig, PipelineConfig, SyntheticSourceConfig, open_source
from rareclip_core.synthetic import write_line_folder

REPO_ROOT = Path(__file__).resolve().parents[1]


def start_ray(address: Optional[str] = None, num_cpus: Optional[int] = None) -> None:
    """Join a cluster at `address`, or start an embedded local Ray (the default)."""
    if ray.is_initialized():
        return
    env = {"env_vars": {"PYTHONPATH": str(REPO_ROOT), "TQDM_DISABLE": "1"}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus or max(8, os.cpu_count() or 1), runtime_env=env, include_dashboard=False)


def materialize_source(cfg: PipelineConfig) -> PipelineConfig:
    """Synthetic lines are written as image folders (real files, so reports can show them)."""
    source = cfg.source
    if not isinstance(source, SyntheticSourceConfig):
        return cfg
    root = Path(cfg.out) / "frames"
    for i, (line, kind) in enumerate(source.lines.items()):
        folder = root / line
        if not folder.is_dir() or len(list(folder.glob("*.png"))) != source.frames:
            write_line_folder(folder, source.frames, kind, source.seed + i, source.size, source.defect_rate)
    folder_source = FolderSourceConfig(kind="folder", root=str(root), lines=list(source.lines))
    return cfg.model_copy(update={"source": folder_source})


class LineCluster:
    """The actors of one job: a ResultWriter, a LineActor per line, IngestActors over the lines."""

    def __init__(self, cfg: PipelineConfig, lines: Optional[list[str]] = None):
        self.cfg = materialize_source(cfg)
        self.source = open_source(self.cfg.source)
        self.lines = lines or self.source.lines()
        gpus = ray.cluster_resources().get("GPU", 0)
        num_gpus = 1 / self.cfg.lines_per_gpu if gpus else 0
        self.writer = ResultWriter.remote(str(self.cfg.results_dir), self.cfg.writer_batch_rows, self.cfg.writer_flush_s)
        detector = self.cfg.detector.model_dump()
        self.line_actors = {
            line: LineActor.options(num_cpus=self.cfg.line_num_cpus, num_gpus=num_gpus).remote(
                line,
                detector,
                self.writer,
                self.cfg.threshold_for(line),
                self.cfg.map_resolution,
                self.cfg.backbone_batch,
                self.cfg.gap_timeout_s,
            )
            for line in self.lines
        }
        n = min(self.cfg.ingest_actors, len(self.lines))
        groups = [self.lines[i::n] for i in range(n)]
        self.ingest = [
            IngestActor.remote(
                self.cfg.source,
                group,
                {line: self.line_actors[line] for line in group},
                self.cfg.max_in_flight,
                self.cfg.backbone_batch,
            )
            for group in groups
        ]

    def totals(self) -> dict[str, Optional[int]]:
        """Frames per line now in the source (None for a live source: it grows)."""
        if self.source.live:
            return {line: None for line in self.lines}
        return {line: sum(1 for _ in self.source.frames(line)) for line in self.lines}

    def run(self, progress: bool = True, flush_every_s: Optional[float] = None) -> dict[str, int]:
        """Feed all lines until the source ends (a live source: until interrupted), wait for
        every row to reach the writer, flush. Returns the number of frames per line."""
        totals = self.totals()
        runs = [ing.run.remote() for ing in self.ingest]
        bars = self._bars(totals) if progress else None
        last_flush = time.monotonic()
        try:
            while ray.wait(runs, num_returns=len(runs), timeout=0.5)[1]:
                if bars:
                    self._update(bars)
                if flush_every_s and time.monotonic() - last_flush >= flush_every_s:
                    self.writer.flush.remote()
                    last_flush = time.monotonic()
        except KeyboardInterrupt:
            ray.get([ing.stop.remote() for ing in self.ingest])
        next_seqs: dict[str, int] = {}
        for done in ray.get(runs):
            next_seqs.update(done)
        ray.get([self.line_actors[line].wait_until.remote(seq) for line, seq in next_seqs.items()])
        ray.get(self.writer.flush.remote())
        if bars:
            self._update(bars)
            for bar in bars.values():
                bar.close()
        return next_seqs

    def _bars(self, totals: dict[str, Optional[int]]) -> dict[str, tqdm]:
        known = [t for t in totals.values() if t is not None]
        bars = {"__all__": tqdm(total=sum(known) if len(known) == len(totals) else None, desc="all lines", position=0, unit="img")}
        for i, line in enumerate(self.lines, start=1):
            bars[line] = tqdm(total=totals[line], desc=line, position=i, unit="img", leave=True)
        return bars

    def _update(self, bars: dict[str, tqdm]) -> None:
        done = ray.get([self.line_actors[line].progress.remote() for line in self.lines])
        for line, p in zip(self.lines, done):
            bars[line].update(p["next_seq"] - bars[line].n)
        bars["__all__"].update(sum(p["next_seq"] for p in done) - bars["__all__"].n)

    def shutdown(self) -> None:
        for actor in [*self.ingest, *self.line_actors.values(), self.writer]:
            ray.kill(actor, no_restart=True)
