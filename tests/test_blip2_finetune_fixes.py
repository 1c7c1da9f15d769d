"""BLIP-2-FlanT5 fine-tuning on one GPU with the ecosystem's tools (issue 20): peft LoRA under reentrant gradient
checkpointing, LoRA dropout inside the frozen towers, peft's SEQ_2_SEQ_LM wrapper, bitsandbytes 8-bit / 4-bit
loading, and the processor's padding argument in and out of `transformers.pipeline`."""

import pytest
import torch
from transformers.modeling_layers import GradientCheckpointingLayer

import hf_vlm  # noqa: F401  (registers the Auto classes)
from hf_vlm.modeling.blip2_flant5 import Blip2FlanT5ForConditionalGeneration, Blip2FlanT5Processor
from hf_vlm.presets import get_config
from hf_vlm.testing import random_image, require

QUESTION = "Question: what color is the circle? Short answer:"
# LoRA where the issue's recipe puts it: the Q-Former's attention and T5's q / v.
QFORMER_AND_T5_TARGETS = r"(qformer\..*\.(query|value)|language_model\..*\.SelfAttention\.(q|v))"

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def tiny_stage2(seed=0):
    torch.manual_seed(seed)
    return Blip2FlanT5ForConditionalGeneration(get_config("blip2-tiny"))


def training_batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.randn(2, 3, 32, 32, generator=generator),
        "input_ids": torch.randint(3, 90, (2, 5), generator=generator),
        "labels": torch.randint(3, 90, (2, 3), generator=generator),
    }


@pytest.fixture(scope="module")
def processor(t5_tokenizer_dir, bert_tokenizer_dir):
    from transformers import AutoTokenizer

    return Blip2FlanT5Processor.from_tokenizers(
        AutoTokenizer.from_pretrained(t5_tokenizer_dir), AutoTokenizer.from_pretrained(bert_tokenizer_dir), image_size=32
    )


def peft():
    return require("peft", "pip install 'hf-vlm[finetune]'")


@pytest.mark.parametrize(("lora_first", "vision_adapters"), [(False, False), (True, False), (False, True)],
                         ids=["checkpointing_then_lora", "lora_then_checkpointing", "with_vit_adapters"])
def test_reentrant_checkpointing_trains_every_lora_adapter(lora_first, vision_adapters):
    """Issue 20.2: the Q-Former's input comes from the frozen query_tokens, so under reentrant checkpointing
    nothing upstream of its adapters required grad: they got no gradient, and T5's none either. Both orders: peft's
    (checkpointing first) and the Trainer's (checkpointing after get_peft_model). The ViT is checkpointed by timm,
    non-reentrant (timm's reentrant mode cannot pass EVA blocks their keyword arguments): its adapters train too."""
    targets = QFORMER_AND_T5_TARGETS
    if vision_adapters:
        targets = rf"({targets}|vision_model\.blocks\.\d+\.attn\.proj)"

    def lora_gradients(checkpointing: bool):
        model = tiny_stage2()
        if checkpointing and not lora_first:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
        # init_lora_weights=False: random A and B, so that both get a non-zero gradient.
        model = peft().get_peft_model(model, peft().LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                               init_lora_weights=False))
        if checkpointing and lora_first:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
        model.train()
        torch.manual_seed(1)  # the same dropout masks with and without checkpointing
        model(**training_batch()).loss.backward()
        return {name: param.grad for name, param in model.named_parameters() if param.requires_grad}

    plain, checkpointed = lora_gradients(False), lora_gradients(True)
    assert plain.keys() == checkpointed.keys()
    assert all("lora_" in name for name in plain)
    for tower in ("qformer.", "language_model.", "vision_model.")[: 3 if vision_adapters else 2]:
        assert any(tower in name for name in plain), tower
    for name, grad in checkpointed.items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, plain[name], msg=name)


