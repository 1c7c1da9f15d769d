"""Training recipes: one module per recipe in this folder, each defining `RECIPE = Recipe(...)`.

A recipe names the training stage, the model it starts from and the defaults of every argument of
trainers/pretrain.py / finetune.py (TrainingArguments and the data/model arguments); flags given on
the command line override them. Module `coca_large_v2.py` is recipe `coca-large-v2`.
The `*-tiny*` recipes are the same stages on tiny presets that train on CPU in about a minute.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field

# Training stages: what is trained and with which loss. The trainer maps each to a model class and a
# data recipe (hf_vlm.data.DATA_RECIPES).
PRETRAIN_STAGES = ("coca", "blip2-stage1", "blip2-stage2")
FINETUNE_STAGES = ("coca-caption", "blip2-caption", "blip2-vqa")


@dataclass(frozen=True)
class Recipe:
    name: str
    stage: str  # one of PRETRAIN_STAGES / FINETUNE_STAGES
    model: str  # default --model: a preset name, a local checkpoint or a Hub id
    training: dict = field(default_factory=dict)  # TrainingArguments defaults
    data: dict = field(default_factory=dict)  # DataArguments defaults
    model_overrides: dict = field(default_factory=dict)  # ModelArguments defaults (freeze_vision, ...)
    # The hardware the published numbers assume, for the global batch: processes = nodes x GPUs per node.
    nodes: int = 1
    gpus_per_node: int = 1
    source: str = ""  # where the numbers come from

    def __post_init__(self):
        if self.stage not in PRETRAIN_STAGES + FINETUNE_STAGES:
            raise ValueError(f"recipe {self.name!r}: unknown stage {self.stage!r}")

    @property
    def global_batch_size(self) -> int:
        """Samples per optimizer step on the recipe's hardware."""
        per_process = self.training.get("per_device_train_batch_size", 8) * self.training.get(
            "gradient_accumulation_steps", 1
        )
        return per_process * self.nodes * self.gpus_per_node

    def defaults(self) -> dict:
        """Argument name -> default value, for HfArgumentParser.set_defaults."""
        return {"model": self.model, **self.model_overrides, **self.data, **self.training}


def _module_name(recipe_name: str) -> str:
    return recipe_name.replace("-", "_")


def list_recipes() -> list[str]:
    return sorted(m.name.replace("_", "-") for m in pkgutil.iter_modules(__path__))


def get_recipe(name: str) -> Recipe:
    if name not in list_recipes():
        raise ValueError(f"unknown recipe {name!r}; known recipes: {', '.join(list_recipes())}")
    recipe = importlib.import_module(f"{__name__}.{_module_name(name)}").RECIPE
    if recipe.name != name:
        raise ValueError(f"recipe module {_module_name(name)}.py defines {recipe.name!r}, expected {name!r}")
    return recipe


def deepspeed_config(name: str) -> str:
    """Absolute path of trainers/deepspeed/NAME.json (recipes must work from any working directory)."""
    from pathlib import Path

    return str(Path(__file__).resolve().parent.parent / "deepspeed" / f"{name}.json")


# Settings every tiny CPU recipe shares: short, logged every step range, checkpoints kept small.
TINY_TRAINING = {
    "per_device_train_batch_size": 8,
    "max_steps": 40,
    "learning_rate": 1e-3,
    "warmup_steps": 0.1,  # transformers 5: a float < 1 is a fraction of the steps (warmup_ratio is gone)
    "lr_scheduler_type": "cosine",
    "weight_decay": 0.05,
    "logging_steps": 5,
    "save_steps": 20,
    "save_total_limit": 2,
    "report_to": "none",
    "dataloader_num_workers": 0,
}
