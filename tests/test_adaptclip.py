"""AdaptCLIP (kind: adaptclip): the authors' checkpoint format at ViT-L-14-336's widths, the input
and position-embedding conventions, zero-shot order independence, few-shot references at any
point of a stream with a bitwise state round trip, and one replay through the pipeline."""
import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from PIL import Image

from configs.loading import load_detector_config
from pipelines.evaluate import paper_figures
from pipelines.replay import run_replay
from rareclip_core import ConfigError, build_detector, detector_config_from_dict
from rareclip_core.backbone import FrameInput, VisionOptions, vision_forward
from rareclip_core.data.datasets import Sample, load_mask
from rareclip_core.detectors.adaptclip.adapters import (
    AdaptCLIPAdapters,
    AdapterShapes,
    read_checkpoint,
    save_checkpoint,
)
from rareclip_core.detectors.adaptclip.config import AdaptCLIPConfig
from rareclip_core.detectors.adaptclip.detector import AdaptCLIPDetector, harmonic_mean
from rareclip_core.backbone.clip import resize_position_embedding
from rareclip_core.detectors.adaptclip.prompts import ABNORMAL_STATES, NORMAL_STATES, state_sentences
from tests.conftest import REPO, textured_frames
from tests.pipeline_helpers import line_frames, pipeline_config, read_rows, write_folder

TINY = REPO / "configs" / "detector-adaptclip-tiny.yaml"


def documented_checkpoint(d=768, text=768, n_ctx=12, length=77, layers=4) -> dict:
    """A checkpoint written from the documented key names and shapes (docs/algorithms/adaptclip.md),
    not from our modules; values are random but BatchNorm variances positive."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.rand(*shape, generator=g) + 0.5

    def bn(prefix, c):
        return {f"{prefix}.weight": rand(c), f"{prefix}.bias": rand(c), f"{prefix}.running_mean": rand(c),
                f"{prefix}.running_var": rand(c), f"{prefix}.num_batches_tracked": torch.tensor(7)}

    textual = {"ctx_pos": rand(1, 1, n_ctx, text), "ctx_neg": rand(1, 1, n_ctx, text)}
    for s in ("pos", "neg"):
        textual |= {f"token_prefix_{s}": rand(1, 1, 1, text), f"token_suffix_{s}": rand(1, 1, length - 1 - n_ctx, text),
                    f"tokenized_prompts_{s}": torch.arange(length, dtype=torch.int32).view(1, 1, length)}
    visual = {}
    for name in ("local_adater", "global_adapter"):
        visual |= {f"{name}.fc.0.weight": rand(d // 4, d), **bn(f"{name}.fc.1", d // 4), f"{name}.fc.3.weight": rand(d, d // 4)}
    local = {"0.weight": rand(128, d, 3, 3), **bn("1", 128), "3.weight": rand(128, 128, 2, 2), "3.bias": rand(128),
             "4.weight": rand(64, 128, 3, 3), **bn("5", 64), "7.weight": rand(64, 64, 2, 2), "7.bias": rand(64),
             "8.weight": rand(2, 64, 1, 1), "8.bias": rand(2)}
    global_ = {"0.weight": rand(128, d), **bn("1", 128), "3.weight": rand(64, 128), **bn("4", 64), "6.weight": rand(2, 64)}
    pq = {}
    for layer in range(layers):
        pq |= bn(f"sharebn.{layer}", d)
        pq |= {f"local_adapter.{layer}.{k}": v for k, v in local.items()}  # one shared head: same tensors
        pq |= {f"global_adapter.{layer}.{k}": v for k, v in global_.items()}
    return {"textual_learner": textual, "visual_learner": visual, "pq_learner": pq}


@pytest.fixture(scope="module")
def vit_l_adapters():
    """The adapters at ViT-L-14-336's widths (what they depend on; the 1.7 GB backbone is not needed)."""
    cfg = open_clip.get_model_config("ViT-L-14-336")
    text = cfg["text_cfg"]
    return AdaptCLIPAdapters(AdapterShapes(cfg["embed_dim"], text["width"], text["context_length"], 12, 4))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = AdaptCLIPConfig.from_yaml(TINY)
    return cfg.model_copy(update={"text_cache_dir": str(tmp_path_factory.mktemp("text-cache"))})


