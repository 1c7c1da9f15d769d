"""blip2-tiny-caption: caption fine-tuning of a blip2-tiny checkpoint (pass --model), LAVIS-style with the
ViT unfrozen; on CPU in about a minute. Needs --processor (the T5 tokenizer) unless the checkpoint has one."""

from hf_vlm.trainers.recipes import TINY_TRAINING, Recipe

RECIPE = Recipe(
    name="blip2-tiny-caption",
    stage="blip2-caption",
    model="blip2-tiny",
    training={**TINY_TRAINING, "learning_rate": 1e-4},
    model_overrides={"freeze_vision": False, "freeze_language_model": True},
)
