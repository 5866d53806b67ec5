"""Image-level memory: the LAIFs of image rarity (IRB, Eq. 19) and image re-scoring (Eq. 22, sec. 5)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...ops.rows import RowWindow


def local_aggregated_features(
    raw_tokens: torch.Tensor, mean_text: torch.Tensor | None, foreground_ratio: float
) -> torch.Tensor:
    """F^laif (sec. 4, Eq. 19): per rarity block, the mean of the RAW block tokens over the
    floor(ratio M) patches highest in the mean text map (all M patches while there is no mean
    yet), then L2-normalized; raw_tokens n_blocks x M x C -> n_blocks x C. The authors' rule:
    not the mean of normalized tokens, and a count rounded down (684 of 1369)."""
    if mean_text is not None:
        n_foreground = max(1, int(foreground_ratio * raw_tokens.shape[1]))
        raw_tokens = raw_tokens[:, mean_text.topk(n_foreground).indices]
    return F.normalize(raw_tokens.mean(1), dim=-1)


@dataclass(frozen=True)
class RescoreSettings:
    """Eq. 22's constants (the authors': 20, 20, 9, 200)."""

    min_images: int  # re-score once more images than this are remembered (the test image included)
    divisor: int  # take the top ceil(n / divisor) most similar images ...
    max_neighbors: int  # ... but at most this many
    temperature: float  # softmax temperature on the similarities divided by their max


class ImageMemory:
    """The newest `capacity` images: global embedding (D), one LAIF per rarity block (C) and the
    preliminary score c_test, kept in a `RowWindow` (appending an image costs one row, not a copy
    of the memory). `embeddings`, `laifs` and `scores` are views of the rows in use, oldest first.

    Scores and similarities stay on the device (0-dim tensors): a step needs no host sync here.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        # embeddings: n x D, laifs: n_blocks x n x C, scores: n (float64)
        self.window = RowWindow(capacity, max(8, capacity // 4), {"embeddings": 0, "laifs": 1, "scores": 0})

    def __len__(self) -> int:
        return len(self.window)

    @property
    def embeddings(self) -> torch.Tensor | None:  # n x D
        return self.window.view("embeddings")

    @property
    def laifs(self) -> torch.Tensor | None:  # n_blocks x n x C
        return self.window.view("laifs")

    @property
    def scores(self) -> torch.Tensor | None:  # n, float64
        return self.window.view("scores")

    def laif_similarity(self, laifs: torch.Tensor) -> torch.Tensor:
        """<LAIF_test, LAIF_i> per block and remembered image; n_blocks x n."""
        return torch.bmm(self.laifs, laifs[:, :, None])[..., 0]

    def rescore(
        self,
        embedding: torch.Tensor,
        laifs: torch.Tensor,
        c_test: torch.Tensor | float,
        settings: RescoreSettings,
        laif_sims: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Eq. 22: once more than `min_images` are remembered (the test image included), the
        softmax(temperature * sim / max sim)-weighted mean of the c_test of the
        min(ceil(n / divisor), max_neighbors) most similar images, itself included.
        Similarity = cos(global) + sum over blocks of cos(LAIF). Returns a 0-dim float64 tensor
        (c_test itself below the threshold). `laif_sims`: `laif_similarity(laifs)` if computed."""
        c_test = torch.as_tensor(c_test, dtype=torch.float64, device=embedding.device)
        n = len(self) + 1
        if n <= settings.min_images:
            return c_test
        if laif_sims is None:
            laif_sims = self.laif_similarity(laifs)
        self_sim = embedding @ embedding + laifs.shape[0]  # unit LAIFs: 1 each, as the authors add it
        sims = self.embeddings @ embedding + laif_sims.sum(0)
        sims = torch.cat([sims, self_sim[None]]).double()
        scores = torch.cat([self.scores, c_test.reshape(1)])
        top, idx = sims.topk(min(math.ceil(n / settings.divisor), settings.max_neighbors))
        weights = torch.softmax(settings.temperature * top / top.max(), dim=0)
        return (weights * scores[idx]).sum()

    def add(self, embedding: torch.Tensor, laifs: torch.Tensor, c_test: torch.Tensor | float) -> None:
        c_test = torch.as_tensor(c_test, dtype=torch.float64, device=embedding.device)
        self.window.append(embeddings=embedding, laifs=laifs, scores=c_test)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Views of the rows in use (copy them to keep them)."""
        return self.window.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], device="cpu") -> None:
        self.window.load_state_dict(state, device)
