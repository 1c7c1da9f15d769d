"""BLIP-2-FlanT5 models: the published architecture (meta device), stage-2 forward / generate, stage-1 losses,
the UniLM mask, freezing, and the untied FlanT5 head through config round trips."""

import pytest
import torch
import torch.nn.functional as F

import hf_vlm  # noqa: F401  (registers the Auto classes)
from hf_vlm.modeling.blip2_flant5 import (
    Blip2FlanT5Config,
    Blip2FlanT5ForConditionalGeneration,
    Blip2FlanT5ForPretraining,
)
from hf_vlm.presets import get_config, preset_dict

PUBLISHED_PARAMETERS = 3_942_446_592  # Salesforce/blip2-flan-t5-xl as transformers counts it (k bias as a parameter)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def tiny_config(**overrides) -> Blip2FlanT5Config:
    return get_config("blip2-tiny", **overrides)


@pytest.fixture(scope="module")
def stage2():
    torch.manual_seed(0)
    return Blip2FlanT5ForConditionalGeneration(tiny_config()).eval()


@pytest.fixture(scope="module")
def stage1():
    torch.manual_seed(0)
    return Blip2FlanT5ForPretraining(tiny_config()).eval()


def pixels(batch=2, seed=0):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow
def test_flan_t5_xl_preset_is_the_published_architecture_on_the_meta_device():
    config = get_config("blip2-flan-t5-xl")
    with torch.device("meta"):
        model = Blip2FlanT5ForConditionalGeneration(config)
    total = sum(p.numel() for p in model.parameters())
    assert total == 3_942_391_680
    # transformers' BLIP-2 stores a (zero) key bias per EVA block: 39 x 1408 more numbers, same function.
    zero_key_bias = sum(m.k_bias.numel() for m in model.vision_model.modules() if hasattr(m, "k_bias"))
    assert zero_key_bias == 39 * 1408
    assert total + zero_key_bias == PUBLISHED_PARAMETERS

    def count(module):
        return sum(p.numel() for p in module.parameters())

    assert count(model.vision_model) + count(model.ln_vision) + zero_key_bias == 985_952_256
    assert count(model.qformer) == 105_137_664
    assert model.query_tokens.shape == (1, 32, 768)
    assert count(model.language_projection) == 768 * 2048 + 2048
    assert count(model.language_model) == 2_849_757_184
    # FlanT5: separate lm_head, no output rescaling, encoder/decoder embeddings shared.
    t5 = model.language_model
    assert t5.lm_head.weight is not t5.shared.weight
    assert t5.encoder.embed_tokens.weight is t5.shared.weight and t5.decoder.embed_tokens.weight is t5.shared.weight
    assert config.text_config.scale_decoder_outputs is False
    assert config.hidden_size == 2048  # DeepSpeed "auto" bucket sizes
    assert model.vision_model.blocks[0].attn.qkv.bias is None and model.vision_model.blocks[0].attn.q_bias.shape == (1408,)


def test_xl_preset_config_survives_a_nested_save_load_round_trip(tmp_path):
    config = get_config("blip2-flan-t5-xl")
    assert not config.lm_head_is_tied
    config.save_pretrained(tmp_path)
    reloaded = Blip2FlanT5Config.from_pretrained(tmp_path)
    assert reloaded.text_config.scale_decoder_outputs is False and not reloaded.lm_head_is_tied
    assert reloaded.to_dict() == config.to_dict()
    assert preset_dict("blip2-flan-t5-xl")["text_config"]["tie_word_embeddings"] is False


def test_untied_lm_head_survives_save_and_load(tmp_path, stage2):
    t5 = stage2.language_model
    assert t5.lm_head.weight is not t5.shared.weight
    assert not torch.equal(t5.lm_head.weight, t5.shared.weight)
    stage2.save_pretrained(tmp_path)
    reloaded = Blip2FlanT5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert reloaded.language_model.lm_head.weight is not reloaded.language_model.shared.weight
    for name, tensor in stage2.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name


def test_t5_layer_counts_must_match_for_generation():
    with pytest.raises(ValueError, match="num_decoder_layers"):
        tiny_config(text_config={**preset_dict("blip2-tiny")["text_config"], "num_decoder_layers": 3})


