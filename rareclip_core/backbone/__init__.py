"""The CLIP backbone every detector uses: OpenCLIP models (tags or local weight files), the
standard tower with intermediate block tokens (`ClipBackbone`, `load_backbone`), and a
block-by-block forward with a value-value attention path and token hooks (`vision_forward`)."""
from .clip import (
    BackboneOutput,
    ClipBackbone,
    backbone_dtype,
    create_clip_model,
    load_backbone,
    resolve_device,
)
from .frame_input import FrameInput
from .vision import VisionOptions, VisionOutput, value_value_attention, vision_forward

__all__ = [
    "BackboneOutput",
    "ClipBackbone",
    "FrameInput",
    "VisionOptions",
    "VisionOutput",
    "backbone_dtype",
    "create_clip_model",
    "load_backbone",
    "resolve_device",
    "value_value_attention",
    "vision_forward",
]
