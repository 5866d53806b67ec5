"""Tests for rareclip_core.data.datasets on tiny layouts built in tmp_path."""

import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rareclip_core.data.datasets import (
    Sample,
    load_dataset,
    load_folder,
    load_mask,
    load_mvtec,
    load_visa,
    shuffled,
)


def write_png(path: Path, array=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 8), np.uint8) if array is None else array).save(path)
    return path


@pytest.fixture
def mvtec_root(tmp_path):
    root = tmp_path / "mvtec"
    for cat in ("screw", "bottle"):
        for name in ("001.png", "000.png"):
            write_png(root / cat / "train" / "good" / name)
            write_png(root / cat / "test" / "good" / name)
        for defect, names in (("scratch", ["001.png", "000.png"]), ("broken", ["000.png"])):
            for name in names:
                write_png(root / cat / "test" / defect / name)
                write_png(root / cat / "ground_truth" / defect / name.replace(".png", "_mask.png"))
    (root / "readme.txt").write_text("not a category")
    (root / "extras").mkdir()  # no test/ folder: not a category
    return root


def test_load_mvtec_official_order_and_masks(mvtec_root):
    data = load_mvtec(mvtec_root)
    assert list(data) == ["bottle", "screw"]
    got = [(Path(s.path).parent.name, Path(s.path).name, s.label) for s in data["bottle"]]
    assert got == [("broken", "000.png", 1), ("good", "000.png", 0), ("good", "001.png", 0),
                   ("scratch", "000.png", 1), ("scratch", "001.png", 1)]
    first = data["bottle"][0]
    assert first == Sample(str(mvtec_root / "bottle/test/broken/000.png"), 1,
                           str(mvtec_root / "bottle/ground_truth/broken/000_mask.png"), "broken", "bottle")
    assert all(s.mask_path is None and s.defect_type == "good" for s in data["bottle"] if s.label == 0)
    assert load_dataset("mvtec", mvtec_root) == data


def test_load_mvtec_train_split(mvtec_root):
    train = load_dataset("mvtec", mvtec_root, split="train")
    assert [Path(s.path).name for s in train["screw"]] == ["000.png", "001.png"]
    assert all(s.label == 0 and s.mask_path is None and "train" in s.path for s in train["screw"])


def test_mvtec_missing_mask_names_path(mvtec_root):
    missing = mvtec_root / "screw" / "ground_truth" / "scratch" / "001_mask.png"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match="001_mask.png") as err:
        load_mvtec(mvtec_root)
    assert "ground_truth" in str(err.value)


def test_missing_root_and_test_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.*expected"):
        load_mvtec(tmp_path / "nowhere")
    (tmp_path / "empty" / "cat" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="test folder"):
        load_folder(tmp_path / "empty")
    with pytest.raises(ValueError, match="kind"):
        load_dataset("kolektor", tmp_path)


def test_missing_train_folder(tmp_path):
    write_png(tmp_path / "cat" / "test" / "good" / "a.png")
    with pytest.raises(FileNotFoundError, match="train"):
        load_folder(tmp_path, split="train")


def test_load_folder_masks_by_stem(tmp_path):
    write_png(tmp_path / "part" / "test" / "good" / "g.jpg")
    write_png(tmp_path / "part" / "test" / "dent" / "a.png")
    write_png(tmp_path / "part" / "test" / "dent" / "b.png")
    write_png(tmp_path / "part" / "ground_truth" / "dent" / "a.png")
    write_png(tmp_path / "part" / "ground_truth" / "dent" / "b_mask.png")
    write_png(tmp_path / "part" / "test" / "stain" / "c.png")  # no ground_truth/stain: no masks
    samples = load_dataset("folder", tmp_path)["part"]
    masks = {Path(s.path).name: s.mask_path and Path(s.mask_path).name for s in samples}
    assert masks == {"a.png": "a.png", "b.png": "b_mask.png", "g.jpg": None, "c.png": None}
    assert [s.label for s in samples] == [1, 1, 0, 1]

    (tmp_path / "part" / "ground_truth" / "dent" / "a.png").unlink()
    with pytest.raises(FileNotFoundError, match="a_mask.png"):
        load_folder(tmp_path)


def write_visa(root: Path, rows, extra_files=()) -> Path:
    (root / "split_csv").mkdir(parents=True)
    lines = ["object,split,label,image,mask"] + [",".join(r) for r in rows]
    (root / "split_csv" / "1cls.csv").write_text("\n".join(lines) + "\n")
    for r in rows:
        for rel in r[3:]:
            if rel:
                write_png(root / rel)
    return root


