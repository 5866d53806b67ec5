"""Configuration shared by every detector: strict pydantic models, YAML reading, clear errors,
and `DetectorSettings`, the base of each detector kind's settings."""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import types
import typing
from pathlib import Path
from typing import ClassVar, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .model_names import model_problem, model_uses_quick_gelu, vision_depth


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


def format_validation_error(err: ValidationError, source: str, prefix: str = "", model: Optional[type] = None) -> str:
    """One line per field at fault, named by its path (`prefix` + e.g. `detector.max_images`;
    pydantic's union-member labels left out, the union's alternatives on one line). A missing
    field says so; a name that is not a setting names the closest ones of `model`'s tree."""
    problems: dict[str, list[str]] = {}
    inputs: dict[str, str] = {}  # field -> what it was given, said once after its problems
    for e in err.errors():
        path, known = _readable_path(model, e["loc"][:-1] if e["type"] == "extra_forbidden" else e["loc"])
        if e["type"] == "missing":
            problem = "required, and not given"
        elif e["type"] == "extra_forbidden":
            name = str(e["loc"][-1])
            path = path + [name]
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            problem = "not a setting here" + (f"; did you mean {' or '.join(map(repr, close))}?" if close else "")
        else:
            problem = e["msg"].removeprefix("Value error, ")  # our own checks' messages need no prefix
        # no path: a check of the whole (detector) config, whose message names its settings and values
        field = prefix + ".".join(path) if path else prefix.rstrip(".")
        problems.setdefault(field, []).append(problem)
        if path and e["type"] not in ("missing", "extra_forbidden"):
            inputs.setdefault(field, f" (got {_short_repr(e.get('input'))})")
    lines = [f"invalid configuration in {source}:"]
    lines += [
        f"  {field + ': ' if field else ''}{'; or '.join(found)}{inputs.get(field, '')}" for field, found in problems.items()
    ]
    return "\n".join(lines)


def _short_repr(value, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _readable_path(model: Optional[type], loc: tuple) -> tuple[list[str], list[str]]:
    """`loc` without the labels pydantic gives a union's members (a tagged union's tag, or a
    member's type such as `float`), and the setting names of the model it ends at (none where
    it ends outside the settings models: a mapping's value, a number)."""
    path, annotation = [], model
    for part in loc:
        annotation = _unwrap(annotation)
        members = [_unwrap(m) for m in typing.get_args(annotation)] if _is_union(annotation) else None
        if members is not None:  # `part` is a member's label: descend into the member it names
            annotation = next((m for m in members if part in _kind_tags(m)), None)
            continue
        path.append(str(part))
        if _is_model(annotation):
            field = annotation.model_fields.get(str(part))
            annotation = field.annotation if field else None
        elif typing.get_origin(annotation) in (dict, list):
            annotation = typing.get_args(annotation)[-1]
        else:
            annotation = None
    annotation = _unwrap(annotation)
    return path, list(annotation.model_fields) if _is_model(annotation) else []


def _unwrap(annotation):
    """The type inside Annotated[...] and Optional[...] (None stays a member of no other union)."""
    while True:
        if typing.get_origin(annotation) is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif _is_union(annotation) and type(None) in typing.get_args(annotation):
            rest = [a for a in typing.get_args(annotation) if a is not type(None)]
            annotation = rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]
        else:
            return annotation


def _is_union(annotation) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _is_model(annotation) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _kind_tags(member) -> tuple:
    """A tagged union member's `kind` values (Literal[...]); a plain member: none."""
    field = member.model_fields.get("kind") if _is_model(member) else None
    return typing.get_args(field.annotation) if field else ()


