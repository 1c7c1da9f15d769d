"""CoCa: hf-vlm's CocaModel vs open_clip's CoCa on the same weights (open_clip random init, converted).

Cases: caption generation (greedy and beams 3, batch 1 and 8, 20 and 60 new tokens; both sides forced
to the same length, and checked to produce the same tokens), contrastive embeddings (images/s,
texts/s), and a training step (AdamW, samples/s; peak memory measured in a fresh process per side).

open_clip 3.3.0's `generate` cannot import under transformers 5 (it imports the removed
`BeamSearchScorer`), so its decoding is reproduced here over open_clip's own forward, as its
`generate` does it: no cache, the whole prefix re-run every step, images repeated per beam.

    python -m benchmarks.bench_coca [--device cuda --dtype bfloat16] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch
from tqdm import tqdm

from benchmarks import harness
from hf_vlm.testing import randomize_open_clip_coca_

SOT, EOT, OPEN_CLIP_PAD = 49406, 49407, 0
CONTEXT_LENGTH = 76  # open_clip's CoCa text length (its tokenizer pads to it; the CLS takes position 77)
FULL_MODEL = "coca_ViT-B-32"  # the `coca-vit-b-32` preset's architecture
QUICK_CONFIG = {  # a tiny open_clip CoCa for the smoke test
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32,
                   "attentional_pool": True, "attn_pooler_queries": 8, "attn_pooler_heads": 2, "output_tokens": True},
    "text_cfg": {"context_length": 76, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2,
                 "embed_cls": True, "output_tokens": True},
    "multimodal_cfg": {"context_length": 76, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2,
                       "attn_pooler_heads": 2},
    "custom_text": True,
}


# ------------------------------------------------------------------------------------------ models


def open_clip_cfg(quick: bool, layers: int | None = None) -> dict:
    """open_clip's coca_ViT-B-32 config (QUICK_CONFIG for --quick), with `layers` layers per stack if given."""
    import copy

    import open_clip

    cfg = copy.deepcopy(QUICK_CONFIG if quick else open_clip.get_model_config(FULL_MODEL))
    if layers is not None:
        for part in ("vision_cfg", "text_cfg", "multimodal_cfg"):
            cfg[part]["layers"] = layers
    return cfg


def model_name(args) -> str:
    return "tiny" if args.quick else FULL_MODEL + (f" widths, {args.layers} layers/stack" if args.layers else "")


def build_open_clip(cfg: dict, seed: int = 0):
    """open_clip's CoCa with every parameter drawn from `seed` (hf_vlm.testing.randomize_open_clip_coca_)."""
    from open_clip.coca_model import CoCa

    model = CoCa(**{k: v for k, v in cfg.items() if k != "custom_text"})
    randomize_open_clip_coca_(model, seed, pad_token_id=OPEN_CLIP_PAD)
    return model


def ours_config(cfg: dict):
    from hf_vlm.conversion.open_clip_coca import coca_config_from_open_clip

    return coca_config_from_open_clip(cfg, pad_token_id=OPEN_CLIP_PAD, bos_token_id=SOT, eos_token_id=EOT)


def convert_open_clip(reference, cfg: dict):
    """Our CocaModel holding `reference`'s weights, mapped in memory by the converter's own rules
    (hf_vlm.conversion.open_clip_coca.coca_rules: the mapping `hf-vlm convert open-clip-coca` applies)."""
    from hf_vlm.conversion.open_clip_coca import coca_rules
    from hf_vlm.modeling.coca import CocaModel

    source = reference.state_dict()
    state = {}
    for rule in coca_rules(source.keys()):
        for target, tensor in zip(rule.targets, rule.apply(*(source[k] for k in rule.sources))):
            state[target] = tensor.clone()
    model = CocaModel(ours_config(cfg))
    model.load_state_dict(state, strict=True)
    return model


# ------------------------------------------------------------------------------- upstream decoding


