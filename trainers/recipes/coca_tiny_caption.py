"""coca-tiny-caption: caption fine-tuning of a coca-tiny checkpoint (pass --model): caption loss only, as
CoCa is fine-tuned for captioning; on CPU in about a minute."""

from hf_vlm.trainers.recipes import TINY_TRAINING, Recipe

RECIPE = Recipe(name="coca-tiny-caption", stage="coca-caption", model="coca-tiny",
                training={**TINY_TRAINING, "learning_rate": 1e-4}, data={"max_length": 32})
