"""Image-text sources -> one `datasets` dataset with canonical columns, several sources mixed by weight.

A source is an address (see `hf_vlm.data.shards` for braces, globs, remote URLs and `pipe:`) or a Hub dataset name:
  - webdataset tar shards (`cc3m/{00000..00331}.tar`, `shards/*.tar`, `https://host/x-{0..9}.tar`,
    `pipe:curl -s ...`, a folder of .tar files): one sample = files sharing a key (`0001.jpg` + `0001.txt`
    and/or `0001.json`);
  - an imagefolder: a folder with images and `metadata.jsonl` / `metadata.csv` (`file_name` column);
  - parquet files (a file, a glob, or a folder of .parquet; local or remote);
  - a Hub dataset name (`org/name`), loaded by `datasets.load_dataset` (from the local cache when offline).
Webdataset and imagefolder sources are read by hf-vlm's own readers (`hf_vlm.data.shards`), through
`datasets.IterableDataset.from_generator` (streaming: one shard list that `datasets` splits between ranks and
DataLoader workers) or `Dataset.from_generator` (map-style, cached as Arrow): a bad member, line or shard becomes a
counted row, never an exception. Parquet and Hub datasets go through `datasets.load_dataset`.
Every source is reduced to the same columns, so sources of any layout can be mixed:
  task "caption": image, text          task "vqa": image, question, answers
plus `__key__`/`__url__` (where a sample came from) and `__error__` (why it cannot be used, else None).
Images stay undecoded (`datasets.Image(decode=False)`: {"bytes", "path"}): decoding happens per sample
in `hf_vlm.data.pipeline`, where a corrupt file is counted and skipped instead of crashing the run.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from . import shards as shard_io
from .shards import METADATA_FILES, SHARD_SUFFIXES

# Column names tried, in order, when a source does not name its columns.
DEFAULT_IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img")
DEFAULT_TEXT_COLUMNS = ("text", "caption", "txt", "json.caption", "json.text")
DEFAULT_QUESTION_COLUMNS = ("question", "json.question")
DEFAULT_ANSWERS_COLUMNS = ("answers", "answer", "multiple_choice_answer", "json.answers", "json.answer")
DEFAULTS = {"image": DEFAULT_IMAGE_COLUMNS, "text": DEFAULT_TEXT_COLUMNS, "question": DEFAULT_QUESTION_COLUMNS,
            "answers": DEFAULT_ANSWERS_COLUMNS}

TASK_COLUMNS = {"caption": ("image", "text"), "vqa": ("image", "question", "answers")}
SAMPLE_ID_COLUMNS = ("__key__", "__url__")
ERROR_COLUMN = "__error__"
FORMATS = ("webdataset", "imagefolder", "parquet", "hub")

logger = logging.getLogger(__name__)


@dataclass
class ImageTextSource:
    """One corpus. Columns left as None are looked up among the DEFAULT_*_COLUMNS; a dotted name
    (`json.caption`) reads a field of a JSON member / struct column (webdataset .json files)."""

    path: str
    weight: float = 1.0
    format: str | None = None  # one of FORMATS; None: detected from the path
    image_column: str | None = None
    text_column: str | None = None
    question_column: str | None = None
    answers_column: str | None = None
    split: str = "train"
    config_name: str | None = None  # Hub dataset configuration

    def __post_init__(self):
        self.path = str(self.path)
        if self.format is not None and self.format not in FORMATS:
            raise ValueError(
                f"source {self.path!r}: unknown format {self.format!r}; expected one of {FORMATS}"
            )
        if not self.weight > 0:
            raise ValueError(f"source {self.path!r}: weight must be > 0, got {self.weight}")

    @classmethod
    def from_spec(cls, spec: str, **columns) -> ImageTextSource:
        """`ADDRESS` or `ADDRESS@WEIGHT` (the command-line form), e.g. `cc3m/{00000..00331}.tar@0.7`. An `@` that is
        not followed by a number belongs to the address (`hf://datasets/org/name@main/...`, `s3://a@b/...`)."""
        path, sep, weight = spec.rpartition("@")
        if not sep:
            return cls(spec, **columns)
        try:
            value = float(weight)
        except ValueError:
            return cls(spec, **columns)
        try:
            return cls(path, weight=value, **columns)
        except ValueError as err:
            raise ValueError(f"data source {spec!r}: expected ADDRESS or ADDRESS@WEIGHT ({err})") from err

    def columns(self) -> shard_io.Columns:
        return shard_io.Columns(self.image_column, self.text_column, self.question_column, self.answers_column,
                                defaults=DEFAULTS)


def _looks_like_a_path(path: str) -> bool:
    import glob

    return (
        shard_io.is_remote(path)
        or os.path.isabs(path)
        or path.startswith((".", "~"))
        or glob.has_magic(path)
        or "{" in path
        or path.lower().endswith((*SHARD_SUFFIXES, ".parquet", ".jsonl", ".csv"))
        or path.count("/") > 1  # Hub ids are "name" or "org/name"
    )


def _format_of(address: str) -> str | None:
    name = address.lower().split("?", 1)[0]
    if name.endswith(SHARD_SUFFIXES):
        return "webdataset"
    if name.endswith(".parquet"):
        return "parquet"
    if os.path.basename(name) in METADATA_FILES:
        return "imagefolder"
    return None


def _split_files(files: list[str], split: str) -> list[str]:
    """Of a folder's files, those of `split` when the folder has split sub-folders (train/, test/...)."""
    in_split = [f for f in files if f"/{split}/" in f.replace(os.sep, "/")]
    return in_split or files


