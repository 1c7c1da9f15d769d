"""`open-clip-coca` conversion, proven against open_clip itself: an open_clip CoCa with random weights
(fixed seed) is saved the way open_clip saves it, converted, loaded with `AutoModel`, and must give the
same image/text embeddings and caption logits (fp32, atol 1e-4) and the same greedy captions as
open_clip's own top-k=1 loop over its forward (open_clip's `generate` cannot import under
transformers 5, see REFERENCE.md). Architectures: a tiny custom config, the full-size coca_ViT-B-32,
and coca_ViT-L-14 (slow).
"""

from __future__ import annotations

import json

import pytest
import torch

from hf_vlm.testing import randomize_open_clip_coca_, require, run_python_without_hf_vlm

open_clip = require("open_clip", "pip install open_clip_torch  (a dev dependency: pip install -e '.[dev]')")

ATOL = 1e-4
SOT, EOT, OPEN_CLIP_PAD = 49406, 49407, 0

TINY_OPEN_CLIP_CONFIG = {  # vision width == embed_dim: the pooler's attention packs q/k/v (in_proj_weight)
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32,
                   "attentional_pool": True, "attn_pooler_queries": 8, "attn_pooler_heads": 2, "output_tokens": True},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2,
                 "embed_cls": True, "output_tokens": True},
    "multimodal_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2,
                       "attn_pooler_heads": 2},
    "custom_text": True,
}
CAPTIONS = ["a photo of a cat", "two dogs playing in the snow", "a red circle left of a blue square"]


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    return randomize_open_clip_coca_(model, seed, pad_token_id=OPEN_CLIP_PAD).eval()


