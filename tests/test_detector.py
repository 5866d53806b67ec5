"""The RareCLIPDetector end to end on the tiny random-weight model (CPU)."""
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from rareclip_core.backbone import backbone_dtype
from rareclip_core.config import ConfigError
from rareclip_core.detectors.rareclip.config import RareCLIPConfig
from rareclip_core.detectors.rareclip.detector import RareCLIPDetector
from rareclip_core.detectors.rareclip.text_branch import TPB_CHECKPOINT_KEY
from rareclip_core.ops.compiled import compile_problem
from rareclip_core.registry import detector_config_from_dict


def run(detector, frames, **kw):
    return [detector.step(f, **kw) for f in frames]


def test_tiny_model_steps_end_to_end(tiny_config, frames):
    det = RareCLIPDetector(tiny_config)
    results = run(det, frames[:6])
    first, later = results[0], results[-1]
    assert first.anomaly_map.shape == (224, 224) and first.anomaly_map.dtype == np.float32
    assert first.parts["rarity_map"] is None and first.parts["image_rarity"] is None and first.parts["images_seen"] == 0
    assert later.parts["rarity_map"].shape == (14, 14) and later.parts["images_seen"] == 5
    assert all(np.isfinite(r.score) for r in results)
    assert det.images_seen == 6
    # a PIL image of another size and mode goes through the same preprocessing
    gray = Image.fromarray(frames[0][:, :, 0]).resize((90, 70))
    assert det.step(gray).anomaly_map.shape == (224, 224)


def test_score_is_rescored_preliminary_until_enough_images(tiny_config, frames):
    # more than 3 images remembered (itself included): the top min(ceil(n / 2), 9) neighbours
    det = RareCLIPDetector(tiny_config.model_copy(update={"rescore_min_images": 3, "rescore_divisor": 2}))
    results = run(det, frames[:5])
    assert [r.score == r.parts["preliminary_score"] for r in results[:3]] == [True, True, True]
    assert results[-1].score != results[-1].parts["preliminary_score"]
    scores = [r.parts["preliminary_score"] for r in results]
    assert min(scores) <= results[-1].score <= max(scores)


def test_state_round_trip_is_bitwise(tiny_config, frames, tmp_path):
    uninterrupted = run(RareCLIPDetector(tiny_config), frames[:20])
    first = RareCLIPDetector(tiny_config)
    run(first, frames[:10])
    save_file(first.state_dict(), str(tmp_path / "state.safetensors"))
    second = RareCLIPDetector(tiny_config)
    second.load_state_dict(load_file(str(tmp_path / "state.safetensors")))
    resumed = run(second, frames[10:20])
    for a, b in zip(uninterrupted[10:], resumed):
        assert a.score == b.score
        assert np.array_equal(a.anomaly_map, b.anomaly_map)


def test_offline_mode_is_order_free(tiny_config, frames):
    online = RareCLIPDetector(tiny_config)
    run(online, frames[:8])
    state = online.state_dict()
    offline = RareCLIPDetector(tiny_config.model_copy(update={"mode": "offline"}))
    offline.load_state_dict(state)
    batch = frames[8:16]
    forward = run(offline, batch)
    order = [5, 2, 7, 0, 3, 6, 1, 4]
    permuted = run(offline, [batch[i] for i in order])
    for j, i in enumerate(order):
        assert permuted[j].score == forward[i].score
        assert np.array_equal(permuted[j].anomaly_map, forward[i].anomaly_map)
    after = offline.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


def test_fresh_offline_detector_is_text_only(tiny_config, frames):
    det = RareCLIPDetector(tiny_config.model_copy(update={"mode": "offline"}))
    a, b = run(det, frames[:2])
    assert a.parts["rarity_map"] is None and b.parts["rarity_map"] is None and det.images_seen == 0


