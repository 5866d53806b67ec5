"""Training AdaptCLIP's adapters (docs/algorithms/adaptclip.md sec. 5), writing the authors' format.

Queries are images with masks (a base dataset's test split); each query is paired with one
normal image of its category, drawn at random every epoch, as its prompt. Per step, one summed
loss over three branches, one Adam optimizer (the frozen backbone never learns):

    branch loss = CE(image logits, label) + Focal(map, mask)
                  + Dice(map[abnormal], mask) + Dice(map[normal], 1 - mask)
    visual:   the visual adapter's tokens and feature against the static text features
    textual:  the raw tokens and feature against the textual learner's text features
    prompt-query: each compared layer, query against its prompt, summed over layers

The map is the softmax of the map logits on the patch grid, upsampled bilinearly to the input
size, as the authors' adapters return it (and as the detector scores); Focal as
`ops.losses.focal_loss`. BatchNorm layers
learn batch statistics, so a batch needs 2 queries or more (a last batch of one is dropped).
After every epoch a resume file (`<out>.resume.pt`: adapters, optimizer, epoch, losses) is
written; `resume=True` continues from it, bitwise as if never stopped on CPU.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from ...backbone import FrameInput, create_clip_model, resolve_device
from ...config import ConfigError
from ...data.datasets import Sample, load_mask
from ...data.files import atomic_write
from ...ops.losses import dice_loss, focal_loss
from ...optimizer_steps import OptimizerSteps
from ...torch_files import read_torch_file
from .adapters import AdaptCLIPAdapters
from .config import AdaptCLIPConfig
from .detector import init_adapters
from .encoder import AdaptCLIPEncoder, FrameFeatures, static_text_features
from .heads import prompt_query_logits, text_alignment_logits, upsample, visual_adapter
from .prompts import ABNORMAL_STATES, NORMAL_STATES, state_sentences


@dataclass(frozen=True)
class TrainingSettings:
    """The authors' schedule: 15 epochs, batch 8, Adam lr 1e-3, betas (0.5, 0.999), seed 10."""

    epochs: int = 15
    batch_size: int = 8
    lr: float = 1e-3
    betas: tuple[float, float] = (0.5, 0.999)
    seed: int = 10


