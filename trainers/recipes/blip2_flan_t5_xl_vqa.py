"""BLIP-2 FlanT5-XL VQA fine-tuning (VQAv2), as the BLIP-2 paper fine-tunes for VQA: prompt
"Question: {} Short answer:", ViT and Q-Former trained, FlanT5 frozen, AdamW wd 0.05, lr 1e-5 after
1,000 warmup steps then cosine, 5 epochs, 16 per GPU on 8 GPUs, BF16. The Q-Former also reads the question
(`qformer_text_input`, paper section 4.3): the processor needs the Q-Former's BERT tokenizer, and the Q-Former's
text path starts from stage 1 (`--init_qformer_from`) or a checkpoint that has one (else it starts random)."""

from hf_vlm.trainers.recipes import Recipe
from hf_vlm.trainers.recipes.blip2_flan_t5_xl_caption_coco import RECIPE as CAPTION

RECIPE = Recipe(
    name="blip2-flan-t5-xl-vqa",
    stage="blip2-vqa",
    model="blip2-flan-t5-xl",
    training=dict(CAPTION.training),
    model_overrides={**CAPTION.model_overrides, "qformer_text_input": True},
    nodes=CAPTION.nodes,
    gpus_per_node=CAPTION.gpus_per_node,
    source="BLIP-2 paper section 4.3; LAVIS fine-tuning defaults",
)
