"""`hf-blip2` and `lavis-blip2` conversions, proven against transformers' BLIP-2.

transformers' `Blip2ForConditionalGeneration` with a T5 language model, random weights from a fixed seed,
saved with save_pretrained, converted, loaded with `AutoModel`: the logits match (fp32, atol 1e-4) and
greedy generation gives the same tokens, for a prompt-free caption and a VQA prompt, batch 2. Also a config
with blip2-flan-t5-xl's real widths and two layers per stack, so every full-size shape is converted.
LAVIS: state dicts in LAVIS's layout (built here from the documented key names, q_bias/v_bias included)
convert, with every tensor where the transformers layout puts it.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from hf_vlm.testing import run_python_without_hf_vlm

ATOL = 1e-4
TINY_VISION = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                   patch_size=8, qkv_bias=True)
TINY_QFORMER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                    encoder_hidden_size=64)
TINY_T5 = dict(vocab_size=96, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
               feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
               decoder_start_token_id=0)


def randomize_(model, seed: int):
    """Every parameter from a fixed seed (transformers' init leaves biases zero and norms one, which would
    hide a swapped bias or norm); norm weights around 1, matrices scaled by fan-in."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            is_norm_weight = param.dim() == 1 and "norm" in name.lower() and name.endswith("weight")
            std = 0.1 if param.dim() < 2 else param.shape[-1] ** -0.5
            param.copy_((1.0 if is_norm_weight else 0.0) + std * torch.randn(param.shape, generator=generator))
    return model.eval()


def transformers_blip2(vision, qformer, t5, num_query_tokens, image_token_index, seed=0):
    """transformers' BLIP-2 with FlanT5's separate (untied) lm_head, as the published checkpoints have."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, T5Config

    config = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=T5Config(**t5).to_dict(),
                         num_query_tokens=num_query_tokens, image_token_index=image_token_index)
    model = Blip2ForConditionalGeneration(config)
    language_model = model.language_model
    language_model.lm_head.weight = torch.nn.Parameter(torch.empty_like(language_model.shared.weight))
    return randomize_(model, seed)


def with_image_tokens(model, input_ids, attention_mask):
    """transformers 5 expects num_query_tokens `<image>` placeholders in front of the prompt."""
    batch, queries = input_ids.shape[0], model.config.num_query_tokens
    image_ids = torch.full((batch, queries), model.config.image_token_index)
    return torch.cat([image_ids, input_ids], 1), torch.cat([torch.ones(batch, queries, dtype=torch.long), attention_mask], 1)


@torch.no_grad()
def compare(reference, converted, pixel_values, prompt, prompt_mask, max_new_tokens=8) -> dict:
    """Max abs logit difference (prompt + teacher-forced decoder tokens) and the greedy outputs of both, for the
    prompt and for no prompt (LAVIS/T5's empty prompt is a lone </s>, which our model uses without input_ids)."""
    eos = reference.config.text_config.eos_token_id
    decoder_input_ids = torch.tensor([[0, 4, 5, 6]] * pixel_values.shape[0])
    ids, mask = with_image_tokens(reference, prompt, prompt_mask)
    ref_logits = reference(pixel_values=pixel_values, input_ids=ids, attention_mask=mask,
                           decoder_input_ids=decoder_input_ids).logits
    our_logits = converted(pixel_values=pixel_values, input_ids=prompt, attention_mask=prompt_mask,
                           decoder_input_ids=decoder_input_ids).logits
    greedy = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    vqa = (reference.generate(pixel_values=pixel_values, input_ids=ids, attention_mask=mask, **greedy),
           converted.generate(pixel_values=pixel_values, input_ids=prompt, attention_mask=prompt_mask, **greedy))
    lone_eos = torch.full((pixel_values.shape[0], 1), eos)
    ids, mask = with_image_tokens(reference, lone_eos, torch.ones_like(lone_eos))
    caption = (reference.generate(pixel_values=pixel_values, input_ids=ids, attention_mask=mask, **greedy),
               converted.generate(pixel_values=pixel_values, **greedy))
    return {"logits": (ref_logits - our_logits).abs().max().item(), "vqa": vqa, "caption": caption}


def assert_parity(result):
    print(f"max abs logit diff {result['logits']:.2e}")
    assert result["logits"] <= ATOL
    for task in ("vqa", "caption"):
        expected, generated = result[task]
        assert generated.tolist() == expected.tolist(), task
        assert expected.shape[1] > 2 and len({tuple(r) for r in expected.tolist()}) > 1, f"degenerate {task} test"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, t5_tokenizer_dir):
    """(transformers model, its folder with tokenizer, the converted folder, the summary)."""
    from hf_vlm.conversion.hf_blip2 import convert

    root = tmp_path_factory.mktemp("blip2_tiny")
    reference = transformers_blip2(TINY_VISION, TINY_QFORMER, TINY_T5, num_query_tokens=8, image_token_index=95)
    reference.save_pretrained(root / "transformers")
    for path in t5_tokenizer_dir.iterdir():
        shutil.copy(path, root / "transformers" / path.name)
    summary = convert(root / "transformers", root / "converted", progress=False)
    return reference, root, summary


