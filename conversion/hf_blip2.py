"""`hf-blip2`: convert a transformers `Blip2ForConditionalGeneration` folder with a T5 language model (e.g.
Salesforce/blip2-flan-t5-xl: config.json, safetensors or .bin weights, tokenizer and processor files) into a
`Blip2FlanT5ForConditionalGeneration` folder (hf_vlm.modeling.blip2_flant5).

The Q-Former, the projection and T5 keep transformers' names; the vision tower moves to timm's EVA layout
(`vision_model.blocks.{i}.attn.{qkv, q_bias, v_bias}`), splitting transformers' fused qkv bias. The tokenizer
comes from SOURCE (or `--tokenizer`); transformers' `<image>` placeholder tokens are not needed (our model
prepends the query outputs itself).

Run as `hf-vlm convert hf-blip2 SOURCE OUTPUT` or `python -m hf_vlm.conversion.hf_blip2`.
"""

from __future__ import annotations

import json
from pathlib import Path

from hf_vlm.conversion.core import Drop
from hf_vlm.conversion.errors import ConversionError

RENAMES = [  # transformers BLIP-2 key -> ours (anything not listed: leftover, an error unless dropped)
    (r"vision_model\.embeddings\.class_embedding", r"vision_model.cls_token"),
    (r"vision_model\.embeddings\.position_embedding", r"vision_model.pos_embed"),
    (r"vision_model\.embeddings\.patch_embedding\.(weight|bias)", r"vision_model.patch_embed.proj.\1"),
    (r"vision_model\.encoder\.layers\.(\d+)\.layer_norm1\.(weight|bias)", r"vision_model.blocks.\1.norm1.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.layer_norm2\.(weight|bias)", r"vision_model.blocks.\1.norm2.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.weight", r"vision_model.blocks.\1.attn.qkv.weight"),
    (r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.(weight|bias)", r"vision_model.blocks.\1.attn.proj.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"vision_model.blocks.\1.mlp.\2.\3"),
    (r"vision_model\.post_layernorm\.(weight|bias)", r"ln_vision.\1"),  # BLIP-2's ln_vision
    (r"query_tokens", r"query_tokens"),
    (r"(qformer\..+)", r"\1"),  # transformers' Q-Former names are ours
    (r"language_projection\.(weight|bias)", r"language_projection.\1"),
    (r"(language_model\..+)", r"\1"),  # transformers' own T5
]
QKV_BIAS = r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.bias"
SHARED, LM_HEAD = "language_model.shared.weight", "language_model.lm_head.weight"

DROPS = [
    # Older checkpoints store T5's tied embedding copies; from_pretrained ties them to shared.weight again.
    Drop(r"language_model\.(encoder|decoder)\.embed_tokens\.weight", "T5's tied copies of language_model.shared.weight"),
    # Present with use_qformer_text_input=True; stage 2 never feeds text into the Q-Former.
    Drop(r"qformer\.encoder\.layer\.\d+\.(intermediate|output)\..+",
         "the Q-Former's text-path feed-forward blocks (stage 2 feeds no text to the Q-Former)"),
    Drop(r"qformer\.embeddings\..+", "the Q-Former's text embeddings (stage 2 feeds no text to the Q-Former)"),
]


def split_qkv_bias(bias):
    """transformers' fused qkv bias `cat(q_bias, k_bias, v_bias)` -> EVA's (q_bias, v_bias).

    EVA has no key bias (timm keeps a zero buffer). Leaving transformers' key part out is exact even when
    fine-tuning made it non-zero: it adds q·k_bias to every key's score of a query alike, which softmax ignores."""
    q_bias, _, v_bias = bias.chunk(3, dim=0)
    return q_bias, v_bias


def blip2_rules(source_keys, drops=DROPS, copy_tied_lm_head: bool = False):
    """Rules for every kept source key. `copy_tied_lm_head`: the source ties T5's lm_head to `shared` (its file holds
    no lm_head) while our model has a separate one: `shared` fills both."""
    import re

    from hf_vlm.conversion.core import Rule, rules_from_table

    kept = [k for k in source_keys if not any(d.matches(k) for d in drops)]
    rules = []
    if copy_tied_lm_head:
        kept.remove(SHARED)
        rules.append(Rule((SHARED,), (SHARED, LM_HEAD), lambda shared: (shared, shared.clone())))
    rules += rules_from_table([k for k in kept if not re.fullmatch(QKV_BIAS, k)], RENAMES)
    for key in kept:
        match = re.fullmatch(QKV_BIAS, key)
        if match:
            block = f"vision_model.blocks.{match.group(1)}.attn"
            rules.append(Rule((key,), (f"{block}.q_bias", f"{block}.v_bias"), split_qkv_bias))
    return rules


