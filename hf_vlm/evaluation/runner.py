"""Run a model over an evaluation set and score it: what `hf-vlm eval` does.

Tasks per model family: CoCa does captioning, zero-shot classification and retrieval; BLIP-2-FlanT5
does captioning and VQA (prompt "Question: {} Short answer:", as LAVIS evaluates it).

Evaluation data (`load_eval_data`):
- `scenes:SPLIT` — the synthetic scenes of `hf_vlm.scenes` (test split by default), generated here;
- a folder with `metadata.jsonl`/`.csv` (imagefolder) or webdataset `.tar` shards (a folder of them,
  one shard, or a glob), read with `datasets`. Columns: the image (`image`, or the webdataset's
  `png`/`jpg`/...), captions (`caption`, `captions` or the webdataset's `txt`), questions (parallel
  `questions`/`answers`[/`question_types`] lists, a `qa` list of {question, answer(s)}, or one
  `question` with `answer`/`answers`), and a class `label` (with names from a ClassLabel feature,
  `label_name`s, or `--class-names`). A webdataset sample's `.json` fields count as columns.
Rows that lack what a task needs, or whose image cannot be decoded, are skipped and counted.
"""

from __future__ import annotations

import datetime
import glob
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hf_vlm.data.collators import VQA_PROMPT  # the prompt BLIP-2's VQA fine-tune is trained with
from hf_vlm.data.images import load_rgb_image  # the one image decoder (training, eval, the Space)
from hf_vlm.data.skips import SkippedSample
from hf_vlm.evaluation.captioning import caption_metrics
from hf_vlm.evaluation.ranking import retrieval_recall, topk_accuracy
from hf_vlm.evaluation.results import format_table, save_results
from hf_vlm.evaluation.vqa import vqa_metrics

TASKS = ("caption", "vqa", "zero-shot", "retrieval")
TASKS_BY_MODEL_TYPE = {"coca": ("caption", "zero-shot", "retrieval"), "blip2_flant5": ("caption", "vqa")}
DEFAULT_ZERO_SHOT_TEMPLATE = "a photo of a {}."
DEFAULT_SCENE_SAMPLES = 200
IMAGE_COLUMNS = ("image", "png", "jpg", "jpeg", "webp")
UNDECODABLE_IMAGE = "undecodable image"  # the skip reason of an image load_rgb_image refuses
MAX_SKIP_WARNINGS = 10  # the first skipped images are logged with what was wrong; later ones only counted

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
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count

    def skip(self, reason: str, count: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + count


# ---------------------------------------------------------------------------------------- data

def load_eval_data(spec: str = "scenes:test", *, num_samples: int | None = None, split: str | None = None,
                   scene_image_size: int | None = None, class_names: Sequence[str] | None = None) -> EvalData:
    """The evaluation set named by `spec` (see the module docstring): its first `num_samples` rows
    (all when None). Files are streamed, so a large corpus is read only as far as needed."""
    import datasets

    if spec == "scenes" or spec.startswith("scenes:"):
        return _load_scenes(spec, num_samples, scene_image_size)
    dataset = _load_files(spec, split)
    features = dataset.features or {}
    image_column = next((c for c in IMAGE_COLUMNS if c in features), None)
    if features and image_column is None:
        raise ValueError(f"--data {spec}: no image column (looked for {', '.join(IMAGE_COLUMNS)}); "
                         f"columns: {', '.join(features)}")
    if image_column is not None:  # decoded here, so that a corrupt image is counted instead of raising
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    names = list(class_names) if class_names else getattr(features.get("label"), "names", None)
    data = EvalData(name=spec)
    label_names: dict[int, str] = {}
    for row in dataset if num_samples is None else dataset.take(num_samples):
        row = {**(row.pop("json", None) or {}), **row}  # a webdataset sample's .json fields are columns too
        value = row.get(image_column) if image_column else next((row[c] for c in IMAGE_COLUMNS if c in row), None)
        if value is None:
            data.skip("no image")
            continue
        where = row.get("__key__") or (value.get("path") if isinstance(value, dict) else None)
        try:
            image = load_rgb_image(value, where)
        except SkippedSample as skip:  # zero bytes, not an image, truncated, a decompression bomb...
            data.skip(UNDECODABLE_IMAGE)
            if data.skipped[UNDECODABLE_IMAGE] <= MAX_SKIP_WARNINGS:
                logger.warning("--data %s: skipped an undecodable image (%s)", spec, skip.detail)
            continue
        _add_row(data, image, row)
        if row.get("label_name") is not None and data.labels[-1] is not None:
            label_names[data.labels[-1]] = row["label_name"]
    if names is None and label_names:
        if sorted(label_names) == list(range(len(label_names))):
            names = [label_names[i] for i in range(len(label_names))]
        else:  # not every class occurs: classify among the named classes that do, relabelled in name order
            names = sorted(set(label_names.values()))
            data.labels = [None if label is None else names.index(label_names[label]) for label in data.labels]
    data.class_names = names
    return data


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
        _add_row(data, row["image"], row)
    return data


def _load_files(spec: str, split: str | None):
    import datasets

    path = Path(spec)
    shards = sorted(glob.glob(spec)) if any(c in spec for c in "*?[") else []
    if path.is_dir():
        shards = sorted(str(p) for p in path.rglob("*.tar"))
        has_metadata = any(path.rglob("metadata.jsonl")) or any(path.rglob("metadata.csv"))
        if not shards and not has_metadata:
            raise FileNotFoundError(f"--data {spec}: the folder has neither metadata.jsonl/metadata.csv "
                                    "(imagefolder) nor .tar shards (webdataset)")
        # data_dir: split folders (train/, test/, ...) become splits
        loaded = datasets.load_dataset("webdataset" if shards else "imagefolder", data_dir=str(path), streaming=True)
    elif (path.is_file() and path.suffix == ".tar") or shards:
        loaded = datasets.load_dataset("webdataset", data_files=shards or [str(path)], streaming=True)
    else:
        raise FileNotFoundError(f"--data {spec}: no such folder or .tar shard (or use scenes:SPLIT)")
    if split is not None:
        if split not in loaded:
            raise ValueError(f"--data {spec} has no split {split!r}; it has: {', '.join(loaded)}")
        return loaded[split]
    if "test" in loaded:
        return loaded["test"]
    if len(loaded) == 1:
        return next(iter(loaded.values()))
    raise ValueError(f"--data {spec} has several splits ({', '.join(loaded)}); choose one with --split")


def _add_row(data: EvalData, image, row: dict) -> None:
    index = len(data.images)
    data.images.append(image)
    captions = row.get("captions") or row.get("caption") or row.get("txt") or []
    data.captions.append([captions] if isinstance(captions, str) else list(captions))
    if row.get("questions") is not None:
        types = row.get("question_types") or [None] * len(row["questions"])
        for question, answer, kind in zip(row["questions"], row["answers"], types):
            data.questions.append(Question(index, question, [answer] if isinstance(answer, str) else list(answer), kind))
    elif row.get("qa") is not None:
        for qa in row["qa"]:
            answers = qa.get("answers") or [qa["answer"]]
            data.questions.append(Question(index, qa["question"], list(answers), qa.get("question_type")))
    elif row.get("question") is not None:
        answers = row.get("answers") or [row["answer"]]
        data.questions.append(Question(index, row["question"], list(answers), row.get("question_type")))
    label = row.get("label")
    data.labels.append(int(label) if label is not None else None)


# -------------------------------------------------------------------------------- model calls

def _batches(items: Sequence, batch_size: int, desc: str):
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(items), batch_size), desc=desc, unit="batch"):
        yield items[start:start + batch_size]


