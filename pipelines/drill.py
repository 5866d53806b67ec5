"""drill: replay a stream while killing random actors (line, ingest, writer), replay it again
without faults, and compare the two result tables row by row. Exit code 0 only when nothing
differs: no missing, duplicated or differing row."""
from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import ray

from actors.result_table import read_results

from .common import add_cluster_arguments, at_least, load_config_or_exit
from .line_cluster import LineCluster, start_ray, stop_ray


def read_keyed_rows(results_dir: Path) -> dict[tuple[str, int], list[dict]]:
    rows: dict[tuple[str, int], list[dict]] = {}
    table = read_results(results_dir, columns=["line_id", "seq", "status", "score", "error", "threshold", "is_anomaly"])
    for row in table.to_pylist():
        rows.setdefault((row["line_id"], row["seq"]), []).append(row)
    return rows


def compare_results(reference_dir: Path, candidate_dir: Path) -> dict:
    """Row-by-row verdict of `candidate` against `reference`, keyed by (line_id, seq): a row
    differs when its status, error, threshold, verdict or score does (scores compared exactly)."""
    ref, cand = read_keyed_rows(reference_dir), read_keyed_rows(candidate_dir)
    missing = sorted(set(ref) - set(cand))
    extra = sorted(set(cand) - set(ref))
    duplicated = sorted(k for k, v in cand.items() if len(v) > 1)
    differing, max_diff = [], 0.0
    for key in set(ref) & set(cand):
        a, b = ref[key][0], cand[key][0]
        verdict = ("status", "error", "threshold", "is_anomaly")
        if any(a[k] != b[k] for k in verdict) or (a["score"] is None) != (b["score"] is None):
            differing.append(key)
        elif a["score"] is not None and a["score"] != b["score"]:
            differing.append(key)
            max_diff = max(max_diff, abs(a["score"] - b["score"]))
    return {
        "rows": len(ref),
        "missing": missing,
        "extra": extra,
        "duplicated": duplicated,
        "differing": sorted(differing),
        "max_score_diff": max_diff,
        "ok": not (missing or extra or duplicated or differing),
    }


RESTART_KIND = {"line": "line restarts", "ingest": "ingest restarts", "writer": "writer restarts"}


class FaultInjector:
    """Kills `kills` random actors, one each time the stream passes the next of `kills` progress
    marks spread over the run, and only once the supervisor has seen the previous victim come
    back (so every kill is matched by one restart in the report)."""

    def __init__(self, cluster: LineCluster, kills: int, total: int, seed: int):
        self.cluster = cluster
        self.rng = random.Random(seed)
        self.marks = sorted(self.rng.uniform(0.1, 0.8) * total for _ in range(kills))
        self.killed: list[str] = []
        self.awaiting: tuple[str, int] | None = None  # (restart kind, its count before the kill)
        self.furthest = 0

    def __call__(self, status: dict) -> None:
        counts = status["event_counts"]
        if self.awaiting is not None:
            kind, before = self.awaiting
            if counts.get(kind, 0) <= before:
                return  # the last victim is not back yet
            self.awaiting = None
        self.furthest = max(self.furthest, sum(status["progress"].values()))  # a restored line goes back
        if self.marks and self.furthest >= self.marks[0]:
            self.marks.pop(0)
            # a line that has scored its whole stream would come back after the run has ended
            finished = {f"line:{line}" for line, seq in status["progress"].items() if seq >= (status["totals"].get(line) or 1e18)}
            victims = sorted((name, actor) for name, actor in self.cluster.actors().items() if name not in finished)
            name, actor = self.rng.choice(victims)
            kind = RESTART_KIND[name.split(":")[0]]
            self.awaiting = (kind, counts.get(kind, 0))
            ray.kill(actor, no_restart=False)
            self.killed.append(name)
            print(f"drill: killed {name}", flush=True)

    def wait_for_last_restart(self, timeout_s: float = 120.0) -> dict:
        """The supervisor's status once the last victim is back (a kill just before the stream
        ended is seen restarting after the run)."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = ray.get(self.cluster.supervisor.status.remote())
            if self.awaiting is None or time.monotonic() > deadline:
                return status
            kind, before = self.awaiting
            if status["event_counts"].get(kind, 0) > before:
                self.awaiting = None
                return status
            time.sleep(0.2)


def run_drill(cfg, kills: int, seed: int = 0, address=None, progress=False) -> dict:
    out = Path(cfg.out)
    # a line waiting for replayed frames must not give up on them while an actor restarts
    cfg = cfg.model_copy(update={"gap_timeout_s": max(cfg.gap_timeout_s, 600.0)})
    start_ray(address)
    runs = {}
    for name in ("faulty", "reference"):
        shutil.rmtree(out / name, ignore_errors=True)
        run_cfg = cfg.model_copy(update={"out": str(out / name)})
        cluster = LineCluster(run_cfg)
        try:
            injector = None
            if name == "faulty":
                injector = FaultInjector(cluster, kills, sum(cluster.source_totals().values()), seed)
            cluster.run(progress=progress, on_poll=injector)
            runs[name] = run_cfg.results_dir
            if injector:
                status = injector.wait_for_last_restart()
                events, restarts, killed = status["events"], status["event_counts"], injector.killed
        finally:
            cluster.shutdown()
    verdict = compare_results(runs["reference"], runs["faulty"])
    verdict.update({"killed": killed, "events": events, "restarts": restarts})
    return verdict


def add_arguments(parser) -> None:
    add_cluster_arguments(parser)
    parser.add_argument("--kills", type=at_least(0), default=3, help="actors to kill during the faulty replay")
    parser.add_argument("--seed", type=int, default=0, help="chooses when and which actors die")


def main(args) -> int:
    cfg = load_config_or_exit(args.config, out=args.out)
    if cfg is None:
        return 2
    v = run_drill(cfg, args.kills, args.seed, args.address, progress=not args.no_progress)
    stop_ray()
    print(f"killed {len(v['killed'])}: {', '.join(v['killed']) or 'nothing (the stream ended first)'}")
    restarts = {kind: n for kind, n in v["restarts"].items() if kind in RESTART_KIND.values()}
    print(f"restarts seen {sum(restarts.values())}: " + (", ".join(f"{n} {k}" for k, n in sorted(restarts.items())) or "none"))
    for event in v["events"]:
        print(f"  supervisor: {event}")
    print(
        f"verdict: {v['rows']} reference rows; missing {len(v['missing'])}, extra {len(v['extra'])}, "
        f"duplicated {len(v['duplicated'])}, differing {len(v['differing'])}, max score diff {v['max_score_diff']:g}"
    )
    for label in ("missing", "extra", "duplicated", "differing"):
        if v[label]:
            print(f"  {label}: {v[label][:10]}{' ...' if len(v[label]) > 10 else ''}")
    print("PASS: the faulty run equals the fault-free run" if v["ok"] else "FAIL: the tables differ")
    return 0 if v["ok"] else 1
