"""CoCa model on coca-tiny: outputs, losses, caption labels, cached generation, init, checkpointing."""

import pytest
import torch

import hf_vlm  # noqa: F401  (registers the Auto classes)
from hf_vlm.modeling.coca import CocaConfig, CocaModel
from hf_vlm.presets import get_config

BOS, EOS = 3, 1


def tiny_model(**overrides) -> CocaModel:
    torch.manual_seed(0)
    return CocaModel(get_config("coca-tiny", **overrides)).eval()


def sharpen(model: CocaModel) -> CocaModel:
    """Random CoCa weights give near-uniform next-token distributions; scaling the vocabulary projection
    makes generation depend clearly on the image and the prefix, so comparisons between decoding paths
    can fail."""
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
        for layer in model.text_decoder.layers:
            layer.cross_attn_block.cross_attn.out_proj.weight.mul_(20)
    return model


def batch(n=2, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(n, 3, 32, 32, generator=g)
    input_ids = torch.randint(4, 96, (n, length), generator=g)
    input_ids[:, 0] = BOS
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, length - 2 :] = 0  # the second caption is right-padded
    input_ids[1, length - 3] = EOS
    return pixel_values, input_ids, attention_mask


def test_forward_returns_contrastive_and_caption_outputs():
    model = tiny_model()
    pixel_values, input_ids, attention_mask = batch()
    out = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask)
    assert out.logits_per_image.shape == (2, 2) and torch.equal(out.logits_per_text, out.logits_per_image.t())
    assert out.logits.shape == (2, 7, model.config.text_config.vocab_size)
    assert torch.allclose(out.image_embeds.norm(dim=-1), torch.ones(2)), "forward embeds are L2-normalized"
    assert torch.allclose(out.text_embeds.norm(dim=-1), torch.ones(2))
    assert out.loss is None, "no loss unless asked"
    # the features API returns the projected, unnormalized embeddings (transformers CLIP v5 convention)
    image_features = model.get_image_features(pixel_values).pooler_output
    text_features = model.get_text_features(input_ids, attention_mask).pooler_output
    torch.testing.assert_close(image_features / image_features.norm(dim=-1, keepdim=True), out.image_embeds)
    torch.testing.assert_close(text_features / text_features.norm(dim=-1, keepdim=True), out.text_embeds)
    expected = model.logit_scale.exp() * out.image_embeds @ out.text_embeds.t()
    torch.testing.assert_close(out.logits_per_image, expected)


def test_loss_is_weighted_sum_and_caption_labels_are_shifted_input_ids_without_padding():
    model = tiny_model(contrastive_loss_weight=0.5, caption_loss_weight=3.0)
    pixel_values, input_ids, attention_mask = batch()
    out = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, return_loss=True)
    torch.testing.assert_close(out.loss, 0.5 * out.contrastive_loss + 3.0 * out.caption_loss)

    # caption loss by hand: position t predicts token t+1, padded targets ignored
    logits, targets = out.logits[:, :-1], input_ids[:, 1:]
    keep = attention_mask[:, 1:].bool()
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(out.caption_loss, expected)
    # contrastive loss by hand: symmetric cross-entropy over the image-text similarity matrix
    sims, labels = out.logits_per_image, torch.arange(2)
    expected = (torch.nn.functional.cross_entropy(sims, labels) + torch.nn.functional.cross_entropy(sims.t(), labels)) / 2
    torch.testing.assert_close(out.contrastive_loss, expected)

    # explicit labels in the input layout give the same loss; labels alone imply return_loss
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    again = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, labels=labels)
    torch.testing.assert_close(again.loss, out.loss)

    out.loss.backward()
    assert model.lm_head.weight.grad is not None and model.vision_model.trunk.cls_token.grad is not None


def test_padding_does_not_change_a_caption():
    model = tiny_model()
    pixel_values, input_ids, attention_mask = batch()
    short = model(input_ids=input_ids[1:, :5], pixel_values=pixel_values[1:])
    padded = model(input_ids=input_ids[1:], pixel_values=pixel_values[1:], attention_mask=attention_mask[1:])
    torch.testing.assert_close(padded.text_embeds, short.text_embeds)
    torch.testing.assert_close(padded.logits[:, :5], short.logits)