def _inputs(seed=1):
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(2, 3, 32, 32, generator=generator)
    prompt = torch.tensor([[5, 6, 7, 8, 1], [9, 10, 1, 0, 0]])  # "Question: ... Answer:" </s>, right-padded
    return pixel_values, prompt, (prompt != 0).long()


def test_tiny_transformers_blip2_converts_every_tensor(tiny):
    reference, root, summary = tiny
    assert summary.source_tensors == len(reference.state_dict()) - 2  # save_pretrained leaves out T5's tied copies
    assert summary.dropped == {}
    # transformers' fused qkv bias (3 x 64 per vision layer) becomes EVA's q_bias + v_bias (2 x 64)
    assert summary.parameters == sum(p.numel() for p in reference.parameters()) - 2 * 64
    config = json.loads((root / "converted" / "config.json").read_text())
    assert config["model_type"] == "blip2_flant5" and config["vision_config"]["ln_vision_eps"] == 1e-6


def test_tiny_logits_and_greedy_captions_and_answers_match_transformers(tiny):
    from transformers import AutoModel

    reference, root, _ = tiny
    converted = AutoModel.from_pretrained(root / "converted").eval()
    assert_parity(compare(reference, converted, *_inputs()))


@pytest.mark.parametrize("scale_decoder_outputs", [False, True])
def test_a_blip2_saved_with_t5s_tied_lm_head_converts_with_parity(tmp_path, t5_tokenizer_dir, scale_decoder_outputs):
    """Issue 16.10: `Blip2ForConditionalGeneration` built from a config (transformers 5.23 ties T5's lm_head to
    `shared`) saves no `language_model.lm_head.weight`. Converted from its config as written: FlanT5-style
    (`tie_word_embeddings=False`, which T5Config turns into `scale_decoder_outputs=False` and a tied head) and
    original-T5 style (tied and scaled); the converted model computes what the source does."""
    from transformers import AutoModel, Blip2Config, Blip2ForConditionalGeneration, T5Config

    from hf_vlm.conversion.hf_blip2 import convert

    t5 = dict(TINY_T5) if not scale_decoder_outputs else {k: v for k, v in TINY_T5.items() if k != "tie_word_embeddings"}
    config = Blip2Config(vision_config=TINY_VISION, qformer_config=TINY_QFORMER, text_config=T5Config(**t5).to_dict(),
                         num_query_tokens=8, image_token_index=95)
    reference = randomize_(Blip2ForConditionalGeneration(config), seed=3)
    assert reference.language_model.lm_head.weight is reference.language_model.shared.weight
    assert reference.config.text_config.scale_decoder_outputs is scale_decoder_outputs
    reference.save_pretrained(tmp_path / "transformers")
    for path in t5_tokenizer_dir.iterdir():
        shutil.copy(path, tmp_path / "transformers" / path.name)
    convert(tmp_path / "transformers", tmp_path / "converted", progress=False)
    converted = AutoModel.from_pretrained(tmp_path / "converted").eval()
    assert converted.config.text_config.scale_decoder_outputs is scale_decoder_outputs
    assert_parity(compare(reference, converted, *_inputs()))