def test_tpb_checkpoint_in_authors_format_changes_text_maps(tiny_config, frames, tmp_path):
    det = RareCLIPDetector(tiny_config)
    state = {k: torch.randn_like(v) for k, v in det.text_projection.state_dict().items()}
    assert sorted(state) == sorted(f"fc.{i}.{p}" for i in range(4) for p in ("weight", "bias"))
    assert state["fc.0.weight"].shape == (64, 64)  # D x C
    path = tmp_path / "tpb.pth"
    torch.save({TPB_CHECKPOINT_KEY: state}, path)
    trained = RareCLIPDetector(tiny_config.model_copy(update={"tpb_weights": str(path)}))
    assert torch.equal(trained.text_projection.fc[2].weight, state["fc.2.weight"])
    plain, loaded = det.step(frames[0]), trained.step(frames[0])
    assert not np.allclose(plain.parts["text_map"], loaded.parts["text_map"])
    assert plain.parts["text_score"] == loaded.parts["text_score"]  # c_text does not use the layers


def test_tpb_checkpoint_errors_name_the_problem(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match="tpb_weights"):
        RareCLIPDetector(tiny_config.model_copy(update={"tpb_weights": str(tmp_path / "nope.pth")}))
    bad = tmp_path / "bad.pth"
    torch.save({TPB_CHECKPOINT_KEY: {"fc.0.weight": torch.zeros(3, 3)}}, bad)
    with pytest.raises(ConfigError, match="do not fit"):
        RareCLIPDetector(tiny_config.model_copy(update={"tpb_weights": str(bad)}))


def test_kshot_references_are_memorized_without_a_score(tiny_config, frames):
    det = RareCLIPDetector(tiny_config)
    assert det.add_normal_references(frames[:4]) is None
    assert det.n_references == 4 and det.images_seen == 4
    # 4 x 196 features > N_F = 588, and more than min(196 * 4 // 4, 588) = 196 references, so they
    # competed: SCS kept 588 features, all of them references (the only features so far)
    assert det.banks.n_reference.tolist() == [588] * 8
    result = det.step(frames[4])
    assert result.parts["images_seen"] == 4 and result.parts["rarity_map"] is not None and np.isfinite(result.score)
    with pytest.raises(ValueError, match="before the line's first frame"):
        det.add_normal_references(frames[:1])


@pytest.mark.parametrize(
    "variant,references",
    [({"rarity_branch": "dprb"}, 0), ({"rarity_branch": "dprb"}, 2), ({}, 2), ({"sampler": "greedy"}, 0), ({"sampler": "random"}, 1)],
)
def test_variants_run_and_round_trip(tiny_config, frames, variant, references, tmp_path):
    cfg = tiny_config.model_copy(update=variant)
    det = RareCLIPDetector(cfg)
    det.add_normal_references(frames[20 : 20 + references])
    run(det, frames[:5])
    save_file(det.state_dict(), str(tmp_path / "state.safetensors"))
    copy = RareCLIPDetector(cfg)
    copy.load_state_dict(load_file(str(tmp_path / "state.safetensors")))
    a, b = det.step(frames[5]), copy.step(frames[5])
    assert a.score == b.score and np.array_equal(a.anomaly_map, b.anomaly_map)


def test_config_rejects_bad_values_naming_the_field(tmp_path):
    with pytest.raises(ConfigError, match="rarity_ratio"):
        RareCLIPConfig.from_dict({"rarity_ratio": 1.5})
    with pytest.raises(ConfigError, match="max_featurs"):
        RareCLIPConfig.from_dict({"max_featurs": 10})
    path = tmp_path / "d.yaml"
    path.write_text("detector:\n  blur_kernel: 4\n")
    with pytest.raises(ConfigError, match="blur_kernel"):
        RareCLIPConfig.from_yaml(path, section="detector")
    assert RareCLIPConfig().max_features == 4107 and RareCLIPConfig().image_size == 518


def test_missing_weights_give_a_clear_error(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match="detector.pretrained"):
        RareCLIPDetector(tiny_config.model_copy(update={"pretrained": str(tmp_path / "vit.pt")}))


def test_blocks_beyond_the_model_are_rejected(tiny_config):
    for name in ("rarity_blocks", "text_blocks"):
        with pytest.raises(ConfigError, match=rf"{name} = \[1, 5\], but model 'rareclip-tiny' has 4 blocks"):
            detector_config_from_dict({**tiny_config.model_dump(), name: [1, 5]})


