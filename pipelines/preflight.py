"""Checks a job's configuration can pass before Ray starts: every problem found, each naming the
setting at fault and the fix, so that nothing fails later inside an actor."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from actors.result_table import line_id_problem
from actors.snapshots import SnapshotStore
from configs.pipeline import (
    FolderSourceConfig,
    ManifestSourceConfig,
    NatsSourceConfig,
    PipelineConfig,
    SyntheticSourceConfig,
    open_source,
)
from rareclip_core.data.frames import FrameError, decode_frame


def job_problems(cfg: PipelineConfig, lines: Optional[list[str]] = None) -> list[str]:
    """What would stop the job: an unreadable source, lines that do not exist or cannot be
    named, settings for unknown lines, reference images that would be refused as frames, missing
    weight files, an output folder it cannot write. Empty when all is well."""
    problems: list[str] = [problem] if (problem := out_problem(cfg.out)) else []
    known = _source_lines(cfg, problems)
    chosen = list(lines or known or [])
    if lines and known is not None:
        problems += [f"--lines: no line {line!r} in the source (it has {', '.join(known)})" for line in lines if line not in known]
    for line in chosen:
        problem = line_id_problem(line)
        if problem:
            problems.append(f"source: {problem}; rename the line (its folder, or its id in the manifest)")
    for field in ("thresholds", "line_detector", "references"):
        unknown = [line for line in getattr(cfg, field) if known is not None and line not in known]
        if cfg.takes_new_lines(lines):  # settings of a line that may appear while the job runs
            problems += [f"{field}: {line_id_problem(line)}" for line in unknown if line_id_problem(line)]
            chosen += [line for line in unknown if line not in chosen]
        else:
            problems += [f"{field}.{line}: no line {line!r} in the source (it has {', '.join(known)})" for line in unknown]
    for line in chosen:
        problems += _reference_problems(cfg, line)
        problem = snapshot_settings_problem(cfg, line)
        if problem:
            problems.append(f"line {line}: {problem}")
    if cfg.verdict_stream is not None:
        from rareclip_core.data.nats_stream import NatsError, NatsLink

        try:
            NatsLink(cfg.verdict_stream.url).close()
        except NatsError as err:
            problems.append(f"verdicts.url: {err}")
    tags_checked: dict[tuple, list[str]] = {}  # (model, tag) -> its problems: the Hub is asked once
    for line in chosen or [None]:
        detector = cfg.detector if line is None else cfg.detector_for(line)
        problems += [p for p in weights_problems(detector, tags_checked) if p not in problems]
    return problems


def out_problem(out: str) -> Optional[str]:
    """Why a job could not write its output folder `out` (None when it can)."""
    return writable_problem(out, "folder", "out", "give the job another --out (or `out:` in the config)")


def writable_problem(path: str, want: str, name: str, fix: str) -> Optional[str]:
    """Why `path` cannot be written as a `want` ("folder" or "file"): it is the other kind, it
    lies under a file, or the folder it would go in is not writable by this user. `name` is the
    setting or option that gave it, `fix` what to do. None when it can."""
    target = Path(path).expanduser().absolute()
    if want == "file" and target.is_dir():
        return f"{name}: {path} is a folder; {fix}"
    folders = target.parents if want == "file" else (target, *target.parents)  # a file there is overwritten
    existing = next(p for p in folders if p.exists())
    if not existing.is_dir():
        where = "is a file, not a folder" if existing == target else f"lies under {existing}, which is a file"
        return f"{name}: {path} {where}; {fix}"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{name}: {existing} is not writable by this user; {fix}"
    return None


def weights_problems(detector, tags_checked: Optional[dict[tuple, list[str]]] = None) -> list[str]:
    """Weight files the detector names that are missing, and a named weights tag that cannot
    load here (see `named_weights_problem`); `tags_checked` caches the tags' answers."""
    tags_checked = {} if tags_checked is None else tags_checked
    key = (detector.model, detector.pretrained)
    if key not in tags_checked:
        tags_checked[key] = []
        if detector.pretrained_tag is not None:
            from rareclip_core.backbone.clip import named_weights_problem  # OpenCLIP (and torch) only for a named tag

            problem = named_weights_problem(detector)
            tags_checked[key] = [problem] if problem else []
    return detector.weight_file_problems() + tags_checked[key]