def test_train_mode_reaches_lora_inside_the_frozen_towers_and_nothing_else_of_theirs():
    """Issue 20.3: `train()` keeps the frozen ViT and T5 in eval mode (no dropout / drop-path, as BLIP-2 trains), but
    it also silenced the LoRA dropout peft injects there. What trains inside a frozen tower now follows train():
    peft's adapter layers and submodules whose parameters all require grad."""
    targets = rf"({QFORMER_AND_T5_TARGETS}|vision_model\.blocks\.\d+\.attn\.proj)"
    model = tiny_stage2()
    peft_model = peft().get_peft_model(model, peft().LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                                target_modules=targets))
    model.language_model.decoder.block[-1].requires_grad_(True)  # and one T5 block unfrozen by hand
    peft_model.train()

    lora_dropouts = {name: m for name, m in model.named_modules() if name.endswith("lora_dropout.default")}
    assert {name.split(".")[0] for name in lora_dropouts} == {"vision_model", "qformer", "language_model"}
    assert all(isinstance(m, torch.nn.Dropout) and m.training for m in lora_dropouts.values())
    unfrozen = model.language_model.decoder.block[-1]
    for tower in (model.vision_model, model.language_model):
        own = {name: m for name, m in tower.named_modules() if "lora_" not in name and name != "" and not any(
            m is u for u in unfrozen.modules())}
        assert any("drop" in name.rsplit(".", 1)[-1] for name in own)  # T5's dropout, EVA's drop-path / dropout
        training = [name for name, m in own.items()
                    if m.training and not hasattr(m, "base_layer") and not isinstance(m, GradientCheckpointingLayer)]
        assert training == [], training  # the frozen towers' own dropout, drop-path and LoRA's base layers: eval
    assert all(m.training for m in unfrozen.modules())
    assert model.qformer.training and model.qformer.dropout.training  # trained in full, as before

    peft_model.eval()
    assert not any(m.training for m in peft_model.modules())


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "qformer_trains"])
def test_gradient_checkpointing_reaches_the_frozen_t5(lora):
    """transformers checkpoints a layer only in training mode, and the frozen T5 is kept in eval mode: checkpointing
    was silently off there and every T5 activation was kept, though the gradient of the Q-Former and of any adapter
    flows through it (what fine-tuning on one GPU runs out of). T5's blocks follow train(), so they are recomputed in
    backward; their dropout stays off, so the loss and every gradient equal the run without checkpointing."""
    def lora_step(checkpointing):
        model = tiny_stage2()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        peft_model = model
        if lora:
            peft_model = peft().get_peft_model(model, peft().LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                        target_modules=QFORMER_AND_T5_TARGETS))
        peft_model.train()
        calls = []
        model.language_model.encoder.block[0].layer[0].register_forward_hook(lambda *args: calls.append(1))
        loss = peft_model(**training_batch()).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
        return loss.item(), grads, len(calls)

    loss, grads, calls = lora_step(checkpointing=False)
    checkpointed_loss, checkpointed_grads, checkpointed_calls = lora_step(checkpointing=True)
    assert (calls, checkpointed_calls) == (1, 2)  # the T5 block ran again in backward
    assert checkpointed_loss == pytest.approx(loss, abs=1e-6)
    assert grads.keys() == checkpointed_grads.keys() and any(("language_model" if lora else "qformer") in n for n in grads)
    for name in grads:
        torch.testing.assert_close(checkpointed_grads[name], grads[name], msg=name)


def test_peft_seq2seq_lm_wrapper_runs_forward_and_generate(processor):
    """Issue 20.4: `task_type="SEQ_2_SEQ_LM"` wraps the model in peft's PeftModelForSeq2SeqLM, which calls forward
    with T5's full argument list (`inputs_embeds=None`, `decoder_inputs_embeds=None`, ...) and generate with keyword
    arguments only. A fresh LoRA (B = 0) changes nothing: the same loss and the same tokens."""
    model = tiny_stage2().eval()
    images = [random_image(seed=1), random_image(seed=2)]
    batch = processor(images=images, text=[QUESTION, "a photo of"], text_target=["red", "a red circle"],
                      return_tensors="pt")
    prompts = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")}
    with torch.no_grad():
        expected_loss = model(**batch).loss
    expected_tokens = model.generate(**prompts, max_new_tokens=5)

    peft_model = peft().get_peft_model(model, peft().LoraConfig(task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=8,
                                                                target_modules=QFORMER_AND_T5_TARGETS))
    assert isinstance(peft_model, peft().PeftModelForSeq2SeqLM)
    peft_model.eval()
    with torch.no_grad():
        output = peft_model(**batch)
    torch.testing.assert_close(output.loss, expected_loss)
    assert output.logits.shape[:2] == batch["labels"].shape
    assert torch.equal(peft_model.generate(**prompts, max_new_tokens=5), expected_tokens)


def test_processor_takes_the_tokenizers_padding_arguments(processor):
    """Issue 20.7: the processor hard-coded `padding=True` and also forwarded **kwargs: `padding=...` was a
    TypeError. It is now the default that the caller's padding arguments replace."""
    prompts = [QUESTION, "a photo of"]
    default = processor(text=prompts)["input_ids"]
    assert len(default[0]) == len(default[1]) > 3  # padded to the longest by default
    assert processor(text=prompts, padding=True)["input_ids"] == default
    unpadded = processor(text=prompts, padding=False)["input_ids"]
    assert len(unpadded[0]) != len(unpadded[1]) and unpadded[1] == default[1][: len(unpadded[1])]
    fixed = processor(text=prompts, padding="max_length", max_length=40, return_tensors="pt")
    assert fixed["input_ids"].shape == fixed["attention_mask"].shape == (2, 40)
    truncated = processor(text=prompts, truncation=True, max_length=6, return_tensors="pt")["input_ids"]
    assert truncated.shape == (2, 6) and truncated[0, -1] == processor.tokenizer.eos_token_id
    targets = processor(text_target=["red", "a red circle"], padding="max_length", max_length=8, return_tensors="pt")
    assert targets["labels"].shape == targets["decoder_attention_mask"].shape == (2, 8)


