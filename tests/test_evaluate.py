"""`evaluate`: the paper's shuffled-seed protocol through the replay actors, on a generated
MVTec-layout dataset and the tiny random-weight model (its accuracy means nothing)."""
import csv
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import run_cluster
from actors.line_sequencer import LineSequencer
from actors.line_settings import LineSettings
from actors.result_table import read_results
from pipelines.evaluate import (
    METRICS,
    Plan,
    evaluate,
    format_markdown,
    paper_figures,
    score_plan,
)
from rareclip_core import build_detector
from rareclip_core.data.datasets import load_mask, load_mvtec, shuffled
from rareclip_core.data.frames import decode_frame
from rareclip_core.data.synthetic import write_mvtec_dataset
from rareclip_core.detectors.rareclip.config import RareCLIPConfig
from rareclip_core.metrics import PixelProtocol, image_metrics, pixel_metrics
from tests.trivial_detector import BrightnessConfig, BrightnessDetector

SEEDS = [0, 1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # 2 categories x 10 test images (6 good, 4 defective with masks) and 3 train images, 96 x 96
    root = tmp_path_factory.mktemp("mvtec")
    return write_mvtec_dataset(root, n_train_good=3, n_test_good=6, n_test_defect=4, size=96)


@pytest.fixture(scope="module")
def online(local_ray, dataset, tiny_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("online")
    return out, evaluate("mvtec", dataset, tiny_config, SEEDS, "online", out, progress=False)


def read_rows(results_dir) -> list[dict]:
    return sorted(read_results(results_dir).to_pylist(), key=lambda r: (r["line_id"], r["seq"]))


def test_evaluate_writes_sane_tables(online, dataset):
    out, result = online
    assert result["categories"] == ["fabric", "widget"] and result["seeds"] == SEEDS
    assert result["mode"] == "online" and result["std"].startswith("population")
    for name in ["fabric", "widget"]:
        for seed in SEEDS:
            values = result["per_seed"][name][str(seed)]
            assert values["images"] == 10 and values["anomalous"] == 4 and values["errors"] == 0
            # both classes present everywhere, so every metric is defined
            assert all(0.0 <= values[m] <= 100.0 for m in METRICS), values
    assert result["notes"] == []
    mean = result["summary"]["mean"]
    for m in METRICS:
        per_seed = [np.mean([result["per_seed"][c][str(s)][m] for c in ("fabric", "widget")]) for s in SEEDS]
        assert mean[m]["mean"] == pytest.approx(np.mean(per_seed))
        assert mean[m]["std"] == pytest.approx(np.std(per_seed, ddof=0))
    # maps stored as float32 at 256 x 256 (no float16 quantization)
    row = read_rows(out / "seed-0" / "results")[0]
    stored = np.load(out / "seed-0" / "results" / row["map_uri"])
    assert stored.shape == (256, 256) and stored.dtype == np.float32

    md = (out / "metrics.md").read_text()
    assert "| fabric | 10 |" in md and "| **mean** | 20 |" in md and " ± " in md
    assert "| paper: RareCLIP, online | | 98.2 ± 0.2 |" in md  # mvtec: the paper's figures beside ours
    assert md == format_markdown(result)
    with (out / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["category"], r["seed"]) for r in rows] == [
        (c, s) for c in ("fabric", "widget", "mean") for s in ("0", "1")
    ] + [(c, s) for c in ("fabric", "widget", "mean") for s in ("mean", "std")]
    assert float(rows[0]["I-AUROC"]) == result["per_seed"]["fabric"]["0"]["I-AUROC"]
    assert float(rows[-2]["PRO"]) == pytest.approx(mean["PRO"]["mean"])
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["summary"]["widget"]["P-AUROC"] == result["summary"]["widget"]["P-AUROC"]


def test_seeds_shuffle_the_order_and_keep_the_rows(online, dataset):
    out, _ = online
    official = load_mvtec(dataset)
    uris = {}
    for seed in SEEDS:
        rows = read_rows(out / f"seed-{seed}" / "results")
        for category, samples in official.items():
            got = [r["uri"] for r in rows if r["line_id"] == category]  # by seq
            assert got == [s.path for s in shuffled(samples, seed)]
            uris[category, seed] = got
    for category in official:
        assert uris[category, 0] != uris[category, 1]
        assert sorted(uris[category, 0]) == sorted(uris[category, 1])


# how each protocol brings masks to the metrics, spelled out (pipelines/evaluate.py PROTOCOLS)
RECOMPUTE = {
    "authors": ("squash", PixelProtocol(mask_resize="nearest", pro_curve="steps")),
    "aligned": ("center_crop", PixelProtocol(mask_resize="nearest-exact", pro_curve="exact")),
}


@pytest.mark.parametrize("protocol", sorted(RECOMPUTE))
def test_metrics_equal_a_recomputation_from_the_stored_rows(online, dataset, tiny_config, protocol, tmp_path):
    out, result = online
    if protocol != "authors":  # the same rows scored under another protocol
        shutil.copytree(out, tmp_path / "copy")
        plan = Plan("mvtec", dataset, tiny_config, tuple(SEEDS), tmp_path / "copy", load_mvtec(dataset), protocol=protocol)
        result = score_plan(plan)
    assert result["protocol"]["name"] == protocol
    view, pixels = RECOMPUTE[protocol]
    official = load_mvtec(dataset)
    for seed in SEEDS:
        results = out / f"seed-{seed}" / "results"
        rows = read_rows(results)
        for category, samples in official.items():
            order = shuffled(samples, seed)
            got = [r for r in rows if r["line_id"] == category]
            labels = [order[r["seq"]].label for r in got]
            masks = np.stack([load_mask(order[r["seq"]], tiny_config.image_size, view) for r in got])
            maps = np.stack([np.load(results / r["map_uri"]) for r in got])
            expected = {f"I-{k}": v for k, v in image_metrics(labels, [r["score"] for r in got]).items()}
            expected.update({f"P-{k}": v for k, v in pixel_metrics(masks, maps, protocol=pixels).items()})
            names = {"I-auroc": "I-AUROC", "I-f1_max": "I-F1-max", "I-ap": "I-AP", "P-auroc": "P-AUROC",
                     "P-f1_max": "P-F1-max", "P-ap": "P-AP", "P-pro": "PRO"}
            values = result["per_seed"][category][str(seed)]
            for key, name in names.items():
                assert values[name] == pytest.approx(100 * expected[key], rel=1e-9, abs=1e-9), (category, seed, name)
    assert f"protocol `{protocol}`" in format_markdown(result)


def test_the_authors_protocol_stores_maps_resized_bilinearly_with_aligned_corners():
    def stored(resize, anomaly_map, side):
        settings = LineSettings(map_resolution=side, map_resize=resize, map_dtype="float32")
        return LineSequencer("l", BrightnessDetector(BrightnessConfig()), settings)._stored_map(anomaly_map)

    corners = np.array([[0.0, 2.0], [4.0, 6.0]], dtype=np.float32)
    np.testing.assert_array_equal(stored("bilinear", corners, 3), [[0, 1, 2], [2, 3, 4], [4, 5, 6]])
    blocks = np.arange(16, dtype=np.float32).reshape(4, 4)
    np.testing.assert_array_equal(stored("area", blocks, 2), [[2.5, 4.5], [10.5, 12.5]])  # block means


def test_a_category_without_masks_gets_nan_pixel_metrics_and_a_reason(online, dataset, tiny_config, tmp_path):
    out, _ = online
    shutil.copytree(out, tmp_path / "copy")
    samples = load_mvtec(dataset)
    samples["fabric"] = [dataclasses.replace(s, mask_path=None) if s.label else s for s in samples["fabric"]]
    result = score_plan(Plan("folder", dataset, tiny_config, tuple(SEEDS), tmp_path / "copy", samples))
    fabric, widget = result["summary"]["fabric"], result["summary"]["widget"]
    assert np.isnan(fabric["PRO"]["mean"]) and 0 <= fabric["I-AUROC"]["mean"] <= 100
    assert result["summary"]["mean"]["P-AUROC"]["mean"] == pytest.approx(widget["P-AUROC"]["mean"])  # NaN skipped
    assert result["notes"] == [  # one note per reason, naming the table's columns
        "fabric: P-AUROC, P-F1-max, P-AP undefined (no positive samples)",
        "fabric: PRO undefined (no anomalous region)",
        "fabric: 4 anomalous image(s) without a mask are left out of the pixel metrics",
    ]
    assert json.loads((tmp_path / "copy" / "metrics.json").read_text())["summary"]["fabric"]["PRO"]["mean"] is None


def test_a_rerun_keeps_finished_seeds_scores_an_unfinished_one_again_and_refuses_another_setup(
        local_ray, online, dataset, tiny_config, tmp_path, capsys):
    out, result = online
    shutil.copytree(out, tmp_path / "again")
    seed_1 = tmp_path / "again" / "seed-1" / "results" / "line_id=widget"
    files = sorted(seed_1.rglob("*.parquet"))
    for file in files[len(files) // 2:] if len(files) > 1 else files:  # seed 1 stopped part way
        file.unlink()
    kept = sorted(p.stat().st_mtime_ns for p in (tmp_path / "again" / "seed-0").rglob("*.parquet"))
    again = evaluate("mvtec", dataset, tiny_config, SEEDS, "online", tmp_path / "again", progress=False)
    err = capsys.readouterr().err
    assert "seed 0 (1/2): scored by an earlier run of this evaluation; kept" in err
    assert "seed 1 (2/2): an earlier run stopped part way; scoring it again" in err
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "again" / "seed-0").rglob("*.parquet")) == kept
    assert again["per_seed"] == result["per_seed"] and again["summary"] == result["summary"]
    with pytest.raises(FileExistsError, match=r"holds the rows of another evaluation \(detector\.mode: 'online' then, "
                                               r"'offline' now\); choose another --out or remove it"):
        evaluate("mvtec", dataset, tiny_config, SEEDS, "offline", tmp_path / "again", progress=False)
    with pytest.raises(FileExistsError, match=r"another evaluation \(protocol: 'authors' then, 'aligned' now\)"):
        evaluate("mvtec", dataset, tiny_config, SEEDS, "online", tmp_path / "again", progress=False, protocol="aligned")