@torch.no_grad()
def open_clip_greedy(model, images, new_tokens: int) -> torch.Tensor:
    """open_clip's top-k=1 loop: re-run the forward on the whole prefix, argmax the last position, append.
    The end token is suppressed (open_clip's min_seq_len) so every caption has `new_tokens` tokens."""
    image_latent, image_embs = model._encode_image(images)
    out = torch.full((images.shape[0], 1), SOT, device=images.device)
    for _ in range(new_tokens):
        logits = model(images, out, image_latent=image_latent, image_embs=image_embs, output_labels=False)["logits"][:, -1]
        logits[:, EOT] = -float("inf")
        out = torch.cat([out, logits.argmax(-1, keepdim=True)], dim=1)
    return out


@torch.no_grad()
def open_clip_beam_search(model, images, new_tokens: int, num_beams: int) -> torch.Tensor:
    """open_clip's `_generate_beamsearch` without its transformers scorer: images repeated per beam, the
    forward re-run on every beam's whole prefix, log-softmax scores summed, the best `num_beams` of
    beams x vocabulary kept (all beams start equal, so only beam 0 counts at the first step). With the end
    token suppressed every hypothesis has the same length, so the best beam is the highest sum."""
    batch = images.shape[0]
    images = images.repeat_interleave(num_beams, dim=0)
    image_latent, image_embs = model._encode_image(images)
    out = torch.full((batch * num_beams, 1), SOT, device=images.device)
    beam_scores = torch.zeros(batch, num_beams, device=images.device)
    beam_scores[:, 1:] = -1e9
    for _ in range(new_tokens):
        logits = model(images, out, image_latent=image_latent, image_embs=image_embs, output_labels=False)["logits"][:, -1]
        logits[:, EOT] = -float("inf")
        scores = logits.float().log_softmax(-1).view(batch, num_beams, -1) + beam_scores[..., None]
        vocab = scores.shape[-1]
        beam_scores, flat = scores.view(batch, -1).topk(num_beams, dim=-1)
        source_beam = flat // vocab + torch.arange(batch, device=flat.device)[:, None] * num_beams
        out = torch.cat([out[source_beam.view(-1)], (flat % vocab).view(-1, 1)], dim=1)
    best = beam_scores.argmax(-1) + torch.arange(batch, device=out.device) * num_beams
    return out[best]


@torch.no_grad()
def ours_generate(model, images, new_tokens: int, num_beams: int) -> torch.Tensor:
    return model.generate(pixel_values=images, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          num_beams=num_beams, do_sample=False, length_penalty=1.0)


# ------------------------------------------------------------------------------------------- cases


def generation_cases(args):
    if args.quick:
        return [("greedy", 1, 1, 4), ("beams3", 3, 2, 4)]
    return [(("greedy" if beams == 1 else f"beams{beams}"), beams, batch, tokens)
            for beams, batch, tokens in itertools.product(args.beams, args.batches, args.tokens)]


def bench_generation(args, device, dtype, reference, ours, image_size: int) -> list[harness.Record]:
    records = []
    for strategy, beams, batch, tokens in tqdm(generation_cases(args), desc="coca generation"):
        images = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(batch))
        images = images.to(device, dtype)

        def run_ours(images=images, tokens=tokens, beams=beams):
            return ours_generate(ours, images, tokens, beams)

        def run_upstream(images=images, tokens=tokens, beams=beams):
            if beams == 1:
                return open_clip_greedy(reference, images, tokens)
            return open_clip_beam_search(reference, images, tokens, beams)

        ours_tokens, upstream_tokens = run_ours().cpu(), run_upstream().cpu()
        same = same_tokens(ours_tokens, upstream_tokens)
        timing = harness.interleaved(run_ours, run_upstream, device=device, repeats=args.repeats,
                                     budget_s=args.budget_s, warmup=0)
        records.append(harness.Record(
            benchmark="coca_generate", case=f"{strategy}_b{batch}_t{tokens}",
            params={"strategy": strategy, "num_beams": beams, "batch": batch, "new_tokens": tokens,
                    "model": model_name(args), "device": str(device), "dtype": args.dtype},
            metrics=harness.throughput_metrics(timing, {"images/s": batch, "tokens/s": batch * tokens}),
            seconds=harness.seconds_of(timing),
            checks={"same_tokens": same, "generated_shape": list(ours_tokens.shape)},
            notes="upstream: open_clip forward, no KV cache (its generate's loop); ours: transformers generate, KV cache",
        ))
        harness.save(records[-1], args.out)  # now: a run stopped later keeps what it measured
    return records


