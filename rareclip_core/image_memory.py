"""Image-level memory: the LAIFs of image rarity (IRB, Eq. 19) and image re-scoring (Eq. 22, sec. 5)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .memory import shift_to_front


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


class ImageMemory:
    """The newest `capacity` images: global embedding (D), one LAIF per rarity block (C) and the
    preliminary score c_test.

    Storage is preallocated with some slack rows: an image is written in place, and only when the
    slack is used up are the newest rows moved to the front (once every `slack` images), so
    adding an image costs O(D + n_blocks C), not a copy of the whole memory. `embeddings`,
    `laifs` and `scores` are views of the rows in use, oldest first.

    Scores and similarities stay on the device (0-dim tensors): a step needs no host sync here.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.slack = max(8, capacity // 4)
        self._embeddings: torch.Tensor | None = None  # rows x D
        self._laifs: torch.Tensor | None = None  # n_blocks x rows x C
        self._scores: torch.Tensor | None = None  # rows, float64
        self._start = self._end = 0  # rows in use: [start, end)

    def __len__(self) -> int:
        return self._end - self._start

    @property
    def embeddings(self) -> torch.Tensor | None:  # n x D
        return None if self._embeddings is None else self._embeddings[self._start : self._end]

    @property
    def laifs(self) -> torch.Tensor | None:  # n_blocks x n x C
        return None if self._laifs is None else self._laifs[:, self._start : self._end]

    @property
    def scores(self) -> torch.Tensor | None:  # n, float64
        return None if self._scores is None else self._scores[self._start : self._end]

    def laif_similarity(self, laifs: torch.Tensor) -> torch.Tensor:
        """<LAIF_test, LAIF_i> per block and remembered image; n_blocks x n."""
        return torch.bmm(self.laifs, laifs[:, :, None])[..., 0]

    def rescore(
        self,
        embedding: torch.Tensor,
        laifs: torch.Tensor,
        c_test: torch.Tensor | float,
        min_images: int,
        divisor: int,
        max_neighbors: int,
        temperature: float,
        laif_sims: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Eq. 22: once more than `min_images` are remembered (the test image included), the
        softmax(temperature * sim / max sim)-weighted mean of the c_test of the
        min(ceil(n / divisor), max_neighbors) most similar images, itself included.
        Similarity = cos(global) + sum over blocks of cos(LAIF). Returns a 0-dim float64 tensor
        (c_test itself below the threshold). `laif_sims`: `laif_similarity(laifs)` if computed."""
        c_test = torch.as_tensor(c_test, dtype=torch.float64, device=embedding.device)
        n = len(self) + 1
        if n <= min_images:
            return c_test
        if laif_sims is None:
            laif_sims = self.laif_similarity(laifs)
        self_sim = embedding @ embedding + laifs.shape[0]  # unit LAIFs: 1 each, as the authors add it
        sims = self.embeddings @ embedding + laif_sims.sum(0)
        sims = torch.cat([sims, self_sim[None]]).double()
        scores = torch.cat([self.scores, c_test.reshape(1)])
        top, idx = sims.topk(min(math.ceil(n / divisor), max_neighbors))
        weights = torch.softmax(temperature * top / top.max(), dim=0)
        return (weights * scores[idx]).sum()

    def _allocate(self, rows: int, embedding: torch.Tensor, laifs: torch.Tensor) -> None:
        self._embeddings = embedding.new_empty(rows, embedding.shape[-1])
        self._laifs = laifs.new_empty(laifs.shape[0], rows, laifs.shape[-1])
        self._scores = torch.empty(rows, dtype=torch.float64, device=embedding.device)
        self._start = self._end = 0

    def add(self, embedding: torch.Tensor, laifs: torch.Tensor, c_test: torch.Tensor | float) -> None:
        if self._embeddings is None:
            self._allocate(self.capacity + self.slack, embedding, laifs)
        if self._end == self._embeddings.shape[0]:
            self._compact()
        self._embeddings[self._end] = embedding
        self._laifs[:, self._end] = laifs
        self._scores[self._end] = torch.as_tensor(c_test, dtype=torch.float64)
        self._end += 1
        self._start = max(self._start, self._end - self.capacity)

    def _compact(self) -> None:
        """Slack used up: move the newest capacity - 1 rows to the front (no temporary copy).
        Runs once every `slack` additions at most."""
        keep = min(len(self), self.capacity - 1)
        shift_to_front(self._embeddings, self._end - keep, keep)
        shift_to_front(self._laifs, self._end - keep, keep, dim=1)
        shift_to_front(self._scores, self._end - keep, keep)
        self._start, self._end = 0, keep

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Views of the rows in use (copy them to keep them)."""
        if not len(self):
            return {}
        return {"embeddings": self.embeddings, "laifs": self.laifs, "scores": self.scores}

    def load_state_dict(self, state: dict[str, torch.Tensor], device="cpu") -> None:
        self._embeddings = self._laifs = self._scores = None
        self._start = self._end = 0
        if not state:
            return
        embeddings, laifs = state["embeddings"].to(device), state["laifs"].to(device)
        n = embeddings.shape[0]
        self._allocate(max(n, self.capacity) + self.slack, embeddings[0], laifs[:, 0])
        self._embeddings[:n] = embeddings
        self._laifs[:, :n] = laifs
        self._scores[:n] = state["scores"].to(device)
        self._end = n