def test_stage2_feeds_projected_queries_then_the_prompt_to_the_t5_encoder(stage2):
    prompt = torch.tensor([[5, 6, 7, 1], [8, 9, 1, 0]])
    mask = (prompt != 0).long()
    out = stage2(pixels(), prompt, mask, labels=torch.tensor([[10, 11, 1], [12, 1, 0]]))
    num_queries = stage2.config.num_query_tokens
    assert out.encoder_last_hidden_state.shape[:2] == (2, num_queries + 4)
    assert out.language_model_inputs.shape == (2, num_queries, stage2.config.text_config.d_model)
    # The same encoder output when we build T5's input by hand.
    embeds = torch.cat([out.language_model_inputs, stage2.language_model.shared(prompt)], dim=1)
    encoder = stage2.language_model.get_encoder()
    expected = encoder(inputs_embeds=embeds, attention_mask=torch.cat([torch.ones(2, num_queries, dtype=torch.long), mask], 1))
    torch.testing.assert_close(out.encoder_last_hidden_state, expected.last_hidden_state)


def test_stage2_loss_is_t5_cross_entropy_with_padding_ignored(stage2):
    prompt = torch.tensor([[5, 6, 1], [8, 1, 0]])
    labels = torch.tensor([[10, 11, 1], [12, 1, 0]])  # second target padded with T5's pad id 0
    out = stage2(pixels(), prompt, (prompt != 0).long(), labels=labels)
    ignore_pad = labels.masked_fill(labels == 0, -100)
    expected = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), ignore_pad.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    assert out.logits.shape == (2, 3, stage2.config.text_config.vocab_size)


def test_generate_captions_without_prompt_and_answers_with_one(stage2):
    captions = stage2.generate(pixels(), max_new_tokens=4, do_sample=False)
    assert captions.shape[0] == 2 and captions[:, 0].tolist() == [0, 0]  # decoder starts from T5's start id
    prompt = torch.tensor([[5, 6, 7, 1], [8, 9, 1, 0]])
    answers = stage2.generate(pixels(), prompt, (prompt != 0).long(), max_new_tokens=4, num_beams=2)
    assert answers.shape[0] == 2


def test_batched_padded_prompts_give_the_same_answers_as_one_by_one():
    torch.manual_seed(1)
    # Smaller T5 init so the random model's answers depend on the image and prompt, not just the biggest logits.
    model = Blip2FlanT5ForConditionalGeneration(tiny_config()).eval()
    with torch.no_grad():
        model.language_model.lm_head.weight.mul_(0.05)
    images = pixels(3, seed=3)
    prompts = [[5, 6, 7, 8, 1], [9, 1], [11, 12, 1]]
    width = max(map(len, prompts))
    input_ids = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
    attention_mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts])
    kwargs = dict(max_new_tokens=6, num_beams=3, length_penalty=-1.0)
    batched = model.generate(images, input_ids, attention_mask, **kwargs)
    for i, prompt in enumerate(prompts):
        single = model.generate(images[i : i + 1], torch.tensor([prompt]), **kwargs)[0]
        assert batched[i, : len(single)].tolist() == single.tolist()
        # after its end of sequence, a finished answer is filled up with special tokens (pad / eos) in the batch
        assert set(batched[i, len(single) :].tolist()) <= {0, 1}
    assert len({tuple(row.tolist()) for row in batched}) > 1, "answers should depend on image and prompt"


def test_stage1_loss_is_itc_plus_itm_plus_itg(stage1):
    input_ids = torch.tensor([[2, 7, 8, 9, 3], [2, 10, 3, 0, 0], [2, 11, 12, 3, 0]])
    attention_mask = (input_ids != 0).long()
    out = stage1(pixels(3), input_ids, attention_mask, return_loss=True)
    torch.testing.assert_close(out.loss, out.itc_loss + out.itm_loss + out.itg_loss)
    assert out.logits_per_image.shape == (3, 3) and out.itm_logits.shape == (9, 2)
    # ITC: max over query similarities, divided by the temperature (init 0.07), label smoothing 0.1.
    sims = torch.einsum("iqd,td->itq", out.image_embeds, out.text_embeds).amax(-1) / 0.07
    torch.testing.assert_close(out.logits_per_image, sims)
    expected_itc = (F.cross_entropy(sims, torch.arange(3), label_smoothing=0.1)
                    + F.cross_entropy(sims.t(), torch.arange(3), label_smoothing=0.1)) / 2
    torch.testing.assert_close(out.itc_loss, expected_itc)
    # ITG: next-token prediction of the caption after [DEC], padding ignored, label smoothing 0.1.
    labels = input_ids.masked_fill(attention_mask == 0, -100)[:, 1:]
    expected_itg = F.cross_entropy(out.itg_logits[:, :-1].reshape(-1, 256), labels.reshape(-1), ignore_index=-100,
                                   label_smoothing=0.1)
    torch.testing.assert_close(out.itg_loss, expected_itg)