def same_tokens(ours: torch.Tensor, upstream: torch.Tensor) -> bool:
    """Token-for-token equality of the two generations (shapes included)."""
    return ours.shape == upstream.shape and bool(torch.equal(ours, upstream))


def bench_embeddings(args, device, dtype, reference, ours, image_size: int) -> list[harness.Record]:
    batch = 2 if args.quick else 32
    images = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(7)).to(device, dtype)
    # open_clip's tokenizer pads every text to the context length (76 for CoCa): both sides get those rows
    texts = pad_to(random_texts(batch, 8 if args.quick else 20, seed=8), CONTEXT_LENGTH).to(device)
    mask = (texts != OPEN_CLIP_PAD).long()

    with torch.no_grad():
        image_diff = (ours.get_image_features(images).pooler_output.float()
                      - reference.encode_image(images, normalize=False).float()).abs().max().item()
        text_diff = (ours.get_text_features(texts, attention_mask=mask).pooler_output.float()
                     - reference.encode_text(texts, normalize=False).float()).abs().max().item()
    records = []
    for kind, run_ours, run_upstream, diff in (
        ("images", lambda: ours.get_image_features(images), lambda: reference.encode_image(images), image_diff),
        ("texts", lambda: ours.get_text_features(texts, attention_mask=mask), lambda: reference.encode_text(texts),
         text_diff),
    ):
        with torch.no_grad():
            timing = harness.interleaved(run_ours, run_upstream, device=device, repeats=args.repeats + 2,
                                         budget_s=args.budget_s)
        records.append(harness.Record(
            benchmark="coca_embed", case=f"{kind}_b{batch}",
            params={"batch": batch, "model": model_name(args), "device": str(device),
                    "dtype": args.dtype, "text_tokens": int(mask[0].sum()) if kind == "texts" else None,
                    "padded_to": CONTEXT_LENGTH},
            metrics=harness.throughput_metrics(timing, {f"{kind}/s": batch}),
            seconds=harness.seconds_of(timing),
            checks={"max_abs_diff": diff},
            notes="same 76-token padded rows for both (open_clip's tokenizer layout); ours gets the attention mask",
        ))
    return records


def random_texts(batch: int, length: int, seed: int) -> torch.Tensor:
    """`<sot> random tokens <eot>` rows of `length` tokens (no padding)."""
    generator = torch.Generator().manual_seed(seed)
    body = torch.randint(1, SOT, (batch, length - 2), generator=generator)
    return torch.cat([torch.full((batch, 1), SOT), body, torch.full((batch, 1), EOT)], dim=1)


def pad_to(ids: torch.Tensor, length: int) -> torch.Tensor:
    return torch.nn.functional.pad(ids, (0, length - ids.shape[1]), value=OPEN_CLIP_PAD)


# --------------------------------------------------------------------------------------- training


def training_batch(args, image_size: int, device, dtype):
    batch = 2 if args.quick else 8
    images = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(9)).to(device, dtype)
    texts = pad_to(random_texts(batch, 8 if args.quick else 32, seed=10), CONTEXT_LENGTH).to(device)
    return images, texts