@pytest.fixture(scope="module")
def saved_stage2(tmp_path_factory, processor):
    path = tmp_path_factory.mktemp("blip2_tiny")
    model = tiny_stage2().eval()
    with torch.no_grad():  # a gentler random head, so that answers depend on image and prompt
        model.language_model.lm_head.weight.mul_(0.05)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path, model


def test_pipeline_answers_a_list_of_images_in_batches(saved_stage2, processor):
    """Issue 20.7: `transformers.pipeline("image-text-to-text")` with a list of images passes its own `padding`
    to the processor ("multiple values for keyword argument 'padding'"). Batched answers equal one-at-a-time ones."""
    from transformers import pipeline

    path, model = saved_stage2
    images, prompts = [random_image(seed=3), random_image(seed=4)], [QUESTION, "Question: how many shapes? Answer:"]
    pipe = pipeline("image-text-to-text", model=str(path))
    answers = pipe(images=images, text=prompts, batch_size=2, max_new_tokens=6, return_full_text=False)

    expected = []
    for image, prompt in zip(images, prompts):
        tokens = model.generate(**processor(images=[image], text=prompt, return_tensors="pt"), max_new_tokens=6)
        expected.append(processor.batch_decode(tokens, skip_special_tokens=True)[0])
    assert [answer["input_text"] for answer in answers] == prompts
    assert [answer["generated_text"] for answer in answers] == expected
    assert all(text.strip() for text in expected) and expected[0] != expected[1]


@pytest.mark.parametrize(("bits", "dtype"), [(8, torch.float16), (4, torch.float32)])
def test_bitsandbytes_quantized_model_answers_with_the_vision_tower_unquantized(bits, dtype, saved_stage2, processor):
    """Issue 20.5: under bitsandbytes, get_image_features cast the Q-Former output to language_projection's int8
    weight dtype, and timm's EVA attention multiplies by its qkv weight with F.linear itself (past the quantized
    layer's forward). The ViT now stays out of quantization, in the load dtype (not upcast to fp32); T5 and the
    projection are quantized, the Q-Former stays fp32 (`_keep_in_fp32_modules`, as before)."""
    bnb = require("bitsandbytes", "pip install 'hf-vlm[finetune]'")
    from transformers import BitsAndBytesConfig

    path, model = saved_stage2
    quantization = BitsAndBytesConfig(load_in_8bit=bits == 8, load_in_4bit=bits == 4)
    quantized = Blip2FlanT5ForConditionalGeneration.from_pretrained(path, quantization_config=quantization,
                                                                     dtype=dtype).eval()
    quantized_layer = bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit
    assert isinstance(quantized.language_model.encoder.block[0].layer[0].SelfAttention.q, quantized_layer)
    assert isinstance(quantized.language_projection, quantized_layer)
    assert not quantized.language_projection.weight.is_floating_point()
    for tower, tower_dtype in ((quantized.vision_model, dtype), (quantized.qformer, torch.float32)):
        assert not any(isinstance(m, quantized_layer) for m in tower.modules())
        assert {p.dtype for p in tower.parameters()} == {tower_dtype}

    batch = processor(images=[random_image(seed=3), random_image(seed=4)], text=[QUESTION, "a photo of"],
                      text_target=["red", "a red circle"], return_tensors="pt")
    prompts = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")}
    with torch.no_grad():
        loss, expected_loss = quantized(**batch).loss.float(), model(**batch).loss
        image_features = quantized.get_image_features(batch["pixel_values"]).pooler_output
    assert image_features.shape == (2, 8, 64) and image_features.dtype == dtype
    # measured: 8-bit in fp16 within 0.03% of the fp32 model's loss, 4-bit (NF4 of 64-wide layers) within 0.2%
    torch.testing.assert_close(loss, expected_loss, rtol=0.01 if bits == 8 else 0.05, atol=0)
    tokens = quantized.generate(**prompts, max_new_tokens=5)
    assert tokens.shape[0] == 2 and 2 <= tokens.shape[1] <= 6
    assert tokens.min() >= 0 and tokens.max() < quantized.config.text_config.vocab_size


def test_torchao_int8_model_answers_with_the_vision_tower_unquantized(saved_stage2, processor):
    """Issue 20.5, torchao: its int8 weights reject the keyword arguments of EVA's F.linear call, so the ViT stays
    out of quantization here too."""
    require("torchao", "pip install torchao")
    from torchao.quantization import Int8Tensor, Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    path, model = saved_stage2
    quantized = Blip2FlanT5ForConditionalGeneration.from_pretrained(
        path, quantization_config=TorchAoConfig(Int8WeightOnlyConfig())).eval()
    assert isinstance(quantized.language_model.encoder.block[0].layer[0].SelfAttention.q.weight, Int8Tensor)
    assert not any(isinstance(p, Int8Tensor) for p in quantized.vision_model.parameters())
    batch = processor(images=[random_image(seed=3), random_image(seed=4)], text=[QUESTION, "a photo of"],
                      text_target=["red", "a red circle"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(quantized(**batch).loss, model(**batch).loss, rtol=0.01, atol=0)
    prompts = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")}
    assert quantized.generate(**prompts, max_new_tokens=5).shape[0] == 2
