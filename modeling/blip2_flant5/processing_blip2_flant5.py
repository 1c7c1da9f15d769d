"""Processor for BLIP-2-FlanT5: BLIP image processing + the T5 tokenizer (+ the Q-Former's BERT tokenizer).

- images -> `pixel_values` (224 px, bicubic, CLIP mean/std, as BLIP-2 is trained).
- `text` (prompt, e.g. "Question: what is this? Short answer:") -> T5 `input_ids` / `attention_mask`, padded on the
  right; `text_target` -> `labels` (padding is ignored by the model's loss).
- `qformer_text` -> `qformer_input_ids` / `qformer_attention_mask` with the optional `qformer_tokenizer` (BERT
  WordPiece, [CLS] ... [SEP], padded to `max_text_length`), the stage-1 text input; `pretraining_inputs()` returns
  them under the names `Blip2FlanT5ForPretraining.forward` takes.
- `qformer_text_input=True` (a question-aware Q-Former, `Blip2FlanT5Config.qformer_text_input`): every call with
  images or `text` also gives the Q-Former the prompt (an empty one when captioning) as `qformer_input_ids` /
  `qformer_attention_mask`, truncated on the left to `max_text_length` as InstructBLIP's processor does.

The Q-Former tokenizer is optional (a stage-2 checkpoint needs none) and saved in the `qformer_tokenizer/`
subfolder. Hub-portable: imports only transformers.
"""

from __future__ import annotations

import os

from transformers import AutoTokenizer, BatchFeature, ProcessorMixin
from transformers.utils import logging

logger = logging.get_logger(__name__)

QFORMER_TOKENIZER_SUBFOLDER = "qformer_tokenizer"


def build_image_processor(image_size: int = 224, image_mean=None, image_std=None):
    """BLIP-2's preprocessing (LAVIS `blip_image_eval`) as a transformers image processor: bicubic resize of the
    whole image to `image_size` x `image_size`, CLIP mean/std (the default), RGB."""
    from transformers import BlipImageProcessor
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

    return BlipImageProcessor(
        size={"height": image_size, "width": image_size},
        resample=PILImageResampling.BICUBIC,
        image_mean=list(image_mean if image_mean is not None else OPENAI_CLIP_MEAN),
        image_std=list(image_std if image_std is not None else OPENAI_CLIP_STD),
        do_convert_rgb=True,
    )


