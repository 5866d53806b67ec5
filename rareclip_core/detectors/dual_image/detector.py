"""DualImageDetector: Dual-Image CLIP for one product line, frame by frame
(docs/algorithms/dual-image-clip.md)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from ...backbone import FrameInput, VisionOptions, backbone_dtype, create_clip_model, resolve_device, vision_forward
from ...config import ConfigError
from ...contract import DetectionResult, Detector, PaperFigures
from ...ops.maps import neighbourhood_mean
from ...timing import stage_timer
from .adapter import AdaptationSettings, adapt
from .config import DualImageConfig
from .paper import paper_figures
from .pseudo_anomaly import synthesize
from .reference_bank import ReferenceBank
from .text import abnormal_probability, state_embeddings


@dataclass
class FrameFeatures:
    """One frame's backbone output; independent of the line's state, so it can be batched."""

    image: torch.Tensor  # 3 x S x S uint8, the centre crop the model saw (CPU)
    embedding: torch.Tensor  # D, the image token, L2-normalized
    tokens: torch.Tensor  # M x D, V-V patch tokens after ln_post and proj (not normalized)


def map_to_image(patch_map: torch.Tensor, grid: int, smoothing: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A patch map (M) -> (the r x r mean on the grid with replicate padding, g x g; that map
    bilinearly upsampled to size x size, align_corners) (AnoVL's post-processing; no Gaussian)."""
    smoothed = neighbourhood_mean(patch_map.view(1, -1, 1), grid, smoothing).view(grid, grid)
    full = F.interpolate(smoothed[None, None], size=(size, size), mode="bilinear", align_corners=True)[0, 0]
    return smoothed, full


