"""TPB training (Eq. 4): loss terms, convergence, the CLI and the authors' checkpoint format."""
import argparse
import math

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import run_cluster
from rareclip_core.data.datasets import Sample, load_dataset
from rareclip_core.data.mosaic import MosaicDraws, kept_for_mosaic_training
from rareclip_core.data.synthetic import write_mvtec_dataset
from rareclip_core.detectors.rareclip.detector import RareCLIPDetector
from rareclip_core.detectors.rareclip.text_branch import TPB_CHECKPOINT_KEY
from rareclip_core.detectors.rareclip.training import (
    dice_loss,
    focal_loss,
    tpb_loss,
    train_text_projection,
)


@pytest.fixture(scope="module")
def config(tiny_config):
    """The tiny model at 112 pixels (7 x 7 patches), to keep the CPU loss maps small."""
    return tiny_config.model_copy(update={"image_size": 112})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("mvtec")
    return write_mvtec_dataset(root, n_train_good=0, n_test_good=4, n_test_defect=4, size=64)


@pytest.fixture(scope="module")
def samples(dataset):
    return [s for category in load_dataset("mvtec", dataset).values() for s in category]


@pytest.fixture(scope="module")
def trained(config, samples):
    return train_text_projection(config, samples, epochs=3, batch_size=4, progress=False)


def test_focal_loss_matches_hand_computation():
    # pixel 0: P = (0.25, 0.75), target abnormal; pixel 1: P = (0.5, 0.5), target normal. The
    # authors' one-hot is clamped to [1e-5, 1 - 1e-5] and 1e-5 added: p_t = (1-s) P_t + s P_o + s
    probs = torch.tensor([[0.25, 0.5], [0.75, 0.5]], dtype=torch.float64).reshape(1, 2, 1, 2)
    mask = torch.tensor([[[1, 0]]])
    s = 1e-5
    pt = [(1 - s) * 0.75 + s * 0.25 + s, (1 - s) * 0.5 + s * 0.5 + s]
    expected = sum(-((1 - p) ** 2) * math.log(p) for p in pt) / 2
    assert focal_loss(probs, mask).item() == pytest.approx(expected, rel=1e-12)
    assert focal_loss(probs, mask, gamma=0).item() == pytest.approx(-(math.log(pt[0]) + math.log(pt[1])) / 2, rel=1e-12)
    # a confidently wrong pixel is bounded: p_t = 2s, not 0
    wrong = torch.tensor([1.0, 0.0], dtype=torch.float64).reshape(1, 2, 1, 1)
    assert focal_loss(wrong, torch.tensor([[[1]]])).item() == pytest.approx(-((1 - 2 * s) ** 2) * math.log(2 * s), rel=1e-12)


def test_dice_loss_matches_hand_computation():
    probs = torch.tensor([[[0.9, 0.2], [0.4, 0.0]], [[0.5, 0.5], [0.5, 0.5]]])
    target = torch.tensor([[[1, 0], [1, 0]], [[0, 0], [0, 0]]])
    first = 1 - (2 * 1.3 + 1) / (1.5 + 2 + 1)  # intersection 0.9 + 0.4
    second = 1 - 1 / (2 + 0 + 1)
    assert dice_loss(probs, target).item() == pytest.approx((first + second) / 2, rel=1e-6)


def test_tpb_loss_is_the_authors_sum_over_blocks_with_one_mse_over_all_tokens():
    torch.manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(8, 2), dim=0)
    blocks = [torch.nn.functional.normalize(torch.randn(2, 4, 8), dim=-1) for _ in range(2)]  # 2 x 2 grids
    embedding = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    masks = torch.zeros(2, 2, 2)
    masks[0, 0, 1] = 1
    expected = 0.0
    for tokens in blocks:
        probs = (20 * tokens @ text).transpose(1, 2).reshape(2, 2, 2, 2).softmax(1)  # same size: no resampling
        expected += (focal_loss(probs, masks) + dice_loss(probs[:, 1], masks)).item()
    cosines = [(tokens * embedding[:, None]).sum(-1) for tokens in blocks]  # 2 x 4 each
    expected += sum(((c - 1) ** 2).sum().item() for c in cosines) / 16  # one mean over 2 blocks x 2 images x 4 tokens
    assert tpb_loss(blocks, embedding, text, masks, 20.0).item() == pytest.approx(expected, rel=1e-5)


def test_training_decreases_the_loss_and_is_deterministic(config, samples, trained):
    _, losses = trained
    assert len(losses) == 3 * math.ceil(len(samples) / 4)
    per_epoch = len(losses) // 3
    first, last = np.mean(losses[:per_epoch]), np.mean(losses[-per_epoch:])
    assert last < first * 0.95, (first, last)
    _, again = train_text_projection(config, samples[:6], epochs=1, batch_size=4, progress=False)
    _, repeat = train_text_projection(config, samples[:6], epochs=1, batch_size=4, progress=False)
    assert again == repeat


@pytest.fixture
def coloured_category(tmp_path):
    """Category c: a red good image, a blue crack with its left half masked, a green misplaced one."""
    samples = []
    for defect, colour in (("good", (255, 0, 0)), ("crack", (0, 0, 255)), ("misplaced", (0, 255, 0))):
        image = tmp_path / f"{defect}.png"
        Image.new("RGB", (8, 6), colour).save(image)
        mask = None
        if defect != "good":
            mask = tmp_path / f"{defect}_mask.png"
            Image.fromarray(np.repeat(np.array([[255] * 4 + [0] * 4], np.uint8), 6, axis=0)).save(mask)
        samples.append(Sample(str(image), int(defect != "good"), mask and str(mask), defect, "c"))
    return samples


