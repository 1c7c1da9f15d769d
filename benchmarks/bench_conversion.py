"""Conversion: hf-vlm's streaming converter vs a naive load-everything conversion of the same checkpoint.

The checkpoint is an open_clip CoCa state dict (default coca_ViT-L-14: 638M parameters, 2.6 GB in fp32)
written as one .safetensors file. Each conversion runs in a fresh process that reports its wall-clock
seconds and peak RSS:
- ours: `hf_vlm.conversion.open_clip_coca.convert` (reads one tensor at a time, writes shards as it goes);
- naive: `safetensors.torch.load_file` of the whole file, the same key mapping applied in memory, then
  `save_file` of the whole result: the usual script.
Values do not matter for conversion cost, so the checkpoint holds zeros (fast to write).

    python -m benchmarks.bench_conversion [--model coca_ViT-L-14] [--quick]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import harness


def write_checkpoint(model_name: str, path: Path, quick_cfg: dict | None) -> int:
    """open_clip's state dict for `model_name` (zeros) as safetensors at `path`; returns its size in bytes."""
    import open_clip
    from safetensors.torch import save_file

    with torch.device("meta"):
        if quick_cfg is not None:
            from open_clip.coca_model import CoCa

            shapes = CoCa(**{k: v for k, v in quick_cfg.items() if k != "custom_text"}).state_dict()
        else:
            shapes = open_clip.create_model(model_name, device="meta").state_dict()
    save_file({k: torch.zeros(v.shape, dtype=v.dtype) for k, v in shapes.items()}, str(path))
    return path.stat().st_size


def convert_ours(source: str, output: str, model_config: str, max_shard_size: str) -> None:
    from hf_vlm.conversion.open_clip_coca import convert

    convert(source, output, model_config=model_config, max_shard_size=max_shard_size, progress=False)


def convert_naive(source: str, output: str) -> None:
    from safetensors.torch import load_file, save_file

    from hf_vlm.conversion.open_clip_coca import coca_rules

    state = load_file(source)  # everything in memory at once
    converted = {}
    for rule in coca_rules(state.keys()):
        for target, tensor in zip(rule.targets, rule.apply(*(state[k] for k in rule.sources))):
            converted[target] = tensor.contiguous()
    Path(output).mkdir(parents=True, exist_ok=True)
    save_file(converted, str(Path(output) / "model.safetensors"))


def child(side: str, source: str, output: str, model_config: str, max_shard_size: str) -> dict:
    start = time.perf_counter()
    if side == "ours":
        convert_ours(source, output, model_config, max_shard_size)
    else:
        convert_naive(source, output)
    return {"side": side, "seconds": time.perf_counter() - start, "peak_rss_mb": harness.peak_rss_mb()}


def main(argv=None) -> int:
    parser = harness.common_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--model", default="coca_ViT-L-14", help="open_clip CoCa model name (checkpoint size)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the checkpoint is written (default: a temp dir)")
    parser.add_argument("--child", nargs=3, metavar=("SIDE", "SOURCE", "OUTPUT"), help=argparse.SUPPRESS)
    parser.add_argument("--model-config", help=argparse.SUPPRESS)
    parser.add_argument("--max-shard-size", default="500MB",
                        help="our output shard size: the streaming writer holds one shard in memory (default 500MB)")
    args = parser.parse_args(argv)
    harness.setup(args)
    if args.child:
        print(json.dumps(child(*args.child, args.model_config, args.max_shard_size)))
        return 0

    from benchmarks.bench_coca import QUICK_CONFIG

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        source = tmp / "open_clip_model.safetensors"
        size = write_checkpoint(args.model, source, QUICK_CONFIG if args.quick else None)
        model_config = str(tmp / "model_config.json")
        if args.quick:
            Path(model_config).write_text(json.dumps(QUICK_CONFIG))
        else:
            model_config = args.model
        results = {"ours": [], "upstream": []}
        for _ in range(max(1, args.repeats)):  # alternate the two, a fresh process and output each time
            for side in ("ours", "naive"):
                output = tmp / f"out_{side}"
                results["ours" if side == "ours" else "upstream"].append(harness.run_child(
                    ["-m", "benchmarks.bench_conversion", "--child", side, str(source), str(output),
                     "--model-config", model_config, "--max-shard-size", args.max_shard_size,
                     "--threads", str(args.threads)]))
                shutil.rmtree(output)
    timing = harness.Timing(ours=[r["seconds"] for r in results["ours"]],
                            upstream=[r["seconds"] for r in results["upstream"]])
    rss = {side: max(r["peak_rss_mb"] for r in runs) for side, runs in results.items()}
    record = harness.Record(
        benchmark="conversion", case=f"{'tiny' if args.quick else args.model}_safetensors",
        params={"model": "tiny" if args.quick else args.model, "checkpoint_bytes": size,
                "checkpoint_gb": round(size / 1e9, 3), "max_shard_size": args.max_shard_size},
        metrics={"seconds": {"ours": timing.ours_median, "upstream": timing.upstream_median,
                             "ratio": timing.ours_median / timing.upstream_median},
                 "peak RSS MB": {"ours": rss["ours"], "upstream": rss["upstream"],
                                 "ratio": rss["ours"] / rss["upstream"]}},
        seconds=harness.seconds_of(timing),
        notes="upstream = naive load_file + in-memory mapping + save_file (the converter's key mapping); "
              "each run a fresh process; ratio < 1 = ours uses less",
    )
    harness.save(record, args.out)
    print(record.case, {k: round(v["ratio"], 2) for k, v in record.metrics.items()}, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
