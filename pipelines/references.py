"""references: give a line normal reference images while it runs, or list those given.

  add   the chosen frames of the line (--seq, from the result table) and/or image files
        (--image) become normal references from the line's next frame on. They are copied
        into <out>/references/<line>/ and recorded with the seq they take effect at, so a crash,
        a restore or a replay applies them again before exactly the same frame. With --address
        (the job runs on that cluster): the running line takes them before its next frame.
        Without --address the job must be stopped: they take effect at the seq after the line's
        last row in the result table, when the job next runs.
        A detector that takes references mid-stream (AdaptCLIP) adds them to those it holds;
        RareCLIP, whose k-shot references come before its stream, starts the line afresh with
        its configured references and these.
  list  the references added to a line (default: every line), with their seqs.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pyarrow.compute as pc

from actors.reference_log import ReferenceLog
from actors.result_table import persisted_last_seqs, read_results
from rareclip_core.config import ConfigError
from rareclip_core.registry import detector_class

from .common import add_cluster_arguments, load_config_or_exit
from .job_lock import JobLock, JobLockError

ACTIONS = ("add", "list")


def add_arguments(parser) -> None:
    parser.epilog = __doc__.split("\n", 2)[2]
    parser.add_argument("action", choices=ACTIONS, help="add or list")
    add_cluster_arguments(parser, address_help="the Ray cluster the job runs on: give the running line its references (without: the job is stopped)")
    parser.add_argument("--line", help="the line (required by add)")
    parser.add_argument("--seq", type=int, nargs="+", default=[], help="add: frames of the line, by seq, as references")
    parser.add_argument("--image", nargs="+", default=[], help="add: image files as references")


def frames_by_seq(cfg, line: str, seqs: list[int]) -> list[str]:
    """The uris of the line's frames `seqs` (ok rows of the result table); ValueError naming
    those that have none."""
    table = read_results(cfg.results_dir, columns=["seq", "uri", "status"], line_id=line)
    table = table.filter(pc.equal(table["status"], "ok"))
    uris = dict(zip(table["seq"].to_pylist(), table["uri"].to_pylist()))
    missing = [s for s in seqs if s not in uris]
    if missing and not uris:
        lines = sorted(persisted_last_seqs(cfg.results_dir))
        raise ValueError(f"--line: line {line} has no scored frame in {cfg.results_dir} "
                         f"(its lines: {', '.join(lines) or 'none yet'})")
    if missing:
        raise ValueError(f"--seq: line {line} has no scored frame with seq {', '.join(map(str, missing))} in {cfg.results_dir}")
    return [uris[s] for s in seqs]


def add_references(cfg, line: str, uris: list[str], address=None) -> int:
    if address:
        from .line_cluster import RunningLineError, call_running_line

        try:
            at_seq = call_running_line(cfg, address, line, "add_references", uris)
        except RunningLineError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(f"line {line}: {len(uris)} reference(s) taken by the running line from seq {at_seq}")
        return 0
    with JobLock(cfg.out):  # a running job's line would not see them: refuse while one runs
        at_seq = persisted_last_seqs(cfg.results_dir).get(line, -1) + 1
        ReferenceLog(cfg.reference_log_dir(line), cfg.frame_decoding).add(at_seq, uris)
    print(f"line {line}: {len(uris)} reference(s) recorded; they take effect at seq {at_seq} when the job next runs")
    return 0


def list_references(cfg, line=None) -> int:
    root = cfg.references_dir
    lines = [line] if line else sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    shown = 0
    for name in lines:
        for addition in ReferenceLog(cfg.reference_log_dir(name)).additions:
            print(f"{name}  from seq {addition.at_seq}: {', '.join(Path(f).name for f in addition.files)}")
            shown += 1
    if not shown:
        print("no references were added while running" + (f" to line {line}" if line else ""))
    return 0


def main(args) -> int:
    cfg = load_config_or_exit(args.config, check=False, out=args.out)
    if cfg is None:
        return 2
    if args.action == "list":
        return list_references(cfg, args.line)
    if not args.line or not (args.seq or args.image):
        print("error: references add needs --line and at least one --seq or --image", file=sys.stderr)
        return 2
    kind = cfg.detector_for(args.line).kind
    if not detector_class(cfg.detector_for(args.line)).supports_references:
        print(f"error: line {args.line}: detector kind {kind!r} takes no normal references", file=sys.stderr)
        return 2
    missing = [path for path in args.image if not Path(path).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        print(f"error: --image {missing[0]}: no such file{more}", file=sys.stderr)
        return 2
    try:
        uris = frames_by_seq(cfg, args.line, args.seq) + [str(Path(p).resolve()) for p in args.image]
        return add_references(cfg, args.line, uris, args.address)
    except JobLockError as err:  # another job holds `out`
        print(f"error: {err}. To give the running job references, {err.address_hint()}", file=sys.stderr)
        return 2
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as err:  # a seq without a frame, an unreadable image (FrameError)
        print(f"error: {err}", file=sys.stderr)
        return 2
