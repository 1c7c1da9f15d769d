"""blip2-tiny-vqa: VQA fine-tuning of a blip2-tiny checkpoint (pass --model) on image + question + answers;
on CPU in about a minute."""

from hf_vlm.trainers.recipes import Recipe
from hf_vlm.trainers.recipes.blip2_tiny_caption import RECIPE as CAPTION

RECIPE = Recipe(
    name="blip2-tiny-vqa",
    stage="blip2-vqa",
    model="blip2-tiny",
    training=dict(CAPTION.training),
    model_overrides=dict(CAPTION.model_overrides),
)
