"""Named OpenCLIP weights ('openai', ...) on a machine that cannot reach the Hugging Face Hub:
cached weights load without a single request, missing ones fail at once with the reason, and a
job names both them and unknown tags before it starts."""
import logging
import socket
import warnings
from pathlib import Path

import huggingface_hub.constants
import open_clip
import open_clip.pretrained
import pytest
import torch
from safetensors.torch import save_file

from pipelines.preflight import job_problems
from rareclip_core.backbone import hub_access
from rareclip_core.backbone.clip import create_clip_model, hub_holds_another_tag, uses_quick_gelu
from rareclip_core.backbone.hub_access import hub_unreachable
from rareclip_core.backbone.text_cache import weights_identity
from rareclip_core.config import ConfigError
from rareclip_core.registry import detector_config_from_dict, detector_config_from_yaml
from tests.pipeline_helpers import line_frames, pipeline_config, write_folder

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_at(monkeypatch, port: int) -> None:
    """Downloads from the Hub go to 127.0.0.1:`port`, without a proxy."""
    template = f"http://127.0.0.1:{port}/{{repo_id}}/resolve/{{revision}}/{{filename}}"
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    for name in ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def closed_port():
    """A loopback port nothing listens on (a connection is refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def offline_hub(monkeypatch, tmp_path, closed_port, tiny_config):
    """The Hub at a port nothing answers on, a private cache, and a tag 'cached' of the tiny model
    whose weights are in the cache."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    hub_at(monkeypatch, closed_port)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    tags = {"cached": {"hf_hub": "local/tiny-cached/"}, "missing": {"hf_hub": "local/tiny-missing/"}}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, tiny_config.model, tags)
    repo = tmp_path / "hub" / "models--local--tiny-cached"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    weights = create_clip_model(tiny_config.model_copy(update={"seed": 7})).state_dict()
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, repo / "snapshots" / COMMIT / "open_clip_model.safetensors")
    return weights


def test_an_unreachable_hub_is_named_with_the_reason(monkeypatch, closed_port):
    hub_at(monkeypatch, closed_port)
    assert hub_unreachable() == f"127.0.0.1:{closed_port}: Connection refused"
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        hub_at(monkeypatch, server.getsockname()[1])
        assert hub_unreachable() is None


def test_cached_named_weights_load_without_asking_the_hub(offline_hub, tiny_config, caplog):
    with caplog.at_level(logging.WARNING):
        model = create_clip_model(tiny_config.model_copy(update={"pretrained": "cached"}))
    assert all(torch.equal(value, offline_hub[key]) for key, value in model.state_dict().items())
    assert not [r for r in caplog.records if r.name.startswith("huggingface_hub")]  # no request, no retry
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False  # offline only while loading


def test_missing_named_weights_fail_at_once_and_say_why(offline_hub, tiny_config, closed_port, caplog):
    with caplog.at_level(logging.WARNING), pytest.raises(ConfigError) as failure:
        create_clip_model(tiny_config.model_copy(update={"pretrained": "missing"}))
    assert f"the Hub cannot be reached (127.0.0.1:{closed_port}: Connection refused)" in str(failure.value)
    assert "set detector.pretrained to its local file path" in str(failure.value)
    assert not [r for r in caplog.records if r.name.startswith("huggingface_hub")]
    assert not [r for r in caplog.records if "open_clip" in r.pathname]  # its "Failed to download" only repeats the cause


def test_what_open_clip_logs_while_weights_load_is_passed_on(monkeypatch, tiny_config, tmp_path, caplog):
    checkpoint = tmp_path / "tiny.safetensors"
    save_file({"x": torch.zeros(1)}, checkpoint)
    built = open_clip.create_model(tiny_config.model, pretrained=None)  # at its native size: nothing to resize

    def create_model(*args, **kwargs):
        logging.warning("Model %s initialized partially.", tiny_config.model)
        return built

    monkeypatch.setattr(open_clip, "create_model", create_model)
    caplog.clear()  # OpenCLIP's own line for `built`'s random weights
    with caplog.at_level(logging.WARNING):
        assert create_clip_model(tiny_config.model_copy(update={"pretrained": str(checkpoint)})) is built
    assert [r.getMessage() for r in caplog.records] == [f"Model {tiny_config.model} initialized partially."]


