"""FrameInput: the PIL way is OpenCLIP's evaluation transform bit for bit; resizing on the device
gives the same view within a pixel level, and a detector set to it scores as with PIL."""
import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from rareclip_core import build_detector
from rareclip_core.backbone import FrameInput
from rareclip_core.backbone.frame_input import center_crop_box, resized_size

CPU = torch.device("cpu")


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth colour waves with noise: resizing it has something to get wrong."""
    yy, xx = np.mgrid[0:height, 0:width]
    waves = np.stack([128 + 100 * np.sin(xx / 7), 128 + 90 * np.cos(yy / 5), 128 + 50 * np.sin((xx + yy) / 11)], -1)
    noise = np.random.default_rng(seed).normal(0, 10, (height, width, 3))
    return np.clip(waves + noise, 0, 255).astype(np.uint8)


def test_sizes_and_crops_are_torchvisions():
    assert resized_size(300, 400, 224, "center_crop") == (224, 298)  # 224 * 400 / 300 = 298.67, truncated
    assert resized_size(777, 333, 224, "center_crop") == (522, 224)
    assert resized_size(300, 400, 224, "squash") == (224, 224)
    assert center_crop_box(224, 298, 224) == (0, 37)  # round(74 / 2)
    assert center_crop_box(225, 224, 224) == (0, 0)  # round(0.5) is 0 (banker's rounding, as torchvision)


@pytest.mark.parametrize("shape", [(300, 400), (777, 333), (224, 224), (64, 64)])
def test_the_pil_way_is_openclips_transform_bit_for_bit(shape):
    frame = photo(*shape)
    expected = open_clip.image_transform(224, is_train=False)(Image.fromarray(frame))
    got = FrameInput(224, "center_crop", CPU)([frame, Image.fromarray(frame).convert("L").convert("RGB")])
    assert torch.equal(got[0], expected)
    assert got.shape == (2, 3, 224, 224)


@pytest.mark.parametrize("view", ["center_crop", "squash"])
@pytest.mark.parametrize("shape", [(300, 400), (1024, 1024), (333, 777)])
def test_resizing_on_the_device_is_within_one_level_of_pil(view, shape):
    frame = photo(*shape, seed=1)
    pil = FrameInput(224, view, CPU).pixels([frame])
    device = FrameInput(224, view, CPU, resize_on_device=True).pixels([frame])
    assert torch.equal(device, device.round()) and device.min() >= 0 and device.max() <= 255  # whole levels, as uint8
    diff = (device - pil).abs()
    assert diff.max() <= 1 and diff.mean() < 0.25


def test_a_frame_already_at_size_passes_unchanged_both_ways():
    frame = photo(224, 224)
    for on_device in (False, True):
        pixels = FrameInput(224, "squash", CPU, on_device).pixels([frame])[0]
        assert torch.equal(pixels, torch.from_numpy(frame).permute(2, 0, 1).float())


def test_a_line_resizing_on_the_device_scores_as_one_resizing_with_pil(tiny_config):
    frames = [photo(300, 260, seed=s) for s in range(4)]
    pil = build_detector(tiny_config)
    device = build_detector(tiny_config.model_copy(update={"resize_on_device": True}))
    assert pil.config.fingerprint() != device.config.fingerprint()  # a snapshot of one does not load into the other
    for frame in frames:
        a, b = pil.step(frame), device.step(frame)
        assert abs(a.score - b.score) < 5e-3  # measured: at most 8e-4 on these frames
        assert np.abs(a.anomaly_map - b.anomaly_map).max() < 2e-2