class Blip2FlanT5Processor(ProcessorMixin):
    def __init__(self, image_processor, tokenizer, chat_template=None, max_text_length: int = 32,
                 qformer_text_input: bool = False, **kwargs):
        # The Q-Former tokenizer is not a ProcessorMixin attribute: those are all required, this one is optional.
        self.qformer_tokenizer = kwargs.pop("qformer_tokenizer", None)
        # named arguments: from_pretrained passes processor_config.json's values only to those
        self.max_text_length = max_text_length
        self.qformer_text_input = qformer_text_input
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    @classmethod
    def from_tokenizers(cls, tokenizer, qformer_tokenizer=None, image_size: int = 224, max_text_length: int = 32,
                        qformer_text_input: bool = False):
        """The processor BLIP-2 is trained with: `image_size` px bicubic resize, CLIP mean/std, RGB."""
        return cls(build_image_processor(image_size), tokenizer, qformer_tokenizer=qformer_tokenizer,
                   max_text_length=max_text_length, qformer_text_input=qformer_text_input)

    @property
    def model_input_names(self):
        names = ["pixel_values", "input_ids", "attention_mask"]
        return names + ["qformer_input_ids", "qformer_attention_mask"] if self.qformer_text_input else names

    def __call__(
        self,
        images=None,
        text: str | list[str] | None = None,
        text_target: str | list[str] | None = None,
        qformer_text: str | list[str] | None = None,
        return_tensors: str | None = None,
        **kwargs,
    ) -> BatchFeature:
        if images is None and text is None and text_target is None and qformer_text is None:
            raise ValueError("Blip2FlanT5Processor needs images, text, text_target or qformer_text")
        encoding = {}
        if images is not None:
            encoding.update(self.image_processor(images, return_tensors=return_tensors))
        # Tokenizer arguments (padding, truncation, max_length, ...) for prompts and targets; padding to the longest
        # is the default, which the caller's (e.g. transformers.pipeline's) `padding` replaces.
        text_kwargs = {"padding": True, **kwargs}
        if text is not None:
            encoding.update(self.tokenizer(_as_list(text, "text"), return_tensors=return_tensors, **text_kwargs))
        if text_target is not None:
            targets = self.tokenizer(_as_list(text_target, "text_target"), return_tensors=return_tensors, **text_kwargs)
            encoding["labels"] = targets["input_ids"]
            encoding["decoder_attention_mask"] = targets["attention_mask"]
        if qformer_text is not None:
            qformer = self._qformer_tokenize(qformer_text, return_tensors)
            encoding["qformer_input_ids"] = qformer["input_ids"]
            encoding["qformer_attention_mask"] = qformer["attention_mask"]
        elif self.qformer_text_input and (images is not None or text is not None):
            # The question-aware Q-Former reads the prompt too; captioning (no text) gives it an empty one.
            questions = text if text is not None else [""] * len(encoding["pixel_values"])
            encoding.update(self.question_inputs(questions, return_tensors))
        return BatchFeature(encoding, tensor_type=return_tensors)

    def question_inputs(self, questions: str | list[str], return_tensors: str | None = "pt") -> dict:
        """`qformer_input_ids` / `qformer_attention_mask` of the questions (prompts) for a question-aware Q-Former:
        padded to the longest, truncated on the left to `max_text_length` (the end of an instruction, where the
        question is, is kept), as InstructBLIP's Q-Former tokenizer does."""
        if self.qformer_tokenizer is None:
            raise ValueError(
                "this processor has no qformer_tokenizer (the Q-Former's BERT tokenizer), which a question-aware "
                "Q-Former (qformer_text_input=True) needs: Blip2FlanT5Processor.from_tokenizers(tokenizer, qformer_tokenizer=...)"
            )
        side, self.qformer_tokenizer.truncation_side = self.qformer_tokenizer.truncation_side, "left"
        try:
            encoded = self.qformer_tokenizer(_as_list(questions, "text"), padding=True, truncation=True,
                                             max_length=self.max_text_length, return_token_type_ids=False,
                                             return_tensors=return_tensors)
        finally:
            self.qformer_tokenizer.truncation_side = side
        return {"qformer_input_ids": encoded["input_ids"], "qformer_attention_mask": encoded["attention_mask"]}

    def _qformer_tokenize(self, texts, return_tensors):
        if self.qformer_tokenizer is None:
            raise ValueError(
                "this processor has no qformer_tokenizer (the Q-Former's BERT tokenizer, needed for stage-1 text); "
                "pass one: Blip2FlanT5Processor(image_processor, tokenizer, qformer_tokenizer=...)"
            )
        return self.qformer_tokenizer(
            _as_list(texts, "qformer_text"),
            padding="max_length",
            truncation=True,
            max_length=self.max_text_length,
            return_token_type_ids=False,
            return_tensors=return_tensors,
        )

    def pretraining_inputs(self, images, captions, return_tensors: str | None = "pt") -> BatchFeature:
        """`pixel_values`, `input_ids`, `attention_mask` (BERT vocabulary) for `Blip2FlanT5ForPretraining`."""
        encoding = dict(self.image_processor(images, return_tensors=return_tensors))
        encoding.update(self._qformer_tokenize(captions, return_tensors))
        return BatchFeature(encoding, tensor_type=return_tensors)

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs):
        """T5 generates only the answer (no prompt echo): decoding is all there is to do."""
        return self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        files = super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        if self.qformer_tokenizer is not None:
            self.qformer_tokenizer.save_pretrained(os.path.join(save_directory, QFORMER_TOKENIZER_SUBFOLDER))
        return files

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if processor.qformer_tokenizer is None:
            load_kwargs = {k: v for k, v in kwargs.items() if k in ("cache_dir", "revision", "token", "local_files_only")}
            try:
                processor.qformer_tokenizer = AutoTokenizer.from_pretrained(
                    pretrained_model_name_or_path, subfolder=QFORMER_TOKENIZER_SUBFOLDER, **load_kwargs
                )
            except (OSError, ValueError):
                logger.info(f"{pretrained_model_name_or_path} has no {QFORMER_TOKENIZER_SUBFOLDER}/ (stage-2 only)")
        return processor

    def to_dict(self):
        output = super().to_dict()
        output.pop("qformer_tokenizer", None)
        output["max_text_length"] = self.max_text_length
        output["qformer_text_input"] = self.qformer_text_input
        return output


def _as_list(text, name: str) -> list[str]:
    if isinstance(text, str):
        return [text]
    if isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
        return list(text)
    raise ValueError(f"{name} must be a string or a list of strings, got {type(text).__name__}")


# save_pretrained writes "auto_map" and copies this file, so trust_remote_code loading works without hf_vlm.
Blip2FlanT5Processor.register_for_auto_class()

__all__ = ["Blip2FlanT5Processor"]