def test_converted_blip2_loads_with_trust_remote_code_without_hf_vlm(tiny, tmp_path):
    reference, root, _ = tiny
    pixel_values, prompt, mask = _inputs()
    ids, full_mask = with_image_tokens(reference, prompt, mask)
    decoder_input_ids = torch.tensor([[0, 4, 5, 6]] * 2)
    with torch.no_grad():
        expected = reference(pixel_values=pixel_values, input_ids=ids, attention_mask=full_mask,
                             decoder_input_ids=decoder_input_ids).logits
    torch.save({"pixel_values": pixel_values, "prompt": prompt, "mask": mask, "decoder_input_ids": decoder_input_ids,
                "logits": expected}, tmp_path / "reference.pt")
    code = f"""
import torch
from transformers import AutoModel, AutoProcessor
data = torch.load({str(tmp_path / "reference.pt")!r})
model = AutoModel.from_pretrained({str(root / "converted")!r}, trust_remote_code=True).eval()
assert "hf_vlm" not in type(model).__module__, type(model).__module__
AutoProcessor.from_pretrained({str(root / "converted")!r}, trust_remote_code=True)
with torch.no_grad():
    logits = model(pixel_values=data["pixel_values"], input_ids=data["prompt"], attention_mask=data["mask"],
                   decoder_input_ids=data["decoder_input_ids"]).logits
print((logits - data["logits"]).abs().max().item())
"""
    proc = run_python_without_hf_vlm(code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout.strip().splitlines()[-1]) <= ATOL


def test_non_t5_blip2_is_refused_with_a_clear_error(tmp_path):
    from transformers import Blip2Config

    from hf_vlm.cli import main

    Blip2Config(vision_config=TINY_VISION, qformer_config=TINY_QFORMER,
                text_config={"model_type": "opt", "hidden_size": 64, "num_hidden_layers": 1, "ffn_dim": 128,
                             "num_attention_heads": 4, "vocab_size": 96}).save_pretrained(tmp_path / "opt")
    torch.save({"query_tokens": torch.zeros(1)}, tmp_path / "opt" / "pytorch_model.bin")
    assert main(["convert", "hf-blip2", str(tmp_path / "opt"), str(tmp_path / "out")]) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_real_blip2_flan_t5_xl_widths_with_two_layers_match_transformers(tmp_path, t5_tokenizer_dir):
    """Every full-size shape (EVA ViT-g 1408/6144/16 heads at 224 px, BERT-base Q-Former with 32 queries,
    FlanT5-XL 2048/5120/32 heads, vocab 32128) through the converter, with two layers per stack."""
    from transformers import AutoModel

    from hf_vlm.conversion.hf_blip2 import convert
    from hf_vlm.presets import get_config

    reference = transformers_blip2(
        dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=2, num_attention_heads=16, image_size=224,
             patch_size=14, qkv_bias=True, layer_norm_eps=1e-6),
        dict(hidden_size=768, num_hidden_layers=2, num_attention_heads=12, intermediate_size=3072,
             encoder_hidden_size=1408, cross_attention_frequency=2),
        dict(TINY_T5, vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_heads=32),
        num_query_tokens=32, image_token_index=32100, seed=3,
    )
    reference.save_pretrained(tmp_path / "transformers")
    for path in t5_tokenizer_dir.iterdir():
        shutil.copy(path, tmp_path / "transformers" / path.name)
    convert(tmp_path / "transformers", tmp_path / "converted", max_shard_size="500MB", progress=False)
    shutil.rmtree(tmp_path / "transformers")
    converted = AutoModel.from_pretrained(tmp_path / "converted").eval()
    full = get_config("blip2-flan-t5-xl")
    ours = converted.config
    for sub, fields in {"vision_config": ("hidden_size", "intermediate_size", "num_attention_heads", "image_size",
                                          "patch_size", "layer_norm_eps", "ln_vision_eps"),
                        "qformer_config": ("hidden_size", "intermediate_size", "num_attention_heads",
                                           "cross_attention_frequency", "vocab_size", "dec_token_id"),
                        "text_config": ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "feed_forward_proj")}.items():
        for field in fields:
            assert getattr(getattr(ours, sub), field) == getattr(getattr(full, sub), field), (sub, field)
    assert ours.num_query_tokens == full.num_query_tokens
    pixel_values = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    prompt = torch.tensor([[37, 1591, 10, 125, 1], [363, 19, 1, 0, 0]])
    assert_parity(compare(reference, converted, pixel_values, prompt, (prompt != 0).long(), max_new_tokens=4))


# --------------------------------------------------------------------------------------------------
# LAVIS


