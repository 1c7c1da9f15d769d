"""Bulk captioning: `hf-vlm caption` vs the loop a user writes with `transformers.pipeline`, same model, same images.

Data: one webdataset shard of JPEGs (short side 256 px, captions of 8-16 words), made by `bench_loader.write_shards`.
Models: random CoCa (coca-large-v2 widths) and BLIP-2 (blip2-flan-t5-xl widths: EVA ViT-g, Q-Former, FlanT5-XL)
with `--layers` layers per stack, or the tiny presets (`--tiny`; `--quick`: tiny models, 6 small images, 4 tokens: the
smoke test), each saved as a checkpoint folder with a processor
whose tokenizer is trained on the captions. Vocabulary rows beyond that tokenizer get zero weight, so every
generated token is one it can decode: captions are compared as text.
- ours: `hf_vlm.bulk.run_bulk(CaptionTask(checkpoint, max_new_tokens=T), "<folder>/*.tar", out)`, what
  `hf-vlm caption` runs: shard reader, the shared decoder, batches of `--batch-size` through `generate` with the KV
  cache, parquet output written per shard, into a fresh output folder per repeat. CPU default: no DataLoader worker.
- upstream: `pipe = pipeline("image-text-to-text", model=..., processor=...)` on the same model object; the tars read
  with `tarfile`, each JPEG opened with PIL (`convert("RGB")`), then `pipe(images=image, text="", generate_kwargs=
  {"generation_config": ...})` one image at a time (the loop), or on lists of `--batch-size` images (a second record).
Both sides decode with the same GenerationConfig, `max_new_tokens=T`: the checkpoint's caption decoding (beam search,
as saved checkpoints recommend) or greedy (`--decodings`); the `same_captions` check says every image got the same
caption on both sides. Model loading is outside the timed region on both sides.

    python -m benchmarks.bench_bulk [--models coca blip2] [--layers 2] [--images 32] [--tiny] [--quick]
"""

from __future__ import annotations

import argparse
import io
import itertools
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

from benchmarks import harness
from benchmarks.bench_loader import write_shards
from hf_vlm.evaluation.decoding import decoding_summary

FAMILIES = {"coca": ("coca-large-v2", "coca-tiny"), "blip2": ("blip2-flan-t5-xl", "blip2-tiny")}
DECODINGS = ("checkpoint", "greedy")


def model_config(family: str, tiny: bool, layers: int):
    """The family's full preset with `layers` layers in every stack (or its tiny preset)."""
    from transformers import AutoConfig

    from hf_vlm.presets import preset_dict

    full, tiny_name = FAMILIES[family]
    preset = preset_dict(tiny_name if tiny else full)
    if not tiny:
        if family == "coca":
            preset["vision_config"]["timm_model_args"]["depth"] = layers
            preset["text_config"]["num_hidden_layers"] = preset["multimodal_config"]["num_hidden_layers"] = layers
        else:
            preset["vision_config"]["num_hidden_layers"] = preset["qformer_config"]["num_hidden_layers"] = layers
            preset["text_config"]["num_layers"] = preset["text_config"]["num_decoder_layers"] = layers
    return AutoConfig.for_model(preset.pop("model_type"), **preset)


def save_checkpoint(family: str, config, captions: list[str], folder: Path) -> Path:
    """A random model of `config` and a processor at its image size, saved as a checkpoint folder."""
    from transformers import AutoModel, AutoModelForImageTextToText

    import hf_vlm  # noqa: F401
    from hf_vlm.testing import TINY_CORPUS
    from hf_vlm.tokenization import train_bert_tokenizer, train_coca_tokenizer, train_t5_tokenizer

    texts = TINY_CORPUS + captions
    torch.manual_seed(0)
    if family == "coca":
        from hf_vlm.modeling.coca import CocaProcessor

        processor = CocaProcessor.from_tokenizer(train_coca_tokenizer(texts, 96), image_size=config.vision_config.image_size)
        model = AutoModel.from_config(config)
        head = model.lm_head
    else:
        from hf_vlm.modeling.blip2_flant5 import Blip2FlanT5Processor

        processor = Blip2FlanT5Processor.from_tokenizers(train_t5_tokenizer(texts, 96), train_bert_tokenizer(texts, 256),
                                                         image_size=config.vision_config.image_size)
        model = AutoModelForImageTextToText.from_config(config)
        head = model.language_model.lm_head
    with torch.no_grad():  # tokens the small tokenizer cannot write are never chosen (their logit 0 never wins)
        head.weight[len(processor.tokenizer):] = 0
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def read_images(files: list[str]):
    """What a user's loop does with a webdataset tar: every JPEG member opened with PIL, in order."""
    from PIL import Image

    images = []
    for path in files:
        with tarfile.open(path) as tar:
            images += [Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")
                       for m in tar.getmembers() if m.name.endswith(".jpg")]
    return images


