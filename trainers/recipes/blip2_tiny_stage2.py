"""blip2-tiny-stage2: BLIP-2 stage 2 (frozen ViT and T5) on the tiny preset, on CPU in about a minute.
Pass --init_qformer_from with a blip2-tiny-stage1 output, --processor (the T5 tokenizer) and --train_data."""

from hf_vlm.trainers.recipes import Recipe
from hf_vlm.trainers.recipes.blip2_tiny_stage1 import RECIPE as STAGE1

RECIPE = Recipe(name="blip2-tiny-stage2", stage="blip2-stage2", model="blip2-tiny", training=dict(STAGE1.training))
