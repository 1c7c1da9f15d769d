"""The demo's language model: a small T5 pretrained on the scene text corpus, the stand-in for FlanT5.

BLIP-2 bridges a frozen image encoder and a frozen *pretrained* language model. FlanT5 cannot be had offline,
so `make demo` first teaches a small T5 the language of its scenes with the stock `transformers.Trainer`:

- prefix language modelling on the training captions (the first k words in, the rest out; k = 0 is the
  whole caption from an empty input, as BLIP-2's stage 2 asks of it),
- reading comprehension: the scene's caption, then the question as the VQA prompt phrases it ("<caption>
  Question: ... Short answer:" -> the answer). FlanT5 reads answers out of its input; a T5 that learned to answer
  from the question alone answers from the prior and ignores what the Q-Former puts before the question (the
  VQA fine-tune then stayed at the text-only loss). BLIP-2 puts the queries where the caption is here.

Run as `python -m hf_vlm.demo_lm --text_corpus corpus.jsonl --processor <blip2 processor> --output_dir ...`
plus any `TrainingArguments`; the demo launches it like the trainers/ scripts. The output is a
`T5ForConditionalGeneration` folder that `--language_model` of the blip2-stage2 trainer loads.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

import torch

from hf_vlm.data.collators import IGNORE_INDEX, VQA_PROMPT

RELATIVE_BIAS_INIT_STD = 2.0


@dataclass
class TextLMArguments:
    text_corpus: str = field(metadata={"help": "jsonl of training scenes' text: caption, questions, answers"})
    processor: str = field(metadata={"help": "the BLIP-2 processor folder whose T5 tokenizer the model reads"})
    d_model: int = field(default=128, metadata={"help": "T5 width"})
    num_layers: int = field(default=2, metadata={"help": "encoder and decoder layers each"})
    num_heads: int = field(default=4, metadata={"help": "attention heads"})
    max_length: int = field(default=48, metadata={"help": "tokens of input and of target (caption + question: up to 37)"})


def text_pairs(row: dict, rng: random.Random) -> list[tuple[str, str]]:
    """(input, target) pairs from one scene's text: a caption cut at a random word, and each question after the
    caption."""
    words = row["caption"].split()
    cut = rng.randrange(len(words))
    pairs = [(" ".join(words[:cut]), " ".join(words[cut:]))]
    pairs += [(f"{row['caption']} {VQA_PROMPT.format(q)}", a) for q, a in zip(row["questions"], row["answers"])]
    return pairs


class TextPairs(torch.utils.data.Dataset):
    """Every scene's pairs, with the caption cut drawn again each time a scene is read."""

    def __init__(self, rows: list[dict], seed: int = 0):
        self.rows, self.rng = rows, random.Random(seed)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return text_pairs(self.rows[index], self.rng)


def collate(tokenizer, max_length: int):
    def collate_fn(samples: list[list[tuple[str, str]]]) -> dict:
        pairs = [pair for sample in samples for pair in sample]
        inputs = tokenizer([p[0] for p in pairs], padding="longest", truncation=True, max_length=max_length,
                           return_tensors="pt")
        targets = tokenizer([p[1] for p in pairs], padding="longest", truncation=True, max_length=max_length,
                            return_tensors="pt")
        labels = targets["input_ids"].masked_fill(targets["attention_mask"] == 0, IGNORE_INDEX)
        return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "labels": labels}

    return collate_fn


def t5_config(tokenizer, args: TextLMArguments):
    """A FlanT5-shaped config (gated-GELU, unscaled separate lm_head) at the demo's width, over the demo tokenizer.

    transformers 5.23's T5Config turns `tie_word_embeddings=False` into `scale_decoder_outputs=False` and still says
    "tied"; `flan_t5` builds the separate head."""
    from transformers import T5Config

    return T5Config(
        vocab_size=len(tokenizer), d_model=args.d_model, d_kv=args.d_model // args.num_heads, d_ff=2 * args.d_model,
        num_layers=args.num_layers, num_decoder_layers=args.num_layers, num_heads=args.num_heads,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )


