"""Row operations on stacked memories: batched row gathers, and a window of the newest rows."""
from __future__ import annotations

import torch


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Per bank, the rows `index` of `x`: x B x N x ..., index B x R -> B x R x ... (one
    index_select over the flattened banks, several times faster on CPU than gather)."""
    b, n = x.shape[:2]
    flat = (index + n * torch.arange(b, device=index.device)[:, None]).reshape(-1)
    return x.reshape(b * n, *x.shape[2:]).index_select(0, flat).view(*index.shape, *x.shape[2:])


def shift_to_front(buffer: torch.Tensor, start: int, n: int, dim: int = 0) -> None:
    """In place, along `dim`: buffer[:n] = buffer[start:start + n] (start >= 1), in chunks of at
    most `start` rows, which never overlap their source, so no temporary copy is needed."""
    done = 0
    while done < n:
        size = min(start, n - done)
        buffer.narrow(dim, done, size).copy_(buffer.narrow(dim, start + done, size))
        done += size


class RowWindow:
    """The newest `capacity` rows of one or more tensors kept together (each with its own row
    dimension, `dims`: name -> dim), in preallocated buffers with `slack` spare rows.

    A row is written in place; only when the slack is used up do the newest rows move to the
    front (once every `slack` appends), so appending costs one row, not a copy of the memory.
    `view(name)` is the rows in use, oldest first (a view: copy it to keep it).
    """

    def __init__(self, capacity: int, slack: int, dims: dict[str, int]):
        self.capacity, self.slack, self.dims = capacity, slack, dims
        self.buffers: dict[str, torch.Tensor] | None = None
        self.start = self.end = 0  # rows in use: [start, end)

    def __len__(self) -> int:
        return self.end - self.start

    def view(self, name: str) -> torch.Tensor | None:
        if self.buffers is None:
            return None
        return self.buffers[name].narrow(self.dims[name], self.start, len(self))

    def append(self, **rows: torch.Tensor) -> None:
        """One row per tensor: its buffer's shape without the row dimension."""
        if self.buffers is None:
            self._allocate(self.capacity + self.slack, rows)
        name = next(iter(self.dims))
        if self.end == self.buffers[name].shape[self.dims[name]]:
            self._compact()
        for key, row in rows.items():
            self.buffers[key].select(self.dims[key], self.end).copy_(row)
        self.end += 1
        self.start = max(self.start, self.end - self.capacity)

    def _allocate(self, n_rows: int, like: dict[str, torch.Tensor]) -> None:
        self.buffers = {}
        for key, row in like.items():
            shape = list(row.shape)
            shape.insert(self.dims[key], n_rows)
            self.buffers[key] = row.new_empty(shape)
        self.start = self.end = 0

    def _compact(self) -> None:
        """Slack used up: the newest capacity - 1 rows move to the front (no temporary copy)."""
        keep = min(len(self), self.capacity - 1)
        for key, buffer in self.buffers.items():
            shift_to_front(buffer, self.end - keep, keep, dim=self.dims[key])
        self.start, self.end = 0, keep

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Views of the rows in use (empty when there are none)."""
        return {key: self.view(key) for key in self.dims} if len(self) else {}

    def load_state_dict(self, state: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> None:
        """Rows saved by `state_dict` (all the window's tensors, or none)."""
        self.buffers, self.start, self.end = None, 0, 0
        if not state:
            return
        tensors = {key: state[key].to(device) for key in self.dims}
        key = next(iter(self.dims))
        n = tensors[key].shape[self.dims[key]]
        self._allocate(max(n, self.capacity) + self.slack, {k: t.select(self.dims[k], 0) for k, t in tensors.items()})
        for k, t in tensors.items():
            self.buffers[k].narrow(self.dims[k], 0, n).copy_(t)
        self.end = n
