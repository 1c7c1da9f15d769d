"""`hf-vlm space`: serve the Gradio Space (the app of spaces/app.py, built by hf_vlm.space) locally.

Models come from HF_VLM_BLIP2 / HF_VLM_COCA or the `make demo` checkpoints, as in the Space."""

from __future__ import annotations

import sys


def run(args) -> int:
    from hf_vlm import space

    try:
        models = space.load_models()
    except space.ModelLoadError as err:
        print(f"hf-vlm space: {err}", file=sys.stderr)
        return 2
    if models.blip2 is None and models.coca is None:
        print(
            f"hf-vlm space: no model to serve. Set {space.BLIP2_ENV} and/or {space.COCA_ENV} to a checkpoint "
            f"folder or Hub id, or run `make demo` (it writes {space.demo_checkpoint('blip2')} and "
            f"{space.demo_checkpoint('coca')}).",
            file=sys.stderr,
        )
        return 2
    print(models.describe().replace("**", "").replace("`", ""), flush=True)
    space.launch(space.build_demo(models), host=args.host, port=args.port)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("space", help="serve the Gradio Space (captioning, VQA, zero-shot) locally")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on (default: %(default)s)")
    parser.set_defaults(func=run)
