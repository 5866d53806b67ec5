#!/usr/bin/env python3
"""Command line for the RareCLIP line cluster: one subcommand per job in `pipelines/`."""
import argparse
import importlib
import sys

# subcommand -> (pipelines module, one-line help). Each module exposes
# `add_arguments(parser)` and `main(args) -> int`.
COMMANDS = {
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run_cluster.py", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
        sub.choices[name].set_defaults(_module=module)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
