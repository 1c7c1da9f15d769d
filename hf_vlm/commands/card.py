"""`hf-vlm card CHECKPOINT [--output README.md]`: render a checkpoint's model card (see hf_vlm.hub.cards)."""

from __future__ import annotations

import sys


def run(args) -> int:
    from hf_vlm.hub import write_card

    try:
        path = write_card(args.checkpoint, args.output, repo_id=args.repo_id, base_model=args.base_model,
                          eval_results=args.eval_results, variant=args.variant)
    except (FileNotFoundError, KeyError, ValueError) as err:
        print(f"hf-vlm card: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("card", help="render the model card (README.md) of a checkpoint")
    parser.add_argument("checkpoint", help="checkpoint folder (config.json; weights optional)")
    parser.add_argument("--output", default=None, help="where to write the card (default: CHECKPOINT/README.md)")
    parser.add_argument("--repo-id", default=None, help="Hub id used in the card's usage snippets")
    parser.add_argument("--base-model", default=None, action="append",
                        help="Hub id of the model this one is converted or fine-tuned from (repeatable)")
    parser.add_argument("--eval-results", default=None,
                        help="eval JSON for the model-index (default: CHECKPOINT/eval_results.json)")
    parser.add_argument("--variant", default=None,
                        help="a variant of model_cards/variants.json (default: the one whose preset matches)")
    parser.set_defaults(func=run)
