"""`lavis-blip2`: convert LAVIS BLIP-2 checkpoints into hf-vlm folders (hf_vlm.modeling.blip2_flant5).

- stage 1 (`blip2_pretrained.pth`: Q-Former with its ITC/ITM/ITG heads) -> `Blip2FlanT5ForPretraining`;
- stage 2 (`blip2_pretrained_flant5xl.pth`: the trained parts only, Q-Former + `t5_proj`)
  -> `Blip2FlanT5ForConditionalGeneration`, with `--language-model` (the FlanT5 folder: config, weights,
  tokenizer).

LAVIS saves only trainable tensors, so the frozen EVA ViT-g comes from `--vision` (LAVIS's `eva_vit_g.pth`)
unless SOURCE holds `visual_encoder.*`. The architecture of the vision tower and Q-Former is a preset
(`--preset`, default blip2-flan-t5-xl, which is LAVIS's) with LAVIS's `ln_vision` eps (1e-5); T5's comes from
`--language-model`. The stage is read from the keys (`t5_proj` = stage 2, `itm_head` = stage 1).

Run as `hf-vlm convert lavis-blip2 SOURCE OUTPUT --vision eva_vit_g.pth --language-model flan-t5-xl/` or
`python -m hf_vlm.conversion.lavis_blip2`.
"""

from __future__ import annotations

from pathlib import Path

from hf_vlm.conversion.core import Drop
from hf_vlm.conversion.errors import ConversionError

VISION = "vision:"  # namespace of the --vision file's keys (which have no prefix of their own)
LANGUAGE_MODEL = "language_model:"  # namespace of the --language-model weights
LAVIS_LN_VISION_EPS = 1e-5  # LAVIS's ln_vision is a default nn.LayerNorm

_QFORMER_LAYER = r"Qformer\.bert\.encoder\.layer\.(\d+)"
RENAMES = [  # LAVIS key -> ours; the EVA blocks keep their names (timm's EVA is LAVIS's layout)
    (rf"(?:visual_encoder\.|{VISION})(cls_token|pos_embed|patch_embed\.proj\.(?:weight|bias))", r"vision_model.\1"),
    (rf"(?:visual_encoder\.|{VISION})(blocks\.\d+\..+)", r"vision_model.\1"),
    (r"ln_vision\.(weight|bias)", r"ln_vision.\1"),
    (r"query_tokens", r"query_tokens"),
    (r"Qformer\.bert\.embeddings\.LayerNorm\.(weight|bias)", r"qformer.layernorm.\1"),
    (r"Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\.weight", r"qformer.embeddings.\1.weight"),
    (rf"{_QFORMER_LAYER}\.(attention|crossattention)\.self\.(query|key|value)\.(weight|bias)",
     r"qformer.encoder.layer.\1.\2.attention.\3.\4"),
    (rf"{_QFORMER_LAYER}\.(attention|crossattention)\.output\.(dense|LayerNorm)\.(weight|bias)",
     r"qformer.encoder.layer.\1.\2.output.\3.\4"),
    (rf"{_QFORMER_LAYER}\.(intermediate|intermediate_query)\.dense\.(weight|bias)",
     r"qformer.encoder.layer.\1.\2.dense.\3"),
    (rf"{_QFORMER_LAYER}\.(output|output_query)\.(dense|LayerNorm)\.(weight|bias)",
     r"qformer.encoder.layer.\1.\2.\3.\4"),
    # stage 1 heads
    (r"Qformer\.cls\.predictions\.transform\.(dense|LayerNorm)\.(weight|bias)", r"lm_head.transform.\1.\2"),
    (r"Qformer\.cls\.predictions\.decoder\.bias", r"lm_head.decoder.bias"),
    (r"(vision_proj|text_proj|itm_head)\.(weight|bias)", r"\1.\2"),
    (r"temp", r"temp"),
    # stage 2
    (r"t5_proj\.(weight|bias)", r"language_projection.\1"),
    (rf"{LANGUAGE_MODEL}(.+)", r"language_model.\1"),
]

DROPS = [
    Drop(r"Qformer\.bert\.embeddings\.position_ids", "BERT's position-id buffer (0..n-1, rebuilt by the model)"),
    Drop(r"Qformer\.cls\.predictions\.decoder\.weight",
         "the ITG head's vocabulary projection, tied to Qformer.bert.embeddings.word_embeddings.weight"),
    Drop(r"Qformer\.cls\.predictions\.bias", "the same tensor as Qformer.cls.predictions.decoder.bias (BERT ties them)"),
    Drop(rf"{LANGUAGE_MODEL}(encoder|decoder)\.embed_tokens\.weight", "T5's tied copies of shared.weight"),
]


def _extra_vision_blocks(num_layers: int) -> Drop:
    return Drop(rf"(?:visual_encoder\.|{VISION})blocks\.(?!(?:{'|'.join(map(str, range(num_layers)))})\.)\d+\..+",
                f"EVA ViT-g blocks after the first {num_layers}: BLIP-2 uses the penultimate block's features "
                "(LAVIS builds the ViT with depth 39 of EVA's 40)")