def bench_family(args, family: str, tmp: Path, shards: dict) -> list[harness.Record]:
    import pyarrow.parquet as pq
    from transformers import pipeline

    from hf_vlm.bulk import CaptionTask, run_bulk

    config = model_config(family, args.tiny, args.layers)
    checkpoint = save_checkpoint(family, config, shards["captions"], tmp / family)
    source = f"{tmp}/shards/*.tar"
    runs = itertools.count()
    size = "tiny" if args.tiny else f"l{args.layers}"
    records = []
    for decoding in args.decodings:
        task = CaptionTask(str(checkpoint), device=args.device, dtype=args.dtype, max_new_tokens=args.new_tokens,
                           num_beams=1 if decoding == "greedy" else None)
        # The same model object and decoding (hf-vlm caption's: the checkpoint's caption config) on both sides.
        pipe = pipeline("image-text-to-text", model=task.model, processor=task.processor)
        generate_kwargs = {"generation_config": task.generation_config}

        def ours(task=task) -> list[str]:
            out = tmp / f"out-{family}-{next(runs)}"
            run_bulk(task, source, out, batch_size=args.batch_size)
            captions = pq.read_table(out / "captions").column("caption").to_pylist()
            shutil.rmtree(out)
            return captions

        def loop(pipe=pipe, generate_kwargs=generate_kwargs) -> list[str]:
            return [pipe(images=image, text="", generate_kwargs=generate_kwargs)[0]["generated_text"].strip()
                    for image in read_images(shards["files"])]

        def batched(pipe=pipe, generate_kwargs=generate_kwargs) -> list[str]:
            # Lists of --batch-size images per call: given a whole list, this pipeline generates for all of it at
            # once (its batch_size does not split a list of image-text inputs), which no corpus fits in memory for.
            images, captions = read_images(shards["files"]), []
            for start in range(0, len(images), args.batch_size):
                chunk = images[start:start + args.batch_size]
                outputs = pipe(images=chunk, text=[""] * len(chunk), generate_kwargs=generate_kwargs)
                captions += [(out[0] if isinstance(out, list) else out)["generated_text"].strip() for out in outputs]
            return captions

        expected = ours()
        for name, upstream in (("pipeline_loop", loop), (f"pipeline_lists{args.batch_size}", batched)):
            if name != "pipeline_loop" and not args.pipeline_batching:
                continue
            same = upstream() == expected
            timing = harness.interleaved(ours, upstream, device=torch.device(task.device), repeats=args.repeats,
                                         budget_s=args.budget_s, warmup=0)
            model = FAMILIES[family][1] if args.tiny else f"{FAMILIES[family][0]} widths, {args.layers} layers/stack"
            how = "one image per call" if name == "pipeline_loop" else f"lists of {args.batch_size} images per call"
            records.append(harness.Record(
                benchmark="bulk_caption", case=f"{family}_{size}_b{args.batch_size}_{decoding}_vs_{name}",
                params={"model": model, "images": len(expected), "batch": args.batch_size,
                        "decoding": decoding_summary(task.generation_config),
                        "image_size": config.vision_config.image_size, "jpeg_short_side": args.source_short_side,
                        "device": task.device, "dtype": str(task.dtype).replace("torch.", ""), "upstream": name},
                metrics=harness.throughput_metrics(timing, {"images/s": len(expected)}),
                seconds=harness.seconds_of(timing),
                checks={"same_captions": same, "distinct_captions": len(set(expected))},
                notes="ours: hf-vlm caption (read, decode, batched generate, parquet per shard); upstream: tarfile + "
                      f"PIL + transformers.pipeline('image-text-to-text'), {how}; same decoding",
            ))
            harness.save(records[-1], args.out)
    return records


def main(argv=None) -> int:
    parser = harness.common_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--models", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--layers", type=int, default=2, help="layers per stack of the real-width models")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--source-short-side", type=int, default=256, help="JPEG short side (px)")
    parser.add_argument("--decodings", nargs="+", choices=DECODINGS, default=list(DECODINGS),
                        help="checkpoint: its caption decoding (CoCa: 6 beams; BLIP-2: 5 beams); greedy: 1 beam")
    parser.add_argument("--no-pipeline-batching", dest="pipeline_batching", action="store_false",
                        help="time only the one-image-per-call loop upstream")
    parser.add_argument("--tiny", action="store_true", help="the tiny presets instead of the real widths")
    args = parser.parse_args(argv)
    if args.quick:
        args.tiny = True
        args.images, args.batch_size, args.new_tokens, args.source_short_side, args.repeats = 6, 4, 4, 48, 1
    harness.setup(args)
    with tempfile.TemporaryDirectory(prefix="bench_bulk_") as tmp:
        # One shard: hf-vlm's batches never span two shards (a real one holds thousands of samples).
        shards = write_shards(Path(tmp) / "shards", args.images, 1, args.source_short_side)
        records = [r for family in args.models for r in bench_family(args, family, Path(tmp), shards)]
    harness.save_and_report(records, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
