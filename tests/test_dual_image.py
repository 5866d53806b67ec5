"""Dual-Image CLIP (kind dual_image) on the tiny random model: prompts, the text-only first frame,
the visual reference, the bank and its draws, bitwise state round trips, batch invariance,
pseudo-anomalies and the test-time adapter."""
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load, save

from configs.pipeline import PipelineConfig
from rareclip_core import ConfigError, build_detector, detector_config_from_dict, detector_config_from_yaml
from rareclip_core.detectors.dual_image.adapter import adapt
from rareclip_core.detectors.dual_image.config import DualImageConfig
from rareclip_core.detectors.dual_image.prompts import state_sentences
from rareclip_core.detectors.dual_image.pseudo_anomaly import synthesize
from rareclip_core.detectors.dual_image.reference_bank import ReferenceBank
from rareclip_core.detectors.dual_image.text import abnormal_probability
from tests.conftest import REPO, textured_frames

TINY = REPO / "configs" / "detector-dual-image-tiny.yaml"


@pytest.fixture(scope="module")
def dual_config(tmp_path_factory):
    config = detector_config_from_yaml(TINY)
    return config.model_copy(update={"text_cache_dir": str(tmp_path_factory.mktemp("dual-text"))})


@pytest.fixture(scope="module")
def stream():
    return textured_frames(10, seed=3, size=(120, 150))


def smoothed_max(grid_map: np.ndarray) -> float:
    """The 3 x 3 mean with replicate padding, then the maximum (by hand, in float64)."""
    padded = np.pad(grid_map.astype(np.float64), 1, mode="edge")
    g = grid_map.shape[0]
    return max(padded[y : y + 3, x : x + 3].mean() for y in range(g) for x in range(g))


def test_defaults_are_the_papers_and_files_load(dual_config):
    paper = detector_config_from_yaml(REPO / "configs" / "detector-dual-image.yaml")
    assert isinstance(paper, DualImageConfig) and paper == DualImageConfig()
    assert (paper.model, paper.pretrained, paper.image_size) == ("ViT-B-16-plus-240", "laion400m_e32", 240)
    assert (paper.tta_steps, paper.references_per_frame, paper.value_value_from) == (2, 1, 1)
    assert dual_config.model_id.startswith("dual_image:rareclip-tiny:random:")
    with pytest.raises(ConfigError, match="reference_policy"):
        detector_config_from_dict({"kind": "dual_image", "reference_policy": "newest"})
    with pytest.raises(ConfigError, match="value_value_from = 9, but model 'rareclip-tiny' has 4 blocks"):
        detector_config_from_dict({**dual_config.model_dump(), "value_value_from": 9})


def test_prompts_are_class_aware(tmp_path):
    normal, abnormal = (state_sentences("metal disc", False, a) for a in (False, True))
    assert len(normal) == len(abnormal) == 462 and all("metal disc" in s for s in normal + abnormal)
    assert normal[:2] == ["a cropped industrial photo of the normal metal disc", "a cropped industrial photo of the flawless metal disc"]
    assert "an industrial image of a small damaged metal disc" in abnormal
    texture = state_sentences("carpet", True, True)
    assert "a surface picture of the carpet with flaw for anomaly detection" in texture
    assert not any("manufacturing" in s for s in texture)
    # the per-line product name is a line_detector setting
    cfg = PipelineConfig.from_dict({"detector": {"kind": "dual_image"}, "source": {"kind": "folder", "root": str(tmp_path)},
                                    "line_detector": {"b": {"product": "bottle"}}})
    assert cfg.detector_for("a").product == "object" and cfg.detector_for("b").product == "bottle"


