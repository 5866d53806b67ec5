"""Checks that need CUDA (`pytest -m gpu`); skipped where no GPU is visible.

RARECLIP_TEST_DEVICE=cpu runs the same checks on the CPU, to try their logic on a machine
without a GPU (the fp16 backbone is then slow but runs).
"""
import os

import numpy as np
import pytest
import torch

from configs.loading import load_detector_config
from rareclip_core import build_detector
from tests.conftest import REPO, textured_frames

DEVICE = os.environ.get("RARECLIP_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="no CUDA device"),
]


@pytest.fixture(scope="module")
def stream():
    return textured_frames(10, seed=3)


def tiny_line(tiny_config, **update):
    from rareclip_core.detectors.rareclip.detector import RareCLIPDetector

    return RareCLIPDetector(tiny_config.model_copy(update={"device": DEVICE, **update}))


def scores(detector, frames) -> np.ndarray:
    return np.array([detector.step(f).score for f in frames])


def test_the_fp16_backbone_runs_on_cuda_and_stays_near_fp32(tiny_config, stream):
    half = tiny_line(tiny_config, precision="fp16")
    assert half.backbone.dtype == torch.float16
    got = scores(half, stream)
    expected = scores(tiny_line(tiny_config, precision="fp32"), stream)
    assert np.isfinite(got).all()
    # fp16 rounding moves a random tiny model's scores by ~1e-3; a broken half path (overflow,
    # a dtype mix-up) moves them by far more or gives NaN
    assert np.abs(got - expected).max() < 0.02


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_batched_backbone_scores_as_one_frame_at_a_time(tiny_config, stream, precision):
    """Replay's backbone batching changes no result beyond the kernels' rounding."""
    single, batched = tiny_line(tiny_config, precision=precision), tiny_line(tiny_config, precision=precision)
    one_by_one = [single.step_features(single.encode([f])[0]).score for f in stream]
    together = [batched.step_features(features).score for features in batched.encode(stream)]
    assert np.abs(np.array(one_by_one) - np.array(together)).max() < (1e-5 if precision == "fp32" else 5e-3)


def test_the_backbone_replayed_as_a_cuda_graph_gives_the_plain_backbones_features(tiny_config, stream):
    plain, graphed = tiny_line(tiny_config), tiny_line(tiny_config, cuda_graphs=True)
    for batch in ([stream[0]], stream[1:4], [stream[4]]):  # batch 1, 3, then 1 again: other inputs, same graph
        expected, got = plain.encode(batch), graphed.encode(batch)
        for e, g in zip(expected, got):
            assert torch.allclose(e.embedding, g.embedding, atol=1e-3)
            assert all(torch.allclose(e.tokens[b], g.tokens[b], atol=1e-2) for b in e.tokens)
    if DEVICE == "cuda":
        assert len(graphed.backbone._run.graphs) == 2  # one graph per batch size


def test_a_line_with_cuda_graphs_scores_as_without(tiny_config, stream):
    expected = scores(tiny_line(tiny_config), stream)
    assert np.abs(scores(tiny_line(tiny_config, cuda_graphs=True), stream) - expected).max() < 1e-3


def test_a_snapshot_restored_on_cuda_continues_as_the_line_would_have(tiny_config, stream):
    line = tiny_line(tiny_config)
    for frame in stream[:5]:
        line.step(frame)
    state = line.state_dict()
    assert all(t.device.type == "cpu" for t in state.values())  # snapshots travel as host tensors
    restored = tiny_line(tiny_config)
    restored.load_state_dict(state)
    continued = scores(line, stream[5:])
    assert np.abs(scores(restored, stream[5:]) - continued).max() < 1e-6


@pytest.mark.parametrize("config", ["detector-adaptclip-tiny.yaml", "detector-afrclip-tiny.yaml", "detector-dual-image-tiny.yaml"])
def test_every_kind_scores_a_short_stream_on_cuda(config, stream):
    detector = build_detector(load_detector_config(REPO / "configs" / config).model_copy(update={"device": DEVICE}))
    results = [detector.step(f) for f in stream[:3]]
    assert all(np.isfinite(r.score) and np.isfinite(r.anomaly_map).all() for r in results)


def test_frames_resized_on_the_gpu_are_within_one_level_of_pil():
    from rareclip_core.backbone import FrameInput
    from tests.test_frame_input import photo

    frames = [photo(1024, 1024), photo(333, 777, seed=1)]
    pil = FrameInput(518, "center_crop", torch.device("cpu")).pixels(frames)
    on_device = FrameInput(518, "center_crop", torch.device(DEVICE), resize_on_device=True).pixels(frames)
    assert on_device.device.type == torch.device(DEVICE).type
    diff = (on_device.cpu() - pil).abs()
    assert diff.max() <= 1 and diff.mean() < 0.25


def test_compiled_banks_on_the_device_score_as_eager_ones(tiny_config, stream):
    # last: compiling Triton kernels takes longest, and a cut run keeps the results before it
    # banks full after 4 frames: the last 6 go through the compiled bank stack (Triton on CUDA)
    small = {"max_features": 300, "max_images": 4, "image_memory_size": 6}
    eager, compiled = tiny_line(tiny_config, **small), tiny_line(tiny_config, **small, compile_banks=True)
    expected, got = scores(eager, stream), scores(compiled, stream)
    assert compiled.banks.is_full and compiled.banks.compiles and np.abs(got - expected).max() < 1e-4