def resolve_source(source: ImageTextSource) -> tuple[str, list[str] | dict]:
    """(format, files) for a source: the expanded shard/metadata/parquet list, or the load_dataset kwargs of a Hub
    dataset. A clear FileNotFoundError when nothing matches; remote shards are not opened here."""
    path = source.path
    if source.format == "hub" or (
        source.format is None and not os.path.exists(os.path.expanduser(path)) and not _looks_like_a_path(path)
    ):
        return "hub", {"path": path, "name": source.config_name}
    addresses = shard_io.expand_address(path)
    if len(addresses) == 1 and shard_io.is_directory(addresses[0]):
        folder = addresses[0]
        if source.format in (None, "imagefolder"):
            metadata = [f for name in METADATA_FILES for f in shard_io.list_directory(folder, name)]
            if metadata:
                return "imagefolder", _split_files(sorted(metadata), source.split)
        for fmt, pattern in (("webdataset", "*.tar"), ("parquet", "*.parquet")):
            files = shard_io.list_directory(folder, pattern)
            if files and source.format in (None, fmt):
                return fmt, _split_files(files, source.split)
        raise FileNotFoundError(
            f"data source {path!r}: found no webdataset .tar shards, no imagefolder "
            f"{' / '.join(METADATA_FILES)} and no .parquet files in this folder"
        )
    local = [a for a in addresses if not shard_io.is_remote(a)]
    if not addresses or (local and len(local) == len(addresses) and not any(os.path.exists(a) for a in local)):
        raise FileNotFoundError(f"data source {path!r}: no such file or folder (nothing matches it)")
    fmt = source.format or _format_of(addresses[0])
    if fmt is None and shard_io.is_pipe(addresses[0]):
        fmt = "webdataset"  # a pipe: streams a tar unless format= says otherwise
    if fmt is None:
        raise ValueError(
            f"data source {path!r}: cannot tell the format of {addresses[0]!r}; pass format= one of {FORMATS}"
        )
    return fmt, addresses


def _column_names(dataset) -> list[str]:
    if dataset.features is not None:
        return list(dataset.features)
    # A streaming dataset whose builder does not declare features: look at the first sample.
    return list(next(iter(dataset.take(1))).keys())