@pytest.fixture(scope="module")
def detector(tiny):
    return build_detector(tiny)


def test_documented_checkpoint_loads_into_vit_l_adapters(vit_l_adapters, tmp_path):
    checkpoint = documented_checkpoint()
    path = tmp_path / "epoch_15.pth"
    torch.save(checkpoint, path)
    vit_l_adapters.load_checkpoint(read_checkpoint(str(path)), str(path))
    for part, state in checkpoint.items():
        loaded = getattr(vit_l_adapters, part).state_dict()
        for key, value in state.items():
            assert torch.equal(loaded[key], value), f"{part}.{key}"
    # 0.61 M zero-shot parameters (textual + visual) and 1.76 M in all, as the fact sheet's count
    count = {p: sum(v.numel() for v in dict(getattr(vit_l_adapters, p).named_parameters()).values())
             for p in ("textual_learner", "visual_learner", "pq_learner")}
    assert count["textual_learner"] + count["visual_learner"] == 609_024
    assert sum(count.values()) == 1_763_266
    # what we write has the same keys and shapes, and reloads
    save_checkpoint(vit_l_adapters, str(tmp_path / "ours.pth"))
    ours = read_checkpoint(str(tmp_path / "ours.pth"))
    assert {p: {k: v.shape for k, v in s.items()} for p, s in ours.items()} == \
        {p: {k: v.shape for k, v in s.items()} for p, s in checkpoint.items()}


def test_a_wrong_checkpoint_is_refused_naming_the_key(vit_l_adapters, tmp_path):
    missing = documented_checkpoint()
    del missing["pq_learner"]["sharebn.2.running_var"]
    with pytest.raises(ConfigError, match=r"detector\.weights: .*pq_learner\.missing sharebn\.2\.running_var \(768,\)"):
        vit_l_adapters.load_checkpoint(missing, "x.pth")
    misshapen = documented_checkpoint()
    misshapen["visual_learner"]["local_adater.fc.0.weight"] = torch.zeros(192, 1024)
    with pytest.raises(ConfigError, match=r"visual_learner\.local_adater\.fc\.0\.weight has shape \(192, 1024\), expected \(192, 768\)"):
        vit_l_adapters.load_checkpoint(misshapen, "x.pth")
    unshared = documented_checkpoint()
    unshared["pq_learner"]["global_adapter.3.6.weight"] = torch.zeros(2, 64)
    with pytest.raises(ConfigError, match=r"global_adapter\.3\.6\.weight differs from global_adapter\.0\.6\.weight"):
        vit_l_adapters.load_checkpoint(unshared, "x.pth")
    with pytest.raises(ConfigError, match=r"not an AdaptCLIP checkpoint: expected the parts .* found \['trainable_linearlayer'\]"):
        vit_l_adapters.load_checkpoint({"trainable_linearlayer": {}}, "x.pth")
    path = tmp_path / "truncated.pth"
    torch.save(documented_checkpoint(), path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ConfigError, match=r"detector\.weights: .*truncated\.pth is not a readable torch checkpoint"):
        read_checkpoint(str(path))
    with pytest.raises(ConfigError, match=r"detector\.weights: no file at"):
        read_checkpoint(str(tmp_path / "none.pth"))