def read_yaml(path: str | Path) -> dict:
    """A YAML file's mapping, or ConfigError naming the file and what is wrong."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; give a YAML file (e.g. configs/default.yaml)")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with path.open(encoding="utf-8") as stream:  # a stream: YAML's messages name the file
            data = yaml.safe_load(stream) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a YAML file (it is not text)") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of settings, not {type(data).__name__}")
    return data


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>", prefix: str = ""):
        """Validated settings, or ConfigError naming each field at fault (`prefix` + its path)."""
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, source, prefix, cls)) from None

    @classmethod
    def from_yaml(cls, path: str | Path, section: Optional[str] = None):
        """Load from a YAML file; `section` picks a top-level key (e.g. `detector`)."""
        data = read_yaml(path)
        if section is not None:
            if section not in data:
                raise ConfigError(f"{path} has no top-level `{section}:` section")
            data = data[section]
        return cls.from_dict(data, source=str(path) + (f" [{section}]" if section else ""))




def names_a_file(value: str) -> bool:
    """Whether a weights setting is a file path rather than a tag such as 'openai'."""
    return os.sep in value or value.endswith((".pt", ".pth", ".bin", ".safetensors"))


class DetectorSettings(StrictModel):
    """What every detector kind's settings have: the `kind` that selects it in the registry, the
    CLIP backbone and where it runs. Each kind subclasses this with its own fields."""

    kind: str
    model: str = Field("ViT-L-14-336", description="the OpenCLIP model (a ViT); rareclip-tiny is the small test model")
    pretrained: Optional[str] = Field(
        "openai", description="'openai' (or another OpenCLIP tag), a local checkpoint path, or null for random weights"
    )
    quick_gelu: Optional[bool] = Field(
        None,
        description="whether the towers' MLPs use QuickGELU, as OpenAI's CLIP was trained (GELU otherwise); "
        "null: as the weights were trained (a tag: its own setting; a file of a model OpenAI published, "
        "e.g. ViT-L-14-336: QuickGELU; random weights: the model's config). Set it for a file of other weights",
    )
    image_size: int = Field(518, ge=32, description="the square input side in pixels (the position embedding is resized to it)")
    seed: int = Field(0, description="seeds random weights (pretrained: null) and any sampling")
    device: str = Field("auto", description="'auto' (cuda when available), 'cpu', 'cuda', 'cuda:N'")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="backbone precision; 'auto' is fp16 on CUDA and fp32 on CPU"
    )
    resize_on_device: bool = Field(
        False,
        description="resize frames on the detector's device (torch, for GPUs) instead of with PIL on the CPU "
        "(the authors' way); pixels then differ by at most a few levels of 255",
    )
    text_cache_dir: Optional[str] = Field(
        "~/.cache/rareclip", description="where cached text embeddings live; null disables"
    )

    # settings that name weight files (besides `pretrained`, which may also be a tag)
    weight_fields: ClassVar[tuple[str, ...]] = ()
    # settings of where and how a step runs, not of what it computes (results equal within float
    # rounding either way): left out of `fingerprint`, so turning one on keeps a line's snapshots
    execution_fields: ClassVar[frozenset[str]] = frozenset({"device", "text_cache_dir"})
    # what part of a frame the model sees (and its maps cover): "center_crop" (the shorter side
    # resized to image_size, then the centre square) or "squash" (the whole frame resized to a square)
    input_view: ClassVar[str] = "center_crop"
    # how the position embedding meets image_size: "openclip" (its force_image_size: bicubic,
    # antialiased) or "bilinear" (align_corners=False, no antialiasing: AdaptCLIP's authors)
    position_resize: ClassVar[str] = "openclip"

    # settings that name 1-indexed blocks of the ViT (a list of them, or one): checked against its depth
    block_fields: ClassVar[tuple[str, ...]] = ()

    @field_validator("device")
    @classmethod
    def _a_torch_device(cls, name: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", name):
            raise ValueError("expected 'auto', 'cpu', 'cuda' or 'cuda:N' (N a GPU's index)")
        return name

    @field_validator("model")
    @classmethod
    def _an_openclip_vit(cls, name: str) -> str:
        problem = model_problem(name)
        if problem:
            raise ValueError(problem)
        return name

    @model_validator(mode="after")
    def _quick_gelu_as_the_model_allows(self):
        kind_default = type(self).model_fields["quick_gelu"].default  # RareCLIP's false yields to a '-quickgelu' name
        if self.quick_gelu is False and kind_default is not False and model_uses_quick_gelu(self.model):
            raise ValueError(f"quick_gelu is false, but model {self.model!r} is a QuickGELU model by its name; "
                             f"drop '-quickgelu' from the name, or set quick_gelu to null")
        return self

    @model_validator(mode="after")
    def _blocks_within_the_model(self):
        if not self.block_fields:  # a kind that reads no blocks (a benchmark's probe) may name no OpenCLIP model
            return self
        depth = vision_depth(self.model)
        for name in self.block_fields:
            value = getattr(self, name)
            if max(value if isinstance(value, list) else [value]) > depth:
                raise ValueError(f"{name} = {value}, but model {self.model!r} has {depth} blocks (1 to {depth})")
        return self

    @property
    def pretrained_tag(self) -> Optional[str]:
        """The OpenCLIP weights tag that `pretrained` names ('openai', ...); None when it is null
        (random weights) or a checkpoint file's path."""
        return None if self.pretrained is None or names_a_file(self.pretrained) else self.pretrained

    def weight_file_problems(self) -> list[str]:
        """One message per configured weights file that does not exist or, by its first bytes,
        cannot be weights (checked before a job starts its actors)."""
        from .torch_files import weights_file_problem

        files = {name: getattr(self, name) for name in self.weight_fields}
        if self.pretrained is not None and names_a_file(self.pretrained):
            files["pretrained"] = self.pretrained
        problems = []
        for name, path in files.items():
            fix = "set it to the downloaded file's path" + (" (or null for random weights, tests only)" if name == "pretrained" else "")
            if path is None:
                continue
            if not Path(path).expanduser().is_file():
                problems.append(f"detector.{name}: no file at {path!r}; {fix}")
            elif problem := weights_file_problem(path):
                problems.append(f"detector.{name}: {path} is not a weights file: {problem}; {fix}")
        return problems

    def fingerprinted_settings(self) -> dict:
        """Every setting that changes the detector's state or results (all but `execution_fields`).
        `quick_gelu: false` is left out: GELU is what every version before the setting computed
        (OpenCLIP's own default), so snapshots written then stay valid."""
        settings = self.model_dump(exclude=set(self.execution_fields))
        if settings.get("quick_gelu") is False:
            del settings["quick_gelu"]
        return settings

    def fingerprint(self) -> str:
        """Hash of `fingerprinted_settings`; snapshots and the `model_id` column carry it."""
        return hashlib.sha256(json.dumps(self.fingerprinted_settings(), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def model_id(self) -> str:
        """What the result table's `model_id` column says: kind, backbone, weights, config hash."""
        return f"{self.kind}:{self.model}:{self.pretrained or 'random'}:{self.fingerprint()}"
