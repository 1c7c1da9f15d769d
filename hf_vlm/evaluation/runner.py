"""Run a model over an evaluation set and score it: what `hf-vlm eval` does.

Tasks per model family: CoCa does captioning, zero-shot classification and retrieval; BLIP-2-FlanT5
does captioning and VQA (prompt "Question: {} Short answer:", as LAVIS evaluates it).

Evaluation data (`load_eval_data`, `--data`):
- `scenes:SPLIT` — the synthetic scenes of `hf_vlm.scenes` (test split by default), generated here;
- any address training's `--train_data` takes, resolved and read by the same code (`hf_vlm.data.sources.
  resolve_source`, the readers of `hf_vlm.data.shards`): webdataset `.tar` shards (a folder, a file, a glob, a brace
  pattern `shards/{000..009}.tar`, `https://`, `hf://`, `s3://`, `gs://` URLs, `pipe:COMMAND`), an imagefolder
  (`metadata.jsonl`/`.csv`), parquet files, or a Hub dataset name (`org/name`). A folder with split sub-folders
  (`train/`, `test/`, ...) and a Hub dataset are read in their `test` split, or their only one, or `--split`.
Columns: the image (`image`, or the webdataset's `jpg`/`png`/...: training's image columns), captions (`captions`,
or training's caption columns `text`/`caption`/`txt`; one or a list each), questions (parallel `questions`/`answers`
[/`question_types`] lists, a `qa` list of {question, answer(s)}, or one `question` with training's answer columns
`answers`/`answer`/`multiple_choice_answer`; VQAv2's [{"answer": ...}] lists too), and a class `label` (or the
webdataset's `cls`; named by a ClassLabel feature, `label_name` fields, `--class-names`, or a label that is a name
itself). A webdataset sample's `.json` fields count as columns.
Bad data is skipped and counted under training's reasons (`hf_vlm.data.skips.SKIP_REASONS`), never raised: a
truncated tar member (the samples before it are kept), an unreadable shard, a non-UTF-8 text member or metadata line,
invalid JSON, a missing, zero-byte, undecodable or decompression-bomb image (decoded by training's
`load_rgb_image`), an empty question or answer; the first few are logged with shard and key. Rows without captions
or labels stay for the tasks that do not need them (each task counts what it leaves out). `num_samples` caps the
number of images kept; a source is read only as far as needed.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hf_vlm.data import shards as shard_io
from hf_vlm.data.collators import VQA_PROMPT  # the prompt BLIP-2's VQA fine-tune is trained with
from hf_vlm.data.images import load_rgb_image  # the one image decoder (training, eval, the Space)
from hf_vlm.data.pipeline import sample_id
from hf_vlm.data.skips import SkippedSample
from hf_vlm.data.sources import (
    DEFAULT_ANSWERS_COLUMNS,
    DEFAULT_IMAGE_COLUMNS,
    DEFAULT_QUESTION_COLUMNS,
    DEFAULT_TEXT_COLUMNS,
    ImageTextSource,
    resolve_source,
)
from hf_vlm.evaluation.captioning import caption_metrics
from hf_vlm.evaluation.decoding import decoding_summary, generation_config_for
from hf_vlm.evaluation.ranking import fill_template, retrieval_recall, topk_accuracy
from hf_vlm.evaluation.results import format_table, save_results
from hf_vlm.evaluation.vqa import vqa_metrics

TASKS = ("caption", "vqa", "zero-shot", "retrieval")
TASKS_BY_MODEL_TYPE = {"coca": ("caption", "zero-shot", "retrieval"), "blip2_flant5": ("caption", "vqa")}
DEFAULT_ZERO_SHOT_TEMPLATE = "a photo of a {}."
DEFAULT_SCENE_SAMPLES = 200
DEFAULT_SPLIT = "test"
# Training's columns (hf_vlm.data.sources), top-level only: a webdataset .json's fields are merged into the row.
CAPTION_COLUMNS = ("captions", *(c for c in DEFAULT_TEXT_COLUMNS if "." not in c))
QUESTION_COLUMNS = tuple(c for c in DEFAULT_QUESTION_COLUMNS if "." not in c)
ANSWER_COLUMNS = tuple(c for c in DEFAULT_ANSWERS_COLUMNS if "." not in c)
LABEL_COLUMNS = ("label", "cls")
MAX_SKIP_WARNINGS = 10  # the first skipped samples are logged with shard, key and what was wrong; later ones counted

logger = logging.getLogger(__name__)


@dataclass
class Question:
    image_index: int
    question: str
    answers: list[str]
    question_type: str | None = None


@dataclass
class EvalData:
    """An evaluation set in the one layout every task reads."""

    name: str
    images: list = field(default_factory=list)  # RGB PIL images
    captions: list[list[str]] = field(default_factory=list)  # per image (may be empty)
    questions: list[Question] = field(default_factory=list)
    labels: list[int | None] = field(default_factory=list)  # per image
    class_names: list[str] | None = None
    zero_shot_template: str | None = None  # how the captions phrase a class, e.g. "a large {}"
    skipped: dict[str, int] = field(default_factory=dict)  # reason (hf_vlm.data.skips.SKIP_REASONS) -> count

    def skip(self, reason: str, count: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + count


# ---------------------------------------------------------------------------------------- data

def load_eval_data(spec: str = "scenes:test", *, num_samples: int | None = None, split: str | None = None,
                   scene_image_size: int | None = None, class_names: Sequence[str] | None = None) -> EvalData:
    """The evaluation set named by `spec` (see the module docstring): its first `num_samples` usable images
    (all when None). Sources are streamed, so a large corpus is read only as far as needed."""
    if spec == "scenes" or spec.startswith("scenes:"):
        return _load_scenes(spec, num_samples, scene_image_size)
    rows, features = _read_rows(spec, split)
    data = EvalData(name=spec)
    names = list(class_names) if class_names else getattr((features or {}).get("label"), "names", None)
    label_values: list[tuple[int | None, str | None]] = []  # per image: (label, class name)
    try:
        for row in rows:
            _read_row(data, row, spec, label_values)
            if num_samples is not None and len(data.images) >= num_samples:
                break
    finally:
        if hasattr(rows, "close"):  # our readers' generators: close the shard being read (a pipe: command too)
            rows.close()
    data.class_names, data.labels = _class_names_and_labels(label_values, names)
    return data


def _read_rows(spec: str, split: str | None) -> tuple[Iterable[dict], dict | None]:
    """The rows of a source, resolved exactly as training resolves `--train_data`, and the `datasets` features
    when it has them (parquet, Hub). Webdataset and imagefolder sources are read by training's own readers in
    their RAW mode (every field; bad members, lines and shards as `__error__` rows)."""
    import datasets

    source = ImageTextSource.from_spec(spec)
    if source.path != spec:
        raise ValueError(f"--data {spec}: evaluation reads one source; drop the @WEIGHT")
    address = source.path
    source.split = split or DEFAULT_SPLIT
    try:
        fmt, files = resolve_source(source)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err} (or use scenes:SPLIT for the synthetic scenes)") from err
    if fmt != "hub":
        _check_split(spec, address, files, split)
    if fmt in ("hub", "parquet"):  # through `datasets`, as training loads them
        kwargs = files if fmt == "hub" else {"path": "parquet", "data_files": {source.split: files}}
        try:
            loaded = datasets.load_dataset(**kwargs, streaming=True)
        except Exception as err:
            raise RuntimeError(f"--data {spec}: could not load the {fmt} source: {err}") from err
        return _with_undecoded_image(spec, _choose_split(spec, loaded, split if fmt == "hub" else None))
    first = shard_io.first_sample_fields(fmt, files)
    if first is not None and not any(c in first[1] for c in DEFAULT_IMAGE_COLUMNS):
        raise ValueError(f"--data {spec}: no image column (looked for {', '.join(DEFAULT_IMAGE_COLUMNS)}); "
                         f"the first sample ({first[0]}) has {', '.join(first[1])}")
    reader = shard_io.iter_webdataset if fmt == "webdataset" else shard_io.iter_imagefolder
    return reader(files, None, shard_io.RAW), None


def _split_folders(folder: str, files: list[str]) -> list[str]:
    """The split sub-folders (datasets' split names: train/, test/, validation/, ...) the files lie in below
    `folder`."""
    from datasets.data_files import SPLIT_KEYWORDS

    known = {name for names in SPLIT_KEYWORDS.values() for name in names}
    above = set(folder.replace(os.sep, "/").split("/"))
    return sorted({part for f in files for part in f.replace(os.sep, "/").split("/")[:-1]
                   if part in known and part not in above})


def _check_split(spec: str, address: str, files: list[str], split: str | None) -> None:
    """A folder's files are those of its `split` sub-folder (resolve_source picked them); say so when that split
    does not exist, or when no split was asked for and the folder has several but no test split."""
    addresses = shard_io.expand_address(address)
    if not (len(addresses) == 1 and shard_io.is_directory(addresses[0])):
        if split is not None:
            raise ValueError(f"--split {split}: --data {spec} names files; --split chooses a split sub-folder of a "
                             "folder or a split of a Hub dataset")
        return
    splits = _split_folders(addresses[0], files)
    chosen = split or DEFAULT_SPLIT
    if not splits or chosen in splits:
        if split is not None and not splits:
            raise ValueError(f"--data {spec} has no split {split!r}: it has no split sub-folders")
        return
    if split is not None:
        raise ValueError(f"--data {spec} has no split {split!r}; it has: {', '.join(splits)}")
    if len(splits) > 1:
        raise ValueError(f"--data {spec} has several splits ({', '.join(splits)}) and no {DEFAULT_SPLIT!r}; "
                         "choose one with --split")


def _choose_split(spec: str, loaded, split: str | None):
    if split is not None:
        if split not in loaded:
            raise ValueError(f"--data {spec} has no split {split!r}; it has: {', '.join(loaded)}")
        return loaded[split]
    if DEFAULT_SPLIT in loaded:
        return loaded[DEFAULT_SPLIT]
    if len(loaded) == 1:
        return next(iter(loaded.values()))
    raise ValueError(f"--data {spec} has several splits ({', '.join(loaded)}); choose one with --split")


def _with_undecoded_image(spec: str, dataset):
    """A `datasets` dataset whose image column stays undecoded ({"bytes", "path"}), as training reads it: decoded
    per row by `load_rgb_image`, so that a bad image is counted instead of raising."""
    import datasets

    features = dataset.features or {}
    image_column = next((c for c in DEFAULT_IMAGE_COLUMNS if c in features), None)
    if features and image_column is None:
        raise ValueError(f"--data {spec}: no image column (looked for {', '.join(DEFAULT_IMAGE_COLUMNS)}); "
                         f"columns: {', '.join(features)}")
    if image_column is not None:
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset, dataset.features


def _skip(data: EvalData, spec: str, row: dict, reason: str, detail: str) -> None:
    """Count a skipped sample (or question) under its training reason; the first few are logged with shard and key."""
    data.skip(reason)
    if sum(data.skipped.values()) <= MAX_SKIP_WARNINGS:
        logger.warning("--data %s: skipped sample %s (%s): %s", spec, sample_id(row), reason, detail)


def _read_row(data: EvalData, row: dict, spec: str, label_values: list) -> None:
    """Add one row's image, captions, questions and label to `data`, or count why it cannot be used."""
    if row.get("__error__"):  # a bad member, line or shard, as the readers report it to training
        reason, _, detail = row["__error__"].partition("\t")
        _skip(data, spec, row, reason, detail)
        return
    if isinstance(row.get("json"), dict):  # a webdataset sample's .json fields are columns too
        row = {**row.pop("json"), **row}
    value = next((row[c] for c in DEFAULT_IMAGE_COLUMNS if row.get(c) is not None), None)
    try:
        image = load_rgb_image(value)  # missing, zero bytes, not an image, truncated, a decompression bomb...
    except SkippedSample as skip:
        _skip(data, spec, row, skip.reason, skip.detail)
        return
    _add_row(data, image, row, spec)
    label_values.append(_label(row))


# What a question-aware Q-Former reads besides the image (Blip2FlanT5Processor with qformer_text_input).
QFORMER_INPUTS = ("qformer_input_ids", "qformer_attention_mask")


def image_inputs(processor, images: Sequence):
    """`pixel_values` [len(images), 3, H, W] of decoded RGB images: the model's processor, as every task calls it."""
    return processor(images=list(images), return_tensors="pt")["pixel_values"]


def _load_scenes(spec: str, num_samples: int | None, image_size: int | None) -> EvalData:
    from hf_vlm import scenes

    split = spec.partition(":")[2] or "test"
    config = scenes.SceneConfig(**({"image_size": image_size} if image_size else {}))
    data = EvalData(name=spec if ":" in spec else f"scenes:{split}", class_names=config.class_names(),
                    zero_shot_template=scenes.ZERO_SHOT_TEMPLATE)
    for row in scenes.generate_scenes(split, num_samples or DEFAULT_SCENE_SAMPLES, config=config):
        _add_row(data, row["image"], row, data.name)
        data.labels.append(row.get("label"))
    return data


def _texts(value) -> list[str]:
    """Non-empty stripped strings of a caption field: one string or a list of them."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return [v.strip() for v in values if isinstance(v, str) and v.strip()]


def _answers(value) -> list[str]:
    """Every answer (repeats kept: VQA accuracy counts annotators), as training reads them (`answer_list`)."""
    return [a.strip() for a in shard_io.answer_list(value) or [] if a.strip()]


def _first(row: dict, columns: Sequence[str]):
    return next((row[c] for c in columns if row.get(c) is not None), None)


def _add_row(data: EvalData, image, row: dict, spec: str) -> None:
    index = len(data.images)
    data.images.append(image)
    data.captions.append(_texts(_first(row, CAPTION_COLUMNS)))
    if isinstance(row.get("questions"), (list, tuple)):
        answers, types = row.get("answers") or [], row.get("question_types") or []
        entries = [(q, answers[i] if i < len(answers) else None, types[i] if i < len(types) else None)
                   for i, q in enumerate(row["questions"])]
    elif isinstance(row.get("qa"), (list, tuple)):
        entries = [(qa.get("question"), qa.get("answers") or qa.get("answer"), qa.get("question_type"))
                   if isinstance(qa, dict) else (None, None, None) for qa in row["qa"]]
    elif _first(row, QUESTION_COLUMNS) is not None:
        entries = [(_first(row, QUESTION_COLUMNS), _first(row, ANSWER_COLUMNS), row.get("question_type"))]
    else:
        entries = []
    for question, answers, kind in entries:
        question = shard_io.text_value(question)
        if not question or not question.strip():
            _skip(data, spec, row, "empty_question", f"question {question!r}")
        elif not _answers(answers):
            _skip(data, spec, row, "empty_answer", f"answers {answers!r} of question {question!r}")
        else:
            data.questions.append(Question(index, question.strip(), _answers(answers), kind))


def _label(row: dict) -> tuple[int | None, str | None]:
    """(class index, class name) of a row: an integer label (a numeric string too: CSV) and/or its `label_name`; a
    label that is not a number is the class name itself."""
    label, name = _first(row, LABEL_COLUMNS), row.get("label_name")
    name = name.strip() or None if isinstance(name, str) else None
    if isinstance(label, str):
        label = label.strip()
        if not label.lstrip("-").isdigit():
            return None, name or label or None
    try:
        return (int(label) if label is not None else None), name
    except (TypeError, ValueError):
        return None, name


def _class_names_and_labels(values: list[tuple[int | None, str | None]], names: list[str] | None):
    """(class names, label per image). Names come from --class-names or a ClassLabel feature, else from the rows:
    by index when the named labels are 0..K-1, else the sorted names that occur (labels renumbered to match)."""
    if names is None:
        by_index = {label: name for label, name in values if label is not None and name is not None}
        occurring = {name for _, name in values if name is not None}
        if not occurring:
            return None, [label for label, _ in values]
        if sorted(by_index) == list(range(len(by_index))) and set(by_index.values()) == occurring:
            names = [by_index[i] for i in range(len(by_index))]
        else:  # not every class occurs, or labels are names: classify among the named classes, in name order
            names = sorted(occurring)
            return names, [names.index(name) if name is not None else
                           names.index(by_index[label]) if label in by_index else None for label, name in values]
    return names, [label if label is not None else names.index(name) if name in names else None
                   for label, name in values]


# -------------------------------------------------------------------------------- model calls

def _batches(items: Sequence, batch_size: int, desc: str):
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(items), batch_size), desc=desc, unit="batch"):
        yield items[start:start + batch_size]


def _to_device(inputs, model):
    return {k: v.to(model.device) if hasattr(v, "to") else v for k, v in inputs.items()}


def generate_captions(model, processor, images: Sequence, *, batch_size: int = 64, generation_config=None) -> list[str]:
    """Captions of `images`, decoded with `generation_config` (default: the checkpoint's caption decoding)."""
    import torch

    generation_config = generation_config or generation_config_for(model, "caption")
    captions = []
    with torch.inference_mode():
        for batch in _batches(images, batch_size, "caption"):
            # a question-aware Q-Former (BLIP-2 qformer_text_input) also gets its (empty) prompt from the processor
            inputs = processor(images=list(batch), return_tensors="pt")
            inputs = {k: inputs[k] for k in ("pixel_values", *QFORMER_INPUTS) if k in inputs}
            ids = model.generate(**_to_device(inputs, model), generation_config=generation_config)
            captions += processor.batch_decode(ids, skip_special_tokens=True)
    return [c.strip() for c in captions]


# T5's pretraining length: the prompt limit of a tokenizer that states none (transformers' VERY_LARGE_INTEGER).
T5_MAX_LENGTH = 512


def max_prompt_tokens(processor) -> int:
    """The longest prompt the language model takes, in tokens: its tokenizer's `model_max_length` (512 for
    FlanT5), or T5's 512 when the tokenizer states no limit."""
    limit = getattr(processor.tokenizer, "model_max_length", None)
    return int(limit) if isinstance(limit, int) and 0 < limit < 1_000_000 else T5_MAX_LENGTH


def truncate_questions(processor, questions: Sequence[str], prompt: str = VQA_PROMPT) -> tuple[list[str], int]:
    """Each question cut to the tokens that fit in `prompt` within `max_prompt_tokens` (a 50,000-character
    question would otherwise make T5 attend over tens of thousands of tokens); returns (questions, how many were
    cut)."""
    tokenizer = processor.tokenizer
    budget = max(1, max_prompt_tokens(processor) - len(tokenizer(prompt.replace("{}", ""))["input_ids"]))
    out, cut = [], 0
    for question in questions:
        ids = tokenizer(question, add_special_tokens=False)["input_ids"]
        if len(ids) > budget:
            question, cut = tokenizer.decode(ids[:budget], skip_special_tokens=True).strip(), cut + 1
        out.append(question)
    return out, cut


def answer_questions(model, processor, images: Sequence, questions: Sequence[str], *, prompt: str = VQA_PROMPT,
                     batch_size: int = 64, generation_config=None) -> list[str]:
    """Answers to `questions` (already cut to the model's length: `truncate_questions`), decoded with
    `generation_config` (default: the checkpoint's VQA decoding)."""
    import torch

    generation_config = generation_config or generation_config_for(model, "vqa")
    answers = []
    pairs = list(zip(images, questions))
    with torch.inference_mode():
        for batch in _batches(pairs, batch_size, "vqa"):
            # Blip2FlanT5Processor pads prompts itself (and refuses a `padding` argument).
            inputs = processor(images=[image for image, _ in batch], text=[prompt.format(q) for _, q in batch],
                               return_tensors="pt")
            ids = model.generate(**_to_device(inputs, model), generation_config=generation_config)
            answers += processor.batch_decode(ids, skip_special_tokens=True)
    return [a.strip() for a in answers]


def image_embeddings(model, processor, images: Sequence, *, batch_size: int = 64):
    """L2-normalized contrastive image embeddings [num_images, dim]."""
    import torch

    chunks = []
    with torch.inference_mode():
        for batch in _batches(images, batch_size, "image features"):
            pixel_values = image_inputs(processor, batch).to(model.device)
            chunks.append(model.get_image_features(pixel_values=pixel_values).pooler_output.float())
    return torch.nn.functional.normalize(torch.cat(chunks), dim=-1)


def text_embeddings(model, processor, texts: Sequence[str], *, batch_size: int = 64):
    """L2-normalized contrastive text embeddings [num_texts, dim]."""
    import torch

    chunks = []
    with torch.inference_mode():
        for batch in _batches(texts, batch_size, "text features"):
            # Truncated to the tokenizer's model_max_length, as CLIP-style evaluations do.
            inputs = _to_device(processor(text=list(batch), return_tensors="pt", padding=True, truncation=True), model)
            output = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
            chunks.append(output.pooler_output.float())
    return torch.nn.functional.normalize(torch.cat(chunks), dim=-1)


# ------------------------------------------------------------------------------------- tasks

def evaluate(model, processor, data: EvalData, task: str, *, batch_size: int = 64, max_new_tokens: int | None = None,
             num_beams: int | None = None, vqa_prompt: str = VQA_PROMPT, zero_shot_template: str | None = None) -> dict:
    """Run `task` on `data`; returns the results entry: {"metrics": {...}, "num_samples", "skipped", ...}.
    Captions and answers are decoded as the checkpoint recommends (`generation_config_for`); `max_new_tokens` and
    `num_beams` override it when given."""
    model_type = getattr(model.config, "model_type", None)
    supported = TASKS_BY_MODEL_TYPE.get(model_type, ())
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if task not in supported:
        families = "; ".join(f"{name}: {', '.join(ts)}" for name, ts in TASKS_BY_MODEL_TYPE.items())
        raise ValueError(f"task {task!r} is not supported by model_type {model_type!r} (tasks per model type: "
                         f"{families})")
    skipped = dict(data.skipped)
    entry = {"data": data.name, "model_type": model_type}

    if task == "caption":
        keep = [i for i, refs in enumerate(data.captions) if refs]
        _count(skipped, "empty_caption", len(data.images) - len(keep))
        _require(keep, task, data, "captions")
        config = generation_config_for(model, "caption", max_new_tokens=max_new_tokens, num_beams=num_beams)
        generation = decoding_summary(config)
        predictions = generate_captions(model, processor, [data.images[i] for i in keep], batch_size=batch_size,
                                        generation_config=config)
        metrics = caption_metrics(predictions, [data.captions[i] for i in keep])
        entry.update(num_samples=len(keep), generation=generation,
                     examples=[{"prediction": p, "references": data.captions[i]} for p, i in zip(predictions[:5], keep)])

    elif task == "vqa":
        questions = data.questions
        _require(questions, task, data, "questions with answers")
        config = generation_config_for(model, "vqa", max_new_tokens=max_new_tokens, num_beams=num_beams)
        generation = {**decoding_summary(config), "prompt": vqa_prompt}
        texts, truncated = truncate_questions(processor, [q.question for q in questions], vqa_prompt)
        predictions = answer_questions(model, processor, [data.images[q.image_index] for q in questions], texts,
                                       prompt=vqa_prompt, batch_size=batch_size, generation_config=config)
        if truncated:
            entry["truncated_questions"] = truncated
            logger.warning("vqa: %d question(s) longer than the model's %d-token prompt were truncated", truncated,
                           max_prompt_tokens(processor))
        types = [q.question_type for q in questions]
        metrics = vqa_metrics(predictions, [q.answers for q in questions],
                              types if all(t is not None for t in types) else None)
        entry.update(num_samples=len(questions), generation=generation,
                     examples=[{"question": q.question, "prediction": p, "answers": q.answers}
                               for q, p in zip(questions[:5], predictions)])

    elif task == "zero-shot":
        if not data.class_names:
            raise ValueError(f"zero-shot on {data.name} needs class names: a ClassLabel 'label' column, "
                             "'label_name' fields, or --class-names")
        keep = [i for i, label in enumerate(data.labels) if label is not None]
        _count(skipped, "no label", len(data.images) - len(keep))
        _require(keep, task, data, "labels")
        template = zero_shot_template or data.zero_shot_template or DEFAULT_ZERO_SHOT_TEMPLATE
        prompts = [fill_template(template, name) for name in data.class_names]
        logits = (image_embeddings(model, processor, [data.images[i] for i in keep], batch_size=batch_size)
                  @ text_embeddings(model, processor, prompts, batch_size=batch_size).T)
        labels = [data.labels[i] for i in keep]
        if max(labels) >= len(prompts):
            raise ValueError(f"label {max(labels)} has no class name ({len(prompts)} class names given)")
        metrics = topk_accuracy(logits, labels, ks=(1, 5))
        entry.update(num_samples=len(keep), num_classes=len(prompts), template=template)

    else:  # retrieval
        keep = [i for i, refs in enumerate(data.captions) if refs]
        _count(skipped, "empty_caption", len(data.images) - len(keep))
        _require(keep, task, data, "captions")
        # Identical captions are one text, relevant to every image they describe (scenes repeat captions).
        texts: dict[str, list[int]] = {}
        for position, i in enumerate(keep):
            for caption in data.captions[i]:
                texts.setdefault(caption, []).append(position)
        similarity = (image_embeddings(model, processor, [data.images[i] for i in keep], batch_size=batch_size)
                      @ text_embeddings(model, processor, list(texts), batch_size=batch_size).T)
        metrics = retrieval_recall(similarity, list(texts.values()), ks=(1, 5, 10))
        entry.update(num_samples=len(keep), num_texts=len(texts))

    entry["metrics"] = metrics
    entry["skipped"] = skipped
    entry["evaluated_at"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return entry


def _count(skipped: dict, reason: str, count: int) -> None:
    if count:
        skipped[reason] = skipped.get(reason, 0) + count


def _require(items, task: str, data: EvalData, what: str) -> None:
    if not items:
        raise ValueError(f"task {task!r}: {data.name} has no {what} (skipped: {data.skipped or 'none'})")


def load_model(checkpoint: str, device: str | None = None):
    """Model + processor of a checkpoint folder or Hub id, via the Auto classes (after `import hf_vlm`)."""
    import torch
    from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor

    from hf_vlm.registration import load_config

    config = load_config(checkpoint)  # errors name the file (registers our model types first)
    auto = AutoModelForImageTextToText if config.model_type == "blip2_flant5" else AutoModel
    model = auto.from_pretrained(checkpoint)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    return model, AutoProcessor.from_pretrained(checkpoint)


def run_eval(checkpoint: str, tasks: Sequence[str] | None = None, *, data: str = "scenes:test",
             num_samples: int | None = None, split: str | None = None, scene_image_size: int | None = None,
             class_names: Sequence[str] | None = None, output: str | os.PathLike | None = None,
             save: bool = True, device: str | None = None, model=None, processor=None, **task_kwargs) -> dict:
    """Evaluate `checkpoint` on `tasks` (default: every task its model type supports), print the table,
    and merge the entries into eval_results.json next to the checkpoint (or into `output`).
    Returns {task: entry}."""
    if model is None:
        model, processor = load_model(checkpoint, device)
    model_type = model.config.model_type
    tasks = list(tasks or TASKS_BY_MODEL_TYPE.get(model_type, ()))
    eval_data = load_eval_data(data, num_samples=num_samples, split=split, scene_image_size=scene_image_size,
                               class_names=class_names)
    results = {}
    for task in tasks:
        results[task] = evaluate(model, processor, eval_data, task, **task_kwargs)
        results[task]["checkpoint"] = str(checkpoint)
        if save:
            if output is None and not Path(checkpoint).is_dir():
                raise FileNotFoundError(f"{checkpoint} is not a local folder: pass --output to say where "
                                        "the results go (or --no-save)")
            save_results(output or checkpoint, task, results[task])
    print(format_table(results))
    for task, entry in results.items():
        for reason, count in entry["skipped"].items():
            print(f"{task}: skipped {count} sample(s): {reason}")
    return results
