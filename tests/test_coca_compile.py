"""CoCa for fine-tuning and fast captioning on one GPU (issue 20): reentrant gradient checkpointing (also under
LoRA), the static generation cache, compiled generation in one graph, and quantized captioning.

Compiled tests use a graph-recording backend (dynamo traces, nothing is code-generated): they prove the graph
structure and the tokens, cheaply; benchmarks/bench_coca_compile.py measures inductor's speed."""

import copy

import pytest
import torch

import hf_vlm  # noqa: F401  (registers the Auto classes)
from hf_vlm.modeling.coca import CocaModel
from hf_vlm.presets import get_config

BOS, EOS = 3, 1


def tiny_model() -> CocaModel:
    """coca-tiny with a sharpened vocabulary projection: random weights give near-uniform next-token distributions;
    scaled, decoding depends clearly on the image and the prefix, and the captions differ from row to row."""
    torch.manual_seed(0)
    model = CocaModel(get_config("coca-tiny")).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(5)
    return model


def prompts():
    """Three images and left-padded prompts of 4, 2 and 3 tokens."""
    pixel_values = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    input_ids = torch.tensor([[BOS, 10, 11, 12], [0, 0, BOS, 20], [0, BOS, 30, 31]])
    return pixel_values, input_ids, (input_ids != 0).long()


class GraphRecorder:
    """A torch.compile backend that records each graph dynamo hands it and counts the calls of the compiled code."""

    def __init__(self):
        self.graphs, self.calls = [], 0

    def __call__(self, graph_module, example_inputs):
        self.graphs.append(graph_module)

        def run(*args):
            self.calls += 1
            return graph_module.forward(*args)

        return run

    def __deepcopy__(self, memo):  # transformers' CompileConfig deep-copies its backend: keep recording here
        return self


