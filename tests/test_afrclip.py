"""AFR-CLIP (kind: afrclip): hand-computed scoring, the self-prompted forward, a stateless and
order-free detector, the checkpoint format and its errors."""
import math

import numpy as np
import pytest
import torch

from rareclip_core import ConfigError, build_detector, detector_config_from_dict, detector_config_from_yaml
from rareclip_core.detectors.afrclip.checkpoint import save_checkpoint
from rareclip_core.detectors.afrclip.config import AFRCLIPConfig
from rareclip_core.detectors.afrclip.parts import AFRCLIPHeads
from rareclip_core.ops.maps import neighbourhood_mean
from tests.conftest import REPO, textured_frames

TINY = REPO / "configs" / "detector-afrclip-tiny.yaml"


@pytest.fixture(scope="module")
def config():
    return detector_config_from_yaml(TINY)


@pytest.fixture(scope="module")
def detector(config):
    return build_detector(config)


def test_configs_load_with_the_papers_settings(config):
    paper = detector_config_from_yaml(REPO / "configs" / "detector-afrclip.yaml")
    assert isinstance(paper, AFRCLIPConfig) and paper == AFRCLIPConfig()  # the file states the defaults
    assert (paper.model, paper.pretrained, paper.image_size) == ("ViT-L-14-336", "openai", 518)
    assert (paper.stage_blocks, paper.n_prompts, paper.mpfa_size, paper.temperature) == ([6, 12, 18, 24], 5, 3, 1.0)
    assert isinstance(config, AFRCLIPConfig) and config.model_id.startswith("afrclip:rareclip-tiny:random:")
    assert paper.weight_file_problems() == []
    assert AFRCLIPConfig(weights="/nowhere/afr.pth").weight_file_problems() == [
        "detector.weights: no file at '/nowhere/afr.pth'; set it to the downloaded file's path"]
    assert AFRCLIPConfig(cnn_weights="/nowhere/wrn.pth").weight_file_problems()[0].startswith(
        "detector.cnn_weights: no file at '/nowhere/wrn.pth'")
    with pytest.raises(ConfigError, match="mpfa_size: must be odd"):
        detector_config_from_dict({"kind": "afrclip", "mpfa_size": 2})
    with pytest.raises(ConfigError, match="prompt_blocks: must be consecutive blocks from 2 on"):
        detector_config_from_dict({"kind": "afrclip", "prompt_blocks": [1, 2]})
    with pytest.raises(ConfigError, match="stage_blocks = \\[1, 2, 9\\], but model 'rareclip-tiny' has 4 blocks"):
        detector_config_from_dict({**config.model_dump(), "stage_blocks": [1, 2, 9]})
    with pytest.raises(ConfigError, match="detector.cnn_weights 'NOPE' is not a weights name of resnet18"):
        build_detector(config.model_copy(update={"cnn_weights": "NOPE"}))


def test_mpfa_averages_the_neighbours_inside_the_grid():
    grid = torch.arange(9.0).view(1, 9, 1)  # 3 x 3 grid, values 0..8 row by row
    pooled = neighbourhood_mean(grid, 3, 3, border="inside")[0, :, 0]
    assert pooled[0].item() == pytest.approx((0 + 1 + 3 + 4) / 4)  # a corner: 4 neighbours
    assert pooled[1].item() == pytest.approx((0 + 1 + 2 + 3 + 4 + 5) / 6)  # an edge: 6
    assert pooled[4].item() == pytest.approx(4.0)  # the centre: all 9


