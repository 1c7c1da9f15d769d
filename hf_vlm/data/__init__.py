"""The data pipeline: image-text sources -> `datasets` -> prepared samples -> collated batches.

    counter = SkipCounter()                                         # before any DataLoader starts
    data = build_training_data("coca", ["shards/*.tar@0.7", "sbu/@0.3"], processor, counter,
                               streaming=True, seed=42)
    trainer = Trainer(..., train_dataset=data.dataset, data_collator=data.collator,
                      callbacks=[SkippedSamplesCallback(counter)])

Modules: sources (loading and weighted mixing), transforms (decoding, RGB, augmentation),
pipeline (per-sample preparation with counted skips), collators (tokenization, recipes),
skips (the shared counter and the Trainer callback).
"""

from __future__ import annotations

from dataclasses import dataclass

from .collators import DATA_RECIPES, IGNORE_INDEX, VQA_PROMPT, DataRecipe, ImageTextCollator, data_recipe
from .pipeline import PreparedDataset, SamplePreparer, prepare_dataset, sample_id
from .skips import SKIP_REASONS, SkipCounter, SkippedSample, SkippedSamplesCallback
from .sources import ImageTextSource, load_image_text_dataset, load_source, resolve_source
from .transforms import (
    AUGMENTATIONS,
    CLIP_MEAN,
    CLIP_STD,
    build_image_transform,
    image_transform_from_processor,
    load_rgb_image,
    to_rgb,
)


@dataclass
class TrainingData:
    dataset: object  # PreparedDataset (map-style) or datasets.IterableDataset (streaming)
    collator: ImageTextCollator
    counter: SkipCounter


def build_training_data(
    recipe: str,
    sources,
    processor=None,
    counter: SkipCounter | None = None,
    *,
    image_transform=None,
    tokenizer=None,
    train: bool = True,
    augmentation: str | None = None,
    image_size: int | None = None,
    max_length: int | None = None,
    streaming: bool = False,
    seed: int = 0,
    shuffle_buffer: int = 1000,
    stopping_strategy: str = "all_exhausted",
    cache_dir=None,
) -> TrainingData:
    """Everything a Trainer needs from the data for one recipe (a key of DATA_RECIPES).

    Give either the model's `processor` (its image processor's size/mean/std and its tokenizer are
    used) or an `image_transform` and a `tokenizer` directly. `sources`: ImageTextSource objects or
    `PATH[@WEIGHT]` strings. Create `counter` before the Trainer's DataLoader workers start (a new one
    is made when omitted) and give it to `SkippedSamplesCallback`. `augmentation` (a key of
    AUGMENTATIONS) replaces the recipe's image augmentation.
    """
    spec = data_recipe(recipe)
    if processor is None and (image_transform is None or tokenizer is None):
        raise ValueError("build_training_data needs a processor, or both image_transform and tokenizer")
    if image_transform is None:
        overrides = {"image_size": image_size} if image_size else {}
        image_transform = image_transform_from_processor(
            processor, augmentation or spec.augmentation, train=train, **overrides
        )
    counter = counter if counter is not None else SkipCounter()
    raw = load_image_text_dataset(
        sources,
        task=spec.task,
        streaming=streaming,
        seed=seed,
        stopping_strategy=stopping_strategy,
        cache_dir=cache_dir,
    )
    dataset = prepare_dataset(
        raw, image_transform, counter, task=spec.task, shuffle_buffer=shuffle_buffer, seed=seed
    )
    collator_overrides = {"max_length": max_length} if max_length else {}
    collator = ImageTextCollator.for_recipe(
        spec, tokenizer if tokenizer is not None else processor, **collator_overrides
    )
    return TrainingData(dataset=dataset, collator=collator, counter=counter)


__all__ = [
    "AUGMENTATIONS",
    "CLIP_MEAN",
    "CLIP_STD",
    "DATA_RECIPES",
    "IGNORE_INDEX",
    "SKIP_REASONS",
    "VQA_PROMPT",
    "DataRecipe",
    "ImageTextCollator",
    "ImageTextSource",
    "PreparedDataset",
    "SamplePreparer",
    "SkipCounter",
    "SkippedSample",
    "SkippedSamplesCallback",
    "TrainingData",
    "build_image_transform",
    "build_training_data",
    "data_recipe",
    "image_transform_from_processor",
    "load_image_text_dataset",
    "load_rgb_image",
    "load_source",
    "prepare_dataset",
    "resolve_source",
    "sample_id",
    "to_rgb",
]
