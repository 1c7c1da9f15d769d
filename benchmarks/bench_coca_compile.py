"""CoCa captioning: compiled (torch.compile, static cache) vs eager (the default dynamic cache), same model, same run.

Cases: greedy and beams 3, batch 1 and 8, 20 new tokens (forced: every caption has that length), the model of
bench_coca (coca_ViT-B-32 widths; `--layers` per stack), random weights. "ours" is
`torch.compile(model.forward, fullgraph=True)` for the decoding steps, generating with `cache_implementation="static"`; "upstream" is
plain eager `generate`. Each case compiles afresh (torch._dynamo.reset): the first, untimed call holds the
compile time (recorded as `compile_s`), the checks record that both sides gave the same tokens and that the
compiled run used one graph for every decoding step, without a graph break (the prefill runs eagerly, as in
transformers' own compiled generation).

    python -m benchmarks.bench_coca_compile [--layers 2] [--quick] [--backend inductor]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
import time

import torch
from tqdm import tqdm

from benchmarks import bench_coca, harness


def build_model(args):
    """bench_coca's CocaModel (its open_clip config, converted), with our own random init."""
    from hf_vlm.modeling.coca import CocaModel

    cfg = bench_coca.open_clip_cfg(args.quick, args.layers)
    return CocaModel(bench_coca.ours_config(cfg)).eval(), cfg["vision_cfg"]["image_size"]


def generation_cases(args):
    batches, tokens = ([2], [4]) if args.quick else (args.batches, args.tokens)
    return [(("greedy" if beams == 1 else f"beams{beams}"), beams, batch, new_tokens)
            for beams, batch, new_tokens in itertools.product(args.beams, batches, tokens)]


@torch.no_grad()
def caption(model, images, new_tokens: int, num_beams: int, **kwargs) -> torch.Tensor:
    return model.generate(pixel_values=images, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          num_beams=num_beams, do_sample=False, length_penalty=1.0, **kwargs)


def compile_decoding(forward, backend: str):
    """`forward` with its decoding steps compiled (fullgraph: a graph break raises). The prefill (the call that
    gets the pixel values) runs eagerly, as in transformers' own compiled generation: its shapes change with every
    prompt, and compiling the ViT costs minutes on a CPU."""
    compiled = torch.compile(forward, backend=backend, fullgraph=True)

    @functools.wraps(forward)  # (generate checks its arguments against the forward's signature)
    def decoding_compiled(*args, **kwargs):
        return (forward if kwargs.get("pixel_values") is not None else compiled)(*args, **kwargs)

    return decoding_compiled


def bench_generation(args, device, dtype) -> list[harness.Record]:
    from torch._dynamo.utils import counters

    model, image_size = build_model(args)
    model = model.to(device, dtype)
    eager_forward = model.forward
    records = []
    for strategy, beams, batch, tokens in tqdm(generation_cases(args), desc="coca compiled generation"):
        images = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(batch))
        images = images.to(device, dtype)
        model.forward = eager_forward
        eager_tokens = caption(model, images, tokens, beams).cpu()

        torch._dynamo.reset()
        counters.clear()
        compiled = compile_decoding(eager_forward, args.backend)
        start = time.perf_counter()
        model.forward = compiled
        compiled_tokens = caption(model, images, tokens, beams, cache_implementation="static").cpu()
        compile_s = time.perf_counter() - start

        def run_compiled(images=images, tokens=tokens, beams=beams, compiled=compiled):
            model.forward = compiled
            return caption(model, images, tokens, beams, cache_implementation="static")

        def run_eager(images=images, tokens=tokens, beams=beams):
            model.forward = eager_forward
            return caption(model, images, tokens, beams)

        timing = harness.interleaved(run_compiled, run_eager, device=device, repeats=args.repeats,
                                     budget_s=args.budget_s, warmup=0)
        model.forward = eager_forward
        records.append(harness.Record(
            benchmark="coca_compile", case=f"{strategy}_b{batch}_t{tokens}",
            params={"strategy": strategy, "num_beams": beams, "batch": batch, "new_tokens": tokens,
                    "model": bench_coca.model_name(args), "device": str(device), "dtype": args.dtype,
                    "backend": args.backend},
            metrics=harness.throughput_metrics(timing, {"images/s": batch, "tokens/s": batch * tokens}),
            seconds=harness.seconds_of(timing),
            checks={"same_tokens": bench_coca.same_tokens(compiled_tokens, eager_tokens),
                    # graphs dynamo built in the timed runs too: recompiling per step would show here
                    "graphs": counters["stats"]["unique_graphs"],
                    "graph_breaks": sum(counters["graph_break"].values()),
                    "compile_s": round(compile_s, 1)},
            notes="ours: decoding steps in torch.compile(model.forward, fullgraph=True), prefill eager, "
                  "cache_implementation='static' (the first call, untimed, compiles: compile_s); upstream: the same "
                  "model's eager generate (dynamic cache)",
        ))
        harness.save(records[-1], args.out)  # now: a run stopped later keeps what it measured
    return records


def main(argv=None) -> int:
    parser = harness.common_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--layers", type=int, default=None,
                        help="layers per stack (vision, text, decoder); default: coca_ViT-B-32's 12")
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 3], help="beam counts (1 = greedy)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes")
    parser.add_argument("--tokens", type=int, nargs="+", default=[20], help="new tokens")
    # (--quick: batch 2, 4 new tokens, the --beams given)
    parser.add_argument("--backend", default="inductor",
                        help="torch.compile backend (the smoke test uses 'eager': dynamo's graphs, no code generation)")
    args = parser.parse_args(argv)
    device = harness.setup(args)
    records = bench_generation(args, device, harness.DTYPES[args.dtype])
    harness.save_and_report(records, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
