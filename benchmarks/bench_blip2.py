"""BLIP-2 (FlanT5): hf-vlm's Blip2FlanT5ForConditionalGeneration vs transformers' Blip2ForConditionalGeneration
on the same weights (transformers' random init, mapped into ours).

The architecture has BLIP-2 FlanT5-XL's real widths (ViT-g 1408, Q-Former 768 with 32 queries, T5 d_model
2048, vocabulary 32128) with reduced depth (`--layers`, default 2 per stack) so a CPU run fits. Cases:
captioning (greedy) and VQA (beams 5, LAVIS's zero-shot setting), both forced to a fixed length and
checked to produce the same tokens; a stage-2 training step (frozen ViT and T5, AdamW on the Q-Former,
queries and projection) with samples/s and peak memory (a fresh process per side).

transformers 5 places the 32 query outputs at `<image>` placeholder tokens in input_ids; ours prepends
them to the prompt. Both give the T5 encoder the same sequence: [32 query embeddings, prompt tokens].

    python -m benchmarks.bench_blip2 [--device cuda --dtype bfloat16] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from tqdm import tqdm

from benchmarks import harness

IMAGE_TOKEN_ID = 32100  # a FlanT5 vocabulary row no SentencePiece piece uses (its 100 sentinels end at 32099)
QUICK_IMAGE_TOKEN_ID = 95
EOS, PAD = 1, 0


def ours_config(layers: int, quick: bool):
    """The blip2-flan-t5-xl preset (blip2-tiny for --quick) with `layers` layers in every stack."""
    from hf_vlm.presets import preset_dict

    preset = preset_dict("blip2-tiny" if quick else "blip2-flan-t5-xl")
    preset["vision_config"]["num_hidden_layers"] = layers
    preset["qformer_config"]["num_hidden_layers"] = layers
    preset["text_config"]["num_layers"] = preset["text_config"]["num_decoder_layers"] = layers
    from transformers import AutoConfig

    return AutoConfig.for_model(preset.pop("model_type"), **preset)


def transformers_config(ours):
    """transformers' Blip2Config for the same architecture as our config `ours`."""
    from transformers import Blip2Config

    vision, qformer = ours.vision_config, ours.qformer_config
    return Blip2Config(
        vision_config={"hidden_size": vision.hidden_size, "intermediate_size": vision.intermediate_size,
                       "num_hidden_layers": vision.num_hidden_layers, "num_attention_heads": vision.num_attention_heads,
                       "image_size": vision.image_size, "patch_size": vision.patch_size,
                       "layer_norm_eps": vision.layer_norm_eps, "hidden_act": "gelu", "qkv_bias": True},
        qformer_config={"vocab_size": qformer.vocab_size, "hidden_size": qformer.hidden_size,
                        "num_hidden_layers": qformer.num_hidden_layers,
                        "num_attention_heads": qformer.num_attention_heads,
                        "intermediate_size": qformer.intermediate_size,
                        "cross_attention_frequency": qformer.cross_attention_frequency,
                        "encoder_hidden_size": vision.hidden_size, "layer_norm_eps": qformer.layer_norm_eps},
        text_config=ours.text_config.to_dict(),
        num_query_tokens=ours.num_query_tokens,
        image_token_index=image_token_id(ours),
    )


def image_token_id(ours) -> int:
    return QUICK_IMAGE_TOKEN_ID if ours.text_config.vocab_size < IMAGE_TOKEN_ID else IMAGE_TOKEN_ID