def test_config_checks_and_the_paper_settings():
    paper = load_detector_config(REPO / "configs" / "detector-adaptclip.yaml")
    assert isinstance(paper, AdaptCLIPConfig) and paper.model == "ViT-L-14-336" and paper.image_size == 518
    assert (paper.patch_blocks, paper.value_value_from, paper.temperature, paper.top_k) == ([6, 12, 18, 24], 6, 0.07, 10)
    with pytest.raises(ConfigError, match="patch_blocks .* must all be >= value_value_from"):
        detector_config_from_dict({"kind": "adaptclip", "patch_blocks": [3, 12], "value_value_from": 6})
    with pytest.raises(ConfigError, match=r"\n  detector: image_size 500 must be a multiple of model 'ViT-L-14-336'\'s patch size 14$"):
        detector_config_from_dict({"kind": "adaptclip", "image_size": 500}, prefix="detector.")
    missing = paper.model_copy(update={"weights": "/nowhere/epoch_15.pth"}).weight_file_problems()
    assert missing == ["detector.weights: no file at '/nowhere/epoch_15.pth'; set it to the downloaded file's path"]
    assert len(state_sentences(NORMAL_STATES, "object")) == 147 and len(state_sentences(ABNORMAL_STATES, "object")) == 84


def test_harmonic_mean_and_position_embedding_resize_by_hand():
    got = harmonic_mean(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([3.0, 5.0, 2.0]))
    assert got.tolist() == pytest.approx([1.5, 0.0, 2.0])
    visual = open_clip.create_model("rareclip-tiny", pretrained=None).visual  # 14 x 14 grid of width 64
    table = torch.zeros(1 + 14 * 14, 64)
    table[0] = 7.0
    table[1:, 0] = torch.arange(14.0).repeat(14)  # channel 0 = the column index
    visual.positional_embedding = torch.nn.Parameter(table)
    resize_position_embedding(visual, 16 * 28)  # 14 -> 28: each column splits in two
    new = visual.positional_embedding.data
    assert new.shape == (1 + 28 * 28, 64) and visual.grid_size == (28, 28)
    assert torch.equal(new[0], table[0])
    # bilinear, align_corners=False: output column j samples input column (j + 0.5) / 2 - 0.5, clamped
    expected = [min(max((j + 0.5) / 2 - 0.5, 0), 13) for j in range(28)]
    assert new[1:29, 0].tolist() == pytest.approx(expected)


def test_features_are_the_value_value_tokens_and_the_global_feature_skips_ln_post(detector):
    image = detector.frame_input(textured_frames(1)[:1])
    visual = detector.encoder.visual
    out = vision_forward(visual, image, VisionOptions(blocks=(1, 2, 3, 4), value_value_from=1))
    frame = detector.encoder(image)[0]
    assert torch.equal(frame.global_feature, (out.final[0, :1] @ visual.proj)[0])
    assert torch.equal(frame.patch_tokens[2], visual.ln_post(out.value_tokens[3][0]) @ visual.proj)
    assert not torch.equal(out.value_tokens[3], out.tokens[3])  # the V-V path is not the ordinary one


def test_untrained_adapters_warn_when_clip_is_real(tiny, tmp_path):
    clip = tmp_path / "tiny-clip.pt"
    torch.save(open_clip.create_model("rareclip-tiny", pretrained=None).state_dict(), clip)
    with pytest.warns(UserWarning, match="detector.weights is not set: AdaptCLIP's adapters are untrained"):
        build_detector(tiny.model_copy(update={"pretrained": str(clip)}))


def test_preprocess_and_evaluation_masks_squash_the_whole_frame(tmp_path):
    frame = np.zeros((100, 300, 3), np.uint8)
    frame[:, :150] = 255  # left half white: after squashing, the left half of the square
    x = FrameInput(64, AdaptCLIPConfig.input_view, torch.device("cpu"))([frame])[0]
    assert x.shape == (3, 64, 64)
    assert (x[:, :, :30] > 1.5).all() and (x[:, :, 34:] < -1.4).all()
    mask = np.zeros((100, 300), np.uint8)
    mask[:, :100] = 255  # the left third: the left third of the squashed square, outside the centre crop
    Image.fromarray(mask).save(tmp_path / "mask.png")
    sample = Sample(str(tmp_path / "x.png"), 1, str(tmp_path / "mask.png"), "d", "c")
    squashed = load_mask(sample, 64, AdaptCLIPConfig.input_view)
    assert squashed[:, :21].all() and not squashed[:, 22:].any()
    assert not load_mask(sample, 64).any()


