"""Per-sample preparation (decode -> RGB -> image transform, caption checks) with counted skips.

`prepare_dataset` wraps the output of `load_image_text_dataset` so that every sample it yields is
ready for a collator: {"pixel_values": float tensor [3, H, W], "text": str} (task "caption") or
{"pixel_values", "question": str, "answers": list[str]} (task "vqa"). Bad samples are dropped
*before* batching, so every batch is full: contrastive losses gather features across ranks and need
the same batch size on each.
  - streaming (`datasets.IterableDataset`): bad samples are removed from the stream; the stream is
    shuffled with a seeded buffer first (and reshuffled per epoch by the Trainer's `set_epoch`).
  - map-style (`datasets.Dataset`): index i is prepared; if it is bad it is counted and the next
    usable index takes its place (that one is counted when the sampler draws it itself), so every
    bad sample drawn in an epoch is counted exactly once. Shuffling is the Trainer's seeded sampler.
Skips are counted in a `SkipCounter` (shared with DataLoader workers) and reported by
`SkippedSamplesCallback`.
"""

from __future__ import annotations

from collections import Counter

import torch

from .skips import SkipCounter, SkippedSample
from .sources import TASK_COLUMNS
from .transforms import load_rgb_image

# Consecutive unusable samples after which a map-style dataset is declared broken rather than skipped.
MAX_CONSECUTIVE_BAD_SAMPLES = 1000


def sample_id(example: dict) -> str:
    """Where a sample came from, for skip warnings: shard + key for webdataset, else the image's path."""
    if example.get("__url__") or example.get("__key__"):
        return f"{example.get('__url__', '?')}:{example.get('__key__', '?')}"
    image = example.get("image")
    if isinstance(image, dict) and image.get("path"):
        return image["path"]
    return "<sample without a file name>"


def _clean_text(value) -> str:
    """A caption/question as stripped text; a list (several captions) gives its first non-empty entry."""
    if isinstance(value, (list, tuple)):
        value = next((v for v in value if isinstance(v, str) and v.strip()), "")
    return value.strip() if isinstance(value, str) else ""


def _clean_answers(value) -> list[str]:
    """Answers as a list of non-empty strings, from a string, a list of strings, or VQAv2's
    list of {"answer": ...} dicts (most frequent first, so answers[0] is the training target)."""
    if value is None:
        return []
    if isinstance(value, (str, dict)):
        value = [value]
    answers = [a.get("answer", "") if isinstance(a, dict) else a for a in value]
    answers = [a.strip() for a in answers if isinstance(a, str) and a.strip()]
    return [answer for answer, _ in Counter(answers).most_common()]


class SamplePreparer:
    """Turns one raw example (canonical columns) into a prepared one, or counts why it cannot."""

    def __init__(self, image_transform, counter: SkipCounter, task: str = "caption"):
        if task not in TASK_COLUMNS:
            raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASK_COLUMNS)}")
        self.image_transform = image_transform
        self.counter = counter
        self.task = task

    def prepare(self, example: dict) -> dict:
        """The prepared sample; raises SkippedSample. Text is checked first: it costs no decoding."""
        if self.task == "caption":
            text = _clean_text(example.get("text"))
            if not text:
                raise SkippedSample("empty_caption", f"caption {example.get('text')!r}")
            fields = {"text": text}
        else:
            question = _clean_text(example.get("question"))
            if not question:
                raise SkippedSample("empty_question", f"question {example.get('question')!r}")
            answers = _clean_answers(example.get("answers"))
            if not answers:
                raise SkippedSample("empty_answer", f"answers {example.get('answers')!r}")
            fields = {"question": question, "answers": answers}
        image = load_rgb_image(example.get("image"))
        return {"pixel_values": self.image_transform(image), **fields}

    def __call__(self, example: dict) -> dict | None:
        """The prepared sample, or None after counting (and for the first few, logging) the skip."""
        try:
            return self.prepare(example)
        except SkippedSample as skip:
            self.counter.add(skip.reason, sample_id(example), skip.detail)
            return None

    def prepare_batch(self, batch: dict[str, list]) -> dict[str, list]:
        """Batched form for `IterableDataset.map(batched=True)`: the output omits the bad rows."""
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        prepared = [p for p in map(self, rows) if p is not None]
        keys = ["pixel_values", *TASK_COLUMNS[self.task][1:]]
        return {key: [p[key] for p in prepared] for key in keys}


class PreparedDataset(torch.utils.data.Dataset):
    """Map-style view of a `datasets.Dataset` that yields prepared samples (see the module docstring)."""

    def __init__(self, dataset, preparer: SamplePreparer):
        self.dataset = dataset
        self.preparer = preparer

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        prepared = self.preparer(self.dataset[index])  # counts a bad sample
        offset = 0
        while prepared is None:
            offset += 1
            if offset > min(MAX_CONSECUTIVE_BAD_SAMPLES, len(self.dataset)):
                raise RuntimeError(
                    f"{offset - 1} samples in a row after index {index} are unusable "
                    f"(skipped so far: {self.preparer.counter.counts()}); the dataset looks broken"
                )
            replacement = self.dataset[(index + offset) % len(self.dataset)]
            try:
                prepared = self.preparer.prepare(replacement)  # not counted here: counted at its own index
            except SkippedSample:
                prepared = None
        return prepared


def prepare_dataset(
    dataset,
    image_transform,
    counter: SkipCounter,
    *,
    task: str | None = None,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    map_batch_size: int = 16,
):
    """Prepared training samples from a dataset made by `load_image_text_dataset`.

    Returns a `PreparedDataset` (map-style, for `datasets.Dataset`) or a `datasets.IterableDataset`
    (streaming; shuffled with a `shuffle_buffer`-sample buffer and `seed`, 0 disables shuffling).
    `task` ("caption" or "vqa") defaults to the one the dataset's columns were loaded for.
    """
    import datasets

    if task is None:
        task = "vqa" if "question" in _columns(dataset) else "caption"
    preparer = SamplePreparer(image_transform, counter, task)
    if isinstance(dataset, datasets.IterableDataset):
        if shuffle_buffer:
            dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer)
        return dataset.map(
            preparer.prepare_batch, batched=True, batch_size=map_batch_size, remove_columns=_columns(dataset)
        )
    if isinstance(dataset, datasets.Dataset):
        return PreparedDataset(dataset, preparer)
    raise TypeError(
        f"prepare_dataset expects a datasets.Dataset or IterableDataset, got {type(dataset).__name__}"
    )


def _columns(dataset) -> list[str]:
    if dataset.features is not None:
        return list(dataset.features)
    return list(next(iter(dataset.take(1))).keys())
