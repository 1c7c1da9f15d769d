"""Training data loader alone: hf-vlm's pipeline vs the `datasets` loop a user writes, same shards, same augmentation.

No model runs: this measures how many training samples per second (and per CPU core) the data path delivers.

Data: generated webdataset shards (`KEY.jpg` + `KEY.txt`) of JPEGs with a short side of 256 px (img2dataset's
default size for LAION-style shards), aspect 1, 4:3 or 3:4, smooth colour fields plus noise, quality 90 (about
28 KB each, as web JPEGs of that size); captions of 8-16 words.

Cases: each training image transform (the recipes' augmentations: "coca" for recipe coca, "blip2" for the four
BLIP-2 recipes, measured through blip2-stage2) at 224 px x map-style / streaming x 0, 1, 2 DataLoader workers.
- ours: `hf_vlm.data.build_training_data(recipe, ["<folder>/*.tar"], processor)` as trainers/training.py calls
  it: our shard reader, the shared decoder, counted skips, per-sample seeded augmentation, the recipe's collator,
  through torchdata's StatefulDataLoader, which the trainers switch on so that a run resumes its data position
  (`hf_vlm.data.resume.enable_stateful_dataloader`); map-style shuffled, as the Trainer's sampler does.
- upstream: the loop a user writes: `datasets.load_dataset("webdataset", data_files=...)` (map-style:
  `.with_transform`, streaming: `.map`), PIL's `convert("RGB")`, the same torchvision v2 augmentation written out
  from `AUGMENTATIONS`, a plain torch DataLoader. Both sides collate with the recipe's collator (same tokenizer),
  so the ratio compares the image path. The `same_pixels` check proves both transforms give the same tensor for
  the same image and seed.

Each run builds a DataLoader, skips `--warmup-batches` (worker start-up, first shard reads), then times
`--timed-batches`. Two rates per run: samples/s of wall-clock time, and samples per CPU-second ("per core"):
user + system CPU time of this process and its DataLoader workers over the same window (psutil). The second
is what one core delivers and barely moves when other work shares the machine; `workers_per_gpu` turns it into
the loader workers a GPU needs (the results README shows the arithmetic, see `workers_section`).

    python -m benchmarks.bench_loader [--repeats 2] [--workers 0 1 2] [--quick]
"""

from __future__ import annotations

import argparse
import io
import math
import os
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import harness

RECIPES = ("coca", "blip2-stage2")  # one per training augmentation (hf_vlm.data.DATA_RECIPES)
MODES = ("map", "streaming")
IMAGE_SIZE = 224  # both recipes train at 224 px
SOURCE_SHORT_SIDE = 256

# The seeds' CoCa-Large-v2 run (issue 14): the recipe's 64 A100s, for 4 weeks, over 4 billion image-text pairs.
# What the loader must feed is the rate the FLOPs table implies at a stated MFU (benchmarks/flops.py counts the
# training FLOPs per sample). 40% is a well-tuned BF16 run, the high end for sizing the loader: open_clip's ViT-L/14
# CLIP runs (~70-100 samples/s per A100 at ~525 GFLOP per training sample) are at 12-17%.
SEED_RUN = {"recipe": "coca-large-v2", "flops_case": "coca-large-v2", "loader_recipe": "coca", "gpu": "A100",
            "assumed_mfu": 0.4, "weeks": 4, "pairs": 4e9}

WORDS = ("a photo of the red blue green yellow small large old new dog cat car bus tree house street beach "
         "mountain river city people man woman child sitting standing on in near with at under next to view "
         "night day sunset white black wooden table kitchen field sky clouds snow water boat bridge").split()


# --------------------------------------------------------------------------------------------------- data


def natural_jpeg(rng, short_side: int) -> bytes:
    """A JPEG that decodes like a photo of that size: a smooth random colour field plus sensor-like noise
    (flat synthetic images decode faster than photos, pure noise slower)."""
    import numpy as np
    from PIL import Image

    aspect = rng.choice([1.0, 4 / 3, 3 / 4])
    width, height = (round(short_side * aspect), short_side) if aspect >= 1 else (short_side, round(short_side / aspect))
    coarse = Image.fromarray(rng.uniform(0, 255, (6, 6, 3)).astype("uint8"))
    field = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.float32)
    pixels = np.clip(field + rng.normal(0, 10, field.shape), 0, 255).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def caption(rng) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(8, 17))))