def test_itg_unilm_mask_queries_never_see_text_and_text_is_causal(stage1):
    image_embeds = stage1.get_image_embeds(pixels(1))
    queries = stage1.query_tokens
    text_a = torch.tensor([[255, 7, 8, 9, 3]])
    text_b = torch.tensor([[255, 7, 8, 40, 41]])  # differs from position 3 on
    mask = torch.ones(1, queries.shape[1] + 5, dtype=torch.long)

    def run(text):
        return stage1.qformer(query_embeds=queries, input_ids=text, attention_mask=mask,
                              encoder_hidden_states=image_embeds, text_attention="causal").last_hidden_state

    out_a, out_b = run(text_a), run(text_b)
    n = queries.shape[1]
    torch.testing.assert_close(out_a[:, :n], out_b[:, :n])  # queries: unaffected by any text
    torch.testing.assert_close(out_a[:, n : n + 3], out_b[:, n : n + 3])  # text before the change: unaffected
    assert not torch.allclose(out_a[:, n + 3 :], out_b[:, n + 3 :])
    # And the query outputs equal the query-only pass the stage-2 model uses.
    torch.testing.assert_close(out_a[:, :n], stage1.get_query_output(image_embeds))


def test_itm_scores_and_similarity_helpers_for_retrieval(stage1):
    input_ids = torch.tensor([[2, 7, 8, 3], [2, 10, 3, 0]])
    attention_mask = (input_ids != 0).long()
    scores = stage1.itm_scores(pixels(), input_ids, attention_mask)
    assert scores.shape == (2,) and ((scores > 0) & (scores < 1)).all()
    image_feats = stage1.get_image_features(pixels()).pooler_output
    text_feats = stage1.get_text_features(input_ids, attention_mask).pooler_output
    similarity = stage1.image_text_similarity(image_feats, text_feats)
    assert similarity.shape == (2, 2) and similarity.abs().max() <= 1 + 1e-5
    out = stage1(pixels(), input_ids, attention_mask, return_loss=False)
    torch.testing.assert_close(out.logits_per_image, similarity / stage1.temp)


def test_stage1_return_loss_defaults_to_the_training_mode(stage1):
    """Eval-mode forward without `return_loss` is retrieval (similarity logits only, as transformers' CLIP/BLIP);
    a training-mode forward returns the losses (the Trainer's collator passes return_loss=True anyway)."""
    input_ids = torch.tensor([[2, 7, 8, 3], [2, 10, 3, 0]])
    out = stage1(pixels(), input_ids, (input_ids != 0).long())
    assert out.loss is None and out.itm_logits is None and out.logits_per_image.shape == (2, 2)
    torch.manual_seed(0)
    model = Blip2FlanT5ForPretraining(tiny_config()).train()
    out = model(pixels(), input_ids, (input_ids != 0).long())
    assert out.loss is not None and out.itm_logits.shape == (6, 2)


def test_stage1_eval_forward_is_deterministic_and_takes_the_hardest_negatives(stage1, monkeypatch):
    """model.eval() with return_loss=True never samples (no torch.multinomial, RNG untouched): two calls give
    identical outputs, and each pair's ITM negative is its most similar non-matching image / text."""
    calls = []
    multinomial = torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda *a, **k: calls.append(1) or multinomial(*a, **k))
    input_ids = torch.tensor([[2, 7, 8, 9, 3], [2, 10, 3, 0, 0], [2, 11, 12, 3, 0], [2, 13, 3, 0, 0]])
    attention_mask = (input_ids != 0).long()
    rng = torch.get_rng_state()
    first = stage1(pixels(4), input_ids, attention_mask, return_loss=True)
    second = stage1(pixels(4), input_ids, attention_mask, return_loss=True)
    assert calls == [] and torch.equal(torch.get_rng_state(), rng)
    for key, value in first.items():
        if isinstance(value, torch.Tensor):  # (the towers' nested outputs hold the same tensors)
            assert torch.equal(value, second[key]), key
    # Hardest negatives: argmax of the similarities with the positive pair masked out.
    diagonal = torch.eye(4, dtype=torch.bool)
    negative_images = first.logits_per_text.masked_fill(diagonal, float("-inf")).argmax(1)
    negative_texts = first.logits_per_image.masked_fill(diagonal, float("-inf")).argmax(1)
    image_embeds = stage1.get_image_embeds(pixels(4))
    with torch.no_grad():
        expected = torch.cat([
            stage1.itm_logits(image_embeds, input_ids, attention_mask),
            stage1.itm_logits(image_embeds[negative_images], input_ids, attention_mask),
            stage1.itm_logits(image_embeds, input_ids[negative_texts], attention_mask[negative_texts]),
        ])
    torch.testing.assert_close(first.itm_logits, expected)


