"""Which decoding a task uses: the checkpoint's own (generation_config.json, or `{task}_generation_config.json` for a
family's other tasks: BLIP-2's captions), else its family's recommended one (`recommended_generation` on the model
class, which `save_pretrained` writes into every checkpoint); explicit arguments win. `hf-vlm eval` and the Space
decode with `generation_config_for`; `generate` and transformers' pipelines read generation_config.json themselves.
"""

from __future__ import annotations

import copy


def generation_config_for(model, task: str, **overrides):
    """The GenerationConfig for `task` ("caption" or "vqa") of `model`; `overrides` that are not None win (an
    explicit `max_new_tokens` below the recommended `min_new_tokens` lowers the minimum with it)."""
    return with_overrides(recommended_generation_config(model, task), **overrides)


def recommended_generation_config(model, task: str):
    """The checkpoint's decoding for `task`, its unset fields filled from the family's recommendation."""
    from transformers import GenerationConfig

    recommended = getattr(type(model), "recommended_generation", None) or {}
    config = None
    if task in recommended and list(recommended).index(task) > 0:  # not the one in generation_config.json
        try:
            config = GenerationConfig.from_pretrained(model.name_or_path, f"{task}_generation_config.json")
        except (OSError, ValueError):  # a checkpoint from before these files, or a model built from a config
            config = None
    if config is None:
        config = copy.deepcopy(model.generation_config)
        if task in recommended and list(recommended).index(task) > 0:  # the file held another task's decoding
            config.update(**dict.fromkeys(("num_beams", "max_new_tokens", "min_new_tokens", "length_penalty")))
    for key, value in recommended.get(task, {}).items():  # fields the checkpoint leaves unset
        if getattr(config, key, None) is None:
            setattr(config, key, value)
    return config


def with_overrides(config, **overrides):
    """A copy of `config` with the `overrides` that are not None."""
    config = copy.deepcopy(config)
    config.update(**{key: value for key, value in overrides.items() if value is not None})
    if config.max_new_tokens is not None and (config.min_new_tokens or 0) > config.max_new_tokens:
        config.min_new_tokens = config.max_new_tokens
    return config


def decoding_summary(config) -> dict:
    """The settings that decide a decoding, as eval_results.json records them."""
    keys = ("num_beams", "max_new_tokens", "min_new_tokens", "length_penalty", "do_sample", "temperature", "top_p")
    return {key: getattr(config, key) for key in keys if getattr(config, key, None) is not None}