def write_shards(folder: Path, num_samples: int, num_shards: int, short_side: int, seed: int = 0) -> dict:
    """`num_samples` JPEG + caption pairs in `num_shards` webdataset tars `folder/shard-NNNNNN.tar`."""
    import numpy as np

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    files, captions, jpeg_bytes = [], [], 0
    per_shard = math.ceil(num_samples / num_shards)
    for shard in range(num_shards):
        path = folder / f"shard-{shard:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for index in range(shard * per_shard, min(num_samples, (shard + 1) * per_shard)):
                image, text = natural_jpeg(rng, short_side), caption(rng)
                captions.append(text)
                jpeg_bytes += len(image)
                for name, data in ((f"{index:09d}.jpg", image), (f"{index:09d}.txt", text.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        files.append(str(path))
    return {"files": files, "captions": captions, "mean_jpeg_bytes": jpeg_bytes / num_samples}


def build_processor(recipe: str, captions: list[str], image_size: int):
    """The model family's processor at `image_size` with a small tokenizer trained on the captions (the real
    ones cannot be downloaded; a fast tokenizer's cost hardly depends on its vocabulary)."""
    from hf_vlm.tokenization import train_coca_tokenizer, train_t5_tokenizer

    if recipe.startswith("coca"):
        from hf_vlm.modeling.coca import CocaProcessor

        return CocaProcessor.from_tokenizer(train_coca_tokenizer(captions, 1000, model_type="bpe"), image_size=image_size)
    from hf_vlm.modeling.blip2_flant5 import Blip2FlanT5Processor

    return Blip2FlanT5Processor.from_tokenizers(train_t5_tokenizer(captions, 1000, model_type="bpe"),
                                                image_size=image_size)


# ------------------------------------------------------------------------------------- the user's loop


def user_transform(augmentation: str, image_size: int, mean, std):
    """The training augmentation as a user writes it with torchvision (the values of AUGMENTATIONS[augmentation])."""
    from torchvision.transforms import InterpolationMode, v2

    from hf_vlm.data import AUGMENTATIONS

    spec = AUGMENTATIONS[augmentation]
    steps = [v2.RandomResizedCrop(image_size, scale=spec["crop_scale"], interpolation=InterpolationMode.BICUBIC,
                                  antialias=True)]
    if spec["horizontal_flip"]:
        steps.append(v2.RandomHorizontalFlip())
    if spec["color_jitter"]:
        steps.append(v2.ColorJitter(*spec["color_jitter"]))
    steps += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


class _UserBatchTransform:
    """`with_transform` function: datasets hands it a batch (dict of lists) of decoded PIL images."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, batch: dict) -> dict:
        return {"pixel_values": [self.transform(image.convert("RGB")) for image in batch["jpg"]],
                "text": batch["txt"]}


class _UserSampleTransform(_UserBatchTransform):
    """Streaming `.map` function: one example at a time."""

    def __call__(self, example: dict) -> dict:
        return {"pixel_values": self.transform(example["jpg"].convert("RGB")), "text": example["txt"]}


def user_dataset(files: list[str], mode: str, transform, cache_dir: str):
    import datasets

    if mode == "map":
        dataset = datasets.load_dataset("webdataset", data_files={"train": files}, split="train", cache_dir=cache_dir)
        return dataset.with_transform(_UserBatchTransform(transform))
    dataset = datasets.load_dataset("webdataset", data_files={"train": files}, split="train", streaming=True)
    return dataset.map(_UserSampleTransform(transform), remove_columns=["jpg", "txt", "__key__", "__url__"])


# ------------------------------------------------------------------------------------------- measuring


def make_loader(dataset, *, mode: str, stateful: bool, batch: int, workers: int, collate_fn, seed: int):
    """A DataLoader, shuffled for map-style data (the Trainer's sampler shuffles); torchdata's StatefulDataLoader
    when `stateful` (what the trainers use), else torch's."""
    kwargs = {"batch_size": batch, "num_workers": workers, "collate_fn": collate_fn}
    if mode == "map":
        kwargs.update(shuffle=True, generator=torch.Generator().manual_seed(seed))
    if stateful:
        import warnings

        from torchdata.stateful_dataloader import StatefulDataLoader

        with warnings.catch_warnings():  # torchdata 0.11 calls torch's deprecated set_vital on every iter()
            warnings.simplefilter("ignore", UserWarning)
            return StatefulDataLoader(dataset, **kwargs)
    return torch.utils.data.DataLoader(dataset, **kwargs)


def _cpu_seconds(processes) -> float:
    import psutil

    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:  # not within a window: workers live as long as their iterator
            pass
    return total


def timed_run(loader, warmup_batches: int, timed_batches: int) -> dict:
    """Wall-clock and CPU seconds (this process + its DataLoader workers) of `timed_batches` batches after
    `warmup_batches` untimed ones; the batches' sample count and keys."""
    import psutil

    iterator = iter(loader)
    try:
        for _ in range(warmup_batches):
            next(iterator)
        main = psutil.Process()
        processes = [main, *main.children(recursive=True)]
        cpu_start, start = _cpu_seconds(processes), time.perf_counter()
        samples = 0
        for _ in range(timed_batches):
            batch = next(iterator)
            samples += len(batch["pixel_values"])
        seconds, cpu = time.perf_counter() - start, _cpu_seconds(processes) - cpu_start
        # The kernel counts CPU time in clock ticks: a window shorter than one tick (only --quick's) reads as one.
        cpu = max(cpu, 1 / os.sysconf("SC_CLK_TCK"))
    finally:
        del iterator  # shuts the workers down
    return {"seconds": seconds, "cpu_seconds": cpu, "samples": samples, "processes": len(processes),
            "batch_keys": sorted(batch)}


def same_pixels(files: list[str], processor, recipe: str, transform, seed: int) -> bool:
    """Our training transform after our decoder (what the pipeline runs per sample) and the user's torchvision
    transform after PIL's convert("RGB") give the same tensor for the first image of the shards, from one seed."""
    from PIL import Image

    from hf_vlm.data import data_recipe, image_transform_from_processor, load_rgb_image

    with tarfile.open(files[0]) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        data = tar.extractfile(member).read()
    ours_transform = image_transform_from_processor(processor, data_recipe(recipe).augmentation, train=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ours = ours_transform(load_rgb_image(data))
        torch.manual_seed(seed)
        user = transform(Image.open(io.BytesIO(data)).convert("RGB"))
    return ours.shape == user.shape and bool(torch.equal(ours, user))


def bench_recipe(args, recipe: str, shards: dict, cache_dir: str) -> list[harness.Record]:
    from hf_vlm.data import ImageTextCollator, build_training_data, data_recipe

    spec = data_recipe(recipe)
    processor = build_processor(recipe, shards["captions"], args.image_size)
    image_processor = processor.image_processor
    transform = user_transform(spec.augmentation, args.image_size, image_processor.image_mean, image_processor.image_std)
    collator = ImageTextCollator.for_recipe(spec, processor)
    pixels_match = same_pixels(shards["files"], processor, recipe, transform, seed=1234)
    source = f"{Path(shards['files'][0]).parent}/*.tar"  # the --train_data form
    records = []
    for mode in args.modes:
        ours_data = build_training_data(recipe, [source], processor, streaming=mode == "streaming", seed=args.seed,
                                        cache_dir=cache_dir)
        user_data = user_dataset(shards["files"], mode, transform, cache_dir)
        for workers in args.workers:
            case = f"{recipe}_{mode}_w{workers}{args.case_suffix}"
            common = {"mode": mode, "batch": args.batch, "workers": workers, "seed": args.seed}
            sides = {"ours": (ours_data.dataset, ours_data.collator, True),
                     "upstream": (user_data, collator, False)}
            runs = {"ours": [], "upstream": []}
            for _ in range(max(1, args.repeats)):  # interleaved: ours, user, ours, user...
                for side, (dataset, collate_fn, stateful) in sides.items():
                    loader = make_loader(dataset, stateful=stateful, collate_fn=collate_fn, **common)
                    runs[side].append(timed_run(loader, args.warmup_batches, args.timed_batches))
            records.append(_record(args, case, recipe, mode, workers, runs, shards, pixels_match))
            harness.save(records[-1], args.out)  # now: a run stopped later keeps what it measured
            print(records[-1].case, {k: round(v["ours"], 1) for k, v in records[-1].metrics.items()},
                  "ratio", {k: round(v["ratio"], 2) for k, v in records[-1].metrics.items()}, file=sys.stderr)
    return records


def _record(args, case: str, recipe: str, mode: str, workers: int, runs: dict, shards: dict, pixels_match: bool) -> harness.Record:
    from hf_vlm.data import data_recipe

    samples = runs["ours"][0]["samples"]
    wall = {side: statistics.median(r["seconds"] for r in side_runs) for side, side_runs in runs.items()}
    cpu = {side: statistics.median(r["cpu_seconds"] for r in side_runs) for side, side_runs in runs.items()}
    metrics = {}
    for name, seconds in (("samples/s", wall), ("samples/s per core", cpu)):
        ours, upstream = samples / seconds["ours"], samples / seconds["upstream"]
        metrics[name] = {"ours": ours, "upstream": upstream, "ratio": ours / upstream}
    return harness.Record(
        benchmark="loader", case=case,
        params={"recipe": recipe, "augmentation": data_recipe(recipe).augmentation, "mode": mode, "workers": workers,
                "image_size": args.image_size, "source_short_side": args.source_short_side,
                "mean_jpeg_bytes": round(shards["mean_jpeg_bytes"]), "shards": len(shards["files"]),
                "batch": args.batch, "warmup_batches": args.warmup_batches, "timed_samples": samples,
                "loader": {"ours": "StatefulDataLoader", "upstream": "DataLoader"},
                "batch_keys": runs["ours"][0]["batch_keys"], "seed_run": SEED_RUN},
        metrics=metrics,
        seconds={"ours": [r["seconds"] for r in runs["ours"]], "upstream": [r["seconds"] for r in runs["upstream"]],
                 "ours_median": wall["ours"], "upstream_median": wall["upstream"],
                 "ours_cpu": [r["cpu_seconds"] for r in runs["ours"]],
                 "upstream_cpu": [r["cpu_seconds"] for r in runs["upstream"]]},
        checks={"same_pixels": pixels_match,
                "cores_used": f"{cpu['ours'] / wall['ours']:.2f} / {cpu['upstream'] / wall['upstream']:.2f}"},
        notes="per core = samples per CPU-second of this process + its DataLoader workers (psutil) over the timed "
              "window; cores_used = CPU seconds / wall seconds (ours / upstream). Upstream: datasets' webdataset "
              "builder + the same torchvision augmentation + the recipe's collator, plain DataLoader.",
    )


# ------------------------------------------------------------------------------- workers per GPU


def workers_per_gpu(records: list[dict]) -> list[dict]:
    """Loader workers per GPU the seeds' CoCa-Large-v2 run needs, from a folder's records: the FLOPs record's
    samples/s at 100% MFU on the run's GPU x the assumed MFU, divided by the measured samples/s per core of our
    streaming CoCa loader (what training runs; the case with the most workers), rounded up. One row per source
    image size measured, smallest first; none when the folder lacks the FLOPs record or those loader records."""
    streams: dict[int, dict] = {}
    for r in records:
        p = r["params"]
        if r["benchmark"] == "loader" and p.get("mode") == "streaming" and p.get("recipe") == SEED_RUN["loader_recipe"]:
            side = p["source_short_side"]
            if side not in streams or p["workers"] > streams[side]["params"]["workers"]:
                streams[side] = r
    rows = []
    for side, loader in sorted(streams.items()):
        seed = loader["params"].get("seed_run", SEED_RUN)
        flops = next((r for r in records if r["benchmark"] == "flops" and r["case"] == seed["flops_case"]), None)
        peak_metric = f"samples/s at 100% MFU, {seed['gpu']}"
        if flops is None or peak_metric not in flops["metrics"]:
            continue
        from hf_vlm.trainers.recipes import get_recipe

        recipe = get_recipe(seed["recipe"])
        gpus = recipe.nodes * recipe.gpus_per_node
        per_core = loader["metrics"]["samples/s per core"]["ours"]
        at_peak = flops["metrics"][peak_metric]["ours"]
        needed = at_peak * seed["assumed_mfu"]
        floor = seed["pairs"] / (gpus * seed["weeks"] * 7 * 24 * 3600)
        rows.append({
            "recipe": seed["recipe"], "gpu": seed["gpu"], "gpus": gpus, "assumed_mfu": seed["assumed_mfu"],
            "train_gflop_per_sample": flops["metrics"].get("GFLOP/sample train step", {}).get("ours"),
            "samples_per_s_at_peak": at_peak, "samples_per_s_needed": needed,
            "source_short_side": side, "per_core": per_core, "per_core_case": loader["case"],
            "workers": math.ceil(needed / per_core),
            "pairs": seed["pairs"], "weeks": seed["weeks"], "floor_samples_per_s": floor,
            "floor_workers": math.ceil(floor / per_core),
            "recipe_workers": recipe.training.get("dataloader_num_workers"),
        })
    return rows


def workers_section(records: list[dict]) -> str:
    """The results README's answer to "how many loader workers per GPU?", with the arithmetic (empty without the
    records it needs)."""
    rows = workers_per_gpu(records)
    if not rows:
        return ""
    w = rows[0]
    gflop = f"{w['train_gflop_per_sample']:.0f} GFLOP per training sample, so " if w["train_gflop_per_sample"] else ""
    run_seconds = w["weeks"] * 7 * 24 * 3600
    lines = [
        f"## Loader workers per GPU: {w['recipe']} on {w['gpu']}", "",
        "Computed by `benchmarks.bench_loader.workers_section` from the `flops` and `loader` records above "
        "(a re-run recomputes it).", "",
        f"- Rate to feed: the FLOPs table gives {gflop}{w['samples_per_s_at_peak']:.0f} samples/s per {w['gpu']} at "
        f"100% MFU; at an assumed {w['assumed_mfu']:.0%} MFU (a well-tuned BF16 run, the high end) a GPU trains on {w['samples_per_s_at_peak']:.0f} x "
        f"{w['assumed_mfu']} = **{w['samples_per_s_needed']:.1f} samples/s** ({w['gpus']} GPUs: "
        f"{w['samples_per_s_needed'] * w['gpus']:,.0f} samples/s).",
    ]
    for row in rows:
        enough = "enough" if row["recipe_workers"] and row["recipe_workers"] >= row["workers"] else "NOT enough"
        lines += [
            f"- JPEG sources with a {row['source_short_side']} px short side: one loader worker (one core) delivers "
            f"{row['per_core']:.1f} samples/s (our streaming CoCa training transform at 224 px, `loader` "
            f"`{row['per_core_case']}`: samples per CPU-second of the loader's processes on this machine's CPU). "
            f"Workers per GPU = ceil({row['samples_per_s_needed']:.1f} / {row['per_core']:.1f}) = "
            f"ceil({row['samples_per_s_needed'] / row['per_core']:.3f}) = **{row['workers']}** "
            f"({row['workers'] * row['gpus']} cores for {row['gpus']} GPUs); the recipe's `dataloader_num_workers` "
            f"is {row['recipe_workers']}: {enough}.",
        ]
    lines += [
        f"- Cross-check, the floor: {w['pairs']:,.0f} pairs seen once in {w['weeks']} weeks on {w['gpus']} GPUs is "
        f"{w['pairs']:.1e} / ({w['gpus']} x {run_seconds:,} s) = {w['floor_samples_per_s']:.1f} samples/s per GPU "
        f"(ceil({w['floor_samples_per_s']:.1f} / {w['per_core']:.0f}) = {w['floor_workers']} worker); at "
        f"{w['samples_per_s_needed']:.0f} samples/s the 4 weeks are "
        f"{w['samples_per_s_needed'] / w['floor_samples_per_s']:.1f} passes over the pairs.",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = harness.common_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.set_defaults(threads=1, repeats=2)  # one intra-op thread: what a DataLoader worker has
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), help="data recipes (one per augmentation)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--warmup-batches", type=int, default=4)
    parser.add_argument("--timed-batches", type=int, default=16)
    parser.add_argument("--samples", type=int, default=384, help="samples in the generated shards")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE, help="training resolution")
    parser.add_argument("--source-short-side", type=int, default=SOURCE_SHORT_SIDE, help="JPEG short side (px)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # Cases at another source size than the default are named for it (coca_streaming_w2_src512); --quick's are not.
    args.case_suffix = f"_src{args.source_short_side}" if args.source_short_side != SOURCE_SHORT_SIDE else ""
    if args.quick:
        args.batch, args.warmup_batches, args.timed_batches, args.samples, args.shards = 4, 1, 2, 24, 2
        args.source_short_side, args.image_size, args.repeats = 48, 32, 1
    if args.samples < args.batch * (args.warmup_batches + args.timed_batches):
        parser.error("--samples must cover the warm-up and timed batches (map-style runs one epoch)")
    if args.shards < max(args.workers):
        parser.error("--shards must be at least the largest worker count (streaming workers split shards)")
    harness.setup(args)
    # Tokenizers' own threads would add cores to the main process's collation (workers run it single-threaded).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        shards = write_shards(Path(tmp) / "shards", args.samples, args.shards, args.source_short_side, args.seed)
        records = []
        for recipe in args.recipes:
            records += bench_recipe(args, recipe, shards, str(Path(tmp) / "cache"))
    harness.save_and_report(records, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