def test_stage1_samples_itm_negatives_only_when_training(monkeypatch):
    """Training keeps LAVIS's sampled hard negatives (one multinomial draw for images, one for texts)."""
    calls = []
    multinomial = torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda *a, **k: calls.append(1) or multinomial(*a, **k))
    torch.manual_seed(0)
    model = Blip2FlanT5ForPretraining(tiny_config()).train()
    input_ids = torch.tensor([[2, 7, 8, 3], [2, 10, 3, 0], [2, 11, 3, 0]])
    model(pixels(3), input_ids, (input_ids != 0).long(), return_loss=True)
    assert len(calls) == 2


def test_stage1_batch_of_one_infers_in_eval_mode(stage1):
    """batch=1 inference: retrieval logits by default, and (deterministic) losses when asked."""
    input_ids = torch.tensor([[2, 7, 8, 3]])
    out = stage1(pixels(1), input_ids)
    assert out.logits_per_image.shape == (1, 1) and out.loss is None
    out = stage1(pixels(1), input_ids, return_loss=True)
    assert torch.isfinite(out.loss) and out.itm_logits.shape == (1, 2)
    torch.testing.assert_close(out.loss, stage1(pixels(1), input_ids, return_loss=True).loss, rtol=0, atol=0)


def test_stage1_trains_on_a_batch_of_one_with_the_same_parameters_in_the_graph():
    """An epoch's last batch of one sample (N % batch == 1) trains: no negative exists, so ITC (one candidate) and
    ITM are 0, but every parameter that a full batch trains still gets a gradient (ZeRO needs the same set on
    every step and rank), ITM's head included; ITG still learns."""
    torch.manual_seed(0)
    model = Blip2FlanT5ForPretraining(tiny_config()).train()

    def grads(batch, input_ids):
        model.zero_grad(set_to_none=True)
        out = model(pixels(batch), input_ids, (input_ids != 0).long(), return_loss=True)
        out.loss.backward()
        return out, {n for n, p in model.named_parameters() if p.grad is not None}

    _, full = grads(2, torch.tensor([[2, 7, 8, 3], [2, 10, 3, 0]]))
    out, single = grads(1, torch.tensor([[2, 7, 8, 3]]))
    assert out.itc_loss.item() == 0 and out.itm_loss.item() == 0 and out.itg_loss > 0
    torch.testing.assert_close(out.loss, out.itg_loss)
    assert out.itm_logits.shape == (1, 2)
    assert single == full and {"itm_head.weight", "temp", "query_tokens"} <= single
    assert model.itm_head.weight.grad.abs().max() == 0
    assert model.lm_head.transform.dense.weight.grad.abs().max() > 0


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_losses_reach_only_trainable_parameters_and_frozen_parts_stay_put(stage):
    torch.manual_seed(0)
    config = tiny_config()
    input_ids = torch.tensor([[2, 7, 8, 3], [2, 10, 3, 0]])
    if stage == "stage1":
        model = Blip2FlanT5ForPretraining(config)
        frozen = {"vision_model"}
        batch = dict(pixel_values=pixels(), input_ids=input_ids, attention_mask=(input_ids != 0).long())
    else:
        model = Blip2FlanT5ForConditionalGeneration(config)
        frozen = {"vision_model", "language_model"}
        batch = dict(pixel_values=pixels(), input_ids=input_ids, attention_mask=(input_ids != 0).long(),
                     labels=torch.tensor([[10, 11, 1], [12, 1, 0]]))
    model.train()
    for name in frozen:
        assert not getattr(model, name).training, f"{name} must stay in eval mode"
    assert model.qformer.training
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.split(".")[0] not in frozen for n in trainable)
    assert "ln_vision.weight" in trainable and "query_tokens" in trainable

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**batch).loss.backward()
    for name, param in model.named_parameters():
        if name.split(".")[0] in frozen:
            assert param.grad is None, name
    assert model.query_tokens.grad is not None and model.qformer.encoder.layer[0].attention.attention.query.weight.grad is not None
    optimizer.step()
    for name, param in model.named_parameters():
        if name.split(".")[0] in frozen:
            assert torch.equal(param, before[name]), name
    assert not torch.equal(model.query_tokens, before["query_tokens"])