VISA_ROWS = [
    ("candle", "train", "normal", "candle/Data/Images/Normal/0000.JPG", ""),
    ("candle", "test", "anomaly", "candle/Data/Images/Anomaly/001.JPG", "candle/Data/Masks/Anomaly/001.png"),
    ("pcb1", "test", "normal", "pcb1/Data/Images/Normal/0005.JPG", ""),
    ("candle", "test", "normal", "candle/Data/Images/Normal/0003.JPG", ""),
    ("candle", "test", "anomaly", "candle/Data/Images/Anomaly/000.JPG", "candle/Data/Masks/Anomaly/000.png"),
]


def test_load_visa_csv_order(tmp_path):
    root = write_visa(tmp_path, VISA_ROWS)
    data = load_visa(root)
    assert list(data) == ["candle", "pcb1"]
    assert [Path(s.path).name for s in data["candle"]] == ["001.JPG", "0003.JPG", "000.JPG"]
    assert [s.label for s in data["candle"]] == [1, 0, 1]
    assert data["candle"][0].mask_path == str(root / "candle/Data/Masks/Anomaly/001.png")
    assert data["candle"][1].mask_path is None and data["candle"][1].defect_type == "good"
    train = load_dataset("visa", root, split="train")
    assert [Path(s.path).name for s in train["candle"]] == ["0000.JPG"]


def test_visa_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="1cls.csv"):
        load_visa(tmp_path)
    root = write_visa(tmp_path / "a", VISA_ROWS)
    (root / "candle/Data/Masks/Anomaly/000.png").unlink()
    with pytest.raises(FileNotFoundError, match="Masks/Anomaly/000.png"):
        load_visa(root)
    bad = [("candle", "test", "defective", "candle/x.JPG", "")]
    with pytest.raises(ValueError, match="defective"):
        load_visa(write_visa(tmp_path / "b", bad))


def test_shuffled_matches_global_seed_protocol():
    samples = [Sample(f"{i}.png", i % 2, None, "good", "c") for i in range(50)]
    for seed in range(5):
        state = random.getstate()
        got = shuffled(samples, seed)
        assert random.getstate() == state  # global state untouched
        expected = list(samples)
        random.seed(seed)
        random.shuffle(expected)
        assert got == expected
    assert [s.path for s in samples][:3] == ["0.png", "1.png", "2.png"]  # input not modified


def test_load_mask_resize_crop_binarize(tmp_path):
    import torchvision.transforms as T

    rng = np.random.default_rng(0)
    raw = np.zeros((60, 90), np.uint8)  # H=60, W=90: shorter side is the height
    raw[10:40, 5:30] = 255
    raw[45:55, 70:88] = 255
    sample = Sample("x.png", 1, str(write_png(tmp_path / "m.png", raw)), "d", "c")
    got = load_mask(sample, 32)
    assert got.shape == (32, 32) and got.dtype == bool
    # same geometry as the image transform: shorter side to 32, center crop 32
    tf = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(32)])
    ref = np.asarray(tf(Image.fromarray((raw > 0).astype(np.float32)))) > 0.5
    np.testing.assert_array_equal(got, ref)
    assert got.any() and not got.all()

    # VisA-style masks with small defect indices count as defects; masks can be upsampled
    small = (rng.random((16, 16)) < 0.3).astype(np.uint8) * 2
    small[4:12, 4:12] = 1
    upsampled = load_mask(Sample("y.png", 1, str(write_png(tmp_path / "v.png", small)), "d", "c"), 64)
    assert upsampled[20:44, 20:44].all()


def test_a_squashed_mask_is_what_the_authors_resize_of_the_8_bit_mask_gives(tmp_path):
    import torchvision.transforms as T

    rng = np.random.default_rng(1)
    raw = (rng.random((45, 70)) < 0.5).astype(np.uint8) * 3  # VisA-like defect indices, not square
    sample = Sample("x.png", 1, str(write_png(tmp_path / "m.png", raw)), "d", "c")
    # the authors' evaluation: the 0/255 mask through Resize((S, S)) and ToTensor, binarized at 0.5
    tf = T.Compose([T.Resize((32, 32)), T.CenterCrop(32), T.ToTensor()])
    ref = tf(Image.fromarray((raw > 0).astype(np.uint8) * 255))[0].numpy() > 0.5
    got = load_mask(sample, 32, "squash")
    np.testing.assert_array_equal(got, ref)
    assert got.any() and not got.all()


def test_load_mask_good_and_missing(tmp_path):
    assert not load_mask(Sample("g.png", 0, None, "good", "c"), 16).any()
    with pytest.raises(ValueError, match="no mask"):
        load_mask(Sample("a.png", 1, None, "dent", "c"), 16)
    with pytest.raises(FileNotFoundError, match="gone.png"):
        load_mask(Sample("a.png", 1, str(tmp_path / "gone.png"), "dent", "c"), 16)
