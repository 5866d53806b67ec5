"""The detector registry: `kind` -> (settings class, detector class). Jobs build detectors only here.

Built-in kinds are listed below. Another kind registers with `register_detector` when its module
is imported; a settings object carries its class, so a Ray worker that receives one imports
that module (and so registers the kind) before building the detector.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING

from .config import ConfigError, DetectorSettings, read_yaml
from .detectors.adaptclip.config import AdaptCLIPConfig
from .detectors.afrclip.config import AFRCLIPConfig
from .detectors.dual_image.config import DualImageConfig
from .detectors.rareclip.config import RareCLIPConfig

if TYPE_CHECKING:
    from .contract import Detector

DEFAULT_KIND = "rareclip"  # detector YAMLs without `kind:` are RareCLIP


@dataclass(frozen=True)
class DetectorEntry:
    """A kind's settings class and its detector class. A built-in detector class is named
    ("module:Class") and imported on first use: reading and checking configs loads no torch
    nor model code (the result writer and the ingestion actors start in a second, not ten)."""

    config: type[DetectorSettings]
    detector_ref: type[Detector] | str

    @property
    def detector(self) -> type[Detector]:
        if isinstance(self.detector_ref, str):
            module, name = self.detector_ref.split(":")
            return getattr(import_module(module, __package__), name)
        return self.detector_ref


DETECTORS: dict[str, DetectorEntry] = {
    "rareclip": DetectorEntry(RareCLIPConfig, ".detectors.rareclip.detector:RareCLIPDetector"),
    "adaptclip": DetectorEntry(AdaptCLIPConfig, ".detectors.adaptclip.detector:AdaptCLIPDetector"),
    "afrclip": DetectorEntry(AFRCLIPConfig, ".detectors.afrclip.detector:AFRCLIPDetector"),
    "dual_image": DetectorEntry(DualImageConfig, ".detectors.dual_image.detector:DualImageDetector"),
}


def register_detector(kind: str, config: type[DetectorSettings], detector: type[Detector]) -> None:
    """Add a detector kind (or replace one with the same classes, so re-imports are harmless)."""
    known = DETECTORS.get(kind)
    if known is not None and (known.config, known.detector) != (config, detector):
        raise ValueError(f"detector kind {kind!r} is already registered with other classes")
    DETECTORS[kind] = DetectorEntry(config, detector)


def _entry(kind: str, where: str) -> DetectorEntry:
    if kind not in DETECTORS:
        raise ConfigError(f"{where}kind {kind!r} is not a detector kind; known kinds: {', '.join(sorted(DETECTORS))}")
    return DETECTORS[kind]


def detector_config_from_dict(data: dict | DetectorSettings, source: str = "<dict>", prefix: str = "") -> DetectorSettings:
    """Validated settings of the kind `data['kind']` names (RareCLIP when it names none); errors
    name the field as `prefix` + its name (e.g. `detector.max_images` in a pipeline file)."""
    if isinstance(data, DetectorSettings):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix or 'the detector settings'} must be a mapping, not {type(data).__name__}")
    kind = data.get("kind", DEFAULT_KIND)
    return _entry(kind, f"{source}: {prefix}").config.from_dict({**data, "kind": kind}, source, prefix)


def detector_config_from_yaml(path: str | Path, section: str | None = None) -> DetectorSettings:
    """A detector YAML file (or one top-level section of a YAML file)."""
    data = read_yaml(path)
    if section is not None:
        if section not in data:
            raise ConfigError(f"{path} has no top-level `{section}:` section")
        data = data[section]
    return detector_config_from_dict(data, source=str(path) + (f" [{section}]" if section else ""))


def build_detector(config: dict | DetectorSettings) -> Detector:
    """The detector its settings describe (a settings object or a mapping with `kind`)."""
    config = detector_config_from_dict(config)
    return _entry(config.kind, "detector.").detector(config)


def detector_class(config: DetectorSettings) -> type[Detector]:
    """The detector class of a settings object (for class-level questions such as paper figures)."""
    return _entry(config.kind, "detector.").detector