def flan_t5(config):
    """A `T5ForConditionalGeneration` with FlanT5's own lm_head (T5 v1.1), as BLIP-2 reads FlanT5 checkpoints.

    Built from a config, transformers 5.23 ties the head to the word embeddings; with no output scaling that head
    starts with logits of std ~sqrt(d_model) and trains slower. The separate head starts at std d_model**-0.5."""
    from transformers import T5ForConditionalGeneration

    model = T5ForConditionalGeneration(config)
    model._tied_weights_keys = {k: v for k, v in model._tied_weights_keys.items() if k != "lm_head.weight"}
    model.all_tied_weights_keys.pop("lm_head.weight", None)
    model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.shared.weight).normal_(std=config.d_model**-0.5))
    # T5 sees word order only through its learned relative-position biases. At T5's init (std d_model**-0.5, ~0.09)
    # they stayed at init through 2,000 steps of this corpus and the model read captions as a bag of words: "what
    # color is the circle?" was answered by any colour of the scene (1/2 with two objects, 1/3 with three). Biases
    # drawn at std RELATIVE_BIAS_INIT_STD give every head position preferences to select from from the first step.
    for stack in (model.encoder, model.decoder):
        torch.nn.init.normal_(stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight,
                              std=RELATIVE_BIAS_INIT_STD)
    return model


def reading_accuracy(model_dir, num_scenes: int = 100, image_size: int = 32, batch_size: int = 64) -> dict[str, float]:
    """How well a trained T5 answers held-out scenes' questions from their true caption, per question type: the
    ceiling of a BLIP-2 whose frozen T5 reads the Q-Former's queries where the caption is here."""
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    from hf_vlm import scenes
    from hf_vlm.evaluation.vqa import vqa_metrics

    model = T5ForConditionalGeneration.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = scenes.SceneConfig(image_size=image_size)
    pairs = [(f"{scene.caption} {VQA_PROMPT.format(q)}", a, kind)
             for i in range(num_scenes) for scene in [scenes.sample_scene(scenes.scene_seed("test", i), config)]
             for q, a, kind in scene.questions()]
    predictions = []
    for start in range(0, len(pairs), batch_size):
        inputs = tokenizer([p[0] for p in pairs[start:start + batch_size]], padding=True, return_tensors="pt")
        with torch.no_grad():
            predictions += tokenizer.batch_decode(model.generate(**inputs, max_new_tokens=8), skip_special_tokens=True)
    # Scored as `hf-vlm eval` scores BLIP-2's answers, so the two compare.
    metrics = vqa_metrics(predictions, [[a] for _, a, _ in pairs], [kind for _, _, kind in pairs])
    return {"accuracy": metrics.pop("vqa_accuracy"), **{k.removeprefix("vqa_accuracy/"): v for k, v in metrics.items()}}


def main(argv: list[str] | None = None) -> None:
    from transformers import (
        AutoProcessor,
        HfArgumentParser,
        Trainer,
        TrainingArguments,
    )

    import hf_vlm  # noqa: F401  (registers the BLIP-2 processor with the Auto classes)

    args, training_args = HfArgumentParser((TextLMArguments, TrainingArguments)).parse_args_into_dataclasses(argv)
    training_args.remove_unused_columns = False  # the collator makes the batch from raw pairs
    tokenizer = AutoProcessor.from_pretrained(args.processor).tokenizer
    with open(args.text_corpus) as f:
        rows = [json.loads(line) for line in f]
    torch.manual_seed(training_args.seed)
    model = flan_t5(t5_config(tokenizer, args))
    trainer = Trainer(model=model, args=training_args, train_dataset=TextPairs(rows, training_args.seed),
                      data_collator=collate(tokenizer, args.max_length))
    trainer.train()
    trainer.save_model()
    trainer.save_state()
    tokenizer.save_pretrained(training_args.output_dir)


if __name__ == "__main__":
    main()
