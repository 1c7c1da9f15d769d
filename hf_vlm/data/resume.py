"""Streaming resume: the stream position and the skip counts travel with every checkpoint.

Without this, the Trainer resumes a stream by iterating and discarding every batch already trained on: at scale,
decoding and augmenting 10M images to throw them away costs hours. Instead:
  - the training DataLoader is torchdata's `StatefulDataLoader` (`enable_stateful_dataloader`); its state holds each
    DataLoader worker's `PreparedStream.state_dict()` as of the last batch handed to the Trainer (accelerate takes it
    before its one-batch look-ahead);
  - `StreamStateCallback.on_save` writes that state to `checkpoint-N/data_state_rank{R}.pt` on every rank, with the
    skip counts it implies (exact: counted up to the delivered batches, not the prefetched ones);
  - on resume, `on_train_begin` loads it into the DataLoader before the first batch, restores the skip counts, and
    the Trainer is told not to fast-forward (`ignore_data_skip`). The stream re-reads at most one shuffle block of
    undecoded rows per worker.
"""

from __future__ import annotations

import logging
import os
from collections import Counter

import torch
from transformers import TrainerCallback

from .skips import SkipCounter

logger = logging.getLogger(__name__)

STATE_FILE = "data_state_rank{rank}.pt"


def enable_stateful_dataloader(trainer) -> None:
    """Make `trainer` build its DataLoaders as torchdata StatefulDataLoaders (accelerate's
    `use_stateful_dataloader`; transformers' TrainingArguments has no flag for it)."""
    trainer.accelerator.dataloader_config.use_stateful_dataloader = True


def stream_states(state) -> list[dict]:
    """Every `PreparedStream.state_dict()` inside a (Stateful)DataLoader state: one per DataLoader worker."""
    found = []
    if isinstance(state, dict):
        if state.get("hf_vlm_stream"):
            return [state]
        for value in state.values():
            found += stream_states(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            found += stream_states(value)
    return found


def delivered_skips(state) -> dict[str, int]:
    """Skip counts of this rank up to the batches the DataLoader has delivered (summed over its workers)."""
    total: Counter = Counter()
    for stream in stream_states(state):
        total.update(stream.get("skipped", {}))
    return dict(total)


class StreamStateCallback(TrainerCallback):
    """Saves the streaming position + skip counts in each checkpoint and restores them on resume (module docstring).

    `resume_from`: the checkpoint folder the run resumes from (None for a fresh run)."""

    def __init__(self, counter: SkipCounter, resume_from: str | None = None):
        self.counter = counter
        self.resume_from = resume_from

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        if not self.resume_from:
            return
        path = os.path.join(self.resume_from, STATE_FILE.format(rank=args.process_index))
        if not os.path.isfile(path):
            logger.warning("%s has no %s: the stream restarts from its beginning (samples already trained on are "
                           "seen again)", self.resume_from, os.path.basename(path))
            return
        saved = torch.load(path, weights_only=False)
        if train_dataloader is None or not hasattr(train_dataloader, "load_state_dict"):
            raise RuntimeError("resuming a stream needs the StatefulDataLoader (enable_stateful_dataloader(trainer))")
        train_dataloader.load_state_dict(saved["dataloader"])
        self.counter.load(saved["skipped"])
        logger.info("resumed the stream from %s (skips so far: %s)", path, saved["skipped"])

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