def test_text_on_text_scoring_matches_hand_computation():
    """Identity adapters and M_v = 1 make the rectified embedding F_t^s + F_v,i; with F_t^s = 0,
    F_t^n = e1 and F_t^a = e2 a token (1, 0) gets S_n = 1, S_a = 0 and P_a = 1 / (1 + e^(1/tau))."""
    heads = AFRCLIPHeads(width=2, embed_dim=2, cnn_dim=1, n_stages=1, n_prompts=1)
    with torch.no_grad():
        for linear in (heads.visual_adapters[0], heads.text_adapter):
            linear.weight.copy_(torch.eye(2))
            linear.bias.zero_()
        heads.cmfr.linear.weight.zero_()
        heads.cmfr.linear.bias.copy_(torch.tensor([1.0, 1.0, 0.0, 0.0]))  # M_v = (1, 1), M_t = (0, 0)
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # class token, one patch (a 1 x 1 grid)
    text = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])  # normal, abnormal, stateless
    for tau in (1.0, 0.5):
        logits = heads.stage_logits([tokens], text, grid=1, mpfa_size=3, temperature=tau)
        assert logits.shape == (1, 1, 2, 2)
        assert logits[0, 0].tolist() == [[1 / tau, 0.0], [0.0, 1 / tau]]
        p_abnormal = logits.softmax(-1)[0, 0, :, 1]
        assert p_abnormal[0].item() == pytest.approx(1 / (1 + math.exp(1 / tau)))
        assert p_abnormal[1].item() == pytest.approx(1 / (1 + math.exp(-1 / tau)))


