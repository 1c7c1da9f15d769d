"""Subcommands of the `hf-vlm` CLI: one module each, found by hf_vlm.cli, exposing `register(subparsers)`."""
