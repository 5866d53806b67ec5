"""Side by side with the authors' RareCLIP code: every per-step quantity, same weights, same frames.

Usage (repository root; AUTHORS is a checkout of the authors' repository, which holds
`rareclip.py`, `rareclip_d.py` and `sampler.py`; nothing of it is copied into this project):

    PYTHONPATH=. python benchmarks/authors_conformance.py --authors-repo AUTHORS
    PYTHONPATH=. python benchmarks/authors_conformance.py --authors-repo AUTHORS \\
        --model ViT-L-14-336 --image-size 518 --frames 30 --modes online

Both implementations get the same random CLIP weights (`pretrained: null`, one seed), the same
random text-branch layers (handed to the authors' code as a checkpoint in their format) and
the same backbone features: the authors' `clip_model.encode_image` is answered by this
project's backbone (their vendored OpenCLIP fork is not needed), so what is compared is
everything after the backbone. Frames are synthetic objects (or textures) with rare defects.

Near-ties: with random weights, deep patch features can be almost collinear (at ViT-L-14-336 /
518 on plain object frames, Eq. 8's s_i cluster at 0.99991 with gaps of 1e-9 at the N_F cut,
below float32's resolution). Which feature SCS keeps there is then decided by the rounding of
the matrix products, not by the rule, and maps can differ by up to about 3e-4 at a few patches
for a few steps; the rules are the same (the ViT-B-16 runs show it). See docs/BENCHMARKS.md.

Modes: online (zero-shot), kshot1 and kshot4 (k normal references first), dprb (RareCLIP-d),
dprb-kshot4, offline-kshot4 (references memorized, then every frame scored without updates).
Printed per mode: the largest |ours - theirs| over the stream of the final score, c_test,
c_text, the anomaly map and the LAIFs (after each memorizing step). The last line says
whether every figure is within --tolerance; the exit code is 0 only then.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import open_clip
import torch

from rareclip_core.backbone import create_clip_model
from rareclip_core.data.synthetic import SyntheticLine
from rareclip_core.detectors.rareclip.config import RareCLIPConfig
from rareclip_core.detectors.rareclip.detector import RareCLIPDetector
from rareclip_core.detectors.rareclip.text_branch import save_tpb_checkpoint

MODES = {
    "online": dict(k=0, dprb=False, online=True),
    "kshot1": dict(k=1, dprb=False, online=True),
    "kshot4": dict(k=4, dprb=False, online=True),
    "dprb": dict(k=0, dprb=True, online=True),
    "dprb-kshot4": dict(k=4, dprb=True, online=True),
    "offline-kshot4": dict(k=4, dprb=False, online=False),
}


class AuthorsClipShim(torch.nn.Module):
    """Stands in for the authors' CLIP fork: `encode_text` is the CLIP model's own; the image
    side returns this project's backbone output in their layout (class token row first)."""

    def __init__(self, model: torch.nn.Module, detector: RareCLIPDetector):
        super().__init__()
        self.model, self.detector = model, detector
        self.last_image_feature: torch.Tensor | None = None

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)

    def encode_image(self, image: torch.Tensor, layers: list[int]):
        out = self.detector.backbone(image)
        self.last_image_feature = out.image_embedding.clone()
        tokens = [out.patch_tokens[b] for b in layers]  # 1 x M x C each
        return out.image_embedding.clone(), [torch.cat([t[:, :1] * 0, t], dim=1).clone() for t in tokens]


