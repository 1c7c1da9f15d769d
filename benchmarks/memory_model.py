"""Peak training memory on one GPU: weights, gradients, optimizer state and activations, per batch size.

For the two full-size families (presets `blip2-flan-t5-xl`, `coca-large-v2`) and three set-ups, all with
bf16 autocast (the Trainer's `--bf16`) and AdamW:

  full       every weight trains; fp32 weights, fp32 gradients, AdamW's two fp32 moments (16 bytes/parameter)
  lora       LoRA adapters (trainers/lora.py: the family's default targets, rank, alpha) on a bf16 base; the
             modules the model lists in `_keep_in_fp32_modules` counted in fp32 (an overestimate for a bf16
             checkpoint, see `_keep_in_fp32`); the adapters are fp32 (peft), and only they have gradients and
             optimizer state
  lora-8bit  the same adapters on a bitsandbytes 8-bit base: quantized linear layers hold int8 weights plus one
             fp32 scale per output row; peft's `prepare_model_for_kbit_training` (which `apply_lora` calls) casts
             every other weight to fp32

Parameters are counted on the meta device: the real config, the real model class, peft's real LoRA injection
(trainers/lora.py's `apply_lora`). Activations come from a calibration (`calibrate`, written to
memory_model_calibration.json): forward passes of the real model at the real widths with 1 and 2 layers per
stack (2 and 4 for the Q-Former, whose cross-attention is every other layer), batch 1 and 2, on CPU, counting
the bytes autograd saves for backward (saved-tensor hooks, each storage once) — fitted per stack as bytes per
layer per token per sample plus a batch-independent part per layer (autocast's bf16 copies of fp32 weights),
and outside the stacks per sample and fixed. A prediction adds each stack's layers at their real depth. With
gradient checkpointing, a checkpointed stack keeps each layer's output instead and backward recomputes one layer;
transformers' layers checkpoint only in training mode, so a frozen part the model keeps in eval mode (BLIP-2's
frozen ViT; its frozen T5's layers follow train() so that they are checkpointed) keeps everything
(`checkpointed_stacks` asks the model). The optimizer step's own peak is
AdamW's foreach transient, one fp32 copy of the trainable parameters.

    peak = weights + optimizer state + gradients + max(activations, AdamW transient)

Checked against measured peaks (`check-tiny`, `check-full`): torch's CPU allocations over a real training step
(profiler memory events, AdamW foreach, bf16 autocast) plus weights and AdamW state, and the process's RSS
high-water mark; records in results/cpu/memory_model__*.json. On a GPU add the CUDA context and allocator slack
(`CUDA_OVERHEAD_BYTES`).

Commands:
    python -m benchmarks.memory_model calibrate   # ~15 min on 2 idle cores; writes memory_model_calibration.json
    python -m benchmarks.memory_model check-tiny  # predicted vs measured on the tiny presets -> results/cpu
    python -m benchmarks.memory_model check-full  # ONE full-size BLIP-2-FlanT5-XL LoRA step on CPU (11 GB RAM)
    python -m benchmarks.memory_model table       # the README table (largest batch per GPU that fits)
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

CALIBRATION_FILE = Path(__file__).parent / "memory_model_calibration.json"
MODES = ("full", "lora", "lora-8bit")
GIB = 2**30
# What the CUDA caching allocator, cuBLAS workspaces and the CUDA context take beyond the tensors: a fixed margin
# subtracted from the card's size before batches are fitted (the model predicts tensor bytes).
CUDA_OVERHEAD_BYTES = 1.5 * GIB


# ---------------------------------------------------------------------------------------------- the families


@dataclass(frozen=True)
class Stack:
    """One stack of identical layers: where its depth is set in the preset, where its layers live, how many
    tokens pass through each layer per sample."""

    name: str
    depth_keys: tuple  # paths in the preset dict where its depth is set
    layers: tuple  # attribute paths of its nn.ModuleLists in the model (T5: encoder and decoder blocks)
    tokens: callable  # (config, lengths) -> tokens per sample
    step: int = 1  # calibration depths: step and 2*step (the Q-Former alternates layers with/without cross-attention)


def _vision_tokens(config, lengths):
    vision = config.vision_config
    patch = getattr(vision, "patch_size", None) or vision.timm_model_args.get("patch_size", 14)
    return (vision.image_size // patch) ** 2 + 1


def _qformer_tokens(config, lengths):
    # the queries, and the question when the Q-Former reads it (qformer_text_input: BLIP-2's VQA fine-tuning)
    return config.num_query_tokens + (lengths["question"] if getattr(config, "qformer_text_input", False) else 0)


def _coca_text_tokens(config, lengths):
    # the text encoder appends a CLS token, which takes one of max_position_embeddings
    return min(lengths["text"], config.text_config.max_position_embeddings - 1)


@dataclass(frozen=True)
class Family:
    preset: str
    tiny_preset: str
    model_class: str  # "module:Class"
    stacks: tuple
    lengths: dict  # token lengths of the calibration batch (and the default prediction)
    full_overrides: dict = field(default_factory=dict)  # config fields that make every part trainable

    def load_class(self):
        import importlib

        import hf_vlm  # noqa: F401  (registers the model types with the Auto classes)

        module, name = self.model_class.split(":")
        return getattr(importlib.import_module(module), name)


FAMILIES = {
    "blip2-flan-t5-xl": Family(
        preset="blip2-flan-t5-xl",
        tiny_preset="blip2-tiny",
        model_class="hf_vlm.modeling.blip2_flant5:Blip2FlanT5ForConditionalGeneration",
        stacks=(
            Stack("vision", (("vision_config", "num_hidden_layers"),), ("vision_model.blocks",), _vision_tokens),
            Stack("qformer", (("qformer_config", "num_hidden_layers"),), ("qformer.encoder.layer",),
                  _qformer_tokens, step=2),
            # T5's encoder and decoder are one stack of layer pairs: the config requires equal depths. A pair's
            # tokens: the encoder's (queries + prompt) and the decoder's (answer)
            Stack("t5", (("text_config", "num_layers"), ("text_config", "num_decoder_layers")),
                  ("language_model.encoder.block", "language_model.decoder.block"), lambda c, n: c.num_query_tokens + n["prompt"] + n["answer"]),
        ),
        # VQA: "Question: {} Short answer:" with a question (~20 T5 tokens, 32 leaves room) and a short answer;
        # the question in the Q-Former's tokenizer, when it reads it (up to its max_text_length, 32)
        lengths={"prompt": 32, "answer": 8, "question": 32},
        full_overrides={"freeze_vision": False, "freeze_language_model": False},
    ),
    "coca-large-v2": Family(
        preset="coca-large-v2",
        tiny_preset="coca-tiny",
        model_class="hf_vlm.modeling.coca:CocaModel",
        stacks=(
            Stack("vision", (("vision_config", "timm_model_args", "depth"),), ("vision_model.trunk.blocks",),
                  _vision_tokens),
            Stack("text", (("text_config", "num_hidden_layers"),), ("text_model.layers",), _coca_text_tokens),
            Stack("decoder", (("multimodal_config", "num_hidden_layers"),), ("text_decoder.layers",),
                  _coca_text_tokens),
        ),
        lengths={"text": 77},  # CoCa's context length (max_position_embeddings)
    ),
}


def family_of(preset: str) -> Family:
    for family in FAMILIES.values():
        if preset in (family.preset, family.tiny_preset):
            return family
    raise ValueError(f"no memory model for preset {preset!r}; known: "
                     f"{', '.join(p for f in FAMILIES.values() for p in (f.preset, f.tiny_preset))}")


def _get_path(module, path: str):
    for part in path.split("."):
        module = getattr(module, part)
    return module


def build_config(preset: str, mode: str, depths: dict | None = None, overrides: dict | None = None):
    """The preset's config, every part trainable for `full`, stack depths replaced by `depths` (name -> layers),
    top-level config fields replaced by `overrides` (e.g. a recipe's qformer_text_input)."""
    import copy

    from transformers import AutoConfig

    from hf_vlm.presets import preset_dict

    family = family_of(preset)
    kwargs = copy.deepcopy(preset_dict(preset))
    for stack in family.stacks:
        for depth_key in stack.depth_keys if depths and stack.name in depths else ():
            node = kwargs
            for key in depth_key[:-1]:
                node = node.setdefault(key, {})
            node[depth_key[-1]] = depths[stack.name]
    if mode == "full":
        kwargs.update(family.full_overrides)
    kwargs.update(overrides or {})
    model_type = kwargs.pop("model_type")
    return AutoConfig.for_model(model_type, **kwargs)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")


# ------------------------------------------------------------------------------------- parameter accounting


def _keep_in_fp32(model, name: str) -> bool:
    """Whether the parameter is in a module the model declares `_keep_in_fp32_modules` (BLIP-2: the Q-Former and
    query tokens; T5's `wo`). Quantization leaves these alone. The LoRA rows count them in fp32 too, as the full-size
    check measured; transformers 5.23's `from_pretrained(dtype=bfloat16)` upcasts only `_keep_in_fp32_modules_strict`,
    so a bf16 checkpoint loads them in bf16 (BLIP-2: 1.2 GiB less than counted here)."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    return any(module in name.split(".") for module in keep)


def _quantized_linears(model) -> dict:
    """name -> nn.Linear that bitsandbytes 8-bit replaces: every nn.Linear outside the modules the model keeps in
    fp32 (transformers' quantizer leaves `_keep_in_fp32_modules` alone) and outside the output embeddings."""
    output = model.get_output_embeddings()
    return {name: module for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not output and not _keep_in_fp32(model, name)
            and ".lora_" not in name}  # peft's adapters are fp32 trainable layers


def meta_model(preset: str, mode: str, depths: dict | None = None, lora: dict | None = None,
               overrides: dict | None = None):
    """The model on the meta device as it trains in `mode`: for the LoRA modes, wrapped by the project's own
    `apply_lora` (real peft injection; the adapters are fp32 as peft makes them)."""
    _check_mode(mode)
    family = family_of(preset)
    config = build_config(preset, mode, depths, overrides)
    if mode == "lora-8bit":
        from hf_vlm.trainers.lora import quantization_config

        # a quantized load: the model declares what quantization leaves alone (BLIP-2: its ViT too)
        config.quantization_config = quantization_config(load_in_8bit=True)
    with torch.device("meta"):
        model = family.load_class()._from_config(config)
    if mode != "full":
        from hf_vlm.trainers.lora import apply_lora

        model = apply_lora(model, **(lora or {}))
    return model


@dataclass
class ParameterBytes:
    parameters: int
    trainable: int
    weights: float  # bytes
    gradients: float
    optimizer: float  # AdamW's two moments
    optimizer_transient: float  # AdamW foreach: one temporary copy of the trainable parameters


def _plain(name: str) -> str:
    """A parameter's name in the unwrapped base model."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def parameter_bytes(model, mode: str) -> ParameterBytes:
    """Bytes of weights, gradients and AdamW state of `model` (from `meta_model`) training in `mode`."""
    _check_mode(mode)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # peft renames a wrapped layer's weight to `<name>.base_layer.weight`; compare names without it
    quantized_rows = {_plain(f"{name}.weight"): m.out_features for name, m in _quantized_linears(base).items()}
    quantized = set(quantized_rows) if mode == "lora-8bit" else set()
    # apply_lora gives a top-level part without adapters its load dtype back after peft's fp32 upcast (BLIP-2's ViT)
    with_adapters = {name.split(".")[0] for name, p in base.named_parameters() if p.requires_grad}
    parameters = trainable = 0
    weights = 0.0
    for name, param in model.named_parameters():
        numel = param.numel()
        parameters += numel
        trainable += numel if param.requires_grad else 0
        plain = _plain(name)
        if mode == "full" or param.requires_grad:
            weights += 4 * numel  # fp32 (adapters are fp32 too)
        elif mode == "lora":
            weights += (4 if _keep_in_fp32(base, plain) else 2) * numel
        elif plain in quantized:
            weights += numel + 4 * quantized_rows[plain]  # int8 weight + one fp32 scale per output row
        elif plain.split(".")[0] in with_adapters:
            weights += 4 * numel  # prepare_model_for_kbit_training casts the rest to fp32
        else:  # as loaded from a bf16 checkpoint: what the class keeps in fp32 (BLIP-2's query tokens) in fp32
            weights += (4 if any(m in plain.split(".") for m in type(base)._keep_in_fp32_modules or []) else 2) * numel
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    return ParameterBytes(parameters, trainable, weights, gradients=4.0 * trainable, optimizer=8.0 * trainable,
                          optimizer_transient=4.0 * trainable)


# ------------------------------------------------------------------------------------ measuring a real step


def _batch(config, family: Family, batch_size: int, lengths: dict, dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    size = config.vision_config.image_size
    pixel_values = torch.randn(batch_size, 3, size, size, generator=g, dtype=dtype)
    if family.preset == "blip2-flan-t5-xl":
        vocab = config.text_config.vocab_size
        return {"pixel_values": pixel_values,
                "input_ids": torch.randint(2, vocab, (batch_size, lengths["prompt"]), generator=g),
                "attention_mask": torch.ones(batch_size, lengths["prompt"], dtype=torch.long),
                "labels": torch.randint(2, vocab, (batch_size, lengths["answer"]), generator=g)}
    vocab = config.text_config.vocab_size
    text = _coca_text_tokens(config, lengths)
    return {"pixel_values": pixel_values, "input_ids": torch.randint(4, vocab, (batch_size, text), generator=g),
            "return_loss": True}


def build_real_model(preset: str, mode: str, depths: dict | None = None, lora: dict | None = None):
    """The model with random weights on CPU, as the Trainer trains it in `mode` (lora-8bit is not measured:
    bitsandbytes' CPU kernels are not the GPU's)."""
    if mode not in ("full", "lora"):
        raise ValueError(f"mode {mode!r} cannot be measured on CPU; measured modes: full, lora")
    model_class = family_of(preset).load_class()
    if mode == "full":
        return model_class._from_config(build_config(preset, mode, depths))
    from hf_vlm.trainers.lora import apply_lora

    model = model_class._from_config(build_config(preset, mode, depths), dtype=torch.bfloat16)
    for name, param in model.named_parameters():  # the accounting's fp32 modules (see _keep_in_fp32)
        if _keep_in_fp32(model, name):
            param.data = param.data.float()
    return apply_lora(model, **(lora or {}))


def _set_checkpointing(model, on: bool) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if on:  # transformers' default (non-reentrant), as the Trainer's --gradient_checkpointing turns it on
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_disable()


def _profiled_peaks(run_step) -> tuple[float, float]:
    """Peak bytes of torch's CPU allocations above the start, during forward+backward and during the optimizer
    step, from the profiler's memory events ("Total Allocated" counts from the start of profiling)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run_step(record_function)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    optimizer_start = min(e["ts"] for e in events if e.get("name") == "optimizer_step")
    memory = [(e["ts"], e["args"]["Total Allocated"]) for e in events
              if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    before = max((a for ts, a in memory if ts < optimizer_start), default=0)
    during = max((a for ts, a in memory if ts >= optimizer_start), default=0)
    return float(before), float(during)


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def _train_step(model, optimizer, batch: dict, record_function=None) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the Trainer's --bf16
        loss = model(**batch).loss
    loss.backward()
    if record_function is None:
        optimizer.step()
    else:
        with record_function("optimizer_step"):
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure_steps(preset: str, mode: str, cases: list[tuple[int, bool]], depths: dict | None = None,
                  lengths: dict | None = None, lora: dict | None = None) -> list[dict]:
    """Training steps measured on one model, for each (batch size, gradient checkpointing) in `cases`: a profiled
    step, after a first one that creates AdamW's state. Returns bytes per case: weights (parameters +
    buffers), optimizer (AdamW state), gradients, and the profiled step's peak of torch allocations above them,
    during forward+backward (`activations`: beyond the gradients it allocates) and during the optimizer step."""
    family = family_of(preset)
    lengths = lengths or family.lengths
    torch.manual_seed(0)
    model = build_real_model(preset, mode, depths, lora)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, foreach=True)  # foreach, as on a GPU
    results = []
    for batch_size, gradient_checkpointing in cases:
        _set_checkpointing(model, gradient_checkpointing)
        batch = _batch(model.config, family, batch_size, lengths, torch.float32)

        if not optimizer.state:  # AdamW's state exists from the second step on, as in a long run
            _train_step(model, optimizer, batch)
        weights = _tensor_bytes(list(model.parameters()) + list(model.buffers()))
        state = _tensor_bytes(t for s in optimizer.state.values() for t in s.values() if t.dim() > 0)
        gradients = sum(p.numel() * p.element_size() for p in trainable)
        fwd_bwd, opt = _profiled_peaks(functools.partial(_train_step, model, optimizer, batch))
        results.append({"batch_size": batch_size, "gradient_checkpointing": gradient_checkpointing,
                        "weights": weights, "optimizer": state, "gradients": gradients,
                        "activations": fwd_bwd - gradients, "optimizer_transient": opt - gradients,
                        "peak": weights + state + max(fwd_bwd, opt)})
    del model, optimizer
    gc.collect()
    return results


def measure_step(preset: str, mode: str, batch_size: int, gradient_checkpointing: bool, **kwargs) -> dict:
    return measure_steps(preset, mode, [(batch_size, gradient_checkpointing)], **kwargs)[0]


# ------------------------------------------------------------------------------------------- calibration


@functools.lru_cache(maxsize=8)
def _depths_of(preset: str) -> dict:
    """Each stack's layer count in the preset (counted on the meta device)."""
    family = family_of(preset)
    with torch.device("meta"):
        model = family.load_class()._from_config(build_config(preset, "lora"))
    return {s.name: len(_get_path(model, s.layers[0])) for s in family.stacks}


def saved_activations(model, batch: dict, family: Family) -> tuple[int, dict]:
    """Run the forward pass (bf16 autocast) and return the bytes autograd keeps for backward (saved tensors, each
    storage once, weights not counted) and, per stack, the bytes of its first layer's output: what gradient
    checkpointing keeps per layer instead of the layer's saved tensors."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    weights = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() and storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    boundary, handles = {}, []
    for stack in family.stacks:
        for path in stack.layers:
            def hook(module, args, output, name=stack.name):
                first = output if torch.is_tensor(output) else next(o for o in output if torch.is_tensor(o))
                boundary[name] = boundary.get(name, 0) + first.numel() * first.element_size()
            handles.append(_get_path(base, path)[0].register_forward_hook(hook))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(**batch).loss
    finally:
        for handle in handles:
            handle.remove()
    del loss
    return sum(saved.values()), boundary


def calibrate(preset: str, mode: str, lora: dict | None = None, log=print) -> dict:
    """Activation coefficients of one (preset widths, mode) from forward passes at 1 and 2 layers per stack
    (2 and 4 for the Q-Former) and batch 1 and 2: per stack, saved bytes per layer per token per sample, a
    batch-independent part per layer (e.g. autocast's bf16 copies of fp32 weights), and the layer output's bytes
    per token per sample; outside the stacks (embeddings, pooling, logits, loss), per sample and fixed."""
    family = family_of(preset)
    base = {s.name: s.step for s in family.stacks}
    runs = [dict(base)] + [{**base, s.name: 2 * s.step} for s in family.stacks]
    saved, boundary = {}, {}
    for i, depths in enumerate(runs):
        start = time.perf_counter()
        torch.manual_seed(0)
        model = build_real_model(preset, mode, depths, lora)
        model.train()
        for batch_size in (1, 2):
            batch = _batch(model.config, family, batch_size, family.lengths, torch.float32)
            saved[i, batch_size], boundary[i, batch_size] = saved_activations(model, batch, family)
        del model
        gc.collect()
        log(f"  {preset} {mode} depths={depths}: saved b1 {saved[i, 1] / 2**20:.1f} MiB, "
            f"b2 {saved[i, 2] / 2**20:.1f} MiB ({time.perf_counter() - start:.0f} s)")
    config = build_config(preset, mode)
    per_sample = {i: saved[i, 2] - saved[i, 1] for i in range(len(runs))}
    fixed = {i: saved[i, 1] - per_sample[i] for i in range(len(runs))}
    stacks = {}
    for j, stack in enumerate(family.stacks, start=1):
        tokens = stack.tokens(config, family.lengths)
        stacks[stack.name] = {
            "saved_bytes_per_layer_token_sample": (per_sample[j] - per_sample[0]) / stack.step / tokens,
            "saved_bytes_per_layer_fixed": (fixed[j] - fixed[0]) / stack.step,
            "output_bytes_per_token_sample": boundary[0, 1][stack.name] / tokens,
        }
    outside_sample = per_sample[0] - sum(
        stack.step * stacks[stack.name]["saved_bytes_per_layer_token_sample"] * stack.tokens(config, family.lengths)
        for stack in family.stacks)
    outside_fixed = fixed[0] - sum(stack.step * stacks[stack.name]["saved_bytes_per_layer_fixed"]
                                   for stack in family.stacks)
    return {"stacks": stacks, "outside_bytes_per_sample": outside_sample, "outside_bytes_fixed": outside_fixed,
            "lengths": family.lengths, "calibration_depths": base,
            "saved_bytes": {f"depths={runs[i]} batch={b}": saved[i, b] for i in range(len(runs)) for b in (1, 2)}}


def _key(mode: str) -> str:
    # 8-bit keeps LoRA's activations: the same adapters and graph, int8 matmuls in place of bf16 ones
    return "lora" if mode == "lora-8bit" else mode


def load_calibration(path: Path = CALIBRATION_FILE) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `python -m benchmarks.memory_model calibrate`")
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------- prediction


@dataclass
class Prediction:
    preset: str
    mode: str
    batch_size: int
    gradient_checkpointing: bool
    parameters: int
    trainable: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    optimizer_transient: float

    @property
    def peak(self) -> float:
        return self.weights + self.optimizer + self.gradients + max(self.activations, self.optimizer_transient)


def checkpointed_stacks(model, family: Family) -> set:
    """The stacks whose layers gradient checkpointing applies to in training mode: transformers' layers checkpoint
    only while `training` is set, and a frozen part the model keeps in eval mode (BLIP-2's frozen ViT) keeps every saved
    tensor even with --gradient_checkpointing."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.train()
    return {stack.name for stack in family.stacks if _get_path(base, stack.layers[0])[0].training}


def activation_bytes(coefficients: dict, config, family: Family, depths: dict, batch_size: int,
                     gradient_checkpointing, lengths: dict | None = None) -> float:
    """Without checkpointing every layer keeps its saved tensors; with it (`gradient_checkpointing`: the set of
    stacks it applies to, or True for all), a checkpointed stack that keeps anything keeps each layer's output
    instead, and backward recomputes one layer at a time (the largest one's saved tensors)."""
    lengths = lengths or family.lengths
    if gradient_checkpointing is True:
        gradient_checkpointing = {stack.name for stack in family.stacks}
    total = coefficients["outside_bytes_fixed"] + batch_size * coefficients["outside_bytes_per_sample"]
    largest_layer = 0.0
    for stack in family.stacks:
        c = coefficients["stacks"][stack.name]
        tokens = stack.tokens(config, lengths)
        layer = max(0.0, c["saved_bytes_per_layer_fixed"] + batch_size * tokens * c["saved_bytes_per_layer_token_sample"])
        if not gradient_checkpointing or stack.name not in gradient_checkpointing:
            total += depths[stack.name] * layer
        elif layer > 0:
            total += depths[stack.name] * batch_size * tokens * c["output_bytes_per_token_sample"]
            largest_layer = max(largest_layer, layer)
    return max(0.0, total + largest_layer)


@functools.lru_cache(maxsize=32)
def _static(preset: str, mode: str, depths: str, lora: str, overrides: str) -> tuple[ParameterBytes, frozenset]:
    """Parameter bytes and checkpointed stacks of one set-up (a meta model build takes seconds: cached)."""
    model = meta_model(preset, mode, json.loads(depths), json.loads(lora), json.loads(overrides))
    return parameter_bytes(model, mode), frozenset(checkpointed_stacks(model, family_of(preset)))


def predict(preset: str, mode: str, batch_size: int, gradient_checkpointing: bool, calibration: dict | None = None,
            depths: dict | None = None, lengths: dict | None = None, lora: dict | None = None,
            config_overrides: dict | None = None) -> Prediction:
    """Peak training memory (bytes) of `preset` in `mode` at `batch_size` per GPU. `calibration`: the
    coefficients file's content, keyed by the preset (the widths they were measured at). `config_overrides`:
    config fields a recipe changes (qformer_text_input adds the Q-Former's text path and question tokens, counted
    with the query path's per-token coefficients)."""
    family = family_of(preset)
    calibration = calibration if calibration is not None else load_calibration()
    if family.preset not in calibration and preset not in calibration:
        raise KeyError(f"calibration has no entry for {preset!r} (has {sorted(calibration)})")
    coefficients = (calibration.get(preset) or calibration[family.preset])[_key(mode)]
    counts, checkpointed = _static(preset, mode, json.dumps(depths, sort_keys=True), json.dumps(lora, sort_keys=True),
                                   json.dumps(config_overrides, sort_keys=True))
    depths = {**_depths_of(preset), **(depths or {})}
    checkpointed = checkpointed if gradient_checkpointing else set()
    activations = activation_bytes(coefficients, build_config(preset, mode, depths, config_overrides), family,
                                   depths, batch_size, checkpointed, lengths)
    return Prediction(preset, mode, batch_size, gradient_checkpointing, counts.parameters, counts.trainable,
                      counts.weights, counts.gradients, counts.optimizer, activations, counts.optimizer_transient)


def largest_batch(preset: str, mode: str, gpu_gib: float, gradient_checkpointing: bool = True,
                  calibration: dict | None = None, limit: int = 1024, config_overrides: dict | None = None) -> int:
    """The largest batch per GPU (at most `limit`) whose predicted peak fits `gpu_gib` less the CUDA overhead;
    0 when not even batch 1 fits. Activations grow linearly with the batch; the AdamW transient does not."""
    calibration = calibration if calibration is not None else load_calibration()
    budget = gpu_gib * GIB - CUDA_OVERHEAD_BYTES
    one = predict(preset, mode, 1, gradient_checkpointing, calibration, config_overrides=config_overrides)
    two = predict(preset, mode, 2, gradient_checkpointing, calibration, config_overrides=config_overrides)
    per_sample = two.activations - one.activations
    static = one.weights + one.optimizer + one.gradients
    if static + max(one.activations, one.optimizer_transient) > budget:
        return 0
    if per_sample <= 0:
        return limit
    return int(min(limit, 1 + (budget - static - one.activations) // per_sample))


# ------------------------------------------------------------------------------------------- the commands


def _proc_status_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def measure_in_child(preset: str, mode: str, batch_size: int, gradient_checkpointing: bool,
                     depths: dict | None = None, timeout: float = 3600) -> dict:
    """`measure_step` in a fresh Python process, adding its RSS high-water mark (VmHWM) above the RSS after the
    imports, before the model was built. glibc is told to mmap every allocation over 128 KiB, so freed tensors
    leave the RSS."""
    import subprocess

    argv = [sys.executable, "-m", "benchmarks.memory_model", "_child", json.dumps(
        {"preset": preset, "mode": mode, "batch_size": batch_size, "gradient_checkpointing": gradient_checkpointing,
         "depths": depths})]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=Path(__file__).resolve().parent.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring {preset} {mode} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child(spec: str) -> None:
    args = json.loads(spec)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    family_of(args["preset"]).load_class()  # the imports (transformers, peft) before the baseline, not in the peak
    import peft  # noqa: F401

    rss_before = _proc_status_kib("VmRSS") * 1024
    start = time.perf_counter()
    result = measure_step(args["preset"], args["mode"], args["batch_size"], args["gradient_checkpointing"],
                          depths=args.get("depths"))
    result["rss_peak_above_start"] = _proc_status_kib("VmHWM") * 1024 - rss_before
    result["seconds"] = time.perf_counter() - start
    print(json.dumps(result))


def _record(case: str, params: dict, predicted: Prediction, measured: dict, notes: str, seconds: float):
    from benchmarks import harness

    mib = 2**20
    metrics = {
        "peak MiB (torch allocations)": {"ours": predicted.peak / mib, "upstream": measured["peak"] / mib,
                                         "ratio": predicted.peak / measured["peak"]},
        "weights MiB": {"ours": predicted.weights / mib, "upstream": measured["weights"] / mib,
                        "ratio": predicted.weights / measured["weights"]},
        "activations MiB": {"ours": predicted.activations / mib, "upstream": measured["activations"] / mib,
                            "ratio": predicted.activations / measured["activations"]
                            if measured["activations"] > 0 else None},
    }
    # the process's RSS also holds the profiler's buffers, oneDNN's scratch and allocator slack (hundreds of MiB):
    # a check only where the tensors dwarf them
    if "rss_peak_above_start" in measured and measured["peak"] > GIB:
        rss = measured["rss_peak_above_start"]
        metrics["peak MiB (process RSS high-water above start)"] = {
            "ours": predicted.peak / mib, "upstream": rss / mib, "ratio": predicted.peak / rss}
    return harness.Record(benchmark="memory_model", case=case, params=params, metrics=metrics,
                          seconds={"ours": [], "upstream": [seconds], "ours_median": None, "upstream_median": seconds},
                          checks={"same_trainable_parameters": predicted.gradients == measured["gradients"]},
                          notes=notes)


NOTES = ("ours = the memory model's prediction, upstream = measured on CPU: the peak of torch's CPU allocations "
         "(profiler memory events) of the second of two training steps (AdamW foreach, bf16 autocast), plus the "
         "weights and optimizer state held before it; the RSS row is the fresh process's VmHWM above its RSS "
         "after the imports, before the model was built (glibc mmap threshold 128 KiB), which also counts the first step and "
         "allocator slack. ratio = predicted / measured.")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cal = sub.add_parser("calibrate")
    cal.add_argument("--presets", nargs="+", default=list(FAMILIES))
    cal.add_argument("--out", type=Path, default=CALIBRATION_FILE)
    for name in ("check-tiny", "check-full"):
        p = sub.add_parser(name)
        p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpu")
        p.add_argument("--batch-size", type=int, default=2)
        p.add_argument("--measured", type=Path, help="a measurement `_child` printed already (skips measuring)")
    sub.add_parser("table")
    child = sub.add_parser("_child")
    child.add_argument("spec")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    if args.command == "_child":
        return _child(args.spec)
    if args.command == "calibrate":
        calibration = json.loads(args.out.read_text()) if args.out.is_file() else {}
        for preset in args.presets:
            calibration[preset] = {mode: calibrate(preset, mode, log=lambda m: print(m, file=sys.stderr, flush=True))
                                   for mode in ("full", "lora")}
            args.out.write_text(json.dumps(calibration, indent=2, sort_keys=True) + "\n")
        return
    if args.command == "table":
        print(readme_table())
        return
    from benchmarks import harness

    calibration = load_calibration()
    if args.command == "check-tiny":
        # at a depth and batch the calibration did not see: 3 layers per stack (6 Q-Former layers), batch 4
        batch_size = args.batch_size if args.batch_size != 2 else 4
        for family in FAMILIES.values():
            depths = {stack.name: 3 * stack.step for stack in family.stacks}
            for mode in ("full", "lora"):
                for checkpointing in (False, True):
                    measured = measure_in_child(family.tiny_preset, mode, batch_size, checkpointing, depths)
                    predicted = predict(family.tiny_preset, mode, batch_size, checkpointing, calibration, depths)
                    case = f"{family.tiny_preset}_{mode}_{'ckpt' if checkpointing else 'nockpt'}_b{batch_size}_l3"
                    record = _record(case, {"preset": family.tiny_preset, "mode": mode, "batch": batch_size,
                                            "depths": depths, "gradient_checkpointing": checkpointing,
                                            "lengths": family.lengths, "dtype": "bf16 autocast"},
                                     predicted, measured, NOTES, measured["seconds"])
                    harness.save(record, args.out)
                    print(case, {k: round(v["ratio"], 3) for k, v in record.metrics.items() if v["ratio"]},
                          file=sys.stderr)
        return
    if args.command == "check-full":
        preset, mode, checkpointing = "blip2-flan-t5-xl", "lora", True
        if args.measured:
            measured = json.loads(args.measured.read_text().strip().splitlines()[-1])
        else:
            measured = measure_in_child(preset, mode, args.batch_size, checkpointing)
        predicted = predict(preset, mode, measured["batch_size"], checkpointing, calibration)
        case = f"{preset}_{mode}_ckpt_b{measured['batch_size']}"
        record = _record(case, {"preset": preset, "mode": mode, "batch": measured["batch_size"],
                                "gradient_checkpointing": checkpointing, "lengths": FAMILIES[preset].lengths,
                                "dtype": "bf16 weights (Q-Former fp32), bf16 autocast", "weights": "random"},
                         predicted, measured,
                         NOTES + " One real full-size step (random weights built in bf16, LoRA adapters fp32).",
                         measured["seconds"])
        harness.save(record, args.out)
        print(json.dumps(record.metrics, indent=1), file=sys.stderr)


GPU_GIB = (24, 40, 80)


def readme_table(calibration: dict | None = None) -> str:
    """Markdown: the largest batch per GPU that fits, per family, mode and card (gradient checkpointing on)."""
    calibration = calibration if calibration is not None else load_calibration()
    names = {"full": "full fine-tuning", "lora": "LoRA", "lora-8bit": "LoRA + 8-bit"}
    lines = ["| model | set-up | weights + grads + AdamW | activations / sample | "
             + " | ".join(f"{g} GB" for g in GPU_GIB) + " |",
             "|---|---|---|---|" + "---|" * len(GPU_GIB)]
    for family in FAMILIES.values():
        for mode in MODES:
            one = predict(family.preset, mode, 1, True, calibration)
            two = predict(family.preset, mode, 2, True, calibration)
            static = one.weights + one.gradients + one.optimizer
            cells = []
            for gib in GPU_GIB:
                batch = largest_batch(family.preset, mode, gib, True, calibration)
                cells.append("does not fit" if not batch else f"≥ {batch}" if batch == 1024 else f"{batch}")
            lines.append(f"| {family.preset} | {names[mode]} | {static / GIB:.1f} GiB | "
                         f"{(two.activations - one.activations) / GIB:.2f} GiB | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