def lavis_layout(transformers_state: dict) -> tuple[dict, dict]:
    """A transformers BLIP-2 state dict in LAVIS's names (REFERENCE.md): (stage-2 checkpoint, EVA ViT-g file).

    LAVIS keeps EVA's q_bias / v_bias (no key bias) where transformers fuses cat(q_bias, 0, v_bias); the EVA
    file has no prefix and one block more than BLIP-2 uses (EVA's 40th)."""
    import re

    stage2, vision = {}, {}
    for key, tensor in transformers_state.items():
        if key.startswith("vision_model."):
            name = key.removeprefix("vision_model.")
            name = {"embeddings.class_embedding": "cls_token", "embeddings.position_embedding": "pos_embed",
                    "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
                    "embeddings.patch_embedding.bias": "patch_embed.proj.bias"}.get(name, name)
            if name.startswith("post_layernorm."):
                stage2[name.replace("post_layernorm", "ln_vision")] = tensor
                continue
            name = re.sub(r"encoder\.layers\.(\d+)\.", r"blocks.\1.", name)
            name = name.replace("layer_norm1", "norm1").replace("layer_norm2", "norm2")
            name = name.replace("self_attn.projection", "attn.proj").replace("self_attn.qkv", "attn.qkv")
            if name.endswith("attn.qkv.bias"):
                q_bias, _, v_bias = tensor.chunk(3)
                vision[name.replace("qkv.bias", "q_bias")] = q_bias.clone()
                vision[name.replace("qkv.bias", "v_bias")] = v_bias.clone()
            else:
                vision[name] = tensor
        elif key.startswith("qformer."):
            name = key.replace("qformer.layernorm", "qformer.bert.embeddings.LayerNorm")
            name = name.replace("qformer.encoder", "qformer.bert.encoder").replace(".attention.attention.", ".attention.self.")
            name = name.replace(".crossattention.attention.", ".crossattention.self.")
            stage2["Q" + name[1:]] = tensor  # Qformer.bert...
        elif key.startswith("language_projection."):
            stage2[key.replace("language_projection", "t5_proj")] = tensor
        elif key == "query_tokens":
            stage2[key] = tensor
    stage2["Qformer.bert.embeddings.position_ids"] = torch.arange(512)[None]
    last = max(int(k.split(".")[1]) for k in vision if k.startswith("blocks."))
    for key in [k for k in vision if k.startswith(f"blocks.{last}.")]:
        vision[key.replace(f"blocks.{last}.", f"blocks.{last + 1}.")] = torch.randn_like(vision[key])
    return stage2, vision


def test_lavis_stage2_lands_every_tensor_where_the_transformers_layout_puts_it(tiny, tmp_path):
    import copy

    from safetensors import safe_open

    from hf_vlm.cli import main

    reference, root, _ = tiny
    reference = copy.deepcopy(reference)
    with torch.no_grad():  # LAVIS has no key bias: the transformers model it corresponds to has zeros there
        for layer in reference.vision_model.encoder.layers:
            layer.self_attn.qkv.bias[64:128] = 0
    transformers_state = reference.state_dict()
    stage2, vision = lavis_layout(transformers_state)
    assert "Qformer.bert.encoder.layer.0.attention.self.query.weight" in stage2
    assert "blocks.0.attn.q_bias" in vision and "blocks.0.attn.v_bias" in vision
    torch.save({"model": stage2}, tmp_path / "blip2_pretrained_flant5xl.pth")
    torch.save(vision, tmp_path / "eva_vit_g.pth")
    reference.language_model.save_pretrained(tmp_path / "flan-t5")
    for path in (root / "transformers").glob("*token*"):
        shutil.copy(path, tmp_path / "flan-t5" / path.name)
    shutil.copy(root / "transformers" / "spiece.model", tmp_path / "flan-t5" / "spiece.model")

    assert main(["convert", "lavis-blip2", str(tmp_path / "blip2_pretrained_flant5xl.pth"), str(tmp_path / "out"),
                 "--vision", str(tmp_path / "eva_vit_g.pth"), "--language-model", str(tmp_path / "flan-t5"),
                 "--preset", "blip2-tiny", "--no-progress"]) == 0

    from hf_vlm.conversion.hf_blip2 import convert as convert_transformers

    convert_transformers(root / "transformers", tmp_path / "via-transformers", progress=False)

    def tensors(folder):
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    from_lavis, from_transformers = tensors(tmp_path / "out"), tensors(tmp_path / "via-transformers")
    assert from_lavis.keys() == from_transformers.keys()
    layers = reference.vision_model.encoder.layers
    for key, tensor in from_transformers.items():
        if key.endswith(("attn.q_bias", "attn.v_bias")):
            i = int(key.split(".")[2])
            fused = layers[i].self_attn.qkv.bias.detach()  # transformers' cat(q_bias, 0, v_bias)
            q, v = from_lavis[key.replace("v_bias", "q_bias")], from_lavis[key.replace("q_bias", "v_bias")]
            assert torch.equal(torch.cat([q, torch.zeros_like(q), v]), fused), key
            continue
        assert torch.equal(from_lavis[key], tensor), key
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vision_config"]["ln_vision_eps"] == 1e-5  # LAVIS's ln_vision


