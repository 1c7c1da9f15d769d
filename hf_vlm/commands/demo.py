"""`hf-vlm demo`: train small CoCa and BLIP-2 models on synthetic scenes, evaluate, card, report and serve them."""

from __future__ import annotations


def run(args) -> int:
    from hf_vlm.demo import run_demo

    run_demo(force=args.force, serve=not args.no_serve, quick=args.quick, host=args.host, port=args.port)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="train coca-tiny, a small T5, and BLIP-2 on those two frozen towers on synthetic scenes; "
        "evaluate, write cards and .demo/report.html, serve the Space"
    )
    parser.add_argument("--force", action="store_true", help="retrain even if demo checkpoints exist")
    parser.add_argument("--no-serve", action="store_true", help="stop after evaluation (non-interactive)")
    parser.add_argument("--quick", action="store_true", help="a short run of the same pipeline (for tests)")
    parser.add_argument("--host", default="127.0.0.1", help="Space address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="Space port (default: gradio's, 7860)")
    parser.set_defaults(func=run)
