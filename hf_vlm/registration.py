"""Registration of our model families with transformers' Auto classes.

Each family contributes one entry to FAMILIES: its model_type, the module under hf_vlm.modeling
that defines it, its config class, and which Auto class maps to which model / processor class.
`register_all()` is idempotent (called by `import hf_vlm`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import transformers


@dataclass(frozen=True)
class Family:
    model_type: str
    module: str  # e.g. "hf_vlm.modeling.coca"
    config_class: str
    models: dict[str, str] = field(default_factory=dict)  # Auto class name -> model class name
    processor_class: str | None = None


# Filled in by the family issues (CoCa, BLIP-2-FlanT5).
FAMILIES: list[Family] = [
    Family(
        model_type="blip2_flant5",
        module="hf_vlm.modeling.blip2_flant5",
        config_class="Blip2FlanT5Config",
        models={
            "AutoModel": "Blip2FlanT5ForConditionalGeneration",
            "AutoModelForImageTextToText": "Blip2FlanT5ForConditionalGeneration",
            "AutoModelForPreTraining": "Blip2FlanT5ForPretraining",
        },
        processor_class="Blip2FlanT5Processor",
    ),
    Family(
        model_type="coca",
        module="hf_vlm.modeling.coca",
        config_class="CocaConfig",
        models={
            "AutoModel": "CocaModel",
            "AutoModelForZeroShotImageClassification": "CocaModel",
            "AutoModelForImageTextToText": "CocaModel",
        },
        processor_class="CocaProcessor",
    ),
]

_registered: set[str] = set()


def register_all() -> None:
    for family in FAMILIES:
        if family.model_type in _registered:
            continue
        module = importlib.import_module(family.module)
        config_class = getattr(module, family.config_class)
        transformers.AutoConfig.register(family.model_type, config_class, exist_ok=True)
        for auto_name, model_name in family.models.items():
            getattr(transformers, auto_name).register(config_class, getattr(module, model_name), exist_ok=True)
        if family.processor_class:
            transformers.AutoProcessor.register(
                config_class, getattr(module, family.processor_class), exist_ok=True
            )
        _registered.add(family.model_type)


def registered_model_types() -> list[str]:
    """Model types this package registered that transformers' AutoConfig now resolves."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return sorted(t for t in _registered if t in CONFIG_MAPPING)


def load_config(checkpoint):
    """`AutoConfig.from_pretrained(checkpoint)` with errors that name the file: a local folder without a readable
    config.json, or whose `model_type` neither hf-vlm nor transformers knows (transformers would instead ask to run
    the folder's custom code, or call itself out of date; issue 16.11)."""
    import json
    from pathlib import Path

    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    register_all()
    folder = Path(checkpoint)
    if folder.is_dir():
        path = folder / "config.json"
        try:
            model_type = json.loads(path.read_text()).get("model_type")
        except FileNotFoundError:
            raise ValueError(f"{folder} is not a model checkpoint: it has no config.json") from None
        except (OSError, ValueError, AttributeError) as err:
            raise ValueError(f"{path} is not a readable model config ({err})") from err
        if model_type not in CONFIG_MAPPING:
            raise ValueError(
                f"{path}: model_type {model_type!r} is not a model type hf-vlm knows "
                f"({', '.join(sorted(f.model_type for f in FAMILIES))}) nor one of transformers' own"
            )
    return AutoConfig.from_pretrained(checkpoint)
