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

from .training_data import add_config_argument, add_dataset_arguments, annotated_samples, loss_summary, training_config

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "detector-adaptclip.yaml"
DEFAULTS = TrainingSettings()


def add_arguments(parser) -> None:
    add_dataset_arguments(parser)  # the test split's annotated images are the queries; the train split's good ones the prompts
    parser.add_argument("--save", required=True, metavar="FILE", help="where to write the adapters' checkpoint (.pth)")
    add_config_argument(parser, AdaptCLIPConfig, DEFAULT_CONFIG)
    parser.add_argument("--epochs", type=int, default=DEFAULTS.epochs)
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    parser.add_argument("--lr", type=float, default=DEFAULTS.lr)
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed, help="order and prompt draws")
    parser.add_argument("--resume", action="store_true", help="continue from <save>.resume.pt")


def main(args) -> int:
    if args.epochs < 1 or args.batch_size < 2 or (args.limit is not None and args.limit < 2):
        print("error: --epochs must be >= 1, --batch-size and --limit >= 2 (BatchNorm needs two)", file=sys.stderr)
        return 2
    if resume_path(args.save).is_file() and not args.resume:
        print(f"error: {resume_path(args.save)} holds an interrupted run: pass --resume, or delete it to start afresh",
              file=sys.stderr)
        return 2
    try:
        config = training_config(args.config, AdaptCLIPConfig, "train-adaptclip trains AdaptCLIP's adapters")
        queries = annotated_samples(args.dataset, args.root, args.limit)
        normals = {c: [s for s in samples if not s.label] for c, samples in load_dataset(args.dataset, args.root, "train").items()}
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    settings = TrainingSettings(args.epochs, args.batch_size, args.lr, DEFAULTS.betas, args.seed)
    print(f"training AdaptCLIP's adapters on {len(queries)} images ({sum(s.label for s in queries)} anomalous) "
          f"from {len({s.category for s in queries})} categories of {args.root}")
    try:
        _, losses = train_adapters(config, queries, normals, args.save, settings, resume=args.resume)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(loss_summary(losses, max(1, len(losses) // args.epochs)))
    print(f"wrote AdaptCLIP weights to {args.save} (set detector.weights to use them)")
    return 0
