"""`train-afrclip`: train AFR-CLIP's learned parts (adapters, CMFR, self-prompting) on a
dataset's annotated test split (`training_data`) with the paper's recipe (Adam, lr 1e-3 /
(epoch + 1), batch 4, 100 epochs); point the detector's `weights` at the written file.

A checkpoint is written after every epoch to `--checkpoints` (default `<save>.checkpoints/`,
the newest `--keep` kept); `--resume` continues from the newest one, exactly as if the run had
not stopped. The final file has the format of `rareclip_core/detectors/afrclip/checkpoint.py`.
"""
import sys
from pathlib import Path

from rareclip_core.config import ConfigError
from rareclip_core.detectors.afrclip.checkpoint import save_checkpoint
from rareclip_core.detectors.afrclip.config import AFRCLIPConfig
from rareclip_core.detectors.afrclip.training import TrainingSettings, train_afrclip

from .common import at_least
from .training_data import (add_config_argument, add_dataset_arguments, annotated_samples,
                            check_save_path, described, loss_summary, shows_progress, training_config)

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "detector-afrclip.yaml"


def add_arguments(parser) -> None:
    add_dataset_arguments(parser)
    parser.add_argument("--save", required=True, metavar="FILE", help="where to write the trained parts (.pth)")
    add_config_argument(parser, AFRCLIPConfig, DEFAULT_CONFIG)
    parser.add_argument("--epochs", type=at_least(1), default=100, help="passes over the images")
    parser.add_argument("--batch-size", type=at_least(1), default=4, help="images per optimizer step")
    parser.add_argument("--lr", type=float, default=1e-3, help="initial learning rate; epoch e uses lr / (e + 1)")
    parser.add_argument("--seed", type=int, default=0, help="shuffling seed")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16", "config"), default="fp32",
                        help="the frozen backbone's precision while training ('config': the config's; default %(default)s)")
    parser.add_argument("--checkpoints", help="folder of the per-epoch checkpoints (default: <save>.checkpoints)")
    parser.add_argument("--keep", type=at_least(1), default=2, help="newest epoch checkpoints kept (default %(default)s)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest epoch checkpoint")


def main(args) -> int:
    try:
        check_save_path(args.save)
        config = training_config(args.config, AFRCLIPConfig, "train-afrclip trains AFR-CLIP")
        if args.precision != "config":
            config = config.model_copy(update={"precision": args.precision})
        samples = annotated_samples(args.dataset, args.root, args.limit)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    checkpoints = Path(args.checkpoints or f"{args.save}.checkpoints")
    print(f"training AFR-CLIP on {described(samples, args.root)}; epoch checkpoints in {checkpoints}")
    settings = TrainingSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                checkpoint_dir=checkpoints, keep_checkpoints=args.keep, resume=args.resume,
                                progress=shows_progress(args))
    try:
        heads, shape, losses = train_afrclip(config, samples, settings)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    save_checkpoint(heads, shape, args.save)
    if losses:
        print(loss_summary(losses, -(-len(samples) // args.batch_size)))
    print(f"wrote AFR-CLIP weights to {args.save} (set detector.weights to use them)")
    return 0
