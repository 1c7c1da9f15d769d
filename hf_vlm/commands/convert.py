"""`hf-vlm convert FORMAT SOURCE OUTPUT [options]`: convert an upstream checkpoint (open_clip CoCa,
transformers BLIP-2 / InstructBLIP, LAVIS BLIP-2) into an hf-vlm `from_pretrained` folder. The formats and their options
live in hf_vlm.conversion; a format's module is imported only when it is used."""

from __future__ import annotations

import argparse

from hf_vlm.conversion import FORMATS


def run(args) -> int:
    from hf_vlm.conversion import main

    return main(args.format, args.options)


def register(subparsers) -> None:
    formats = "\n".join(f"  {name:<16} {description}" for name, (_, description) in FORMATS.items())
    parser = subparsers.add_parser(
        "convert",
        help="convert an upstream checkpoint (open_clip CoCa, transformers BLIP-2 / InstructBLIP, LAVIS BLIP-2)",
        description=f"Convert an upstream checkpoint.\n\nformats:\n{formats}\n\n"
        "`hf-vlm convert FORMAT --help` lists a format's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="hf-vlm convert FORMAT SOURCE OUTPUT [options]",
    )
    parser.add_argument("format", choices=list(FORMATS), metavar="FORMAT")
    parser.add_argument("options", nargs=argparse.REMAINDER, help="SOURCE OUTPUT and the format's options")
    parser.set_defaults(func=run)
