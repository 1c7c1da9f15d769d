"""Process-group and DeepSpeed setup shared by pretrain.py and finetune.py.

Two things the stock stack does not do by itself, each fixed here in one place:

1. DeepSpeed on CPU. accelerate only enables DeepSpeed when it is not told `cpu=True` (and
   `TrainingArguments(use_cpu=True)` silently drops DeepSpeed). Without CUDA, accelerate's
   `PartialState` then finds no backend and reports ONE process even under a 2-process launch.
   `init_distributed_state` creates the state with the gloo backend before `TrainingArguments`,
   which then reuses it (`accelerator_config={"use_configured_state": True}`). On GPUs nothing changes.
2. DeepSpeed 0.19 broadcasts parameters as raw bytes with `param.data.view(torch.uint8)`, which
   fails for 0-dim parameters ("self.dim() cannot be 0 to view Float as Byte") — CoCa's
   `logit_scale` and BLIP-2's `temp` are 0-dim, as in open_clip and LAVIS (and transformers' CLIP).
   `patch_deepspeed_scalar_broadcast` makes those byte views 0-dim-safe (same bytes, same result).
"""

from __future__ import annotations

import inspect
import os
import re
import textwrap

import torch


def is_distributed_launch() -> bool:
    """True inside `accelerate launch` / `torchrun` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ


def init_distributed_state(use_deepspeed: bool) -> bool:
    """Set up accelerate's process state for a DeepSpeed run on CPU (see the module docstring).

    Returns True when it created the state; the caller then passes
    `accelerator_config={"use_configured_state": True}` to `TrainingArguments`.
    """
    if not (use_deepspeed and is_distributed_launch() and not torch.cuda.is_available()):
        return False
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # accelerate launch sets it too; torchrun does not
    PartialState(backend="gloo")
    return True


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A byte view of `tensor` that also works for 0-dim tensors (a view, not a copy: a broadcast into it
    writes the parameter)."""
    return (tensor.view(1) if tensor.dim() == 0 else tensor).view(torch.uint8)


_BYTE_VIEW = re.compile(r"(\b\w+)\.data\.view\(torch\.uint8\)")


def _rewrite_byte_views(owner, name: str) -> bool:
    """Recompile method `owner.name` from its own source with every `X.data.view(torch.uint8)` replaced by
    `_as_bytes(X.data)`. Returns False when the source no longer contains the pattern (fixed upstream)."""
    func = getattr(owner, name)
    source = textwrap.dedent(inspect.getsource(func))
    if not _BYTE_VIEW.search(source):
        return False
    source = _BYTE_VIEW.sub(r"_hf_vlm_as_bytes(\1.data)", source)
    module_globals = func.__globals__
    module_globals["_hf_vlm_as_bytes"] = _as_bytes
    namespace: dict = {}
    exec(compile(source, inspect.getsourcefile(func), "exec"), module_globals, namespace)
    setattr(owner, name, namespace[name])
    return True


def patch_deepspeed_scalar_broadcast() -> list[str]:
    """Make DeepSpeed's parameter broadcasts work for 0-dim parameters (see the module docstring).

    The four DeepSpeed methods that broadcast `param.data.view(torch.uint8)` are recompiled from their
    own source with a 0-dim-safe byte view; nothing else in them changes. Idempotent. Returns the
    methods it patched."""
    from deepspeed.runtime import engine
    from deepspeed.runtime.zero import partition_parameters as zero3

    targets = [
        (engine.DeepSpeedEngine, "_broadcast_model"),  # ZeRO-1/2: initial sync of all ranks
        (zero3.Init, "_zero_init_param"),  # ZeRO-3: partitioning a parameter
        (zero3.InsertPostInitMethodToModuleSubClasses, "patch_init_and_builtins"),  # ZeRO-3: module.apply()
        (zero3.GatheredParameters, "_exit"),  # ZeRO-3: modified gathered params (16-bit save)
    ]
    return [f"{owner.__name__}.{name}" for owner, name in targets if _rewrite_byte_views(owner, name)]
