#!/usr/bin/env python3
"""Command line for the RareCLIP line cluster: one subcommand per job in `pipelines/`."""
import argparse
import importlib
import sys

# subcommand -> (pipelines module, one-line help). Each module exposes
# `add_arguments(parser)` and `main(args) -> int`; only the chosen one is imported.
COMMANDS = {
    "demo": ("pipelines.demo", "run the demo: local Ray, synthetic lines, tiny model on CPU"),
    "live": ("pipelines.live", "stream the configured lines until stopped"),
    "replay": ("pipelines.replay", "score a finite stream as fast as possible (same results as live)"),
    "evaluate": ("pipelines.evaluate", "accuracy on MVTec AD / VisA / a folder dataset: the paper's shuffled-seed protocol, metrics tables"),
    "drill": ("pipelines.drill", "fault drill: replay while killing actors, compare with a clean replay"),
    "query": ("pipelines.query", "run SQL over the result dataset (view `results`)"),
    "lines": ("pipelines.lines", "per-line summary: frames, errors, anomaly rate, score and latency percentiles"),
    "anomalies": ("pipelines.anomalies", "a line's anomalous frames (or its top N scores), highest first"),
    "dashboard": ("pipelines.dashboard", "a live web page of every line: latest frames, score timelines, anomalies with heat maps"),
    "report": ("pipelines.report", "HTML report of one line: score timeline, histogram, top frames with maps"),
    "train-tpb": ("pipelines.train_tpb", "train the text branch's linear layers (Eq. 4)"),
    "train-adaptclip": ("pipelines.train_adaptclip", "train AdaptCLIP's three adapters (authors' checkpoint format)"),
    "train-afrclip": ("pipelines.train_afrclip", "train AFR-CLIP's adapters, CMFR and self-prompts on an annotated dataset"),
    "snapshots": ("pipelines.snapshots", "list, reset or restore a line's snapshots"),
    "references": ("pipelines.references", "give a line normal reference images while it runs, or list them"),
    "nats-server": ("pipelines.nats_server", "start a local NATS server with JetStream (to try the NATS source)"),
    "camera": ("pipelines.camera", "publish a folder of images to a line's NATS subject at a given rate"),
}


class CommandHelp(argparse.RawDescriptionHelpFormatter):
    """A command's description and epilog as written; each option's default after its help,
    where it has one worth saying (not None, empty or an off switch) and the help does not say it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or "default" in text.lower()
                or action.default is None or action.default is False or action.default == []
                or action.default == argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)".lstrip()


def build_parser(command=None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run_cluster.py", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text, formatter_class=CommandHelp)
        command_parser.add_argument("-v", "--verbose", action="store_true", help="informational log lines too (Ray's included)")
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(command_parser)
            command_parser.set_defaults(_module=module)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(command).parse_args(argv)
    from pipelines.common import configure_console
    from pipelines.line_cluster import SupervisorLost
    from rareclip_core.config import ConfigError

    configure_console(args.verbose)

    try:
        return int(args._module.main(args) or 0)
    except ConfigError as err:  # found once the job had started (another job holds `out`, say)
        print(f"error: {err}", file=sys.stderr)
        return 2
    except SupervisorLost as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before or after a job's own handling (starting Ray, say)
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
