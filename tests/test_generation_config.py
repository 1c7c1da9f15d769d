"""Every checkpoint carries its family's recommended decoding (generation_config.json, and BLIP-2's
caption_generation_config.json); eval, pipelines and the Space decode with it, and explicit arguments still win."""

import json

import pytest
import torch
from transformers import AutoModel, AutoModelForImageTextToText, GenerationConfig

import hf_vlm  # noqa: F401
from hf_vlm.presets import get_config

LAVIS_VQA = {"num_beams": 5, "max_new_tokens": 10, "min_new_tokens": 1, "length_penalty": -1.0}
LAVIS_CAPTION = {"num_beams": 5, "max_new_tokens": 30, "min_new_tokens": 8}
OPEN_CLIP_CAPTION = {"num_beams": 6, "max_new_tokens": 29, "min_new_tokens": 4}


def subset(config: dict, keys) -> dict:
    return {k: config.get(k) for k in keys}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("generation")
    torch.manual_seed(0)
    AutoModel.from_config(get_config("coca-tiny")).save_pretrained(root / "coca")
    AutoModelForImageTextToText.from_config(get_config("blip2-tiny")).save_pretrained(root / "blip2")
    return root


def test_checkpoints_carry_the_familys_published_decoding(saved):
    coca = json.loads((saved / "coca" / "generation_config.json").read_text())
    assert subset(coca, OPEN_CLIP_CAPTION) == OPEN_CLIP_CAPTION and coca["eos_token_id"] == 1
    blip2 = json.loads((saved / "blip2" / "generation_config.json").read_text())
    assert subset(blip2, LAVIS_VQA) == LAVIS_VQA and blip2["decoder_start_token_id"] == 0
    caption = GenerationConfig.from_pretrained(saved / "blip2", "caption_generation_config.json")
    assert subset(caption.to_dict(), LAVIS_CAPTION) == LAVIS_CAPTION and caption.eos_token_id == 1


def test_a_loaded_checkpoint_decodes_with_it_and_explicit_arguments_win(saved):
    model = AutoModel.from_pretrained(saved / "coca").eval()
    assert model.generation_config.num_beams == 6
    pixel_values = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        recommended = model.generate(pixel_values=pixel_values)
        beams = model.generate(pixel_values=pixel_values, **OPEN_CLIP_CAPTION)
        short = model.generate(pixel_values=pixel_values, num_beams=1, max_new_tokens=2, min_new_tokens=0)
    torch.testing.assert_close(recommended, beams)
    assert short.shape[1] <= 1 + 2  # the start token and at most the 2 new tokens asked for


def test_settings_a_user_made_are_saved_instead_of_the_recommended_ones(saved, tmp_path):
    model = AutoModel.from_pretrained(saved / "coca")
    model.generation_config.num_beams = 3
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "generation_config.json").read_text())
    assert written["num_beams"] == 3 and written["max_new_tokens"] == 29


def test_eval_and_the_space_take_each_tasks_decoding_with_explicit_arguments_on_top(saved):
    from hf_vlm.evaluation.decoding import generation_config_for

    blip2 = AutoModelForImageTextToText.from_pretrained(saved / "blip2")
    vqa, caption = generation_config_for(blip2, "vqa"), generation_config_for(blip2, "caption")
    assert subset(vqa.to_dict(), LAVIS_VQA) == LAVIS_VQA
    assert subset(caption.to_dict(), LAVIS_CAPTION) == LAVIS_CAPTION
    explicit = generation_config_for(blip2, "caption", num_beams=1, max_new_tokens=4, min_new_tokens=None)
    assert (explicit.num_beams, explicit.max_new_tokens, explicit.min_new_tokens) == (1, 4, 4)  # min follows max down
    assert blip2.generation_config.num_beams == 5  # the model's own config is left alone

    # A model built from a config (or a checkpoint from before these files) gets the family's recommendation.
    fresh = AutoModel.from_config(get_config("coca-tiny"))
    assert subset(generation_config_for(fresh, "caption").to_dict(), OPEN_CLIP_CAPTION) == OPEN_CLIP_CAPTION