def test_offline_mode_gives_the_same_metrics_for_every_seed(local_ray, dataset, tiny_config, tmp_path):
    result = evaluate("mvtec", dataset, tiny_config, SEEDS, "offline", tmp_path, categories=["fabric"], progress=False)
    assert result["mode"] == "offline" and result["categories"] == ["fabric"]
    first, second = (result["per_seed"]["fabric"][str(s)] for s in SEEDS)
    assert first == second
    assert all(result["summary"]["mean"][m]["std"] == 0.0 for m in METRICS)
    assert "| paper: RareCLIP, offline | | 91.5 |" in (tmp_path / "metrics.md").read_text()


def test_shots_learn_train_references_before_the_test_images(local_ray, dataset, tiny_config, tmp_path):
    result = evaluate("mvtec", dataset, tiny_config, [1], "online", tmp_path, categories=["widget"], progress=False,
                      shots=2)
    assert result["shots"] == 2 and result["paper"] is None  # the paper reports 0 and 4 shots only
    rows = read_rows(tmp_path / "seed-1" / "results")
    test = shuffled(load_mvtec(dataset)["widget"], 1)
    references = shuffled(load_mvtec(dataset, split="train")["widget"], 1)[:2]
    assert [r["uri"] for r in rows] == [s.path for s in test]  # references give no rows
    detector = build_detector(tiny_config)
    detector.add_normal_references([decode_frame(Path(s.path).read_bytes()) for s in references])
    expected = [detector.step(decode_frame(Path(s.path).read_bytes())).score for s in test]
    assert [r["score"] for r in rows] == expected
    assert "2 normal references per category" in (tmp_path / "metrics.md").read_text()
    with pytest.raises(ValueError, match="too few train images"):
        evaluate("mvtec", dataset, tiny_config, [1], "online", tmp_path / "x", shots=4)