def test_legacy_cls_mask_changes_only_the_text_embedding():
    """open_clip's shifted CLS mask (released weights) lets the CLS see the first padding position."""
    correct, legacy = tiny_model(), tiny_model(legacy_cls_mask=True)
    legacy.load_state_dict(correct.state_dict())
    pixel_values, input_ids, attention_mask = batch()
    a = correct(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask)
    b = legacy(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask)
    assert not torch.allclose(a.text_embeds, b.text_embeds, atol=1e-4)
    valid = attention_mask.bool()
    torch.testing.assert_close(a.logits[valid], b.logits[valid])
    # open_clip always padded to 76 tokens; the legacy model pads internally, so any padding gives that result
    unpadded = legacy(input_ids=input_ids[1:, :5], pixel_values=pixel_values[1:])
    torch.testing.assert_close(unpadded.text_embeds, b.text_embeds[1:])


def test_zero_shot_shapes_when_images_and_texts_do_not_pair_up():
    model = tiny_model()
    pixel_values, input_ids, attention_mask = batch(n=3)
    out = model(input_ids=input_ids, pixel_values=pixel_values[:1], attention_mask=attention_mask)
    assert out.logits_per_image.shape == (1, 3) and out.logits is None
    with pytest.raises(ValueError, match="same batch size"):
        model(input_ids=input_ids, pixel_values=pixel_values[:1], return_loss=True)
    with pytest.raises(ValueError, match="labels have shape"):
        model(input_ids=input_ids, pixel_values=pixel_values, labels=input_ids[:, 1:])
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask[:, 1:])


def naive_greedy(model, pixel_values, steps):
    """Reference decoder: re-run the full forward on the whole prefix each step, append the argmax."""
    ids = torch.full((pixel_values.shape[0], 1), BOS)
    for _ in range(steps):
        logits = model(input_ids=ids, pixel_values=pixel_values).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


@torch.no_grad()
def test_cached_generation_matches_uncached_and_a_naive_loop():
    model = sharpen(tiny_model())
    model.generation_config.eos_token_id = None  # run all steps so every position is compared
    pixel_values = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    cached = model.generate(pixel_values=pixel_values, max_new_tokens=10, do_sample=False)
    assert cached.shape == (3, 11) and (cached[:, 0] == BOS).all()
    assert len({tuple(row) for row in cached.tolist()}) > 1, "captions must depend on the image"
    torch.testing.assert_close(cached, model.generate(pixel_values=pixel_values, max_new_tokens=10, use_cache=False))
    torch.testing.assert_close(cached, naive_greedy(model, pixel_values, 10))

    beams = model.generate(pixel_values=pixel_values, max_new_tokens=10, num_beams=4, num_return_sequences=2)
    beams_uncached = model.generate(
        pixel_values=pixel_values, max_new_tokens=10, num_beams=4, num_return_sequences=2, use_cache=False
    )
    assert beams.shape == (6, 11)
    torch.testing.assert_close(beams, beams_uncached)


