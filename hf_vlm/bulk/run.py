"""What `hf-vlm caption` and `hf-vlm embed` share: input shards, batches, per-shard output, resume, the summary.

A run is `run_bulk(task, SOURCE, OUT)`. The source's shards (`InputShards`) are numbered in the order its address
names them; rank r of W processes (RANK / WORLD_SIZE, as `accelerate launch` and torchrun set them) takes shards
r, r + W, r + 2W, ... and opens no other. Each shard's rows go through a `torch.utils.data.DataLoader` whose workers
decode and preprocess whole shards (`--num-workers`; batches never span two shards), the task's model turns the
batches into outputs in the main process, and when a shard ends its output files are written (temporary name, fsync,
rename) and then its record `progress/<part>.json` (the files and their sizes, the rows, every skipped sample). A
shard with a valid record is done: a restarted run, with any number of processes, skips it, so a killed run ends with
exactly one output row per usable input sample. `run.json` holds the run's settings and shard list; a restart with
other settings is refused instead of mixing two runs in one folder. The process that finds every record present when
it finishes writes `summary.json` (rows, skips per reason, every skipped sample); no process waits for another.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

from hf_vlm.data import process_rank_and_world_size
from hf_vlm.data import shards as shard_io
from hf_vlm.data.images import load_rgb_image
from hf_vlm.data.pipeline import sample_id
from hf_vlm.data.skips import SKIP_REASONS, SkippedSample
from hf_vlm.data.sources import DEFAULT_IMAGE_COLUMNS, ImageTextSource, resolve_source
from hf_vlm.evaluation.runner import CAPTION_COLUMNS

RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"
PROGRESS_DIR = "progress"
DEFAULT_SPLIT = "train"  # a folder's split sub-folder / a Hub dataset's split, as training reads them
MAX_SKIP_WARNINGS = 10  # per process: the first skipped samples are logged with shard and key, later ones counted

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ input


class InputShards:
    """The shards of one source, in order. Webdataset tars and imagefolder metadata files are read by training's
    readers in their RAW mode (every field; a bad member, line or shard as an `__error__` row); parquet files and Hub
    datasets are streamed by `datasets` as `hf-vlm eval` streams them, one shard per data file (`IterableDataset.
    shard`), images left undecoded."""

    def __init__(self, spec: str, split: str | None = None):
        source = ImageTextSource.from_spec(spec)
        if source.path != spec:
            raise ValueError(f"{spec}: bulk inference reads one source; drop the @WEIGHT")
        source.split = split or DEFAULT_SPLIT
        self.spec, self.split = spec, source.split
        self.format, files = resolve_source(source)
        self.dataset = None
        if self.format in ("webdataset", "imagefolder"):
            self.names = list(files)
            return
        import datasets

        from hf_vlm.evaluation.runner import _with_undecoded_image  # eval's image column rule, one place

        kwargs = files if self.format == "hub" else {"path": "parquet", "data_files": {source.split: files}}
        try:
            dataset = datasets.load_dataset(**kwargs, split=source.split, streaming=True)
        except Exception as err:
            raise RuntimeError(f"{spec}: could not load the {self.format} source (split {source.split!r}): {err}") from err
        self.dataset, _ = _with_undecoded_image(spec, dataset)
        count = self.dataset.num_shards
        same = self.format == "parquet" and count == len(files)
        self.names = list(files) if same else [f"{spec} [{source.split}] shard {i} of {count}" for i in range(count)]

    def __len__(self) -> int:
        return len(self.names)

    def rows(self, index: int) -> Iterator[dict]:
        """The rows of shard `index`, in order."""
        if self.format == "webdataset":
            return shard_io.iter_webdataset([self.names[index]], None, shard_io.RAW)
        if self.format == "imagefolder":
            return shard_io.iter_imagefolder([self.names[index]], None, shard_io.RAW)
        return iter(self.dataset.shard(num_shards=len(self.names), index=index, contiguous=True))


def read_sample(row: dict, shard: str, index: int, *, image: bool, text: bool) -> tuple[dict, object]:
    """(metadata, decoded RGB image or None) of one row; raises SkippedSample when the row cannot be used: an error
    row of the readers, an image the decoder refuses (only when `image`), no caption (only when `text`)."""
    if row.get("__error__"):
        reason, _, detail = row["__error__"].partition("\t")
        raise SkippedSample(reason, detail)
    if isinstance(row.get("json"), dict):  # a webdataset sample's .json fields are columns too (as in hf-vlm eval)
        row = {**row.pop("json"), **row}
    value = next((row[c] for c in DEFAULT_IMAGE_COLUMNS if row.get(c) is not None), None)
    caption = next((shard_io.text_value(row[c]) for c in CAPTION_COLUMNS if row.get(c) is not None), None)
    caption = caption.strip() if isinstance(caption, str) and caption.strip() else None
    url = row.get("url")
    meta = {"key": row.get("__key__") if row.get("__key__") is not None else str(index), "shard": shard,
            "index": index, "image_path": value.get("path") if isinstance(value, dict) else None,
            "url": url if isinstance(url, str) else None, "caption": caption}
    if text and caption is None:
        raise SkippedSample("empty_caption", "no caption to embed")
    return meta, (load_rgb_image(value) if image else None)


def _torch_dataset(*args, **kwargs):
    import torch

    class ShardBatches(torch.utils.data.IterableDataset):
        """Batches of whole input shards, each followed by an end item with the shard's row count and skips.
        DataLoader worker w of N takes the w-th, (w+N)-th... of the shards given, so one worker reads a shard."""

        def __init__(self, shards: InputShards, units: list[int], prepare, batch_size: int, image: bool, text: bool):
            self.shards, self.units, self.prepare = shards, units, prepare
            self.batch_size, self.image, self.text = batch_size, image, text
            self.checked = False

        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            units = self.units if info is None else self.units[info.id::info.num_workers]
            warned = 0
            for unit in units:
                for item in self._shard(unit):
                    for skip in item.get("skipped", [])[:max(0, MAX_SKIP_WARNINGS - warned)]:
                        warned += 1
                        logger.warning("skipped sample %s (%s): %s", skip["sample"], skip["reason"], skip["detail"])
                    yield item

        def _shard(self, unit: int):
            name = self.shards.names[unit]
            samples, images, skipped, number, count = [], [], [], 0, 0
            rows = self.shards.rows(unit)
            try:
                for index, row in enumerate(rows):
                    count = index + 1
                    if self.image and not self.checked and not row.get("__error__"):
                        self._check_image_column(row, name)
                    try:
                        meta, image = read_sample(row, name, index, image=self.image, text=self.text)
                    except SkippedSample as skip:
                        skipped.append({"shard": name, "key": row.get("__key__"), "index": index,
                                        "sample": sample_id(row), "reason": skip.reason, "detail": skip.detail})
                        continue
                    samples.append(meta)
                    images.append(image)
                    if len(samples) == self.batch_size:
                        yield self._batch(unit, number, samples, images)
                        samples, images, number = [], [], number + 1
            finally:
                if hasattr(rows, "close"):  # our readers' generators: close the shard (a pipe: command too)
                    rows.close()
            if samples:
                yield self._batch(unit, number, samples, images)
            yield {"unit": unit, "end": True, "rows_read": count, "skipped": skipped}

        def _check_image_column(self, row: dict, shard: str) -> None:
            """Fail at the first readable sample that has no image field at all (a wrong source: every sample would
            be skipped), as training and hf-vlm eval check before they start; later gaps are counted skips."""
            fields = [*row, *(row["json"] if isinstance(row.get("json"), dict) else ())]
            if not any(c in fields for c in DEFAULT_IMAGE_COLUMNS):
                raise ValueError(f"{shard}: no image column (looked for {', '.join(DEFAULT_IMAGE_COLUMNS)}); the "
                                 f"sample {sample_id(row)} has {', '.join(f for f in fields if not f.startswith('__'))}")
            self.checked = True

        def _batch(self, unit, number, samples, images):
            inputs = self.prepare(images if self.image else None, [s["caption"] for s in samples])
            return {"unit": unit, "batch": number, "samples": samples, "inputs": inputs}

    return ShardBatches(*args, **kwargs)


# ------------------------------------------------------------------------------------------------ output


def write_atomically(path: Path, write, *, shared: bool = False) -> int:
    """`write(file)` into a hidden temporary file next to `path`, fsync, rename; returns the size. The temporary name
    never matches `*.npy` / `*.parquet`. A shard's files are written by one process at a time, under the same
    temporary name on every attempt (a killed attempt's is overwritten, then renamed away); files every rank may write
    (`shared`: run.json, summary.json) get the process id in it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp" + (f"-{os.getpid()}" if shared else ""))
    with open(tmp, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path.stat().st_size


def _write_json(path: Path, value, shared: bool = False) -> None:
    write_atomically(path, lambda f: f.write((json.dumps(value, indent=2, sort_keys=True) + "\n").encode()),
                     shared=shared)


class Output:
    """The output folder: part names, done records, the run's settings, the summary."""

    def __init__(self, folder, num_shards: int):
        self.folder = Path(folder)
        self.num_shards = num_shards
        self.width = max(5, int(math.log10(max(num_shards - 1, 1))) + 1)

    def part(self, unit: int) -> str:
        return f"{unit:0{self.width}d}"

    def write(self, name: str, write) -> int:
        """Write the file `name` (relative to the folder) atomically; returns its size."""
        return write_atomically(self.folder / name, write)

    def record_path(self, unit: int) -> Path:
        return self.folder / PROGRESS_DIR / f"{self.part(unit)}.json"

    def record(self, unit: int) -> dict | None:
        """The done record of a shard whose files are all there with their recorded sizes; else None."""
        try:
            record = json.loads(self.record_path(unit).read_text())
        except (OSError, ValueError):
            return None
        for name, size in record.get("files", {}).items():
            path = self.folder / name
            if not path.is_file() or path.stat().st_size != size:
                logger.warning("%s: %s is missing or changed; shard %d is done again", self.folder, name, unit)
                return None
        return record

    def finish(self, unit: int, record: dict) -> None:
        _write_json(self.record_path(unit), record)

    def check_settings(self, settings: dict) -> None:
        """Write run.json, or check that the folder's run.json has these settings (a restart of the same run)."""
        path = self.folder / RUN_FILE
        if not path.is_file():
            # The ranks of one launch start together: another rank's run.json may be mid-write (its hidden temporary
            # file is here) or renamed into place since the look above; neither is a stranger's folder.
            others = [p.name for p in self.folder.iterdir()] if self.folder.is_dir() else []
            strangers = [name for name in others if not name.startswith(f".{RUN_FILE}.tmp-")]
            if not path.is_file():  # still none: this rank writes it (every rank writes the same settings)
                if strangers:
                    raise ValueError(f"{self.folder} is not empty and holds no {RUN_FILE}: not the output of an "
                                     f"hf-vlm {settings.get('command')} run; choose another --output")
                _write_json(path, settings, shared=True)
                return
        previous = json.loads(path.read_text())
        differ = sorted(k for k in {*previous, *settings} if previous.get(k) != settings.get(k))
        if differ:
            raise ValueError(f"{self.folder} holds a run with other settings ({', '.join(differ)}: "
                             f"{[previous.get(k) for k in differ]} there, {[settings.get(k) for k in differ]} now); "
                             "restart it with the same command, or choose another --output")

    def write_summary_if_complete(self, settings: dict) -> dict | None:
        """summary.json from every shard's record, when all are done (else None: another process will)."""
        records = [self.record(unit) for unit in range(self.num_shards)]
        if any(r is None for r in records):
            return None
        skipped = {reason: 0 for reason in SKIP_REASONS}
        for record in records:
            for skip in record["skipped"]:
                skipped[skip["reason"]] = skipped.get(skip["reason"], 0) + 1
        summary = {
            "command": settings["command"], "source": settings["source"], "model": settings["model"],
            "shards": self.num_shards, "rows": sum(r["rows"] for r in records), "skipped": skipped,
            "skipped_total": sum(skipped.values()),
            "skipped_samples": [skip for record in records for skip in record["skipped"]],
            "outputs": [name for record in records for name in record["files"]],
        }
        _write_json(self.folder / SUMMARY_FILE, summary, shared=True)
        return summary


# ------------------------------------------------------------------------------------------------ the run


def _progress_bar(task_name: str, rank: int, world: int, units: int):
    from tqdm.auto import tqdm

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return tqdm(desc=f"{task_name} (rank {rank}/{world}, {units} shards)" if world > 1 else task_name,
                unit="img", dynamic_ncols=True, disable=local_rank != 0, smoothing=0.1)


def run_bulk(task, source: str, output, *, split: str | None = None, batch_size: int = 16, num_workers: int = 0,
             seed: int = 0) -> dict:
    """Run `task` (`hf_vlm.bulk.tasks.CaptionTask` / `EmbedTask`) over `source` into `output` (see the module
    docstring). Returns this process's totals, plus the summary when this process wrote it."""
    import torch

    rank, world = process_rank_and_world_size()
    shards = InputShards(source, split)
    out = Output(output, len(shards))
    settings = {"command": task.name, "source": source, "split": shards.split, "shards": shards.names,
                "batch_size": batch_size, "seed": seed, **task.settings()}
    out.check_settings(settings)
    mine = list(range(rank, len(shards), world))
    todo = [unit for unit in mine if out.record(unit) is None]
    logger.info("%s: rank %d of %d has %d of %d shards, %d already done", source, rank, world, len(mine),
                len(shards), len(mine) - len(todo))
    if num_workers:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    dataset = _torch_dataset(shards, todo, task.prepare, batch_size, task.needs_image, task.needs_text)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=min(num_workers, len(todo)),
                                         pin_memory=str(task.device).startswith("cuda"))
    pending: dict[int, list] = {}
    started, images, skipped, finished = time.perf_counter(), 0, 0, 0
    bar = _progress_bar(task.name, rank, world, len(todo))
    with bar:
        for item in loader:
            unit = item["unit"]
            if "end" in item:
                batches = pending.pop(unit, [])
                samples = [s for batch_samples, _ in batches for s in batch_samples]
                files = task.write(out, unit, samples, [o for _, o in batches]) if samples else {}
                out.finish(unit, {"input": shards.names[unit], "rows": len(samples), "rows_read": item["rows_read"],
                                  "rank": rank, "files": files, "skipped": item["skipped"]})
                finished += 1
                skipped += len(item["skipped"])
                bar.total = round(bar.n / finished * len(todo)) if bar.n else None  # the ETA: mean images per shard
                bar.set_postfix(shards=f"{finished}/{len(todo)}", skipped=skipped, refresh=True)
                continue
            torch.manual_seed(seed + 1_000_003 * unit + item["batch"])  # sampled generation: the same on a rerun
            pending.setdefault(unit, []).append((item["samples"], task.compute(item["inputs"])))
            images += len(item["samples"])
            bar.update(len(item["samples"]))
    seconds = time.perf_counter() - started
    totals = {"rank": rank, "world_size": world, "shards": len(todo), "shards_skipped_as_done": len(mine) - len(todo),
              "rows": images, "skipped": skipped, "seconds": seconds,
              "images_per_second": images / seconds if seconds > 0 else 0.0}
    summary = out.write_summary_if_complete(settings)
    if summary is not None:
        totals["summary"] = summary
        logger.info("%s: all %d shards done: %d rows, %d skipped samples (%s)", out.folder, len(shards),
                    summary["rows"], summary["skipped_total"], out.folder / SUMMARY_FILE)
    return totals
