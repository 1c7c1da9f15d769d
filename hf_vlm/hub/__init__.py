"""Publishing to the Hugging Face Hub: model cards (`cards`) and `push_to_hub` (`push`).

The CLI commands `hf-vlm card` and `hf-vlm push` are thin wrappers over these functions. Tests run them
against `hf_vlm.testing_hub.LocalHub`, a local Hub-compatible endpoint.
"""

from hf_vlm.hub.cards import checkpoint_facts, read_eval_results, render_card, write_card
from hf_vlm.hub.push import HubPushError, PushResult, push_to_hub, stage_checkpoint

__all__ = [
    "HubPushError", "PushResult", "checkpoint_facts", "push_to_hub", "read_eval_results", "render_card",
    "stage_checkpoint", "write_card",
]