def _find_column(dataset, source: ImageTextSource, role: str, wanted: str | None, defaults) -> str:
    columns = _column_names(dataset)
    features = dataset.features or {}

    def present(name: str) -> bool:
        if name in columns:
            return True
        parent, _, field = name.partition(".")
        return (
            bool(field)
            and parent in columns
            and isinstance(features.get(parent), dict)
            and field in features[parent]
        )

    if wanted is not None:
        if present(wanted):
            return wanted
        raise KeyError(
            f"data source {source.path!r}: no {role} column {wanted!r}; its columns are {columns} "
            f"(set {role}_column to one of them)"
        )
    for name in defaults:
        if present(name):
            return name
    raise KeyError(
        f"data source {source.path!r}: none of the usual {role} columns {list(defaults)} is present; "
        f"its columns are {columns} (set {role}_column to one of them)"
    )


def canonical_features(task: str):
    """The `datasets.Features` every source is reduced to (see the module docstring)."""
    import datasets

    string = datasets.Value("string")
    columns = {"image": datasets.Image(decode=False)}
    if task == "caption":
        columns["text"] = string
    else:
        columns.update(question=string, answers=datasets.List(string))
    columns.update({name: string for name in (*SAMPLE_ID_COLUMNS, ERROR_COLUMN)})
    return datasets.Features(columns)


def _own_reader(fmt: str, files: list[str], source: ImageTextSource, task: str, streaming: bool, cache_dir):
    """A webdataset/imagefolder source through hf-vlm's readers, as a `datasets` (Iterable)Dataset."""
    import datasets

    reader = shard_io.iter_webdataset if fmt == "webdataset" else shard_io.iter_imagefolder
    features = canonical_features(task)
    keep = list(features)

    def generate(shards, columns, task, signature):
        for row in reader(shards, columns, task, signature):
            yield {name: row[name] for name in keep}

    # `shards` is the one list argument: datasets splits it between ranks and DataLoader workers (streaming), and
    # `signature` (sizes and mtimes of local files) makes a changed file invalidate the map-style cache.
    gen_kwargs = {"shards": list(files), "columns": source.columns(), "task": task,
                  "signature": shard_io.file_signature(files) if not streaming else ""}
    if streaming:
        return datasets.IterableDataset.from_generator(generate, features=features, gen_kwargs=gen_kwargs)
    return datasets.Dataset.from_generator(generate, features=features, gen_kwargs=gen_kwargs, cache_dir=cache_dir)


def _check_columns(source: ImageTextSource, task: str, first: tuple[str, list[str]] | None) -> None:
    """Fail before training when the first sample has no field for a role (a named column that does not exist,
    or none of the defaults): every sample would be skipped. Per-sample gaps later on are counted skips."""
    if first is None:
        return
    where, names = first
    columns = source.columns()
    for role in TASK_COLUMNS[task]:
        candidates = columns.candidates(role)
        if any(name in names for name in candidates):
            continue
        if columns.wanted[role]:
            raise KeyError(f"data source {source.path!r}: no {role} column {columns.wanted[role]!r}; the first "
                           f"sample ({where}) has {names} (set {role}_column to one of them)")
        raise KeyError(f"data source {source.path!r}: none of the usual {role} columns {list(candidates)} is "
                       f"present; the first sample ({where}) has {names} (set {role}_column to one of them)")