def open_clip_tiny(folder):
    """A Hub-style open_clip folder: open_clip_config.json + open_clip_model.safetensors."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": TINY_OPEN_CLIP_CONFIG, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    ))
    model = randomize_(open_clip.create_model(f"local-dir:{folder}"), seed=0)
    save_file(model.state_dict(), str(folder / "open_clip_model.safetensors"))
    return model


def save_as_training_checkpoint(model, path):
    """What open_clip's training script writes: {"epoch", "state_dict" with DDP's `module.` prefix, ...}."""
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 3, "name": "coca-run", "state_dict": state}, path)


def open_clip_greedy(model, images, max_new_tokens: int) -> torch.Tensor:
    """open_clip's `generate(generation_type="top_k", top_k=1)` loop, minus its transformers imports:
    re-run the forward on the whole prefix, take the argmax, append; finished rows get padding."""
    image_latent, image_embs = model._encode_image(images)
    out = torch.full((images.shape[0], 1), SOT)
    for _ in range(max_new_tokens):
        logits = model(images, out, image_latent=image_latent, image_embs=image_embs, output_labels=False)["logits"][:, -1]
        finished = (out[:, -1] == EOT) | (out[:, -1] == OPEN_CLIP_PAD)
        if finished.all():
            break
        out = torch.cat([out, torch.where(finished, OPEN_CLIP_PAD, logits.argmax(-1))[:, None]], dim=1)
    return out


def until_eot(row: torch.Tensor) -> list[int]:
    ids = row.tolist()
    return ids[: ids.index(EOT) + 1] if EOT in ids else ids


@torch.no_grad()
def parity(reference, converted, images, texts) -> dict[str, float]:
    """Max abs differences of embeddings, similarity logits and caption logits (non-padding positions:
    open_clip's decoder does not mask padding, ours does; both are causal, so real tokens agree)."""
    ref = reference(images, texts, output_labels=False)
    ours = converted(input_ids=texts, pixel_values=images, attention_mask=(texts != OPEN_CLIP_PAD).long())
    real = texts != OPEN_CLIP_PAD
    ref_logits_per_image = ref["logit_scale"] * ref["image_features"] @ ref["text_features"].t()
    return {
        "image_embeds": (ref["image_features"] - ours.image_embeds).abs().max().item(),
        "text_embeds": (ref["text_features"] - ours.text_embeds).abs().max().item(),
        "logits_per_image": (ref_logits_per_image - ours.logits_per_image).abs().max().item(),
        "caption_logits": (ref["logits"] - ours.logits)[real].abs().max().item(),
    }


def assert_parity(diffs: dict[str, float]) -> None:
    print("max abs diff:", {k: f"{v:.2e}" for k, v in diffs.items()})
    for name, diff in diffs.items():
        assert diff <= ATOL, (name, diff)


def assert_same_greedy_captions(reference, converted, images, max_new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        expected = open_clip_greedy(reference, images, max_new_tokens)
        generated = converted.generate(pixel_values=images, max_new_tokens=max_new_tokens, do_sample=False,
                                       num_beams=1)
    assert all(len(until_eot(row)) > 1 for row in expected), "degenerate test: a caption without any token"
    assert [until_eot(r) for r in generated] == [until_eot(r) for r in expected]
    return expected


# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(open_clip model, its Hub-style folder, the converted folder, images, tokenized captions)."""
    from hf_vlm.conversion.open_clip_coca import convert

    root = tmp_path_factory.mktemp("coca_tiny")
    reference = open_clip_tiny(root / "open_clip")
    summary = convert(root / "open_clip", root / "converted", progress=False)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    texts = open_clip.get_tokenizer("coca_ViT-B-32", context_length=16)(CAPTIONS)
    return reference, root, summary, images, texts


def test_tiny_open_clip_coca_converts_with_every_tensor_accounted_for(tiny):
    reference, root, summary, _, _ = tiny
    assert summary.source_tensors == len(reference.state_dict()) and summary.dropped == {}
    assert summary.parameters == sum(p.numel() for p in reference.parameters())
    config = json.loads((root / "converted" / "config.json").read_text())
    assert config["legacy_cls_mask"] is True and config["vision_config"]["separate_contrastive_query"] is False
    assert config["projection_dim"] == 64 and config["text_config"]["max_position_embeddings"] == 17


def test_tiny_embeddings_and_caption_logits_match_open_clip(tiny):
    from transformers import AutoModel

    reference, root, _, images, texts = tiny
    converted = AutoModel.from_pretrained(root / "converted").eval()
    assert_parity(parity(reference, converted, images, texts))


def test_tiny_greedy_captions_are_open_clips_tokens(tiny):
    from transformers import AutoModel

    reference, root, _, images, _ = tiny
    converted = AutoModel.from_pretrained(root / "converted").eval()
    assert_same_greedy_captions(reference, converted, images, max_new_tokens=10)


def test_converted_processor_tokenizes_like_open_clip_and_keeps_the_preprocessing(tiny):
    from transformers import AutoProcessor

    _, root, _, _, texts = tiny
    processor = AutoProcessor.from_pretrained(root / "converted")
    for caption, row in zip(CAPTIONS, texts):
        assert processor.tokenizer(caption)["input_ids"] == [t for t in row.tolist() if t != OPEN_CLIP_PAD]
    assert list(processor.image_processor.image_mean) == [0.5, 0.5, 0.5]  # from open_clip_config.json
    assert processor.image_processor.crop_size == {"height": 32, "width": 32}


def test_converted_coca_loads_with_trust_remote_code_without_hf_vlm(tiny, tmp_path):
    reference, root, _, images, texts = tiny
    with torch.no_grad():
        expected = reference(images, texts, output_labels=False)
    torch.save({"images": images, "texts": texts, "image_features": expected["image_features"],
                "text_features": expected["text_features"]}, tmp_path / "reference.pt")
    code = f"""
import torch
from transformers import AutoModel
data = torch.load({str(tmp_path / "reference.pt")!r})
model = AutoModel.from_pretrained({str(root / "converted")!r}, trust_remote_code=True).eval()
assert "hf_vlm" not in type(model).__module__, type(model).__module__
with torch.no_grad():
    out = model(input_ids=data["texts"], pixel_values=data["images"], attention_mask=(data["texts"] != 0).long())
print(max((out.image_embeds - data["image_features"]).abs().max().item(),
          (out.text_embeds - data["text_features"]).abs().max().item()))
"""
    proc = run_python_without_hf_vlm(code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout.strip().splitlines()[-1]) <= ATOL


def test_cli_converts_a_training_checkpoint_with_a_json_model_config_to_bfloat16(tiny, tmp_path, capsys):
    from transformers import AutoModel

    from hf_vlm.cli import main

    reference, _, _, images, texts = tiny
    save_as_training_checkpoint(reference, tmp_path / "epoch_3.pt")
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
    argv = ["convert", "open-clip-coca", str(tmp_path / "epoch_3.pt"), str(tmp_path / "out"),
            "--model-config", str(tmp_path / "tiny.json"), "--dtype", "bfloat16", "--no-progress"]
    assert main(argv) == 0
    assert "dtype:       bfloat16" in capsys.readouterr().out
    converted = AutoModel.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    # bf16 storage: the same model to bf16 precision
    diffs = parity(reference, converted, images, texts)
    assert diffs["image_embeds"] < 0.05 and diffs["text_embeds"] < 0.05, diffs


def test_cli_errors_name_what_is_wrong(tmp_path, capsys):
    from hf_vlm.cli import main

    torch.save({"visual.proj": torch.zeros(2, 2)}, tmp_path / "weights.bin")
    assert main(["convert", "open-clip-coca", str(tmp_path / "weights.bin"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "no open_clip_config.json in" in err and "pass --model-config" in err

    (tmp_path / "clip.json").write_text(json.dumps({"embed_dim": 512, "vision_cfg": {}, "text_cfg": {}}))
    assert main(["convert", "open-clip-coca", str(tmp_path / "weights.bin"), str(tmp_path / "out"),
                 "--model-config", str(tmp_path / "clip.json")]) == 1
    err = capsys.readouterr().err
    assert "vision_cfg.attentional_pool=None" in err and "no multimodal_cfg" in err

    # the architecture is fine, the weights are not all there
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
    assert main(["convert", "open-clip-coca", str(tmp_path / "weights.bin"), str(tmp_path / "out"),
                 "--model-config", str(tmp_path / "tiny.json")]) == 1
    err = capsys.readouterr().err
    assert "key accounting failed" in err and "target keys of the model have no source" in err
    assert "visual_projection.weight: converted shape (2, 2)" not in err  # accounting fails before shapes
    assert not (tmp_path / "out").exists()


def test_shape_mismatch_between_weights_and_config_names_key_and_shapes(tiny, tmp_path):
    from hf_vlm.conversion.errors import ShapeMismatchError
    from hf_vlm.conversion.open_clip_coca import convert

    reference, root, _, _, _ = tiny
    wrong = {**TINY_OPEN_CLIP_CONFIG, "vision_cfg": {**TINY_OPEN_CLIP_CONFIG["vision_cfg"], "attn_pooler_queries": 12}}
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    with pytest.raises(ShapeMismatchError, match=r"vision_model\.attn_pool\.query: converted shape \(8, 64\).*expected shape \(12, 64\)"):
        convert(root / "open_clip" / "open_clip_model.safetensors", tmp_path / "out",
                model_config=str(tmp_path / "wrong.json"), progress=False)


def test_sin_cos_2d_position_embedding_converts_fixed_and_matches_open_clip(tmp_path):
    """open_clip's `pos_embed_type="sin_cos_2d"` (fixed coordinates, no gradient) converts to our option of that
    name: the same embedding, outputs within ATOL, and still fixed after loading."""
    from safetensors.torch import save_file

    from hf_vlm.conversion.open_clip_coca import convert
    from hf_vlm.modeling.coca import CocaModel

    folder = tmp_path / "open_clip"
    folder.mkdir()
    model_cfg = {**TINY_OPEN_CLIP_CONFIG, "vision_cfg": {**TINY_OPEN_CLIP_CONFIG["vision_cfg"], "pos_embed_type": "sin_cos_2d"}}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    reference = open_clip.create_model(f"local-dir:{folder}")
    sin_cos = reference.visual.positional_embedding.detach().clone()
    assert not reference.visual.positional_embedding.requires_grad
    randomize_(reference, seed=4)
    with torch.no_grad():
        reference.visual.positional_embedding.copy_(sin_cos)  # the fixed values, as open_clip trains and saves them
    save_file(reference.state_dict(), str(folder / "open_clip_model.safetensors"))
    convert(folder, tmp_path / "converted", progress=False)

    converted = CocaModel.from_pretrained(tmp_path / "converted").eval()
    assert converted.config.vision_config.pos_embed_type == "sin_cos_2d"
    pos_embed = converted.vision_model.trunk.pos_embed
    assert not pos_embed.requires_grad and torch.equal(pos_embed[0], sin_cos)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    texts = open_clip.get_tokenizer("coca_ViT-B-32", context_length=16)(CAPTIONS[:2])
    assert_parity(parity(reference, converted, images, texts))


# --------------------------------------------------------------------------------------------------
# full-size architectures


def _full_size(name: str, tmp_path, seed: int):
    """open_clip's `name` with random weights, saved as a training checkpoint and converted by name."""
    from transformers import AutoModel

    from hf_vlm.conversion.open_clip_coca import convert

    reference = randomize_(open_clip.create_model(name), seed=seed)
    save_as_training_checkpoint(reference, tmp_path / "checkpoint.pt")
    summary = convert(tmp_path / "checkpoint.pt", tmp_path / "converted", model_config=name, progress=False)
    (tmp_path / "checkpoint.pt").unlink()
    converted = AutoModel.from_pretrained(tmp_path / "converted").eval()
    return reference, converted, summary


def _same_architecture_as_preset(converted_config, preset: str) -> None:
    from hf_vlm.presets import get_config

    expected = get_config(preset)
    ignore = {"transformers_version", "dtype", "architectures", "auto_map", "_name_or_path"}
    for sub in ("vision_config", "text_config", "multimodal_config"):
        ours = {k: v for k, v in getattr(converted_config, sub).to_dict().items() if k not in ignore}
        theirs = {k: v for k, v in getattr(expected, sub).to_dict().items() if k not in ignore}
        assert ours == theirs, sub
    for field in ("projection_dim", "legacy_cls_mask", "legacy_pad_token_id", "caption_loss_weight"):
        assert getattr(converted_config, field) == getattr(expected, field), field


def test_full_size_coca_vit_b_32_matches_open_clip(tmp_path):
    reference, converted, summary = _full_size("coca_ViT-B-32", tmp_path, seed=2)
    assert summary.parameters == sum(p.numel() for p in reference.parameters())
    _same_architecture_as_preset(converted.config, "coca-vit-b-32")
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    texts = open_clip.get_tokenizer("coca_ViT-B-32")(CAPTIONS[:2])
    assert_parity(parity(reference, converted, images, texts))
    assert_same_greedy_captions(reference, converted, images, max_new_tokens=5)


@pytest.mark.slow
def test_full_size_coca_vit_l_14_matches_open_clip(tmp_path):
    reference, converted, summary = _full_size("coca_ViT-L-14", tmp_path, seed=4)
    assert summary.parameters == sum(p.numel() for p in reference.parameters())
    _same_architecture_as_preset(converted.config, "coca-vit-l-14")
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    texts = open_clip.get_tokenizer("coca_ViT-L-14")(CAPTIONS[:2])
    assert_parity(parity(reference, converted, images, texts))
    assert_same_greedy_captions(reference, converted, images, max_new_tokens=3)