def transformers_blip2_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' BLIP-2 state dict -> ours (timm EVA vision layout; Q-Former, projection and T5 share
    names). Written here because hf_vlm.conversion had no transformers BLIP-2 converter when this was
    written. transformers fuses the qkv bias as cat(q_bias, k_bias, v_bias); EVA has no k bias, so the
    k part must be zero."""
    exact = {"vision_model.embeddings.class_embedding": "vision_model.cls_token",
             "vision_model.embeddings.position_embedding": "vision_model.pos_embed"}
    pieces = [("vision_model.embeddings.patch_embedding.", "vision_model.patch_embed.proj."),
              ("vision_model.post_layernorm.", "ln_vision."),
              ("vision_model.encoder.layers.", "vision_model.blocks."),
              (".layer_norm1.", ".norm1."), (".layer_norm2.", ".norm2."),
              (".self_attn.projection.", ".attn.proj."), (".self_attn.qkv.weight", ".attn.qkv.weight")]
    out = {}
    for key, tensor in state.items():
        new = exact.get(key, key)
        for old, replacement in pieces:
            new = new.replace(old, replacement)
        if new.endswith(".self_attn.qkv.bias"):
            q_bias, k_bias, v_bias = tensor.chunk(3)
            if k_bias.abs().max() != 0:
                raise ValueError(f"{key}: the k part of the fused bias is not zero; EVA's attention has no k bias")
            prefix = new.removesuffix(".self_attn.qkv.bias")
            out[f"{prefix}.attn.q_bias"], out[f"{prefix}.attn.v_bias"] = q_bias.clone(), v_bias.clone()
        else:
            out[new] = tensor.clone()
    return out


def build_pair(args):
    """(ours, transformers') with the same weights; transformers' k bias zeroed (EVA has none)."""
    from transformers import Blip2ForConditionalGeneration

    import hf_vlm.registration  # noqa: F401  (registers our model types)
    from hf_vlm.modeling.blip2_flant5 import Blip2FlanT5ForConditionalGeneration

    config = ours_config(args.layers, args.quick)
    torch.manual_seed(0)
    reference = Blip2ForConditionalGeneration(transformers_config(config))
    with torch.no_grad():
        for layer in reference.vision_model.encoder.layers:
            width = layer.self_attn.qkv.bias.shape[0] // 3
            layer.self_attn.qkv.bias[width:2 * width] = 0
    ours = Blip2FlanT5ForConditionalGeneration(config)
    missing, unexpected = ours.load_state_dict(transformers_blip2_to_ours(reference.state_dict()), strict=False)
    # transformers ties T5's lm_head to the shared embedding (its copy was loaded into our untied lm_head)
    if missing or unexpected:
        raise RuntimeError(f"weight mapping incomplete: missing {missing}, unexpected {unexpected}")
    return ours, reference, config


def prompts(batch: int, vqa: bool, quick: bool, seed: int) -> torch.Tensor:
    """Token ids of a prompt ending in </s>: a 12-token random "question" for VQA, the lone </s> that
    T5's tokenizer makes of an empty prompt for captioning."""
    if not vqa:
        return torch.full((batch, 1), EOS)
    generator = torch.Generator().manual_seed(seed)
    body = torch.randint(3, 90 if quick else 32000, (batch, 11), generator=generator)
    return torch.cat([body, torch.full((batch, 1), EOS)], dim=1)


def with_image_tokens(ids: torch.Tensor, config) -> torch.Tensor:
    """transformers 5's layout: `num_query_tokens` <image> placeholders, then the prompt."""
    placeholders = torch.full((ids.shape[0], config.num_query_tokens), image_token_id(config), device=ids.device)
    return torch.cat([placeholders, ids], dim=1)


def generation_cases(quick: bool):
    # (task, num_beams, batch, new tokens, length_penalty)
    if quick:
        return [("caption", 1, 2, 3, 1.0), ("vqa", 2, 2, 3, -1.0)]
    return [("caption", 1, 1, 20, 1.0), ("caption", 1, 8, 20, 1.0), ("vqa", 5, 1, 10, -1.0), ("vqa", 5, 8, 10, -1.0)]


def bench_generation(args, device, dtype, ours, reference, config) -> list[harness.Record]:
    records = []
    size = config.vision_config.image_size
    for task, beams, batch, tokens, length_penalty in tqdm(generation_cases(args.quick), desc="blip2 generation"):
        images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch)).to(device, dtype)
        prompt = prompts(batch, task == "vqa", args.quick, seed=batch).to(device)
        kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, num_beams=beams, do_sample=False,
                      length_penalty=length_penalty)

        def run_ours(images=images, prompt=prompt, kwargs=kwargs):
            with torch.no_grad():
                return ours.generate(pixel_values=images, input_ids=prompt, **kwargs)

        def run_upstream(images=images, prompt=prompt, kwargs=kwargs):
            with torch.no_grad():
                return reference.generate(pixel_values=images, input_ids=with_image_tokens(prompt, config), **kwargs)

        ours_tokens, upstream_tokens = run_ours().cpu(), run_upstream().cpu()
        timing = harness.interleaved(run_ours, run_upstream, device=device, repeats=args.repeats,
                                     budget_s=args.budget_s, warmup=0)
        records.append(harness.Record(
            benchmark="blip2_generate", case=f"{task}_beams{beams}_b{batch}_t{tokens}",
            params={"task": task, "num_beams": beams, "batch": batch, "new_tokens": tokens,
                    "length_penalty": length_penalty, "prompt_tokens": prompt.shape[1], "layers": args.layers,
                    "widths": "blip2-tiny" if args.quick else "blip2-flan-t5-xl", "device": str(device),
                    "dtype": args.dtype},
            metrics=harness.throughput_metrics(timing, {"images/s": batch, "tokens/s": batch * tokens}),
            seconds=harness.seconds_of(timing),
            checks={"same_tokens": ours_tokens.shape == upstream_tokens.shape and torch.equal(ours_tokens, upstream_tokens)},
            notes="both: transformers' T5 generate with its KV cache; the difference is the vision/Q-Former front",
        ))
        harness.save(records[-1], args.out)  # now: a run stopped later keeps what it measured
    return records


def training_batch(args, config, device, dtype):
    batch = 2 if args.quick else 4
    size = config.vision_config.image_size
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(11)).to(device, dtype)
    prompt = prompts(batch, True, args.quick, seed=12).to(device)
    labels = prompts(batch, True, args.quick, seed=13).to(device)  # a 12-token target answer
    return images, prompt, labels


