"""Training the text prompt branch's linear layers with the loss of Eq. 4 (docs/algorithms/rareclip.md sec. 2).

Per TPB block b, with F~_b the projected, L2-normalized patch tokens (B x M x D), F_text the
state embeddings (D x 2) and T the text temperature:

    logits_b = upsample_bilinear(T <F~_b, F_text> as a g x g grid, to S x S)    (Eq. 1, pre-softmax)
    A_b      = softmax(logits_b) over {normal, abnormal}
    Loss     = sum over blocks of [Focal(A_b, A_truth) + Dice(A_b[abnormal], A_truth)]
               + MSE(<F~, F_image>, 1) over the tokens of all blocks together          (Eq. 4)

as the authors' `train.py` computes it (one MSE over the 4 blocks' tokens concatenated, Dice on
the abnormal channel only; Focal as `ops.losses.focal_loss`). The backbone is frozen: only the
4 Linear(C, D) layers learn (Adam, lr 0.005, betas (0.5, 0.999), 5 epochs, batch 16).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from ...backbone import ClipBackbone, FrameInput, load_backbone, resolve_device
from ...data.datasets import Sample, fit_mask, load_mask
from ...data.mosaic import Mosaic, MosaicDraws, kept_for_mosaic_training
from ...ops.losses import dice_loss, focal_loss
from ...optimizer_steps import OptimizerSteps
from .config import RareCLIPConfig
from .text_branch import TextProjection, cached_state_embeddings, init_text_projection

# Backbone outputs are kept in memory across epochs when they take at most this many bytes;
# otherwise each epoch runs the frozen backbone again (ViT-L at 518 needs ~22 MB per image).
FEATURE_CACHE_BYTES = 4 * 2**30


def tpb_loss(
    projected: list[torch.Tensor],
    image_embedding: torch.Tensor,
    text_features: torch.Tensor,
    masks: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Eq. 4 summed over TPB blocks (see the module docstring).

    projected: per block B x M x D, L2-normalized; image_embedding: B x D, L2-normalized;
    text_features: D x 2; masks: B x S x S in {0, 1}. The logits map is upsampled
    (bilinear, align_corners=True as the detector's maps) before the softmax.
    """
    batch, n_patches, _ = projected[0].shape
    grid = int(round(n_patches**0.5))
    masks = masks.float()
    total = projected[0].new_zeros(())
    for tokens in projected:
        logits = (temperature * tokens @ text_features).transpose(1, 2).reshape(batch, 2, grid, grid)
        logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=True)
        probs = logits.softmax(dim=1)
        total = total + focal_loss(probs, masks) + dice_loss(probs[:, 1], masks)
    cosine = (torch.cat(projected, dim=1) * image_embedding[:, None, :]).sum(-1)  # <F~, F_image>, B x (blocks * M)
    return total + F.mse_loss(cosine, torch.ones_like(cosine))