def test_auto_classes_resolve_the_family():
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

    config = AutoConfig.for_model("blip2_flant5", **{k: v for k, v in preset_dict("blip2-tiny").items() if k != "model_type"})
    assert isinstance(config, Blip2FlanT5Config)
    assert type(AutoModel.from_config(config)) is Blip2FlanT5ForConditionalGeneration
    assert type(AutoModelForImageTextToText.from_config(config)) is Blip2FlanT5ForConditionalGeneration


def test_stage2_return_dict_and_outputs_of_every_part(stage2):
    """`return_dict` is the caller's (issue 16.4: T5 got it twice and raised); `output_hidden_states` /
    `output_attentions` reach the vision tower, the Q-Former and T5 (issue 16.9)."""
    prompt, labels = torch.tensor([[5, 6, 7, 1], [8, 9, 1, 0]]), torch.tensor([[10, 11, 1], [12, 1, 0]])
    as_dict = stage2(pixels(), prompt, (prompt != 0).long(), labels=labels, return_dict=True,
                     output_hidden_states=True, output_attentions=True)
    as_tuple = stage2(pixels(), prompt, (prompt != 0).long(), labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.loss)
    torch.testing.assert_close(as_tuple[1], as_dict.logits)
    config = stage2.config
    vision, qformer, t5 = as_dict.vision_model_output, as_dict.qformer_model_output, as_dict.language_model_outputs
    assert len(vision.hidden_states) == config.vision_config.num_hidden_layers + 1
    assert vision.attentions[0].shape == (2, config.vision_config.num_attention_heads, 17, 17)
    assert len(qformer.hidden_states) == config.qformer_config.num_hidden_layers + 1
    assert qformer.cross_attentions[0].shape == (2, config.qformer_config.num_attention_heads, 8, 17)
    assert len(t5.encoder_hidden_states) == config.text_config.num_layers + 1 and t5.cross_attentions is not None
    features = stage2.get_image_features(pixels(), output_hidden_states=True, return_dict=False)
    assert isinstance(features, tuple) and len(features[2]) == config.vision_config.num_hidden_layers + 1


def test_stage2_prompt_as_inputs_embeds(stage2):
    """The prompt may come as T5 input embeddings, in forward and in generate (issue 16.9: a TypeError)."""
    prompt = torch.tensor([[5, 6, 7, 1], [8, 9, 1, 0]])
    mask = (prompt != 0).long()
    embeds = stage2.get_input_embeddings()(prompt)
    torch.testing.assert_close(
        stage2(pixels(), inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=prompt[:, :2]).logits,
        stage2(pixels(), prompt, mask, decoder_input_ids=prompt[:, :2]).logits,
    )
    torch.testing.assert_close(
        stage2.generate(pixels(), inputs_embeds=embeds, attention_mask=mask, max_new_tokens=4),
        stage2.generate(pixels(), input_ids=prompt, attention_mask=mask, max_new_tokens=4),
    )


def test_t5_weights_missing_from_a_checkpoint_get_t5s_own_init(tmp_path, stage2):
    """Issue 16.5: transformers took our model for custom code and skipped T5's `_init_weights` for modules without
    parameters of their own (T5's attention blocks), leaving torch's std ~1 instead of T5's scaled init."""
    from safetensors.torch import load_file, save_file

    stage2.save_pretrained(tmp_path)
    kept = {k: v for k, v in load_file(tmp_path / "model.safetensors").items() if not k.startswith("language_model.")}
    save_file(kept, tmp_path / "model.safetensors", metadata={"format": "pt"})
    reloaded = Blip2FlanT5ForConditionalGeneration.from_pretrained(tmp_path)
    fresh = dict(Blip2FlanT5ForConditionalGeneration(tiny_config()).language_model.named_parameters())
    for name, param in reloaded.language_model.named_parameters():
        if param.dim() == 2 and "embed" not in name and "shared" not in name and "lm_head" not in name:
            ratio = param.std().item() / fresh[name].std().item()
            assert 0.7 < ratio < 1.4, f"{name}: std {param.std().item():.3f}, T5 init {fresh[name].std().item():.3f}"


