"""`hf-instructblip`: convert a transformers `InstructBlipForConditionalGeneration` folder with a T5 language model
(e.g. Salesforce/instructblip-flan-t5-xl: config.json, safetensors or .bin weights, the T5 tokenizer, the Q-Former's
BERT tokenizer in `qformer_tokenizer/`, preprocessor_config.json) into a question-aware
`Blip2FlanT5ForConditionalGeneration` folder (`qformer_text_input=True`, hf_vlm.modeling.blip2_flant5).

InstructBLIP is BLIP-2 whose Q-Former also reads the instruction: the vision tower, queries, projection and T5 convert
as `hf-blip2` converts them (EVA layout for the ViT); the Q-Former's text path (word and position embeddings, the text
positions' FFNs) is kept, and its embedding LayerNorm over [queries, instruction] (`qformer.embeddings.layernorm`) is
our `qformer.layernorm`, the same computation. The processor gives the prompt to the Q-Former too, truncated on the
left to 128 BERT tokens (LAVIS InstructBLIP's `max_txt_len`).

Run as `hf-vlm convert hf-instructblip SOURCE OUTPUT` or `python -m hf_vlm.conversion.hf_instructblip`.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from hf_vlm.conversion.core import Drop
from hf_vlm.conversion.errors import ConversionError
from hf_vlm.conversion.hf_blip2 import DROPS as BLIP2_DROPS
from hf_vlm.conversion.hf_blip2 import (
    blip2_flant5_config_from_hf,
    blip2_rules,
    copies_tied_lm_head,
    read_hf_config,
)

QFORMER_TOKENIZER_SUBFOLDER = "qformer_tokenizer"  # where InstructBlipProcessor.save_pretrained puts it
QFORMER_MAX_TEXT_LENGTH = 128  # LAVIS blip2_t5_instruct's max_txt_len for the Q-Former's instruction

# InstructBLIP key -> ours: hf-blip2's rules (hf_blip2.RENAMES), and the Q-Former's embedding LayerNorm moves.
EMBEDDING_LAYERNORM = (r"qformer\.embeddings\.layernorm\.(weight|bias)", r"qformer.layernorm.\1")
DROPS = [
    # BLIP-2's drops less the Q-Former text path, which InstructBLIP uses.
    *(d for d in BLIP2_DROPS if not d.pattern.startswith(r"qformer\.")),
    Drop(r"qformer\.embeddings\.position_ids", "a fixed arange buffer (older transformers saved it); rebuilt by the model"),
]


def config_from_hf(hf_config):
    """Our config computing what transformers' `InstructBlipForConditionalGeneration(hf_config)` computes."""
    from hf_vlm.modeling.blip2_flant5 import Blip2FlanT5Config

    if getattr(hf_config, "model_type", None) != "instructblip":
        raise ConversionError(f"config model_type is {getattr(hf_config, 'model_type', None)!r}, expected 'instructblip'")
    if hf_config.text_config.model_type != "t5":
        raise ConversionError(
            f"this InstructBLIP has a {hf_config.text_config.model_type!r} language model; hf-instructblip converts "
            "InstructBLIP with T5 (FlanT5) only"
        )
    # InstructBLIP's vision, Q-Former and T5 configs have BLIP-2's fields: the BLIP-2 mapping reads them.
    blip2_view = SimpleNamespace(model_type="blip-2", vision_config=hf_config.vision_config,
                                 qformer_config=hf_config.qformer_config, text_config=hf_config.text_config,
                                 num_query_tokens=hf_config.num_query_tokens)
    config = blip2_flant5_config_from_hf(blip2_view).to_dict()
    # InstructBLIP's Q-Former vocabulary already holds LAVIS's [DEC] (30523 = BERT + [DEC]), the last id.
    vocab_size = hf_config.qformer_config.vocab_size
    config["qformer_config"].update(vocab_size=vocab_size, dec_token_id=vocab_size - 1,
                                    max_text_length=QFORMER_MAX_TEXT_LENGTH)
    config["qformer_text_input"] = True
    return Blip2FlanT5Config.from_dict(config)


def instructblip_rules(source_keys, copy_tied_lm_head: bool = False):
    """Rules for every kept source key: the embedding LayerNorm's, then hf-blip2's for the rest."""
    import re

    from hf_vlm.conversion.core import rules_from_table

    layernorm = [k for k in source_keys if re.fullmatch(EMBEDDING_LAYERNORM[0], k)]
    rest = [k for k in source_keys if k not in layernorm]
    return rules_from_table(layernorm, [EMBEDDING_LAYERNORM]) + blip2_rules(rest, DROPS, copy_tied_lm_head)


def load_processor(source: Path, tokenizer: str | None, qformer_tokenizer: str | None, image_size: int):
    """hf-blip2's processor (T5 tokenizer, image processor) with the Q-Former's BERT tokenizer from
    --qformer-tokenizer or SOURCE/qformer_tokenizer, giving the prompt to the Q-Former."""
    from transformers import AutoTokenizer

    from hf_vlm.conversion.hf_blip2 import load_processor as load_blip2_processor

    processor = load_blip2_processor(source, tokenizer, image_size)
    folder = Path(qformer_tokenizer) if qformer_tokenizer else source / QFORMER_TOKENIZER_SUBFOLDER
    if not any((folder / n).is_file() for n in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        raise ConversionError(f"no Q-Former (BERT) tokenizer in {folder}; pass --qformer-tokenizer FOLDER")
    processor.qformer_tokenizer = AutoTokenizer.from_pretrained(folder)
    processor.qformer_text_input = True
    processor.max_text_length = QFORMER_MAX_TEXT_LENGTH
    return processor


def convert(source, output, *, tokenizer: str | None = None, qformer_tokenizer: str | None = None,
            dtype: str = "float32", max_shard_size: str = "2GB", overwrite: bool = False, progress: bool = True):
    """Convert a transformers InstructBLIP (T5) folder; returns the ConversionSummary."""
    from transformers import InstructBlipConfig

    from hf_vlm.conversion.core import build_meta_model, convert_checkpoint
    from hf_vlm.conversion.reader import open_checkpoint
    from hf_vlm.conversion.writer import check_output
    from hf_vlm.modeling.blip2_flant5 import Blip2FlanT5ForConditionalGeneration

    source = Path(source)
    check_output(output, overwrite)
    hf_config = read_hf_config(source, InstructBlipConfig, "InstructBLIP")
    config = config_from_hf(hf_config)
    reader = open_checkpoint(source)
    model = build_meta_model(Blip2FlanT5ForConditionalGeneration, config)
    processor = load_processor(source, tokenizer, qformer_tokenizer, config.vision_config.image_size)
    rules = instructblip_rules(reader.keys(), copies_tied_lm_head(reader, config, hf_config))
    return convert_checkpoint(reader, rules, DROPS, model, output, dtype=dtype, max_shard_size=max_shard_size,
                              overwrite=overwrite, processor=processor, progress=progress)


def add_arguments(parser) -> None:
    parser.add_argument("--tokenizer", help="T5 tokenizer folder (default: the tokenizer files in SOURCE)")
    parser.add_argument("--qformer-tokenizer",
                        help=f"the Q-Former's BERT tokenizer folder (default: SOURCE/{QFORMER_TOKENIZER_SUBFOLDER})")


def convert_from_args(args):
    return convert(args.source, args.output, tokenizer=args.tokenizer, qformer_tokenizer=args.qformer_tokenizer,
                   dtype=args.dtype, max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                   progress=args.progress)


if __name__ == "__main__":
    import sys

    from hf_vlm.conversion import main

    sys.exit(main("hf-instructblip"))
