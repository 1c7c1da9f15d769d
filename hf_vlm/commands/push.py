"""`hf-vlm push CHECKPOINT REPO_ID`: publish a checkpoint folder, or a LoRA adapter folder (`finetune.py --lora`), to
the Hub in one commit (see hf_vlm.hub.push)."""

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
    parser.add_argument("checkpoint", help="checkpoint folder (config.json, weights, processor files), or a peft adapter "
                        "folder (adapter_config.json, adapter_model.safetensors, processor files: finetune.py --lora)")
    parser.add_argument("repo_id", help="Hub repository id, e.g. org/coca-large-v2 (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", default=None, help="branch to commit to (created from main if missing)")
    parser.add_argument("--commit-message", default=None, help="commit summary")
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, help="safetensors shard size (e.g. 5GB)")
    parser.add_argument("--base-model", default=None, action="append",
                        help="Hub id of the model this one is converted or fine-tuned from (repeatable); for an "
                        "adapter: the base it loads on (default: its adapter_config.json's, which must be a Hub id)")
    parser.add_argument("--eval-results", default=None,
                        help="eval JSON for the card's model-index (default: CHECKPOINT/eval_results.json)")
    parser.set_defaults(func=run)
    register_space(subparsers)


def run_space(args) -> int:
    from hf_vlm.hub import HubPushError
    from hf_vlm.hub.space import push_space

    try:
        url = push_space(args.repo_id, blip2=args.blip2, coca=args.coca, wheel=args.wheel,
                         requirement=args.requirement, private=args.private, commit_message=args.commit_message)
    except (HubPushError, FileNotFoundError, ValueError) as err:
        print(f"hf-vlm push-space: error: {err}", file=sys.stderr)
        return 1
    print(url)
    return 0


def register_space(subparsers) -> None:
    parser = subparsers.add_parser(
        "push-space", help="publish the Gradio Space (app, README, requirements, the hf-vlm wheel) in one commit",
        description="The Space installs hf-vlm from the wheel uploaded with it (hf-vlm is not on PyPI) and loads the "
                    "models by repo id. Token: HF_TOKEN or `hf auth login`; endpoint: HF_ENDPOINT.",
    )
    parser.add_argument("repo_id", help="Space repository id, e.g. org/hf-vlm-demo (created if missing)")
    parser.add_argument("--blip2", default=None, help="Hub id of the BLIP-2-FlanT5 model the Space serves")
    parser.add_argument("--coca", default=None, help="Hub id of the CoCa model the Space serves")
    parser.add_argument("--wheel", default=None, help="the hf-vlm wheel to upload with the Space (python -m build)")
    parser.add_argument("--requirement", default=None, help="instead of --wheel: a published hf-vlm, e.g. hf-vlm==0.1.0")
    parser.add_argument("--private", action="store_true", help="create the Space as private")
    parser.add_argument("--commit-message", default=None, help="commit summary")
    parser.set_defaults(func=run_space)
