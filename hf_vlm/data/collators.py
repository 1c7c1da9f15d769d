"""Collators: prepared samples (see `hf_vlm.data.pipeline`) -> the model's batch dict.

One generic `ImageTextCollator` takes any tokenizer (or a processor, whose tokenizer it uses) and the
role of the text:
  text_role="input_ids": the caption is the text input; for the contrastive models, which compute
      their loss only when asked, the batch also carries `return_loss=True`.
        CoCa:          pixel_values, input_ids, attention_mask, return_loss (caption labels are derived
                       by the model from input_ids)
        BLIP-2 stage 1 pixel_values, input_ids, attention_mask, return_loss (Q-Former BERT tokenizer)
  text_role="labels": a prompt is the encoder input and the caption/answer is the target.
        BLIP-2 stage 2 / VQA / caption fine-tuning: pixel_values, input_ids, attention_mask (prompt),
                       labels (target ids, padding -> -100 so the loss ignores it); with a question-aware
                       Q-Former (processor.qformer_text_input) also qformer_input_ids, qformer_attention_mask
                       (the prompt in the Q-Former's vocabulary, BLIP-2 section 4.3)
`DATA_RECIPES` holds each recipe's data facts (augmentation, tokenizer, max length, prompt) in one
place; `collator_for_recipe` / `image_transform_for_recipe` read them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Label value ignored by torch's cross-entropy (and transformers' losses).
IGNORE_INDEX = -100

VQA_PROMPT = "Question: {} Short answer:"


@dataclass(frozen=True)
class DataRecipe:
    """How one training recipe turns image-text samples into batches."""

    augmentation: str  # key of hf_vlm.data.transforms.AUGMENTATIONS
    task: str  # "caption" (image + text) or "vqa" (image + question + answers)
    text_role: str  # "input_ids" or "labels"
    max_length: int  # tokens of the text input (the prompt when text_role="labels")
    max_target_length: int | None = None  # tokens of the labels (text_role="labels")
    prompt: str | None = None  # text_role="labels": encoder input; "{}" is replaced by the question
    tokenizer_attribute: str = "tokenizer"  # which tokenizer of the processor encodes the text
    padding: str = "longest"  # or "max_length" (fixed-length text, as open_clip tokenizes)
    return_loss: bool = False  # contrastive models compute their loss only with return_loss=True


# LAVIS's BLIP-2 uses max_txt_len 32 for the Q-Former text and the T5 input/output. CoCa's context is
# 77 positions: open_clip pads every caption to 76 tokens and the model appends its CLS as the 77th.
DATA_RECIPES = {
    "coca": DataRecipe(
        augmentation="coca",
        task="caption",
        text_role="input_ids",
        max_length=76,
        padding="max_length",
        return_loss=True,
    ),
    "blip2-stage1": DataRecipe(
        augmentation="blip2",
        task="caption",
        text_role="input_ids",
        max_length=32,
        tokenizer_attribute="qformer_tokenizer",
        # Fixed length, as LAVIS pads the Q-Former text: ITM all-gathers the token ids over ranks, and
        # ranks with different "longest" lengths would break that collective.
        padding="max_length",
        return_loss=True,
    ),
    "blip2-stage2": DataRecipe(
        augmentation="blip2",
        task="caption",
        text_role="labels",
        max_length=32,
        max_target_length=32,
        prompt="",
    ),
    "blip2-caption": DataRecipe(
        augmentation="blip2",
        task="caption",
        text_role="labels",
        max_length=32,
        max_target_length=32,
        prompt="a photo of",
    ),
    "blip2-vqa": DataRecipe(
        augmentation="blip2",
        task="vqa",
        text_role="labels",
        max_length=32,
        max_target_length=10,
        prompt=VQA_PROMPT,
    ),
}


def data_recipe(name: str) -> DataRecipe:
    if name not in DATA_RECIPES:
        raise ValueError(f"unknown data recipe {name!r}; expected one of {sorted(DATA_RECIPES)}")
    return DATA_RECIPES[name]


class ImageTextCollator:
    """Stacks pixel_values and tokenizes the text of prepared samples into the model's batch.

    `tokenizer` may be a processor: its `tokenizer_attribute` tokenizer is used.
    With text_role="labels", the prompt (a fixed string, or a template whose "{}" gets the sample's
    question) is tokenized as input_ids and the target (caption, or the most frequent answer) as labels.
    """

    def __init__(
        self,
        tokenizer,
        *,
        max_length: int,
        text_role: str = "input_ids",
        prompt: str | None = None,
        max_target_length: int | None = None,
        padding: str = "longest",
        return_loss: bool = False,
        tokenizer_attribute: str = "tokenizer",
    ):
        if text_role not in ("input_ids", "labels"):
            raise ValueError(f"text_role must be 'input_ids' or 'labels', got {text_role!r}")
        if text_role == "labels" and prompt is None:
            raise ValueError("text_role='labels' needs a prompt (the encoder input; '' for none)")
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
        from transformers import PreTrainedTokenizerBase

        # A question-aware Q-Former reads the prompt too: its processor tokenizes it for the Q-Former.
        self.question_inputs = tokenizer.question_inputs if getattr(tokenizer, "qformer_text_input", False) else None
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            tokenizer = getattr(tokenizer, tokenizer_attribute, None) or tokenizer
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise TypeError(
                f"{type(tokenizer).__name__} is neither a tokenizer nor a processor with a "
                f"`{tokenizer_attribute}` attribute"
            )
        if tokenizer.pad_token_id is None:
            raise ValueError(
                f"tokenizer {type(tokenizer).__name__} has no pad token; padding a batch needs one"
            )
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_target_length = max_target_length or max_length
        self.text_role = text_role
        self.prompt = prompt
        self.padding = padding
        self.return_loss = return_loss

    @classmethod
    def for_recipe(cls, recipe: str | DataRecipe, tokenizer_or_processor, **overrides) -> ImageTextCollator:
        recipe = data_recipe(recipe) if isinstance(recipe, str) else recipe
        kwargs = {
            "max_length": recipe.max_length,
            "text_role": recipe.text_role,
            "prompt": recipe.prompt,
            "max_target_length": recipe.max_target_length,
            "padding": recipe.padding,
            "return_loss": recipe.return_loss,
            "tokenizer_attribute": recipe.tokenizer_attribute,
        }
        kwargs.update(overrides)
        return cls(tokenizer_or_processor, **kwargs)

    def _tokenize(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            texts, padding=self.padding, truncation=True, max_length=max_length, return_tensors="pt"
        )

    def _prompt_for(self, sample: dict) -> str:
        if "{}" in self.prompt:
            if "question" not in sample:
                raise KeyError(
                    f"prompt {self.prompt!r} needs a question, but the sample has only {sorted(sample)}"
                )
            return self.prompt.format(sample["question"])
        return self.prompt

    @staticmethod
    def _target_of(sample: dict) -> str:
        if "answers" in sample:
            return sample["answers"][0]
        if "text" in sample:
            return sample["text"]
        raise KeyError(f"a sample needs 'text' or 'answers' as the target; it has {sorted(sample)}")

    def __call__(self, samples: list[dict]) -> dict:
        if not samples:
            raise ValueError("ImageTextCollator got an empty list of samples")
        batch = {"pixel_values": torch.stack([sample["pixel_values"] for sample in samples])}
        if self.text_role == "input_ids":
            texts = [sample["text"] for sample in samples]
            encoded = self._tokenize(texts, self.max_length)
            batch["input_ids"] = encoded["input_ids"]
            batch["attention_mask"] = encoded["attention_mask"]
        else:
            prompt_texts = [self._prompt_for(s) for s in samples]
            prompts = self._tokenize(prompt_texts, self.max_length)
            if self.question_inputs is not None:
                batch.update(self.question_inputs(prompt_texts))
            targets = self._tokenize([self._target_of(s) for s in samples], self.max_target_length)
            batch["input_ids"] = prompts["input_ids"]
            batch["attention_mask"] = prompts["attention_mask"]
            batch["labels"] = targets["input_ids"].masked_fill(targets["attention_mask"] == 0, IGNORE_INDEX)
        if self.return_loss:
            batch["return_loss"] = True
        return batch
