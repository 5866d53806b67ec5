"""Replay a fixed-shape function as a CUDA graph: one launch per call instead of hundreds of
Python-dispatched kernels (the ViT backbone at batch 1 is launch-bound on a fast GPU)."""
from __future__ import annotations

from typing import Callable

import torch


def _clone(tree):
    """A copy of every tensor in a nest of dataclasses, dicts, lists and tuples."""
    if isinstance(tree, torch.Tensor):
        return tree.clone()
    if isinstance(tree, dict):
        return {k: _clone(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_clone(v) for v in tree)
    if hasattr(tree, "__dataclass_fields__"):
        return type(tree)(**{name: _clone(getattr(tree, name)) for name in tree.__dataclass_fields__})
    return tree


class CudaGraphRunner:
    """Calls `fn(x)` (x a CUDA tensor) through one captured CUDA graph per input shape and dtype.

    The first call of a shape runs `fn` twice on a side stream (so lazy initialization and the
    kernels' workspace choice happen outside the capture), then captures it. Each call copies `x`
    into the graph's input, replays, and returns a copy of the outputs (the next replay
    overwrites the graph's own). `fn` must be free of host synchronization and must always
    launch the same kernels for a shape; the graphs keep their memory for the runner's life."""

    def __init__(self, fn: Callable[[torch.Tensor], object]):
        self.fn = fn
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, object]] = {}

    def __call__(self, x: torch.Tensor):
        key = (tuple(x.shape), x.dtype)
        if key not in self.graphs:
            self.graphs[key] = self._capture(x)
        graph, static_input, static_output = self.graphs[key]
        static_input.copy_(x)
        graph.replay()
        return _clone(static_output)

    def _capture(self, x: torch.Tensor):
        static_input = x.clone()
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.fn(static_input)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_output = self.fn(static_input)
        return graph, static_input, static_output
