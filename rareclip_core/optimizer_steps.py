"""What the detectors' training loops share: an optimizer step per batch, every loss kept, and
a progress bar that shows the epoch and the mean loss of the last epoch's worth of steps."""
from __future__ import annotations

import torch


class OptimizerSteps:
    """`take(loss, epoch)` steps `optimizer` on `loss`, appends it to `losses` (the caller's list,
    also what a checkpoint saves) and advances `bar` (a tqdm)."""

    def __init__(self, optimizer: torch.optim.Optimizer, bar, steps_per_epoch: int, losses: list[float]):
        self.optimizer, self.bar, self.steps_per_epoch, self.losses = optimizer, bar, steps_per_epoch, losses

    def take(self, loss: torch.Tensor, epoch: int) -> None:
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.losses.append(loss.item())
        recent = self.losses[-self.steps_per_epoch :]
        self.bar.set_postfix(epoch=epoch + 1, loss=f"{sum(recent) / len(recent):.4f}")
        self.bar.update()
