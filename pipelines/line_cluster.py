"""Wiring shared by the jobs: start Ray, materialize the source, create writer, line and ingest
actors from a validated PipelineConfig, and watch them with progress bars."""
from __future__ import annotations

import datetime as dt
import gc
import logging
import os
import shlex
import signal
import socket
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm import tqdm

from actors.ingest import IngestActor, IngestSettings, frames_per_submit
from actors.line import LineActor
from actors.line_settings import AutoThreshold, LineSettings
from actors.names import NAMESPACE, job_key, line_actor_name, supervisor_actor_name, writer_actor_name
from actors.result_table import STATUS_ERROR, append_event, line_id_problem, read_results
from actors.supervisor import Supervisor
from actors.table_compaction import CompactionSettings
from actors.writer import ResultWriter, WriterSettings
from configs.pipeline import (
    FolderSourceConfig,
    PipelineConfig,
    SyntheticSourceConfig,
    open_source,
)
from rareclip_core.config import ConfigError
from rareclip_core.data.synthetic import write_line_folder

from .job_lock import JobLock
from .placement import line_device_problem, place_lines
from .preflight import snapshot_settings_problem

REPO_ROOT = Path(__file__).resolve().parents[1]


def send_token_to_an_explicit_address() -> None:
    """Ray sends this machine's token (the one an embedded Ray started here uses, ~/.ray/auth_token)
    only when it finds the cluster itself (`auto`), not to an address given to it, where a
    cluster with token authentication then refuses the connection; a cluster without ignores the
    token. So: what Ray does for `auto` (when RAY_AUTH_MODE is not set and a token exists)."""
    try:
        from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    except ImportError:  # a Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def start_ray(address: Optional[str] = None, num_cpus: Optional[int] = None) -> None:
    """Join a cluster at `address`, or start an embedded local Ray (the default)."""
    if ray.is_initialized():
        return
    # the repository first, then whatever the caller's PYTHONPATH already holds
    pythonpath = os.pathsep.join(p for p in [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")] if p)
    env = {"env_vars": {"PYTHONPATH": pythonpath, "TQDM_DISABLE": "1"}}
    # Ray's console lines (token-auth notice, "Started a local Ray instance") only with -v
    console = {"logging_level": logging.INFO if logging.getLogger("ray").isEnabledFor(logging.INFO) else logging.ERROR}
    if address:
        if address != "auto":
            send_token_to_an_explicit_address()
        ray.init(address=address, namespace=NAMESPACE, runtime_env=env, log_to_driver=False, **console)
    else:
        ray.init(
            address="local",  # a new instance even when `ray start` left a cluster on this machine
            num_cpus=num_cpus or max(8, os.cpu_count() or 1),
            namespace=NAMESPACE,
            runtime_env=env,
            include_dashboard=False,
            log_to_driver=False,  # actors' logs stay in Ray's log folder; the job reports what matters
            **console,
        )


def stop_ray() -> None:
    """`ray.shutdown()` with no ObjectRef left in garbage cycles (an exception caught from
    `ray.get` holds its refs in one) and Python's cycle collector off meanwhile. While the
    driver's core worker shuts down, another thread running Python (a NATS link's, say) can
    start a collection; an ObjectRef it frees calls into the core worker that is gone, and Ray
    ends the whole process ("The core worker has already been shutdown ... The process will
    exit", exit code 1, no pytest summary)."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        ray.shutdown()
    finally:
        if enabled:
            gc.enable()


def synthetic_lines(source: SyntheticSourceConfig) -> dict[str, tuple[str, int]]:
    """Each synthetic line's (kind, seed): the i-th line draws from `seed + i`."""
    return {line: (kind, source.seed + i) for i, (line, kind) in enumerate(source.lines.items())}


def materialize_source(cfg: PipelineConfig) -> PipelineConfig:
    """Synthetic lines are written as image folders (real files, so reports can show them)."""
    source = cfg.source
    if not isinstance(source, SyntheticSourceConfig):
        return cfg
    root = Path(cfg.out) / "frames"
    for line, (kind, seed) in synthetic_lines(source).items():
        folder = root / line
        if not folder.is_dir() or len(list(folder.glob("*.png"))) != source.frames:
            write_line_folder(folder, source.frames, kind, seed, source.size, source.defect_rate)
    folder_source = FolderSourceConfig(kind="folder", root=str(root), lines=list(source.lines))
    return cfg.model_copy(update={"source": folder_source})


def running_line_actors(cfg: PipelineConfig, address: str, line: str):
    """A running job's line actor and supervisor on the cluster at `address` (None, None when
    the line is not running there; the supervisor None when it is gone)."""
    start_ray(address)
    key = job_key(cfg.results_dir)
    try:
        actor = ray.get_actor(line_actor_name(key, line), namespace=NAMESPACE)
    except ValueError:
        return None, None
    try:
        supervisor = ray.get_actor(supervisor_actor_name(key), namespace=NAMESPACE)
    except ValueError:
        supervisor = None
    return actor, supervisor


class RunningLineError(RuntimeError):
    """An operator's call to a running line failed: no such line actor runs, or the call raised."""


def call_running_line(cfg: PipelineConfig, address: str, line: str, method: str, *args):
    """`method(*args)` on the running line actor of `line` of this job on the cluster at
    `address`, and its result; RunningLineError naming the line (and the fix) when no such
    actor runs, when the call raised (its cause), or when the actor died meanwhile."""
    actor, _ = running_line_actors(cfg, address, line)
    if actor is None:
        raise RunningLineError(
            f"no running line actor for {line} of this job on {address}: check the line, --address and that "
            "--config/--out name the running job (without --address the command acts on a stopped job)"
        )
    try:
        return ray.get(getattr(actor, method).remote(*args))
    except ray.exceptions.RayTaskError as err:
        raise RunningLineError(f"line {line}: {method} failed: {err.cause}") from None
    except ray.exceptions.RayActorError:
        raise RunningLineError(
            f"line {line}: its actor died during {method}; the job restarts it: run the command again"
        ) from None


class SupervisorLost(RuntimeError):
    """The job's supervisor died; what was written is kept and a re-run resumes."""

    def __init__(self, cause):
        super().__init__(
            f"the job's supervisor died ({type(cause).__name__}); every row written so far is kept: "
            "run the same command again to resume from the lines' snapshots"
        )


NEW_LINES_EVERY_S = 2.0  # how often a live job looks for new lines in a watched folder or stream
JOIN_WAIT_S = 120.0  # a joining line whose actor is not up by then is said to wait (resources)
NOTICES_SHOWN = 10  # a run's summary names the first few notices


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


@dataclass
class RunSummary:
    """How a run ended: frames per line scored and persisted (`counts`), the source's totals
    where known, whether it was interrupted, and what the supervisor saw."""

    counts: dict[str, int]
    totals: dict[str, Optional[int]]
    interrupted: bool
    events: list[str]
    event_counts: dict[str, int]
    notices: list[str]  # what actors had the operator know: files a source left out, a writer that could not write

    def describe(self, results_dir: Path) -> list[str]:
        """One line per line of the job (rows, error rows, where it stands), one for the
        recoveries seen, the actors' notices; the resume hint when interrupted."""
        table = read_results(results_dir, columns=["line_id", "status"])
        rows = Counter(table["line_id"].to_pylist())
        errors = Counter(line for line, st in zip(table["line_id"].to_pylist(), table["status"].to_pylist()) if st == STATUS_ERROR)
        out = []
        for line, count in self.counts.items():
            total = self.totals.get(line)
            where = f"{count} of {total}" if total is not None else str(count)
            out.append(f"  {line}: {where} frames scored; table {plural(rows[line], 'row')}, {plural(errors[line], 'error row')}")
        if sum(errors[line] for line in self.counts):
            out.append(f"  why each error row: python run_cluster.py query --results {shlex.quote(str(results_dir))} "
                       "\"SELECT line_id, seq, uri, error FROM results WHERE status = 'error'\"")
        seen = ", ".join(f"{n} {kind}" for kind, n in sorted(self.event_counts.items())) or "none"
        out.append(f"  recoveries seen: {seen}")
        out += [f"  {text}" for text in self.notices[:NOTICES_SHOWN]]
        if len(self.notices) > NOTICES_SHOWN:
            out.append(f"  ... and {len(self.notices) - NOTICES_SHOWN} more such notices")
        if self.interrupted:
            out.append("  interrupted: run the same command again to resume where each line stopped")
        return out


@contextmanager
def sigterm_as_ctrl_c():
    """While inside, SIGTERM raises KeyboardInterrupt in the main thread, as Ctrl-C does (elsewhere:
    nothing changes; signal handlers belong to the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class TerminalProgress:
    """A bar for all lines and one per line (tqdm), redrawn in place on a terminal."""

    def __init__(self, lines: list[str], totals: dict[str, Optional[int]]):
        known = [totals.get(line) for line in lines if totals.get(line) is not None]
        overall = sum(known) if len(known) == len(lines) else None
        self.bars = {"__all__": tqdm(total=overall, desc="all lines", position=0, unit="img")}
        for i, line in enumerate(lines, start=1):
            self.bars[line] = tqdm(total=totals.get(line), desc=line, position=i, unit="img")

    def update(self, progress: dict[str, int]) -> None:
        for line, seq in progress.items():
            if line not in self.bars:  # a line that joined the job
                self.bars[line] = tqdm(desc=line, position=len(self.bars), unit="img")
            self.bars[line].update(seq - self.bars[line].n)
        self.bars["__all__"].update(sum(progress.values()) - self.bars["__all__"].n)

    def say(self, text: str) -> None:
        """A line above the bars."""
        tqdm.write(text, file=sys.stderr)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


class PlainProgress:
    """Off a terminal (a log file, CI): one plain line every `every_s` seconds, and at the end."""

    def __init__(self, lines: list[str], totals: dict[str, Optional[int]], every_s: float = 10.0, stream=None):
        self.totals, self.every_s, self.stream = totals, every_s, stream or sys.stderr
        self.progress = {line: 0 for line in lines}
        self.last = time.monotonic()
        self.started = self.last

    def update(self, progress: dict[str, int]) -> None:
        self.progress.update(progress)
        if time.monotonic() - self.last >= self.every_s:
            self._print()

    def say(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        self._print()

    def _print(self) -> None:
        self.last = time.monotonic()
        parts = [f"{line} {n}" + (f"/{self.totals[line]}" if self.totals.get(line) is not None else "")
                 for line, n in self.progress.items()]
        print(f"progress {self.last - self.started:.0f}s: {sum(self.progress.values())} frames ({', '.join(parts)})",
              file=self.stream, flush=True)


@dataclass
class JoiningLine:
    """A line found while the job runs, whose actor is being built (`LineCluster._build_new_lines`)."""

    actor: object
    started: ray.ObjectRef  # its `progress` call: done once the actor is built
    since: float  # time.monotonic() when it was created
    said_waiting: bool = False  # told the operator it waits for resources


class LineCluster:
    """The actors of one job: a ResultWriter, a LineActor per line, IngestActors over the lines,
    and the Supervisor that snapshots lines and brings crashed actors back."""

    def __init__(self, cfg: PipelineConfig, lines: Optional[list[str]] = None, fit_all: bool = False):
        """`fit_all`: every line must run at once (evaluate), so the GPU and CPU shares are made
        to fit the cluster (see `placement.place_lines`)."""
        # before anything is written to `out`; the Ray address for an operator's --address meanwhile
        address = ray.get_runtime_context().gcs_address if ray.is_initialized() else None
        self.lock = JobLock(cfg.out).acquire(address)
        try:
            self._start(cfg, lines, fit_all)
        except BaseException:
            self.lock.release()
            raise

    def _start(self, cfg: PipelineConfig, lines: Optional[list[str]], fit_all: bool) -> None:
        self.cfg = cfg = materialize_source(cfg)
        self.source = open_source(cfg.source)
        self.lines = list(lines or self.source.lines())
        self.key = job_key(cfg.results_dir)
        supervisor_name = supervisor_actor_name(self.key)
        resources = ray.cluster_resources()
        self.place = place_lines(len(self.lines), resources, cfg.lines_per_gpu, cfg.line_num_cpus, fit_all)
        problems = sorted({p for line in self.lines if (p := self._device_problem(line, resources))})
        if problems:
            raise ConfigError("\n".join(problems))
        writer_name = writer_actor_name(self.key)
        self.writer = ResultWriter.options(name=writer_name).remote(
            str(cfg.results_dir), self._writer_settings(), supervisor_name, cfg.verdict_stream
        )
        self.line_actors = {line: self._new_line_actor(line) for line in self.lines}
        self.finds_lines = cfg.takes_new_lines(lines)
        self.joining: dict[str, JoiningLine] = {}  # lines found while running whose actor is being built
        self.gone_since: dict[str, float] = {}  # lines whose folder or subject is gone: since when (monotonic)
        self.retiring: dict[str, ray.ObjectRef] = {}  # lines being retired: the supervisor's `retire_line`
        self.passed_over: set[str] = set()  # lines found that cannot join (said once)
        n = min(cfg.ingest_actors, len(self.lines))
        groups = [self.lines[i::n] for i in range(n)]
        ingest = IngestSettings(
            max_in_flight=cfg.max_in_flight,
            frames_per_submit=frames_per_submit(cfg.backbone_batch, cfg.max_in_flight),
            poll_s=getattr(cfg.source, "poll_s", IngestSettings.poll_s),  # folder and NATS sources
            ledger_dir=cfg.ledger_dir,
            decoding=cfg.frame_decoding,
            decode_threads=cfg.decode_threads,
        )
        self.ingest = [
            IngestActor.remote(cfg.source, group, self.key, ingest, i, supervisor_name)
            for i, group in enumerate(groups)
        ]
        # constructed (lines restored) before the supervisor exists, so that only a restart reports itself to it
        started = ray.get([a.progress.remote() for a in self.line_actors.values()])
        ray.get([a.ready.remote() for a in self.ingest] + [self.writer.status.remote()])
        failed = [f"line {line}: {p['error']}" for line, p in zip(self.line_actors, started) if p.get("error")]
        if failed:
            self.shutdown_actors()
            raise ConfigError("a line's detector could not be built:\n  " + "\n  ".join(failed))
        # the supervisor cannot be restarted (its feeds and positions would be lost): it runs on
        # the driver's node, so that only what ends the job anyway (the driver's node) ends it
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.supervisor = Supervisor.options(name=supervisor_name, scheduling_strategy=here).remote(
            self.writer, self.line_actors, list(zip(self.ingest, groups)), cfg.snapshot.every_frames, cfg.snapshot.every_s,
            str(cfg.results_dir),
        )

    def _device_problem(self, line: str, resources: dict) -> Optional[str]:
        field = f"line_detector.{line}.device" if "device" in self.cfg.line_detector.get(line, {}) else "detector.device"
        return line_device_problem(self.cfg.detector_for(line).device, resources, field)

    def _new_line_actor(self, line: str):
        return LineActor.options(
            name=line_actor_name(self.key, line),
            num_cpus=self.place.num_cpus,
            num_gpus=self.place.num_gpus,
            resources=self.cfg.line_resources,
        ).remote(line, self.cfg.detector_for(line), writer_actor_name(self.key),
                 self._line_settings(line, supervisor_actor_name(self.key)))

    def _writer_settings(self) -> WriterSettings:
        cfg = self.cfg
        return WriterSettings(cfg.writer_batch_rows, cfg.writer_flush_s,
                              CompactionSettings(cfg.writer_compact_files, cfg.writer_compact_rows), cfg.maps_keep_days,
                              cfg.writer_max_held_rows)

    def _line_settings(self, line: str, supervisor_name: str) -> LineSettings:
        cfg = self.cfg
        threshold = cfg.threshold_for(line)
        return LineSettings(
            threshold=None if threshold == "auto" else threshold,
            auto_threshold=AutoThreshold(cfg.auto_threshold.frames, cfg.auto_threshold.mads) if threshold == "auto" else None,
            map_resolution=cfg.map_resolution,
            map_dtype=cfg.map_dtype,
            map_resize=cfg.map_resize,
            backbone_batch=cfg.backbone_batch,
            gap_timeout_s=cfg.gap_timeout_s,
            snapshot_root=cfg.snapshot_root,
            snapshot_keep=cfg.snapshot.keep,
            supervisor_name=supervisor_name,
            references=tuple(str(Path(u).expanduser().resolve()) if "://" not in u else u for u in cfg.references.get(line, ())),
            reference_log=cfg.reference_log_dir(line),
            decoding=cfg.frame_decoding,
        )

    def source_totals(self) -> dict[str, int]:
        """Frames per line in a finite source."""
        return {line: self.source.frame_count(line) for line in self.lines}

    def actors(self) -> dict[str, object]:
        """Every actor a fault drill may kill, by a readable name."""
        named = {f"line:{line}": a for line, a in self.line_actors.items()}
        named.update({f"ingest:{i}": a for i, a in enumerate(self.ingest)})
        named["writer"] = self.writer
        return named

    def run(self, progress: bool = True, flush_every_s: Optional[float] = None, on_poll=None) -> RunSummary:
        """Feed all lines until the source ends (a live source: until interrupted), wait until
        every row is persisted. `on_poll(status)` is called about twice a second (the fault
        drill uses it). Ctrl-C stops reading, finishes the frames in flight, flushes and
        snapshots every line (a second Ctrl-C leaves at once: the next run resumes all the same).
        SIGTERM (systemd, `docker stop`, `kill`) is taken as Ctrl-C."""
        with sigterm_as_ctrl_c():
            return self._run(progress, flush_every_s, on_poll)

    def _run(self, progress: bool, flush_every_s: Optional[float], on_poll) -> RunSummary:
        append_event(self.cfg.results_dir, "job", f"started: {len(self.lines)} lines (pid {os.getpid()} on {socket.gethostname()})")
        try:
            ray.get(self.supervisor.start.remote())
            done = self.supervisor.wait_done.remote()
            status = ray.get(self.supervisor.status.remote())
        except ray.exceptions.RayActorError as err:
            raise SupervisorLost(err) from None
        totals = status["totals"]
        bars = (TerminalProgress if sys.stderr.isatty() else PlainProgress)(self.lines, totals) if progress else None
        last_flush = last_look = time.monotonic()
        interrupted = abandoned = False
        told = {"events": 0, "notices": 0}  # what the bars have said of the supervisor's lists

        def show(status: dict) -> None:
            if bars:
                bars.update(status["progress"])
            for kind in told:  # recoveries and the actors' notices, as they happen (local time), bars or not
                for text in status[kind][told[kind]:]:
                    stamped = f"{dt.datetime.now():%Y-%m-%d %H:%M:%S} {text}"
                    bars.say(stamped) if bars else print(stamped, file=sys.stderr, flush=True)
                told[kind] = len(status[kind])

        try:
            try:
                while not ray.wait([done], timeout=0.5)[0]:
                    status = ray.get(self.supervisor.status.remote())
                    show(status)
                    if on_poll:
                        on_poll(status)
                    if self.finds_lines and time.monotonic() - last_look >= NEW_LINES_EVERY_S:
                        self._build_new_lines()
                        last_look = time.monotonic()
                    if self.joining:
                        self._admit_built_lines()
                    if self.retiring:
                        self._let_retired_lines_go()
                    if flush_every_s and time.monotonic() - last_flush >= flush_every_s:
                        self.writer.try_flush.remote()  # a failure is the writer's notice, not an error here
                        last_flush = time.monotonic()
            except KeyboardInterrupt:
                interrupted = True
                print("\nstopping: scoring the frames in flight, then flushing and snapshotting every line "
                      "(Ctrl-C again to leave at once)", file=sys.stderr, flush=True)
                ray.get(self.supervisor.stop.remote())
                cannot_write = ray.get(self.writer.status.remote())["cannot_write"]
                if cannot_write:
                    print(f"the result writer cannot write ({cannot_write}): stopping waits until it can (free "
                          "space), or Ctrl-C again to leave (the next run scores the rows it holds again)",
                          file=sys.stderr, flush=True)
            try:
                while not ray.wait([done], timeout=0.5)[0]:  # what happens meanwhile is said as it comes
                    show(ray.get(self.supervisor.status.remote()))
                counts = ray.get(done)
                if interrupted:
                    ray.get(self.supervisor.snapshot_all.remote())
                ray.get(self.writer.compact_all.remote())  # each line's files of a date as one
            except KeyboardInterrupt:
                abandoned = True
                counts = ray.get(self.writer.status.remote())["last_seq"]
                counts = {line: counts.get(line, -1) + 1 for line in self.lines}
            status = ray.get(self.supervisor.status.remote())
            show(status)  # what came after the last poll
            if bars:
                bars.update(counts)
        except ray.exceptions.RayActorError as err:
            raise SupervisorLost(err) from None
        finally:
            if bars:
                bars.close()
        append_event(self.cfg.results_dir, "job", f"{'stopped' if interrupted or abandoned else 'ended'}: "
                     f"{sum(counts.values())} frames scored in all")
        return RunSummary(counts, {line: totals.get(line) for line in self.lines}, interrupted or abandoned,
                          status["events"], status["event_counts"], status["notices"])

    def _build_new_lines(self) -> None:
        """Lines that appeared in the watched source since the job started (a folder, a camera's
        first frame): each gets its actor (restoring the line's snapshots of an earlier run, if
        any), admitted once built (`_admit_built_lines`). A line that cannot join is said once. A
        stream whose server is down, or a folder share that is away, is looked at again next time
        (the feeds wait for it too, and say it if it lasts)."""
        try:
            found = self.source.lines()
        except OSError:  # NatsError is one too
            return
        self._retire_gone_lines(found)
        for line in sorted(set(found) - set(self.line_actors) - set(self.joining) - self.passed_over):
            problem = line_id_problem(line)
            resources = ray.cluster_resources()
            try:
                place_lines(len(self.line_actors) + len(self.joining) + 1, resources,
                            self.cfg.lines_per_gpu, self.cfg.line_num_cpus)
            except ConfigError as err:
                problem = problem or f"{err}, then restart the job"
            if not problem and (problem := self._device_problem(line, resources)):
                problem += "; then restart the job"
            if not problem and (problem := snapshot_settings_problem(self.cfg, line)):
                problem += "; then restart the job"
            if problem:
                self._passed_over(line, f"line {line} appeared ({self.source.line_address(line)}), but cannot join: {problem}")
                continue
            actor = self._new_line_actor(line)
            self.joining[line] = JoiningLine(actor, actor.progress.remote(), time.monotonic())

    def _retire_gone_lines(self, found: list[str]) -> None:
        """A line gone from the source for `retire_gone_lines_s` is retired (`Supervisor.retire_line`)."""
        now = time.monotonic()
        for line in found:
            self.gone_since.pop(line, None)
        limit = self.cfg.retire_gone_lines_s
        for line in set(self.line_actors) - set(found) - set(self.retiring):
            since = self.gone_since.setdefault(line, now)
            if limit is not None and now - since >= limit:
                why = f"{self.source.line_address(line)} has been gone for {now - since:.0f} s"
                self.retiring[line] = self.supervisor.retire_line.remote(line, why, line_actor_name(self.key, line))

    def _let_retired_lines_go(self) -> None:
        """The lines the supervisor has retired leave the job's actors: one that comes back joins
        again (`_build_new_lines`), its GPU share counted anew."""
        for line, retired in list(self.retiring.items()):
            if ray.wait([retired], timeout=0)[0]:
                del self.retiring[line]
                if ray.get(retired) is not None:
                    del self.line_actors[line]
                    self.gone_since.pop(line, None)

    def _admit_built_lines(self) -> None:
        """The joining lines whose actor is built: the supervisor has ingestion feed each, and
        watches and snapshots it; one that failed to build is said and let go."""
        for line, joining in list(self.joining.items()):
            actor = joining.actor
            if not ray.wait([joining.started], timeout=0)[0]:
                if time.monotonic() - joining.since >= JOIN_WAIT_S and not joining.said_waiting:
                    joining.said_waiting = True
                    self.supervisor.notice.remote(
                        f"line {line} has waited {JOIN_WAIT_S:.0f} s for its actor to start: the cluster may lack the "
                        f"{self.place.num_cpus:g} CPU and {self.place.num_gpus:g} GPU a line asks (line_num_cpus, lines_per_gpu)")
                continue
            del self.joining[line]
            try:
                error = ray.get(joining.started).get("error")
            except ray.exceptions.RayError as err:
                error = str(err).strip().splitlines()[-1][:300]
            if error:
                ray.kill(actor, no_restart=True)
                self._passed_over(line, f"line {line} cannot join: its detector could not be built: {error}")
                continue
            ray.get(self.supervisor.add_line.remote(line, actor, f"{self.source.line_address(line)} appeared"))
            self.line_actors[line] = actor
            if line not in self.lines:  # not a retired line that came back
                self.lines.append(line)

    def _passed_over(self, line: str, text: str) -> None:
        self.passed_over.add(line)
        self.supervisor.notice.remote(text)

    def shutdown_actors(self) -> None:
        joining = [j.actor for j in getattr(self, "joining", {}).values()]
        for actor in [getattr(self, "supervisor", None), *self.ingest, *self.line_actors.values(), *joining, self.writer]:
            if actor is not None:
                ray.kill(actor, no_restart=True)

    def shutdown(self) -> None:
        self.shutdown_actors()
        if hasattr(self.source, "close"):  # a NATS source's connection
            self.source.close()
        self.lock.release()
