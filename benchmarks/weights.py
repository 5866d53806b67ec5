"""The benchmarks' `--pretrained` override, one rule for every script."""
from __future__ import annotations

RANDOM = ("none", "null", "random")


def with_weights(config, value: str):
    """`config` with `pretrained` set to `value`: a tag or a path; or 'none' for seeded random
    weights of the same network (the activation the real weights use is kept, so a timing on
    random weights costs what one on the real weights would; AFR-CLIP's CNN is random too:
    the same cost as ImageNet weights, and no download)."""
    from rareclip_core.backbone.clip import uses_quick_gelu

    if value.lower() not in RANDOM:
        return config.model_copy(update={"pretrained": value})
    update = {"pretrained": None, "quick_gelu": uses_quick_gelu(config)}
    if "cnn_weights" in type(config).model_fields:
        update["cnn_weights"] = None
    return config.model_copy(update=update)
