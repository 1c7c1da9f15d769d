"""Per-sample preparation (decode -> RGB -> image transform, caption checks) with counted skips.

`prepare_dataset` wraps the output of `load_image_text_dataset` so that every sample it yields is
ready for a collator: {"pixel_values": float tensor [3, H, W], "text": str} (task "caption") or
{"pixel_values", "question": str, "answers": list[str]} (task "vqa"). Bad samples are dropped
*before* batching, so every batch is full: contrastive losses gather features across ranks and need
the same batch size on each.
  - streaming (`datasets.IterableDataset`): `PreparedStream`. Shards are shuffled per pass (datasets' shard
    shuffle), samples within blocks of `shuffle_buffer` rows; the stream repeats (pass 0, 1, ...) so no rank runs
    dry before another (the Trainer's --max_steps ends the run). Its `state_dict()` is the position in the
    stream; a resumed run re-reads at most one block of undecoded rows instead of decoding everything consumed.
  - map-style (`datasets.Dataset`): index i is prepared; if it is bad it is counted and the next
    usable index takes its place (that one is counted when the sampler draws it itself), so every
    bad sample drawn in an epoch is counted exactly once. Shuffling is the Trainer's seeded sampler (a
    resumed run fast-forwards it without loading samples); `state_dict()` is the skip counts so far.
Both `state_dict()`s carry DATA_STATE_MARKER, so hf_vlm.data.resume finds them inside a DataLoader's state.
Random augmentation is a function of (seed, epoch, position of the sample): each sample's transform runs on a
torch RNG seeded from those, never on the global RNG. So the same sample gets the same crop in an uninterrupted
and in a resumed run, whatever the number of DataLoader workers and whenever the Trainer restores its RNG state.
Skips are counted in a `SkipCounter` (shared with DataLoader workers) and reported by
`SkippedSamplesCallback`; a source that is mostly bad stops the run (`max_skip_fraction`).
"""

from __future__ import annotations

import copy
import hashlib
import multiprocessing
from collections import Counter, deque

import torch

from .skips import SkipCounter, SkippedSample
from .sources import ERROR_COLUMN, TASK_COLUMNS
from .transforms import load_rgb_image

# Consecutive unusable samples after which a map-style dataset is declared broken rather than skipped.
MAX_CONSECUTIVE_BAD_SAMPLES = 1000
# Default for --max_skip_fraction: past this share of skips among the last SKIP_WINDOW samples a process
# prepared, the source is declared broken (a wrong column, a dead mirror) instead of trained on silently.
MAX_SKIP_FRACTION = 0.1
SKIP_WINDOW = 1000
# Marks our datasets' state_dict()s inside a (Stateful)DataLoader state (one per DataLoader worker).
DATA_STATE_MARKER = "hf_vlm_data"


def sample_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, epoch, position...), stable across processes and Python versions."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class _hidden_worker_info:
    """Makes torch.utils.data.get_worker_info() return None inside the block (see PreparedStream._blocks)."""

    def __enter__(self):
        from torch.utils.data._utils import worker

        self._saved, worker._worker_info = worker._worker_info, None

    def __exit__(self, *exc):
        from torch.utils.data._utils import worker

        worker._worker_info = self._saved


