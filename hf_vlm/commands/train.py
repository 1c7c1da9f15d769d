"""`hf-vlm pretrain ...` / `hf-vlm finetune ...`: the training scripts of hf_vlm.trainers through the CLI.
Every argument after the command goes to the script (see `hf-vlm pretrain --help`). For several
processes / GPUs use `accelerate launch trainers/pretrain.py ...` (README, "Training")."""

from __future__ import annotations

import argparse


def _runner(script: str):
    def run(args) -> int:
        import importlib

        return importlib.import_module(f"hf_vlm.trainers.{script}").main(args.script_args)

    return run


def register(subparsers) -> None:
    for script, help_text in (
        ("pretrain", "pretrain CoCa or BLIP-2 (stage 1 / 2) with a recipe: hf-vlm pretrain --recipe coca-tiny ..."),
        ("finetune", "fine-tune for captioning or VQA with a recipe: hf-vlm finetune --recipe blip2-tiny-vqa ..."),
    ):
        # prefix_chars="+": every "--flag" after the command is passed on to the script, not parsed here.
        parser = subparsers.add_parser(script, help=help_text, add_help=False, prefix_chars="+")
        parser.add_argument("script_args", nargs=argparse.REMAINDER, help=f"arguments of trainers/{script}.py")
        parser.set_defaults(func=_runner(script))
