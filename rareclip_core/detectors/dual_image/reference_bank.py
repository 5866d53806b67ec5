"""The line's bank of earlier frames (ours: the online reading of the paper's image pairs): each
frame's normalized patch tokens (its visual reference), its image (a pseudo-anomaly texture
source) and its score, oldest dropped first beyond the capacity."""
from __future__ import annotations

import torch


class ReferenceBank:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.tokens: list[torch.Tensor] = []  # each M x D, L2-normalized
        self.images: list[torch.Tensor] = []  # each 3 x S x S uint8 (CPU)
        self.scores: list[float] = []  # each frame's image score
        self.frames: list[int] = []  # each frame's position in the line's stream

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, tokens: torch.Tensor, image: torch.Tensor, score: float, frame: int) -> None:
        for items, value in ((self.tokens, tokens), (self.images, image), (self.scores, score), (self.frames, frame)):
            items.append(value)
            del items[: -self.capacity]

    def draw(self, count: int, policy: str, generator: torch.Generator) -> list[int]:
        """Up to `count` distinct bank indices: drawn uniformly with `generator` ('uniform'), or
        the lowest past scores, older first on ties ('lowest_score'; no random draw)."""
        n = len(self)
        if n == 0:
            return []
        if policy == "uniform":
            return torch.randperm(n, generator=generator)[:count].tolist()
        order = sorted(range(n), key=lambda i: self.scores[i])  # stable: older first on ties
        return order[:count]

    def memory(self, indices: list[int]) -> torch.Tensor:
        """The patch tokens of the chosen frames as one memory, (len(indices) M) x D."""
        return torch.cat([self.tokens[i] for i in indices])

    def state_dict(self) -> dict[str, torch.Tensor]:
        if not self.tokens:
            return {}
        return {
            "tokens": torch.stack(self.tokens),
            "images": torch.stack(self.images),
            "scores": torch.tensor(self.scores, dtype=torch.float64),
            "frames": torch.tensor(self.frames, dtype=torch.int64),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor], device: torch.device) -> None:
        self.__init__(self.capacity)
        if not state:
            return
        if len(state["tokens"]) > self.capacity:
            raise ValueError(
                f"state holds {len(state['tokens'])} reference frames, this detector's bank_size is {self.capacity}"
            )
        self.tokens = list(state["tokens"].to(device).unbind(0))
        self.images = list(state["images"].unbind(0))
        self.scores = state["scores"].tolist()
        self.frames = state["frames"].tolist()