@torch.no_grad()
def test_generation_continues_a_prompt_and_left_pads_batched_prompts():
    model = sharpen(tiny_model())
    model.generation_config.eos_token_id = None
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    long_prompt = torch.tensor([[BOS, 10, 11, 12]])
    short_prompt = torch.tensor([[BOS, 20]])
    alone = [
        model.generate(pixel_values=pixel_values[i : i + 1], input_ids=p, max_new_tokens=5)[0, p.shape[1] :]
        for i, p in enumerate((long_prompt, short_prompt))
    ]
    assert not torch.equal(alone[0], alone[1])
    left_padded = torch.tensor([[BOS, 10, 11, 12], [0, 0, BOS, 20]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    together = model.generate(pixel_values=pixel_values, input_ids=left_padded, attention_mask=mask, max_new_tokens=5)
    torch.testing.assert_close(together[0, 4:], alone[0])
    torch.testing.assert_close(together[1, 4:], alone[1])


def test_an_unsupported_cache_is_refused_with_a_clear_error():
    # (the static cache is supported since issue 20.6: tests/test_coca_compile.py)
    with pytest.raises(ValueError, match="'dynamic' \\(the default\\) or 'static'"):
        tiny_model().generate(pixel_values=torch.randn(1, 3, 32, 32), max_new_tokens=2, cache_implementation="offloaded")


def test_sampling_is_batched_and_seeded():
    model = tiny_model()
    pixel_values = torch.randn(2, 3, 32, 32)
    torch.manual_seed(3)
    a = model.generate(pixel_values=pixel_values, do_sample=True, top_k=20, max_new_tokens=6)
    torch.manual_seed(3)
    b = model.generate(pixel_values=pixel_values, do_sample=True, top_k=20, max_new_tokens=6)
    assert a.shape[0] == 2 and torch.equal(a, b)


def test_every_parameter_is_initialized():
    """`_init_weights` covers every parameter (open_clip left its decoder projection uninitialized)."""
    model = tiny_model()
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(float("nan"))
    for module in model.modules():
        module._is_hf_initialized = False
    model.initialize_weights()
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all(), f"{name} was not initialized"
    # open_clip's text-stack scheme reaches the decoder too (width 64, 2 layers: out_proj std 64**-0.5 / 2)
    out_proj = model.text_decoder.layers[0].cross_attn_block.cross_attn.out_proj.weight
    assert abs(out_proj.std().item() - 0.0625) < 0.005
    assert abs(model.lm_head.weight.std().item() - 0.125) < 0.01
    torch.testing.assert_close(model.logit_scale, torch.tensor(model.config.logit_scale_init_value))
    # the trunk's class token and position embedding as open_clip's ViT draws them: N(0, width**-0.5), not timm's
    # 0.02 / 1e-6 (width 64: 0.125)
    trunk = model.vision_model.trunk
    assert abs(trunk.pos_embed.std().item() - 0.125) < 0.01 and abs(trunk.cls_token.std().item() - 0.125) < 0.04


def test_sin_cos_2d_position_embedding_is_open_clips_and_stays_fixed(tmp_path):
    """vision_config.pos_embed_type="sin_cos_2d": open_clip's fixed 2-D sine-cosine embedding (MAE's), which no
    training step changes, also after save / from_pretrained (loading replaces the parameter)."""
    from open_clip.pos_embed import get_2d_sincos_pos_embed

    config = get_config("coca-tiny")
    config.vision_config.pos_embed_type = "sin_cos_2d"
    model = CocaModel(config).train()
    expected = torch.from_numpy(get_2d_sincos_pos_embed(64, 4, cls_token=True)).float()[None]
    torch.testing.assert_close(model.vision_model.trunk.pos_embed, expected, rtol=0, atol=1e-6)
    model.save_pretrained(tmp_path)
    reloaded = CocaModel.from_pretrained(tmp_path).train()
    pixel_values, input_ids, attention_mask = batch()
    reloaded(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, return_loss=True).loss.backward()
    trunk = reloaded.vision_model.trunk
    assert not trunk.pos_embed.requires_grad and trunk.pos_embed.grad is None and trunk.cls_token.grad is not None
    torch.testing.assert_close(trunk.pos_embed, expected, rtol=0, atol=1e-6)
    from hf_vlm.modeling.coca.modeling_coca import sin_cos_2d_position_embedding

    with pytest.raises(ValueError, match=r"square patch grid .* grid \(4, 2\)"):
        sin_cos_2d_position_embedding(64, (4, 2))
    with pytest.raises(ValueError, match="pos_embed_type='sincos'"):
        get_config("coca-tiny", vision_config={**config.vision_config.to_dict(), "pos_embed_type": "sincos"})


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant):
    """Also with torch's reentrant checkpointing, which back-propagates only through a layer's positional inputs
    (issue 16.1: the image tokens reached the cross-attention as a keyword, and backward ran twice through them)."""
    pixel_values, input_ids, attention_mask = batch()
    grads = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            # transformers' API (what Trainer calls)
            model.activation_checkpointing_enable({"use_reentrant": use_reentrant})
            assert model.vision_model.trunk.grad_checkpointing
            assert all(layer.gradient_checkpointing for layer in model.text_model.layers)
        out = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, return_loss=True)
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_deprecated_gradient_checkpointing_alias_reaches_every_stack():
    model = tiny_model()
    with pytest.warns(FutureWarning):
        model.gradient_checkpointing_enable()
    assert model.vision_model.trunk.grad_checkpointing
    assert all(layer.self_attn_block.gradient_checkpointing and layer.cross_attn_block.gradient_checkpointing
               for layer in model.text_decoder.layers)
    model.activation_checkpointing_disable()
    assert not model.vision_model.trunk.grad_checkpointing


