"""BLIP-2 FlanT5-XL stage 1: the Q-Former learns with ITC + ITM + ITG against the frozen EVA ViT-g.
AdamW (0.9, 0.98), weight decay 0.05, peak lr 1e-4 after 10,000 linear warmup steps, cosine down to
1e-6, 250k steps, BF16, 256 images per GPU per step (32 x 8 gradient accumulation), ZeRO-2."""

from hf_vlm.trainers.recipes import Recipe, deepspeed_config

RECIPE = Recipe(
    name="blip2-flan-t5-xl-stage1",
    stage="blip2-stage1",
    model="blip2-flan-t5-xl",
    training={
        "optim": "adamw_torch",
        "learning_rate": 1e-4,
        "adam_beta1": 0.9,
        "adam_beta2": 0.98,
        "weight_decay": 0.05,
        "warmup_steps": 10_000,
        "lr_scheduler_type": "cosine_with_min_lr",
        "lr_scheduler_kwargs": {"min_lr": 1e-6},
        "max_steps": 250_000,
        "bf16": True,
        "deepspeed": deepspeed_config("zero2"),
        "per_device_train_batch_size": 32,
        "gradient_accumulation_steps": 8,
        "logging_steps": 50,
        "save_steps": 5000,
        "dataloader_num_workers": 8,
    },
    nodes=2,
    gpus_per_node=8,
    source="BLIP-2 paper section 3.4 and LAVIS blip2 pretrain configs",
)
