"""drill: replay a stream while killing random actors (line, ingest, writer), replay it again
without faults, and compare the two result tables row by row. Exit code 0 only when nothing
differs: no missing, duplicated or differing row."""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import ray

from actors.result_table import read_results

from .common import add_cluster_arguments, load_config_or_exit, quiet_logs
from .line_cluster import LineCluster, start_ray


def read_keyed_rows(results_dir: Path) -> dict[tuple[str, int], list[dict]]:
    rows: dict[tuple[str, int], list[dict]] = {}
    table = read_results(results_dir, columns=["line_id", "seq", "status", "score", "error"])
    for row in table.to_pylist():
        rows.setdefault((row["line_id"], row["seq"]), []).append(row)
    return rows


def compare_results(reference_dir: Path, candidate_dir: Path) -> dict:
    """Row-by-row verdict of `candidate` against `reference`, keyed by (line_id, seq)."""
    ref, cand = read_keyed_rows(reference_dir), read_keyed_rows(candidate_dir)
    missing = sorted(set(ref) - set(cand))
    extra = sorted(set(cand) - set(ref))
    duplicated = sorted(k for k, v in cand.items() if len(v) > 1)
    differing, max_diff = [], 0.0
    for key in set(ref) & set(cand):
        a, b = ref[key][0], cand[key][0]
        if (a["status"], a["error"]) != (b["status"], b["error"]) or (a["score"] is None) != (b["score"] is None):
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


class FaultInjector:
    """Kills `kills` random actors, one each time the stream passes the next of `kills` progress
    marks spread over the run."""

    def __init__(self, cluster: LineCluster, kills: int, total: int, seed: int):
        self.cluster = cluster
        self.rng = random.Random(seed)
        self.marks = sorted(self.rng.uniform(0.1, 0.8) * total for _ in range(kills))
        self.killed: list[str] = []

    def __call__(self, status: dict) -> None:
        if self.marks and sum(status["progress"].values()) >= self.marks[0]:
            self.marks.pop(0)
            name, actor = self.rng.choice(sorted(self.cluster.actors().items()))
            ray.kill(actor, no_restart=False)
            self.killed.append(name)
            print(f"drill: killed {name}", flush=True)


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
                events = ray.get(cluster.supervisor.status.remote())["events"]
                killed = injector.killed
        finally:
            cluster.shutdown()
    verdict = compare_results(runs["reference"], runs["faulty"])
    verdict.update({"killed": killed, "events": events})
    return verdict


def add_arguments(parser) -> None:
    add_cluster_arguments(parser)
    parser.add_argument("--kills", type=int, default=3, help="actors to kill during the faulty replay")
    parser.add_argument("--seed", type=int, default=0, help="chooses when and which actors die")


def main(args) -> int:
    cfg = load_config_or_exit(args.config, out=args.out)
    if cfg is None:
        return 2
    quiet_logs()
    v = run_drill(cfg, args.kills, args.seed, args.address, progress=not args.no_progress)
    ray.shutdown()
    print(f"killed: {', '.join(v['killed']) or 'nothing (the stream ended first)'}")
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
