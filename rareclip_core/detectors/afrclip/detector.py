"""AFRCLIPDetector: AFR-CLIP for one product line (docs/algorithms/afrclip.md). Every frame is
scored on its own: nothing is learned from the stream, so results do not depend on order."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ...backbone import FrameInput, resolve_device
from ...contract import DetectionResult, Detector, PaperFigures
from ...timing import stage_timer
from .config import AFRCLIPConfig
from .model import load_model
from .paper import paper_figures


@dataclass
class FrameFeatures:
    """The stage tokens of one frame (self-prompted backbone output): n_stages x (1 + P) x W."""

    tokens: torch.Tensor


class AFRCLIPDetector(Detector):
    """One line's AFR-CLIP detector: per stage, adapters, MPFA, CMFR and text-on-text scoring;
    the score and map are the means over stages.

    Result parts: `stage_scores` (each stage's class-token P_a), `patch_map` (g x g, the mean
    over stages of P_a,i before upsampling).
    """

    kind = "afrclip"

    def __init__(self, config: AFRCLIPConfig):
        self.config = config
        self.device = resolve_device(config.device)
        model = load_model(config, self.device, [config.product])
        self.vision, self.heads = model.vision, model.heads
        self.text = model.text[config.product].to(self.device)  # 3 x D: T^n, T^a, T^s before the adapter
        self.frame_input = FrameInput(config.image_size, config.input_view, self.device, config.resize_on_device)
        self.grid = self.vision.grid

    @classmethod
    def paper_figures(cls, dataset: str, config: AFRCLIPConfig, shots: int = 0) -> Optional[PaperFigures]:
        return paper_figures(dataset, shots)

    # ---- state: none (a per-image detector) ----------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Empty: AFR-CLIP learns nothing from a line's stream (its config defines it fully)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"AFR-CLIP keeps no stream state, but the state has keys {sorted(state)}: it was saved by another kind")

    def reset(self) -> None:
        """Nothing to forget."""

    # ---- scoring -------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, images: list, timings: dict[str, float] | None = None) -> list[FrameFeatures]:
        """Preprocess, the CNN (F_cnn), self-prompts (Eq. 15-16) and the prompted backbone
        (Eq. 17-18) for a batch of frames. `timings`: 'preprocess', 'backbone'."""
        timer = stage_timer(timings, self.device)
        batch = self.frame_input(images)
        timer.lap("preprocess")
        # the CNN and the prompt projections one frame at a time: their CPU kernels depend on the
        # batch size, and a frame must get bitwise the same result alone or in a replay batch
        prompts = torch.cat([self.heads.sp(self.vision.cnn_features(batch[i : i + 1])) for i in range(len(images))])
        tokens = torch.stack(self.vision.stage_tokens(batch, prompts), dim=1)  # B x n_stages x (1 + P) x W
        timer.lap("backbone")
        return [FrameFeatures(tokens[i]) for i in range(len(images))]

    @torch.inference_mode()
    def step_features(
        self, features: FrameFeatures, update: Optional[bool] = None, timings: dict[str, float] | None = None
    ) -> DetectionResult:
        """Score one frame (`update` is ignored: there is nothing to learn). `timings`: 'scoring', 'output'."""
        timer = stage_timer(timings, self.device)
        cfg = self.config
        stage_tokens = list(features.tokens.to(self.device)[:, None])  # per stage 1 x (1 + P) x W
        logits = self.heads.stage_logits(stage_tokens, self.text[None], self.grid, cfg.mpfa_size, cfg.temperature)
        p_abnormal = logits.softmax(-1)[:, 0, :, 1]  # n_stages x (1 + P): Eq. 9 (class token) and 13
        stage_scores = p_abnormal[:, 0]
        patch_map = p_abnormal[:, 1:].mean(0).view(1, 1, self.grid, self.grid)
        full = F.interpolate(patch_map, size=(cfg.image_size,) * 2, mode="bilinear", align_corners=False)  # Eq. 14
        timer.lap("scoring")
        result = DetectionResult(
            score=float(stage_scores.mean()),
            anomaly_map=full[0, 0].cpu().numpy(),
            parts={"stage_scores": stage_scores.tolist(), "patch_map": patch_map[0, 0].cpu().numpy()},
        )
        timer.lap("output")
        return result
