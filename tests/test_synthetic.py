"""Tests for rareclip_core.data.synthetic: determinism, exact masks, MVTec layout, separability."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rareclip_core.data.datasets import load_dataset, load_mask, load_mvtec
from rareclip_core.data.synthetic import (
    DEFECT_TYPES,
    SyntheticLine,
    write_line_folder,
    write_mvtec_dataset,
)


def same_frame(a, b):
    return (np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
            and a.label == b.label and a.defect_type == b.defect_type)


@pytest.mark.parametrize("kind", ["object", "texture"])
def test_deterministic_in_seed_and_index(kind):
    a, b = SyntheticLine(kind, seed=3, size=64), SyntheticLine(kind, seed=3, size=64)
    later = [b.frame(i) for i in (7, 2, 5)]  # call order does not matter
    assert all(same_frame(a.frame(i), f) for i, f in zip((7, 2, 5), later))
    f = a.frame(2)
    assert f.image.shape == (64, 64, 3) and f.image.dtype == np.uint8
    assert f.mask.shape == (64, 64) and f.mask.dtype == bool
    assert not np.array_equal(a.frame(2).image, a.frame(3).image)
    assert not np.array_equal(a.frame(2).image, SyntheticLine(kind, seed=4, size=64).frame(2).image)


@pytest.mark.parametrize("kind", ["object", "texture"])
def test_mask_matches_label_and_defect_size(kind):
    line = SyntheticLine(kind, seed=1, size=64, defect_rate=0.3)
    frames = [line.frame(i) for i in range(200)]
    labels = np.array([f.label for f in frames])
    assert 0.2 < labels.mean() < 0.4
    assert {f.defect_type for f in frames} == {"good", *DEFECT_TYPES[kind]}
    for f in frames:
        assert f.mask.any() == bool(f.label) == (f.defect_type != "good")
        if f.label:
            assert 0.005 <= f.mask.mean() <= 0.05


@pytest.mark.parametrize("kind", ["object", "texture"])
def test_defect_changes_exactly_the_mask(kind):
    line = SyntheticLine(kind, seed=2, size=96)
    for i in range(10):
        good = line.frame(i, defect_type="good")
        for defect in DEFECT_TYPES[kind]:
            f = line.frame(i, defect_type=defect)
            diff = np.abs(f.image.astype(int) - good.image.astype(int)).max(-1)  # (H, W)
            assert not diff[~f.mask].any()
            assert (diff[f.mask] >= 10).mean() > 0.95


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        SyntheticLine("liquid")
    with pytest.raises(ValueError, match="defect_type"):
        SyntheticLine("texture").frame(0, defect_type="missing_piece")


def patch_nn_score(image, ref_patches):
    """Max over 8x8 patches (stride 4) of the L2 distance to the nearest reference patch."""
    q = _patches(image, stride=4)
    return torch.cdist(q, ref_patches).min(1).values.max().item()


def _patches(image, stride):
    t = torch.from_numpy(image).float().permute(2, 0, 1)[None] / 255  # (1, 3, H, W)
    return F.unfold(t, 8, stride=stride)[0].T  # (P, 192)


@pytest.mark.parametrize("kind", ["object", "texture"])
def test_good_frames_resemble_each_other_more_than_defects(kind):
    """A MuSc-like patch nearest-neighbour score ranks defect frames above good ones."""
    line = SyntheticLine(kind, seed=0, size=64)
    refs = torch.cat([_patches(line.frame(i, defect_type="good").image, 2) for i in range(8)])
    types = DEFECT_TYPES[kind]
    good = [patch_nn_score(line.frame(i, defect_type="good").image, refs) for i in range(100, 108)]
    bad = [patch_nn_score(line.frame(i, defect_type=types[i % len(types)]).image, refs)
           for i in range(200, 208)]
    auroc = np.mean(np.array(good)[:, None] < np.array(bad)[None])
    assert auroc >= 0.85 and np.mean(bad) > np.mean(good)


def test_write_line_folder(tmp_path):
    out = write_line_folder(tmp_path / "line", 12, "texture", seed=5, size=48, defect_rate=0.5)
    assert [Path(p).name for p, _ in out][:2] == ["frame_000000.png", "frame_000001.png"]
    line = SyntheticLine("texture", seed=5, size=48, defect_rate=0.5)
    for i, (path, label) in enumerate(out):
        f = line.frame(i)
        assert label == f.label
        np.testing.assert_array_equal(np.asarray(Image.open(path)), f.image)
    assert 0 < sum(label for _, label in out) < 12


def test_write_mvtec_dataset_loads(tmp_path):
    cats = {"widget": "object", "fabric": "texture"}
    root = write_mvtec_dataset(tmp_path / "mv", cats, n_train_good=3, n_test_good=4,
                               n_test_defect=5, size=64, seed=1)
    data = load_mvtec(root)
    assert set(data) == set(cats)
    for name, kind in cats.items():
        samples = data[name]
        assert sum(s.label == 0 for s in samples) == 4 and sum(s.label for s in samples) == 5
        assert {s.defect_type for s in samples if s.label} == set(DEFECT_TYPES[kind])
        for s in samples:
            mask = load_mask(s, 64)
            assert mask.any() == bool(s.label)
            if s.label:
                raw = np.asarray(Image.open(s.mask_path))
                assert set(np.unique(raw)) == {0, 255}
                np.testing.assert_array_equal(mask, raw > 0)
        train = load_dataset("mvtec", root, split="train")[name]
        assert len(train) == 3 and all(s.label == 0 for s in train)
    # deterministic: writing again gives identical files
    again = write_mvtec_dataset(tmp_path / "mv2", cats, 3, 4, 5, size=64, seed=1)
    for a, b in zip(load_mvtec(root)["widget"], load_mvtec(again)["widget"]):
        assert Path(a.path).read_bytes() == Path(b.path).read_bytes()


@pytest.mark.parametrize("kind", ["object", "texture"])
def test_defect_type_names_the_rendered_frames_defect(kind):
    line = SyntheticLine(kind, seed=3, size=32, defect_rate=0.3)
    assert [line.defect_type(i) for i in range(30)] == [line.frame(i).defect_type for i in range(30)]
    assert any(line.defect_type(i) != "good" for i in range(30))