def test_sdpa_and_eager_attention_agree():
    pixel_values, input_ids, attention_mask = batch()
    sdpa = tiny_model()
    eager = CocaModel._from_config(get_config("coca-tiny"), attn_implementation="eager").eval()
    eager.load_state_dict(sdpa.state_dict())
    a = sdpa(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask)
    b = eager(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a.logits_per_image, b.logits_per_image, atol=1e-5, rtol=1e-4)


def test_config_validation_names_the_key():
    with pytest.raises(ValueError, match="multimodal_config.hidden_size"):
        CocaConfig(text_config={"hidden_size": 64, "num_attention_heads": 2})
    with pytest.raises(ValueError, match="img_size"):
        CocaConfig(vision_config={"timm_model_args": {"img_size": 64}})
    assert get_config("coca-tiny").hidden_size == 64


@torch.no_grad()
def test_generate_returns_the_prompt_unchanged_then_the_new_tokens():
    """`[input_ids, new tokens]` whatever the prompt layout (issue 16.2), so slicing the prompt off by its length works:
    a left-padded prompt, and a caption-encoded right-padded one (`<start> text <end>` + padding) whose continuation
    is that of its text."""
    model = sharpen(tiny_model())
    model.generation_config.eos_token_id = None
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    left_padded = torch.tensor([[BOS, 10, 11, 12], [0, 0, BOS, 20]])
    left_mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    out = model.generate(pixel_values=pixel_values, input_ids=left_padded, attention_mask=left_mask, max_new_tokens=4)
    assert out.shape == (2, 8) and torch.equal(out[:, :4], left_padded)

    caption_encoded = torch.tensor([[BOS, 10, 11, 12, EOS], [BOS, 20, EOS, 0, 0]])
    caption_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    again = model.generate(pixel_values=pixel_values, input_ids=caption_encoded, attention_mask=caption_mask,
                           max_new_tokens=4, num_beams=2, num_return_sequences=2, return_dict_in_generate=True)
    assert again.sequences.shape == (4, 9)
    torch.testing.assert_close(again.sequences[:, :5], caption_encoded.repeat_interleave(2, dim=0))
    best = model.generate(pixel_values=pixel_values, input_ids=left_padded, attention_mask=left_mask,
                          max_new_tokens=4, num_beams=2)
    torch.testing.assert_close(again.sequences[::2, 5:], best[:, 4:])


@torch.no_grad()
def test_the_cached_decoding_step_exports_and_matches_eager():
    """transformers' own exporter (torch.export) traces a cached decoding step (issue 16.3: a data-dependent
    `int(position_ids.max())` stopped the trace) and the exported program gives the eager logits."""
    import copy

    from transformers.exporters import DynamoConfig, DynamoExporter

    model = tiny_model()
    pixel_values, input_ids, _ = batch()
    prefill = model(input_ids=input_ids[:, :4], pixel_values=pixel_values, use_cache=True)
    step = {"input_ids": prefill.logits[:, -1:].argmax(-1), "attention_mask": torch.ones(2, 5, dtype=torch.long),
            "past_key_values": prefill.past_key_values, "use_cache": True}
    expected = model(**copy.deepcopy(step)).logits
    exported = DynamoExporter().export(model, copy.deepcopy(step), config=DynamoConfig())
    torch.testing.assert_close(exported(**copy.deepcopy(step))["logits"], expected)


