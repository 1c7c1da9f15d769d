"""Subcommands of the `hf-vlm` CLI, one module each (see hf_vlm.cli.COMMAND_MODULES)."""
