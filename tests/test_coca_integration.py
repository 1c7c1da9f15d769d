"""CoCa in the transformers ecosystem, on coca-tiny: Auto classes, Hub-portable save/load without hf_vlm,
the zero-shot and image-text-to-text pipelines, bf16, and the gathered contrastive loss on 2 ranks."""

import json

import pytest
import torch
import transformers

import hf_vlm  # noqa: F401  (registers the Auto classes)
from hf_vlm.modeling.coca import CocaConfig, CocaModel, CocaProcessor
from hf_vlm.presets import preset_dict
from hf_vlm.testing import TINY_CORPUS, random_image, run_python_without_hf_vlm
from hf_vlm.tokenization import train_coca_tokenizer


def tiny_config(vocab_size: int) -> CocaConfig:
    kwargs = preset_dict("coca-tiny")
    kwargs.pop("model_type")
    kwargs["text_config"]["vocab_size"] = vocab_size
    return CocaConfig(**kwargs)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A coca-tiny model and processor (SentencePiece tokenizer trained on TINY_CORPUS), saved to a folder."""
    path = tmp_path_factory.mktemp("coca_tiny")
    tokenizer = train_coca_tokenizer(TINY_CORPUS, vocab_size=96)
    processor = CocaProcessor.from_tokenizer(tokenizer, image_size=32)
    torch.manual_seed(0)
    model = CocaModel(tiny_config(len(tokenizer))).eval()
    with torch.no_grad():  # sharper next-token distributions: captions depend on the image
        model.lm_head.weight.mul_(30)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path, model, processor


def inputs(processor, n=2):
    images = [random_image(48, seed=i) for i in range(n)]
    return processor(images=images, text=TINY_CORPUS[:n], padding=True, return_tensors="pt")


def test_import_registers_every_auto_class(saved):
    path, model, processor = saved
    assert isinstance(transformers.AutoConfig.from_pretrained(path), CocaConfig)
    batch = inputs(processor)
    expected = model(**batch)
    for auto in (
        transformers.AutoModel,
        transformers.AutoModelForZeroShotImageClassification,
        transformers.AutoModelForImageTextToText,
    ):
        loaded = auto.from_pretrained(path).eval()
        assert type(loaded) is CocaModel, auto.__name__
        torch.testing.assert_close(loaded(**batch).logits, expected.logits, rtol=0, atol=0)
    loaded_processor = transformers.AutoProcessor.from_pretrained(path)
    assert isinstance(loaded_processor, CocaProcessor)
    for key, value in loaded_processor(images=[random_image(48)], text=["a red circle"], return_tensors="pt").items():
        assert torch.equal(value, processor(images=[random_image(48)], text=["a red circle"], return_tensors="pt")[key])


def test_saved_folder_has_auto_map_and_modeling_files(saved):
    path, _, _ = saved
    auto_map = json.loads((path / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_coca.CocaConfig",
        "AutoModel": "modeling_coca.CocaModel",
        "AutoModelForZeroShotImageClassification": "modeling_coca.CocaModel",
        "AutoModelForImageTextToText": "modeling_coca.CocaModel",
    }
    assert json.loads((path / "processor_config.json").read_text())["auto_map"] == {
        "AutoProcessor": "processing_coca.CocaProcessor"
    }
    for name in ("configuration_coca.py", "modeling_coca.py", "processing_coca.py"):
        source = (path / name).read_text()
        assert "import hf_vlm" not in source and "from hf_vlm" not in source, name


def test_trust_remote_code_without_hf_vlm_gives_identical_outputs(saved, tmp_path, torch_one_thread):
    # One intra-op thread here and in the remote process: the same reduction order, so equal weights give bit-equal
    # outputs (a fresh-clone run once saw logits_per_image differ in the last bit with the threads unpinned).
    path, model, processor = saved
    batch = inputs(processor)
    torch.save(dict(batch), tmp_path / "inputs.pt")
    random_image(48, seed=7).save(tmp_path / "image.png")
    code = f"""
import torch, transformers
from transformers import AutoModel, AutoProcessor
torch.set_num_threads(1)
path = {str(path)!r}
model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
batch = torch.load({str(tmp_path / "inputs.pt")!r})
images = batch["pixel_values"]
with torch.no_grad():
    out = model(**batch, return_loss=True)
    captions = model.generate(pixel_values=images, max_new_tokens=6, num_beams=2)
image = {str(tmp_path / "image.png")!r}
zero_shot = transformers.pipeline("zero-shot-image-classification", model=path, trust_remote_code=True)
scores = zero_shot(image, candidate_labels=["circle", "square"])
caption = transformers.pipeline("image-text-to-text", model=path, trust_remote_code=True)
generated = caption(images=image, text="a", max_new_tokens=4)
torch.save(dict(loss=out.loss, logits=out.logits, logits_per_image=out.logits_per_image, captions=captions,
                text=processor.batch_decode(captions, skip_special_tokens=True), scores=scores,
                generated=generated), {str(tmp_path / "out.pt")!r})
