"""BLIP-2-FlanT5 (blip2-tiny) in the Hugging Face ecosystem: processor, Auto classes, trust_remote_code loading
without hf_vlm, transformers.pipeline, stage 1 -> stage 2, bf16, gradient checkpointing."""

import json
import textwrap

import pytest
import torch

import hf_vlm  # noqa: F401  (registers the Auto classes)
from hf_vlm.modeling.blip2_flant5 import (
    Blip2FlanT5ForConditionalGeneration,
    Blip2FlanT5ForPretraining,
    Blip2FlanT5Processor,
)
from hf_vlm.presets import get_config
from hf_vlm.testing import random_image, run_python_without_hf_vlm

QUESTION = "Question: what color is the circle? Short answer:"

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def tiny_stage2(seed=0):
    torch.manual_seed(seed)
    model = Blip2FlanT5ForConditionalGeneration(get_config("blip2-tiny")).eval()
    with torch.no_grad():  # a gentler random head, so that answers depend on image and prompt
        model.language_model.lm_head.weight.mul_(0.05)
    return model


@pytest.fixture(scope="module")
def processor(t5_tokenizer_dir, bert_tokenizer_dir):
    from transformers import AutoTokenizer

    return Blip2FlanT5Processor.from_tokenizers(
        AutoTokenizer.from_pretrained(t5_tokenizer_dir), AutoTokenizer.from_pretrained(bert_tokenizer_dir), image_size=32
    )


@pytest.fixture(scope="module")
def saved_stage2(tmp_path_factory, processor):
    path = tmp_path_factory.mktemp("blip2_tiny")
    model = tiny_stage2()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path, model


def test_processor_prepares_images_prompts_targets_and_qformer_text(processor, tmp_path):
    from transformers import AutoProcessor

    images = [random_image(48, seed=0), random_image(40, seed=1)]
    batch = processor(images=images, text=[QUESTION, "a photo of"], text_target=["red", "a cat"],
                      qformer_text=["a red circle", "a cat"], return_tensors="pt")
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    eos, pad = processor.tokenizer.eos_token_id, processor.tokenizer.pad_token_id
    short = int(batch["attention_mask"][1].sum())
    assert batch["input_ids"][1, short - 1] == eos and (batch["input_ids"][1, short:] == pad).all()  # right padding
    assert batch["labels"].shape[0] == 2
    assert batch["qformer_input_ids"].shape == (2, 32)  # padded to max_text_length, BERT [CLS] first
    assert batch["qformer_input_ids"][0, 0] == processor.qformer_tokenizer.cls_token_id
    # Pixels: bicubic 32 px, CLIP normalization (a mid-grey image maps to (0.5 - mean) / std).
    from PIL import Image

    grey = processor(images=Image.new("RGB", (64, 64), (128, 128, 128)), return_tensors="pt")["pixel_values"]
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    torch.testing.assert_close(grey[0, :, 5, 5], (128 / 255 - mean) / std)

    processor.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(reloaded) is Blip2FlanT5Processor and reloaded.qformer_tokenizer is not None
    again = reloaded(images=images, text=[QUESTION, "a photo of"], qformer_text=["a red circle", "a cat"], return_tensors="pt")
    for key in again:
        assert torch.equal(again[key], batch[key]), key
    assert reloaded.batch_decode(batch["labels"], skip_special_tokens=True) == ["red", "a cat"]

    stage2_only = Blip2FlanT5Processor.from_tokenizers(processor.tokenizer, image_size=32)
    with pytest.raises(ValueError, match="qformer_tokenizer"):
        stage2_only(qformer_text="a cat")


