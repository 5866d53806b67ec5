"""RareCLIPDetector: RareCLIP for one product line, step by step (docs/algorithms/rareclip.md)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ...backbone import FrameInput, load_backbone, resolve_device
from ...contract import DetectionResult, Detector, PaperFigures
from ...ops.compiled import compile_problem
from ...ops.maps import neighbourhood_mean, normalize01, upsample_and_blur
from ...timing import stage_timer
from .config import RareCLIPConfig
from .image_memory import ImageMemory, RescoreSettings, local_aggregated_features
from .memory import (
    BankScores,
    DirectPatchRarityBank,
    PatchRarityBank,
    blend_with_references,
    rarity_score,
)
from .paper import paper_figures
from .text_branch import (
    cached_state_embeddings,
    init_text_projection,
    text_anomaly_map,
    text_image_score,
)

_BANK_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class FrameFeatures:
    """Backbone output for one frame; independent of the line's state, so it can be batched."""

    embedding: torch.Tensor  # D, L2-normalized
    tokens: dict[int, torch.Tensor]  # 1-indexed block -> M x C


@dataclass
class TextBranch:
    """Eq. 1-3 for one frame (M-vectors unless noted)."""

    a_text: torch.Tensor  # A_text
    c_text: torch.Tensor  # 0-dim
    text_sum: Optional[torch.Tensor]  # the running sum of A_text after this frame (float64)
    mean_text: Optional[torch.Tensor]  # Ā_text used by this frame; None before any memorized frame
    a_text_hat: torch.Tensor  # Â_text


@dataclass
class ImageRarity:
    """Sec. 4 for one frame."""

    laifs: torch.Tensor  # n_blocks x C
    memory_sims: Optional[torch.Tensor]  # n_blocks x n, against the remembered (scored) images
    reference_sims: Optional[torch.Tensor]  # n_blocks x k, against the references


