"""OpenCLIP backbone: global image embedding and raw patch tokens of chosen blocks (sec. 1)."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import open_clip
import torch
import torch.nn.functional as F

from ..config import ConfigError, DetectorSettings, names_a_file
from ..model_names import MODEL_CONFIG_DIR, model_problem, model_uses_quick_gelu
from ..ops.cuda_graph import CudaGraphRunner
from ..torch_files import load_failure, weights_file_problem
from .hub_access import offline_unless_reachable

open_clip.add_model_config(MODEL_CONFIG_DIR)

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class BackboneOutput:
    image_embedding: torch.Tensor  # B x D, L2-normalized, float32
    patch_tokens: dict[int, torch.Tensor]  # 1-indexed block -> B x M x C, raw residual stream, float32


@contextlib.contextmanager
def open_clip_log_held(pass_on: bool) -> Iterator[None]:
    """Hold what is logged on the root logger itself (where open_clip logs) within: passed on
    afterwards when `pass_on`, dropped when not or when the block fails (the project's own error
    then names the cause, so open_clip's "Failed to download weights" line would only repeat it)."""
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        held.append(record)
        return False

    root = logging.getLogger()
    root.addFilter(hold)
    try:
        yield
    finally:
        root.removeFilter(hold)
    for record in held if pass_on else ():
        root.handle(record)


def backbone_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The backbone's weights and activations dtype: 'auto' is fp16 on CUDA (DESIGN: the
    backbone runs in half precision) and fp32 elsewhere (CPU half-precision kernels are slow)."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return _DTYPES[precision]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"detector.device is {name!r} but no CUDA device is visible; use 'auto' or 'cpu'")
    return device


def uses_quick_gelu(config: DetectorSettings) -> bool:
    """Whether the towers' MLPs are QuickGELU (x * sigmoid(1.702 x), as OpenAI trained CLIP) rather
    than GELU: `detector.quick_gelu` where set (RareCLIP sets false: its authors' code runs GELU);
    else as the weights were trained: a tag's own setting, OpenAI's for a file of a model OpenAI
    published, the model's config for random weights. OpenCLIP 3 itself builds GELU for
    ViT-L-14-336 even with its 'openai' weights, and only warns."""
    if config.quick_gelu is not None or model_uses_quick_gelu(config.model):  # a '-quickgelu' name always is
        return bool(config.quick_gelu) or model_uses_quick_gelu(config.model)
    if config.pretrained is None:
        return False
    if config.pretrained_tag is not None:
        return bool(open_clip.get_pretrained_cfg(config.model, config.pretrained_tag).get("quick_gelu", False))
    return "openai" in open_clip.list_pretrained_tags_by_model(config.model)


def create_clip_model(config: DetectorSettings) -> torch.nn.Module:
    """The full CLIP model (text tower included) with the configured weights, for input images
    of `image_size`: its position embedding resized as the kind's `position_resize` says: by
    OpenCLIP as it loads the weights ("openclip"; a float16 checkpoint, which OpenCLIP cannot
    resize on the CPU, is loaded at the native size and resized after, in float32, by the same
    rule), or after loading at the native size ("bilinear"; `resize_position_embedding`).

    `pretrained`: 'openai' (downloads where a network exists), a local checkpoint file, or
    None for random weights drawn from `seed` (without touching the global RNG).
    """
    problem = model_problem(config.model)
    if problem:
        raise ConfigError(f"detector.model {config.model!r}: {problem}")
    if config.position_resize == "bilinear":
        return _at_native_size_then_resized(config)
    return _create_clip_model(config)


def _native_size(config: DetectorSettings) -> int:
    native = open_clip.get_model_config(config.model)["vision_cfg"]["image_size"]
    return native if isinstance(native, int) else native[0]


def _at_native_size_then_resized(config: DetectorSettings) -> torch.nn.Module:
    model = _create_clip_model(config.model_copy(update={"image_size": _native_size(config)}))
    resize_position_embedding(model.visual, config.image_size, config.position_resize)
    return model


def _create_clip_model(config: DetectorSettings) -> torch.nn.Module:
    pretrained = config.pretrained
    if pretrained is None:  # open_clip warns that no weights were loaded: that is the intent
        with open_clip_log_held(pass_on=False), torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            return open_clip.create_model(config.model, pretrained=None, force_image_size=config.image_size,
                                          force_quick_gelu=uses_quick_gelu(config))
    looks_like_path = names_a_file(pretrained)
    if looks_like_path and not Path(pretrained).expanduser().is_file():
        raise ConfigError(
            f"detector.pretrained points to {pretrained!r}, which does not exist; set it to the "
            f"path of a downloaded {config.model} checkpoint, 'openai', or null for random weights"
        )
    if looks_like_path:
        if problem := weights_file_problem(pretrained):  # before OpenCLIP, whose torch.load would try TorchScript
            raise ConfigError(f"detector.pretrained: {pretrained} is not a weights file: {problem}")
        return _create_with_weights(config, str(Path(pretrained).expanduser()), unreachable=None)
    unknown = _unknown_tag(config)
    if unknown:
        raise ConfigError(unknown)
    if other := hub_holds_another_tag(config):
        return _create_with_weights(config, _release_file(config, other), unreachable=None)
    with offline_unless_reachable() as unreachable:  # a named tag: from the Hub, or its local cache
        return _create_with_weights(config, pretrained, unreachable)