def test_auto_classes_load_the_saved_folder(saved_stage2, processor):
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

    path, model = saved_stage2
    assert type(AutoConfig.from_pretrained(path)).__name__ == "Blip2FlanT5Config"
    assert type(AutoProcessor.from_pretrained(path)) is Blip2FlanT5Processor
    for auto in (AutoModel, AutoModelForImageTextToText):
        loaded = auto.from_pretrained(path).eval()
        assert type(loaded) is Blip2FlanT5ForConditionalGeneration
        # Loading replaces parameters: the frozen parts must still be frozen.
        trainable = {n.split(".")[0] for n, p in loaded.named_parameters() if p.requires_grad}
        assert trainable == {"ln_vision", "query_tokens", "qformer", "language_projection"}
    batch = processor(images=[random_image(seed=2)], text=QUESTION, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(loaded(**batch, labels=batch["input_ids"]).logits, model(**batch, labels=batch["input_ids"]).logits)


def test_saved_folder_loads_with_trust_remote_code_where_hf_vlm_is_missing(saved_stage2, processor, tmp_path):
    path, model = saved_stage2
    config = json.loads((path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_blip2_flant5.Blip2FlanT5Config",
        "AutoModel": "modeling_blip2_flant5.Blip2FlanT5ForConditionalGeneration",
        "AutoModelForImageTextToText": "modeling_blip2_flant5.Blip2FlanT5ForConditionalGeneration",
    }
    assert json.loads((path / "processor_config.json").read_text())["auto_map"]["AutoProcessor"] == (
        "processing_blip2_flant5.Blip2FlanT5Processor"
    )
    for name in ("configuration_blip2_flant5.py", "modeling_blip2_flant5.py", "processing_blip2_flant5.py"):
        assert (path / name).is_file(), name

    images = [random_image(seed=3), random_image(seed=4)]
    batch = processor(images=images, text=[QUESTION, "a photo of"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch, labels=batch["input_ids"][:, :3]).logits
        answers = model.generate(**batch, max_new_tokens=5, num_beams=2)
    code = textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor
        model = AutoModelForImageTextToText.from_pretrained({str(path)!r}, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained({str(path)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert not any(p.requires_grad for p in model.language_model.parameters())  # frozen after loading too
        from PIL import Image
        images = [Image.open({str(tmp_path / "0.png")!r}), Image.open({str(tmp_path / "1.png")!r})]
        batch = processor(images=images, text=[{QUESTION!r}, "a photo of"], return_tensors="pt")
        with torch.no_grad():
            logits = model(**batch, labels=batch["input_ids"][:, :3]).logits
            answers = model.generate(**batch, max_new_tokens=5, num_beams=2)
        torch.save({{"logits": logits, "answers": answers, "pixel_values": batch["pixel_values"]}}, {str(tmp_path / "out.pt")!r})
    """)
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
    result = run_python_without_hf_vlm(code, cwd=tmp_path, env={"HF_MODULES_CACHE": str(tmp_path / "modules"),
                                                                "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(tmp_path / "out.pt")
    assert torch.equal(remote["pixel_values"], batch["pixel_values"])
    assert torch.equal(remote["logits"], logits)
    assert torch.equal(remote["answers"], answers)


def test_pipeline_answers_a_question_and_captions_an_image(saved_stage2, processor):
    from transformers import pipeline

    path, model = saved_stage2
    pipe = pipeline("image-text-to-text", model=str(path))
    assert type(pipe.model) is Blip2FlanT5ForConditionalGeneration
    image = random_image(seed=5)

    def expected(prompt):
        batch = processor(images=[image], text=prompt, return_tensors="pt")
        return processor.batch_decode(model.generate(**batch, max_new_tokens=6), skip_special_tokens=True)[0]

    answer = pipe(images=image, text=QUESTION, max_new_tokens=6, return_full_text=False)
    assert answer[0]["generated_text"] == expected(QUESTION) and answer[0]["generated_text"].strip()
    # Captioning: the empty prompt (T5 encodes it as a lone </s>, as LAVIS captions).
    caption = pipe(images=image, text="", max_new_tokens=6)
    assert caption[0]["generated_text"] == expected("") and caption[0]["generated_text"].strip()
    assert processor(text="", return_tensors="pt")["input_ids"].tolist() == [[processor.tokenizer.eos_token_id]]


def test_stage1_checkpoint_initializes_stage2_with_only_its_heads_unused(tmp_path):
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(0)
    config = get_config("blip2-tiny")
    stage1 = Blip2FlanT5ForPretraining(config)
    stage1.save_pretrained(tmp_path / "stage1")
    t5 = T5ForConditionalGeneration(config.text_config)
    t5.save_pretrained(tmp_path / "t5")

    model, info = Blip2FlanT5ForConditionalGeneration.from_stage1(tmp_path / "stage1", tmp_path / "t5",
                                                                  output_loading_info=True)
    assert info["newly_initialized_keys"] == ["language_projection.bias", "language_projection.weight"]
    unused = set(info["unused_stage1_keys"])
    heads = {k for k in unused if not k.startswith("qformer.")}
    assert heads == {"temp", "itm_head.weight", "itm_head.bias", "vision_proj.weight", "vision_proj.bias",
                     "text_proj.weight", "text_proj.bias", "lm_head.decoder.bias", "lm_head.transform.dense.weight",
                     "lm_head.transform.dense.bias", "lm_head.transform.LayerNorm.weight", "lm_head.transform.LayerNorm.bias"}
    text_path = unused - heads
    assert {k.split(".")[1] for k in text_path} == {"embeddings", "encoder"}
    assert all(".intermediate." in k or ".output." in k for k in text_path if k.startswith("qformer.encoder."))
    stage1_state, stage2_state = stage1.state_dict(), model.state_dict()
    for key, value in stage2_state.items():
        if key.startswith("language_model."):
            assert torch.equal(value, t5.state_dict()[key.removeprefix("language_model.")]), key
        elif not key.startswith("language_projection."):
            assert torch.equal(value, stage1_state[key]), key
    assert not any(p.requires_grad for p in model.language_model.parameters())
    pixel_values = torch.randn(1, 3, 32, 32)
    assert model.generate(pixel_values, max_new_tokens=3).shape[0] == 1


def test_bf16_forward_and_generate_stay_close_to_fp32(processor):
    model = tiny_stage2()
    batch = processor(images=[random_image(seed=6), random_image(seed=7)], text=[QUESTION, "a photo of"],
                      return_tensors="pt")
    labels = processor(text=["red", "a cat"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        fp32 = model(**batch, labels=labels)
        fp32_answers = model.generate(**batch, max_new_tokens=4)
        model.to(torch.bfloat16)
        bf16 = model(**batch, labels=labels)
        bf16_answers = model.generate(**batch, max_new_tokens=4)
    assert bf16.logits.dtype == torch.bfloat16
    scale = fp32.logits.abs().max()
    assert (bf16.logits.float() - fp32.logits).abs().max() < 0.05 * scale
    assert abs(bf16.loss.item() - fp32.loss.item()) < 0.05 * fp32.loss.item()
    assert bf16_answers.shape[0] == 2 and torch.equal(bf16_answers[:, :2], fp32_answers[:, :2])


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_gradient_checkpointing_gives_the_same_gradients(stage):
    torch.manual_seed(0)
    config = get_config("blip2-tiny", freeze_vision=False, qformer_config={**get_config("blip2-tiny").qformer_config.to_dict(),
                                                                          "hidden_dropout_prob": 0.0,
                                                                          "attention_probs_dropout_prob": 0.0})
    model_class = Blip2FlanT5ForPretraining if stage == "stage1" else Blip2FlanT5ForConditionalGeneration
    model = model_class(config).train()
    input_ids = torch.tensor([[2, 7, 8, 3], [2, 10, 3, 0]])
    batch = dict(pixel_values=torch.randn(2, 3, 32, 32), input_ids=input_ids, attention_mask=(input_ids != 0).long())
    if stage == "stage2":
        batch["labels"] = torch.tensor([[10, 11, 1], [12, 1, 0]])

    def gradients():
        model.zero_grad()
        torch.manual_seed(1)  # the same ITM negatives
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    model.activation_checkpointing_enable()
    assert model.vision_model.grad_checkpointing
    assert all(layer.gradient_checkpointing for layer in model.qformer.encoder.layer)
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys() and any(k.startswith("vision_model.") for k in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)