def test_a_mosaic_pastes_four_images_of_the_category_and_their_masks(coloured_category):
    assert [s.defect_type for s in kept_for_mosaic_training(coloured_category)] == ["good", "crack"]
    draws = MosaicDraws(coloured_category, rate=1.0, seed=0)
    seen = set()
    for _ in range(10):
        assert draws.replaces()
        mosaic = draws.draw("c")
        image = np.asarray(mosaic.image)
        assert image.shape == (12, 16, 3) and mosaic.mask.shape == (12, 16)
        for top, left in ((0, 0), (0, 8), (6, 0), (6, 8)):
            colour = tuple(image[top, left])
            tile_mask = mosaic.mask[top : top + 6, left : left + 8]
            assert colour in {(255, 0, 0), (0, 0, 255)}  # never the misplaced one
            assert (image[top : top + 6, left : left + 8] == colour).all()
            crack_mask = np.repeat([[True] * 4 + [False] * 4], 6, axis=0)
            assert np.array_equal(tile_mask, crack_mask if colour == (0, 0, 255) else np.zeros((6, 8), bool))
            seen.add(colour)
    assert seen == {(255, 0, 0), (0, 0, 255)}
    assert not MosaicDraws(coloured_category, rate=0.0, seed=0).replaces()


def test_training_with_mosaics_is_repeatable_and_trains_on_other_images(config, samples):
    runs = [train_text_projection(config, samples[:6], epochs=1, batch_size=3, progress=False, mosaic_rate=rate, seed=1)[1]
            for rate in (1.0, 1.0, 0.0)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


@pytest.mark.parametrize("dataset, given, rate", [("mvtec", None, 0.2), ("visa", None, 0.0), ("visa", 0.5, 0.5)])
def test_the_mosaic_rate_is_the_authors_on_mvtec_ad_unless_given(dataset, given, rate):
    from pipelines.train_tpb import mosaic_rate

    assert mosaic_rate(argparse.Namespace(dataset=dataset, mosaic_rate=given)) == rate


def test_cli_writes_authors_checkpoint_that_changes_the_detector(config, dataset, tmp_path, capsys):
    # a pipeline-style YAML with a `detector:` section is accepted as --config
    config_file = tmp_path / "pipeline.yaml"
    config_file.write_text(yaml.safe_dump({"detector": config.model_dump(mode="json")}))
    out = tmp_path / "tpb.pth"
    argv = ["train-tpb", "--dataset", "mvtec", "--root", dataset, "--save", str(out), "--config", str(config_file),
            "--epochs", "1", "--batch-size", "8", "--limit", "8"]
    assert run_cluster.main(argv) == 0
    printed = capsys.readouterr().out
    assert "final loss" in printed and str(out) in printed

    checkpoint = torch.load(out, weights_only=True)
    assert set(checkpoint) == {TPB_CHECKPOINT_KEY}
    state = checkpoint[TPB_CHECKPOINT_KEY]
    width, dim = 64, 64  # rareclip-tiny: transformer width C, embedding dim D
    assert set(state) == {f"fc.{i}.{p}" for i in range(4) for p in ("weight", "bias")}
    for i in range(4):
        assert state[f"fc.{i}.weight"].shape == (dim, width) and state[f"fc.{i}.bias"].shape == (dim,)

    image = np.asarray(Image.open(load_dataset("mvtec", dataset)["widget"][-1].path))
    untrained = RareCLIPDetector(config)
    loaded = RareCLIPDetector(config.model_copy(update={"tpb_weights": str(out)}))
    for i, fc in enumerate(loaded.text_projection.fc):
        assert torch.equal(fc.weight, state[f"fc.{i}.weight"])
    difference = np.abs(loaded.step(image).parts["text_map"] - untrained.step(image).parts["text_map"]).max()
    assert difference > 1e-3


def test_cli_missing_dataset_exits_2(config, tmp_path, capsys):
    config_file = tmp_path / "detector.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    argv = ["train-tpb", "--dataset", "mvtec", "--root", str(tmp_path / "nowhere"), "--save",
            str(tmp_path / "x.pth"), "--config", str(config_file)]
    assert run_cluster.main(argv) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "Traceback" not in err
    assert not (tmp_path / "x.pth").exists()


@pytest.mark.parametrize("argv, message", [
    (["train-tpb", "--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
    (["train-afrclip", "--keep", "0"], "argument --keep: must be >= 1, got 0"),
    (["train-adaptclip", "--batch-size", "1"], "argument --batch-size: must be >= 2 (the adapters' BatchNorm needs two"),
    (["train-adaptclip", "--limit", "x"], "argument --limit: expected an integer, got 'x'"),
    (["train-tpb", "--mosaic-rate", "nan"], "argument --mosaic-rate: expected a number, got 'nan'"),
    (["train-tpb", "--mosaic-rate", "1.5"], "argument --mosaic-rate: must be <= 1.0, got 1.5"),
])
def test_training_commands_refuse_bad_numbers_before_loading_anything(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        run_cluster.main([*argv, "--dataset", "mvtec", "--root", str(tmp_path / "nowhere"), "--save", str(tmp_path / "w.pth")])
    assert stopped.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train-tpb", "train-adaptclip", "train-afrclip"])
def test_training_commands_refuse_a_save_path_they_could_not_write_before_training(command, tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    for save, message in [(tmp_path, f"--save: {tmp_path} is a folder; give the file to write"),
                          (tmp_path / "a-file" / "w.pth", f"--save: {tmp_path / 'a-file' / 'w.pth'} lies under "
                                                          f"{tmp_path / 'a-file'}, which is a file")]:
        # the dataset does not exist: the save path is refused first, before anything is read
        assert run_cluster.main([command, "--dataset", "mvtec", "--root", str(tmp_path / "nowhere"), "--save", str(save)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # no resume file or checkpoint folder left