def training_steps(model, loss_fn, device):
    """(step(), loss of the first step): one AdamW step over the trainable parameters per call."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()

    def step():
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def coca_losses(reference, ours, images, texts, caption_weight: float, clip_weight: float):
    from open_clip.loss import CoCaLoss

    upstream_loss = CoCaLoss(caption_loss_weight=caption_weight, clip_loss_weight=clip_weight, pad_id=OPEN_CLIP_PAD)

    def ours_loss():
        return ours(input_ids=texts, pixel_values=images, attention_mask=(texts != OPEN_CLIP_PAD).long(),
                    return_loss=True).loss

    def reference_loss():
        clip_loss, caption_loss = upstream_loss(**reference(images, texts), output_dict=False)
        return clip_loss + caption_loss

    return ours_loss, reference_loss


def bench_training(args, device, dtype, reference, ours, image_size: int) -> list[harness.Record]:
    images, texts = training_batch(args, image_size, device, dtype)
    cfg = ours.config
    ours_loss, reference_loss = coca_losses(reference, ours, images, texts, cfg.caption_loss_weight,
                                            cfg.contrastive_loss_weight)
    with torch.no_grad():  # same weights, same batch: the same loss (dropout is off in both)
        ours.eval()
        reference.eval()
        loss_diff = abs(ours_loss().item() - reference_loss().item())
    timing = harness.interleaved(training_steps(ours, ours_loss, device), training_steps(reference, reference_loss, device),
                                 device=device, repeats=args.repeats, budget_s=args.budget_s)
    memory = {side: harness.run_child(["-m", "benchmarks.bench_coca", "--memory-of", side, *child_args(args)])
              for side in ("ours", "upstream")}
    metrics = harness.throughput_metrics(timing, {"samples/s": images.shape[0]})
    metrics["peak memory MB"] = {"ours": memory["ours"]["peak_mb"], "upstream": memory["upstream"]["peak_mb"],
                                 "ratio": memory["ours"]["peak_mb"] / memory["upstream"]["peak_mb"]}
    return [harness.Record(
        benchmark="coca_train", case=f"step_b{images.shape[0]}",
        params={"batch": images.shape[0], "text_tokens": int((texts[0] != OPEN_CLIP_PAD).sum()),
                "padded_to": texts.shape[1], "optimizer": "AdamW",
                "model": model_name(args), "device": str(device), "dtype": args.dtype},
        metrics=metrics, seconds=harness.seconds_of(timing),
        checks={"first_loss_abs_diff": loss_diff},
        notes="peak memory: a fresh process per side (CPU: peak RSS of the process incl. weights, gradients and "
              "AdamW state; CUDA: torch.cuda.max_memory_allocated)",
    )]


def child_args(args) -> list[str]:
    out = ["--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads)]
    out += ["--layers", str(args.layers)] if args.layers else []
    return out + (["--quick"] if args.quick else [])


def memory_of(side: str, args, device, dtype) -> dict:
    """Peak memory of two training steps of one side only (run in a fresh process)."""
    cfg = open_clip_cfg(args.quick, args.layers)
    image_size = cfg["vision_cfg"]["image_size"]
    if side == "upstream":
        model = build_open_clip(cfg).to(device, dtype)
    else:
        from hf_vlm.modeling.coca import CocaModel

        model = CocaModel(ours_config(cfg)).to(device, dtype)
    images, texts = training_batch(args, image_size, device, dtype)
    ours_loss, reference_loss = coca_losses(model, model, images, texts, 2.0, 1.0)
    step = training_steps(model, ours_loss if side == "ours" else reference_loss, device)
    return {"side": side, "peak_mb": harness.peak_memory_mb(step, device)}


# ------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = harness.common_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--only", nargs="*", choices=["generate", "embed", "train"], default=None)
    parser.add_argument("--layers", type=int, default=None,
                        help="layers per stack (vision, text, decoder); default: coca_ViT-B-32's 12")
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 3], help="generation: beam counts (1 = greedy)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="generation: batch sizes")
    parser.add_argument("--tokens", type=int, nargs="+", default=[20, 60], help="generation: new tokens")
    parser.add_argument("--memory-of", choices=["ours", "upstream"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = harness.setup(args)
    dtype = harness.DTYPES[args.dtype]
    if args.memory_of:
        print(json.dumps(memory_of(args.memory_of, args, device, dtype)))
        return 0

    cfg = open_clip_cfg(args.quick, args.layers)
    image_size = cfg["vision_cfg"]["image_size"]
    reference = build_open_clip(cfg).to(device, dtype).eval()
    ours = convert_open_clip(reference, cfg).to(device, dtype).eval()
    records = []
    only = set(args.only or ["generate", "embed", "train"])
    if "generate" in only:
        records += bench_generation(args, device, dtype, reference, ours, image_size)
    if "embed" in only:
        records += bench_embeddings(args, device, dtype, reference, ours, image_size)
    if "train" in only:
        records += bench_training(args, device, dtype, reference, ours, image_size)
    harness.save_and_report(records, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