def test_forward_and_features_report_hidden_states_and_attentions():
    """`output_hidden_states` / `output_attentions` reach every stack (issue 16.9): the ViT trunk and the text encoder
    (in `vision_model_output` / `text_model_output`, as transformers' CLIP) and the multimodal decoder (as a
    decoder-only LM reports them); they keep their gradient; `return_dict=False` gives tuples."""
    model = tiny_model()
    config = model.config
    pixel_values, input_ids, attention_mask = batch()
    out = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                output_attentions=True, output_hidden_states=True)
    trunk_layers = config.vision_config.timm_model_args["depth"]
    vision, text = out.vision_model_output, out.text_model_output
    assert len(vision.hidden_states) == trunk_layers + 1 and len(vision.attentions) == trunk_layers
    assert vision.attentions[0].shape == (2, 2, 17, 17)  # heads, 16 patches + class token
    torch.testing.assert_close(vision.attentions[0].sum(-1), torch.ones(2, 2, 17))
    layers = config.text_config.num_hidden_layers
    assert len(text.hidden_states) == layers + 1 and text.attentions[0].shape == (2, 2, 8, 8)  # the CLS appended
    assert len(out.hidden_states) == config.multimodal_config.num_hidden_layers + 1
    assert out.attentions[0].shape == (2, 2, 7, 7) and out.cross_attentions[0].shape == (2, 2, 7, 8)
    # padding keys get no attention
    assert out.attentions[-1][1, :, :, 5:].abs().max() == 0

    first_hidden, first_attention = out.text_model_output.hidden_states[0], out.attentions[0]
    first_hidden.retain_grad()
    first_attention.retain_grad()
    out.logits.sum().backward()
    assert first_hidden.grad is not None and first_attention.grad is not None

    quiet = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask)
    assert quiet.hidden_states is None and quiet.text_model_output.attentions is None
    as_tuple = model.get_text_features(input_ids, attention_mask, output_hidden_states=True, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple[2]) == layers + 1
    assert isinstance(model.get_image_features(pixel_values, return_dict=False), tuple)
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['input_embeds'\\]"):
        model(input_ids=input_ids, input_embeds=None)


def test_eager_attention_is_used_everywhere_when_asked_for():
    """`attn_implementation="eager"` reaches the timm trunk (its written-out attention) and every text stack, and
    gives what SDPA gives (issue 16.9: the setting was silently ignored)."""
    pixel_values, input_ids, attention_mask = batch()
    model = tiny_model()
    sdpa = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask)
    assert all(block.attn.fused_attn for block in model.vision_model.trunk.blocks)
    model.set_attn_implementation("eager")
    assert {model.config.get_text_config()._attn_implementation, model.config.vision_config._attn_implementation,
            model.config.multimodal_config._attn_implementation} == {"eager"}
    eager = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask)
    assert not any(block.attn.fused_attn for block in model.vision_model.trunk.blocks)
    torch.testing.assert_close(eager.logits, sdpa.logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(eager.logits_per_image, sdpa.logits_per_image, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_inputs_embeds_stand_for_input_ids():
    """The text may come as embeddings (issue 16.9: `forward(**kwargs)` swallowed `inputs_embeds`): forward gives the
    same outputs, and `generate(inputs_embeds=...)` the tokens that follow that prompt."""
    model = sharpen(tiny_model())
    pixel_values, input_ids, attention_mask = batch()
    embeds = model.get_input_embeddings()(input_ids)
    by_ids = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask)
    by_embeds = model(inputs_embeds=embeds, pixel_values=pixel_values, attention_mask=attention_mask)
    torch.testing.assert_close(by_embeds.logits, by_ids.logits)
    torch.testing.assert_close(by_embeds.logits_per_image, by_ids.logits_per_image)
    prompt = input_ids[:, :3]
    expected = model.generate(pixel_values=pixel_values, input_ids=prompt, max_new_tokens=4)
    got = model.generate(pixel_values=pixel_values, inputs_embeds=embeds[:, :3], max_new_tokens=4)
    torch.testing.assert_close(got, expected[:, 3:])
    with pytest.raises(ValueError, match="needs labels"):
        model(inputs_embeds=embeds, pixel_values=pixel_values, return_loss=True)
