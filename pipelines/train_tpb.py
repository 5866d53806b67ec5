"""`train-tpb`: train the text prompt branch's 4 linear layers (Eq. 4) on a dataset's test split
(`training_data`); point the detector's `tpb_weights` at the written file, which has the
authors' checkpoint format.
"""
import sys
from pathlib import Path

from rareclip_core.config import ConfigError
from rareclip_core.data.mosaic import AUTHORS_RATE
from rareclip_core.detectors.rareclip.config import RareCLIPConfig
from rareclip_core.detectors.rareclip.text_branch import save_tpb_checkpoint
from rareclip_core.detectors.rareclip.training import train_text_projection

from .common import at_least, probability
from .training_data import (add_config_argument, add_dataset_arguments, annotated_samples,
                            check_save_path, described, loss_summary, shows_progress, training_config)

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "detector-paper.yaml"


def add_arguments(parser) -> None:
    add_dataset_arguments(parser)
    parser.add_argument("--save", required=True, metavar="FILE", help="where to write the TPB checkpoint (.pth)")
    add_config_argument(parser, RareCLIPConfig, DEFAULT_CONFIG)
    parser.add_argument("--epochs", type=at_least(1), default=5, help="passes over the images")
    parser.add_argument("--batch-size", type=at_least(1), default=16, help="images per optimizer step")
    parser.add_argument("--lr", type=float, default=0.005, help="Adam's learning rate")
    parser.add_argument("--seed", type=int, default=0, help="shuffling and mosaic seed")
    parser.add_argument("--mosaic-rate", type=probability, default=None, metavar="P",
                        help=f"replace each image of an epoch by a 2 x 2 mosaic of its category with probability P, "
                        f"leaving out MVTec AD's misplaced and missing_cable (default: {AUTHORS_RATE} with --dataset mvtec, "
                        "as the authors' MVTec AD loader; 0 otherwise)")


def mosaic_rate(args) -> float:
    """--mosaic-rate, or the authors' rate for MVTec AD (their other loaders make no mosaics)."""
    if args.mosaic_rate is not None:
        return args.mosaic_rate
    return AUTHORS_RATE if args.dataset == "mvtec" else 0.0


def main(args) -> int:
    try:
        check_save_path(args.save)
        config = training_config(args.config, RareCLIPConfig, "train-tpb trains RareCLIP's text branch")
        samples = annotated_samples(args.dataset, args.root, args.limit)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"training TPB on {described(samples, args.root)}")
    try:
        projection, losses = train_text_projection(
            config, samples, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
            progress=shows_progress(args), mosaic_rate=mosaic_rate(args),
        )
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    save_tpb_checkpoint(projection, args.save)
    print(loss_summary(losses, len(losses) // args.epochs))
    print(f"wrote TPB weights to {args.save} (set detector.tpb_weights to use them)")
    return 0