def detect_stage(keys) -> int:
    keys = list(keys)
    if any(k.startswith("t5_proj.") for k in keys):
        return 2
    if any(k.startswith("itm_head.") for k in keys):
        return 1
    raise ConversionError("SOURCE is neither a LAVIS BLIP-2 stage-1 checkpoint (itm_head.*) nor a stage-2 FlanT5 "
                          "one (t5_proj.*)")


def build_config(preset: str, text_config: dict | None):
    from hf_vlm.presets import get_config, preset_dict

    kwargs = preset_dict(preset)
    if kwargs.get("model_type") != "blip2_flant5":
        raise ConversionError(f"--preset {preset} is a {kwargs.get('model_type')!r} preset, not BLIP-2")
    vision = {**kwargs["vision_config"], "ln_vision_eps": LAVIS_LN_VISION_EPS}
    overrides = {"vision_config": vision}
    if text_config is not None:
        overrides["text_config"] = text_config
    return get_config(preset, **overrides)


def convert(source, output, *, vision: str | None = None, language_model: str | None = None,
            preset: str = "blip2-flan-t5-xl", tokenizer: str | None = None, qformer_tokenizer: str | None = None,
            dtype: str = "float32", max_shard_size: str = "2GB", overwrite: bool = False, progress: bool = True):
    """Convert a LAVIS BLIP-2 stage-1 or stage-2 checkpoint; returns the ConversionSummary."""
    from transformers import AutoTokenizer, T5Config

    from hf_vlm.conversion.core import build_meta_model, convert_checkpoint, rules_from_table
    from hf_vlm.conversion.reader import CombinedReader, open_checkpoint
    from hf_vlm.conversion.writer import check_output
    from hf_vlm.modeling.blip2_flant5 import (
        Blip2FlanT5ForConditionalGeneration,
        Blip2FlanT5ForPretraining,
        Blip2FlanT5Processor,
    )

    check_output(output, overwrite)
    main = open_checkpoint(source)
    stage = detect_stage(main.keys())
    if stage == 2 and language_model is None:
        raise ConversionError("a stage-2 checkpoint needs --language-model (the FlanT5 folder: config, weights, tokenizer)")
    parts = {"": main}
    if not any(k.startswith("visual_encoder.") for k in main.keys()):
        if vision is None:
            raise ConversionError(f"{source} holds no visual_encoder.* tensors (LAVIS saves trainable tensors only): "
                                  "pass --vision with the EVA ViT-g weights (eva_vit_g.pth)")
        parts[VISION] = open_checkpoint(vision)
    text_config = None
    if stage == 2:
        language_model = Path(language_model)
        try:
            text_config = T5Config.from_pretrained(language_model).to_dict()
        except (OSError, ValueError) as err:
            raise ConversionError(f"--language-model {language_model}: no T5 config ({err})") from err
        parts[LANGUAGE_MODEL] = open_checkpoint(language_model)
    reader = CombinedReader(parts)

    config = build_config(preset, text_config)
    model_class = Blip2FlanT5ForConditionalGeneration if stage == 2 else Blip2FlanT5ForPretraining
    model = build_meta_model(model_class, config)
    drops = [*DROPS, _extra_vision_blocks(config.vision_config.num_hidden_layers)]
    kept = [k for k in reader.keys() if not any(d.matches(k) for d in drops)]
    rules = rules_from_table(kept, RENAMES)

    processor = None
    tokenizer_folder = tokenizer or (language_model if stage == 2 else None)
    if tokenizer_folder is not None:
        processor = Blip2FlanT5Processor.from_tokenizers(
            AutoTokenizer.from_pretrained(tokenizer_folder),
            AutoTokenizer.from_pretrained(qformer_tokenizer) if qformer_tokenizer else None,
            image_size=config.vision_config.image_size,
            max_text_length=config.qformer_config.max_text_length,
        )
    summary = convert_checkpoint(reader, rules, drops, model, output, dtype=dtype, max_shard_size=max_shard_size,
                                 overwrite=overwrite, processor=processor, progress=progress)
    if processor is None:
        summary.notes.append("no processor written (stage 1: pass --tokenizer and --qformer-tokenizer for one)")
    return summary


def add_arguments(parser) -> None:
    parser.add_argument("--vision", help="EVA ViT-g weights (LAVIS's eva_vit_g.pth), when SOURCE has no visual_encoder.*")
    parser.add_argument("--language-model", help="FlanT5 folder (config, weights, tokenizer); required for stage 2")
    parser.add_argument("--preset", default="blip2-flan-t5-xl",
                        help="architecture of the vision tower and Q-Former (default: blip2-flan-t5-xl, LAVIS's)")
    parser.add_argument("--tokenizer", help="T5 tokenizer folder (default: --language-model)")
    parser.add_argument("--qformer-tokenizer", help="the Q-Former's BERT tokenizer folder (stage-1 text input)")


def convert_from_args(args):
    return convert(args.source, args.output, vision=args.vision, language_model=args.language_model,
                   preset=args.preset, tokenizer=args.tokenizer, qformer_tokenizer=args.qformer_tokenizer,
                   dtype=args.dtype, max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                   progress=args.progress)


if __name__ == "__main__":
    import sys

    from hf_vlm.conversion import main as cli_main

    sys.exit(cli_main("lavis-blip2"))