def test_stage1_loaded_in_float16_runs_with_the_qformer_in_float32(tmp_path, stage1):
    """Issue 16.6: the Q-Former stays fp32 (`_keep_in_fp32_modules`) and its fp32 outputs meet the fp16 heads."""
    stage1.save_pretrained(tmp_path)
    half = Blip2FlanT5ForPretraining.from_pretrained(tmp_path, dtype=torch.float16).eval()
    assert half.qformer.layernorm.weight.dtype == torch.float32 and half.vision_proj.weight.dtype == torch.float16
    input_ids = torch.tensor([[2, 7, 8, 9, 3], [2, 10, 3, 0, 0]])
    attention_mask = (input_ids != 0).long()
    for return_loss in (False, True):
        full = stage1(pixels(), input_ids, attention_mask, return_loss=return_loss)
        out = half(pixels().half(), input_ids, attention_mask, return_loss=return_loss)
        torch.testing.assert_close(out.logits_per_image.float(), full.logits_per_image, atol=0.05, rtol=0.02)
    assert torch.isfinite(out.loss) and abs(out.loss.item() - full.loss.item()) < 0.05
    assert half.itm_scores(pixels().half(), input_ids, attention_mask).shape == (2,)


def test_stage1_resized_vocabulary_is_the_qformers_and_reloads(tmp_path):
    """Issue 16.7: the new size goes into `qformer_config` (not T5's `text_config`), so the model loads again; the
    tied ITG head follows."""
    torch.manual_seed(0)
    model = Blip2FlanT5ForPretraining(tiny_config()).eval()
    vocab, t5_vocab = model.config.qformer_config.vocab_size, model.config.text_config.vocab_size
    model.resize_token_embeddings(vocab + 10)
    assert model.config.qformer_config.vocab_size == vocab + 10 and model.config.text_config.vocab_size == t5_vocab
    assert model.lm_head.decoder.weight is model.qformer.embeddings.word_embeddings.weight
    assert model.lm_head.decoder.bias.shape == (vocab + 10,)
    model.save_pretrained(tmp_path)
    reloaded = Blip2FlanT5ForPretraining.from_pretrained(tmp_path).eval()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name
    new_token = torch.tensor([[2, vocab + 5, 3]])
    out = reloaded(pixels(1), new_token, return_loss=True)
    assert out.itg_logits.shape[-1] == vocab + 10


def test_stage1_outputs_of_every_part_and_tuples(stage1):
    """Issue 16.9: `output_hidden_states` / `output_attentions` reach the vision tower and both Q-Former passes;
    `return_dict=False` gives tuples."""
    input_ids = torch.tensor([[2, 7, 8, 9, 3], [2, 10, 3, 0, 0]])
    out = stage1(pixels(), input_ids, (input_ids != 0).long(), output_hidden_states=True, output_attentions=True)
    layers = stage1.config.qformer_config.num_hidden_layers
    assert len(out.text_model_output.hidden_states) == layers + 1
    assert out.text_model_output.attentions[0].shape == (2, 4, 5, 5)
    assert out.text_model_output.attentions[0][1, :, :, 3:].abs().max() == 0  # padding keys
    assert len(out.qformer_model_output.attentions) == layers
    assert len(out.vision_model_output.attentions) == stage1.config.vision_config.num_hidden_layers
    as_tuple = stage1(pixels(), input_ids, (input_ids != 0).long(), return_dict=False)
    torch.testing.assert_close(as_tuple[0], out.logits_per_image)
    text = stage1.get_text_features(input_ids, output_attentions=True, return_dict=False)
    assert isinstance(text, tuple) and len(text[-1]) == layers


@pytest.mark.parametrize("model_class", [Blip2FlanT5ForPretraining, Blip2FlanT5ForConditionalGeneration])
def test_eager_attention_reaches_the_eva_tower_and_the_qformer(model_class):
    """Issue 16.9: `attn_implementation="eager"` was ignored by the Q-Former and the EVA tower; now both switch, and
    give what SDPA gives."""
    torch.manual_seed(0)
    model = model_class(tiny_config()).eval()
    image_embeds = model.get_image_embeds(pixels())
    sdpa = model.get_query_output(image_embeds)
    assert all(block.attn.fused_attn for block in model.vision_model.blocks)
    model.set_attn_implementation("eager")
    assert model.config.qformer_config._attn_implementation == "eager"
    assert model.config.vision_config._attn_implementation == "eager"
    torch.testing.assert_close(model.get_image_embeds(pixels()), image_embeds, atol=1e-5, rtol=1e-4)
    assert not any(block.attn.fused_attn for block in model.vision_model.blocks)
    torch.testing.assert_close(model.get_query_output(image_embeds), sdpa, atol=1e-5, rtol=1e-4)
