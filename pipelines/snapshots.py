"""snapshots: list, reset or restore a line's snapshots.

  list     every snapshot of a line (default: of every line): its name, the seqs it covers,
           size, when it was written, and whether a (re)start would accept it or why not.
  reset    start the line's learning afresh at its current position (a product changeover).
           With --address (the job runs on that cluster): the running line actor resets its
           detector, snapshots the empty state and deletes its older snapshots. Without
           --address the job must be stopped (a running one is named, with its --address): a snapshot of the empty state is written at the
           seq after the line's last row in the result table, then the older snapshots are
           deleted, so the next start of the job continues from there with an empty memory.
  restore  make snapshot NAME the line's newest by deleting the newer ones, so the next start
           (or restart) of the line resumes from it. With --address the running line also loads
           it now and ingestion replays the frames after it; without, the job must be stopped. Rows the table already holds past
           NAME stay as they are: the writer keeps one row per (line, seq) and drops the
           re-computed ones, so only frames not yet written get scores from the restored state.
"""
from __future__ import annotations

import datetime as dt
import sys

from actors.result_table import persisted_last_seqs
from actors.snapshots import SnapshotStore, snapshot_lines
from rareclip_core.config import ConfigError

from .common import add_cluster_arguments, load_config_or_exit
from .job_lock import JobLock, JobLockError

ACTIONS = ("list", "reset", "restore")


def add_arguments(parser) -> None:
    parser.epilog = __doc__.split("\n", 2)[2]
    parser.add_argument("action", choices=ACTIONS, help="list, reset or restore")
    add_cluster_arguments(parser, address_help="the Ray cluster the job runs on: act on its running line (without: the job is stopped)")
    parser.add_argument("--line", help="the line (required by reset and restore)")
    parser.add_argument("--snapshot", help="restore: the snapshot to go back to (a name `list` shows)")


def _size(n) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "?"


def _created(iso) -> str:
    if not iso:
        return "?"
    try:
        return dt.datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S UTC")
    except ValueError:
        return str(iso)


def list_snapshots(cfg, line=None) -> int:
    root = cfg.snapshot_root
    present = snapshot_lines(root)
    if line and line not in present:
        print(f"error: line {line} has no snapshots under {root} (lines with snapshots: {', '.join(present) or 'none'})",
              file=sys.stderr)
        return 2
    lines = [line] if line else present
    if not lines:
        print(f"no snapshots under {root}")
        return 0
    for line_id in lines:
        fingerprint = cfg.detector_for(line_id).fingerprint()
        store = SnapshotStore(root, line_id)
        infos = store.list()
        print(f"{line_id}: {len(infos)} snapshot(s) in {store.dir}, newest first")
        for info in reversed(infos):
            d = store.describe(info, fingerprint)
            verdict = "valid" if d["problem"] is None else f"REJECTED: {d['problem']}"
            print(
                f"  {d['name']}  seqs 0-{d['next_seq'] - 1}  {_size(d['bytes']):>10}  {_created(d['created_utc'])}  {verdict}"
            )
    return 0


def reset_line(cfg, line: str, address=None) -> int:
    if address:
        from .line_cluster import RunningLineError, call_running_line

        try:
            next_seq = call_running_line(cfg, address, line, "reset")
        except RunningLineError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(f"line {line}: reset by the running job; it learns afresh from seq {next_seq}")
        return 0

    from actors.line_sequencer import start_afresh
    from rareclip_core import build_detector

    store = SnapshotStore(cfg.snapshot_root, line)
    old = store.list()
    persisted = persisted_last_seqs(cfg.results_dir)
    if line not in persisted and not old:
        print(f"error: line {line} has no rows in {cfg.results_dir} and no snapshots: nothing to reset", file=sys.stderr)
        return 2
    next_seq = persisted.get(line, -1) + 1
    detector = build_detector(cfg.detector_for(line))
    start_afresh(detector, tuple(cfg.references.get(line, ())), cfg.frame_decoding)
    # the new snapshot first, then the old ones go: a crash in between leaves the reset one newest
    saved = store.save(detector.state_dict(), next_seq, detector.config.fingerprint(), detector.config.fingerprinted_settings())
    older = [info for info in old if info.name != saved.name]
    for info in older:
        store.delete(info)
    replaced = " (it replaced the one of the same seq)" if len(older) < len(old) else ""
    print(
        f"line {line}: reset at seq {next_seq} (the row after the last in the table){replaced}; "
        f"{len(older)} older snapshot(s) deleted; the next start learns afresh from there"
    )
    return 0


def restore_line(cfg, line: str, name: str, address=None) -> int:
    store = SnapshotStore(cfg.snapshot_root, line)
    infos = store.list()
    target = next((i for i in infos if i.name == name or (name.isdigit() and i.next_seq - 1 == int(name))), None)
    if target is None:
        names = ", ".join(i.name for i in reversed(infos)) or "none"
        print(f"error: line {line} has no snapshot {name} (it has: {names})", file=sys.stderr)
        return 2
    problem = store.describe(target, cfg.detector_for(line).fingerprint())["problem"]
    if problem:
        print(f"error: snapshot {target.name} would be rejected: {problem}", file=sys.stderr)
        return 1
    newer = [i for i in infos if i.next_seq > target.next_seq]
    for info in newer:
        store.delete(info)
    print(f"line {line}: {target.name} is now the newest snapshot ({len(newer)} newer deleted)")
    if address:
        import ray

        from .line_cluster import running_line_actors

        actor, supervisor = running_line_actors(cfg, address, line)
        if actor is None:
            print(f"no running line actor for {line} on {address}: the next start resumes from {target.name}")
            return 0
        # at_most: a snapshot the running line took since the deletion is not the one asked for
        next_seq = ray.get(actor.restore.remote(target.next_seq))
        if supervisor is not None:
            ray.get(supervisor.line_restored.remote(line, next_seq, f"operator restore of {target.name}"))
        print(
            f"line {line}: the running line restored seq {next_seq} and replays from there; "
            "rows already in the table past it are kept and their re-computed ones dropped"
        )
    return 0


def main(args) -> int:
    cfg = load_config_or_exit(args.config, check=False, out=args.out)
    if cfg is None:
        return 2
    if args.action != "list" and not args.line:
        print(f"error: snapshots {args.action} needs --line", file=sys.stderr)
        return 2
    if args.action == "list":
        return list_snapshots(cfg, args.line)
    if args.action == "restore" and not args.snapshot:
        print("error: snapshots restore needs --snapshot NAME (see `snapshots list`)", file=sys.stderr)
        return 2
    if args.address:
        return act(cfg, args)
    try:  # a stopped job's: a running line would write its own snapshots over the change
        with JobLock(cfg.out):
            return act(cfg, args)
    except JobLockError as err:
        print(f"error: {err}. To {args.action} the running job's line, {err.address_hint()}", file=sys.stderr)
        return 2
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def act(cfg, args) -> int:
    if args.action == "reset":
        return reset_line(cfg, args.line, args.address)
    return restore_line(cfg, args.line, args.snapshot, args.address)