"""
    result = run_python_without_hf_vlm(code, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        out = model(**batch, return_loss=True)
        captions = model.generate(pixel_values=batch["pixel_values"], max_new_tokens=6, num_beams=2)
    assert torch.equal(remote["logits"], out.logits) and torch.equal(remote["loss"], out.loss)
    assert torch.equal(remote["logits_per_image"], out.logits_per_image)
    assert torch.equal(remote["captions"], captions)
    assert remote["text"] == processor.batch_decode(captions, skip_special_tokens=True)
    # the pipelines run from the remote code too, with the results of the in-package model
    local_scores = transformers.pipeline("zero-shot-image-classification", model=str(path))(
        str(tmp_path / "image.png"), candidate_labels=["circle", "square"]
    )
    assert [r["label"] for r in remote["scores"]] == [r["label"] for r in local_scores]
    assert [r["score"] for r in remote["scores"]] == pytest.approx([r["score"] for r in local_scores], abs=1e-6)
    local_caption = transformers.pipeline("image-text-to-text", model=str(path))(
        images=str(tmp_path / "image.png"), text="a", max_new_tokens=4
    )
    assert remote["generated"] == local_caption


def test_zero_shot_image_classification_pipeline(saved):
    path, model, processor = saved
    classify = transformers.pipeline("zero-shot-image-classification", model=str(path))
    labels = ["circle", "square", "triangle"]
    image = random_image(48, seed=5)
    result = classify(image, candidate_labels=labels, hypothesis_template="a photo of a {}")
    assert sorted(r["label"] for r in result) == sorted(labels)
    # the pipeline's scores are the softmax of the model's image-text logits
    batch = processor(images=[image], text=[f"a photo of a {label}" for label in labels], padding=True,
                      return_tensors="pt")
    with torch.no_grad():
        probs = model(**batch).logits_per_image.softmax(-1)[0]
    assert {r["label"]: pytest.approx(r["score"], abs=1e-5) for r in result} == dict(zip(labels, probs.tolist()))


def test_image_text_to_text_pipeline_captions_and_continues_prompts(saved):
    path, model, processor = saved
    caption = transformers.pipeline("image-text-to-text", model=str(path))
    # the pipeline decodes as the checkpoint recommends (its generation_config.json), explicit arguments on top
    recommended = transformers.GenerationConfig.from_pretrained(path)
    assert caption.model.generation_config.num_beams == recommended.num_beams == 6
    images = [random_image(48, seed=i) for i in range(2)]
    # no prompt: text="" (the pipeline requires a text); the result is the model's own caption
    result = caption(images=images[0], text="", max_new_tokens=6)
    expected = model.generate(pixel_values=processor(images=images[:1], return_tensors="pt").pixel_values,
                              max_new_tokens=6, generation_config=recommended)
    assert result[0]["generated_text"] == processor.batch_decode(expected, skip_special_tokens=True)[0]
    # batched prompts of different lengths (right-padded by the processor) continue each prompt
    prompts = ["a small", "a photo of a"]
    results = caption(images=images, text=prompts, max_new_tokens=4, return_full_text=True)
    for image, prompt, result in zip(images, prompts, results):
        single = processor(images=[image], text=[prompt], return_tensors="pt")
        ids = model.generate(**single, max_new_tokens=4, generation_config=recommended)
        text = result[0]["generated_text"] if isinstance(result, list) else result["generated_text"]
        assert text == processor.batch_decode(ids, skip_special_tokens=True)[0]
        assert text.startswith(prompt)


def test_bf16_forward_and_generate_close_to_fp32(saved):
    _, model, processor = saved
    batch = inputs(processor)
    bf16 = CocaModel(model.config).eval()
    bf16.load_state_dict(model.state_dict())
    bf16.to(torch.bfloat16)
    with torch.no_grad():
        full = model(**batch, return_loss=True)
        half = bf16(**{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch.items()},
                    return_loss=True)
        assert half.logits.dtype == torch.bfloat16
        torch.testing.assert_close(half.image_embeds.float(), full.image_embeds, atol=0.05, rtol=0.05)
        torch.testing.assert_close(half.text_embeds.float(), full.text_embeds, atol=0.05, rtol=0.05)
        assert abs(half.loss.item() - full.loss.item()) < 0.05 * full.loss.item()
        agreement = (half.logits.argmax(-1) == full.logits.argmax(-1)).float().mean()
        assert agreement > 0.9
        captions = bf16.generate(pixel_values=batch["pixel_values"].to(torch.bfloat16), max_new_tokens=5)
        assert captions.shape[0] == 2 and captions.dtype == torch.long


def _rank_losses_and_grads(rank, world_size, port, images, input_ids, result_path):
    """One rank of a 2-process gloo group: contrastive loss and gradients for its half of the batch."""
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    model = CocaModel(tiny_config(96)).train()
    half = slice(rank * len(images) // world_size, (rank + 1) * len(images) // world_size)
    out = model(input_ids=input_ids[half], pixel_values=images[half], return_loss=True)
    out.contrastive_loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    dist.all_reduce(grads)
    grads /= world_size  # what DistributedDataParallel does
    if rank == 0:
        torch.save({"loss": out.contrastive_loss.detach(), "grads": grads}, result_path)
    dist.destroy_process_group()


@pytest.mark.distributed
def test_contrastive_loss_gathers_across_ranks_with_gradient(tmp_path):
    """2 ranks x B samples give the loss and (DDP-averaged) gradients of 1 rank x 2B samples."""
    import socket

    import torch.multiprocessing as mp

    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    input_ids = torch.randint(4, 96, (4, 6), generator=torch.Generator().manual_seed(1))
    input_ids[:, 0] = 3
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # spawn, not fork: a forked child cannot run backward once autograd's threads started in this process, and
    # whether an earlier test on the same pytest worker started them depends on the order tests are dealt out
    mp.start_processes(_rank_losses_and_grads, args=(2, port, images, input_ids, tmp_path / "ranks.pt"), nprocs=2,
                       start_method="spawn")
    distributed = torch.load(tmp_path / "ranks.pt")

    torch.manual_seed(0)
    model = CocaModel(tiny_config(96)).train()
    out = model(input_ids=input_ids, pixel_values=images, return_loss=True)
    out.contrastive_loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    torch.testing.assert_close(distributed["loss"], out.contrastive_loss.detach())
    torch.testing.assert_close(distributed["grads"], grads, atol=1e-5, rtol=1e-4)
