"""OnlineDetector: RareCLIP for one product line, step by step (docs/algorithms/rareclip.md)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from .backbone import ClipBackbone, create_clip_model, resolve_device
from .config import ConfigError, DetectorConfig
from .image_memory import ImageMemory, local_aggregated_features
from .images import to_rgb_image
from .maps import neighbourhood_mean, normalize01, upsample_and_blur
from .memory import DirectPatchRarityBank, PatchRarityBank, blend_with_references, rarity_score
from .text_branch import cached_state_embeddings, init_text_projection, text_anomaly_map, text_image_score

_BANK_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class FrameFeatures:
    """Backbone output for one frame; independent of the line's state, so it can be batched."""

    embedding: torch.Tensor  # D, L2-normalized
    tokens: dict[int, torch.Tensor]  # 1-indexed block -> M x C


@dataclass
class DetectionResult:
    score: float  # final image score (after re-scoring, Eq. 22)
    anomaly_map: np.ndarray  # S x S float32 at the model input resolution
    preliminary_score: float  # c_test = max(A) + c_text
    text_score: float  # c_text (Eq. 2)
    image_rarity: Optional[float]  # c_rare (Eq. 19); None before any history
    text_map: np.ndarray  # g x g, A^_text (Eq. 3)
    rarity_map: Optional[np.ndarray]  # g x g, A^_rare (Eq. 20); None before any history
    images_seen: int  # t: images this line had processed before this one


class _Laps:
    """Wall time per section of a step, for `timings=`: each call adds the time since the last
    one to `timings[name]` (seconds), after waiting for queued CUDA work when on CUDA. Only
    created when timings are requested, so a plain step has no extra synchronization."""

    __slots__ = ("timings", "device", "last")

    def __init__(self, timings: dict[str, float], device: torch.device):
        self.timings, self.device = timings, device
        self._sync()
        self.last = time.perf_counter()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, name: str) -> None:
        self._sync()
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + now - self.last
        self.last = now


