"""BLIP-2 FlanT5-XL VQA fine-tuning on ONE 24 GB GPU: LoRA adapters on the Q-Former's attention and FlanT5's
q/v (trainers/lora.py's defaults for the family), the ViT frozen, bf16, gradient checkpointing. The question
prompt, the question-aware Q-Former, schedule shape and global batch are the blip2-flan-t5-xl-vqa recipe's (the
BLIP-2 paper's 16 per GPU on 8 GPUs = 128), here in one step on one GPU; the learning rate is LoRA's usual 1e-4 (adapters start at
zero and need a larger step than full fine-tuning's 1e-5).

The batch per GPU comes from benchmarks/memory_model.py: weights 8.8 GiB (bf16 base, fp32 Q-Former with its
text path), fp32 adapters with their gradients and AdamW state 0.2 GiB, activations about 21 MiB per sample with
gradient checkpointing (the frozen T5's layers are checkpointed too), so the paper's whole global batch of
128 fits in one step (predicted peak 11.5 GiB; the model puts the limit near 670 with 1.5 GiB left to CUDA),
with room for prompts and answers longer than the model's 32 + 8 T5 tokens.
tests/test_memory_model.py checks it against the model. LoRA adapts a saved checkpoint: pass
`--model` (a converted BLIP-2 FlanT5-XL folder or Hub id, bf16); the preset names its architecture.
"""

from hf_vlm.trainers.recipes import Recipe
from hf_vlm.trainers.recipes.blip2_flan_t5_xl_vqa import RECIPE as VQA

GLOBAL_BATCH = VQA.global_batch_size  # 128
PER_DEVICE_BATCH = GLOBAL_BATCH  # fits 24 GB by the memory model (see the module docstring)

RECIPE = Recipe(
    name="blip2-flan-t5-xl-vqa-lora",
    stage="blip2-vqa",
    model="blip2-flan-t5-xl",
    training={
        **{k: v for k, v in VQA.training.items() if k != "deepspeed"},  # one GPU: no ZeRO
        "learning_rate": 1e-4,
        "bf16": True,
        "gradient_checkpointing": True,
        "per_device_train_batch_size": PER_DEVICE_BATCH,
        "gradient_accumulation_steps": GLOBAL_BATCH // PER_DEVICE_BATCH,
    },
    model_overrides={**VQA.model_overrides, "lora": True, "freeze_vision": True, "freeze_language_model": True},
    nodes=1,
    gpus_per_node=1,
    source="BLIP-2 paper section 4.3 (VQA fine-tuning); LoRA r/alpha/targets: trainers/lora.py",
)