def test_first_frame_is_scored_by_text_alone_then_by_a_reference(dual_config, stream):
    detector = build_detector(dual_config.model_copy(update={"tta_steps": 0}))
    first = detector.step(stream[0])
    assert first.parts["visual_map"] is None and first.parts["reference_frames"] == []
    np.testing.assert_array_equal(first.parts["joint_map"], first.parts["text_map"])
    expected = 0.5 * first.parts["text_score"] + 0.5 * smoothed_max(first.parts["text_map"])
    assert first.score == pytest.approx(expected, abs=1e-6)
    assert first.anomaly_map.shape == (224, 224)
    # the same frame again: its only reference is itself, every patch has an identical twin
    again = detector.step(stream[0])
    assert again.parts["reference_frames"] == [0]
    np.testing.assert_allclose(again.parts["visual_map"], 0, atol=1e-6)
    np.testing.assert_allclose(again.parts["joint_map"], 0.5 * again.parts["text_map"], atol=1e-6)
    # a different frame: 1 - the best cosine to any of the reference's patches, by hand
    third = detector.step(stream[1])
    assert third.parts["reference_frames"] in ([0], [1])  # both are stream[0]
    query, reference = (F.normalize(f.tokens, dim=-1).double() for f in detector.encode([stream[1], stream[0]]))
    expected_visual = (1 - (query @ reference.T).max(dim=1).values).view(14, 14).numpy()
    np.testing.assert_allclose(third.parts["visual_map"], expected_visual, atol=1e-5)


def test_the_bank_keeps_the_newest_and_draws_by_policy():
    bank = ReferenceBank(capacity=3)
    for frame, score in enumerate([0.9, 0.2, 0.5, 0.7, 0.1]):
        bank.add(torch.full((2, 4), float(frame)), torch.zeros(3, 8, 8, dtype=torch.uint8), score, frame)
    assert bank.frames == [2, 3, 4] and bank.scores == [0.5, 0.7, 0.1]
    generator = torch.Generator().manual_seed(0)
    assert bank.draw(2, "lowest_score", generator) == [2, 0]  # scores 0.1, 0.5
    draws = [tuple(bank.draw(2, "uniform", generator)) for _ in range(60)]
    assert all(len(set(d)) == 2 and set(d) <= {0, 1, 2} for d in draws) and len(set(draws)) == 6
    assert bank.memory([2, 0]).shape == (4, 4) and float(bank.memory([2, 0])[0, 0]) == 4.0
    restored = ReferenceBank(capacity=3)
    restored.load_state_dict(bank.state_dict(), torch.device("cpu"))
    assert (restored.frames, restored.scores) == (bank.frames, bank.scores)
    with pytest.raises(ValueError, match="bank_size is 2"):
        ReferenceBank(capacity=2).load_state_dict(bank.state_dict(), torch.device("cpu"))


def test_a_restored_line_continues_bitwise(dual_config, stream):
    """State = bank, frame count and RNG state: through safetensors bytes into a fresh detector,
    the next frames draw the same references and pseudo-anomalies, with the same scores and maps."""
    config = dual_config.model_copy(update={"bank_size": 3, "references_per_frame": 2})
    original = build_detector(config)
    for frame in stream[:5]:
        original.step(frame)
    state = load(save(original.state_dict()))
    assert set(state) == {"frames_seen", "rng_state", "bank.tokens", "bank.images", "bank.scores", "bank.frames"}
    assert state["bank.tokens"].shape == (3, 196, 64) and state["bank.frames"].tolist() == [2, 3, 4]
    restored = build_detector(config)
    restored.load_state_dict(state)
    for frame in stream[5:]:
        a, b = original.step(frame), restored.step(frame)
        assert a.score == b.score and np.array_equal(a.anomaly_map, b.anomaly_map)
        assert a.parts["reference_frames"] == b.parts["reference_frames"] and a.parts["tta_losses"] == b.parts["tta_losses"]
    restored.reset()
    fresh = build_detector(config)
    assert restored.step(stream[0]).score == fresh.step(stream[0]).score
    with pytest.raises(ValueError, match="another model or image_size"):
        build_detector(config.model_copy(update={"image_size": 192})).load_state_dict(state)


def test_a_frame_gets_the_same_features_alone_or_in_a_batch(dual_config, stream):
    detector = build_detector(dual_config)
    batch = detector.encode(stream[:3])
    for frame, together in zip(stream[:3], batch):
        alone = detector.encode([frame])[0]
        assert torch.equal(alone.tokens, together.tokens) and torch.equal(alone.embedding, together.embedding)


