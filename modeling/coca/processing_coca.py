"""CoCa processor: an image processor (CLIP-style resize/center-crop/normalize) plus a tokenizer.

`CocaProcessor(images=..., text=..., return_tensors="pt")` gives `pixel_values`, `input_ids`,
`attention_mask`. Captions are tokenized as `<start> text <end>` (training and scoring); for captioning,
pass the same encoding as a prompt to `CocaModel.generate`, which drops the end token so generation
continues the prompt (an empty text `""` means no prompt).

Tokenizers: the open_clip presets use CLIP's BPE (start 49406, end 49407, pad 0 as open_clip pads, 76 tokens
per text, the CLS takes position 77); CoCa v2 uses a SentencePiece model (pad 0, end 1, unk 2, start 3).
Hub-portable: imports only transformers.
"""

from __future__ import annotations

from transformers.processing_utils import ProcessorMixin


class CocaProcessor(ProcessorMixin):
    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer, **kwargs)


__all__ = ["CocaProcessor"]
