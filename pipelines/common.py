"""Arguments and steps the streaming jobs share."""
from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

from configs.loading import load_pipeline_config
from configs.pipeline import FolderSourceConfig, NatsSourceConfig, PipelineConfig
from rareclip_core.config import ConfigError

from .preflight import job_problems

EXIT_INTERRUPTED = 130  # a job stopped by Ctrl-C (the shell's convention for SIGINT)


def add_cluster_arguments(
    parser, config_required: bool = True, address_help: str = "join this Ray cluster instead of starting a local one"
) -> None:
    """--config, --out, --address (`address_help`: what the command does with a cluster) and --no-progress."""
    parser.add_argument("--config", required=config_required, help="pipeline YAML (see configs/)")
    parser.add_argument("--out", help="output folder (overrides the config's `out`)")
    parser.add_argument("--address", help=address_help)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def load_config_or_exit(path: str, check: bool = True, lines=None, live: bool = False, **overrides) -> PipelineConfig | None:
    """The validated config, or None after printing why it is invalid; with `check`, also every
    problem that would stop the job later (`preflight.job_problems` for `lines`, default all).
    `live`: the `live` command's config, whose folder or stream source is watched whatever its
    `watch` says (checked as such: an empty folder waits for its cameras)."""
    try:
        cfg = load_pipeline_config(path, **overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return None
    if live and isinstance(cfg.source, (FolderSourceConfig, NatsSourceConfig)) and not cfg.source.watch:
        cfg = cfg.model_copy(update={"source": cfg.source.model_copy(update={"watch": True})})
    problems = job_problems(cfg, lines) if check else []
    for problem in problems:
        print(f"error: {path}: {problem}", file=sys.stderr)
    return None if problems else cfg


def existing_folder(text: str) -> str:
    """An argparse type: a folder that exists (argparse names the option and exits 2 otherwise)."""
    if not Path(text).expanduser().is_dir():
        raise argparse.ArgumentTypeError(f"no folder at {text}" + (" (it is a file)" if Path(text).expanduser().exists() else ""))
    return text


def at_least(minimum, why: str = "", maximum=None, number: type = int):
    """An argparse type: a `number` (int, or float) >= `minimum` (and <= `maximum` where
    given); argparse names the option and exits 2 otherwise, before anything is loaded."""

    def parse(text: str):
        try:
            value = number(text)
            if not math.isfinite(value):
                raise ValueError
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if number is int else 'a number'}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}{why}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum}{why}, got {value}")
        return value

    return parse


port_number = at_least(1, " (a TCP port is 1 to 65535)", maximum=65535)  # an argparse type
probability = at_least(0.0, maximum=1.0, number=float)  # an argparse type


def configure_console(verbose: bool = False) -> None:
    """Warnings and errors on the console (Ray's own logs stay in its log folder); `verbose`
    (-v): also this project's and Ray's informational lines."""
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)
    logging.getLogger("ray").setLevel(level if verbose else logging.ERROR)
    logging.getLogger("werkzeug").setLevel(level)  # the dashboard's line per HTTP request only with -v
