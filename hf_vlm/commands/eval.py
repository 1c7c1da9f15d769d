"""`hf-vlm eval CHECKPOINT --task ...`: caption (CIDEr, BLEU-4, exact match), VQA accuracy, zero-shot
top-1/top-5 and retrieval R@1/5/10 of a checkpoint on the synthetic test scenes or on any source training's
--train_data takes (webdataset shards, imagefolder, parquet, Hub dataset; local, remote or pipe:); prints a table
and merges the results into CHECKPOINT/eval_results.json."""

from __future__ import annotations

from pathlib import Path


def _class_names(value: str | None) -> list[str] | None:
    """A comma-separated list, or a file with one class name per line."""
    if value is None:
        return None
    path = Path(value)
    names = path.read_text().splitlines() if path.is_file() else value.split(",")
    names = [name.strip() for name in names if name.strip()]
    if not names:
        raise ValueError(f"--class-names {value!r} holds no class name")
    return names


def run(args) -> int:
    from hf_vlm.evaluation.runner import run_eval

    run_eval(
        args.checkpoint,
        args.task,
        data=args.data,
        num_samples=args.num_samples,
        split=args.split,
        scene_image_size=args.scene_image_size,
        class_names=_class_names(args.class_names),
        output=args.output,
        save=not args.no_save,
        device=args.device,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
        vqa_prompt=args.vqa_prompt,
        zero_shot_template=args.template,
    )
    return 0


def register(subparsers) -> None:
    from hf_vlm.evaluation.runner import DEFAULT_SCENE_SAMPLES, TASKS, VQA_PROMPT

    parser = subparsers.add_parser(
        "eval", help="evaluate a checkpoint: caption, vqa, zero-shot, retrieval",
        description=__doc__,
    )
    parser.add_argument("checkpoint", help="checkpoint folder (or Hub id, with --output)")
    parser.add_argument("--task", nargs="+", choices=TASKS, default=None,
                        help="tasks to run (default: every task the model supports: "
                             "coca: caption zero-shot retrieval; blip2_flant5: caption vqa)")
    parser.add_argument("--data", default="scenes:test",
                        help="scenes:SPLIT (synthetic scenes), or one source as training's --train_data takes it: "
                             "webdataset .tar shards (folder, file, glob, brace pattern 'x/{000..009}.tar', "
                             "https:// / hf:// / s3:// / gs:// URL, pipe:COMMAND), an imagefolder with "
                             "metadata.jsonl/.csv, parquet files, or a Hub dataset name; default scenes:test")
    parser.add_argument("--split", default=None,
                        help="split sub-folder of a folder, or split of a Hub dataset (default: test, or its only one)")
    parser.add_argument("--num-samples", type=int, default=None,
                        help=f"evaluate at most this many images (scenes default: {DEFAULT_SCENE_SAMPLES})")
    parser.add_argument("--scene-image-size", type=int, default=None, help="size of generated scenes in pixels")
    parser.add_argument("--class-names", default=None,
                        help="zero-shot class names: comma-separated, or a file with one per line")
    parser.add_argument("--template", default=None,
                        help="zero-shot prompt with {} for the class name (scenes: 'a large {}'; "
                             "otherwise 'a photo of a {}.')")
    parser.add_argument("--vqa-prompt", default=VQA_PROMPT, help=f"VQA prompt with {{}} for the question "
                                                                 f"(default {VQA_PROMPT!r})")
    parser.add_argument("--batch-size", type=int, default=64, help="images (or questions) per forward pass")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="default: the checkpoint's recommended decoding (generation_config.json; BLIP-2 captions: "
                             "caption_generation_config.json)")
    parser.add_argument("--num-beams", type=int, default=None, help="default: the checkpoint's recommended decoding")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--output", default=None,
                        help="results folder or .json file (default: CHECKPOINT/eval_results.json)")
    parser.add_argument("--no-save", action="store_true", help="only print the table")
    parser.set_defaults(func=run)
