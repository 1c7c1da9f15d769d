"""Image-text sources -> one `datasets` dataset with canonical columns, several sources mixed by weight.

A source is a path or a Hub dataset name:
  - webdataset tar shards (a .tar file, a glob such as `shards/*.tar`, or a folder of .tar files):
    one sample = files sharing a key (`0001.jpg` + `0001.txt` and/or `0001.json`);
  - an imagefolder: a folder with images and `metadata.jsonl` / `metadata.csv` (`file_name` column);
  - parquet files (a file, a glob, or a folder of .parquet);
  - a Hub dataset name (`org/name`), loaded by `datasets.load_dataset` (from the local cache when offline).
Each is loaded with `datasets.load_dataset` (`streaming=True` for corpora that do not fit on disk)
and reduced to the canonical columns, so sources of any layout can be mixed:
  task "caption": image, text          task "vqa": image, question, answers
plus `__key__`/`__url__` (webdataset) where every mixed source has them, to name bad samples.
Images stay undecoded (`datasets.Image(decode=False)`: {"bytes", "path"}): decoding happens per sample
in `hf_vlm.data.pipeline`, where a corrupt file is counted and skipped instead of crashing the run.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

# Column names tried, in order, when a source does not name its columns.
DEFAULT_IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img")
DEFAULT_TEXT_COLUMNS = ("text", "caption", "txt", "json.caption", "json.text")
DEFAULT_QUESTION_COLUMNS = ("question", "json.question")
DEFAULT_ANSWERS_COLUMNS = ("answers", "answer", "multiple_choice_answer", "json.answers", "json.answer")

TASK_COLUMNS = {"caption": ("image", "text"), "vqa": ("image", "question", "answers")}
SAMPLE_ID_COLUMNS = ("__key__", "__url__")
FORMATS = ("webdataset", "imagefolder", "parquet", "hub")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")


@dataclass
class ImageTextSource:
    """One corpus. Columns left as None are looked up among the DEFAULT_*_COLUMNS; a dotted name
    (`json.caption`) reads a field of a struct column (webdataset .json files)."""

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
        """`PATH_OR_NAME` or `PATH_OR_NAME@WEIGHT` (the command-line form), e.g. `shards/cc3m/*.tar@0.7`."""
        path, sep, weight = spec.rpartition("@")
        if not sep:
            return cls(spec, **columns)
        try:
            return cls(path, weight=float(weight), **columns)
        except ValueError as err:
            raise ValueError(f"data source {spec!r}: expected PATH or PATH@WEIGHT ({err})") from err


def _files_matching(pattern: str) -> list[str]:
    return sorted(glob.glob(os.path.expanduser(pattern), recursive=True))


def _looks_like_local_path(path: str) -> bool:
    return (
        os.path.isabs(path)
        or path.startswith((".", "~"))
        or glob.has_magic(path)
        or Path(path).suffix.lower() in (".tar", ".parquet", ".jsonl", ".csv")
        or path.count("/") > 1  # Hub ids are "name" or "org/name"
    )


def resolve_source(source: ImageTextSource) -> tuple[str, dict]:
    """(format, load_dataset kwargs) for a source; a clear FileNotFoundError naming a missing path."""
    path = os.path.expanduser(source.path)
    if source.format == "hub" or (
        source.format is None and not os.path.exists(path) and not _looks_like_local_path(source.path)
    ):
        return "hub", {"path": source.path, "name": source.config_name}
    if os.path.isdir(path):
        if source.format in (None, "imagefolder") and any(
            _files_matching(os.path.join(path, "**", name)) for name in METADATA_FILES
        ):
            return "imagefolder", {"path": "imagefolder", "data_dir": path}
        candidates = {
            "webdataset": _files_matching(os.path.join(path, "**", "*.tar")),
            "parquet": _files_matching(os.path.join(path, "**", "*.parquet")),
        }
        for fmt, files in candidates.items():
            if files and source.format in (None, fmt):
                return fmt, {"path": fmt, "data_files": {source.split: files}}
        raise FileNotFoundError(
            f"data source {source.path!r}: found no webdataset .tar shards, no imagefolder "
            f"{' / '.join(METADATA_FILES)} and no .parquet files in this folder"
        )
    files = _files_matching(path)
    if not files:
        raise FileNotFoundError(f"data source {source.path!r}: no such file or folder (nothing matches it)")
    if Path(files[0]).name in METADATA_FILES:
        return "imagefolder", {"path": "imagefolder", "data_dir": os.path.dirname(files[0])}
    suffix = Path(files[0]).suffix.lower()
    fmt = source.format or {".tar": "webdataset", ".parquet": "parquet"}.get(suffix)
    if fmt is None:
        raise ValueError(
            f"data source {source.path!r}: cannot tell the format of {files[0]!r}; "
            f"pass format= one of {FORMATS}"
        )
    return fmt, {"path": fmt, "data_files": {source.split: files}}


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


def load_source(
    source: ImageTextSource | str, *, task: str = "caption", streaming: bool = False, cache_dir=None
):
    """Load one source as a `datasets.Dataset` (or `IterableDataset` when streaming) with the task's
    canonical columns (TASK_COLUMNS) plus webdataset's `__key__`/`__url__`; images left undecoded."""
    import datasets

    if isinstance(source, str):
        source = ImageTextSource(source)
    if task not in TASK_COLUMNS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASK_COLUMNS)}")
    fmt, kwargs = resolve_source(source)
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
        # Struct fields (webdataset .json) become plain "parent.field" columns: an Arrow view, no copy.
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
    keep = list(TASK_COLUMNS[task]) + [c for c in SAMPLE_ID_COLUMNS if c in _column_names(dataset)]
    return dataset.select_columns(keep)


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
    shared = [c for c in _column_names(loaded[0]) if all(c in _column_names(d) for d in loaded[1:])]
    loaded = [d.select_columns(shared) for d in loaded]
    total = sum(s.weight for s in sources)
    return datasets.interleave_datasets(
        loaded,
        probabilities=[s.weight / total for s in sources],
        seed=seed,
        stopping_strategy=stopping_strategy,
    )
