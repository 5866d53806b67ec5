"""Arguments and steps the streaming jobs share."""
from __future__ import annotations

import logging
import sys

from configs.loading import load_pipeline_config
from configs.pipeline import PipelineConfig
from rareclip_core.config import ConfigError


def add_cluster_arguments(parser, config_required: bool = True) -> None:
    parser.add_argument("--config", required=config_required, help="pipeline YAML (see configs/)")
    parser.add_argument("--out", help="output folder (overrides the config's `out`)")
    parser.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def load_config_or_exit(path: str, **overrides) -> PipelineConfig | None:
    """The validated config, or None after printing why it is invalid (before any actor starts)."""
    try:
        return load_pipeline_config(path, **overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return None


def quiet_logs() -> None:
    logging.getLogger("ray").setLevel(logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)
