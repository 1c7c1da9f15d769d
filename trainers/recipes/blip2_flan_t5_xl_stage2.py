"""BLIP-2 FlanT5-XL stage 2: frozen ViT and FlanT5-XL, the Q-Former (initialised from a stage-1
checkpoint with --init_qformer_from) and the projection learn generation. Same optimizer and schedule
as stage 1 (AdamW (0.9, 0.98), wd 0.05, 1e-4 after 10,000 warmup steps, cosine to 1e-6), 80k steps,
BF16, 256 images per GPU per step (32 x 8 gradient accumulation), ZeRO-2."""

from hf_vlm.trainers.recipes import Recipe, deepspeed_config
from hf_vlm.trainers.recipes.blip2_flan_t5_xl_stage1 import RECIPE as STAGE1

RECIPE = Recipe(
    name="blip2-flan-t5-xl-stage2",
    stage="blip2-stage2",
    model="blip2-flan-t5-xl",
    training={**STAGE1.training, "max_steps": 80_000, "deepspeed": deepspeed_config("zero2")},
    nodes=STAGE1.nodes,
    gpus_per_node=STAGE1.gpus_per_node,
    source=STAGE1.source,
)
