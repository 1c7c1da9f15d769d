"""blip2-tiny-stage1: BLIP-2 stage 1 (ITC + ITM + ITG, frozen ViT) on the tiny preset, on CPU in about a
minute. Needs --processor (the Q-Former's tokenizer, or a processor that holds it) and --train_data."""

from hf_vlm.trainers.recipes import TINY_TRAINING, Recipe

RECIPE = Recipe(
    name="blip2-tiny-stage1",
    stage="blip2-stage1",
    model="blip2-tiny",
    training={**TINY_TRAINING, "adam_beta2": 0.98, "lr_scheduler_type": "cosine_with_min_lr",
              "lr_scheduler_kwargs": {"min_lr": 1e-5}},
)