def stage2_steps(model, loss_fn, frozen: list[torch.nn.Module]):
    """One AdamW step over the trainable parameters per call; `frozen` modules stay in eval mode (no
    dropout), as ours keeps its frozen ViT and T5."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()
    for module in frozen:
        module.eval()

    def step():
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def freeze_reference(reference) -> list[torch.nn.Module]:
    """BLIP-2 stage 2 in transformers: the ViT and the language model frozen by hand."""
    reference.vision_model.requires_grad_(False)
    reference.language_model.requires_grad_(False)
    reference.vision_model.post_layernorm.requires_grad_(True)  # LAVIS's ln_vision trains (ours too)
    return [reference.vision_model, reference.language_model]


def loss_functions(ours, reference, config, images, prompt, labels):
    def ours_loss():
        return ours(pixel_values=images, input_ids=prompt, labels=labels).loss

    def reference_loss():
        return reference(pixel_values=images, input_ids=with_image_tokens(prompt, config),
                         labels=labels.masked_fill(labels == PAD, -100)).loss

    return ours_loss, reference_loss


def bench_training(args, device, dtype, ours, reference, config) -> list[harness.Record]:
    images, prompt, labels = training_batch(args, config, device, dtype)
    ours_loss, reference_loss = loss_functions(ours, reference, config, images, prompt, labels)
    frozen = freeze_reference(reference)
    with torch.no_grad():
        ours.eval()
        reference.eval()
        loss_diff = abs(ours_loss().item() - reference_loss().item())
    trainable = {"ours": sum(p.numel() for p in ours.parameters() if p.requires_grad),
                 "upstream": sum(p.numel() for p in reference.parameters() if p.requires_grad)}
    timing = harness.interleaved(stage2_steps(ours, ours_loss, []), stage2_steps(reference, reference_loss, frozen),
                                 device=device, repeats=args.repeats, budget_s=args.budget_s)
    memory = {side: harness.run_child(["-m", "benchmarks.bench_blip2", "--memory-of", side, *child_args(args)])
              for side in ("ours", "upstream")}
    metrics = harness.throughput_metrics(timing, {"samples/s": images.shape[0]})
    metrics["peak memory MB"] = {"ours": memory["ours"]["peak_mb"], "upstream": memory["upstream"]["peak_mb"],
                                 "ratio": memory["ours"]["peak_mb"] / memory["upstream"]["peak_mb"]}
    return [harness.Record(
        benchmark="blip2_train", case=f"stage2_b{images.shape[0]}",
        params={"batch": images.shape[0], "prompt_tokens": prompt.shape[1], "label_tokens": labels.shape[1],
                "layers": args.layers, "widths": "blip2-tiny" if args.quick else "blip2-flan-t5-xl",
                "optimizer": "AdamW", "device": str(device), "dtype": args.dtype},
        metrics=metrics, seconds=harness.seconds_of(timing),
        checks={"first_loss_abs_diff": loss_diff, "same_trainable_parameters": trainable["ours"] == trainable["upstream"]},
        notes="frozen ViT and T5 (eval mode) on both sides; the Q-Former, queries and projection train. Peak memory: "
              "a fresh process per side (CPU: process peak RSS; CUDA: max_memory_allocated)",
    )]


def child_args(args) -> list[str]:
    out = ["--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads), "--layers", str(args.layers)]
    return out + (["--quick"] if args.quick else [])


def memory_of(side: str, args, device, dtype) -> dict:
    """Peak memory of two stage-2 steps of one side only (run in a fresh process)."""
    import hf_vlm.registration  # noqa: F401
    from hf_vlm.modeling.blip2_flant5 import Blip2FlanT5ForConditionalGeneration

    config = ours_config(args.layers, args.quick)
    images, prompt, labels = training_batch(args, config, device, dtype)
    if side == "ours":
        model = Blip2FlanT5ForConditionalGeneration(config).to(device, dtype)
        ours_loss, _ = loss_functions(model, None, config, images, prompt, labels)
        step = stage2_steps(model, ours_loss, [])
    else:
        from transformers import Blip2ForConditionalGeneration

        model = Blip2ForConditionalGeneration(transformers_config(config)).to(device, dtype)
        _, reference_loss = loss_functions(None, model, config, images, prompt, labels)
        step = stage2_steps(model, reference_loss, freeze_reference(model))
    return {"side": side, "peak_mb": harness.peak_memory_mb(step, device)}


def main(argv=None) -> int:
    parser = harness.common_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--layers", type=int, default=2, help="layers per stack (ViT, Q-Former, T5 encoder/decoder)")
    parser.add_argument("--only", nargs="*", choices=["generate", "train"], default=None)
    parser.add_argument("--memory-of", choices=["ours", "upstream"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = harness.setup(args)
    dtype = harness.DTYPES[args.dtype]
    if args.memory_of:
        print(json.dumps(memory_of(args.memory_of, args, device, dtype)))
        return 0
    ours, reference, config = build_pair(args)
    ours, reference = ours.to(device, dtype).eval(), reference.to(device, dtype).eval()
    only = set(args.only or ["generate", "train"])
    records = []
    if "generate" in only:
        records += bench_generation(args, device, dtype, ours, reference, config)
    if "train" in only:
        records += bench_training(args, device, dtype, ours, reference, config)
    harness.save_and_report(records, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
