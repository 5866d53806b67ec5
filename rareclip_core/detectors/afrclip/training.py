"""Training AFR-CLIP's learned parts on an auxiliary annotated dataset (docs/algorithms/afrclip.md, "Training").

The paper: 518 x 518 images, 100 epochs, batch 4, Adam, lr 1e-3 / (epoch + 1). Its loss is not
stated; [ours, AnomalyCLIP's recipe (its train.py)] with L_s the stage's two-class logits
[S_n, S_a] / tau and P_s = softmax(L_s), the probabilities the detector scores with:

    map_s = upsample_bilinear(P_s of the patches as a g x g grid, to S x S)   (as the detector's Eq. 14)
    loss  = PIXEL_WEIGHT * sum_s [Focal(map_s, mask) + Dice(map_s[abnormal], mask) + Dice(map_s[normal], 1 - mask)]
            + CE(image score, label),  image score = mean_s P_s[class token, abnormal]

(Focal as `ops.losses.focal_loss`, AnomalyCLIP's own.) CLIP and the CNN are frozen; gradients reach the self-prompts through the frozen vision tower.
Each epoch's order is a permutation drawn from (seed, epoch), and every epoch ends with a
checkpoint (format in `checkpoint.py`, plus the optimizer state), so a resumed run continues
exactly as an uninterrupted one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from ...backbone import FrameInput, resolve_device
from ...config import ConfigError
from ...data.datasets import Sample, load_mask
from ...ops.losses import dice_loss, focal_loss
from ...optimizer_steps import OptimizerSteps
from .checkpoint import apply_checkpoint, read_checkpoint, save_checkpoint
from .config import AFRCLIPConfig
from .model import AFRCLIPModel, load_model

CHECKPOINT_NAME = "epoch-{:04d}.pth"


@dataclass(frozen=True)
class TrainingSettings:
    epochs: int = 100
    batch_size: int = 4
    lr: float = 1e-3  # initial; epoch e uses lr / (e + 1)
    seed: int = 0  # the per-epoch shuffling (the parts' initial values come from the config's seed)
    checkpoint_dir: Optional[Path] = None  # a checkpoint after every epoch (None: none)
    keep_checkpoints: int = 2  # newest epoch checkpoints kept
    resume: bool = False  # continue from the newest checkpoint in checkpoint_dir
    progress: bool = True

    def identity(self, config: AFRCLIPConfig, n_samples: int) -> dict:
        """What a resumed run must share with the run that wrote the checkpoint."""
        return {"config": config.fingerprint(), "batch_size": self.batch_size, "lr": self.lr, "seed": self.seed,
                "samples": n_samples}


def product_name(category: str) -> str:
    """A dataset category as the prompts' product name (e.g. 'metal_nut' -> 'metal nut')."""
    return category.replace("_", " ")


PIXEL_WEIGHT = 4.0  # AnomalyCLIP's `lam`: the pixel terms against the one image term


def afrclip_loss(logits: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor, grid: int) -> torch.Tensor:
    """The module docstring's loss. logits: n_stages x B x (1 + P) x 2 (class token first);
    masks: B x S x S in {0, 1}; labels: B in {0, 1}."""
    masks = masks.float()
    batch = logits.shape[1]
    probs = logits.softmax(-1)
    pixel = logits.new_zeros(())
    for stage in probs:
        maps = stage[:, 1:].transpose(1, 2).reshape(batch, 2, grid, grid)
        maps = F.interpolate(maps, size=masks.shape[-2:], mode="bilinear", align_corners=False)
        pixel = pixel + focal_loss(maps, masks) + dice_loss(maps[:, 1], masks) + dice_loss(maps[:, 0], 1 - masks)
    # log of the image score and its complement, B x 2: log mean_s P_s, without underflow at a small tau
    log_image = logits[:, :, 0].log_softmax(-1).logsumexp(0) - math.log(logits.shape[0])
    return PIXEL_WEIGHT * pixel + F.nll_loss(log_image, labels.long())


class _TrainingData:
    """Images, masks, labels and prompt embeddings of `samples`; the frozen CNN's features are
    computed once per image and kept (C floats each)."""

    def __init__(self, model: AFRCLIPModel, config: AFRCLIPConfig, samples: list[Sample]):
        self.model = model
        self.samples = samples
        self.image_size = config.image_size
        self.view = config.input_view  # masks cut as the frames are
        self.frame_input = FrameInput(config.image_size, config.input_view, model.vision.device, config.resize_on_device)
        self.cnn_cache: dict[int, torch.Tensor] = {}

    def _image(self, sample: Sample) -> torch.Tensor:
        with Image.open(sample.path) as image:
            return self.frame_input([image])[0]

    def batch(self, indices: list[int]):
        """Images B x 3 x S x S, F_cnn B x C, prompt embeddings B x 3 x D, masks B x S x S, labels B."""
        device = self.model.vision.device
        images = torch.stack([self._image(self.samples[i]) for i in indices]).to(device)
        for k, i in enumerate(indices):
            if i not in self.cnn_cache:
                self.cnn_cache[i] = self.model.vision.cnn_features(images[k : k + 1])[0].cpu()
        cnn = torch.stack([self.cnn_cache[i] for i in indices]).to(device)
        text = torch.stack([self.model.text[product_name(self.samples[i].category)] for i in indices]).to(device)
        masks = torch.stack([torch.from_numpy(load_mask(self.samples[i], self.image_size, self.view)) for i in indices])
        labels = torch.tensor([self.samples[i].label for i in indices])
        return images, cnn, text, masks.to(device), labels.to(device)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return np.random.default_rng([seed, epoch]).permutation(n).tolist()


