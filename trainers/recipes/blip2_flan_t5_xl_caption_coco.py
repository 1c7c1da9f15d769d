"""BLIP-2 FlanT5-XL caption fine-tuning on COCO, LAVIS-style (projects/blip2/train/caption_coco_ft.yaml):
prompt "a photo of", AdamW wd 0.05, lr 1e-5 after 1,000 warmup steps then cosine, 5 epochs, 16 per GPU on
8 GPUs, the ViT unfrozen (--freeze_vision true keeps it frozen), T5 frozen, BF16."""

from hf_vlm.trainers.recipes import Recipe, deepspeed_config

RECIPE = Recipe(
    name="blip2-flan-t5-xl-caption-coco",
    stage="blip2-caption",
    model="blip2-flan-t5-xl",
    training={
        "optim": "adamw_torch",
        "learning_rate": 1e-5,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "weight_decay": 0.05,
        "warmup_steps": 1000,
        "lr_scheduler_type": "cosine",
        "num_train_epochs": 5,
        "bf16": True,
        "deepspeed": deepspeed_config("zero2"),
        "per_device_train_batch_size": 16,
        "logging_steps": 50,
        "save_strategy": "epoch",
        "dataloader_num_workers": 8,
    },
    model_overrides={"freeze_vision": False, "freeze_language_model": True},
    nodes=1,
    gpus_per_node=8,
    source="LAVIS projects/blip2/train/caption_coco_ft.yaml",
)