def test_paper_figures_say_what_the_paper_does_not_give():
    def figures(dataset, mode, branch):
        return paper_figures(dataset, RareCLIPConfig(mode=mode, rarity_branch=branch))

    visa = figures("visa", "offline", "iprb")
    assert visa["values"]["P-AUROC"] == {"mean": 95.7, "std": None} and visa["status"]["PRO"] == "unreadable"
    assert set(figures("mvtec", "offline", "dprb")["status"].values()) == {"not reported"}
    assert figures("folder", "online", "iprb") is None
    four = paper_figures("visa", RareCLIPConfig(mode="online"), shots=4)
    assert four["values"]["I-AUROC"] == {"mean": 95.5, "std": None} and four["status"]["PRO"] == "not reported"


def test_bad_inputs_exit_2_with_the_readers_message_before_any_actor(tmp_path, dataset, capsys):
    assert run_cluster.main(["evaluate", "--dataset", "mvtec", "--root", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err
    broken = tmp_path / "broken"
    (broken / "cat" / "test" / "crack").mkdir(parents=True)
    (broken / "cat" / "test" / "crack" / "000.png").write_bytes(b"x")  # no ground_truth mask
    assert run_cluster.main(["evaluate", "--dataset", "mvtec", "--root", str(broken)]) == 2
    assert "mask for" in capsys.readouterr().err
    args = ["evaluate", "--dataset", "mvtec", "--root", dataset, "--config", "configs/detector-tiny.yaml"]
    assert run_cluster.main(args + ["--categories", "nothing"]) == 2
    assert "nothing" in capsys.readouterr().err
    (tmp_path / "used" / "seed-1" / "results").mkdir(parents=True)
    assert run_cluster.main(args + ["--out", str(tmp_path / "used")]) == 2
    assert "holds the rows of another evaluation (no record of what it evaluated)" in capsys.readouterr().err
    # weights and the output folder are checked before Ray starts, as a job checks them
    detector = tmp_path / "weights.yaml"
    detector.write_text(Path("configs/detector-tiny.yaml").read_text() + f"tpb_weights: {tmp_path / 'tpb.pth'}\n")
    assert run_cluster.main(args[:-1] + [str(detector)]) == 2
    assert f"detector.tpb_weights: no file at '{tmp_path / 'tpb.pth'}'" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("x")
    assert run_cluster.main(args + ["--out", str(tmp_path / "a-file")]) == 2
    assert f"out: {tmp_path / 'a-file'} is a file, not a folder" in capsys.readouterr().err
