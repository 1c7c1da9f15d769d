"""LoRA fine-tuning with peft, and bitsandbytes 8-bit / 4-bit loading, for both model families.

`finetune.py --lora` (trainers/training.py) wraps the loaded model with `apply_lora`; `--load_in_8bit` /
`--load_in_4bit` load the checkpoint through `quantization_config`. What LoRA adapts by default is one table,
LORA_TARGET_MODULES, per model family (the config's `model_type`):

  blip2_flant5  the Q-Former's attention (query/key/value of its self- and cross-attention to the image) and
                FlanT5's q/v projections (self-attention in both stacks and the decoder's cross-attention), as
                peft does for T5 on its own
  coca          the multimodal decoder's self- and cross-attention and the attentional pooler(s) that make the
                image tokens it attends to (q/k/v); the separate contrastive pooler only where the contrastive loss
                is trained (not in caption fine-tuning, contrastive_loss_weight 0)

Entries are module-name suffixes, as peft matches `target_modules` (a name equal to the entry or ending in
"." + entry: `attention.attention.query` does not match `crossattention.attention.query`). The ViT and, for CoCa, the unimodal text encoder keep their weights: the adapter trains the parts
that connect image and text. peft is imported only when LoRA is asked for.
"""

from __future__ import annotations

# peft's LoraConfig defaults are r=8, alpha=8, dropout=0; these are the usual fine-tuning values (alpha = 2r).
LORA_R = 16
LORA_ALPHA = 32
LORA_DROPOUT = 0.05

LORA_TARGET_MODULES = {
    "blip2_flant5": [
        # Q-Former self-attention and cross-attention to the image
        *(f"{block}.attention.{p}" for block in ("attention", "crossattention") for p in ("query", "key", "value")),
        # FlanT5 q/v
        "SelfAttention.q", "SelfAttention.v", "EncDecAttention.q", "EncDecAttention.v",
    ],
    "coca": [
        *(f"self_attn_block.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")),
        *(f"cross_attn_block.cross_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")),
        # attn_pool (the captioning queries) and contrastive_pool (CoCa v2's separate contrastive query)
        *(f"{pool}.attention.{p}" for pool in ("attn_pool", "contrastive_pool") for p in ("q_proj", "k_proj", "v_proj")),
    ],
}


def default_lora_target_modules(config) -> list[str]:
    """The module-name suffixes LoRA adapts by default for a model config of either family."""
    model_type = getattr(config, "model_type", None)
    if model_type not in LORA_TARGET_MODULES:
        raise ValueError(
            f"no default LoRA target modules for model_type {model_type!r} (known: {', '.join(LORA_TARGET_MODULES)}): "
            "pass --lora_target_modules"
        )
    targets = list(LORA_TARGET_MODULES[model_type])
    if model_type == "coca" and getattr(config, "contrastive_loss_weight", 1.0) == 0:
        # caption fine-tuning (coca-caption): no loss reaches the contrastive query, whose adapter would stay zero
        targets = [t for t in targets if not t.startswith("contrastive_pool.")]
    return targets


def quantization_config(load_in_8bit: bool = False, load_in_4bit: bool = False, compute_dtype=None):
    """The `BitsAndBytesConfig` for `from_pretrained(..., quantization_config=...)`, or None for neither.

    Which modules stay unquantized is the model's own declaration (`_keep_in_fp32_modules`, which transformers'
    bitsandbytes quantizer leaves alone), not repeated here. 4-bit is NF4 with double quantization (QLoRA's
    setup); its matmuls run in `compute_dtype` (default: float32)."""
    if load_in_8bit and load_in_4bit:
        raise ValueError("--load_in_8bit and --load_in_4bit exclude each other: pick one")
    if not (load_in_8bit or load_in_4bit):
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype or torch.float32,
    )


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False))


def apply_lora(model, r: int = LORA_R, alpha: int = LORA_ALPHA, dropout: float = LORA_DROPOUT,
               target_modules: list[str] | None = None, gradient_checkpointing_kwargs: dict | None = None):
    """Wrap `model` in a peft `PeftModel` whose only trainable weights are LoRA adapters on `target_modules`
    (default: the family's, see the module docstring). Returns the PeftModel; the Trainer saves it as an adapter
    (adapter_config.json + adapter_model.safetensors naming the base's `name_or_path`).

    A bitsandbytes-quantized model first goes through peft's `prepare_model_for_kbit_training` (its unquantized
    half-precision weights are cast to float32 so that the adapter's gradients are computed in float32).
    `gradient_checkpointing_kwargs` (None: no checkpointing) turns checkpointing on before wrapping, so that
    peft makes the embeddings' outputs require grad when reentrant checkpointing needs it.

    No task_type: peft's task wrappers (SEQ_2_SEQ_LM, CAUSAL_LM) are written for text-only language models and
    rename or drop arguments; our models take `pixel_values`, and the plain PeftModel passes every argument through.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    target_modules = list(target_modules) if target_modules else default_lora_target_modules(model.config)
    checkpointing = gradient_checkpointing_kwargs is not None
    load_dtypes = {name: p.dtype for name, p in model.named_parameters()}
    if is_quantized(model):
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs=gradient_checkpointing_kwargs
        )
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules)
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as err:  # peft: "Target modules {...} not found in the base model"
        raise ValueError(f"--lora_target_modules {target_modules} do not name modules of {type(model).__name__}: "
                         f"{err}") from err
    _restore_adapter_free_parts(model, load_dtypes)
    return peft_model


def _restore_adapter_free_parts(model, load_dtypes: dict) -> None:
    """Give the model's top-level parts that hold no adapter their load dtype back.

    `prepare_model_for_kbit_training` casts every half-precision weight that is not quantized to fp32, so that
    what trains next to the int8 layers trains in fp32. A part with no adapter trains nothing, and BLIP-2's ViT,
    which quantization leaves alone (modeling_blip2_flant5: timm's EVA calls F.linear with its weight), is 1B
    parameters: fp32 would cost 2 GiB more than bf16 and make 8-bit save nothing over bf16 LoRA."""
    for part_name, part in model.named_children():
        parameters = dict(part.named_parameters(prefix=part_name))
        if any(p.requires_grad for p in parameters.values()):
            continue
        for name, param in parameters.items():
            dtype = load_dtypes.get(name)
            if dtype is not None and dtype != param.dtype and param.dtype.is_floating_point:
                param.data = param.data.to(dtype)