def hub_holds_another_tag(config: DetectorSettings) -> Optional[str]:
    """The other tag of the model whose weights OpenCLIP's Hub entry for `config.pretrained`
    holds, or None. OpenCLIP 3's registry sends ViT-B-16-plus-240's `laion400m_e32` to the Hub
    repository of `laion400m_e31`: such a tag is fetched from its own release URL instead."""
    cfg = open_clip.get_pretrained_cfg(config.model, config.pretrained_tag) if config.pretrained_tag else {}
    hub = cfg.get("hf_hub", "")  # 'org/repo/' or 'org/repo/file'; timm's repos end '.<tag>'
    repo = (hub.rstrip("/") if hub.endswith("/") else hub.rsplit("/", 1)[0]).rsplit("/", 1)[-1]
    named = repo.rsplit(".", 1)[-1] if "." in repo else ""
    tags = open_clip.list_pretrained_tags_by_model(config.model)
    return named if cfg.get("url") and named in tags and named != config.pretrained_tag else None


def _release_file(config: DetectorSettings, other: str) -> str:
    """The local file of the tag's release URL (downloaded once into OpenCLIP's cache)."""
    cfg = open_clip.get_pretrained_cfg(config.model, config.pretrained_tag)
    try:
        return open_clip.pretrained.download_pretrained_from_url(cfg["url"])
    except Exception as err:  # noqa: BLE001 - urllib and the checksum raise many types
        raise ConfigError(_weights_unavailable(
            config, f"OpenCLIP's Hub entry for it holds {other}'s weights, and its release file "
                    f"{cfg['url']} could not be fetched ({type(err).__name__}: {err})")) from None