@pytest.mark.parametrize(
    "image,message",
    [
        (np.zeros((10, 10, 3), dtype=np.float32), "uint8"),
        (np.zeros((10, 10, 5), dtype=np.uint8), "shape"),
        (Image.new("I;16", (20, 20)), "16-bit"),
        ("frame.png", "PIL image"),
    ],
)
def test_bad_images_are_rejected_with_a_reason(tiny_config, image, message):
    det = RareCLIPDetector(tiny_config)
    with pytest.raises((ValueError, TypeError), match=message):
        det.step(image)
    assert det.images_seen == 0


def test_batched_backbone_equals_frame_by_frame(tiny_config, frames):
    det = RareCLIPDetector(tiny_config)
    single = [det.encode([f])[0] for f in frames[:5]]
    batch = det.encode(frames[:5])
    for a, b in zip(single, batch):
        assert torch.equal(a.embedding, b.embedding)
        assert all(torch.equal(a.tokens[k], b.tokens[k]) for k in a.tokens)


def test_backbone_precision_auto_is_half_on_cuda_only(tiny_config):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert backbone_dtype("auto", cpu) == torch.float32
    assert backbone_dtype("auto", cuda) == torch.float16
    assert backbone_dtype("bf16", cpu) == torch.bfloat16 and backbone_dtype("fp32", cuda) == torch.float32
    assert RareCLIPConfig().precision == "auto"
    assert RareCLIPDetector(tiny_config).backbone.dtype == torch.float32  # the tiny config runs on CPU


def test_the_text_cache_keeps_random_models_of_other_image_sizes_apart(tiny_config, tmp_path):
    """Seeded random weights depend on the image size (the text tower is drawn after the vision
    tower): a cache shared by two sizes must give each its own text embeddings."""
    for size in (224, 112):
        cfg = tiny_config.model_copy(update={"image_size": size, "text_cache_dir": str(tmp_path)})
        cached = RareCLIPDetector(cfg).text_features
        fresh = RareCLIPDetector(cfg.model_copy(update={"text_cache_dir": None})).text_features
        assert torch.equal(cached, fresh), size


# torch.compile writes C++ kernels on the CPU (the CI machine has g++)
needs_a_compiler = pytest.mark.skipif(bool(compile_problem(torch.device("cpu"))), reason="no C++ compiler for torch.compile")


def eager_and_compiled_lines(tiny_config):
    """Two lines whose banks are full after 8 frames (N_I,max = 8; N_F = 300 < 8 M), the second
    with compile_banks."""
    small = tiny_config.model_copy(update={"max_features": 300, "max_images": 8, "image_memory_size": 12})
    return RareCLIPDetector(small), RareCLIPDetector(small.model_copy(update={"compile_banks": True}))


@needs_a_compiler
def test_compiled_banks_score_as_eager_ones_with_one_graph_compiled_ahead(tiny_config, frames):
    # banks full after 8 frames (N_I,max = 8; N_F = 300 < 8 M): every later step goes through the
    # compiled bank stack, captured whole (fullgraph) and compiled once, when the detector is
    # built, for the whole stream, a line restored from a snapshot included
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]
    before = graphs["unique_graphs"]
    eager, compiled = eager_and_compiled_lines(tiny_config)
    assert graphs["unique_graphs"] - before == 1 and not compiled.banks.is_full
    through_the_graph = []

    def counted(banks):
        graph = banks._compiled_score
        banks._compiled_score = lambda *args: through_the_graph.append(len(through_the_graph)) or graph(*args)

    counted(compiled.banks)
    for i, frame in enumerate(frames):
        if i == 16:
            restored = RareCLIPDetector(compiled.config)
            restored.load_state_dict(compiled.state_dict())
            compiled = restored
            counted(compiled.banks)
        a, b = eager.step(frame), compiled.step(frame)
        assert abs(a.score - b.score) < 1e-6 and np.abs(a.anomaly_map - b.anomaly_map).max() < 1e-5, i
    assert len(through_the_graph) == 16  # frames 8 to 23
    assert compiled.banks.compiles and graphs["unique_graphs"] - before == 1
    # the same features kept (SCS chose the same ones), so the state matches
    for key, value in eager.state_dict().items():
        other = compiled.state_dict()[key]
        assert torch.allclose(value.double(), other.double(), atol=1e-6), key