# ------------------------------------------------------------------------------------ checkpointing
def _lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():  # LoRA's B starts at zero, which would leave every A without a gradient to compare
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    return model


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_reentrant_checkpointing_trains_every_parameter_as_without_checkpointing(lora):
    """Issue 20.1: `gradient_checkpointing_enable(use_reentrant=True)` (what Trainer calls with
    `gradient_checkpointing_kwargs`), then a training step: every trainable parameter gets the gradient it gets
    without checkpointing, also under LoRA on every Linear (ViT trunk, poolers, both text stacks), where the
    frozen inputs (pixel values, frozen embeddings) do not require grad and reentrant checkpointing back-propagates
    only through the tensors a checkpointed layer gets positionally."""
    pixel_values, input_ids, attention_mask = prompts()
    grads = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if lora:
            model = _lora(model)
        if checkpointing:
            with pytest.warns(FutureWarning):  # the deprecated name, as the issue (and older Trainers) call it
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            base = model.get_base_model() if lora else model
            assert base.vision_model.trunk.grad_checkpointing
            assert all(layer.cross_attn_block.gradient_checkpointing for layer in base.text_decoder.layers)
        torch.manual_seed(2)  # the same LoRA dropout masks (none by default) and the same data
        loss = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                     return_loss=True).loss
        loss.backward()
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        missing = [n for n, p in trainable.items() if p.grad is None]
        assert not missing, f"trainable parameters without a gradient: {missing[:5]}"
        grads.append({n: p.grad for n, p in trainable.items()})
    assert grads[0].keys() == grads[1].keys()
    if lora:
        assert any("trunk" in n for n in grads[0]) and any("cross_attn" in n for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


# ------------------------------------------------------------------------------------------- static cache
@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beams3"])
@torch.no_grad()
def test_static_cache_generates_the_dynamic_cache_tokens(num_beams):
    """`cache_implementation="static"` (refused before issue 20.6) gives the default cache's tokens: batched prompts
    of different lengths, captions that end at different steps (an end token the rows reach at different times)."""
    model = tiny_model()
    pixel_values, input_ids, attention_mask = prompts()
    dynamic = model.generate(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                             max_new_tokens=8, num_beams=num_beams)
    assert len({tuple(row) for row in dynamic[:, 4:].tolist()}) == 3, "the test needs captions that differ"
    eos = int(dynamic[1, 6])  # the middle row ends after 3 new tokens
    kwargs = dict(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=8,
                  num_beams=num_beams, eos_token_id=eos, pad_token_id=0)
    dynamic = model.generate(**kwargs, return_dict_in_generate=True)
    static = model.generate(**kwargs, cache_implementation="static", return_dict_in_generate=True)
    assert type(static.past_key_values.self_attention_cache.layers[0]).__name__ == "StaticLayer"
    assert (dynamic.sequences == eos).any(-1).tolist().count(True) >= 1
    torch.testing.assert_close(static.sequences, dynamic.sequences, rtol=0, atol=0)


@torch.no_grad()
def test_beam_search_leaves_the_image_keys_and_values_in_place():
    """Every beam of an image holds that image's K/V and beams never move between images: the cache reorders only
    the self-attention K/V (transformers' EncoderDecoderCache also copies the image K/V at every step); the beams
    are those of a plain EncoderDecoderCache."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    model = tiny_model()
    pixel_values, input_ids, attention_mask = prompts()
    kwargs = dict(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=6,
                  num_beams=3, return_dict_in_generate=True)
    ours = model.generate(**kwargs)
    plain = model.generate(**kwargs, past_key_values=EncoderDecoderCache(DynamicCache(), DynamicCache()))
    torch.testing.assert_close(ours.sequences, plain.sequences, rtol=0, atol=0)

    cache = ours.past_key_values
    image_keys = [layer.keys for layer in cache.cross_attention_cache.layers]
    text_keys = cache.self_attention_cache.layers[0].keys.clone()
    beam_idx = torch.tensor([2, 2, 0, 3, 4, 5, 8, 6, 7])  # beams regrouped within each image's 3
    cache.reorder_cache(beam_idx)
    assert all(layer.keys is keys for layer, keys in zip(cache.cross_attention_cache.layers, image_keys))
    torch.testing.assert_close(cache.self_attention_cache.layers[0].keys, text_keys[beam_idx])


def test_unsupported_cache_implementations_are_refused_naming_the_supported_ones():
    with pytest.raises(ValueError, match="'dynamic' \\(the default\\) or 'static', not 'quantized'"):
        tiny_model().generate(pixel_values=torch.randn(1, 3, 32, 32), max_new_tokens=2,
                              cache_implementation="quantized")


@torch.no_grad()
def test_a_static_cache_step_takes_a_short_or_a_padded_mask():
    """A decoding step called by hand: the mask may cover the cached + new tokens (as with a dynamic cache) or
    the static cache's full length; a mask of any other length is refused, naming the expected shape."""
    model = tiny_model()
    pixel_values, input_ids, attention_mask = prompts()
    cache = model.generate(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                           max_new_tokens=2, cache_implementation="static", max_cache_len=10,
                           return_dict_in_generate=True).past_key_values
    assert int(cache.get_seq_length()) == 5, "4 prompt tokens + the first new token"
    key_slots = cache.get_mask_sizes(1, 0)[0]
    assert key_slots == 10
    next_ids = torch.tensor([[7], [8], [9]])
    short = torch.cat([attention_mask, torch.ones(3, 2, dtype=torch.long)], dim=1)  # 6 = cached + new
    padded = torch.nn.functional.pad(short, (0, key_slots - 6))
    logits_short = model(input_ids=next_ids, attention_mask=short, past_key_values=copy.deepcopy(cache),
                         use_cache=True).logits
    logits_padded = model(input_ids=next_ids, attention_mask=padded, past_key_values=copy.deepcopy(cache),
                          use_cache=True).logits
    torch.testing.assert_close(logits_short, logits_padded)
    with pytest.raises(ValueError, match=r"expected \(3, 6\) \(batch, cached \+ new tokens\)"):
        model(input_ids=next_ids, attention_mask=short[:, :5], past_key_values=copy.deepcopy(cache), use_cache=True)


# ------------------------------------------------------------------------------------------------ compile
@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beams3"])
@torch.no_grad()
def test_compiled_generation_is_one_graph_for_every_decoding_step(num_beams):
    """Issue 20.6: `torch.compile(model.forward, fullgraph=True)` (a graph break would raise) with a static cache:
    one graph for the prefill, one for every decoding step (the step holds no Python int that changes, so nothing
    recompiles), and the eager tokens, for greedy and beam search over prompts of different lengths."""
    model = tiny_model()
    pixel_values, input_ids, attention_mask = prompts()
    kwargs = dict(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=6,
                  num_beams=num_beams, cache_implementation="static")
    eager = model.generate(**kwargs)
    recorder = GraphRecorder()
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend=recorder, fullgraph=True)
    compiled = model.generate(**kwargs)
    assert len(recorder.graphs) == 2 and recorder.calls == 6, "prefill + one graph for the 5 decoding steps"
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