def test_the_preflight_names_unloadable_tags_asking_the_hub_once(offline_hub, tiny_config, closed_port, tmp_path,
                                                                monkeypatch):
    for line in ("a", "b", "c"):
        write_folder(tmp_path / "src", line, line_frames(7, 1))
    probes = []
    probe = hub_access.hub_unreachable
    monkeypatch.setattr(hub_access, "hub_unreachable", lambda: probes.append(1) or probe())

    def problems(tag: str) -> list[str]:
        detector = tiny_config.model_copy(update={"pretrained": tag})
        return job_problems(pipeline_config(detector, tmp_path / "src", tmp_path / "out"))

    assert problems("cached") == [] and len(probes) == 1  # one model and tag for the 3 lines
    [unreachable] = problems("missing")
    assert unreachable.startswith(f"could not load pretrained weights 'missing' for {tiny_config.model}: the Hub cannot be "
                                  f"reached (127.0.0.1:{closed_port}: Connection refused)")
    assert problems("cahced") == [f"detector.pretrained 'cahced' is not a weights tag of {tiny_config.model} (its tags: "
                                  "cached, missing); set a tag, a local checkpoint file, or null for random weights"]


def activations(model) -> set[str]:
    blocks = [*model.visual.transformer.resblocks, *model.transformer.resblocks]
    return {type(block.mlp.gelu).__name__ for block in blocks}


def test_weights_run_with_the_activation_they_were_trained_with(offline_hub, tiny_config, tmp_path):
    """OpenAI trained CLIP with QuickGELU, and OpenCLIP 3 builds GELU for its 'openai' tag unless
    asked (it only warns): a tag's own setting is followed, without that warning."""
    tags = open_clip.pretrained._PRETRAINED[tiny_config.model]
    tags["cached"]["quick_gelu"] = True
    as_trained = tiny_config.model_copy(update={"quick_gelu": None})  # RareCLIP's own default is GELU (its authors')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = create_clip_model(as_trained.model_copy(update={"pretrained": "cached"}))
    assert activations(model) == {"QuickGELU"}
    assert torch.equal(model.state_dict()["visual.proj"], offline_hub["visual.proj"])
    # a file of a model OpenAI published: QuickGELU unless told otherwise; random weights: the model's config
    checkpoint = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in offline_hub.items()}, checkpoint)
    tags["openai"] = {"hf_hub": "local/tiny-openai/", "quick_gelu": True}
    from_file = as_trained.model_copy(update={"pretrained": str(checkpoint)})
    assert activations(create_clip_model(from_file)) == {"QuickGELU"}
    assert activations(create_clip_model(from_file.model_copy(update={"quick_gelu": False}))) == {"GELU"}
    assert activations(create_clip_model(as_trained)) == {"GELU"}
    # the text cache tells the two activations apart
    assert weights_identity(from_file) != weights_identity(from_file.model_copy(update={"quick_gelu": False}))


def test_each_kind_runs_the_activation_its_authors_ran():
    """AdaptCLIP's authors hard-code QuickGELU (OpenAI's); RareCLIP's run OpenAI's weights resized to
    518 px through APRIL-GAN's OpenCLIP, which builds them with GELU (their TPB weights were trained
    so); Dual-Image's LAION weights were trained with GELU; AFR-CLIP (no code published): OpenAI's."""
    paper = detector_config_from_yaml(CONFIGS / "detector-paper.yaml")
    assert not uses_quick_gelu(paper)
    assert not uses_quick_gelu(paper.model_copy(update={"pretrained": "/weights/ViT-L-14-336.bin"}))
    assert uses_quick_gelu(paper.model_copy(update={"quick_gelu": None}))  # as OpenAI trained them
    for name in ("detector-adaptclip.yaml", "detector-afrclip.yaml"):
        assert uses_quick_gelu(detector_config_from_yaml(CONFIGS / name))
    assert not uses_quick_gelu(detector_config_from_yaml(CONFIGS / "detector-dual-image.yaml"))
    with pytest.raises(ConfigError, match="quick_gelu is false, but model 'ViT-L-14-quickgelu' is a QuickGELU model"):
        detector_config_from_dict({"kind": "adaptclip", "model": "ViT-L-14-quickgelu", "quick_gelu": False})
    # RareCLIP's false yields to the name, however it is given: as its default, or written out by a merge
    named = {"model": "ViT-L-14-quickgelu", "pretrained": None}
    assert uses_quick_gelu(detector_config_from_dict(named))
    assert uses_quick_gelu(detector_config_from_dict({**detector_config_from_dict(named).model_dump(), "max_images": 50}))