@needs_a_compiler
def test_a_k_shot_line_compiles_its_banks_again_when_given_references(tiny_config, frames):
    torch._dynamo.reset()
    eager, compiled = eager_and_compiled_lines(tiny_config)
    graphs = torch._dynamo.utils.counters["stats"]
    built = graphs["unique_graphs"]
    for line in (eager, compiled):
        line.add_normal_references(frames[:2])
    assert graphs["unique_graphs"] - built == 1  # the graph with the k-shot map
    for i, frame in enumerate(frames[2:14]):
        a, b = eager.step(frame), compiled.step(frame)
        assert abs(a.score - b.score) < 1e-6 and np.abs(a.anomaly_map - b.anomaly_map).max() < 1e-5, i
    assert compiled.banks.is_full and compiled.banks.has_references and graphs["unique_graphs"] - built == 1


def test_compile_banks_is_refused_where_it_does_not_apply(tiny_config):
    with pytest.raises(ValueError, match="compile_banks compiles the IPRB banks with the scs sampler"):
        RareCLIPConfig(compile_banks=True, rarity_branch="dprb")
    with pytest.raises(ValueError, match="compile_banks"):
        RareCLIPConfig(compile_banks=True, sampler="greedy")


def test_compile_banks_without_a_compiler_is_refused_before_the_model_loads(tiny_config, monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    with pytest.raises(ValueError, match=r"detector.compile_banks: .*C\+\+ compiler.*/nonexistent/g\+\+ not found.*set compile_banks: false"):
        RareCLIPDetector(tiny_config.model_copy(update={"compile_banks": True}))


@needs_a_compiler
def test_banks_that_cannot_be_compiled_warn_once_and_go_on_eagerly(tiny_config, frames, monkeypatch):
    eager, compiled = eager_and_compiled_lines(tiny_config)
    calls = []

    def refuse(*args):
        calls.append(args)
        raise torch._dynamo.exc.Unsupported("an op the compiler does not know")

    monkeypatch.setattr(compiled.banks, "_compiled_score", refuse)
    with pytest.warns(RuntimeWarning, match="could not be compiled, so it runs eagerly.*an op the compiler does not know"):
        for frame in frames[:12]:
            assert eager.step(frame).score == compiled.step(frame).score
    assert len(calls) == 1 and not compiled.banks.compiles


def test_rescoring_is_eq_22_by_hand():
    """Two remembered images, one LAIF block each equal to the embedding: e1 = (1, 0) with
    c = 1, e2 = (0.6, 0.8) with c = 0; the test image e = (1, 0) with c_test = 0.5."""
    from rareclip_core.detectors.rareclip.image_memory import ImageMemory, RescoreSettings

    memory = ImageMemory(capacity=4)
    for embedding, score in (((1.0, 0.0), 1.0), ((0.6, 0.8), 0.0)):
        e = torch.tensor(embedding)
        memory.add(e, e[None], score)
    e = torch.tensor([1.0, 0.0])
    got = memory.rescore(e, e[None], 0.5, RescoreSettings(min_images=0, divisor=1, max_neighbors=3, temperature=1.0))
    # similarities 1 + 1 = 2, 0.6 + 0.6 = 1.2, itself 1 + 1 = 2; over their max: 1, 0.6, 1
    expected = (1.0 * math.e + 0.0 * math.exp(0.6) + 0.5 * math.e) / (2 * math.e + math.exp(0.6))
    assert float(got) == pytest.approx(expected, abs=1e-6)
    # the 2 nearest only (divisor 2: ceil(3 / 2) = 2): e1 and itself, equal weights
    two = memory.rescore(e, e[None], 0.5, RescoreSettings(min_images=0, divisor=2, max_neighbors=3, temperature=1.0))
    assert float(two) == pytest.approx(0.75, abs=1e-6)
