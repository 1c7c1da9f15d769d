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
from .images import BACKGROUND, MAX_IMAGE_PIXELS, load_rgb_image, to_rgb
from .pipeline import (
    MAX_SKIP_FRACTION,
    SKIP_WINDOW,
    PreparedDataset,
    PreparedStream,
    SamplePreparer,
    TooManySkips,
    prepare_dataset,
    sample_id,
    sample_seed,
)
from .skips import SKIP_REASONS, SkipCounter, SkippedSample, SkippedSamplesCallback
from .sources import ImageTextSource, load_image_text_dataset, load_source, resolve_source
from .transforms import (
    AUGMENTATIONS,
    CLIP_MEAN,
    CLIP_STD,
    EVAL_RESIZE,
    build_image_transform,
    image_transform_from_processor,
)


def process_rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the number of processes: from torch.distributed once initialised, else from the
    launcher's environment (torchrun / accelerate launch / deepspeed set RANK and WORLD_SIZE)."""
    import os

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


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
    max_skip_fraction: float | None = MAX_SKIP_FRACTION,
    skip_window: int = SKIP_WINDOW,
    split_by_node: bool = True,
    repeat: bool | None = None,
) -> TrainingData:
    """Everything a Trainer needs from the data for one recipe (a key of DATA_RECIPES).

    Give either the model's `processor` (its image processor's size/mean/std and its tokenizer are
    used) or an `image_transform` and a `tokenizer` directly. `sources`: ImageTextSource objects or
    `PATH[@WEIGHT]` strings. Create `counter` before the Trainer's DataLoader workers start (a new one
    is made when omitted) and give it to `SkippedSamplesCallback`. `augmentation` (a key of
    AUGMENTATIONS) replaces the recipe's image augmentation.

    Streaming data is split between the processes of a distributed run (`split_by_node`): each rank reads its own
    shards (`datasets.distributed.split_dataset_by_node`; whole shards when their number divides by the world
    size, else every world_size-th sample), its DataLoader workers split those further, and the stream repeats
    until --max_steps (`repeat=False`: one pass). Give the Trainer `accelerator_config={"dispatch_batches": False}`
    so that rank 0 does not read and broadcast everyone's batches (the trainers do). Map-style data is split by
    the Trainer's sampler.
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
    if streaming and split_by_node:
        rank, world_size = process_rank_and_world_size()
        if world_size > 1:
            from datasets.distributed import split_dataset_by_node

            raw = split_dataset_by_node(raw, rank=rank, world_size=world_size)
    dataset = prepare_dataset(
        raw, image_transform, counter, task=spec.task, shuffle_buffer=shuffle_buffer, seed=seed,
        max_skip_fraction=max_skip_fraction, skip_window=skip_window,
        repeat=(streaming and train) if repeat is None else repeat,
    )
    collator_overrides = {"max_length": max_length} if max_length else {}
    collator = ImageTextCollator.for_recipe(
        spec, tokenizer if tokenizer is not None else processor, **collator_overrides
    )
    return TrainingData(dataset=dataset, collator=collator, counter=counter)


__all__ = [
    "AUGMENTATIONS",
    "BACKGROUND",
    "CLIP_MEAN",
    "CLIP_STD",
    "DATA_RECIPES",
    "EVAL_RESIZE",
    "IGNORE_INDEX",
    "MAX_IMAGE_PIXELS",
    "SKIP_REASONS",
    "VQA_PROMPT",
    "DataRecipe",
    "ImageTextCollator",
    "ImageTextSource",
    "MAX_SKIP_FRACTION",
    "PreparedDataset",
    "PreparedStream",
    "SKIP_WINDOW",
    "TooManySkips",
    "process_rank_and_world_size",
    "sample_seed",
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
