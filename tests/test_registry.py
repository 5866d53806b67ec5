"""The detector contract and registry: every job builds detectors by `kind`, a second kind plugs
in and runs through the pipeline, and the restructure left RareCLIP's scores unchanged."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import run_cluster
from configs.loading import load_detector_config, load_pipeline_config
from configs.pipeline import PipelineConfig
from pipelines.demo import demo_out
from pipelines.replay import run_replay
from rareclip_core import (
    DETECTORS,
    ConfigError,
    build_detector,
    detector_config_from_dict,
    detector_config_from_yaml,
)
from rareclip_core.detectors.rareclip.config import RareCLIPConfig
from rareclip_core.detectors.rareclip.detector import RareCLIPDetector
from rareclip_core.model_names import openclip_model_names, vision_depth
from tests.conftest import REPO, TINY_CONFIG, textured_frames
from tests.pipeline_helpers import line_frames, pipeline_config, read_rows, write_folder
from tests.trivial_detector import BrightnessConfig, BrightnessDetector

STORED = Path(__file__).parent / "data" / "tiny_scores.json"


def test_rareclip_is_the_default_kind():
    assert DETECTORS["rareclip"].detector is RareCLIPDetector
    config = detector_config_from_yaml(TINY_CONFIG)  # no `kind:` in the file
    assert isinstance(config, RareCLIPConfig) and config.kind == "rareclip"
    assert config.model_id.startswith("rareclip:rareclip-tiny:random:")


def test_configs_and_the_non_scoring_actors_load_no_torch():
    # the registry imports a detector class when a detector is built: reading a job's config,
    # the result writer and the ingestion actors start without torch and the model code (~6 s each);
    # a line's handle (ingestion, the supervisor and the driver hold one; Ray imports the class's
    # module to make it) does not bring them either: it held back a job's first frames by ~2 s
    code = ("import sys, configs.loading, actors.writer, actors.ingest, actors.supervisor, actors.line, "
            "pipelines.line_cluster, pipelines.query; "
            "configs.loading.load_pipeline_config('configs/demo.yaml'); "
            "print(sorted(m for m in ('torch', 'open_clip') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
    assert DETECTORS["afrclip"].detector.__name__ == "AFRCLIPDetector"  # imported when asked for


def test_unknown_kind_and_bad_fields_name_the_problem():
    with pytest.raises(ConfigError, match="'nope' is not a detector kind; known kinds: .*rareclip"):
        detector_config_from_dict({"kind": "nope"})
    with pytest.raises(ConfigError, match="max_featurs"):
        detector_config_from_dict({"max_featurs": 1})
    with pytest.raises(ConfigError, match=r"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N' \(N a GPU's index\) \(got 'gpu0'\)"):
        detector_config_from_dict({"device": "gpu0"})  # checked with the config, not when a line builds its detector
    assert detector_config_from_dict({"device": "cuda:1"}).device == "cuda:1"


def test_a_misspelt_or_missing_setting_is_named_with_the_closest_real_ones(tmp_path):
    data = {"sorce": {"kind": "folder", "root": "x"}, "snapshot": {"every_frame": 3}, "thresholds": {"a": "high"}}
    with pytest.raises(ConfigError) as missing:
        PipelineConfig.from_dict(data, source="line.yaml")
    assert str(missing.value).splitlines() == [
        "invalid configuration in line.yaml:",
        "  source: required, and not given",
        # a union's alternatives on one line, without pydantic's member labels (`thresholds.a.float`)
        "  thresholds.a: Input should be a valid number, unable to parse string as a number; or Input should be 'auto' (got 'high')",
        "  snapshot.every_frame: not a setting here; did you mean 'every_frames' or 'every_s'?",
        "  sorce: not a setting here; did you mean 'source'?",
    ]
    # inside a tagged union (`source.folder.wach` in pydantic's words) the kind's own settings are known
    with pytest.raises(ConfigError, match=r"\n  source\.wach: not a setting here; did you mean 'watch'\?$"):
        PipelineConfig.from_dict({"source": {"kind": "folder", "root": str(tmp_path), "wach": True}})
    with pytest.raises(ConfigError, match=r"\n  detector\.max_image: not a setting here; did you mean 'max_images'\?$"):
        PipelineConfig.from_dict({"detector": {"max_image": 3}, "source": {"kind": "folder", "root": str(tmp_path)}})


def test_an_out_folder_among_the_line_folders_is_refused_unless_the_lines_are_named(tmp_path):
    source = {"kind": "folder", "root": str(tmp_path)}
    for out in (tmp_path / "out", tmp_path):
        with pytest.raises(ConfigError) as inside:
            PipelineConfig.from_dict({"source": source, "out": str(out)}, source="line.yaml")
        assert str(inside.value).splitlines() == [  # the whole config's check: no "(got {...everything...})"
            "invalid configuration in line.yaml:",
            f"  out: {str(out)!r} lies in source.root {str(tmp_path)!r}, whose folders are the lines: the job's own "
            "results and snapshots would be read as a line. Put out outside source.root, or name the lines in source.lines",
        ]
    for fine in ({"source": source, "out": str(tmp_path / ".out")},
                 {"source": source, "out": str(tmp_path.parent / "elsewhere")},
                 {"source": {**source, "lines": ["a"]}, "out": str(tmp_path / "out")}):
        PipelineConfig.from_dict(fine)


def test_a_model_and_its_blocks_are_checked_with_the_config_without_torch_and_agree_with_openclip(tiny_config):
    code = (
        "import sys\n"
        "from rareclip_core import ConfigError, detector_config_from_dict\n"
        "for settings in ({'model': 'vit-l-14-336'}, {'model': 'RN50'}, {'model': 'rareclip-tiny'},\n"
        "                 {'kind': 'dual_image', 'model': 'rareclip-tiny', 'value_value_from': 5}):\n"
        "    try:\n"
        "        detector_config_from_dict(settings, source='line.yaml', prefix='detector.')\n"
        "    except ConfigError as err:\n"
        "        print(str(err).splitlines()[1])\n"
        "print('torch imported' if 'torch' in sys.modules else 'no torch')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    wrong_name, *others = out.splitlines()  # the closest names after the first depend on OpenCLIP's version
    assert wrong_name.startswith("  detector.model: not an OpenCLIP model name; did you mean 'ViT-L-14-336' or ")
    assert wrong_name.endswith("(got 'vit-l-14-336')")
    assert others == [
        "  detector.model: its vision tower is not OpenCLIP's own ViT (it is a ResNet or a timm model); the detectors "
        "read that ViT's patch tokens block by block (got 'RN50')",
        # the paper's blocks, the defaults, on a 4-block model: refused before any actor, not by each line's
        "  detector: rarity_blocks = [6, 12, 18, 24], but model 'rareclip-tiny' has 4 blocks (1 to 4)",
        "  detector: value_value_from = 5, but model 'rareclip-tiny' has 4 blocks (1 to 4)",
        "no torch",
    ]
    import open_clip

    from rareclip_core.backbone.clip import create_clip_model

    assert openclip_model_names() == set(open_clip.list_models())
    assert vision_depth("ViT-L-14-336") == 24 and vision_depth("ViT-SO400M-14-SigLIP") is None
    assert vision_depth("rareclip-tiny") == len(create_clip_model(tiny_config).visual.transformer.resblocks) == 4


def test_every_command_reads_the_detector_of_a_pipeline_yaml():
    # `detector: detector-tiny.yaml` (a file beside it) and a plain detector YAML alike
    for path in ("configs/demo.yaml", "configs/default.yaml", "configs/detector-tiny.yaml"):
        assert isinstance(load_detector_config(REPO / path), RareCLIPConfig)
    assert load_pipeline_config(REPO / "configs/demo.yaml").detector == load_detector_config(REPO / "configs/demo.yaml")


def test_evaluate_and_train_tpb_accept_pipeline_configs(tmp_path, capsys):
    # they fail on the missing dataset, after the config was read (exit 2, no traceback)
    for argv in (
        ["evaluate", "--dataset", "folder", "--root", str(tmp_path / "none"), "--config", str(REPO / "configs/demo.yaml")],
        ["train-tpb", "--dataset", "folder", "--root", str(tmp_path / "none"), "--save", str(tmp_path / "t.pth"),
         "--config", str(REPO / "configs/default.yaml")],
    ):
        assert run_cluster.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: directory {tmp_path / 'none'} not found"), err


def test_restructure_left_rareclip_scores_unchanged(tiny_config):
    """Scores and maps of five variants, stored before the detector-contract restructure (bitwise
    equal on the machine that stored them; to 1e-6 here, so another CPU's kernels or torch build
    cannot fail it: the score, the map's mean pixel and its maximum. The map's sum would add up
    last-bit differences of 50,176 float32 pixels, 0.018 of 22,609 with torch 2.14.1). The greedy
    variant's were stored again when its first pick became PatchCore's (the stored ones differ
    from frame 4 on, where the memory is first cut down)."""
    stored = json.loads(STORED.read_text())
    frames = textured_frames(24)
    variants = {"online": ({}, 0), "dprb": ({"rarity_branch": "dprb"}, 0), "kshot2": ({}, 2),
                "dprb_kshot2": ({"rarity_branch": "dprb"}, 2), "greedy": ({"sampler": "greedy"}, 0)}
    for name, (update, k) in variants.items():
        detector = build_detector(tiny_config.model_copy(update=update))
        detector.add_normal_references(frames[20 : 20 + k])
        for frame, (score, map_sum, map_max) in zip(frames[:14], stored[name]):
            result = detector.step(frame)
            pixels = result.anomaly_map.size
            got = [result.score, float(result.anomaly_map.astype(np.float64).mean()), float(result.anomaly_map.max())]
            assert got == pytest.approx([score, map_sum / pixels, map_max], rel=0, abs=1e-6), name


def test_a_second_kind_plugs_in_through_the_registry(local_ray, tmp_path):
    assert DETECTORS["brightness"].detector is BrightnessDetector
    config = detector_config_from_dict({"kind": "brightness"})
    assert isinstance(config, BrightnessConfig) and not BrightnessDetector.supports_references
    with pytest.raises(NotImplementedError, match="no normal references"):
        build_detector(config).add_normal_references([])
    images = {line: line_frames(seed, 6) for seed, line in enumerate(["a", "b"])}
    for line, frames in images.items():
        write_folder(tmp_path / "src", line, frames)
    counts = run_replay(pipeline_config(config, tmp_path / "src", tmp_path / "out"), progress=False).counts
    assert counts == {"a": 6, "b": 6}
    rows = read_rows(tmp_path / "out" / "results")
    assert [(r["line_id"], r["seq"]) for r in rows] == [(line, s) for line in "ab" for s in range(6)]
    for row in rows:
        expected = images[row["line_id"]][row["seq"]].mean() / 255 + row["seq"] * 1e-3
        assert row["status"] == "ok" and row["score"] == pytest.approx(expected)
        assert row["model_id"] == config.model_id and row["model_id"].startswith("brightness:")


def test_per_line_detector_settings_override_the_pipelines(tiny_config, tmp_path):
    cfg = pipeline_config(tiny_config, tmp_path / "src", tmp_path / "out", line_detector={"b": {"max_images": 7}})
    assert cfg.detector_for("a") is cfg.detector and cfg.detector_for("b").max_images == 7
    assert cfg.detector_for("b").fingerprint() != cfg.detector.fingerprint()
    data = {"detector": tiny_config.model_dump(), "source": {"kind": "folder", "root": str(tmp_path)},
            "line_detector": {"b": {"max_images": 0}}}
    with pytest.raises(ConfigError, match=r"\n  line_detector\.b\.max_images: Input should be greater"):
        PipelineConfig.from_dict(data)


def test_demo_runs_another_detector_yaml(tmp_path, capsys):
    detector = tmp_path / "brightness.yaml"
    detector.write_text("kind: rareclip\nmodel: rareclip-tiny\npretrained: null\nimage_size: 224\n"
                        "rarity_blocks: [1, 2, 3, 4]\ntext_blocks: [1, 2, 3, 4]\nmax_features: 0\n")
    assert run_cluster.main(["demo", "--detector", str(detector), "--out", str(tmp_path / "out")]) == 2
    assert "max_features" in capsys.readouterr().err
    # without --out, its own folder beside the default demo's, whose snapshots it could not use
    assert demo_out("out/demo", "configs/detector-dual-image-tiny.yaml") == "out/demo-dual-image-tiny"


def test_references_are_checked_before_any_actor(tiny_config, tmp_path):
    source = {"kind": "folder", "root": str(tmp_path)}
    with pytest.raises(ConfigError, match=r"references.a\[0\]: no file at"):
        PipelineConfig.from_dict({"detector": tiny_config.model_dump(), "source": source,
                                  "references": {"a": [str(tmp_path / "missing.png")]}})
    (tmp_path / "ok.png").write_bytes(b"")
    with pytest.raises(ConfigError, match="references.a: detector kind 'brightness' takes no normal references"):
        PipelineConfig.from_dict({"detector": {"kind": "brightness"}, "source": source,
                                  "references": {"a": [str(tmp_path / "ok.png")]}})


def test_the_configuration_reference_is_what_the_settings_classes_say():
    """docs/configuration.md: regenerate it with `python -m configs.reference > docs/configuration.md`."""
    from configs.reference import configuration_reference

    text = configuration_reference()
    assert (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text() == text
    assert "| `max_features` | `4107` | N_F, patch feature memory size |" in text
    assert "| `root` | required | the folder holding one folder of frames per line |" in text


def test_a_setting_without_a_description_cannot_enter_the_reference():
    from pydantic import Field

    from configs.reference import _table
    from rareclip_core.config import StrictModel

    class Undocumented(StrictModel):
        said: int = Field(1, description="documented")
        unsaid: int = 2

    with pytest.raises(ValueError, match="Undocumented.unsaid has no description"):
        _table(Undocumented, ["said", "unsaid"])


def test_a_config_file_that_is_not_a_yaml_mapping_is_named_with_where_it_breaks(tmp_path):
    broken = tmp_path / "job.yaml"
    broken.write_text("source:\n  root: [frames\n")
    with pytest.raises(ConfigError, match=rf'(?s){broken} is not valid YAML: .*\n  in "{broken}", line 2, column 9'):
        load_pipeline_config(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=f"{listed} must hold a mapping of settings, not list"):
        load_pipeline_config(listed)
    with pytest.raises(ConfigError, match=f"config file not found: {tmp_path / 'none.yaml'}"):
        load_pipeline_config(tmp_path / "none.yaml")
