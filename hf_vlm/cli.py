"""The `hf-vlm` command line. Each subcommand is one module under hf_vlm/commands/ that exposes
`register(subparsers)`; adding a module adds the command. Heavy imports happen inside the command."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import hf_vlm
import hf_vlm.commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-vlm", description="Hugging Face-native BLIP-2-FlanT5 and CoCa.")
    parser.add_argument("--version", action="version", version=f"hf-vlm {hf_vlm.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in sorted(pkgutil.iter_modules(hf_vlm.commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"hf_vlm.commands.{module.name}").register(subparsers)
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