class TooManySkips(RuntimeError):
    """More than `max_skip_fraction` of the recent samples were unusable."""


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
    """Turns one raw example (canonical columns) into a prepared one, or counts why it cannot.

    `max_skip_fraction` / `skip_window`: once `skip_window` samples have been drawn in this process, a share of
    skips above `max_skip_fraction` among the last `skip_window` raises `TooManySkips`, naming the shards with
    the most skips (None disables the check).
    """

    def __init__(self, image_transform, counter: SkipCounter, task: str = "caption", *, seed: int = 0,
                 max_skip_fraction: float | None = MAX_SKIP_FRACTION, skip_window: int = SKIP_WINDOW):
        if task not in TASK_COLUMNS:
            raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASK_COLUMNS)}")
        if max_skip_fraction is not None and not 0 < max_skip_fraction <= 1:
            raise ValueError(f"max_skip_fraction must be in (0, 1], got {max_skip_fraction}")
        self.image_transform = image_transform
        self.counter = counter
        self.task = task
        self.seed = seed
        self.max_skip_fraction = max_skip_fraction
        self.skip_window = skip_window
        self.decoded = 0  # images decoded by this process (a resumed stream must not re-decode consumed ones)
        self._recent: deque[bool] = deque(maxlen=skip_window)
        self._skips_by_shard: Counter = Counter()
        self.skipped: Counter = Counter()  # this process's skips by reason (part of a stream's resumable state)

    def prepare(self, example: dict, position: tuple[int, ...] = ()) -> dict:
        """The prepared sample; raises SkippedSample. Text is checked first: it costs no decoding.
        `position` (epoch, index...) seeds the random augmentation of this sample."""
        error = example.get(ERROR_COLUMN)
        if error:
            reason, _, detail = error.partition("\t")
            raise SkippedSample(reason, detail)
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
        self.decoded += 1
        image = load_rgb_image(example.get("image"))
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed would also reseed every CUDA generator (which fork_rng with
            # devices=[] does not restore), tying the model's dropout on GPU to the last sample's seed, and it costs
            # ~1 ms a sample in a DataLoader worker (it queues a CUDA seeding with a captured stack trace).
            torch.default_generator.manual_seed(sample_seed(self.seed, *position))
            pixel_values = self.image_transform(image)
        return {"pixel_values": pixel_values, **fields}

    def __call__(self, example: dict, position: tuple[int, ...] = ()) -> dict | None:
        """The prepared sample, or None after counting (and for the first few, logging) the skip."""
        try:
            prepared = self.prepare(example, position)
        except SkippedSample as skip:
            where = sample_id(example)
            self.counter.add(skip.reason, where, skip.detail)
            self.skipped[skip.reason] += 1
            self._skips_by_shard[example.get("__url__") or where.rsplit("/", 1)[0]] += 1
            self._record(bad=True)
            return None
        self._record(bad=False)
        return prepared

    def _record(self, bad: bool) -> None:
        self._recent.append(bad)
        if self.max_skip_fraction is None or len(self._recent) < self.skip_window:
            return
        bad_count = sum(self._recent)
        if bad_count > self.max_skip_fraction * self.skip_window:
            worst = ", ".join(f"{shard} ({n})" for shard, n in self._skips_by_shard.most_common(5))
            raise TooManySkips(
                f"{bad_count} of the last {self.skip_window} samples were unusable (more than max_skip_fraction="
                f"{self.max_skip_fraction}; skipped so far: {self.counter.counts()}). Shards with the most skips: "
                f"{worst}. Fix or remove them, or raise --max_skip_fraction."
            )


class PreparedDataset(torch.utils.data.Dataset):
    """Map-style view of a `datasets.Dataset` that yields prepared samples (see the module docstring)."""

    def __init__(self, dataset, preparer: SamplePreparer):
        self.dataset = dataset
        self.preparer = preparer
        # Set by the Trainer (accelerate calls dataset.set_epoch) in the main process; shared so that persistent
        # DataLoader workers see it too. It seeds the augmentation with the index.
        self._epoch = multiprocessing.get_context("spawn").Value("q", 0)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def state_dict(self) -> dict:
        """This process's skip counts so far (the position is the sampler's, in the DataLoader's own state)."""
        return {DATA_STATE_MARKER: "map", "skipped": dict(self.preparer.skipped)}

    def load_state_dict(self, state: dict) -> None:
        self.preparer.skipped = Counter(state.get("skipped", {}))

    def __getitem__(self, index: int) -> dict:
        position = (self._epoch.value, index)
        prepared = self.preparer(self.dataset[index], position)  # counts a bad sample
        offset = 0
        while prepared is None:
            offset += 1
            if offset > min(MAX_CONSECUTIVE_BAD_SAMPLES, len(self.dataset)):
                raise RuntimeError(
                    f"{offset - 1} samples in a row after index {index} are unusable "
                    f"(skipped so far: {self.preparer.counter.counts()}); the dataset looks broken"
                )
            replacement = self.dataset[(index + offset) % len(self.dataset)]
            try:  # not counted here: counted at its own index
                prepared = self.preparer.prepare(replacement, position)
            except SkippedSample:
                prepared = None
        return prepared


class PreparedStream(torch.utils.data.IterableDataset):
    """Prepared samples from a streaming `datasets.IterableDataset`, repeated pass after pass, resumable.

    With `repeat=True` (training) the stream never ends: every rank keeps producing batches until the Trainer's
    --max_steps, so a rank whose shards run out first cannot leave the others waiting in a collective.
    Order: per pass, datasets shuffles the shard order (seed + pass); within the stream, blocks of `block_size`
    raw rows are permuted with a seed of (seed, epoch, pass, block). `state_dict()` records the raw dataset's
    state at the start of the current block and how far into the block this process is; `load_state_dict()` puts
    the next iteration there. torchdata's StatefulDataLoader calls both in each DataLoader worker.
    """

    def __init__(self, dataset, preparer: SamplePreparer, *, seed: int = 0, block_size: int = 1000,
                 repeat: bool = False):
        self.repeat = repeat
        # block_size 0: the stream's own order. Else shard order shuffled per pass (buffer 1): blocks do the rest.
        self.dataset = dataset.shuffle(seed=seed, buffer_size=1) if block_size else dataset
        self.preparer = preparer
        self.seed = seed
        self.block_size = max(1, block_size)  # rows read (undecoded) and permuted together
        self.epoch = 0
        self._position = {"pass": 0, "block": 0, "offset": 0, "block_start": None, "skipped": {}}
        self._resume_from = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict:
        """Where this process is in the stream, and its skip counts up to there."""
        return {DATA_STATE_MARKER: "stream", "epoch": self.epoch, **copy.deepcopy(self._position)}

    def load_state_dict(self, state: dict) -> None:
        self._resume_from = copy.deepcopy(state)
        self._position = copy.deepcopy({k: state[k] for k in ("pass", "block", "offset", "block_start", "skipped")})
        self.preparer.skipped = Counter(state.get("skipped", {}))

    def _blocks(self, pass_number: int, start_state):
        """(raw state at block start, rows) for each block of one pass."""
        dataset = self.dataset
        worker = torch.utils.data.get_worker_info()
        if worker is not None:
            # This worker's shards, taken here rather than by datasets' own worker split: datasets 5.2 restores a
            # worker's saved state into the unsplit stream first (IndexError), so it must not see the worker.
            if dataset.num_shards < worker.num_workers and worker.id >= dataset.num_shards:
                return
            dataset = dataset.shard(num_shards=min(worker.num_workers, dataset.num_shards), index=worker.id,
                                    contiguous=False)
        dataset.set_epoch(pass_number)
        if start_state is not None:
            dataset.load_state_dict(start_state)

        def take(rows) -> list:
            return [row for _, row in zip(range(self.block_size), rows)]

        with _hidden_worker_info():  # datasets decides on its worker split when iteration starts
            rows = iter(dataset)
            block = take(rows)
        # datasets' state is live only once iteration has started: the first block starts where the pass (or the
        # restored state) starts, each later one at the state after the previous block's last row.
        state = start_state
        while block:
            yield state, block
            state = copy.deepcopy(dataset.state_dict())
            block = take(rows)

    def __iter__(self):
        resume, self._resume_from = self._resume_from, None
        pass_number = resume["pass"] if resume else 0
        if resume:
            self.epoch = resume["epoch"]
        while True:
            has_rows = False
            start_state = resume["block_start"] if resume else None
            block_number = resume["block"] if resume else 0
            skip = resume["offset"] if resume else 0
            resume = None
            for state, block in self._blocks(pass_number, start_state):
                order = torch.arange(len(block)) if self.block_size == 1 else torch.randperm(
                    len(block), generator=torch.Generator().manual_seed(
                        sample_seed(self.seed, self.epoch, pass_number, block_number)))
                has_rows = True  # this pass has rows
                for offset, row_index in enumerate(order.tolist()):
                    if offset < skip:
                        continue  # consumed before the checkpoint: not decoded again
                    prepared = self.preparer(block[row_index], (self.epoch, pass_number, block_number, offset))
                    self._position = {"pass": pass_number, "block": block_number, "offset": offset + 1,
                                      "block_start": state, "skipped": dict(self.preparer.skipped)}
                    if prepared is not None:
                        yield prepared
                skip = 0
                block_number += 1
            if not (self.repeat and has_rows):
                return  # one pass asked for, or this worker/rank has no data at all: stop instead of spinning
            pass_number += 1


def prepare_dataset(
    dataset,
    image_transform,
    counter: SkipCounter,
    *,
    task: str | None = None,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    max_skip_fraction: float | None = MAX_SKIP_FRACTION,
    skip_window: int = SKIP_WINDOW,
    repeat: bool = False,
):
    """Prepared training samples from a dataset made by `load_image_text_dataset`.

    Returns a `PreparedDataset` (map-style, for `datasets.Dataset`) or a `PreparedStream` (streaming; blocks of
    `shuffle_buffer` rows shuffled with `seed`, 0 keeps the stream's order; `repeat=True`: pass after pass).
    `task` ("caption" or "vqa") defaults to the one the dataset's columns were loaded for.
    """
    import datasets

    if task is None:
        task = "vqa" if "question" in _columns(dataset) else "caption"
    preparer = SamplePreparer(image_transform, counter, task, seed=seed, max_skip_fraction=max_skip_fraction,
                              skip_window=skip_window)
    if isinstance(dataset, datasets.IterableDataset):
        return PreparedStream(dataset, preparer, seed=seed, block_size=shuffle_buffer, repeat=repeat)
    if isinstance(dataset, datasets.Dataset):
        return PreparedDataset(dataset, preparer)
    raise TypeError(
        f"prepare_dataset expects a datasets.Dataset or IterableDataset, got {type(dataset).__name__}"
    )


def _columns(dataset) -> list[str]:
    if dataset.features is not None:
        return list(dataset.features)
    return list(next(iter(dataset.take(1))).keys())