def test_self_prompts_reach_only_the_blocks_after_they_are_inserted(detector):
    images = detector.frame_input(textured_frames(2))
    width, k = detector.vision.width, detector.config.n_prompts
    prompts = torch.randn(2, 2, k, width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = (detector.vision.stage_tokens(images, p) for p in prompts)
    assert torch.equal(a[0], b[0])  # block 1 runs before any prompt
    assert all((x - y).abs().max() > 1e-4 for x, y in zip(a[1:], b[1:]))


def test_self_prompts_are_appended_before_the_first_prompt_block_set_again_before_the_next_and_dropped_after(config):
    """Eq. 18 as the VPT reading: the tokens each block is fed (4 blocks, prompts in blocks 2 and 3)."""
    detector = build_detector(config.model_copy(update={"prompt_blocks": [2, 3]}))
    images = detector.frame_input(textured_frames(1))
    k, n = config.n_prompts, 1 + detector.grid**2
    prompts = torch.randn(1, k, detector.vision.width, generator=torch.Generator().manual_seed(0))
    fed: list[torch.Tensor] = []
    hooks = [block.register_forward_pre_hook(lambda _, args: fed.append(args[0].clone()))
             for block in detector.vision.visual.transformer.resblocks]
    try:
        with torch.no_grad():
            detector.vision.stage_tokens(images, prompts)
    finally:
        for hook in hooks:
            hook.remove()
    assert [x.shape[1] for x in fed] == [n, n + k, n + k, n]
    assert torch.equal(fed[1][:, n:], prompts) and torch.equal(fed[2][:, n:], prompts)  # block 2's outputs overwritten


def test_the_score_and_map_are_the_stage_probabilities_averaged_the_map_upsampled(detector, monkeypatch):
    """Eq. 14: stage s's patches all at P_a = p_s and its class token at c_s give the image score
    mean_s c_s and a map equal to mean_s p_s everywhere."""
    grid, patch_p, class_p = detector.grid, [0.2, 0.4, 0.6, 0.9], [0.1, 0.3, 0.5, 0.7]

    def logits(p):  # two-class logits whose softmax gives P_a = p
        return [0.0, math.log(p / (1 - p))]

    fixed = torch.tensor([[[logits(c)] + [logits(p)] * grid**2] for c, p in zip(class_p, patch_p)])  # 4 x 1 x (1 + P) x 2
    monkeypatch.setattr(detector.heads, "stage_logits", lambda *args: fixed)
    result = detector.step(textured_frames(1)[0])
    assert result.score == pytest.approx(np.mean(class_p))
    assert result.parts["stage_scores"] == pytest.approx(class_p)
    assert np.allclose(result.anomaly_map, np.mean(patch_p), atol=1e-6) and result.anomaly_map.shape == (224, 224)


def test_the_detector_keeps_no_state_and_any_order_gives_the_same_results(detector):
    frames = textured_frames(6)
    forward = [detector.step(f) for f in frames]
    backward = [detector.step(f) for f in reversed(frames)][::-1]
    batched = [detector.step_features(x) for x in detector.encode(frames)]  # a replay's backbone batch
    for one, other, batch in zip(forward, backward, batched):
        assert one.score == other.score == batch.score
        assert np.array_equal(one.anomaly_map, other.anomaly_map) and np.array_equal(one.anomaly_map, batch.anomaly_map)
    assert forward[0].anomaly_map.shape == (224, 224) and forward[0].anomaly_map.dtype == np.float32
    assert forward[0].parts["patch_map"].shape == (14, 14) and len(forward[0].parts["stage_scores"]) == 4
    assert forward[0].score == pytest.approx(np.mean(forward[0].parts["stage_scores"]))
    assert detector.state_dict() == {}
    detector.load_state_dict({})
    with pytest.raises(ValueError, match="keeps no stream state.*images_seen"):
        detector.load_state_dict({"images_seen": torch.tensor(3)})
    assert len({round(r.score, 9) for r in forward}) > 1  # the frames get different scores


def test_the_product_name_changes_the_prompts(config, detector):
    other = build_detector(config.model_copy(update={"product": "metal nut"}))
    assert not torch.equal(other.text, detector.text)
    frame = textured_frames(1)[0]
    assert other.step(frame).score != detector.step(frame).score


def test_a_checkpoint_loads_back_bitwise_and_bad_ones_name_the_problem(config, detector, tmp_path):
    heads = AFRCLIPHeads(detector.vision.width, 64, 512, 4, config.n_prompts)  # rareclip-tiny: D 64; resnet18: 512
    shape = config.heads_shape(detector.vision.width, 64, 512)
    save_checkpoint(heads, shape, tmp_path / "afr.pth")
    saved = torch.load(tmp_path / "afr.pth", weights_only=True)
    assert set(saved) == {"config", "state_dict"} and saved["config"] == shape
    prefixes = {k.rsplit(".", 1)[0] for k in saved["state_dict"]}
    assert prefixes == ({f"visual_adapters.{s}" for s in range(4)} | {"text_adapter", "cmfr.conv1", "cmfr.conv2",
                        "cmfr.linear", "sp"} | {f"sp.proj.{k}" for k in range(5)})
    loaded = build_detector(config.model_copy(update={"weights": str(tmp_path / "afr.pth")}))
    for key, value in heads.state_dict().items():
        assert torch.equal(loaded.heads.state_dict()[key], value), key
    frame = textured_frames(1)[0]
    assert loaded.step(frame).score != detector.step(frame).score

    with pytest.raises(ConfigError, match="detector.weights: no file at"):
        build_detector(config.model_copy(update={"weights": str(tmp_path / "missing.pth")}))
    torch.save({"trainable_linearlayer": {}}, tmp_path / "foreign.pth")
    with pytest.raises(ConfigError, match="not an AFR-CLIP checkpoint"):
        build_detector(config.model_copy(update={"weights": str(tmp_path / "foreign.pth")}))
    three = AFRCLIPHeads(detector.vision.width, 64, 512, 4, 3)
    save_checkpoint(three, config.model_copy(update={"n_prompts": 3}).heads_shape(detector.vision.width, 64, 512),
                    tmp_path / "three.pth")
    with pytest.raises(ConfigError, match=r"missing keys \['sp.proj.3.bias'.*'n_prompts': \(3, 5\)"):
        build_detector(config.model_copy(update={"weights": str(tmp_path / "three.pth")}))


def test_the_cnn_loads_a_local_state_dict_and_refuses_a_foreign_one(config, tmp_path):
    from rareclip_core.detectors.afrclip.cnn import build_cnn

    source, dim = build_cnn(config.model_copy(update={"seed": 7}))  # random resnet18 weights, another seed
    assert dim == 512
    state = dict(source.state_dict())
    state.update({"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)})  # a full classifier's file
    torch.save(state, tmp_path / "resnet18.pth")
    loaded, _ = build_cnn(config.model_copy(update={"cnn_weights": str(tmp_path / "resnet18.pth")}))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in source.state_dict().items())
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "foreign.pth")
    with pytest.raises(ConfigError, match="detector.cnn_weights .*foreign.pth' does not fit detector.cnn"):
        build_cnn(config.model_copy(update={"cnn_weights": str(tmp_path / "foreign.pth")}))