def train_afrclip(config: AFRCLIPConfig, samples: list[Sample], settings: TrainingSettings = TrainingSettings()):
    """Train the learned parts on annotated images; returns (heads on CPU in eval mode, the
    shape dict of the checkpoint format, the loss of every optimizer step so far). Starts from
    `config.weights` when set, else from seeded random parts; `settings.resume` continues from
    the newest checkpoint in `settings.checkpoint_dir` (its epoch, parts and optimizer state).
    Anomalous samples need a mask (`load_mask` raises otherwise)."""
    if not samples:
        raise ValueError("no training samples")
    if settings.epochs < 1 or settings.batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {settings.epochs} and {settings.batch_size}")
    device = resolve_device(config.device)
    products = sorted({product_name(s.category) for s in samples})
    model = load_model(config, device, products, training=True)
    heads = model.heads.train().requires_grad_(True)
    shape = config.heads_shape(model.vision.width, model.heads.text_adapter.in_features, model.heads.sp.proj[0].in_features)
    optimizer = torch.optim.Adam(heads.parameters(), lr=settings.lr)
    identity = settings.identity(config, len(samples))
    start, losses = 0, []
    if settings.resume:
        start, losses = _resume(settings, heads, optimizer, shape, identity)
    data = _TrainingData(model, config, samples)
    steps_per_epoch = -(-len(samples) // settings.batch_size)
    bar = tqdm(total=settings.epochs * steps_per_epoch, initial=start * steps_per_epoch, desc="AFR-CLIP training",
               unit="step", disable=not settings.progress)
    with bar:
        steps = OptimizerSteps(optimizer, bar, steps_per_epoch, losses)
        for epoch in range(start, settings.epochs):
            for group in optimizer.param_groups:
                group["lr"] = settings.lr / (epoch + 1)
            order = epoch_order(len(samples), settings.seed, epoch)
            for begin in range(0, len(order), settings.batch_size):
                images, cnn, text, masks, labels = data.batch(order[begin : begin + settings.batch_size])
                tokens = model.vision.stage_tokens(images, heads.sp(cnn))
                logits = heads.stage_logits(tokens, text, model.vision.grid, config.mpfa_size, config.temperature)
                steps.take(afrclip_loss(logits, masks, labels, model.vision.grid), epoch)
            if settings.checkpoint_dir is not None:
                training = {"epoch": epoch + 1, "optimizer": optimizer.state_dict(), "losses": list(losses), "settings": identity}
                save_checkpoint(heads, shape, Path(settings.checkpoint_dir) / CHECKPOINT_NAME.format(epoch + 1), training)
                _prune(Path(settings.checkpoint_dir), settings.keep_checkpoints)
    return heads.cpu().eval().requires_grad_(False), shape, losses


def _checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.glob(CHECKPOINT_NAME.replace("{:04d}", "[0-9]" * 4)))


def _prune(folder: Path, keep: int) -> None:
    for old in _checkpoints(folder)[:-keep]:
        old.unlink()


def _resume(settings: TrainingSettings, heads, optimizer, shape: dict, identity: dict) -> tuple[int, list[float]]:
    """Load the newest epoch checkpoint; ConfigError when there is none or it belongs to another run."""
    folder = settings.checkpoint_dir
    found = _checkpoints(Path(folder)) if folder is not None else []
    if not found:
        raise ConfigError(f"--resume: no epoch checkpoint ({CHECKPOINT_NAME.format(1)}, ...) in {folder}")
    checkpoint = read_checkpoint(found[-1], "--resume")
    training = checkpoint.get("training")
    if not isinstance(training, dict) or training.get("settings") != identity:
        saved = training.get("settings") if isinstance(training, dict) else None
        raise ConfigError(f"--resume: {found[-1]} was written by another run (its settings {saved}, this run {identity})")
    apply_checkpoint(heads, checkpoint, shape, found[-1], "--resume")
    optimizer.load_state_dict(training["optimizer"])
    return int(training["epoch"]), [float(x) for x in training["losses"]]