def blip2_flant5_config_from_hf(hf_config):
    """Our config computing what transformers' `Blip2ForConditionalGeneration(hf_config)` computes."""
    from hf_vlm.modeling.blip2_flant5 import Blip2FlanT5Config

    if getattr(hf_config, "model_type", None) != "blip-2":
        raise ConversionError(f"config model_type is {getattr(hf_config, 'model_type', None)!r}, expected 'blip-2'")
    text = hf_config.text_config
    if text.model_type != "t5":
        raise ConversionError(
            f"this BLIP-2 has a {text.model_type!r} language model; hf-blip2 converts BLIP-2 with T5 (FlanT5) only"
        )
    vision, qformer = hf_config.vision_config, hf_config.qformer_config
    if vision.hidden_act != "gelu" or qformer.hidden_act != "gelu":
        raise ConversionError(f"unsupported activations: vision {vision.hidden_act!r}, Q-Former {qformer.hidden_act!r}")
    timm_kwargs = {} if vision.qkv_bias else {"qkv_bias": False}
    return Blip2FlanT5Config(
        vision_config={
            "timm_model_name": "eva_giant_patch14_224", "image_size": vision.image_size, "patch_size": vision.patch_size,
            "hidden_size": vision.hidden_size, "num_hidden_layers": vision.num_hidden_layers,
            "num_attention_heads": vision.num_attention_heads, "intermediate_size": vision.intermediate_size,
            "layer_norm_eps": vision.layer_norm_eps,
            "ln_vision_eps": vision.layer_norm_eps,  # transformers' post_layernorm uses the blocks' eps
            "timm_kwargs": timm_kwargs,
        },
        qformer_config={
            # the stage-1 text vocabulary is BERT's plus LAVIS's [DEC] token (unused by stage 2)
            "vocab_size": qformer.vocab_size + 1, "dec_token_id": qformer.vocab_size,
            "hidden_size": qformer.hidden_size, "num_hidden_layers": qformer.num_hidden_layers,
            "num_attention_heads": qformer.num_attention_heads, "intermediate_size": qformer.intermediate_size,
            "hidden_act": qformer.hidden_act, "layer_norm_eps": qformer.layer_norm_eps,
            "cross_attention_frequency": qformer.cross_attention_frequency,
            "max_position_embeddings": qformer.max_position_embeddings,
            "hidden_dropout_prob": qformer.hidden_dropout_prob,
            "attention_probs_dropout_prob": qformer.attention_probs_dropout_prob,
        },
        text_config=text.to_dict(),
        num_query_tokens=hf_config.num_query_tokens,
        image_text_hidden_size=getattr(hf_config, "image_text_hidden_size", 256),
    )


def load_processor(source: Path, tokenizer: str | None, image_size: int):
    """Tokenizer from --tokenizer or SOURCE; image processor from SOURCE's preprocessor_config.json when present
    (else BLIP-2's standard preprocessing at `image_size`)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    from hf_vlm.modeling.blip2_flant5 import Blip2FlanT5Processor

    tokenizer_folder = Path(tokenizer) if tokenizer else source
    if not any((tokenizer_folder / n).is_file() for n in ("tokenizer.json", "spiece.model", "tokenizer_config.json")):
        raise ConversionError(f"no T5 tokenizer in {tokenizer_folder}; pass --tokenizer FOLDER")
    tok = AutoTokenizer.from_pretrained(tokenizer_folder)
    processor = Blip2FlanT5Processor.from_tokenizers(tok, image_size=image_size)
    if (source / "preprocessor_config.json").is_file():
        processor.image_processor = AutoImageProcessor.from_pretrained(source)
    return processor


def read_hf_config(source: Path, config_class, kind: str):
    """`config_class.from_pretrained(source)`, with errors naming the folder or its config.json."""
    if not (source / "config.json").is_file():
        raise ConversionError(f"{source} is not a transformers model folder (no config.json)")
    try:
        json.loads((source / "config.json").read_text())
        return config_class.from_pretrained(source)
    except (ValueError, OSError) as err:
        raise ConversionError(f"{source / 'config.json'} is not a {kind} config: {err}") from err


def copies_tied_lm_head(reader, config, hf_config) -> bool:
    """Whether our separate lm_head is filled from `shared`: transformers 5.23 builds T5 with lm_head tied to
    `shared` (T5Config forces tie_word_embeddings) and saves no lm_head; its output scaling stays what the config
    says (scale_decoder_outputs False for FlanT5-style configs). Our model then keeps a separate lm_head, equal to
    `shared`: the same computation."""
    return (LM_HEAD not in reader.keys() and SHARED in reader.keys() and not config.lm_head_is_tied
            and getattr(hf_config.text_config, "tie_word_embeddings", False))


def convert(source, output, *, tokenizer: str | None = None, dtype: str = "float32", max_shard_size: str = "2GB",
            overwrite: bool = False, progress: bool = True):
    """Convert a transformers BLIP-2 (T5) folder; returns the ConversionSummary."""
    from transformers import Blip2Config

    from hf_vlm.conversion.core import build_meta_model, convert_checkpoint
    from hf_vlm.conversion.reader import open_checkpoint
    from hf_vlm.conversion.writer import check_output
    from hf_vlm.modeling.blip2_flant5 import Blip2FlanT5ForConditionalGeneration

    source = Path(source)
    check_output(output, overwrite)
    hf_config = read_hf_config(source, Blip2Config, "BLIP-2")
    reader = open_checkpoint(source)
    config = blip2_flant5_config_from_hf(hf_config)
    model = build_meta_model(Blip2FlanT5ForConditionalGeneration, config)
    processor = load_processor(source, tokenizer, config.vision_config.image_size)
    rules = blip2_rules(reader.keys(), copy_tied_lm_head=copies_tied_lm_head(reader, config, hf_config))
    return convert_checkpoint(reader, rules, DROPS, model, output, dtype=dtype,
                              max_shard_size=max_shard_size, overwrite=overwrite, processor=processor,
                              progress=progress)


def add_arguments(parser) -> None:
    parser.add_argument("--tokenizer", help="T5 tokenizer folder (default: the tokenizer files in SOURCE)")


def convert_from_args(args):
    return convert(args.source, args.output, tokenizer=args.tokenizer, dtype=args.dtype,
                   max_shard_size=args.max_shard_size, overwrite=args.overwrite, progress=args.progress)


if __name__ == "__main__":
    import sys

    from hf_vlm.conversion import main

    sys.exit(main("hf-blip2"))