def detector_config(args, mode: dict) -> RareCLIPConfig:
    depth = {"ViT-B-16": 12, "ViT-L-14-336": 24}.get(args.model)
    if depth is None:
        raise SystemExit(f"--model {args.model}: use ViT-B-16 or ViT-L-14-336")
    q = depth // 4
    return RareCLIPConfig(
        model=args.model,
        pretrained=None,
        image_size=args.image_size,
        seed=args.seed,
        device="cpu",
        rarity_blocks=[q, 2 * q, 3 * q, 4 * q],
        text_blocks=[2 * q, 2 * q + q * 2 // 3, 4 * q - q * 2 // 3, 4 * q],
        max_features=3 * (args.image_size // (14 if "14" in args.model else 16)) ** 2,
        max_images=args.max_images,
        rarity_branch="dprb" if mode["dprb"] else "iprb",
        dprb_alpha=0.333,
        mode="online" if mode["online"] else "offline",
        text_cache_dir=None,
    )


def authors_args(config: RareCLIPConfig, mode: dict, load_path: str) -> SimpleNamespace:
    """The authors' command-line defaults (their test.py), set to this run's settings."""
    return SimpleNamespace(
        image_size=config.image_size, gpu=-1, model=config.model, pretrained=None, load_path=load_path,
        features_list_text=config.text_blocks, features_list_rare=config.rarity_blocks,
        keep_ftime=3, keep_fratio=config.dprb_alpha,
        keep_snum=config.max_images, keep_inum=config.image_memory_size, topk=config.k_neighbors,
        LS_ratio=config.loose_ratio, Rs=1, Rs_freq=config.rescore_divisor, max_Rs_num=config.rescore_max_neighbors - 1,
        Rs_temp=config.rescore_temperature, text_temp=config.text_temperature, sigma=4, rare_thd=config.rarity_ratio,
        sampler="SCS", k_shot=mode["k"], online=int(mode["online"]), direct=int(mode["dprb"]), other="",
    )


@contextmanager
def authors_workdir(repo: Path, config: RareCLIPConfig, model: torch.nn.Module):
    """Their constructor reads `open_clip/model_configs/<model>.json` from the working folder."""
    old = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "open_clip" / "model_configs"
        folder.mkdir(parents=True)
        visual = model.visual
        patch = visual.conv1.kernel_size[0]
        info = {"embed_dim": model.text_projection.shape[1], "vision_cfg": {"width": visual.transformer.width, "patch_size": patch}}
        (folder / f"{config.model}.json").write_text(json.dumps(info))
        os.chdir(tmp)
        sys.path.append(str(repo))
        try:
            yield Path(tmp)
        finally:
            sys.path.remove(str(repo))
            os.chdir(old)


def build_authors(repo: Path, config: RareCLIPConfig, mode: dict, ours: RareCLIPDetector):
    model = create_clip_model(config).eval()
    shim = AuthorsClipShim(model, ours)
    with authors_workdir(repo, config, model) as tmp:
        module = importlib.import_module("rareclip_d" if mode["dprb"] else "rareclip")
        for loaded in ("rareclip", "rareclip_d"):
            if loaded in sys.modules:
                sys.modules[loaded].open_clip = SimpleNamespace(
                    create_model_and_transforms=lambda *a, **k: (shim, None, None), get_tokenizer=open_clip.get_tokenizer
                )
        load_path = str(tmp / "tpb.pth")
        save_tpb_checkpoint(ours.text_projection, load_path)
        cls = module.RareCLIP_d if mode["dprb"] else module.RareCLIP
        theirs = cls(authors_args(config, mode, load_path))
    return theirs, shim


def compare(args, name: str) -> dict[str, float]:
    mode = MODES[name]
    config = detector_config(args, mode)
    ours = RareCLIPDetector(config)
    theirs, shim = build_authors(Path(args.authors_repo), config, mode, ours)
    line = SyntheticLine(args.line_kind, seed=args.seed, size=args.image_size, defect_rate=0.15)
    frames = [line.frame(i).image for i in range(args.frames + mode["k"])]
    to_tensor = lambda f: ours.frame_input([f])  # noqa: E731
    worst = dict.fromkeys(["score", "c_test", "c_text", "map", "laif"], 0.0)

    def note(key: str, a, b) -> None:
        diff = float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))
        worst[key] = max(worst[key], diff)

    def their_laifs() -> np.ndarray:
        return torch.stack([m[-1] for m in theirs.AAIF_memory]).numpy()

    refs, stream = frames[: mode["k"]], frames[mode["k"] :]
    if refs:
        ours.add_normal_references(refs)
        for frame in refs:
            theirs.process_image_and_update(to_tensor(frame))
        note("laif", ours.reference_laifs.transpose(0, 1).reshape(-1).numpy(),
             torch.stack([m[: mode["k"]] for m in theirs.AAIF_memory], 1).reshape(-1).numpy())
    for frame in stream:
        result = ours.step(frame)
        their_map, their_score = theirs.process_image_and_update(to_tensor(frame), update=mode["online"])
        text_prob = torch.softmax(theirs.text_temp * shim.last_image_feature @ theirs.text_features, -1)[0, 1]
        their_c_test = theirs.score_memory[-1] if mode["online"] else their_score
        note("score", result.score, float(their_score))
        note("c_test", result.parts["preliminary_score"], float(their_c_test))
        note("c_text", result.parts["text_score"], float(text_prob))
        note("map", result.anomaly_map, their_map[0, 0].numpy())
        if mode["online"]:
            note("laif", ours.image_memory.laifs[:, -1].numpy(), their_laifs())
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--authors-repo", required=True, help="a checkout of the authors' RareCLIP repository")
    parser.add_argument("--model", default="ViT-B-16", help="ViT-B-16 or ViT-L-14-336 (random weights)")
    parser.add_argument("--image-size", type=int, default=240)
    parser.add_argument("--frames", type=int, default=30, help="scored frames per mode (after the references)")
    parser.add_argument("--max-images", type=int, default=200, help="N_I,max (smaller values exercise PSM trimming)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--line-kind", default="object", choices=("object", "texture"), help="synthetic frames")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--tolerance", type=float, default=1e-5)
    args = parser.parse_args()
    if not (Path(args.authors_repo) / "rareclip.py").is_file():
        raise SystemExit(f"--authors-repo {args.authors_repo}: no rareclip.py there")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    print(f"model={args.model} image_size={args.image_size} frames={args.frames} max_images={args.max_images} "
          f"line={args.line_kind}")
    print(f"{'mode':16} {'score':>9} {'c_test':>9} {'c_text':>9} {'map':>9} {'laif':>9}")
    worst_all = 0.0
    for name in args.modes:
        worst = compare(args, name)
        worst_all = max(worst_all, *worst.values())
        print(f"{name:16} " + " ".join(f"{worst[k]:9.2e}" for k in ("score", "c_test", "c_text", "map", "laif")), flush=True)
    ok = worst_all <= args.tolerance
    print(f"largest difference {worst_all:.2e}: {'within' if ok else 'NOT within'} {args.tolerance:g}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
