"""docs/configuration.md, written from the settings classes themselves: every setting of a
pipeline YAML and of each detector kind, with its default and what it means.

    python -m configs.reference > docs/configuration.md

A test keeps the file equal to what this prints, and every setting must carry a description.
"""
from __future__ import annotations

import typing

import pydantic
import yaml

from rareclip_core.config import DetectorSettings
from rareclip_core.registry import DETECTORS

from .pipeline import PipelineConfig

HEADER = """# Configuration reference

Every setting of a pipeline YAML (`live`, `replay`, `drill` ... `--config`) and of each detector
kind, with its default. Generated from the settings classes (`configs/pipeline.py`, each
detector's `config.py`) by `python -m configs.reference > docs/configuration.md`; a test keeps this
file equal to them. A value outside a setting's range, or a setting that does not exist, stops
the command before anything runs, naming it.
"""


def _models_in(annotation) -> list[type[pydantic.BaseModel]]:
    """The settings classes inside a field's type (Optional[X], Union[...], Annotated[...])."""
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in _models_in(arg)]


def _yaml(value) -> str:
    """A default as it would be written in YAML (flow style)."""
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def _default(field: pydantic.fields.FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, pydantic.BaseModel):
        return "(its own defaults)"
    return f"`{_yaml(value)}`"


def _meaning(model: type[pydantic.BaseModel], name: str, field: pydantic.fields.FieldInfo) -> str:
    if name == "kind":
        (value,) = typing.get_args(field.annotation)
        return f"`{value}` selects these settings"
    if not field.description:
        raise ValueError(f"{model.__name__}.{name} has no description: give its Field one")
    choices = [a for a in typing.get_args(field.annotation) if isinstance(a, str)]
    if typing.get_origin(field.annotation) is typing.Literal and choices:
        return f"{field.description} (one of {', '.join(f'`{c}`' for c in choices)})"
    return field.description


def _escaped(text: str) -> str:
    """Text for Markdown: '|' (a table's cell border) escaped, and '<' (an HTML tag to a renderer)
    outside code spans."""
    parts = text.replace("|", "\\|").split("`")
    return "`".join(part if i % 2 else part.replace("<", "\\<") for i, part in enumerate(parts))


def _table(model: type[pydantic.BaseModel], fields: list[str]) -> list[str]:
    rows = ["| setting | default | meaning |", "|---|---|---|"]
    for name in fields:
        field = model.model_fields[name]
        meaning = _escaped(_meaning(model, name, field))
        rows.append(f"| `{name}` | {_default(field)} | {meaning} |")
    return rows


def _section(title: str, model: type[pydantic.BaseModel], fields: list[str] | None = None) -> list[str]:
    doc = (model.__doc__ or "").strip()
    intro = [_escaped(" ".join(doc.split())), ""] if doc and model.__doc__ is not pydantic.BaseModel.__doc__ else []
    return [f"### {title}", "", *intro, *_table(model, list(fields or model.model_fields)), ""]


def configuration_reference() -> str:
    """The whole of docs/configuration.md."""
    lines = [HEADER, "## Pipeline YAML", "", *_table(PipelineConfig, list(PipelineConfig.model_fields)), ""]
    nested = []
    for name, field in PipelineConfig.model_fields.items():
        nested += [(name, model) for model in _models_in(field.annotation) if not issubclass(model, DetectorSettings)]
    for name, model in nested:
        kind = model.model_fields.get("kind")
        title = f"`{name}` of kind `{typing.get_args(kind.annotation)[0]}`" if kind and name == "source" else f"`{name}`"
        lines += _section(title, model)
    common = list(DetectorSettings.model_fields)
    lines += ["## Detector YAML", "", "A detector YAML, or the mapping under a pipeline's `detector:`; "
              "`line_detector` changes some of it for one line.", ""]
    lines += _section("Every kind", DetectorSettings, [name for name in common if name != "kind"])
    for kind, entry in DETECTORS.items():
        if not entry.config.__module__.startswith("rareclip_core."):
            continue  # a kind registered by other code (a test's, a plugin's) is not the project's to list
        fields = entry.config.model_fields
        own = [name for name in fields if name not in common or name == "kind" or _default(fields[name]) != _default(
            DetectorSettings.model_fields[name])]  # its own settings, and the common ones it gives other defaults
        lines += _section(f"`kind: {kind}`", entry.config, own)
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(configuration_reference(), end="")