class RareCLIPDetector(Detector):
    """One line's RareCLIP detector.

    Online mode memorizes every image after scoring it; offline mode freezes all memories, so
    results do not depend on order. `add_normal_references` gives the k-shot variant. A step
    runs the paper's stages in order: text branch, patch rarity banks, image rarity, fusion,
    re-scoring (`step_features`).

    Result parts: `preliminary_score` (c_test), `text_score` (c_text), `image_rarity` (c_rare,
    None before any history), `text_map` (Â_text, g x g), `rarity_map` (Â_rare, g x g, None
    before any history), `images_seen` (t, references included).
    """

    kind = "rareclip"
    supports_references = True

    def __init__(self, config: RareCLIPConfig):
        self.config = config
        self.device = resolve_device(config.device)
        if config.compile_banks and (problem := compile_problem(self.device)):
            raise ValueError(f"detector.compile_banks: {problem}; or set compile_banks: false")
        self.backbone, model = load_backbone(
            config, [*config.rarity_blocks, *config.text_blocks], self.device, config.cuda_graphs
        )
        self.text_features = cached_state_embeddings(config, model).to(self.device)  # D x 2
        del model  # the text tower is not needed once the text embeddings exist
        self.text_projection = init_text_projection(config, self.backbone.width, self.text_features.shape[0]).to(
            self.device
        )
        self.frame_input = FrameInput(config.image_size, config.input_view, self.device, config.resize_on_device)
        self.grid = self.backbone.grid
        self.n_patches = self.grid * self.grid
        # the rarity banks, one per (block, scale), block-major: row i of every bank tensor
        self.bank_keys = [(b, r) for b in config.rarity_blocks for r in config.scales]
        self.rescore_settings = RescoreSettings(
            config.rescore_min_images, config.rescore_divisor, config.rescore_max_neighbors, config.rescore_temperature
        )
        self.banks_compiled_for: set[bool] = set()  # has_references of the bank graphs compiled ahead
        self.reset()
        self._compile_banks_ahead()

    @classmethod
    def paper_figures(cls, dataset: str, config: RareCLIPConfig, shots: int = 0) -> Optional[PaperFigures]:
        return paper_figures(dataset, config.mode, config.rarity_branch, shots)

    # ---- state -------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything this line has seen (e.g. after a product changeover)."""
        self.images_seen = 0  # t, references included
        self.text_map_sum: torch.Tensor | None = None  # M, float64: running sum of A_text
        self.image_memory = ImageMemory(self.config.image_memory_size)
        self.n_references = 0  # k
        self.reference_laifs: torch.Tensor | None = None  # n_blocks x k x C
        self.banks = self._new_banks()

    def _compile_banks_ahead(self) -> None:
        """With `compile_banks`: compile the banks' step for the line's mode now, not at its first
        full step; once per graph (with and without the k-shot map): later banks of this process
        reuse the compiled code."""
        if not self.config.compile_banks or self.banks.has_references in self.banks_compiled_for:
            return
        self.banks.compile_ahead(self.n_patches, self.backbone.width, self.device, self.config.mode == "online")
        self.banks_compiled_for.add(self.banks.has_references)

    def _new_banks(self) -> PatchRarityBank | DirectPatchRarityBank:
        """All rarity banks of the line as one stack (stepped together, one batched computation)."""
        cfg = self.config
        dtype = _BANK_DTYPES[cfg.bank_dtype]
        n_banks = len(self.bank_keys)
        if cfg.rarity_branch == "dprb":
            return DirectPatchRarityBank(
                max_images=cfg.max_images,
                alpha=cfg.dprb_alpha,
                rarity_ratio=cfg.rarity_ratio,
                dtype=dtype,
                n_banks=n_banks,
                reference_loose_ratio=cfg.dprb_reference_loose_ratio,
                sampler=cfg.sampler,
                seed=cfg.seed,
            )
        return PatchRarityBank(
            max_features=cfg.max_features,
            max_images=cfg.max_images,
            k=cfg.k_neighbors,
            rarity_ratio=cfg.rarity_ratio,
            loose_ratio=cfg.loose_ratio,
            sampler=cfg.sampler,
            max_protected=min(self.n_patches * self.n_references // 4, cfg.max_features),  # k-shot protection bound
            seed=cfg.seed,
            dtype=dtype,
            n_banks=n_banks,
            compiled=cfg.compile_banks,
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
        self._compile_banks_ahead()

    # ---- scoring -----------------------------------------------------------------------------
    def encode(self, images: list, timings: dict[str, float] | None = None) -> list[FrameFeatures]:
        """Preprocess and run the backbone on a batch of frames (no state involved).
        `timings`: adds seconds spent in 'preprocess' and 'backbone'."""
        timer = stage_timer(timings, self.device)
        batch = self.frame_input(images)
        timer.lap("preprocess")
        out = self.backbone(batch)
        timer.lap("backbone")
        return [
            FrameFeatures(out.image_embedding[i], {b: t[i] for b, t in out.patch_tokens.items()})
            for i in range(len(images))
        ]

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
        self._compile_banks_ahead()  # the k-shot map makes it another graph

    def step_features(
        self, features: FrameFeatures, update: Optional[bool] = None, timings: dict[str, float] | None = None
    ) -> DetectionResult:
        """Score one encoded frame and (with `update`, default: the mode's) memorize it.

        `timings`: when a dict is given, seconds per stage are added to it: 'text' (TPB),
        'banks' (bank features, the rarity banks incl. sampling, k-shot map), 'image_rarity'
        (LAIFs and their similarities), 'fusion' (Eq. 20-21, upsampling, blur), 'rescore'
        (Eq. 22 and the image memory update), 'output' (results to host). CUDA is synchronized
        at each stage boundary only then; with None (the default) nothing is measured.

        Everything stays on the device until the end of the step, where the scalars and maps
        come to the host in two transfers; only then do the banks finish their update with the
        step's only other host sync (`PatchRarityBank.settle`), so the host queues every kernel
        of the step without waiting for the device.
        """
        if update is None:
            update = self.config.mode == "online"
        return self._step(features, update, reference=False, timings=timings)

    @torch.inference_mode()
    def _step(
        self, frame: FrameFeatures, update: bool, reference: bool, timings: dict[str, float] | None = None
    ) -> DetectionResult | None:
        """One frame through every stage; a reference frame is only memorized (returns None)."""
        timer = stage_timer(timings, self.device)
        t = self.images_seen
        tokens = {b: v.to(self.device) for b, v in frame.tokens.items()}
        embedding = frame.embedding.to(self.device)

        text = self._text_branch(tokens, embedding, update)
        timer.lap("text")
        bank_scores = self.banks.score(self._bank_features(tokens), update=update, reference=reference)
        timer.lap("banks")
        image = self._image_rarity(tokens, text.mean_text)
        timer.lap("image_rarity")
        if update:
            self.text_map_sum = text.text_sum
            self.images_seen = t + 1
        if reference:
            laifs = image.laifs[:, None]
            self.reference_laifs = laifs if self.reference_laifs is None else torch.cat([self.reference_laifs, laifs], 1)
            self.banks.settle()
            return None

        full, c_rare, rarity_map = self._fuse(text, bank_scores, image, t)
        c_test = full.max().double() + text.c_text.double()  # as float(max) + float(c_text) in float64
        timer.lap("fusion")
        score = self.image_memory.rescore(embedding, image.laifs, c_test, self.rescore_settings, image.memory_sims)
        if update:
            self.image_memory.add(embedding, image.laifs, c_test)
        timer.lap("rescore")
        result = self._result(score, c_test, text, c_rare, full, rarity_map, t)
        timer.lap("output")
        self.banks.settle()  # the update's one host sync, once the results are on the host
        return result

    def _text_branch(self, tokens: dict[int, torch.Tensor], embedding: torch.Tensor, update: bool) -> TextBranch:
        """Eq. 1-3. The cumulative mean includes the current image when it is memorized;
        otherwise it is the stored mean (none before the first memorized image)."""
        cfg = self.config
        projected = self.text_projection([tokens[b][None].float() for b in cfg.text_blocks])
        a_text = text_anomaly_map(projected, self.text_features, cfg.text_temperature)[0]  # M
        c_text = text_image_score(embedding[None], self.text_features, cfg.text_temperature)[0]  # 0-dim
        t = self.images_seen
        text_sum, mean_text = self.text_map_sum, None
        if update:
            text_sum = a_text.double() if text_sum is None else text_sum + a_text.double()
            mean_text = (text_sum / (t + 1)).float()
        elif text_sum is not None:
            mean_text = (text_sum / t).float()
        a_text_hat = a_text if mean_text is None else torch.maximum(a_text, mean_text)
        return TextBranch(a_text, c_text, text_sum, mean_text, a_text_hat)

    def _bank_features(self, tokens: dict[int, torch.Tensor]) -> torch.Tensor:
        """Sec. 3: per (block, scale) in `bank_keys` order, the r x r neighbourhood mean on the
        grid, then L2-normalized; banks x M x C."""
        blocks = torch.stack([tokens[b] for b in self.config.rarity_blocks])  # n_blocks x M x C
        per_scale = [F.normalize(neighbourhood_mean(blocks, self.grid, r), dim=-1) for r in self.config.scales]
        return torch.stack(per_scale, dim=1).flatten(0, 1)

    def _image_rarity(self, tokens: dict[int, torch.Tensor], mean_text: Optional[torch.Tensor]) -> ImageRarity:
        """Sec. 4: the frame's LAIFs and their similarities to the remembered and reference LAIFs."""
        raw_tokens = torch.stack([tokens[b] for b in self.config.rarity_blocks])  # n_blocks x M x C
        laifs = local_aggregated_features(raw_tokens, mean_text, self.config.foreground_ratio)
        memory_sims = self.image_memory.laif_similarity(laifs) if len(self.image_memory) else None
        reference_sims = None
        if self.reference_laifs is not None:
            reference_sims = torch.bmm(self.reference_laifs, laifs[:, :, None])[..., 0]
        return ImageRarity(laifs, memory_sims, reference_sims)

    def _fuse(self, text: TextBranch, bank_scores: BankScores, image: ImageRarity, t: int):
        """Eq. 19-21 and the k-shot blend, then upsampling and blur. Returns the S x S map,
        c_rare (0-dim or None) and Â_rare (M or None)."""
        cfg = self.config
        c_rare = rarity_map = None
        if bank_scores.rarity is None:
            a_map = text.a_text_hat
        else:
            a_rare = bank_scores.rarity.mean(0)
            remembered = [s for s in (image.reference_sims, image.memory_sims) if s is not None]
            if remembered:
                c_rare = rarity_score(torch.cat(remembered, dim=1), cfg.rarity_ratio, dim=1).mean()  # Eq. 19
            if self.n_references:
                weights = self.banks.reference_weights(self.n_references, t)
                a_rare = blend_with_references(a_rare, bank_scores.reference.mean(0), weights)
                c_rare = blend_with_references(c_rare, (1 - image.reference_sims.amax(1)).mean(), weights)
            rarity_map = a_rare
            if c_rare is not None:  # Eq. 20, only for a positive c_rare (as the authors)
                rarity_map = a_rare + torch.where(c_rare > 0, c_rare, 0.0) * (1 + normalize01(text.mean_text))
            lam_rare, lam_text = (2 / 3, 2 / 3) if t <= 3 else (4 / 3, 1 / 3)  # Eq. 21
            a_map = lam_rare * rarity_map + lam_text * text.a_text_hat
        full = upsample_and_blur(a_map.view(1, self.grid, self.grid), cfg.image_size, cfg.blur_sigma, cfg.blur_kernel)[0]
        return full, c_rare, rarity_map

    def _result(self, score, c_test, text: TextBranch, c_rare, full, rarity_map, t: int) -> DetectionResult:
        """Everything to the host in two transfers (scalars, maps)."""
        scalars = [score, c_test, text.c_text.double()] + ([] if c_rare is None else [c_rare.double()])
        scalars = torch.stack(scalars).tolist()
        maps = [full.reshape(-1), text.a_text_hat] + ([] if rarity_map is None else [rarity_map])
        maps = torch.cat(maps).cpu().numpy()
        size, m, g = self.config.image_size, self.n_patches, self.grid
        return DetectionResult(
            score=scalars[0],
            anomaly_map=maps[: size * size].reshape(size, size),
            parts={
                "preliminary_score": scalars[1],
                "text_score": scalars[2],
                "image_rarity": None if c_rare is None else scalars[3],
                "text_map": maps[size * size : size * size + m].reshape(g, g),
                "rarity_map": None if rarity_map is None else maps[size * size + m :].reshape(g, g),
                "images_seen": t,
            },
        )