def _to_device(inputs, model):
    return {k: v.to(model.device) if hasattr(v, "to") else v for k, v in inputs.items()}


def generate_captions(model, processor, images: Sequence, *, batch_size: int = 64, max_new_tokens: int = 20,
                      num_beams: int = 1) -> list[str]:
    import torch

    captions = []
    with torch.inference_mode():
        for batch in _batches(images, batch_size, "caption"):
            ids = model.generate(pixel_values=image_inputs(processor, batch).to(model.device),
                                 max_new_tokens=max_new_tokens, num_beams=num_beams)
            captions += processor.batch_decode(ids, skip_special_tokens=True)
    return [c.strip() for c in captions]


def answer_questions(model, processor, images: Sequence, questions: Sequence[str], *, prompt: str = VQA_PROMPT,
                     batch_size: int = 64, max_new_tokens: int = 10, num_beams: int = 1) -> list[str]:
    import torch

    answers = []
    pairs = list(zip(images, questions))
    with torch.inference_mode():
        for batch in _batches(pairs, batch_size, "vqa"):
            # Blip2FlanT5Processor pads prompts itself (and refuses a `padding` argument).
            inputs = processor(images=[image for image, _ in batch], text=[prompt.format(q) for _, q in batch],
                               return_tensors="pt")
            ids = model.generate(**_to_device(inputs, model), max_new_tokens=max_new_tokens, num_beams=num_beams)
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
             num_beams: int = 1, vqa_prompt: str = VQA_PROMPT, zero_shot_template: str | None = None) -> dict:
    """Run `task` on `data`; returns the results entry: {"metrics": {...}, "num_samples", "skipped", ...}."""
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
        _count(skipped, "no caption", len(data.images) - len(keep))
        _require(keep, task, data, "captions")
        generation = {"max_new_tokens": max_new_tokens or 20, "num_beams": num_beams}
        predictions = generate_captions(model, processor, [data.images[i] for i in keep], batch_size=batch_size,
                                        **generation)
        metrics = caption_metrics(predictions, [data.captions[i] for i in keep])
        entry.update(num_samples=len(keep), generation=generation,
                     examples=[{"prediction": p, "references": data.captions[i]} for p, i in zip(predictions[:5], keep)])

    elif task == "vqa":
        questions = data.questions
        _require(questions, task, data, "questions with answers")
        generation = {"max_new_tokens": max_new_tokens or 10, "num_beams": num_beams, "prompt": vqa_prompt}
        predictions = answer_questions(model, processor, [data.images[q.image_index] for q in questions],
                                       [q.question for q in questions], prompt=vqa_prompt, batch_size=batch_size,
                                       max_new_tokens=generation["max_new_tokens"], num_beams=num_beams)
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
        prompts = [template.format(name) for name in data.class_names]
        logits = (image_embeddings(model, processor, [data.images[i] for i in keep], batch_size=batch_size)
                  @ text_embeddings(model, processor, prompts, batch_size=batch_size).T)
        labels = [data.labels[i] for i in keep]
        if max(labels) >= len(prompts):
            raise ValueError(f"label {max(labels)} has no class name ({len(prompts)} class names given)")
        metrics = topk_accuracy(logits, labels, ks=(1, 5))
        entry.update(num_samples=len(keep), num_classes=len(prompts), template=template)

    else:  # retrieval
        keep = [i for i, refs in enumerate(data.captions) if refs]
        _count(skipped, "no caption", len(data.images) - len(keep))
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
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

    import hf_vlm  # noqa: F401  (registers our model types)

    config = AutoConfig.from_pretrained(checkpoint)
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
