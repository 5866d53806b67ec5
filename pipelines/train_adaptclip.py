"""`train-adaptclip`: train AdaptCLIP's three adapters (docs/algorithms/adaptclip.md sec. 5).

As the authors, train on one dataset's test images with their masks (every category), each
paired with a random good train image of its category as the normal prompt, and use the file
on other datasets (VisA-trained for MVTec AD lines, MVTec-AD-trained for the rest): point the
detector's `weights` at it. The file has the authors' checkpoint format. After every epoch
`<save>.resume.pt` is written; `--resume` continues an interrupted run from it.
"""
import sys
from pathlib import Path

from rareclip_core.config import ConfigError
from rareclip_core.data.datasets import load_dataset
from rareclip_core.detectors.adaptclip.config import AdaptCLIPConfig
from rareclip_core.detectors.adaptclip.training import TrainingSettings, resume_path, train_adapters

from .common import at_least
from .training_data import (add_config_argument, add_dataset_arguments, annotated_samples,
                            check_save_path, described, loss_summary, shows_progress, training_config)

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "detector-adaptclip.yaml"
DEFAULTS = TrainingSettings()
BATCH_NORM = " (the adapters' BatchNorm needs two images a batch)"


def add_arguments(parser) -> None:
    # the test split's annotated images are the queries, the train split's good ones the prompts
    add_dataset_arguments(parser, min_images=2, why=BATCH_NORM)
    parser.add_argument("--save", required=True, metavar="FILE", help="where to write the adapters' checkpoint (.pth)")
    add_config_argument(parser, AdaptCLIPConfig, DEFAULT_CONFIG)
    parser.add_argument("--epochs", type=at_least(1), default=DEFAULTS.epochs, help="passes over the images")
    parser.add_argument("--batch-size", type=at_least(2, BATCH_NORM), default=DEFAULTS.batch_size, help="queries per optimizer step")
    parser.add_argument("--lr", type=float, default=DEFAULTS.lr, help="Adam's learning rate")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed, help="order and prompt draws")
    parser.add_argument("--resume", action="store_true", help="continue from <save>.resume.pt")


def main(args) -> int:
    try:
        check_save_path(args.save)
        if resume_path(args.save).is_file() and not args.resume:
            raise ConfigError(f"{resume_path(args.save)} holds an interrupted run: pass --resume, or delete it to start afresh")
        config = training_config(args.config, AdaptCLIPConfig, "train-adaptclip trains AdaptCLIP's adapters")
        queries = annotated_samples(args.dataset, args.root, args.limit)
        normals = {c: [s for s in samples if not s.label] for c, samples in load_dataset(args.dataset, args.root, "train").items()}
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    settings = TrainingSettings(args.epochs, args.batch_size, args.lr, DEFAULTS.betas, args.seed)
    print(f"training AdaptCLIP's adapters on {described(queries, args.root)}")
    try:
        _, losses = train_adapters(config, queries, normals, args.save, settings, resume=args.resume,
                                   progress=shows_progress(args))
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(loss_summary(losses, max(1, len(losses) // args.epochs)))
    print(f"wrote AdaptCLIP weights to {args.save} (set detector.weights to use them)")
    return 0
