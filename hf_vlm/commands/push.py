"""`hf-vlm push CHECKPOINT REPO_ID`: publish a checkpoint folder to the Hub in one commit (see hf_vlm.hub.push)."""

from __future__ import annotations

import sys


def run(args) -> int:
    from hf_vlm.hub import HubPushError, push_to_hub

    try:
        result = push_to_hub(
            args.checkpoint, args.repo_id, private=args.private, revision=args.revision,
            commit_message=args.commit_message, max_shard_size=args.max_shard_size, base_model=args.base_model,
            eval_results=args.eval_results,
        )
    except (HubPushError, FileNotFoundError, ValueError) as err:
        print(f"hf-vlm push: error: {err}", file=sys.stderr)
        return 1
    print(result.commit_url)
    return 0


def register(subparsers) -> None:
    from hf_vlm.hub.push import DEFAULT_MAX_SHARD_SIZE

    parser = subparsers.add_parser(
        "push", help="publish a checkpoint to the Hub (weights, processor, remote code, model card) in one commit",
        description="Token: the HF_TOKEN environment variable or `hf auth login`. The Hub endpoint: HF_ENDPOINT.",
    )
    parser.add_argument("checkpoint", help="checkpoint folder (config.json, weights, processor files)")
    parser.add_argument("repo_id", help="Hub repository id, e.g. org/coca-large-v2 (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", default=None, help="branch to commit to (created from main if missing)")
    parser.add_argument("--commit-message", default=None, help="commit summary")
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, help="safetensors shard size (e.g. 5GB)")
    parser.add_argument("--base-model", default=None, action="append",
                        help="Hub id of the model this one is converted or fine-tuned from (repeatable)")
    parser.add_argument("--eval-results", default=None,
                        help="eval JSON for the card's model-index (default: CHECKPOINT/eval_results.json)")
    parser.set_defaults(func=run)
