"""Counted skips: every bad sample the data pipeline drops is counted by reason and reported.

A run must never die on one corrupt image or empty caption, and must never drop one silently.
`SkipCounter` holds one shared-memory integer per reason, created in the main process before the
DataLoader starts its workers, so skips found inside worker processes are counted too.
`SkippedSamplesCallback` puts the totals into the stock `Trainer`'s logs (`skipped/<reason>`) at
every logging step and warns with them at the end of training.
"""

from __future__ import annotations

import logging
import multiprocessing

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

# Why a sample was dropped. One counter each, always reported (zeros included) so every logging
# backend sees the same keys from step one.
SKIP_REASONS = (
    "corrupt_image",  # no image, zero bytes, not an image, truncated or undecodable
    "oversized_image",  # more pixels than the decompression-bomb limit
    "empty_caption",
    "empty_question",
    "empty_answer",
    "bad_text_encoding",  # a caption/metadata line that is not UTF-8
    "bad_json",  # a .json member or metadata.jsonl line that does not parse
    "truncated_member",  # a tar member cut short: its sample and the rest of that shard
    "unreadable_shard",  # a shard that cannot be opened or read (missing, HTTP error, failed pipe: command)
)


class SkippedSample(Exception):
    """Raised while preparing one sample that cannot be trained on; caught and counted by the pipeline."""

    def __init__(self, reason: str, detail: str):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; expected one of {SKIP_REASONS}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class SkipCounter:
    """Process-shared counts of skipped samples, by reason.

    Create it in the main process *before* any DataLoader worker starts: workers inherit the shared
    memory (fork) or receive it while being spawned, and their increments land in the same integers.
    Its locks are made in a "spawn" context, so it works with every start method (fork, spawn,
    forkserver: TrainingArguments.dataloader_multiprocessing_context); a fork-context lock could not be
    handed to a spawned worker.
    The first `max_warnings` skips (over all processes) are logged at warning level with the sample's
    file/key, so the bad files can be found; later ones are only counted.
    """

    def __init__(self, max_warnings: int = 10):
        context = multiprocessing.get_context("spawn")
        self._counts = {reason: context.Value("q", 0) for reason in SKIP_REASONS}
        self._warned = context.Value("q", 0)
        self.max_warnings = max_warnings

    def add(self, reason: str, sample_id: str, detail: str = "") -> None:
        if reason not in self._counts:
            raise ValueError(f"unknown skip reason {reason!r}; expected one of {SKIP_REASONS}")
        count = self._counts[reason]
        with count.get_lock():
            count.value += 1
        with self._warned.get_lock():
            warn = self._warned.value < self.max_warnings
            if warn:
                self._warned.value += 1
        if warn:
            logger.warning("skipped sample %s (%s)%s", sample_id, reason, f": {detail}" if detail else "")

    def load(self, counts: dict[str, int]) -> None:
        """Set the counts (a resumed run continues from its checkpoint's counts)."""
        for reason, value in counts.items():
            if reason in self._counts:
                self._counts[reason].value = int(value)

    def counts(self) -> dict[str, int]:
        return {reason: value.value for reason, value in self._counts.items()}

    @property
    def total(self) -> int:
        return sum(self.counts().values())

    def __repr__(self) -> str:
        return f"SkipCounter({self.counts()})"


def _sum_over_ranks(counts: dict[str, int], device) -> dict[str, int]:
    """Sum per-rank counts when torch.distributed runs: each rank (and its workers) counts its own skips."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return counts
    values = torch.tensor(list(counts.values()), dtype=torch.int64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return dict(zip(counts, values.tolist()))


class SkippedSamplesCallback(TrainerCallback):
    """Adds `skipped/<reason>` totals (summed over ranks) to the Trainer's logs; warns with them at the end.

    Pass it as `Trainer(..., callbacks=[SkippedSamplesCallback(counter)])`: the counts then appear in
    the console/progress logs and in `trainer.state.log_history` (saved with every checkpoint). Use
    `SkippedSamplesCallback.attach(trainer, counter)` instead to run it before the `report_to`
    integrations (TensorBoard, W&B...), which read the logs before later callbacks add to them.

    The sum over ranks is a collective: it is done only at the Trainer's own training-loop logs (the
    step logs that carry "loss" and the final one that carries "train_loss") and at train end, which
    every rank reaches together.
    """

    def __init__(self, counter: SkipCounter):
        self.counter = counter

    @classmethod
    def attach(cls, trainer, counter: SkipCounter) -> SkippedSamplesCallback:
        callback = cls(counter)
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    def skipped_counts(self, args) -> dict[str, int]:
        return _sum_over_ranks(self.counter.counts(), getattr(args, "device", "cpu"))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not ("loss" in logs or "train_loss" in logs):
            return
        skipped = {f"skipped/{reason}": count for reason, count in self.skipped_counts(args).items()}
        logs.update(skipped)
        # Trainer.log appended a copy of `logs` to the history before calling us: complete that copy.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(skipped)

    def on_train_end(self, args, state, control, **kwargs):
        counts = self.skipped_counts(args)
        if not state.is_world_process_zero:
            return
        total = sum(counts.values())
        summary = ", ".join(f"{reason}={count}" for reason, count in counts.items())
        if total:
            logger.warning("training skipped %d bad samples in total (%s)", total, summary)
        else:
            logger.info("training skipped no samples (%s)", summary)
