"""Data resume: the data position and the skip counts travel with every checkpoint, map-style and streaming.

Without this, the Trainer resumes a stream by iterating and discarding every batch already trained on: at scale,
decoding and augmenting 10M images to throw them away costs hours. Its map-style fast-forward skips sampler indices
without loading them, but then the skips counted before the checkpoint are lost (and counts taken at save time
include the batches DataLoader workers had prefetched, not yet trained on). Instead:
  - the training DataLoader is torchdata's `StatefulDataLoader` (`enable_stateful_dataloader`); its state holds the
    sampler position and each DataLoader worker's dataset `state_dict()` (`PreparedStream`: stream position and
    skips; `PreparedDataset`: skips) as of the last batch handed to the Trainer (accelerate takes it before its
    one-batch look-ahead);
  - `DataStateCallback.on_save` writes that state to `checkpoint-N/data_state_rank{R}.pt` on every rank, with the
    skip counts it implies (exact: counted up to the delivered batches, not the prefetched ones);
  - on resume, `on_train_begin` loads it into the DataLoader before the first batch and restores the skip counts.
    A stream re-reads at most one shuffle block of undecoded rows per worker; a map-style sampler is advanced by
    index, nothing is loaded.
The Trainer keeps its own resume bookkeeping (step and epoch counters, gradient-accumulation boundaries, and the RNG
state restored right after the first resumed batch is fetched, as an uninterrupted run has it): only its data
fast-forward is skipped for a DataLoader that was positioned from its state (`_skip_shim`), which would otherwise
skip the consumed batches a second time. With `--ignore_data_skip` the data state is not loaded: the epoch's data
starts again from its beginning, as the Trainer documents.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections import Counter

import torch
from transformers import TrainerCallback

from .pipeline import DATA_STATE_MARKER, PreparedDataset
from .skips import SkipCounter

logger = logging.getLogger(__name__)

STATE_FILE = "data_state_rank{rank}.pt"


# DataLoaders positioned from a checkpoint's data state: the Trainer's fast-forward must leave them as they are.
_POSITIONED: weakref.WeakSet = weakref.WeakSet()


def enable_stateful_dataloader(trainer) -> None:
    """Make `trainer` build its DataLoaders as torchdata StatefulDataLoaders (accelerate's
    `use_stateful_dataloader`; transformers' TrainingArguments has no flag for it)."""
    trainer.accelerator.dataloader_config.use_stateful_dataloader = True
    _install_skip_shim()


def _install_skip_shim() -> None:
    """transformers' Trainer fast-forwards a resumed epoch with accelerate's `skip_first_batches` (imported into
    transformers.trainer). A DataLoader already positioned by `load_state_dict` must not be skipped again; every
    other DataLoader goes through accelerate's function unchanged. Installed once per process."""
    import transformers.trainer as trainer_module

    skip = trainer_module.skip_first_batches
    if getattr(skip, "hf_vlm_shim", False):
        return

    def skip_first_batches(dataloader, num_batches=0):
        if dataloader in _POSITIONED:
            return dataloader
        return skip(dataloader, num_batches)

    skip_first_batches.hf_vlm_shim = True
    trainer_module.skip_first_batches = skip_first_batches


def dataset_states(state) -> list[dict]:
    """Every `PreparedStream` / `PreparedDataset` `state_dict()` inside a (Stateful)DataLoader state: one per
    DataLoader worker (one in all without workers)."""
    found = []
    if isinstance(state, dict):
        if state.get(DATA_STATE_MARKER):
            return [state]
        for value in state.values():
            found += dataset_states(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            found += dataset_states(value)
    return found


def delivered_skips(state) -> dict[str, int]:
    """Skip counts of this rank up to the batches the DataLoader has delivered (summed over its workers)."""
    total: Counter = Counter()
    for dataset_state in dataset_states(state):
        total.update(dataset_state.get("skipped", {}))
    return dict(total)


def _epoch_finished(dataloader, state: dict) -> bool:
    """Whether a StatefulDataLoader state (without or with workers) was taken after the last batch of an epoch.
    A stream has no end."""
    if state.get("_iterator_finished"):
        return True
    try:
        batches = len(dataloader)
    except TypeError:
        return False
    yielded = state.get("_num_yielded", state.get("_snapshot", {}).get("_snapshot_step", 0))
    return yielded >= batches


class DataStateCallback(TrainerCallback):
    """Saves the data position + skip counts in each checkpoint and restores them on resume (module docstring);
    gives a map-style dataset the Trainer's epoch at each epoch's start.

    `resume_from`: the checkpoint folder the run resumes from (None for a fresh run)."""

    def __init__(self, counter: SkipCounter, resume_from: str | None = None):
        self.counter = counter
        self.resume_from = resume_from

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        # The epoch seeds each sample's augmentation. accelerate's DataLoaderShard.set_epoch forwards the epoch to
        # the dataset only when its sampler is not wrapped for several processes: with 2+ ranks every epoch would
        # repeat epoch 0's crops and flips. The Trainer's epoch here is the one it is about to iterate (resumed
        # runs included: int(state.epoch) is the epochs completed).
        dataset = getattr(train_dataloader, "dataset", None)
        if isinstance(dataset, PreparedDataset):
            dataset.set_epoch(int(state.epoch or 0))

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        if not self.resume_from:
            return
        path = os.path.join(self.resume_from, STATE_FILE.format(rank=args.process_index))
        if not os.path.isfile(path):
            logger.warning("%s has no %s: the data restarts from the beginning of the epoch (samples already "
                           "trained on are seen again)", self.resume_from, os.path.basename(path))
            return
        saved = torch.load(path, weights_only=False)
        if train_dataloader is None or not hasattr(train_dataloader, "load_state_dict"):
            raise RuntimeError("resuming the data position needs the StatefulDataLoader "
                               "(enable_stateful_dataloader(trainer))")
        self.counter.load(saved["skipped"])
        if args.ignore_data_skip:
            logger.info("--ignore_data_skip: the data of the resumed epoch starts from its beginning (the data "
                        "state in %s is not loaded; skip counts restart from the checkpoint's)", path)
            return
        if _epoch_finished(train_dataloader, saved["dataloader"]):
            # A checkpoint at the end of an epoch: the next epoch starts as in the uninterrupted run, by the
            # Trainer's iter() after it has restored the RNG state: a new iterator (which draws the workers' base
            # seed from the global RNG), or persistent workers reset to the new epoch. Without this, the first
            # iter() would hand out the iterator torchdata made when accelerate took the DataLoader's initial
            # state_dict(): no draw (BLIP-2's ITM sampling and dropout drift), and persistent workers would already
            # have prefetched batches of epoch 0's order and augmentation.
            loader = getattr(train_dataloader, "base_dataloader", train_dataloader)
            loader._initial_iter_for_state_dict = False  # torchdata's flag for that pre-made iterator
            return
        train_dataloader.load_state_dict(saved["dataloader"])
        _POSITIONED.add(train_dataloader)
        logger.info("resumed the data position from %s (skips so far: %s)", path, saved["skipped"])

    def on_save(self, args, state, control, train_dataloader=None, **kwargs):
        if train_dataloader is None or not hasattr(train_dataloader, "state_dict"):
            return
        dataloader_state = train_dataloader.state_dict()
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        skipped = {reason: 0 for reason in self.counter.counts()}
        skipped.update(delivered_skips(dataloader_state))
        # Synced and vouched for by the checkpoint's completion marker (hf_vlm.trainers.checkpoints), written after
        # every on_save callback.
        torch.save({"dataloader": dataloader_state, "skipped": skipped},
                   os.path.join(folder, STATE_FILE.format(rank=args.process_index)))
