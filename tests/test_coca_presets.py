"""CoCa presets and tokenizers: full-size presets equal open_clip's models (parameter counts on the meta
device), coca-vit-b-32 runs for real, and the tokenizers encode as open_clip / CoCa v2 expect."""

import pytest
import torch
import transformers

import hf_vlm  # noqa: F401  (registers the Auto classes)
from hf_vlm.modeling.coca import CocaModel, CocaProcessor
from hf_vlm.presets import get_config, list_presets
from hf_vlm.testing import TINY_CORPUS, random_image, require
from hf_vlm.tokenization import clip_tokenizer_from_open_clip, train_coca_tokenizer

OPEN_CLIP_EQUIVALENT = {"coca-vit-b-32": "coca_ViT-B-32", "coca-vit-l-14": "coca_ViT-L-14"}


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_model(name: str) -> CocaModel:
    with torch.device("meta"):
        return transformers.AutoModel.from_config(get_config(name))


def test_every_coca_preset_is_listed():
    assert {"coca-large-v2", "coca-vit-l-14", "coca-vit-b-32", "coca-tiny"} <= set(list_presets())


@pytest.mark.parametrize("preset", sorted(OPEN_CLIP_EQUIVALENT))
def test_open_clip_presets_have_open_clips_parameter_count(preset):
    open_clip = require("open_clip", "pip install open_clip_torch")
    config = open_clip.get_model_config(OPEN_CLIP_EQUIVALENT[preset])
    config.pop("custom_text", None)
    with torch.device("meta"):
        reference = open_clip.CoCa(**config)
    ours = meta_model(preset)
    assert count(ours) == count(reference)
    # and part by part, so a compensating error cannot hide
    assert count(ours.vision_model) + count(ours.visual_projection) == count(reference.visual)
    assert count(ours.text_model) + count(ours.text_projection) == count(reference.text)
    assert count(ours.text_decoder) + count(ours.lm_head) == count(reference.text_decoder)


def test_open_clip_published_size_and_v2_size():
    assert count(meta_model("coca-vit-l-14")) == 638_450_177  # open_clip coca_ViT-L-14, "638.45M"
    v2 = meta_model("coca-large-v2")
    text_layers = v2.config.text_config.num_hidden_layers, v2.config.multimodal_config.num_hidden_layers
    assert text_layers == (24, 24) and v2.config.hidden_size == 1024
    assert v2.lm_head.weight.shape == (32000, 1024) and v2.text_model.position_embedding.weight.shape[0] == 77
    assert v2.vision_model.attn_pool.query.shape == (256, 1024) and v2.vision_model.contrastive_pool is not None
    assert v2.config.contrastive_loss_weight == v2.config.caption_loss_weight == 1.0
    assert not v2.config.legacy_cls_mask
    assert count(v2) == 1_286_018_049


@pytest.mark.slow
def test_coca_vit_b_32_runs_forward_and_generate_on_cpu():
    torch.manual_seed(0)
    model = CocaModel(get_config("coca-vit-b-32")).eval()
    assert count(model) == 253_560_065
    processor = CocaProcessor.from_tokenizer(clip_tokenizer_from_open_clip(), image_size=224)
    batch = processor(images=[random_image(256, seed=i) for i in range(2)], text=["a photo of a cat", "a dog"],
                      padding=True, return_tensors="pt")
    assert batch["pixel_values"].shape == (2, 3, 224, 224)
    with torch.no_grad():
        out = model(**batch, return_loss=True)
        captions = model.generate(pixel_values=batch["pixel_values"], max_new_tokens=3, num_beams=2)
    assert out.logits.shape == (2, batch["input_ids"].shape[1], 49408) and torch.isfinite(out.loss)
    assert out.logits_per_image.shape == (2, 2)
    assert captions.shape[0] == 2 and (captions[:, 0] == 49406).all()


def test_clip_tokenizer_matches_open_clip():
    open_clip = require("open_clip", "pip install open_clip_torch")
    tokenizer = clip_tokenizer_from_open_clip()
    texts = ["a photo of a cat", "Hello, World! it's 2024 -- naïve café", "word " * 100]
    ours = tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt")
    reference = open_clip.get_tokenizer("coca_ViT-B-32")(texts)
    assert len(tokenizer) == 49408 and ours.input_ids.shape == reference.shape == (3, 76)
    real = ours.attention_mask.bool()
    assert torch.equal(real, reference != 0), "same tokens are padding (open_clip pads with 0)"
    assert torch.equal(ours.input_ids[real], reference[real])
    assert tokenizer.batch_decode(ours.input_ids[:1], skip_special_tokens=True) == ["a photo of a cat"]


def test_coca_v2_tokenizer_has_start_and_end_tokens_and_loads_as_a_plain_tokenizer(tmp_path):
    tokenizer = train_coca_tokenizer(TINY_CORPUS, vocab_size=96, output_dir=tmp_path)
    ids = tokenizer("a red circle above a blue square").input_ids
    assert ids[0] == 3 and ids[-1] == 1 and tokenizer.pad_token_id == 0
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a red circle above a blue square"
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert loaded("a red circle above a blue square").input_ids == ids
    assert (tmp_path / "spiece.model").is_file()
    config = get_config("coca-large-v2").text_config
    assert (config.pad_token_id, config.eos_token_id, config.bos_token_id) == (0, 1, 3)