class OnlineDetector:
    """One line's RareCLIP detector: `step`, `state_dict`, `load_state_dict`.

    Online mode memorizes every image after scoring it; offline mode freezes all memories, so
    results do not depend on order. `add_normal_references` gives the k-shot variant. Every
    rule follows docs/algorithms/rareclip.md (the paper's equations and the authors' code).
    """

    def __init__(self, config: DetectorConfig | dict | None = None):
        if config is None:
            config = DetectorConfig()
        elif isinstance(config, dict):
            config = DetectorConfig.from_dict(config)
        self.config = config
        self.device = resolve_device(config.device)
        model = create_clip_model(config)
        n_layers = len(model.visual.transformer.resblocks)
        for name in ("rarity_blocks", "text_blocks"):
            if max(getattr(config, name)) > n_layers:
                raise ConfigError(
                    f"detector.{name} = {getattr(config, name)} but {config.model} has {n_layers} blocks"
                )
        self.text_features = cached_state_embeddings(config, model).to(self.device)  # D x 2
        self.backbone = ClipBackbone(
            model.visual, config.rarity_blocks + config.text_blocks, self.device, config.precision
        )
        del model  # the text tower is not needed once the text embeddings exist
        self.text_projection = init_text_projection(config, self.backbone.width, self.text_features.shape[0]).to(
            self.device
        )
        self.preprocess = open_clip.image_transform(config.image_size, is_train=False)
        self.grid = self.backbone.grid
        self.n_patches = self.grid * self.grid
        # the rarity banks, one per (block, scale), block-major: row i of every bank tensor
        self.bank_keys = [(b, r) for b in config.rarity_blocks for r in config.scales]
        self.model_id = f"{config.model}:{config.pretrained or 'random'}:{config.fingerprint()}"
        self.reset()

    # ---- state -------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything this line has seen (e.g. after a product changeover)."""
        self.images_seen = 0  # t, references included
        self.text_map_sum: torch.Tensor | None = None  # M, float64: running sum of A_text
        self.image_memory = ImageMemory(self.config.image_memory_size)
        self.n_references = 0  # k
        self.reference_laifs: torch.Tensor | None = None  # n_blocks x k x C
        self.banks = self._new_banks()

    def _new_banks(self):
        """All rarity banks of the line as one stack (stepped together, one batched computation)."""
        cfg = self.config
        dtype = _BANK_DTYPES[cfg.bank_dtype]
        n_banks = len(self.bank_keys)
        if cfg.rarity_branch == "dprb":
            return DirectPatchRarityBank(
                cfg.max_images, cfg.dprb_alpha, cfg.rarity_ratio, dtype, n_banks, cfg.dprb_reference_loose_ratio
            )
        return PatchRarityBank(
            cfg.max_features,
            cfg.max_images,
            cfg.k_neighbors,
            cfg.rarity_ratio,
            cfg.loose_ratio,
            cfg.sampler,
            min(self.n_patches * self.n_references // 4, cfg.max_features),  # k-shot protection bound
            cfg.seed,
            dtype,
            n_banks,
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything the line has learned, as a flat dict of CPU tensors (safetensors-ready)."""
        state = {"images_seen": torch.tensor(self.images_seen), "n_references": torch.tensor(self.n_references)}
        if self.text_map_sum is not None:
            state["text_map_sum"] = self.text_map_sum
        if self.reference_laifs is not None:
            state["reference_laifs"] = self.reference_laifs
        state["bank_keys"] = torch.tensor(self.bank_keys)  # banks x (block, scale): row order of banks.*
        parts = {"image_memory": self.image_memory.state_dict(), "banks": self.banks.state_dict()}
        for prefix, part in parts.items():
            state.update({f"{prefix}.{k}": v for k, v in part.items()})
        return {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a `state_dict()` of a detector with the same config (checked by shapes)."""
        if "text_map_sum" in state and state["text_map_sum"].shape[0] != self.n_patches:
            raise ValueError(
                f"state has {state['text_map_sum'].shape[0]} patches per image, this detector "
                f"{self.n_patches}: it was saved with another model or image_size"
            )
        saved_keys = [tuple(k) for k in state["bank_keys"].tolist()]
        if saved_keys != self.bank_keys:
            raise ValueError(
                f"state has rarity banks (block, scale) {saved_keys}, this detector {self.bank_keys}: "
                "it was saved with other rarity_blocks or scales"
            )
        self.reset()
        self.images_seen = int(state["images_seen"])
        self.n_references = int(state["n_references"])
        self.banks = self._new_banks()
        if "text_map_sum" in state:
            self.text_map_sum = state["text_map_sum"].to(self.device)
        if "reference_laifs" in state:
            self.reference_laifs = state["reference_laifs"].to(self.device)

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}

        self.image_memory.load_state_dict(part("image_memory"), self.device)
        self.banks.load_state_dict(part("banks"), self.device)

    # ---- scoring -----------------------------------------------------------------------------
    def encode(self, images: list, timings: dict[str, float] | None = None) -> list[FrameFeatures]:
        """Preprocess and run the backbone on a batch of frames (no state involved).
        `timings`: adds seconds spent in 'preprocess' and 'backbone' (see `step_features`)."""
        lap = None if timings is None else _Laps(timings, self.device)
        batch = torch.stack([self.preprocess(to_rgb_image(im)) for im in images])
        if lap:
            lap("preprocess")
        out = self.backbone(batch)
        if lap:
            lap("backbone")
        return [
            FrameFeatures(out.image_embedding[i], {b: t[i] for b, t in out.patch_tokens.items()})
            for i in range(len(images))
        ]

    def step(self, image, update: Optional[bool] = None, timings: dict[str, float] | None = None) -> DetectionResult:
        """Score one frame (PIL image or H x W x 3 uint8 array). `update` defaults to the mode:
        online memorizes the frame, offline does not. `timings`: see `step_features`."""
        return self.step_features(self.encode([image], timings)[0], update, timings=timings)

    def add_normal_references(self, images: list) -> None:
        """k-shot (docs/algorithms/rareclip.md, "k-shot"): k normal images go through first and
        are only memorized, whatever the mode; they produce no score and count in t. Their bank
        features are protected from eviction while few enough survive, they give a k-shot map and
        a k-shot image term blended into the rarity branch, and re-scoring ignores them.

        Given once, before the line's first frame (the protection bound depends on k)."""
        if self.images_seen:
            raise ValueError(
                f"normal references must be given before the line's first frame ({self.images_seen} "
                "already memorized): call reset() first, or give them all in one call"
            )
        if not images:
            return
        self.n_references = len(images)
        self.banks = self._new_banks()
        for frame in self.encode(images):
            self._step(frame, update=True, reference=True)

    def _bank_features(self, tokens: dict[int, torch.Tensor]) -> torch.Tensor:
        """Per (block, scale) in `bank_keys` order: r x r neighbourhood mean on the grid, then
        L2-normalized; banks x M x C."""
        blocks = torch.stack([tokens[b] for b in self.config.rarity_blocks])  # n_blocks x M x C
        per_scale = [F.normalize(neighbourhood_mean(blocks, self.grid, r), dim=-1) for r in self.config.scales]
        return torch.stack(per_scale, dim=1).flatten(0, 1)

    def step_features(
        self, frame: FrameFeatures, update: Optional[bool] = None, timings: dict[str, float] | None = None
    ) -> DetectionResult:
        """Score one encoded frame and (with `update`, default: the mode's) memorize it.

        `timings`: when a dict is given, seconds per section are added to it: 'text' (TPB),
        'banks' (bank features, the rarity banks incl. sampling, k-shot map),
        'image_rarity_rescore' (LAIFs, IRB, fusion, re-scoring, image memory update),
        'upsample_blur', 'output' (results to host). CUDA is synchronized at each section
        boundary only then; with None (the default) nothing is measured or synchronized.

        Everything stays on the device until the end of the step, where the scalars and maps
        come to the host in two transfers (the banks' stale-row count is the only other sync).
        """
        if update is None:
            update = self.config.mode == "online"
        return self._step(frame, update, reference=False, timings=timings)

    @torch.inference_mode()
    def _step(
        self, frame: FrameFeatures, update: bool, reference: bool, timings: dict[str, float] | None = None
    ) -> DetectionResult | None:
        """One frame through every branch; a reference frame is only memorized (returns None)."""
        cfg = self.config
        lap = None if timings is None else _Laps(timings, self.device)
        t, k = self.images_seen, self.n_references
        tokens = {b: v.to(self.device) for b, v in frame.tokens.items()}
        embedding = frame.embedding.to(self.device)

        # Text prompt branch, Eq. 1-3. The cumulative mean includes the current image when it is
        # memorized; otherwise it is the stored mean (none before the first memorized image).
        projected = self.text_projection([tokens[b][None].float() for b in cfg.text_blocks])
        a_text = text_anomaly_map(projected, self.text_features, cfg.text_temperature)[0]  # M
        c_text = text_image_score(embedding[None], self.text_features, cfg.text_temperature)[0]  # 0-dim
        text_sum, mean_text = self.text_map_sum, None
        if update:
            text_sum = a_text.double() if text_sum is None else text_sum + a_text.double()
            mean_text = (text_sum / (t + 1)).float()
        elif text_sum is not None:
            mean_text = (text_sum / t).float()
        a_text_hat = a_text if mean_text is None else torch.maximum(a_text, mean_text)
        if lap:
            lap("text")

        # Patch rarity banks (sec. 3) and their k-shot map
        bank_scores = self.banks.score(self._bank_features(tokens), update=update, reference=reference)
        if lap:
            lap("banks")

        # Image rarity (sec. 4): LAIFs against the remembered images and the references
        raw_tokens = torch.stack([tokens[b] for b in cfg.rarity_blocks])  # n_blocks x M x C
        laifs = local_aggregated_features(raw_tokens, mean_text, cfg.foreground_ratio)
        laif_sims = self.image_memory.laif_similarity(laifs) if len(self.image_memory) else None  # n_blocks x n
        reference_sims = None if self.reference_laifs is None else torch.bmm(self.reference_laifs, laifs[:, :, None])[..., 0]
        if update:
            self.text_map_sum = text_sum
            self.images_seen = t + 1
        if reference:
            self.reference_laifs = laifs[:, None] if self.reference_laifs is None else torch.cat([self.reference_laifs, laifs[:, None]], 1)
            return None

        c_rare = rarity_map = None
        if bank_scores.rarity is None:
            a_map = a_text_hat
        else:
            a_rare = bank_scores.rarity.mean(0)
            remembered = [s for s in (reference_sims, laif_sims) if s is not None]
            if remembered:
                c_rare = rarity_score(torch.cat(remembered, dim=1), cfg.rarity_ratio, dim=1).mean()  # Eq. 19
            if k:
                weights = self.banks.reference_weights(k, t)
                a_rare = blend_with_references(a_rare, bank_scores.reference.mean(0), weights)
                c_rare = blend_with_references(c_rare, (1 - reference_sims.amax(1)).mean(), weights)
            rarity_map = a_rare
            if c_rare is not None:  # Eq. 20, only for a positive c_rare (as the authors)
                rarity_map = a_rare + torch.where(c_rare > 0, c_rare, 0.0) * (1 + normalize01(mean_text))
            lam_rare, lam_text = (2 / 3, 2 / 3) if t <= 3 else (4 / 3, 1 / 3)  # Eq. 21
            a_map = lam_rare * rarity_map + lam_text * a_text_hat
        if lap:
            lap("image_rarity_rescore")

        full = upsample_and_blur(a_map.view(1, self.grid, self.grid), cfg.image_size, cfg.blur_sigma, cfg.blur_kernel)[0]
        peak = full.max()
        if lap:
            lap("upsample_blur")

        c_test = peak.double() + c_text.double()  # as float(max) + float(c_text) in float64
        score = self.image_memory.rescore(
            embedding,
            laifs,
            c_test,
            cfg.rescore_min_images,
            cfg.rescore_divisor,
            cfg.rescore_max_neighbors,
            cfg.rescore_temperature,
            laif_sims,
        )
        if update:
            self.image_memory.add(embedding, laifs, c_test)
        if lap:
            lap("image_rarity_rescore")

        scalars = [score, c_test, c_text.double()] + ([] if c_rare is None else [c_rare.double()])
        scalars = torch.stack(scalars).tolist()
        maps = [full.reshape(-1), a_text_hat] + ([] if rarity_map is None else [rarity_map])
        maps = torch.cat(maps).cpu().numpy()
        size, m = cfg.image_size * cfg.image_size, self.n_patches
        result = DetectionResult(
            score=scalars[0],
            anomaly_map=maps[:size].reshape(cfg.image_size, cfg.image_size),
            preliminary_score=scalars[1],
            text_score=scalars[2],
            image_rarity=None if c_rare is None else scalars[3],
            text_map=maps[size : size + m].reshape(self.grid, self.grid),
            rarity_map=None if rarity_map is None else maps[size + m :].reshape(self.grid, self.grid),
            images_seen=t,
        )
        if lap:
            lap("output")
        return result
