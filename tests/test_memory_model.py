"""benchmarks/memory_model.py: its parameter accounting is the meta device's and peft's for both full-size
families, its prediction of a tiny training step it was not calibrated on is within 10% of the measured peak,
and the 24 GB LoRA recipe fits one 24 GB GPU by it. (The full-size BLIP-2 LoRA step it was checked against needs
most of a 24 GB machine: a benchmark, recorded in benchmarks/results/cpu/memory_model__*.json.)"""

from __future__ import annotations

import pytest
import torch

from benchmarks import memory_model as mm

FULL_PRESETS = ["blip2-flan-t5-xl", "coca-large-v2"]


@pytest.fixture(scope="module")
def calibration():
    return mm.load_calibration()


def _model_on_meta(preset: str):
    from hf_vlm.presets import get_config

    with torch.device("meta"):
        return mm.family_of(preset).load_class()._from_config(get_config(preset))


@pytest.mark.parametrize("preset", FULL_PRESETS)
def test_full_fine_tuning_counts_every_parameter_of_the_meta_model_at_16_bytes(preset):
    reference = _model_on_meta(preset)
    parameters = sum(p.numel() for p in reference.parameters())
    buffers = sum(b.numel() * b.element_size() for b in reference.buffers())

    counts = mm.parameter_bytes(mm.meta_model(preset, "full"), "full")

    assert counts.parameters == counts.trainable == parameters
    assert counts.weights == 4 * parameters + buffers  # fp32 master weights under bf16 autocast
    assert (counts.gradients, counts.optimizer) == (4 * parameters, 8 * parameters)  # fp32 grads, AdamW's 2 moments


@pytest.mark.parametrize("preset", FULL_PRESETS)
def test_lora_trainable_parameters_are_peft_own_count_and_r_times_in_plus_out(preset):
    from peft import LoraConfig, get_peft_model

    from hf_vlm.trainers.lora import LORA_ALPHA, LORA_R, default_lora_target_modules

    reference = _model_on_meta(preset)
    targets = default_lora_target_modules(reference.config)
    by_hand = sum(LORA_R * (m.in_features + m.out_features) for name, m in reference.named_modules()
                  if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets))
    peft_model = get_peft_model(reference, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=targets))
    peft_trainable, peft_total = peft_model.get_nb_trainable_parameters()

    for mode in ("lora", "lora-8bit"):
        counts = mm.parameter_bytes(mm.meta_model(preset, mode), mode)
        assert (counts.trainable, counts.parameters) == (peft_trainable, peft_total)
        assert counts.trainable == by_hand > 0
        assert (counts.gradients, counts.optimizer) == (4 * by_hand, 8 * by_hand)  # fp32 adapters


def test_lora_base_is_bf16_except_what_the_model_keeps_in_fp32_and_8bit_quantizes_the_language_model():
    preset = "blip2-flan-t5-xl"
    reference = _model_on_meta(preset)
    keep = reference._keep_in_fp32_modules
    fp32 = sum(p.numel() for n, p in reference.named_parameters() if any(k in n.split(".") for k in keep))
    half = sum(p.numel() for p in reference.parameters()) - fp32
    lora = mm.parameter_bytes(mm.meta_model(preset, "lora"), "lora")
    adapters = 4 * lora.trainable
    buffers = sum(b.numel() * b.element_size() for b in reference.buffers())
    assert lora.weights == 2 * half + 4 * fp32 + adapters + buffers

    # 8-bit: T5's linear layers but lm_head and `wo` (T5 keeps it out) and the language projection are int8 (+ a
    # fp32 scale per row); the ViT stays out of quantization (the model declares it for a quantized load); peft's
    # prepare_model_for_kbit_training casts everything not int8 to fp32, and apply_lora gives the parts without
    # adapters (the 1B-parameter ViT, ln_vision) their bf16 back
    quantized = {n: m for n, m in reference.named_modules() if isinstance(m, torch.nn.Linear) and (
        n == "language_projection" or n.startswith("language_model.") and n != "language_model.lm_head"
        and not n.endswith(".wo"))}
    int8 = sum(m.weight.numel() for m in quantized.values())
    rows = sum(m.out_features for m in quantized.values())
    # no adapters: the ViT, ln_vision and the language projection's bias (its weight is int8)
    adapter_free = sum(p.numel() for n, p in reference.named_parameters()
                       if n.split(".")[0] in ("vision_model", "ln_vision", "language_projection")
                       and n != "language_projection.weight")
    eight = mm.parameter_bytes(mm.meta_model(preset, "lora-8bit"), "lora-8bit")
    assert eight.weights == int8 + 4 * rows + 4 * (half + fp32 - int8 - adapter_free) + 2 * adapter_free + adapters + buffers
    assert eight.weights < lora.weights