def load_source(
    source: ImageTextSource | str, *, task: str = "caption", streaming: bool = False, cache_dir=None
):
    """Load one source as a `datasets.Dataset` (or `IterableDataset` when streaming) with the task's canonical
    columns (TASK_COLUMNS) plus `__key__`/`__url__`/`__error__`; images left undecoded."""
    import datasets

    if isinstance(source, str):
        source = ImageTextSource.from_spec(source)
    if task not in TASK_COLUMNS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASK_COLUMNS)}")
    fmt, files = resolve_source(source)
    if fmt in ("webdataset", "imagefolder"):
        missing = [f for f in files if not shard_io.is_remote(f) and not os.path.exists(f)]
        if missing:
            logger.warning("data source %r: %d of %d shards do not exist (e.g. %s); each is counted as an "
                           "unreadable shard when reached", source.path, len(missing), len(files), missing[0])
        _check_columns(source, task, shard_io.first_sample_fields(fmt, files))
        return _own_reader(fmt, files, source, task, streaming, cache_dir)
    kwargs = files if fmt == "hub" else {"path": "parquet", "data_files": {source.split: files}}
    try:
        dataset = datasets.load_dataset(
            **kwargs, split=source.split, streaming=streaming, cache_dir=cache_dir
        )
    except Exception as err:
        where = "Hub dataset" if fmt == "hub" else f"{fmt} source"
        raise RuntimeError(f"could not load {where} {source.path!r} (split {source.split!r}): {err}") from err

    roles = {
        "image": (source.image_column, DEFAULT_IMAGE_COLUMNS),
        "text": (source.text_column, DEFAULT_TEXT_COLUMNS),
        "question": (source.question_column, DEFAULT_QUESTION_COLUMNS),
        "answers": (source.answers_column, DEFAULT_ANSWERS_COLUMNS),
    }
    found = {role: _find_column(dataset, source, role, *roles[role]) for role in TASK_COLUMNS[task]}
    if "." in found["image"]:
        raise ValueError(f"data source {source.path!r}: the image column must be a top-level column")
    undecoded = datasets.Image(decode=False)
    nested = {role: column for role, column in found.items() if "." in column}
    if nested and not streaming:
        # Struct fields become plain "parent.field" columns: an Arrow view, no copy.
        # Before the cast below, because an undecoded Image column would be flattened too.
        dataset = dataset.flatten()
    # Undecoded before any step that reads rows (a streaming map or rename would decode a corrupt image).
    dataset = dataset.cast_column(found["image"], undecoded)
    if nested and streaming:

        def pull_fields(example):
            return {
                role: example[column.split(".")[0]][column.split(".", 1)[1]]
                for role, column in nested.items()
            }

        dataset = dataset.map(pull_fields)
        found.update({role: role for role in nested})
    renames = {column: role for role, column in found.items() if column != role}
    if renames:
        dataset = dataset.rename_columns(renames)
    dataset = dataset.select_columns(list(TASK_COLUMNS[task]))
    return _with_canonical_columns(dataset, task)


def _with_canonical_columns(dataset, task: str):
    """Add the id and error columns (None) and cast to `canonical_features`, so every source mixes with every other."""
    features = canonical_features(task)

    def add(batch):
        # The same normalisation as the webdataset/imagefolder readers: a caption list gives its first caption,
        # VQAv2's [{"answer": ...}] its answer strings.
        size = len(next(iter(batch.values())))
        normalise = {"answers": shard_io.answer_list, "text": shard_io.text_value, "question": shard_io.text_value}
        batch = {name: [normalise[name](v) for v in values] if name in normalise else values
                 for name, values in batch.items()}
        return {**batch, **{name: [None] * size for name in (*SAMPLE_ID_COLUMNS, ERROR_COLUMN)}}

    return dataset.map(add, batched=True, features=features)


def load_image_text_dataset(
    sources,
    *,
    task: str = "caption",
    streaming: bool = False,
    seed: int = 0,
    stopping_strategy: str = "all_exhausted",
    cache_dir=None,
):
    """Load and mix image-text sources (ImageTextSource objects, or `PATH[@WEIGHT]` strings).

    Several sources are interleaved at random, each sample drawn from source i with probability
    weight_i / sum(weights), reproducibly for a given `seed` (datasets.interleave_datasets).
    `stopping_strategy="all_exhausted"` (default) keeps drawing until every source has been seen once
    (smaller sources repeat), so the weights hold over the whole run; "first_exhausted" stops at the
    first source that runs out.
    """
    import datasets

    if isinstance(sources, (str, ImageTextSource)):
        sources = [sources]
    sources = [ImageTextSource.from_spec(s) if isinstance(s, str) else s for s in sources]
    if not sources:
        raise ValueError("load_image_text_dataset: no data sources given")
    loaded = [load_source(s, task=task, streaming=streaming, cache_dir=cache_dir) for s in sources]
    if len(loaded) == 1:
        return loaded[0]
    total = sum(s.weight for s in sources)
    return datasets.interleave_datasets(
        loaded,
        probabilities=[s.weight / total for s in sources],
        seed=seed,
        stopping_strategy=stopping_strategy,
    )
