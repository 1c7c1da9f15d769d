"""CoCa processor: an image processor (CLIP-style resize / center crop / normalize) plus a tokenizer.

`processor(images=..., text=..., return_tensors="pt")` gives `pixel_values`, `input_ids`, `attention_mask`.
Texts are encoded as `<start> text <end>` (training, scoring, zero-shot prompts). For captioning, pass the
same encoding to `CocaModel.generate` as a prompt: it drops the end token so generation continues the text
(`text=""` = no prompt). `batch_decode` decodes generated ids.

Tokenizers: the open_clip presets use CLIP's BPE (start 49406, end 49407 which also pads, 76 tokens per text;
the model's CLS takes position 77); CoCa v2 uses a SentencePiece model (pad 0, end 1, unk 2, start 3).
Both are standard transformers tokenizers (built by `hf_vlm.tokenization`).
Hub-portable: imports only transformers.
"""

from __future__ import annotations

from transformers.processing_utils import ProcessorMixin

# open_clip's preprocessing for CoCa: OpenAI CLIP normalization, bicubic resize of the short side, center crop.
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def build_image_processor(image_size: int = 224, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD):
    """open_clip's CoCa evaluation preprocessing as a transformers image processor: bicubic resize of the short
    side to `image_size`, center crop, CLIP normalization."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_mean=list(image_mean), image_std=list(image_std),
    )


class CocaProcessor(ProcessorMixin):
    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer, **kwargs)

    @classmethod
    def from_tokenizer(cls, tokenizer, image_size: int = 224) -> CocaProcessor:
        """A processor with open_clip's CoCa image preprocessing at `image_size` (the model's
        `config.vision_config.image_size`) and the given tokenizer."""
        return cls(image_processor=build_image_processor(image_size), tokenizer=tokenizer)


# save_pretrained copies this file and writes `auto_map`, so the saved folder loads without hf_vlm.
CocaProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["CocaProcessor", "build_image_processor"]
