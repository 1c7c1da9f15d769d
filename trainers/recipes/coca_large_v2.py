"""CoCa-Large-v2 pretraining: ViT-L/14 + T5-Large-sized text stacks, contrastive + caption loss
(weights 1.0 / 1.0, set in the model config), AdamW, peak lr 1e-4 with 10% linear warmup then cosine,
BF16, DeepSpeed ZeRO-2, 256 images per GPU on 64 GPUs (8 nodes x 8) = global batch 16,384.
Pass --max_steps for streaming corpora (the run length depends on the corpus)."""

from hf_vlm.trainers.recipes import Recipe, deepspeed_config

RECIPE = Recipe(
    name="coca-large-v2",
    stage="coca",
    model="coca-large-v2",
    training={
        "optim": "adamw_torch",
        "learning_rate": 1e-4,
        "adam_beta1": 0.9,
        "adam_beta2": 0.98,
        "adam_epsilon": 1e-6,  # open_clip's defaults for ViT models (params.py): betas (0.9, 0.98), eps 1e-6, wd 0.2
        "weight_decay": 0.2,
        "warmup_steps": 0.1,  # 10% of the steps (a float < 1 is a fraction in transformers 5)
        "lr_scheduler_type": "cosine",
        "bf16": True,
        "deepspeed": deepspeed_config("zero2"),
        "per_device_train_batch_size": 256,
        "gradient_accumulation_steps": 1,
        "max_grad_norm": 1.0,
        "logging_steps": 50,
        "save_steps": 2000,
        "dataloader_num_workers": 8,
    },
    nodes=8,
    gpus_per_node=8,
    source="project brief (CoCa-Large-v2); betas, eps and weight decay: open_clip's training defaults",
)
