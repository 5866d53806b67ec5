"""AFR-CLIP through the real jobs: replay (two lines, one with its own product name, backbone
batches, snapshots) gives the detector's own scores, and evaluate gives the same metrics for
every shuffle of the test order (it keeps no stream state)."""
import pytest

from pipelines.evaluate import METRICS, evaluate
from pipelines.replay import run_replay
from rareclip_core import build_detector
from rareclip_core.data.synthetic import write_mvtec_dataset
from tests.pipeline_helpers import line_frames, pipeline_config, read_rows, write_folder


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    from rareclip_core import detector_config_from_yaml
    from tests.test_afrclip import TINY

    return detector_config_from_yaml(TINY).model_copy(update={"image_size": 112})


def test_replay_scores_each_line_with_its_product(local_ray, config, tmp_path):
    images = {line: line_frames(seed, 7) for seed, line in enumerate(["a", "b"])}
    for line, frames in images.items():
        write_folder(tmp_path / "src", line, frames)
    cfg = pipeline_config(config, tmp_path / "src", tmp_path / "out", backbone_batch=3,
                          line_detector={"b": {"product": "metal disc"}}, snapshot={"every_frames": 4})
    assert run_replay(cfg, progress=False).counts == {"a": 7, "b": 7}
    rows = read_rows(tmp_path / "out" / "results")
    assert [(r["line_id"], r["seq"]) for r in rows] == [(line, s) for line in "ab" for s in range(7)]
    for line in "ab":
        detector = build_detector(cfg.detector_for(line))
        expected = [detector.step(frame).score for frame in images[line]]
        got = [r for r in rows if r["line_id"] == line]
        assert [r["score"] for r in got] == pytest.approx(expected, rel=1e-6, abs=1e-7), line
        assert all(r["status"] == "ok" and r["model_id"] == detector.model_id for r in got)
    assert cfg.detector_for("a").model_id != cfg.detector_for("b").model_id  # the product is part of the model


def test_evaluate_gives_the_same_metrics_for_every_order(local_ray, config, tmp_path):
    root = write_mvtec_dataset(tmp_path / "mvtec", categories={"metal_widget": "object"}, n_train_good=0,
                               n_test_good=4, n_test_defect=4, size=96)
    result = evaluate("mvtec", root, config, seeds=[0, 1], out=tmp_path / "eval", progress=False)
    assert result["mode"] is None and result["categories"] == ["metal_widget"]
    first, second = (result["per_seed"]["metal_widget"][s] for s in ("0", "1"))
    assert first["images"] == 8 and first == second
    assert all(0 <= first[m] <= 100 for m in METRICS)
    assert all(result["summary"]["mean"][m]["std"] == 0.0 for m in METRICS)
    assert result["paper"]["row"] == "AFR-CLIP, zero-shot" and result["paper"]["values"]["I-AUROC"] == {"mean": 93.4, "std": None}
    assert "| paper: AFR-CLIP, zero-shot |" in (tmp_path / "eval" / "metrics.md").read_text()
    # the category is the line's product in the prompts
    model_ids = {r["model_id"] for r in read_rows(tmp_path / "eval" / "seed-0" / "results")}
    assert model_ids == {config.model_copy(update={"product": "metal widget"}).model_id}