def test_runs_that_compute_what_they_did_before_the_setting_keep_their_snapshots_fingerprint():
    """RareCLIP computes GELU as every version did before `quick_gelu` existed: the same hash (its
    value at the commit before the setting), so a running plant's snapshots stay valid."""
    assert detector_config_from_yaml(CONFIGS / "detector-paper.yaml").model_copy(
        update={"text_cache_dir": None}).fingerprint() == detector_config_from_dict({"kind": "rareclip"}).fingerprint()
    assert detector_config_from_dict({"kind": "rareclip"}).fingerprint() == "343e623e2b2c14ce"
    as_trained = detector_config_from_dict({"kind": "rareclip", "quick_gelu": None})
    assert as_trained.fingerprint() != "343e623e2b2c14ce"


def test_a_tag_whose_hub_entry_holds_another_tags_weights_is_fetched_by_its_release_url(
        monkeypatch, tiny_config, tmp_path):
    """OpenCLIP 3 sends ViT-B-16-plus-240's laion400m_e32 to the Hub repository of laion400m_e31."""
    assert hub_holds_another_tag(detector_config_from_yaml(CONFIGS / "detector-dual-image.yaml")) == "laion400m_e31"
    url = "https://example.org/tiny-e32.pt"
    tags = {"e31": {"url": "https://example.org/tiny-e31.pt", "hf_hub": "timm/tiny.e31/"},
            "e32": {"url": url, "hf_hub": "timm/tiny.e31/"}}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, tiny_config.model, tags)
    weights = create_clip_model(tiny_config.model_copy(update={"seed": 5})).state_dict()
    release = tmp_path / "tiny-e32.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items()}, release)
    fetched = []
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_url", lambda u, **kw: fetched.append(u) or str(release))
    model = create_clip_model(tiny_config.model_copy(update={"pretrained": "e32"}))
    assert fetched == [url] and torch.equal(model.state_dict()["visual.proj"], weights["visual.proj"])

    def unreachable(u, **kw):
        raise OSError("no route to host")

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_url", unreachable)
    with pytest.raises(ConfigError, match=r"OpenCLIP's Hub entry for it holds e31's weights, and its release file "
                                          r"https://example.org/tiny-e32.pt could not be fetched \(OSError: no route to host\)"):
        create_clip_model(tiny_config.model_copy(update={"pretrained": "e32"}))


def test_a_float16_checkpoint_loads_resized_by_openclips_rule_and_a_file_already_at_size_as_it_is(tiny_config, tmp_path):
    """OpenCLIP resizes a checkpoint's position table as it loads it, in the file's dtype: a
    float16 file is loaded at the native size instead and resized after, in float32, by the same
    rule, giving what the float32 file gives to float16 precision."""
    weights = create_clip_model(tiny_config.model_copy(update={"seed": 3})).state_dict()
    full, half = tmp_path / "full.safetensors", tmp_path / "half.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items()}, full)
    save_file({k: v.half().contiguous() for k, v in weights.items()}, half)
    resized = tiny_config.model_copy(update={"pretrained": str(full), "image_size": 112})
    from_full = create_clip_model(resized).state_dict()
    from_half = create_clip_model(resized.model_copy(update={"pretrained": str(half)})).state_dict()
    assert from_half.keys() == from_full.keys()
    assert from_half["visual.positional_embedding"].shape == (1 + 7 * 7, 64)
    assert torch.allclose(from_half["visual.positional_embedding"], from_full["visual.positional_embedding"], atol=2e-3)
    assert torch.equal(from_half["visual.proj"], weights["visual.proj"].half().float())
    # a checkpoint saved at 112 px loads at 112 px as it is (nothing resized down and up again)
    at_size = tmp_path / "at-112.safetensors"
    save_file({k: v.contiguous() for k, v in from_full.items()}, at_size)
    again = create_clip_model(resized.model_copy(update={"pretrained": str(at_size)})).state_dict()
    assert all(torch.equal(again[k], from_full[k]) for k in from_full)