"""Converters from upstream checkpoints (open_clip CoCa, transformers BLIP-2 / InstructBLIP, LAVIS BLIP-2), installed as
`hf_vlm.conversion`.

- reader.py: streaming readers (safetensors, torch zip pickles, Hub folders), one tensor at a time.
- writer.py: streaming sharded safetensors writer and the atomic output folder.
- errors.py: ConversionError and its kinds (the CLI prints them without a traceback).
- core.py:   the engine: key accounting (Rule / Drop), shape checks on the meta device, conversion.
- one module per upstream format (FORMATS below), each exposing `add_arguments(parser)` and
  `convert_from_args(args)`, runnable as `python -m hf_vlm.conversion.<module>` or through
  `hf-vlm convert FORMAT SOURCE OUTPUT [options]`.

This file stays free of heavy imports: the CLI reads FORMATS at start-up.
"""

from __future__ import annotations

import argparse
import importlib

# format name -> (module, one-line description)
FORMATS = {
    "open-clip-coca": ("hf_vlm.conversion.open_clip_coca", "an open_clip CoCa checkpoint (file or Hub folder)"),
    "hf-blip2": ("hf_vlm.conversion.hf_blip2", "a transformers Blip2ForConditionalGeneration folder with a T5 LM"),
    "hf-instructblip": ("hf_vlm.conversion.hf_instructblip",
                        "a transformers InstructBlipForConditionalGeneration folder with a T5 LM"),
    "lavis-blip2": ("hf_vlm.conversion.lavis_blip2", "LAVIS BLIP-2 stage 1 / stage 2 (FlanT5) checkpoints"),
}


def build_parser(format_name: str, prog: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of one format: SOURCE OUTPUT, the options every converter shares, and the
    format's own options."""
    if format_name not in FORMATS:
        raise ValueError(f"unknown format {format_name!r}; known formats: {', '.join(FORMATS)}")
    module = importlib.import_module(FORMATS[format_name][0])
    parser = argparse.ArgumentParser(
        prog=prog or f"hf-vlm convert {format_name}",
        description=(module.__doc__ or "").split("\n\n")[0],
    )
    parser.add_argument("source", metavar="SOURCE", help="checkpoint file or folder")
    parser.add_argument("output", metavar="OUTPUT", help="folder to write (must not exist unless --overwrite)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="dtype of the written floating-point tensors (default: float32)")
    parser.add_argument("--max-shard-size", default="2GB",
                        help="largest safetensors shard, e.g. 2GB, 500MB, 1GiB (default: 2GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    module.add_arguments(parser)
    parser.set_defaults(convert=module.convert_from_args)
    return parser


def main(format_name: str, argv: list[str] | None = None) -> int:
    """Parse `argv` for `format_name`, convert, print the summary. Returns an exit code: bad input
    (a CheckpointError, key/shape mismatch, existing output...) prints the message, not a traceback."""
    import sys

    parser = build_parser(format_name)
    args = parser.parse_args(argv)
    from hf_vlm.conversion.errors import ConversionError

    try:
        summary = args.convert(args)
    except ConversionError as err:
        print(f"hf-vlm convert {format_name}: error: {err}", file=sys.stderr)
        return 1
    print(summary)
    return 0