def test_pseudo_anomalies_change_only_masked_pixels():
    generator = torch.Generator().manual_seed(5)
    image = torch.from_numpy(textured_frames(1, size=(224, 224))[0]).permute(2, 0, 1)
    pseudo = synthesize(image, None, 14, 0.8, generator)
    outside = pseudo.mask[0] == 0
    assert torch.equal(pseudo.image[:, outside], image[:, outside].float() / 255)
    assert bool((pseudo.image[:, ~outside] != image[:, ~outside].float() / 255).any())
    coverage = F.adaptive_avg_pool2d(pseudo.mask[None], 14)[0, 0].flatten()
    assert torch.equal(pseudo.patches, coverage > 0.5) and bool(pseudo.patches.any())
    again = synthesize(image, None, 14, 0.8, torch.Generator().manual_seed(5))
    assert torch.equal(again.image, pseudo.image)


def test_tta_loss_falls_and_lifts_the_pseudo_anomalous_patches(dual_config):
    """On a frame and ten pseudo-anomalous copies (fixed seeds): the loss falls at every step
    (defaults: 2 AdamW steps), and training raises the adapted abnormal score on the
    pseudo-anomalous patches more than on the others (L_mask's purpose), against the same
    adapter untrained. (Whether that carries over to a real defect needs real CLIP weights:
    with random ones it does not, see docs/algorithms/dual-image-clip.md.)"""
    detector = build_detector(dual_config)
    frames = textured_frames(2, seed=1, size=(224, 224))
    features = detector.encode([frames[0]])[0]
    texture = torch.from_numpy(frames[1]).permute(2, 0, 1)
    target = abnormal_probability(F.normalize(features.tokens, dim=-1), detector.text, dual_config.temperature)
    settings = detector.adaptation
    margins = []
    for seed in range(10):
        generator = torch.Generator().manual_seed(seed)
        pseudo = synthesize(features.image, texture, 14, 0.8, generator)
        _, pseudo_tokens = detector._forward(pseudo.image[None])
        state = generator.get_state()
        trained = adapt(features.tokens, pseudo_tokens[0], pseudo.patches, target, detector.text, settings, generator)
        assert len(trained.losses) == settings.steps + 1 == 3
        assert all(later < earlier for earlier, later in zip(trained.losses, trained.losses[1:])), trained.losses
        generator.set_state(state)  # the same adapter, untrained
        untrained = adapt(features.tokens, pseudo_tokens[0], pseudo.patches, target, detector.text,
                          replace(settings, steps=0), generator)
        assert untrained.losses == trained.losses[:1]

        def pseudo_scores(adapter):
            with torch.no_grad():
                return abnormal_probability(F.normalize(adapter(pseudo_tokens[0]), dim=-1), detector.text, settings.temperature)

        rise = pseudo_scores(trained.adapter) - pseudo_scores(untrained.adapter)
        margins.append(float(rise[pseudo.patches].mean() - rise[~pseudo.patches].mean()))
    assert sum(m > 0 for m in margins) >= 8 and np.mean(margins) > 0.01, margins


def test_evaluate_names_each_category_in_the_prompts(dual_config, tiny_config):
    from pipelines.evaluate import category_settings

    assert category_settings(dual_config, "metal_nut") == {"product": "metal nut", "is_texture": False}
    assert category_settings(dual_config, "carpet") == {"product": "carpet", "is_texture": True}
    assert category_settings(tiny_config, "carpet") == {}  # RareCLIP's prompts are category-agnostic


def test_a_step_under_inference_mode_adapts_the_same(dual_config, stream):
    """Callers may wrap steps in torch.inference_mode: TTA still trains, with the same result."""
    plain, inside = build_detector(dual_config), build_detector(dual_config)
    for frame in stream[:3]:
        expected = plain.step(frame)
        with torch.inference_mode():
            got = inside.step(frame)
        assert got.score == expected.score and got.parts["tta_losses"] == expected.parts["tta_losses"]
