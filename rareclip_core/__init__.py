"""rareclip_core: the detectors of this project, pure torch/numpy (no Ray), usable in a notebook.

    from rareclip_core import build_detector, detector_config_from_yaml
    detector = build_detector(detector_config_from_yaml("configs/detector-tiny.yaml"))

The contract every detector keeps is `rareclip_core.contract`; `DETECTORS` maps each `kind` to
its settings and detector classes. The names below are loaded on first use, so that importing a
light part of the package (frame decoding, sources) does not load torch models.
"""
from importlib import import_module

_EXPORTS = {
    "build_detector": "registry",
    "detector_class": "registry",
    "detector_config_from_dict": "registry",
    "detector_config_from_yaml": "registry",
    "register_detector": "registry",
    "DETECTORS": "registry",
    "Detector": "contract",
    "DetectionResult": "contract",
    "PaperFigures": "contract",
    "DetectorSettings": "config",
    "ConfigError": "config",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rareclip_core' has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
