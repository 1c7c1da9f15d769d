"""The `hf-vlm` command line. Each subcommand lives in its own module under hf_vlm.commands and
exposes `register(subparsers)`; heavy imports happen inside the command, not here."""

from __future__ import annotations

import argparse
import importlib
import sys

import hf_vlm

# Subcommand modules, in the order `hf-vlm --help` lists them.
COMMAND_MODULES = ["hf_vlm.commands.env"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-vlm", description="Hugging Face-native BLIP-2-FlanT5 and CoCa.")
    parser.add_argument("--version", action="version", version=f"hf-vlm {hf_vlm.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