def _reference_problems(cfg: PipelineConfig, line: str) -> list[str]:
    """A line's configured reference files (local ones) that do not decode as its frames would."""
    problems = []
    for i, uri in enumerate(cfg.references.get(line, ())):
        if "://" in uri:
            continue
        try:
            decode_frame(Path(uri).expanduser().read_bytes(), cfg.frame_decoding)
        except FrameError as err:
            problems.append(f"references.{line}[{i}]: {uri}: {err}")
    return problems


SETTINGS_NAMED = 3  # the differences a snapshot message names


def snapshot_settings_problem(cfg: PipelineConfig, line: str) -> Optional[str]:
    """Why the line must not start: its snapshots were all made with other detector settings, so
    it would reject them, learn again from seq 0 and score its whole history again, unasked."""
    store = SnapshotStore(cfg.snapshot_root, line)
    manifests = [m for m in map(store.manifest, store.list()) if m]
    detector = cfg.detector_for(line)
    if not manifests or any(m.get("config_fingerprint") == detector.fingerprint() for m in manifests):
        return None
    newest = manifests[-1]
    then = newest.get("detector_settings")
    if isinstance(then, dict):
        now = detector.fingerprinted_settings()
        keys = ["kind"] if then.get("kind") != now.get("kind") else sorted({*then, *now})  # another kind: all else differs
        changed = [f"{k}: {then.get(k)!r} then, {now.get(k)!r} now" for k in keys if then.get(k) != now.get(k)]
        more = f"; and {len(changed) - SETTINGS_NAMED} more" if len(changed) > SETTINGS_NAMED else ""
        what = f" ({'; '.join(changed[:SETTINGS_NAMED])}{more})"
    else:
        what = ""
    return (
        f"its snapshots in {store.dir} (the newest covers seqs 0-{newest.get('next_seq', 0) - 1}) were made with other "
        f"detector settings{what}; with these it would learn again from seq 0 and score every frame again. Go on with the "
        f"earlier settings; or have it learn afresh from where it stopped: `snapshots reset --line {line}` with this "
        "config; or write to another out"
    )


def _source_lines(cfg: PipelineConfig, problems: list[str]) -> Optional[list[str]]:
    """The source's lines (None when it cannot be read, with the reason added to `problems`)."""
    source = cfg.source
    if isinstance(source, SyntheticSourceConfig):
        return list(source.lines)
    if isinstance(source, FolderSourceConfig) and source.lines:
        missing = [line for line in source.lines if not (Path(source.root) / line).is_dir()]
        problems += [f"source.lines: no folder {Path(source.root) / line} for line {line!r}" for line in missing]
    try:
        opened = open_source(source)
        found = opened.lines()
        if isinstance(source, NatsSourceConfig):
            opened.close()
    except (FileNotFoundError, ValueError, ConnectionError) as err:
        nats_field = "source.url" if isinstance(err, ConnectionError) else "source.lines"
        field = {ManifestSourceConfig: "source.path", NatsSourceConfig: nats_field}.get(type(source), "source.root")
        problems.append(f"{field}: {err}")
        return None
    if isinstance(source, ManifestSourceConfig) and source.lines:
        problems += [f"source.lines: no line {line!r} in manifest {source.path}" for line in source.lines if line not in found]
    if isinstance(source, FolderSourceConfig) and not opened.live and not any(map(opened.frame_count, found)):
        sub = " (or in subfolders of it, with source.recursive: true)" if not source.recursive else ""
        problems.append(f"source.root: the line folders under {source.root} ({', '.join(found[:5])}"
                        f"{', ...' if len(found) > 5 else ''}) hold no frames, so there is nothing to replay; put each "
                        f"line's frames in <root>/<line_id>/{sub}")
    return found
