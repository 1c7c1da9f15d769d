"""Model FLOPs per sample at full size (coca-large-v2, blip2-flan-t5-xl), for MFU on GPU runs.

Counted, not estimated by hand: CoCa at full size on the meta device (no memory, no weights; BLIP-2 on
real reduced-depth models, extrapolated exactly in depth: see blip2_flops), one forward, and one forward + backward of the training loss, run under
`torch.utils.flop_counter.FlopCounterMode`, which counts matmuls, convolutions and attention
(2 FLOPs per multiply-add; elementwise ops, norms and softmax are not counted, as in the usual MFU
convention). The backward counted is the real one: BLIP-2 stage 2 computes no weight gradients for its
frozen ViT and T5 (and none at all through the ViT), so its training FLOPs are far below 3x forward.

MFU = samples/s x training FLOPs per sample / peak FLOP/s (A100 BF16 312 TFLOP/s, H100 989).

    python -m benchmarks.flops [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import harness

BATCH = 1  # counted at batch 1, reported per sample (FLOPs are linear in the batch)


def coca_inputs(config, text_tokens: int):
    size = config.vision_config.image_size
    pixel_values = torch.zeros(BATCH, 3, size, size)
    input_ids = torch.ones(BATCH, text_tokens, dtype=torch.long)
    return {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "return_loss": True}


def blip2_inputs(config, prompt_tokens: int, label_tokens: int):
    size = config.vision_config.image_size
    return {"pixel_values": torch.zeros(BATCH, 3, size, size),
            "input_ids": torch.ones(BATCH, prompt_tokens, dtype=torch.long),
            "labels": torch.ones(BATCH, label_tokens, dtype=torch.long)}


def count(model, inputs: dict, device: str = "meta") -> dict:
    """FLOPs per sample of one forward and of forward + backward of `loss` (on `device`)."""
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with FlopCounterMode(display=False) as forward_counter:
        with torch.no_grad():
            model(**inputs)
    with FlopCounterMode(display=False) as train_counter:
        model(**inputs).loss.backward()
    return {"forward": forward_counter.get_total_flops() / BATCH, "train_step": train_counter.get_total_flops() / BATCH}


def coca_flops(preset: str, text_tokens: int) -> dict:
    from hf_vlm.modeling.coca import CocaModel
    from hf_vlm.presets import get_config

    config = get_config(preset)
    with torch.device("meta"):
        model = CocaModel(config)
    model.train()
    return count(model, coca_inputs(config, text_tokens))


def blip2_flops(preset: str, prompt_tokens: int, label_tokens: int) -> dict:
    """transformers' T5 calls `.item()` in its forward, which meta tensors cannot do, so BLIP-2 is counted on
    real (random, CPU) models with the preset's widths and a few layers, and extrapolated: every layer of a
    stack costs the same, so FLOPs are exactly linear in each stack's depth (the Q-Former repeats every 2
    layers: cross-attention in every 2nd one; T5's encoder and decoder grow together)."""
    import hf_vlm.registration  # noqa: F401
    from hf_vlm.modeling.blip2_flant5 import Blip2FlanT5ForConditionalGeneration
    from hf_vlm.presets import preset_dict

    full = preset_dict(preset)
    depth = {"vision": full["vision_config"]["num_hidden_layers"], "qformer": full["qformer_config"]["num_hidden_layers"],
             "t5": full["text_config"]["num_layers"]}
    if full["text_config"].get("num_decoder_layers", depth["t5"]) != depth["t5"]:
        raise ValueError(f"{preset}: the extrapolation assumes as many T5 decoder layers as encoder layers")

    def at(vision: int, qformer: int, t5: int) -> dict:
        from transformers import AutoConfig

        kwargs = preset_dict(preset)
        kwargs["vision_config"]["num_hidden_layers"] = vision
        kwargs["qformer_config"]["num_hidden_layers"] = qformer
        kwargs["text_config"]["num_layers"] = kwargs["text_config"]["num_decoder_layers"] = t5
        config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
        model = Blip2FlanT5ForConditionalGeneration(config).train()
        return count(model, blip2_inputs(config, prompt_tokens, label_tokens), device="cpu")

    base = at(1, 2, 1)
    per_layer = {"vision": at(2, 2, 1), "qformer": at(1, 4, 1), "t5": at(1, 2, 2)}
    extra_layers = {"vision": depth["vision"] - 1, "qformer": (depth["qformer"] - 2) / 2, "t5": depth["t5"] - 1}
    return {kind: base[kind] + sum(extra_layers[s] * (per_layer[s][kind] - base[kind]) for s in per_layer)
            for kind in base}


def mfu_table(train_flops: float) -> dict:
    """Samples/s needed for 100% MFU on each GPU (so MFU = measured samples/s / this)."""
    return {gpu: peak * 1e12 / train_flops for gpu, peak in harness.PEAK_TFLOPS.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(harness.RESULTS_DIR))
    parser.add_argument("--coca", default="coca-large-v2")
    parser.add_argument("--blip2", default="blip2-flan-t5-xl")
    args = parser.parse_args(argv)
    from pathlib import Path

    cases = [
        (args.coca, "text 76 tokens, 224 px", coca_flops(args.coca, 76)),
        (args.blip2 + "-stage2", "224 px, prompt 12 + target 12 tokens", blip2_flops(args.blip2, 12, 12)),
    ]
    for name, shape, flops in cases:
        record = harness.Record(
            benchmark="flops", case=name, params={"inputs": shape, "counted_with": "torch.utils.flop_counter"},
            metrics={"GFLOP/sample forward": {"ours": flops["forward"] / 1e9},
                     "GFLOP/sample train step": {"ours": flops["train_step"] / 1e9},
                     **{f"samples/s at 100% MFU, {gpu}": {"ours": rate}
                        for gpu, rate in mfu_table(flops["train_step"]).items()}},
            seconds={}, notes="MFU = measured samples/s x train-step FLOPs / peak (A100 312, H100 989 TFLOP/s BF16)",
        )
        harness.save(record, Path(args.out))
        print(name, {k: f"{v['ours']:.4g}" for k, v in record.metrics.items()}, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