def test_zero_shot_results_do_not_depend_on_order_or_batch(detector):
    frames = textured_frames(5, seed=3)
    forward = [detector.step(f) for f in frames]
    backward = [detector.step(f) for f in reversed(frames)][::-1]
    batched = [detector.step_features(x) for x in detector.encode(frames)]
    for a, b, c in zip(forward, backward, batched):
        assert a.score == b.score == c.score and np.array_equal(a.anomaly_map, c.anomaly_map)
        assert a.score == pytest.approx((a.parts["visual_score"] + a.parts["textual_score"] + a.anomaly_map.max()) / 3)
        assert a.parts["references"] == 0 and a.parts["prompt_score"] is None
    assert detector.state_dict().keys() == {"n_references"}


def test_references_added_mid_stream_and_the_state_round_trip_is_bitwise(tiny):
    frames = textured_frames(10, seed=1)
    line = build_detector(tiny)
    zero_shot = [line.step(f).score for f in frames[:3]]
    line.add_normal_references(frames[6:8])  # after the stream has started
    line.add_normal_references(frames[8:9])  # and again: 3 references
    few_shot = line.step(frames[0])
    assert few_shot.parts["references"] == 3 and few_shot.score != zero_shot[0]
    mean = (few_shot.parts["visual_score"] + few_shot.parts["textual_score"] + few_shot.parts["prompt_score"]) / 3
    peak = float(few_shot.anomaly_map.max())
    assert few_shot.score == pytest.approx(2 / (1 / mean + 1 / peak))
    restored = build_detector(tiny)
    restored.load_state_dict(load_safetensors(save_safetensors(line.state_dict())))
    for frame in frames[3:6]:
        a, b = line.step(frame), restored.step(frame)
        assert a.score == b.score and np.array_equal(a.anomaly_map, b.anomaly_map)
    assert all(torch.equal(v, restored.state_dict()[k]) for k, v in line.state_dict().items())
    line.reset()
    assert [line.step(f).score for f in frames[:3]] == zero_shot
    with pytest.raises(ValueError, match="max_references = 2"):
        build_detector(tiny.model_copy(update={"max_references": 2})).add_normal_references(frames[:3])
    other = build_detector(tiny.model_copy(update={"image_size": 224}))
    with pytest.raises(ValueError, match="another model or image_size"):
        other.load_state_dict(restored.state_dict())


def test_paper_figures_for_evaluate(tiny):
    figures = paper_figures("visa", tiny, 4)
    assert figures["values"]["I-AUROC"] == {"mean": 93.1, "std": 0.2} and figures["values"]["P-AP"]["mean"] == 41.8
    assert paper_figures("mvtec", tiny, 0)["values"]["I-AUROC"] == {"mean": 93.5, "std": None}
    assert paper_figures("mvtec", tiny, 3) is None and paper_figures("folder", tiny, 0) is None


def test_replay_gives_one_ok_row_per_frame(local_ray, tiny, tmp_path):
    for seed, line in enumerate(["a", "b"]):
        write_folder(tmp_path / "src", line, line_frames(seed, 5))
    reference = str(tmp_path / "src" / "a" / "frame_0000_b.png")
    cfg = pipeline_config(tiny, tmp_path / "src", tmp_path / "out", references={"b": [reference]}, backbone_batch=2)
    assert run_replay(cfg, progress=False).counts == {"a": 5, "b": 5}
    rows = read_rows(tmp_path / "out" / "results")
    assert [(r["line_id"], r["seq"], r["status"]) for r in rows] == [(line, s, "ok") for line in "ab" for s in range(5)]
    assert all(r["model_id"].startswith("adaptclip:rareclip-tiny:random:") for r in rows)
    alone = AdaptCLIPDetector(tiny)
    assert rows[0]["score"] == pytest.approx(alone.step(line_frames(0, 5)[0]).score, abs=1e-6)
