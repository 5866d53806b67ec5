"""train-adaptclip: the loss falls on a tiny synthetic dataset, the written checkpoint has the
authors' format and loads into the detector, and an interrupted run resumes to the same file."""
import pytest
import torch

import run_cluster
from rareclip_core import build_detector
from rareclip_core.data.datasets import load_dataset
from rareclip_core.data.synthetic import write_mvtec_dataset
from rareclip_core.detectors.adaptclip.adapters import CHECKPOINT_PARTS, read_checkpoint
from rareclip_core.detectors.adaptclip.config import AdaptCLIPConfig
from rareclip_core.detectors.adaptclip.training import TrainingSettings, resume_path, train_adapters
from tests.conftest import REPO, textured_frames


@pytest.fixture(scope="module")
def config():
    """The tiny model at 64 pixels (4 x 4 patches), to keep the CPU loss maps small."""
    return AdaptCLIPConfig.from_yaml(REPO / "configs" / "detector-adaptclip-tiny.yaml").model_copy(
        update={"image_size": 64, "blur_sigma": 0.5})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_mvtec_dataset(tmp_path_factory.mktemp("mvtec"), {"widget": "object"}, n_train_good=2,
                               n_test_good=3, n_test_defect=3, size=48)


def test_loss_falls_and_the_checkpoint_loads(config, dataset, tmp_path):
    queries = load_dataset("mvtec", dataset, "test")["widget"]
    normals = {"widget": load_dataset("mvtec", dataset, "train")["widget"]}
    settings = TrainingSettings(epochs=6, batch_size=3, lr=1e-3)
    out = tmp_path / "adapters.pth"
    adapters, losses = train_adapters(config, queries, normals, out, settings, progress=False)
    assert len(losses) == 12 and sum(losses[-2:]) < 0.8 * sum(losses[:2]), losses
    checkpoint = read_checkpoint(str(out))
    assert sorted(checkpoint) == sorted(CHECKPOINT_PARTS) and not resume_path(out).exists()
    detector = build_detector(config.model_copy(update={"weights": str(out)}))
    assert torch.equal(detector.adapters.pq_learner.sharebn[0].running_mean.cpu(),
                       adapters.pq_learner.sharebn[0].running_mean)
    detector.add_normal_references(textured_frames(1))
    assert 0 <= detector.step(textured_frames(2)[1]).score <= 1
    # stopped after 2 epochs, then resumed: the same file, bitwise
    again = tmp_path / "again.pth"
    _, first = train_adapters(config, queries, normals, again, settings, progress=False, stop_after_epochs=2)
    assert resume_path(again).is_file() and not again.exists() and len(first) == 4
    _, rest = train_adapters(config, queries, normals, again, settings, resume=True, progress=False)
    assert rest == losses
    resumed = read_checkpoint(str(again))
    assert all(torch.equal(v, resumed[p][k]) for p in CHECKPOINT_PARTS for k, v in checkpoint[p].items())


def test_cli_refuses_a_stale_resume_file_and_other_kinds(dataset, tmp_path, capsys):
    out = tmp_path / "a.pth"
    resume_path(out).write_bytes(b"")
    assert run_cluster.main(["train-adaptclip", "--dataset", "mvtec", "--root", dataset, "--save", str(out)]) == 2
    assert "pass --resume, or delete it" in capsys.readouterr().err
    argv = ["train-adaptclip", "--dataset", "mvtec", "--root", dataset, "--save", str(tmp_path / "b.pth"),
            "--config", str(REPO / "configs" / "detector-tiny.yaml")]
    assert run_cluster.main(argv) == 2
    assert "this config's detector is 'rareclip'" in capsys.readouterr().err
