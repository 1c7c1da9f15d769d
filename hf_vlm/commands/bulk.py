"""`hf-vlm caption` and `hf-vlm embed`: a checkpoint over a whole dataset (hf_vlm.bulk), in one process or under
`accelerate launch` (each rank its own shards), written per input shard, resumable by running the same command."""

from __future__ import annotations

import argparse
import json

SOURCE_HELP = ("one source as training's --train_data takes it: webdataset .tar shards (folder, file, glob, brace "
               "pattern 'x/{000..009}.tar', https:// / hf:// / s3:// / gs:// URL, pipe:COMMAND), an imagefolder with "
               "metadata.jsonl/.csv, parquet files, or a Hub dataset name")


def _generation_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE (a GenerationConfig field)")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a plain string


def _common(parser: argparse.ArgumentParser, batch_size: int) -> None:
    parser.add_argument("source", metavar="SOURCE", help=SOURCE_HELP)
    parser.add_argument("--model", required=True, help="checkpoint folder or Hub id")
    parser.add_argument("--output", required=True, help="output folder (a restart with the same command resumes it)")
    parser.add_argument("--split", default=None,
                        help="split sub-folder of a folder, or split of a Hub dataset (default: train, as training)")
    parser.add_argument("--batch-size", type=int, default=batch_size, help="images per forward pass")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="DataLoader workers decoding and preprocessing shards (default: 4 on GPU, 0 on CPU)")
    parser.add_argument("--device", default=None, help="default: this rank's GPU if there is one, else cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="compute dtype (auto: bfloat16 on a GPU that supports it, else float32)")


def _run(args, task_kwargs: dict) -> int:
    import logging

    from hf_vlm.bulk.run import run_bulk
    from hf_vlm.bulk.tasks import CaptionTask, EmbedTask, resolve_device

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = resolve_device(args.device)
    task = (CaptionTask if args.command == "caption" else EmbedTask)(args.model, device=device, dtype=args.dtype,
                                                                     **task_kwargs)
    workers = args.num_workers if args.num_workers is not None else (4 if device.startswith("cuda") else 0)
    totals = run_bulk(task, args.source, args.output, split=args.split, batch_size=args.batch_size,
                      num_workers=workers, seed=getattr(args, "seed", 0))
    print(f"rank {totals['rank']}: {totals['rows']} images from {totals['shards']} shards in {totals['seconds']:.1f} s "
          f"({totals['images_per_second']:.1f} images/s), {totals['skipped']} skipped; "
          f"{totals['shards_skipped_as_done']} shards were already done")
    summary = totals.get("summary")
    if summary is not None:
        counts = ", ".join(f"{reason} {count}" for reason, count in summary["skipped"].items() if count) or "none"
        print(f"{args.output}: {summary['rows']} rows from {summary['shards']} shards; skipped: {counts} "
              f"(summary.json lists them)")
    return 0


def run_caption(args) -> int:
    generation = dict(args.generation or [])
    return _run(args, {"prompt": args.prompt, "rerank_with": args.rerank_with, "num_candidates": args.num_candidates,
                       "max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams, "generation": generation})


def run_embed(args) -> int:
    return _run(args, {"embeddings": args.embeddings, "output_dtype": args.output_dtype})


def register(subparsers) -> None:
    caption = subparsers.add_parser(
        "caption", help="caption (or answer a prompt about) every image of a dataset; optional CoCa reranking",
        description="Caption every image of SOURCE with a CoCa or BLIP-2 checkpoint into OUTPUT/captions/*.parquet "
                    "(one file per input shard), decoded as the checkpoint says unless overridden, as hf-vlm eval "
                    "decodes (generation_config.json; BLIP-2 captions without --prompt: "
                    "caption_generation_config.json). "
                    "Resumable; runs under `accelerate launch` with each rank taking its own shards.")
    _common(caption, batch_size=16)
    caption.add_argument("--prompt", default=None,
                         help="a fixed prompt, e.g. 'Question: what is in the picture? Short answer:' (BLIP-2 "
                              "answers it; CoCa continues it)")
    caption.add_argument("--rerank-with", default=None, metavar="COCA_MODEL",
                         help="a CoCa checkpoint that scores --num-candidates candidates per image; the best is kept "
                              "with its score")
    caption.add_argument("--num-candidates", type=int, default=None, metavar="K",
                         help="candidates per image for --rerank-with: the K best of a beam search with at least K "
                              "beams, or K samples with --generation do_sample=true")
    caption.add_argument("--max-new-tokens", type=int, default=None, help="default: the checkpoint's")
    caption.add_argument("--num-beams", type=int, default=None, help="default: the checkpoint's")
    caption.add_argument("--generation", nargs="+", type=_generation_option, metavar="KEY=VALUE",
                         help="other GenerationConfig fields, e.g. do_sample=true top_p=0.9 repetition_penalty=1.2")
    caption.add_argument("--seed", type=int, default=0, help="seeds sampled generation per batch (reproducible reruns)")
    caption.set_defaults(func=run_caption)

    embed = subparsers.add_parser(
        "embed", help="L2-normalised image / caption embeddings of a dataset, for faiss / autofaiss indexes",
        description="Embed every image (and/or caption) of SOURCE with a CoCa or BLIP-2 stage-1 checkpoint into "
                    "OUTPUT/img_emb/*.npy, OUTPUT/text_emb/*.npy and OUTPUT/metadata/*.parquet (one file each per "
                    "input shard, rows in the same order: the layout autofaiss and clip-retrieval read). Resumable; "
                    "runs under `accelerate launch` with each rank taking its own shards.")
    _common(embed, batch_size=64)
    embed.add_argument("--embeddings", nargs="+", choices=["image", "text"], default=["image"],
                       help="what to embed: image, text (each sample's caption), or both (default: image)")
    embed.add_argument("--output-dtype", default="float16", choices=["float16", "float32"],
                       help="dtype of the .npy files (default: float16)")
    embed.set_defaults(func=run_embed)