def test_lavis_stage1_converts_with_its_heads_and_gives_the_same_similarities(tmp_path):
    """A stage-1 model's weights, renamed to LAVIS (BERT's `attention.self`, `Qformer.cls.predictions`, the tied
    decoder weight and bias duplicated as LAVIS saves them), convert back to the same model."""
    from transformers import AutoModelForPreTraining

    from hf_vlm.conversion.lavis_blip2 import convert
    from hf_vlm.modeling.blip2_flant5 import Blip2FlanT5ForPretraining
    from hf_vlm.presets import get_config

    config = get_config("blip2-tiny")
    config.vision_config.ln_vision_eps = 1e-5
    original = randomize_(Blip2FlanT5ForPretraining(config), seed=5)
    state = original.state_dict()
    lavis, vision = {}, {}
    for key, tensor in state.items():
        if key.startswith("vision_model."):
            vision[key.removeprefix("vision_model.")] = tensor
        elif key.startswith("qformer.embeddings."):
            lavis[key.replace("qformer.embeddings.", "Qformer.bert.embeddings.")] = tensor
        elif key.startswith("qformer.layernorm."):
            lavis[key.replace("qformer.layernorm.", "Qformer.bert.embeddings.LayerNorm.")] = tensor
        elif key.startswith("qformer.encoder."):
            name = key.replace("qformer.encoder.", "Qformer.bert.encoder.")
            lavis[name.replace(".attention.attention.", ".attention.self.").replace(".crossattention.attention.", ".crossattention.self.")] = tensor
        elif key.startswith("lm_head.transform."):
            lavis[key.replace("lm_head.", "Qformer.cls.predictions.")] = tensor
        elif key == "lm_head.decoder.bias":
            lavis["Qformer.cls.predictions.decoder.bias"] = tensor
            lavis["Qformer.cls.predictions.bias"] = tensor
        elif key == "lm_head.decoder.weight":
            lavis["Qformer.cls.predictions.decoder.weight"] = tensor
        else:  # query_tokens, ln_vision, vision_proj, text_proj, itm_head, temp
            lavis[key] = tensor
    lavis["Qformer.bert.embeddings.position_ids"] = torch.arange(64)[None]
    torch.save({"model": lavis, "epoch": 9}, tmp_path / "blip2_pretrained.pth")
    torch.save(vision, tmp_path / "eva_vit_g.pth")

    summary = convert(tmp_path / "blip2_pretrained.pth", tmp_path / "stage1", vision=str(tmp_path / "eva_vit_g.pth"),
                      preset="blip2-tiny", progress=False)
    assert summary.dropped == {
        "BERT's position-id buffer (0..n-1, rebuilt by the model)": 1,
        "the ITG head's vocabulary projection, tied to Qformer.bert.embeddings.word_embeddings.weight": 1,
        "the same tensor as Qformer.cls.predictions.decoder.bias (BERT ties them)": 1,
    }
    converted = AutoModelForPreTraining.from_pretrained(tmp_path / "stage1").eval()
    for key, tensor in state.items():
        assert torch.equal(converted.state_dict()[key], tensor), key
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    input_ids = torch.tensor([[101, 7, 8, 102], [101, 9, 102, 0]])
    with torch.no_grad():
        expected = original(pixel_values, input_ids, (input_ids != 0).long(), return_loss=False)
        got = converted(pixel_values, input_ids, (input_ids != 0).long(), return_loss=False)
    assert torch.equal(got.logits_per_image, expected.logits_per_image)


def test_lavis_stage2_without_its_parts_names_what_to_pass(tmp_path):
    from hf_vlm.conversion.errors import ConversionError
    from hf_vlm.conversion.lavis_blip2 import convert

    torch.save({"model": {"t5_proj.weight": torch.zeros(2, 2)}}, tmp_path / "stage2.pth")
    with pytest.raises(ConversionError, match="needs --language-model"):
        convert(tmp_path / "stage2.pth", tmp_path / "out", progress=False)
    with pytest.raises(ConversionError, match=r"no visual_encoder\.\* tensors .*pass --vision"):
        convert(tmp_path / "stage2.pth", tmp_path / "out", language_model=str(tmp_path / "flan-t5"), progress=False)
    torch.save({"model": {"decoder.weight": torch.zeros(2, 2)}}, tmp_path / "other.pth")
    with pytest.raises(ConversionError, match="neither a LAVIS BLIP-2 stage-1"):
        convert(tmp_path / "other.pth", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