def branch_loss(map_logits: torch.Tensor, image_logits: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One branch's loss (module docstring). map_logits B x 2 x h x w, image_logits B x 2,
    masks B x S x S in {0, 1}, labels B in {0, 1}."""
    probs = upsample(map_logits.softmax(dim=1), masks.shape[-1])  # softmax on the grid, as at inference
    masks = masks.float()
    return (F.cross_entropy(image_logits, labels.long()) + focal_loss(probs, masks)
            + dice_loss(probs[:, 1], masks) + dice_loss(probs[:, 0], 1 - masks))


class _Trainer:
    """The frozen CLIP, the adapters being trained and the loss of one batch."""

    def __init__(self, config: AdaptCLIPConfig):
        self.config = config
        self.device = resolve_device(config.device)
        self.model = create_clip_model(config).to(self.device).eval().requires_grad_(False)
        self.adapters = init_adapters(config, self.model).train().requires_grad_(True)
        self.adapters.textual_learner.requires_grad_(False)
        self.adapters.textual_learner.ctx_pos.requires_grad_(True)
        self.adapters.textual_learner.ctx_neg.requires_grad_(True)
        sentences = tuple(state_sentences(s, config.object_noun) for s in (NORMAL_STATES, ABNORMAL_STATES))
        self.static_text = static_text_features(self.model, sentences, config.model).to(self.device)
        self.encoder = AdaptCLIPEncoder(self.model.visual, config.patch_blocks, config.value_value_from,
                                        self.device, config.precision)
        self.frame_input = FrameInput(config.image_size, config.input_view, self.device, config.resize_on_device)

    def encode(self, samples: list[Sample]) -> list[FrameFeatures]:
        images = []
        for sample in samples:
            with Image.open(sample.path) as image:
                images.append(self.frame_input([image])[0])
        return self.encoder(torch.stack(images))

    def loss(self, queries: list[Sample], prompts: list[Sample]) -> torch.Tensor:
        cfg, grid = self.config, self.encoder.grid
        # clone(): the encoder's outputs are inference-mode tensors, unusable in autograd
        q = self.encode(queries)
        tokens = torch.stack([f.patch_tokens for f in q]).clone()  # B x n_layers x (1 + P) x D
        global_feature = torch.stack([f.global_feature for f in q]).clone()  # B x D
        prompt_tokens = torch.stack([f.patch_tokens for f in self.encode(prompts)]).clone()
        masks = torch.stack([torch.from_numpy(load_mask(s, cfg.image_size, "squash")) for s in queries]).to(self.device)
        labels = torch.tensor([s.label for s in queries], device=self.device)
        adapted = visual_adapter(self.adapters.visual_learner, tokens[:, -1], global_feature)
        total = branch_loss(*text_alignment_logits(*adapted, self.static_text, cfg.temperature, grid), masks, labels)
        learned = self.adapters.textual_learner(self.model).float()
        total = total + branch_loss(*text_alignment_logits(tokens[:, -1], global_feature, learned, cfg.temperature, grid),
                                    masks, labels)
        for layer in range(len(cfg.patch_blocks)):
            local, image, _ = prompt_query_logits(
                self.adapters.pq_learner, layer, F.normalize(tokens[:, layer, 1:], dim=-1),
                F.normalize(prompt_tokens[:, layer, 1:], dim=-1), grid, cfg.top_k,
            )
            total = total + branch_loss(local, image, masks, labels)
        return total


def resume_path(out: str | Path) -> Path:
    return Path(str(out) + ".resume.pt")


def train_adapters(
    config: AdaptCLIPConfig,
    queries: list[Sample],
    normals: dict[str, list[Sample]],
    out: str | Path,
    settings: TrainingSettings = TrainingSettings(),
    resume: bool = False,
    progress: bool = True,
    stop_after_epochs: Optional[int] = None,
) -> tuple[AdaptCLIPAdapters, list[float]]:
    """Train the adapters on `queries` (images with masks; good ones may lack a mask), each paired
    every epoch with a random normal image of its category from `normals`, and write the
    checkpoint to `out`; returns the adapters (CPU, eval mode) and the loss of every step.

    Starts from `init_adapters(config)` (seeded, or `config.weights`), or with `resume` from
    `<out>.resume.pt`. `stop_after_epochs` ends the run early (the resume file stays; tests)."""
    if not queries:
        raise ValueError("no training queries")
    missing = sorted({s.category for s in queries if not normals.get(s.category)})
    if missing:
        raise ValueError(f"no normal prompt images for categories {missing} (the train split's good images)")
    trainer = _Trainer(config)
    parameters = [p for p in trainer.adapters.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=settings.lr, betas=settings.betas)
    start, losses = 0, []
    saved = resume_path(out)
    if resume:
        state = _read_resume(saved, config, settings)
        trainer.adapters.load_checkpoint(state["adapters"], str(saved), field="--resume")
        optimizer.load_state_dict(state["optimizer"])
        start, losses = int(state["epoch"]), state["losses"].tolist()
    last = settings.epochs if stop_after_epochs is None else min(settings.epochs, start + stop_after_epochs)
    steps = len(_batches(len(queries), settings.batch_size, random.Random(0)))
    with tqdm(total=settings.epochs * steps, initial=start * steps, desc="AdaptCLIP training", unit="step",
              disable=not progress) as bar:
        optimizer_steps = OptimizerSteps(optimizer, bar, steps, losses)
        for epoch in range(start, last):
            draw = random.Random(settings.seed * 100_003 + epoch)  # the epoch's order and prompts
            for batch in _batches(len(queries), settings.batch_size, draw):
                chosen = [queries[i] for i in batch]
                prompts = [draw.choice(normals[s.category]) for s in chosen]
                optimizer_steps.take(trainer.loss(chosen, prompts), epoch)
            _write_resume(saved, trainer.adapters, optimizer, epoch + 1, losses, config, settings)
    adapters = trainer.adapters.cpu().eval().requires_grad_(False)
    if last == settings.epochs:
        atomic_write(Path(out), lambda tmp: torch.save(adapters.checkpoint(), tmp))
        saved.unlink(missing_ok=True)
    return adapters, losses


def _batches(n: int, size: int, draw: random.Random) -> list[list[int]]:
    """A shuffled order cut into batches; a last batch of one is dropped (BatchNorm needs two)."""
    order = list(range(n))
    draw.shuffle(order)
    batches = [order[i : i + size] for i in range(0, n, size)]
    return [b for b in batches if len(b) > 1]


def _write_resume(path: Path, adapters, optimizer, epoch: int, losses: list[float], config, settings) -> None:
    state = {"adapters": adapters.checkpoint(), "optimizer": optimizer.state_dict(), "epoch": epoch,
             "losses": torch.tensor(losses, dtype=torch.float64), "config": config.fingerprint(),
             "settings": asdict(settings)}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _read_resume(path: Path, config: AdaptCLIPConfig, settings: TrainingSettings) -> dict:
    state = read_torch_file(path, "--resume", "resume file", "a run writes it after each epoch")
    if state.get("config") != config.fingerprint() or state.get("settings") != asdict(settings):
        raise ConfigError(
            f"--resume: {path} was written with other detector settings or training options "
            f"({state.get('settings')}); resume with the same ones, or delete it to start afresh"
        )
    return state
