"""Named model presets, described by data: one JSON file per preset in this folder.

A preset file holds `model_type` plus the keyword arguments of that type's config class (nested
sub-configs as dicts). It is the one place an architecture is defined; CLIs take the same names
(`--model coca-tiny`). Full-size presets must match the upstream model exactly (tests count their
parameters on the meta device).
"""

from __future__ import annotations

import json
from pathlib import Path

_PRESET_DIR = Path(__file__).parent


def list_presets() -> list[str]:
    return sorted(p.stem for p in _PRESET_DIR.glob("*.json"))


def preset_dict(name: str) -> dict:
    """The preset's raw JSON (model_type + config kwargs)."""
    path = _PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(list_presets()) or 'none'}")
    return json.loads(path.read_text())


def get_config(name: str, **overrides):
    """Build the config of preset `name`; keyword overrides replace top-level config fields."""
    from transformers import AutoConfig

    kwargs = preset_dict(name)
    model_type = kwargs.pop("model_type")
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)
