"""`make bench`: every benchmark, then the results folder's table and plot.

The default plan is the CPU one that fits this 2-core machine in about 16 minutes: real widths with
2 layers per stack for the model comparisons (ratios between implementations, not absolute speed),
the full-size checkpoint for conversion, full-size FLOPs, the training data loader alone (no model, on
the CPU in every plan). `--full` runs the issue's whole grid at full depth (coca_ViT-B-32: greedy and
beams 3, batch 1 and 8, 20 and 60 tokens): for a GPU, with `--device cuda --dtype bfloat16`.

    python -m benchmarks.run_all [--out benchmarks/results/cpu] [--full] [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import harness


def plan(args) -> list[list[str]]:
    common = ["--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads), "--out", str(args.out)]
    # The data loader alone (no model, CPU only): every config at 256 px JPEGs, and the seeds' streaming CoCa
    # configuration at 512 px, for the workers-per-GPU section of the results README.
    loader = [["benchmarks.bench_loader", "--out", str(args.out)],
              ["benchmarks.bench_loader", "--recipes", "coca", "--modes", "streaming", "--workers", "2",
               "--source-short-side", "512", "--out", str(args.out)]]
    if args.full:
        return [["benchmarks.bench_coca", *common],
                ["benchmarks.bench_blip2", "--layers", "4", *common],
                ["benchmarks.bench_conversion", "--out", str(args.out)],
                ["benchmarks.flops", "--out", str(args.out)],
                ["benchmarks.bench_bulk", "--layers", "4", "--images", "64", *common],
                *loader]
    cheap = ["--layers", "2", "--repeats", "2", "--budget-s", "5"]
    return [
        ["benchmarks.flops", "--out", str(args.out)],
        # The whole generation grid: greedy and beams 3, batch 1 and 8, 20 and 60 new tokens.
        ["benchmarks.bench_coca", *cheap, *common],
        ["benchmarks.bench_blip2", *cheap, *common],
        ["benchmarks.bench_conversion", "--repeats", "1", "--out", str(args.out)],
        # hf-vlm caption vs the transformers.pipeline loop, beam search and greedy: tiny models on 32 JPEGs, real
        # widths on one batch of 16.
        ["benchmarks.bench_bulk", "--tiny", "--images", "32", *common],
        ["benchmarks.bench_bulk", "--layers", "2", "--images", "16", "--repeats", "1", *common],
        *loader,
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=harness.RESULTS_DIR / "cpu")
    parser.add_argument("--full", action="store_true", help="the whole grid at full depth (GPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(harness.DTYPES))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    failures = []
    for step in plan(args):
        start = time.perf_counter()
        print(f"== python -m {' '.join(step)}", flush=True)
        if subprocess.run([sys.executable, "-m", *step], cwd=Path(__file__).resolve().parent.parent).returncode:
            failures.append(step[0])
        print(f"   {time.perf_counter() - start:.0f} s", flush=True)
    from benchmarks import report

    report.main([str(args.out), "--header", f"Made by `python -m benchmarks.run_all {' '.join(argv or sys.argv[1:])}`"
                 " (`make bench`)."])
    if failures:
        print(f"{len(failures)} benchmark(s) failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