class _TrainingFeatures:
    """Frozen-backbone outputs (text-block tokens, image embedding) and masks for `samples`;
    the backbone outputs are cached in CPU memory across epochs when they fit in
    FEATURE_CACHE_BYTES."""

    def __init__(self, backbone: ClipBackbone, config: RareCLIPConfig, samples: list[Sample]):
        self.backbone = backbone
        self.samples = samples
        self.blocks = config.text_blocks
        self.image_size = config.image_size
        self.frame_input = FrameInput(config.image_size, config.input_view, backbone.device, config.resize_on_device)
        per_image = 4 * backbone.grid**2 * backbone.width * len(set(self.blocks))
        self.cache: dict[int, tuple[list[torch.Tensor], torch.Tensor]] | None = (
            {} if per_image * len(samples) <= FEATURE_CACHE_BYTES else None
        )

    def _load_image(self, sample: Sample) -> torch.Tensor:
        with Image.open(sample.path) as image:
            return self.frame_input([image])[0]

    def _encode(self, pixels: list[torch.Tensor]) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
        out = self.backbone(torch.stack(pixels))
        # CPU copies: the cache stays off the GPU, and inference-mode tensors (the backbone's
        # outputs) cannot be saved for the projection's backward pass
        return [
            ([out.patch_tokens[b][k].to("cpu", copy=True) for b in self.blocks], out.image_embedding[k].to("cpu", copy=True))
            for k in range(len(pixels))
        ]

    def batch(self, items: list[int | Mosaic]) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Per text block B x M x C tokens, B x D embeddings, B x S x S masks (on the backbone's
        device) of the items: samples by index (cached), or mosaics (encoded afresh)."""
        indices = [i for i in items if isinstance(i, int)]
        missing = [i for i in indices if self.cache is None or i not in self.cache]
        encoded = dict(zip(missing, self._encode([self._load_image(self.samples[i]) for i in missing]))) if missing else {}
        if self.cache is not None:
            self.cache.update(encoded)
            encoded = {i: self.cache[i] for i in indices}
        mosaics = [item for item in items if not isinstance(item, int)]
        fresh = iter(self._encode([self.frame_input([m.image])[0] for m in mosaics]) if mosaics else [])
        per_item = [encoded[item] if isinstance(item, int) else next(fresh) for item in items]
        device = self.backbone.device
        tokens = [torch.stack([tokens[j] for tokens, _ in per_item]).to(device) for j in range(len(self.blocks))]
        embeddings = torch.stack([embedding for _, embedding in per_item]).to(device)
        masks = torch.stack([torch.from_numpy(
            load_mask(self.samples[item], self.image_size) if isinstance(item, int)
            else fit_mask(item.mask, self.image_size)) for item in items])
        return tokens, embeddings, masks.to(device)


def train_text_projection(
    config: RareCLIPConfig,
    samples: list[Sample],
    epochs: int = 5,
    batch_size: int = 16,
    lr: float = 0.005,
    betas: tuple[float, float] = (0.5, 0.999),
    seed: int = 0,
    progress: bool = True,
    mosaic_rate: float = 0.0,
) -> tuple[TextProjection, list[float]]:
    """Train the TPB's Linear(C, D) layers on images with masks by Eq. 4; returns the layers
    (CPU, eval mode) and the loss of every optimizer step.

    Starts from `init_text_projection(config)` (seeded init, or `config.tpb_weights`); `seed`
    fixes the per-epoch shuffling and the mosaics, so runs on CPU are deterministic. Anomalous
    samples need a mask (`load_mask` raises otherwise); good samples without one count as
    all-normal. `mosaic_rate` > 0: each image of an epoch is replaced by a 2 x 2 mosaic of its
    category with that probability, and MVTec AD's misplaced and missing_cable images are left
    out (the authors' MVTec AD loader: `data.mosaic`, rate `AUTHORS_RATE`).
    """
    if mosaic_rate > 0:
        samples = kept_for_mosaic_training(samples)
    if not samples:
        raise ValueError("no training samples")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    device = resolve_device(config.device)
    backbone, model = load_backbone(config, config.text_blocks, device)
    # D x 2; clone(): freshly encoded embeddings are inference-mode tensors, unusable in autograd
    text_features = cached_state_embeddings(config, model).clone().to(device)
    del model
    projection = init_text_projection(config, backbone.width, text_features.shape[0]).to(device)
    projection.train().requires_grad_(True)
    optimizer = torch.optim.Adam(projection.parameters(), lr=lr, betas=betas)
    features = _TrainingFeatures(backbone, config, samples)
    generator = torch.Generator().manual_seed(seed)
    mosaics = MosaicDraws(samples, mosaic_rate, seed)
    steps_per_epoch = -(-len(samples) // batch_size)
    losses: list[float] = []
    with tqdm(total=epochs * steps_per_epoch, desc="TPB training", unit="step", disable=not progress) as bar:
        steps = OptimizerSteps(optimizer, bar, steps_per_epoch, losses)
        for epoch in range(epochs):
            order = torch.randperm(len(samples), generator=generator).tolist()
            for start in range(0, len(order), batch_size):
                items = [mosaics.draw(samples[i].category) if mosaics.replaces() else i for i in order[start : start + batch_size]]
                tokens, embeddings, masks = features.batch(items)
                steps.take(tpb_loss(projection(tokens), embeddings, text_features, masks, config.text_temperature), epoch)
    return projection.cpu().eval().requires_grad_(False), losses