@torch.no_grad()
def test_transformers_compiled_decoding_accepts_the_static_cache():
    """transformers' own compiled generation (`compile_config`, which `generate` applies only to a compileable
    cache; on CPU only when asked with `_compile_all_devices`, as on an accelerator by default): the decoding
    steps run one graph, and give the eager tokens."""
    from transformers import CompileConfig

    model = tiny_model()
    pixel_values, input_ids, attention_mask = prompts()
    kwargs = dict(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=6,
                  cache_implementation="static")
    eager = model.generate(**kwargs)
    recorder = GraphRecorder()
    compile_config = CompileConfig(fullgraph=True, backend=recorder, mode=None)
    compile_config._compile_all_devices = True
    torch._dynamo.reset()
    compiled = model.generate(**kwargs, compile_config=compile_config)
    assert len(recorder.graphs) == 1 and recorder.calls == 5, "the prefill runs eagerly, then 5 steps in one graph"
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- quantization
def _quantization_config(kind: str):
    from transformers import BitsAndBytesConfig, TorchAoConfig

    if kind == "bnb-8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if kind == "bnb-4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    from torchao.quantization import Int8WeightOnlyConfig

    return TorchAoConfig(Int8WeightOnlyConfig())


@pytest.mark.parametrize("kind, min_cosine", [("bnb-8bit", 0.999), ("bnb-4bit", 0.9), ("torchao-int8", 0.999)])
@torch.no_grad()
def test_quantized_coca_captions_with_its_vision_tower_quantized(tmp_path, kind, min_cosine):
    """`from_pretrained(quantization_config=...)` on CPU (bitsandbytes 8-bit / 4-bit, torchao int8): every Linear is
    quantized, the timm ViT trunk's included, which needs no exclusion: timm's ViT attention calls its `qkv` module
    (EVA's, in BLIP-2, calls `F.linear(x, weight=...)`, which int8 weights reject). Embeddings and caption logits
    follow the full-precision model's; captions generate with both caches alike."""
    pytest.importorskip("bitsandbytes" if kind.startswith("bnb") else "torchao")
    model = tiny_model()
    model.save_pretrained(tmp_path)
    quantized = CocaModel.from_pretrained(tmp_path, quantization_config=_quantization_config(kind), device_map="cpu")
    qkv = quantized.vision_model.trunk.blocks[0].attn.qkv
    assert type(qkv).__name__ in {"Linear8bitLt", "Linear4bit"} or type(qkv.weight).__name__ == "Int8Tensor"
    pixel_values, input_ids, attention_mask = prompts()
    full = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask)
    out = quantized(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask)
    for name in ("image_embeds", "text_embeds", "logits"):
        cosine = torch.nn.functional.cosine_similarity(out[name].flatten(1), full[name].flatten(1)).min()
        assert cosine > min_cosine, (name, cosine.item())
    dynamic = quantized.generate(pixel_values=pixel_values, max_new_tokens=5)
    static = quantized.generate(pixel_values=pixel_values, max_new_tokens=5, cache_implementation="static")
    assert dynamic.shape == (3, 6)
    torch.testing.assert_close(static, dynamic, rtol=0, atol=0)
