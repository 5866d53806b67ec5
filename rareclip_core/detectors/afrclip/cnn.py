"""The frozen torchvision CNN whose pooled features feed self-prompting (sec. "Self Prompting";
the paper does not name it: [ours] wide_resnet50_2 with ImageNet weights)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from open_clip.constants import IMAGENET_MEAN, IMAGENET_STD, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from ...config import ConfigError, names_a_file
from ...torch_files import read_torch_file
from .config import AFRCLIPConfig


def build_cnn(config: AFRCLIPConfig) -> tuple[torch.nn.Module, int]:
    """The CNN without its classifier (B x 3 x H x W -> B x C_cnn, global-average-pooled last
    stage), frozen, and C_cnn. `cnn_weights`: a torchvision weights name (torchvision's own
    download and cache), a local state-dict file (loaded with weights_only=True) or None (random
    weights drawn from `seed`)."""
    if config.cnn not in torchvision.models.list_models(torchvision.models):
        raise ConfigError(f"detector.cnn {config.cnn!r} is not a torchvision classification model (e.g. 'wide_resnet50_2', 'resnet18')")
    from_file = config.cnn_weights is not None and names_a_file(config.cnn_weights)
    tag = None
    if config.cnn_weights is not None and not from_file:
        try:
            tag = torchvision.models.get_model_weights(config.cnn)[config.cnn_weights]
        except KeyError:
            known = ", ".join(w.name for w in torchvision.models.get_model_weights(config.cnn))
            raise ConfigError(
                f"detector.cnn_weights {config.cnn_weights!r} is not a weights name of {config.cnn} ({known}), nor a file path"
            ) from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        try:
            cnn = torchvision.models.get_model(config.cnn, weights=tag)
        except Exception as err:  # noqa: BLE001 - a failed download surfaces as many types
            raise ConfigError(
                f"could not load torchvision weights {config.cnn_weights!r} for {config.cnn}: {err}\n"
                "Without network access, download the weights elsewhere and set detector.cnn_weights to the file's path"
            ) from None
    if from_file:
        _load_state_file(cnn, config.cnn_weights)
    if not isinstance(getattr(cnn, "fc", None), torch.nn.Linear):
        raise ConfigError(f"detector.cnn {config.cnn!r} has no final `fc` layer; use a ResNet-like model (resnet*, wide_resnet*, resnext*, regnet*)")
    dim = cnn.fc.in_features
    cnn.fc = torch.nn.Identity()
    return cnn.eval().requires_grad_(False), dim


def _load_state_file(cnn: torch.nn.Module, path: str) -> None:
    state = read_torch_file(path, "detector.cnn_weights", f"{type(cnn).__name__} state dict",
                            f"set it to a {type(cnn).__name__} state dict, a weights name, or null")
    expected = cnn.state_dict()
    if not isinstance(state, dict):
        state = {}
    missing = sorted(set(expected) - set(state))
    mismatched = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k].shape))
    unexpected = sorted(set(state) - set(expected))
    if missing or mismatched or unexpected:
        raise ConfigError(
            f"detector.cnn_weights {path!r} does not fit detector.cnn: missing keys {missing[:5]}, shape "
            f"mismatches {mismatched[:5]}, unexpected keys {unexpected[:5]}; use a state dict of torchvision's {type(cnn).__name__}"
        )
    cnn.load_state_dict(state)


_CLIP_MEAN, _CLIP_STD = torch.tensor(OPENAI_DATASET_MEAN), torch.tensor(OPENAI_DATASET_STD)
_NET_MEAN, _NET_STD = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)


def cnn_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """CLIP-normalized B x 3 x S x S images -> ImageNet-normalized B x 3 x size x size (bilinear)."""
    shape = (1, 3, 1, 1)
    raw = images * _CLIP_STD.to(images).view(shape) + _CLIP_MEAN.to(images).view(shape)
    if size != images.shape[-1]:
        raw = F.interpolate(raw, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (raw - _NET_MEAN.to(images).view(shape)) / _NET_STD.to(images).view(shape)
