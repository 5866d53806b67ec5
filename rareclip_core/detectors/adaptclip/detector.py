"""AdaptCLIPDetector: AdaptCLIP for one product line, zero-shot until normal references are
added, few-shot after (docs/algorithms/adaptclip.md sec. 3-4)."""
from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from ...backbone import FrameInput, create_clip_model, resolve_device
from ...contract import DetectionResult, Detector, PaperFigures
from ...timing import stage_timer
from .adapters import AdaptCLIPAdapters, AdapterShapes, read_checkpoint
from .config import AdaptCLIPConfig
from .encoder import AdaptCLIPEncoder, FrameFeatures, static_text_features
from .heads import prompt_query_logits, text_alignment_logits, upsample, visual_adapter
from .paper import paper_figures
from .prompts import ABNORMAL_STATES, NORMAL_STATES, state_sentences


def harmonic_mean(*values: torch.Tensor) -> torch.Tensor:
    """n / sum(1 / x) elementwise; nan and inf (from zeros) become 0, as the authors'."""
    total = sum(1.0 / v for v in values)
    return torch.nan_to_num(len(values) / total, nan=0.0, posinf=0.0, neginf=0.0)


def adapter_shapes(config: AdaptCLIPConfig, model: torch.nn.Module) -> AdapterShapes:
    return AdapterShapes(
        embed_dim=model.visual.output_dim,
        text_width=model.transformer.width,
        context_length=model.context_length,
        context_tokens=config.context_tokens,
        n_layers=len(config.patch_blocks),
    )


