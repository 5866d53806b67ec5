"""The one place YAML configuration is read: pipeline files, detector files, and the
`detector:` section of a pipeline file (inline, or the name of a detector YAML beside it)."""
from __future__ import annotations

from pathlib import Path

from rareclip_core.config import ConfigError, DetectorSettings, read_yaml
from rareclip_core.registry import detector_config_from_dict

from .pipeline import PipelineConfig


def _detector_section(value, path: Path) -> DetectorSettings:
    """`detector: file.yaml` (a detector YAML next to `path`) or an inline mapping."""
    if isinstance(value, str):
        file = path.parent / value
        return detector_config_from_dict(read_yaml(file), source=str(file))
    return detector_config_from_dict(value, source=str(path), prefix="detector.")


def load_pipeline_config(path: str | Path, **overrides) -> PipelineConfig:
    """Load and validate a pipeline YAML; `overrides` replace top-level keys (e.g. out=...)."""
    path = Path(path)
    data = read_yaml(path)
    if "detector" in data:
        data["detector"] = _detector_section(data["detector"], path)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return PipelineConfig.from_dict(data, source=str(path))


def load_detector_config(path: str | Path) -> DetectorSettings:
    """A detector YAML, or the detector of a pipeline YAML (its `detector:` section)."""
    path = Path(path)
    data = read_yaml(path)
    if "source" in data or "detector" in data:
        if "detector" not in data:
            raise ConfigError(f"{path} is a pipeline config without a `detector:` section")
        return _detector_section(data["detector"], path)
    return detector_config_from_dict(data, source=str(path))
