"""Image-level memory: image rarity (IRB, Eq. 19-20) and image re-scoring (Eq. 22, sec. 5)."""
from __future__ import annotations

import math

import torch

from .memory import rarity_score


class ImageMemory:
    """The newest `capacity` images: global embedding (D), one LAIF per rarity block (C) and the
    preliminary score c_test."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.embeddings: torch.Tensor | None = None  # n x D
        self.laifs: torch.Tensor | None = None  # n_blocks x n x C
        self.scores: torch.Tensor | None = None  # n, float64

    def __len__(self) -> int:
        return 0 if self.scores is None else self.scores.shape[0]

    def image_rarity(self, laifs: torch.Tensor, ratio: float) -> float | None:
        """c_rare: mean over blocks of Rarity(<LAIF_test, LAIF_i>) over remembered images (Eq. 19)."""
        if not len(self):
            return None
        sims = torch.bmm(self.laifs, laifs[:, :, None])[..., 0]  # n_blocks x n
        return float(rarity_score(sims, ratio, dim=1).mean())

    def rescore(
        self,
        embedding: torch.Tensor,
        laifs: torch.Tensor,
        c_test: float,
        min_images: int,
        divisor: int,
        max_neighbors: int,
        temperature: float,
    ) -> float:
        """Eq. 22: once more than `min_images` are remembered (the test image included), the
        softmax(temperature * sim / max sim)-weighted mean of the c_test of the
        min(ceil(n / divisor), max_neighbors) most similar images, itself included.
        Similarity = cos(global) + sum over blocks of cos(LAIF)."""
        n = len(self) + 1
        if n <= min_images:
            return c_test
        self_sim = embedding @ embedding + (laifs * laifs).sum()
        sims = self.embeddings @ embedding + torch.bmm(self.laifs, laifs[:, :, None])[..., 0].sum(0)
        sims = torch.cat([sims, self_sim[None]]).double()
        scores = torch.cat([self.scores, torch.tensor([c_test], dtype=torch.float64, device=self.scores.device)])
        top, idx = sims.topk(min(math.ceil(n / divisor), max_neighbors))
        weights = torch.softmax(temperature * top / top.max(), dim=0)
        return float((weights * scores[idx]).sum())

    def add(self, embedding: torch.Tensor, laifs: torch.Tensor, c_test: float) -> None:
        score = torch.tensor([c_test], dtype=torch.float64, device=embedding.device)
        if self.scores is None:
            self.embeddings, self.laifs, self.scores = embedding[None], laifs[:, None], score
        else:
            self.embeddings = torch.cat([self.embeddings, embedding[None]])[-self.capacity :].contiguous()
            self.laifs = torch.cat([self.laifs, laifs[:, None]], dim=1)[:, -self.capacity :].contiguous()
            self.scores = torch.cat([self.scores, score])[-self.capacity :].contiguous()

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.scores is None:
            return {}
        return {"embeddings": self.embeddings, "laifs": self.laifs, "scores": self.scores}

    def load_state_dict(self, state: dict[str, torch.Tensor], device="cpu") -> None:
        self.embeddings = state["embeddings"].to(device) if state else None
        self.laifs = state["laifs"].to(device) if state else None
        self.scores = state["scores"].to(device) if state else None