def init_adapters(config: AdaptCLIPConfig, model: torch.nn.Module) -> AdaptCLIPAdapters:
    """Seeded random adapters (the textual learner's frozen tokens from `model`), then the
    configured checkpoint if any; eval mode, on `model`'s device."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        adapters = AdaptCLIPAdapters(adapter_shapes(config, model))
    adapters.to(next(model.parameters()).device)  # the text tower embeds the frozen prompt tokens there
    adapters.textual_learner.fill_frozen_tokens(model, open_clip.get_tokenizer(config.model))
    if config.weights is not None:
        adapters.load_checkpoint(read_checkpoint(config.weights), config.weights)
    elif config.pretrained is not None:
        warnings.warn(
            "detector.weights is not set: AdaptCLIP's adapters are untrained (random), so its scores are "
            "noise. Set it to the authors' checkpoint (or train one with `run_cluster.py train-adaptclip`).",
            stacklevel=3,
        )
    return adapters.eval().requires_grad_(False)


class AdaptCLIPDetector(Detector):
    """One line's AdaptCLIP detector. Queries never change its state: only normal references do
    (`add_normal_references`, at any point of the stream), so zero-shot results do not depend on
    the order of the frames.

    Result parts: `visual_score` (y_v), `textual_score` (y_t), `prompt_score` (y_p, None
    zero-shot), `references` (k, the normal references held).
    """

    kind = "adaptclip"
    supports_references = True
    references_mid_stream = True  # references add to those held, at any point of a stream

    def __init__(self, config: AdaptCLIPConfig):
        self.config = config
        self.device = resolve_device(config.device)
        model = create_clip_model(config).to(self.device).eval().requires_grad_(False)
        self.adapters = init_adapters(config, model)
        sentences = tuple(state_sentences(s, config.object_noun) for s in (NORMAL_STATES, ABNORMAL_STATES))
        with torch.inference_mode():
            self.static_text = static_text_features(model, sentences, config.model).to(self.device)  # 2 x D
            self.learned_text = self.adapters.textual_learner(model).float()  # 2 x D
        self.encoder = AdaptCLIPEncoder(model.visual, config.patch_blocks, config.value_value_from, self.device, config.precision)
        self.frame_input = FrameInput(config.image_size, config.input_view, self.device, config.resize_on_device)
        del model  # the text tower is not needed once the text features exist
        self.grid = self.encoder.grid
        self.n_patches = self.grid * self.grid
        self.reset()

    @classmethod
    def paper_figures(cls, dataset: str, config: AdaptCLIPConfig, shots: int = 0) -> Optional[PaperFigures]:
        return paper_figures(dataset, shots)

    # ---- state -------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the normal references (back to zero-shot)."""
        self.references: list[torch.Tensor] = []  # per layer k*P x D, L2-normalized patch tokens

    @property
    def n_references(self) -> int:
        return self.references[0].shape[0] // self.n_patches if self.references else 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        """`n_references` and, with k >= 1, `references.<block>`: k*P x D normalized patch tokens."""
        state = {"n_references": torch.tensor(self.n_references)}
        for block, memory in zip(self.config.patch_blocks, self.references):
            state[f"references.{block}"] = memory.detach().cpu().clone().contiguous()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a `state_dict()` of a detector with the same config (checked by shapes)."""
        k = int(state["n_references"])
        keys = [f"references.{b}" for b in self.config.patch_blocks] if k else []
        if sorted(set(state) - {"n_references"}) != sorted(keys):
            raise ValueError(f"state has {sorted(state)}, this detector expects n_references and {keys}")
        width = self.static_text.shape[1]
        for key in keys:
            if tuple(state[key].shape) != (k * self.n_patches, width):
                raise ValueError(
                    f"state's {key} has shape {tuple(state[key].shape)}, this detector expects "
                    f"({k * self.n_patches}, {width}): it was saved with another model or image_size"
                )
        self.references = [state[key].to(self.device, torch.float32).clone() for key in keys]

    def add_normal_references(self, images: list) -> None:
        """Add known-good images of the line (few-shot from then on). May be called at any point
        of the stream; the frames after it are scored against every reference held."""
        if not images:
            return
        if self.n_references + len(images) > self.config.max_references:
            raise ValueError(
                f"the line holds {self.n_references} normal references and {len(images)} more were given, "
                f"over detector.max_references = {self.config.max_references}; reset() the line or raise the setting"
            )
        frames = self.encode(images)
        layers = [
            torch.cat([F.normalize(f.patch_tokens[layer, 1:].to(self.device), dim=-1) for f in frames])
            for layer in range(len(self.config.patch_blocks))
        ]
        self.references = layers if not self.references else [torch.cat(p) for p in zip(self.references, layers)]

    # ---- scoring -----------------------------------------------------------------------------
    def encode(self, images: list, timings: dict[str, float] | None = None) -> list[FrameFeatures]:
        """Preprocess and run the frozen backbone on a batch of frames (no state involved).
        `timings`: adds seconds spent in 'preprocess' and 'backbone'."""
        timer = stage_timer(timings, self.device)
        batch = self.frame_input(images)
        timer.lap("preprocess")
        frames = self.encoder(batch)
        timer.lap("backbone")
        return frames

    @torch.inference_mode()
    def step_features(
        self, features: FrameFeatures, update: Optional[bool] = None, timings: dict[str, float] | None = None
    ) -> DetectionResult:
        """Score one encoded frame (fusion as the authors' code, docs/algorithms/adaptclip.md sec. 3).
        `update` is ignored: queries never change the state. `timings`: adds seconds in 'visual',
        'textual', 'prompt_query' and 'fusion'."""
        timer = stage_timer(timings, self.device)
        tokens = features.patch_tokens.to(self.device)  # n_layers x (1 + P) x D
        global_feature = features.global_feature.to(self.device)[None]  # 1 x D
        adapted = visual_adapter(self.adapters.visual_learner, tokens[-1:], global_feature)
        y_map_v, y_v = self._probabilities(*text_alignment_logits(*adapted, self.static_text, self.config.temperature, self.grid))
        timer.lap("visual")
        raw = text_alignment_logits(tokens[-1:], global_feature, self.learned_text, self.config.temperature, self.grid)
        y_map_t, y_t = self._probabilities(*raw)
        timer.lap("textual")
        k = self.n_references
        if k:
            y_map_p, y_p, distance = self._prompt_query(tokens[:, 1:])
            timer.lap("prompt_query")
            fused = harmonic_mean((y_map_v + y_map_t + y_map_p) / 3, distance)
        else:
            fused = (y_map_v + y_map_t) / 2
        anomaly_map = gaussian_filter(fused.cpu().numpy(), sigma=self.config.blur_sigma)
        peak = torch.tensor(float(anomaly_map.max()), dtype=torch.float64)
        if k:
            score = harmonic_mean(((y_v + y_t + y_p) / 3).double().cpu(), peak)
        else:
            score = (y_v.double().cpu() + y_t.double().cpu() + peak) / 3
        timer.lap("fusion")
        return DetectionResult(
            score=float(score),
            anomaly_map=anomaly_map.astype(np.float32),
            parts={
                "visual_score": float(y_v),
                "textual_score": float(y_t),
                "prompt_score": float(y_p) if k else None,
                "references": k,
            },
        )

    def _probabilities(self, patch_logits: torch.Tensor, image_logits: torch.Tensor):
        """(1 x 2 x h x w, 1 x 2) logits -> (S x S abnormal map, 0-dim abnormal probability):
        softmax over the two classes, then bilinear upsampling."""
        patch = torch.softmax(patch_logits, dim=1)[:, 1:]
        return upsample(patch, self.config.image_size)[0, 0], torch.softmax(image_logits, dim=1)[0, 1]

    def _prompt_query(self, queries: torch.Tensor):
        """Eq. 5-8 per layer against every reference held, averaged over layers. queries:
        n_layers x P x D. Returns Y_p (S x S), y_p (0-dim) and A (S x S): the harmonic mean over
        layers of the upsampled nearest-reference distances."""
        g, size = self.grid, self.config.image_size
        maps, scores, distances = [], [], []
        for layer, memory in enumerate(self.references):
            q = F.normalize(queries[layer], dim=-1)[None]
            local, image, distance = prompt_query_logits(self.adapters.pq_learner, layer, q, memory[None], g, self.config.top_k)
            y_map, y = self._probabilities(local, image)
            maps.append(y_map)
            scores.append(y)
            distances.append(upsample(distance.view(1, 1, g, g), size)[0, 0])
        return torch.stack(maps).mean(0), torch.stack(scores).mean(), harmonic_mean(*distances)