def resize_position_embedding(visual: torch.nn.Module, image_size: int, mode: str = "bilinear") -> None:
    """Resize `visual`'s position embedding in place to the grid of `image_size`: the class
    token's row kept, the g x g grid interpolated in float32 (align_corners=False) by `mode`:
    "openclip", OpenCLIP's own resize (bicubic, antialiased), or "bilinear" (no antialiasing;
    AdaptCLIP's authors)."""
    patch = visual.patch_size[0]
    grid = image_size // patch
    old = visual.positional_embedding.data  # (1 + g0^2) x C
    g0 = int(round((old.shape[0] - 1) ** 0.5))
    if g0 != grid:
        table = old[1:].reshape(1, g0, g0, -1).permute(0, 3, 1, 2).float()  # 1 x C x g0 x g0
        if mode == "openclip":
            table = F.interpolate(table, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
        else:
            table = F.interpolate(table, size=(grid, grid), mode="bilinear", align_corners=False)
        table = table.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(old.dtype)
        visual.positional_embedding = torch.nn.Parameter(torch.cat([old[:1], table]), requires_grad=False)
    visual.grid_size = (grid, grid)
    visual.image_size = (image_size, image_size)


def named_weights_problem(config: DetectorSettings) -> Optional[str]:
    """Why `detector.pretrained`, a named tag ('openai', ...), cannot load on this machine: not a
    tag of the model, or the Hub is unreachable and the weights are not in its local cache. None
    when it can, or when `pretrained` is not a tag (checked before a job starts its actors)."""
    if config.pretrained_tag is None or config.model not in open_clip.list_models():
        return None  # random weights, a file (`weight_file_problems`), an unknown model (create_clip_model)
    unknown = _unknown_tag(config)
    if unknown:
        return unknown
    if hub_holds_another_tag(config):
        return None  # fetched from its release URL when the line builds its detector
    with offline_unless_reachable() as unreachable:
        if unreachable is None:
            return None
        try:  # offline: the cached file's path, or a failure at once
            open_clip.pretrained.download_pretrained(open_clip.pretrained.get_pretrained_cfg(config.model, config.pretrained))
        except Exception:  # noqa: BLE001 - open_clip raises many types for missing weights
            return _weights_unavailable(config, _unreachable_cause(unreachable))
    return None


def _unknown_tag(config: DetectorSettings) -> Optional[str]:
    if open_clip.pretrained.is_pretrained_cfg(config.model, config.pretrained):
        return None
    tags = open_clip.pretrained.list_pretrained_tags_by_model(config.model)
    return (f"detector.pretrained {config.pretrained!r} is not a weights tag of {config.model} (its tags: "
            f"{', '.join(tags) or 'none'}); set a tag, a local checkpoint file, or null for random weights")


def _unreachable_cause(unreachable: str) -> str:
    return f"the Hub cannot be reached ({unreachable}) and they are not in its local cache"


def _weights_unavailable(config: DetectorSettings, cause) -> str:
    return (f"could not load pretrained weights {config.pretrained!r} for {config.model}: {cause}\n"
            f"Without network access, download the checkpoint on a connected machine and set "
            f"detector.pretrained to its local file path (or null for random weights, tests only).")


def _create_with_weights(config: DetectorSettings, pretrained: str, unreachable: Optional[str]) -> torch.nn.Module:
    try:
        with open_clip_log_held(pass_on=True):
            return open_clip.create_model(config.model, pretrained=pretrained, force_image_size=config.image_size,
                                          force_quick_gelu=uses_quick_gelu(config))
    except Exception as err:  # noqa: BLE001 - open_clip raises many types for missing weights
        if "for 'Half'" in str(err) and config.position_resize == "openclip" and config.image_size != _native_size(config):
            # OpenCLIP resizes a float16 position table in float16, which torch cannot do on the CPU
            return _at_native_size_then_resized(config)
        file = Path(pretrained)
        if file.is_file():  # a local file: it is there, so it is the file that does not fit
            raise ConfigError(
                f"detector.pretrained: {pretrained} could not be loaded as {config.model} weights "
                f"({load_failure(err, file)}); set it to that model's checkpoint (an OpenCLIP .safetensors, .bin "
                "or .pth), a weights tag, or null for random weights"
            ) from None
        raise ConfigError(_weights_unavailable(config, _unreachable_cause(unreachable) if unreachable else err)) from None


class ClipBackbone(torch.nn.Module):
    """The vision tower of a CLIP model, returning what the detector needs in one pass."""

    def __init__(
        self, visual: torch.nn.Module, blocks: list[int], device: torch.device, precision: str, cuda_graphs: bool = False
    ):
        super().__init__()
        self.dtype = backbone_dtype(precision, device)
        self.visual = visual.to(device=device, dtype=self.dtype).eval().requires_grad_(False)
        self.blocks = sorted(set(blocks))
        self.device = device
        self.width = self.visual.transformer.width
        self.grid = self.visual.grid_size[0]
        # one CUDA graph per batch size where asked and on CUDA; plain calls elsewhere
        self._run = CudaGraphRunner(self._tower) if cuda_graphs and device.type == "cuda" else self._tower
        if self._run is not self._tower:
            self._capture_single_frame()

    @torch.inference_mode()
    def _capture_single_frame(self) -> None:
        """Capture batch 1 now, so a backbone that cannot be a CUDA graph fails when it is built,
        not at a line's first frame."""
        size = self.visual.image_size
        size = size if isinstance(size, (tuple, list)) else (size, size)
        try:
            self._run(torch.zeros(1, 3, *size, device=self.device, dtype=self.dtype))
        except RuntimeError as err:
            raise ConfigError(
                f"detector.cuda_graphs: the backbone could not be captured as a CUDA graph ({err}); set cuda_graphs: false"
            ) from None

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> BackboneOutput:
        """images: B x 3 x S x S, already normalized (on any device, any float dtype)."""
        return self._run(images.to(self.device, self.dtype))

    def _tower(self, images: torch.Tensor) -> BackboneOutput:
        """images: B x 3 x S x S on the backbone's device and dtype.

        The global embedding is projected one row at a time so that a frame gets bitwise the
        same features alone or inside a batch (replay batches frames; CPU results must match).
        """
        last = len(self.visual.transformer.resblocks)
        blocks = sorted(set(self.blocks) | {last})
        out = self.visual.forward_intermediates(
            images,
            indices=[b - 1 for b in blocks],
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=True,
        )
        by_block = dict(zip(blocks, out["image_intermediates"]))
        final = torch.cat([out["image_intermediates_prefix"][-1], by_block[last]], dim=1)
        pooled, _ = self.visual._pool(final)  # ln_post + class-token pooling, as encode_image
        if self.visual.proj is not None:
            pooled = torch.cat([row[None] @ self.visual.proj for row in pooled])
        tokens = {b: by_block[b].float() for b in self.blocks}
        return BackboneOutput(F.normalize(pooled.float(), dim=-1), tokens)


def load_backbone(
    config: DetectorSettings, blocks: Iterable[int], device: torch.device, cuda_graphs: bool = False
) -> tuple[ClipBackbone, torch.nn.Module]:
    """The configured CLIP model and a `ClipBackbone` over its vision tower returning the tokens
    of every block in `blocks` (1-indexed; the config's `block_fields`, checked against the
    model's depth when it was read), replayed as CUDA graphs where `cuda_graphs` and on CUDA.
    The full model comes back for its text tower: drop it once used."""
    model = create_clip_model(config)
    return ClipBackbone(model.visual, sorted(set(blocks)), device, config.precision, cuda_graphs), model
