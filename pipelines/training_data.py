"""What the training jobs (train-tpb, train-afrclip, train-adaptclip) share: their --config and
dataset arguments and the check of their numbers, the check of the config's detector kind, the
choice of annotated images and the lines they print.
As in the papers, the learned parts are trained on one dataset's test images with their masks
(all categories) and used on another (VisA -> MVTec AD and back)."""
from __future__ import annotations

import sys
from pathlib import Path

from configs.loading import load_detector_config
from rareclip_core.config import ConfigError, DetectorSettings
from rareclip_core.data.datasets import Sample, load_dataset

from .common import at_least
from .preflight import writable_problem


def _kind(config_class: type[DetectorSettings]) -> str:
    return config_class.model_fields["kind"].default


def add_config_argument(parser, config_class: type[DetectorSettings], default: Path) -> None:
    """--config: the detector to train, of `config_class`'s kind (`default`: the repository's YAML)."""
    parser.add_argument(
        "--config",
        default=str(default),
        help=f"detector YAML (kind: {_kind(config_class)}), or a pipeline YAML with a `detector:` section "
        "(default: %(default)s)",
    )


def training_config(path: str, config_class: type[DetectorSettings], trains: str) -> DetectorSettings:
    """The detector config at `path` (see `load_detector_config`); ConfigError when its kind is
    not `config_class`'s, where `trains` says what the command trains ("train-tpb trains ...")."""
    config = load_detector_config(path)
    if not isinstance(config, config_class):
        raise ConfigError(
            f"{path}: {trains}; this config's detector is {config.kind!r}: "
            f"pass --config with a detector of kind {_kind(config_class)!r}"
        )
    return config


def check_save_path(path: str) -> None:
    """ConfigError, before any training, when `--save` cannot be written (the run would end
    with nothing saved): see `writable_problem`."""
    problem = writable_problem(path, "file", "--save", f"give the file to write, e.g. {Path(path) / 'weights.pth'}"
                               if Path(path).expanduser().is_dir() else "give another --save")
    if problem:
        raise ConfigError(problem)


def loss_summary(losses: list[float], steps_per_epoch: int) -> str:
    """The last loss, and the mean loss of the last and of the first epoch's worth of steps."""
    last, first = losses[-steps_per_epoch:], losses[:steps_per_epoch]
    return (f"final loss {losses[-1]:.4f} (last epoch mean {sum(last) / len(last):.4f}, "
            f"first epoch mean {sum(first) / len(first):.4f})")


def add_dataset_arguments(parser, min_images: int = 1, why: str = "") -> None:
    parser.add_argument("--dataset", required=True, choices=("mvtec", "visa", "folder"), help="dataset layout")
    parser.add_argument("--root", required=True, help="dataset root folder")
    parser.add_argument(
        "--limit", type=at_least(min_images, why), default=None, metavar="N",
        help="train on N images spread evenly over the test split (quick runs)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (there is none off a terminal)")


def shows_progress(args) -> bool:
    """A progress bar on a terminal unless --no-progress (off one, a bar's redraws fill a log)."""
    return not args.no_progress and sys.stderr.isatty()


def annotated_samples(dataset: str, root: str, limit: int | None) -> list[Sample]:
    """The test split's images that can be trained on (anomalous ones need a mask; those
    without are skipped with a message), `limit` of them spread evenly when given. Raises
    FileNotFoundError / ValueError for a missing or malformed dataset, or one with none."""
    samples = [s for category in load_dataset(dataset, root, "test").values() for s in category]
    unmasked = [s for s in samples if s.label and s.mask_path is None]
    if unmasked:
        print(f"skipping {len(unmasked)} anomalous images without a mask", file=sys.stderr)
        samples = [s for s in samples if not (s.label and s.mask_path is None)]
    if not samples:
        raise ValueError(f"no usable training images under {root}")
    if limit is not None and limit < len(samples):
        samples = [samples[i * len(samples) // limit] for i in range(limit)]
    return samples


def described(samples: list[Sample], root: str) -> str:
    """'N images (k anomalous) from C categories of <root>', for the line a training job starts with."""
    return (f"{len(samples)} images ({sum(s.label for s in samples)} anomalous) from "
            f"{len({s.category for s in samples})} categories of {root}")