def test_calibration_covers_both_families_every_mode_with_and_without_checkpointing(calibration):
    for preset in FULL_PRESETS:
        for mode in mm.MODES:
            for checkpointing in (False, True):
                one = mm.predict(preset, mode, 1, checkpointing, calibration)
                eight = mm.predict(preset, mode, 8, checkpointing, calibration)
                assert eight.activations > one.activations > 0, (preset, mode, checkpointing)
        # checkpointing keeps fewer activations per sample
        with_ckpt = mm.predict(preset, "full", 8, True, calibration).activations
        without = mm.predict(preset, "full", 8, False, calibration).activations
        assert with_ckpt < without


@pytest.mark.slow  # a profiled training step in a fresh process (the profiler starts slowly)
@pytest.mark.parametrize("preset,mode", [("blip2-tiny", "lora"), ("coca-tiny", "full")])
def test_prediction_of_a_tiny_step_at_an_uncalibrated_depth_and_batch_is_within_10_percent(preset, mode,
                                                                                           calibration):
    """Calibrated at 1-2 layers per stack and batch 1-2; checked at 3 layers per stack and batch 4, measured in a
    fresh process (peak of torch's CPU allocations over the step, plus weights and AdamW state)."""
    family = mm.family_of(preset)
    depths = {s.name: 3 * s.step for s in family.stacks}
    measured = mm.measure_in_child(preset, mode, 4, True, depths=depths, timeout=600)
    predicted = mm.predict(preset, mode, 4, True, calibration, depths=depths)

    assert predicted.gradients == measured["gradients"]
    assert predicted.weights == pytest.approx(measured["weights"], rel=0.01)
    assert predicted.peak == pytest.approx(measured["peak"], rel=0.10)


def test_the_24gb_lora_recipe_fits_24gb_by_the_model(calibration):
    from hf_vlm.trainers.recipes import get_recipe

    recipe = get_recipe("blip2-flan-t5-xl-vqa-lora")
    training, model = recipe.training, recipe.model_overrides
    assert recipe.stage == "blip2-vqa" and recipe.model == "blip2-flan-t5-xl"
    assert (recipe.nodes, recipe.gpus_per_node) == (1, 1)
    assert model["lora"] is True and model["freeze_vision"] is True
    assert training["bf16"] is True and training["gradient_checkpointing"] is True
    assert "deepspeed" not in training

    assert model["qformer_text_input"] is True  # the paper's question-aware Q-Former, as blip2-flan-t5-xl-vqa
    config = {k: v for k, v in model.items() if hasattr(mm.build_config(recipe.model, "lora"), k)}

    batch = training["per_device_train_batch_size"]
    peak = mm.predict(recipe.model, "lora", batch, True, calibration, config_overrides=config).peak
    assert peak + mm.CUDA_OVERHEAD_BYTES <= 24 * mm.GIB
    largest = mm.largest_batch(recipe.model, "lora", 24, True, calibration, config_overrides=config)
    # the paper's global batch (16 per GPU on 8 GPUs): in one step where it fits, else by gradient accumulation
    assert recipe.global_batch_size == 128
    assert batch == min(128, largest) or batch <= largest < 2 * batch