class DualImageDetector(Detector):
    """One line's Dual-Image CLIP detector (online: references are the line's earlier frames).

    A step: text scores (Eq. 1-3), the visual reference score against R frames drawn from the
    bank (Eq. 5; none on the line's first frame), the joint map (Eq. 6), test-time adaptation on
    a pseudo-anomalous copy of the frame (Eq. 7-11), the final map and score (Eq. 12-13), then
    the frame joins the bank.

    Result parts: `text_score` (s_text), `text_map` (S_t), `visual_map` (S_v, None without
    references), `joint_map` (S_j), `adapted_map` (S', None without TTA), all g x g;
    `reference_frames` (stream positions of the references), `tta_losses` (the loss before each
    step and after the last), `pseudo_patches` (patches under the pseudo mask), `frames_seen`.
    """

    kind = "dual_image"

    def __init__(self, config: DualImageConfig):
        self.config = config
        self.device = resolve_device(config.device)
        model = create_clip_model(config)
        self.text = state_embeddings(model, config).to(self.device)  # D x 2
        visual = model.visual
        del model  # the text tower is not needed once the state embeddings exist
        self.depth = len(visual.transformer.resblocks)
        if getattr(visual, "attn_pool", None) is not None or visual.proj is None:
            raise ConfigError(f"detector.model {config.model!r}: Dual-Image CLIP needs a ViT with a class token and a projection")
        self.dtype = backbone_dtype(config.precision, self.device)
        self.visual = visual.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.grid = self.visual.grid_size[0]
        self.n_patches = self.grid * self.grid
        # OpenCLIP's evaluation view; its pixels, not normalized: the pseudo-anomaly needs them
        self.frame_input = FrameInput(config.image_size, config.input_view, self.device, config.resize_on_device)
        self.mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN, device=self.device).view(3, 1, 1)
        self.std = torch.tensor(open_clip.OPENAI_DATASET_STD, device=self.device).view(3, 1, 1)
        self.adaptation = AdaptationSettings(
            config.tta_steps, config.tta_lr, config.tta_weight_decay, config.mask_loss_weight,
            config.sim_loss_weight, config.temperature,
        )
        self.reset()

    @classmethod
    def paper_figures(cls, dataset: str, config: DualImageConfig, shots: int = 0) -> Optional[PaperFigures]:
        return paper_figures(dataset, config.tta_steps > 0, shots)

    # ---- state -------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the line's earlier frames and restart the random draws from `seed`."""
        self.frames_seen = 0
        self.bank = ReferenceBank(self.config.bank_size)
        self.generator = torch.Generator().manual_seed(self.config.seed)  # references, pseudo-anomalies, adapters

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The bank (tokens, images, scores, stream positions), the frame count and the random
        generator's state, as CPU tensors. Nothing else outlives a frame (the adapter is fresh)."""
        state = {"frames_seen": torch.tensor(self.frames_seen), "rng_state": self.generator.get_state()}
        state.update({f"bank.{k}": v for k, v in self.bank.state_dict().items()})
        return {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a `state_dict()` of a detector with the same config (checked by shapes)."""
        if "bank.tokens" in state:
            _, m, d = state["bank.tokens"].shape
            size = state["bank.images"].shape[-1]
            if (m, d, size) != (self.n_patches, self.text.shape[0], self.config.image_size):
                raise ValueError(
                    f"state has {m} patches of {d} features at {size} px, this detector {self.n_patches} of "
                    f"{self.text.shape[0]} at {self.config.image_size}: it was saved with another model or image_size"
                )
        self.reset()
        self.bank.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("bank.")}, self.device)
        self.frames_seen = int(state["frames_seen"])
        self.generator.set_state(state["rng_state"])

    # ---- backbone ----------------------------------------------------------------------------
    @torch.no_grad()
    def _forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """B x 3 x S x S floats in [0, 1] -> (B x D normalized image tokens, B x M x D patch tokens).
        ln_post and the projection run one frame at a time, so a frame gets bitwise the same
        features alone or in a batch (replay batches frames)."""
        x = ((images.to(self.device) - self.mean) / self.std).to(self.dtype)
        out = vision_forward(self.visual, x, VisionOptions((self.depth,), value_value_from=self.config.value_value_from))
        ln_post, proj = self.visual.ln_post, self.visual.proj
        embeddings = torch.cat([ln_post(row[None, 0]) @ proj for row in out.final])
        tokens = torch.stack([ln_post(row[1:]) @ proj for row in out.value_tokens[self.depth]])
        return F.normalize(embeddings.float(), dim=-1), tokens.float()

    def encode(self, images: list, timings: dict[str, float] | None = None) -> list[FrameFeatures]:
        """Crop and run the backbone on a batch of frames (no state involved).
        `timings`: adds seconds spent in 'preprocess' and 'backbone'."""
        timer = stage_timer(timings, self.device)
        pixels = self.frame_input.pixels(images)  # B x 3 x S x S, whole values
        crops = pixels.to("cpu", torch.uint8)
        timer.lap("preprocess")
        embeddings, tokens = self._forward(pixels / 255)
        timer.lap("backbone")
        return [FrameFeatures(crop, embeddings[i], tokens[i]) for i, crop in enumerate(crops)]

    # ---- scoring -----------------------------------------------------------------------------
    def step_features(
        self, features: FrameFeatures, update: Optional[bool] = None, timings: dict[str, float] | None = None
    ) -> DetectionResult:
        """Score one encoded frame; with `update` (the default) it then joins the bank.
        `timings`: adds seconds per stage: 'text', 'visual', 'pseudo' (synthesis and its
        backbone pass), 'tta', 'output'."""
        update = True if update is None else update
        cfg = self.config
        timer = stage_timer(timings, self.device)
        tokens = features.tokens.to(self.device)
        normed = F.normalize(tokens, dim=-1)
        text_score = abnormal_probability(features.embedding.to(self.device), self.text, cfg.temperature)  # Eq. 2
        text_map = abnormal_probability(normed, self.text, cfg.temperature)  # Eq. 3, M
        timer.lap("text")
        references = self.bank.draw(cfg.references_per_frame, cfg.reference_policy, self.generator)
        visual_map = None
        joint_map = text_map  # the line's first frame: text alone
        if references:  # Eq. 5: 1 - the best cosine similarity to any reference patch
            visual_map = 1 - (normed @ self.bank.memory(references).T).amax(dim=1)
            joint_map = cfg.text_weight * text_map + (1 - cfg.text_weight) * visual_map  # Eq. 6
        timer.lap("visual")
        final_map, adaptation, pseudo_patches = joint_map, None, 0
        if cfg.tta_steps:
            adaptation, pseudo_patches = self._adapt(features, tokens, joint_map, timer)
            final_map = (1 - cfg.tta_map_weight) * joint_map + cfg.tta_map_weight * adaptation.scores
        timer.lap("tta")
        smoothed, full = map_to_image(final_map, self.grid, cfg.map_smoothing, cfg.image_size)
        score = float(cfg.text_weight * text_score + (1 - cfg.text_weight) * smoothed.max())  # Eq. 13 (ours)
        frame = self.frames_seen
        reference_frames = [self.bank.frames[i] for i in references]
        if update:
            self.bank.add(normed, features.image, score, frame)
            self.frames_seen += 1
        g = self.grid

        def grid_map(m: Optional[torch.Tensor]) -> Optional[np.ndarray]:
            return None if m is None else m.view(g, g).cpu().numpy()

        result = DetectionResult(
            score=score,
            anomaly_map=full.cpu().numpy(),
            parts={
                "text_score": float(text_score),
                "text_map": grid_map(text_map),
                "visual_map": grid_map(visual_map),
                "joint_map": grid_map(joint_map),
                "adapted_map": grid_map(None if adaptation is None else adaptation.scores),
                "reference_frames": reference_frames,
                "tta_losses": [] if adaptation is None else adaptation.losses,
                "pseudo_patches": pseudo_patches,
                "frames_seen": frame,
            },
        )
        timer.lap("output")
        return result

    def _adapt(self, features: FrameFeatures, tokens: torch.Tensor, joint_map: torch.Tensor, timer):
        """Eq. 7-11: a pseudo-anomalous copy of the frame (texture: an earlier frame drawn from the
        bank, or noise), its patch tokens, and the adapter trained against both."""
        cfg = self.config
        source = None
        if cfg.pseudo_texture == "bank" and len(self.bank):
            source = self.bank.images[int(torch.randint(len(self.bank), (), generator=self.generator))]
        pseudo = synthesize(features.image, source, self.grid, cfg.pseudo_blend_max, self.generator)
        _, pseudo_tokens = self._forward(pseudo.image[None])
        timer.lap("pseudo")
        adaptation = adapt(
            tokens, pseudo_tokens[0], pseudo.patches.to(self.device), joint_map, self.text, self.adaptation, self.generator
        )
        return adaptation, int(pseudo.patches.sum())
