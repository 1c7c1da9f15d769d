"""Fine-tuning on one GPU (issue 20): `finetune.py --lora` with the families' default target modules, on a base loaded
in 8-bit / 4-bit (bitsandbytes) and with `--torch_compile`, through the stock Trainer, in process on tiny checkpoints.
The saved adapter loads with `PeftModel.from_pretrained` on the base pulled by repo id (hf_vlm.testing_hub's local
endpoint) with identical outputs, merges with identical generated tokens, and `hf-vlm push` publishes it with a
card naming the base whose usage snippet runs as written. (LoRA under DeepSpeed ZeRO-2: test_train_distributed.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from hf_vlm.testing import random_image, run_python_without_hf_vlm
from hf_vlm.testing_hub import LocalHub

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TOKEN = "hf_local_alice_write_0123456789"  # a token of the local endpoint only
FAMILIES = {  # family -> (finetune recipe, scene layout, base repo id)
    "coca": ("coca-tiny-caption", "caption", "org/coca-tiny"),
    "blip2": ("blip2-tiny-vqa", "vqa", "org/blip2-tiny"),
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Scene shards (caption and VQA layouts) and one tiny checkpoint with its processor per family."""
    from hf_vlm.modeling.blip2_flant5 import Blip2FlanT5ForConditionalGeneration, Blip2FlanT5Processor
    from hf_vlm.modeling.coca import CocaModel, CocaProcessor
    from hf_vlm.presets import get_config
    from hf_vlm.scenes import export_scenes
    from hf_vlm.testing import TINY_CORPUS
    from hf_vlm.tokenization import train_coca_tokenizer, train_t5_tokenizer

    root = tmp_path_factory.mktemp("lora_assets")
    export_scenes(root / "caption", {"train": 8})
    export_scenes(root / "vqa", {"train": 8}, layout="vqa")
    torch.manual_seed(0)
    config = get_config("coca-tiny")
    CocaModel(config).save_pretrained(root / "coca")
    tokenizer = train_coca_tokenizer(TINY_CORPUS, vocab_size=config.text_config.vocab_size)
    CocaProcessor.from_tokenizer(tokenizer, image_size=config.vision_config.image_size).save_pretrained(root / "coca")
    Blip2FlanT5ForConditionalGeneration(get_config("blip2-tiny")).save_pretrained(root / "blip2")
    Blip2FlanT5Processor.from_tokenizers(train_t5_tokenizer(TINY_CORPUS, vocab_size=96), image_size=32).save_pretrained(
        root / "blip2")
    return root


class _KeepModel:
    """A TrainerCallback that keeps the trained model and checks, at every step, that LoRA dropout is in training
    mode (a model whose train() puts parts in eval mode must not switch the adapters' dropout off)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Keep(TrainerCallback):
            model = None
            dropout_modes: list[bool] = []

            def on_step_begin(self, args, state, control, model=None, **kwargs):
                self.dropout_modes += [m.training for n, m in model.named_modules() if n.endswith("lora_dropout.default")]

            def on_train_end(self, args, state, control, model=None, **kwargs):
                self.model = model

        return Keep()


def finetune(assets: Path, family: str, out: Path, *extra: str, model: str | None = None, callbacks=()) -> Path:
    from hf_vlm.trainers.finetune import main

    recipe, layout, _ = FAMILIES[family]
    argv = ["--recipe", recipe, "--model", model or str(assets / family), "--train_data", str(assets / layout / "train"),
            "--output_dir", str(out), "--max_steps", "2", "--warmup_steps", "0", "--per_device_train_batch_size", "4",
            "--learning_rate", "1e-3", "--logging_steps", "1", "--save_strategy", "no", "--bf16", "false",
            "--deepspeed", "", "--use_cpu", "true", "--seed", "0", "--dataset_cache_dir", str(assets / "cache"), *extra]
    assert main(argv, callbacks=callbacks) == 0
    return out


def model_inputs(family: str, processor) -> dict:
    image = random_image(48, seed=5)
    if family == "coca":
        return dict(processor(images=[image, image], text=["a red circle", "a blue square above a triangle"],
                              return_tensors="pt", padding=True))
    inputs = dict(processor(images=image, text="Question: what color is the circle? Short answer:", return_tensors="pt"))
    inputs["decoder_input_ids"] = torch.tensor([[0, 5, 9, 4]])
    return inputs


def generation_inputs(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if k in ("pixel_values", "input_ids", "attention_mask")} \
        if "decoder_input_ids" in inputs else {"pixel_values": inputs["pixel_values"]}


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


# ------------------------------------------------------------------------------------------------------------
# Default target modules and arguments
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["coca-tiny", "blip2-tiny", "coca-large-v2", "blip2-flan-t5-xl"])
def test_lora_adapts_the_documented_modules_of_each_family_and_nothing_else_trains(preset):
    """BLIP-2: the Q-Former's self- and cross-attention query/key/value and T5's q/v; CoCa: the multimodal decoder's
    self- and cross-attention q/k/v and the attentional poolers'. Full-size presets are built on the meta device."""
    from transformers import AutoModel, AutoModelForImageTextToText

    from hf_vlm.presets import get_config
    from hf_vlm.trainers.lora import apply_lora

    config = get_config(preset)
    with torch.device("meta"):
        model = (AutoModel if preset.startswith("coca") else AutoModelForImageTextToText).from_config(config)
    wrapped = apply_lora(model, r=4)
    adapted = {n.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0]
               for n, _ in wrapped.named_parameters() if ".lora_A." in n}
    if preset.startswith("coca"):
        decoder = config.multimodal_config.num_hidden_layers
        pools = 2 if config.vision_config.separate_contrastive_query else 1
        expected = decoder * 2 * 3 + pools * 3
        assert all(n.startswith(("text_decoder.layers.", "vision_model.attn_pool.", "vision_model.contrastive_pool."))
                   for n in adapted)
        assert any(".cross_attn." in n for n in adapted) and any(".self_attn." in n for n in adapted)
    else:
        qformer = config.qformer_config
        cross = len(range(0, qformer.num_hidden_layers, qformer.cross_attention_frequency))
        t5 = config.text_config
        expected = qformer.num_hidden_layers * 3 + cross * 3 + t5.num_layers * 2 + t5.num_decoder_layers * 4
        assert all(n.startswith(("qformer.encoder.layer.", "language_model.")) for n in adapted)
        assert {n.rsplit(".", 1)[1] for n in adapted if n.startswith("language_model.")} == {"q", "v"}
        assert any(".crossattention." in n for n in adapted)
    assert len(adapted) == expected
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_lora_and_quantization_arguments_fail_clearly(assets):
    from hf_vlm.trainers.recipes import FINETUNE_STAGES
    from hf_vlm.trainers.training import parse_arguments

    def parse(*extra):
        argv = ["--recipe", "coca-tiny-caption", "--train_data", "data/", "--output_dir", "out", "--use_cpu", "true",
                *extra]
        return parse_arguments(argv, FINETUNE_STAGES, prog="finetune.py")

    _, model_args, _, _ = parse("--model", "ckpt", "--lora", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout",
                                "0.1", "--lora_target_modules", "q_proj", "v_proj", "--load_in_4bit")
    assert (model_args.lora, model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout) == (True, 4, 8, 0.1)
    assert model_args.lora_target_modules == ["q_proj", "v_proj"] and model_args.load_in_4bit
    with pytest.raises(SystemExit, match="--load_in_8bit needs --lora"):
        parse("--model", "ckpt", "--load_in_8bit")
    with pytest.raises(SystemExit, match="--load_in_8bit and --load_in_4bit exclude each other"):
        parse("--model", "ckpt", "--lora", "--load_in_8bit", "--load_in_4bit")
    with pytest.raises(SystemExit, match="--lora needs a checkpoint --model .* not the preset 'coca-tiny'"):
        parse("--lora")  # the recipe's model is the coca-tiny preset
    with pytest.raises(SystemExit, match=r"--lora_target_modules \['nope'\] do not name modules of CocaModel"):
        finetune(assets, "coca", assets / "never", "--lora", "--lora_target_modules", "nope")


# ------------------------------------------------------------------------------------------------------------
# LoRA: train, save, reload on the base pulled by repo id, merge, push
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_adapter_reloads_on_the_hub_base_merges_and_pushes_with_a_card_that_runs(
        family, assets, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor

    from hf_vlm.cli import main as cli
    from hf_vlm.hub.push import push_to_hub

    base_id = FAMILIES[family][2]
    with LocalHub(tokens={TOKEN: "alice"}, orgs={"alice": ["org"]}) as hub:
        hub.point_client_here(monkeypatch, tmp_path / "hf_home", TOKEN)
        push_to_hub(assets / family, base_id)
        keep = _KeepModel()
        out = finetune(assets, family, tmp_path / "adapter", "--lora", "--lora_r", "4", model=base_id, callbacks=[keep])

        # The run saved an adapter (no full weights) that names the base by its repo id.
        assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
        assert not (out / "model.safetensors").exists()
        adapter_config = json.loads((out / "adapter_config.json").read_text())
        assert adapter_config["base_model_name_or_path"] == base_id and adapter_config["r"] == 4
        summary = json.loads((out / "training_summary.json").read_text())
        assert summary["lora"]["target_modules"] == sorted(adapter_config["target_modules"])
        # Every adapter trained: lora_B starts at zero and only a gradient moves it.
        tensors = adapter_tensors(out)
        lora_b = {k: v for k, v in tensors.items() if ".lora_B." in k}
        assert lora_b and all(".lora_A." in k or ".lora_B." in k for k in tensors)
        assert [k for k, v in lora_b.items() if not v.any()] == []
        assert keep.dropout_modes and all(keep.dropout_modes), "LoRA dropout was off during training"

        # Reloaded on the base pulled by repo id: the trained model's outputs, bit for bit.
        processor = AutoProcessor.from_pretrained(out)
        inputs = model_inputs(family, processor)
        trained = keep.model.eval()
        base = (AutoModel if family == "coca" else AutoModelForImageTextToText).from_pretrained(base_id).eval()
        with torch.no_grad():
            base_logits = base(**inputs).logits
        reloaded = PeftModel.from_pretrained(base, out).eval()
        with torch.no_grad():
            expected, got = trained(**inputs), reloaded(**inputs)
        assert torch.equal(expected.logits, got.logits)
        assert not torch.equal(got.logits, base_logits)  # the adapter changes what the base computes

        # Merged into the base weights: the same generated tokens, and a plain (peft-free) model.
        generate = generation_inputs(inputs)
        with torch.no_grad():
            adapter_tokens = reloaded.generate(**generate, max_new_tokens=8, num_beams=1, do_sample=False)
            merged = reloaded.merge_and_unload()
            merged_tokens = merged.generate(**generate, max_new_tokens=8, num_beams=1, do_sample=False)
        assert not any("lora" in n for n, _ in merged.named_parameters())
        assert torch.equal(adapter_tokens, merged_tokens)

        # hf-vlm push: an adapter repository whose card names the base.
        assert cli(["push", str(out), f"{base_id}-lora"]) == 0
        pushed = set(hub.repo(f"{base_id}-lora").history("main")[0].files)
        assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= pushed
        assert not pushed & {"config.json", "model.safetensors", "training_args.bin", "trainer_state.json"}
        card = hub.read_file(f"{base_id}-lora", "README.md").decode()
        assert re.search(rf"^base_model: {re.escape(base_id)}$", card, re.MULTILINE)
        assert "library_name: peft" in card and f"PeftModel.from_pretrained(base, \"{base_id}-lora\")" in card

        # The card's snippet runs as written, in a fresh interpreter without hf_vlm (base and adapter by repo id,
        # trust_remote_code), and prints the adapter's and the merged model's generations, which agree.
        snippet = re.findall(r"```python\n(.*?)```", card, re.DOTALL)[0]
        random_image(64, seed=3).save(tmp_path / "example.jpg")
        proc = run_python_without_hf_vlm(snippet, cwd=tmp_path, env={**hub.client_env(TOKEN),
                                                                     "HF_HOME": str(tmp_path / "fresh_home")})
        assert proc.returncode == 0, proc.stderr[-4000:]
        printed = proc.stdout.strip().splitlines()
        assert len(printed) == 2 and printed[0] == printed[1] and printed[0].startswith("[")


def test_push_of_an_adapter_trained_on_a_local_folder_needs_the_base_hub_id(assets, tmp_path, monkeypatch, capsys):
    from hf_vlm.cli import main as cli
    from hf_vlm.hub.push import push_to_hub

    out = finetune(assets, "coca", tmp_path / "adapter", "--lora", "--lora_r", "2")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(assets / "coca")
    with LocalHub(tokens={TOKEN: "alice"}, orgs={"alice": ["org"]}) as hub:
        hub.point_client_here(monkeypatch, tmp_path / "hf_home", TOKEN)
        assert cli(["push", str(out), "org/coca-lora"]) == 1
        assert "pass --base-model with the Hub id" in capsys.readouterr().err
        assert ("model", "org/coca-lora") not in hub.repos
        push_to_hub(assets / "coca", "org/coca-tiny")
        assert cli(["push", str(out), "org/coca-lora", "--base-model", "org/coca-tiny"]) == 0
        pushed = json.loads(hub.read_file("org/coca-lora", "adapter_config.json"))
        assert pushed["base_model_name_or_path"] == "org/coca-tiny"


# ------------------------------------------------------------------------------------------------------------
# 8-bit / 4-bit bases and torch.compile
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("bits", [8, 4])
def test_lora_on_a_bitsandbytes_quantized_base_trains_every_adapter(family, bits, assets, tmp_path):
    import bitsandbytes as bnb

    keep = _KeepModel()
    out = finetune(assets, family, tmp_path / "adapter", "--lora", f"--load_in_{bits}bit", callbacks=[keep])
    quantized_class = bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit
    modules = dict(keep.model.get_base_model().named_modules())
    quantized = [n for n, m in modules.items() if isinstance(m, quantized_class)]
    assert quantized, f"no {quantized_class.__name__} in the model"
    if family == "blip2":  # EVA keeps its float weights (its attention calls F.linear with keyword arguments)
        assert not [n for n in quantized if n.startswith("vision_model.")]
    lora_b = {k: v for k, v in adapter_tensors(out).items() if ".lora_B." in k}
    assert lora_b and [k for k, v in lora_b.items() if not v.any()] == []
    losses = [e["loss"] for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert len(losses) == 2 and all(v == v for v in losses)
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["lora"][f"load_in_{bits}bit"] is True


def test_an_8bit_blip2_base_keeps_its_frozen_vit_in_the_load_dtype(assets):
    """peft's prepare_model_for_kbit_training casts every unquantized half-precision weight to fp32, BLIP-2's
    1B-parameter ViT included (quantization leaves it alone), which made 8-bit LoRA use more memory than bf16 LoRA.
    A part with no adapter keeps its load dtype; the parts with adapters get peft's fp32, and the adapters train."""
    from hf_vlm.modeling.blip2_flant5 import Blip2FlanT5ForConditionalGeneration, Blip2FlanT5Processor
    from hf_vlm.trainers.lora import apply_lora, quantization_config

    model = Blip2FlanT5ForConditionalGeneration.from_pretrained(
        assets / "blip2", dtype=torch.bfloat16, quantization_config=quantization_config(load_in_8bit=True))
    assert {p.dtype for p in model.vision_model.parameters()} == {torch.bfloat16}
    peft_model = apply_lora(model)
    assert {p.dtype for p in model.vision_model.parameters()} == {torch.bfloat16}
    assert {p.dtype for n, p in model.language_model.named_parameters()
            if p.dtype.is_floating_point and "lora_" not in n} == {torch.float32}  # peft's upcast where adapters are
    peft_model.train()
    inputs = model_inputs("blip2", Blip2FlanT5Processor.from_pretrained(assets / "blip2"))
    peft_model(**inputs, labels=inputs["decoder_input_ids"]).loss.backward()
    lora_grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert lora_grads and all(g is not None and g.isfinite().all() for g in lora_grads.values())
    assert any(g.any() for n, g in lora_grads.items() if "lora_B" in n)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_with_reentrant_gradient_checkpointing_trains_every_adapter(family, assets, tmp_path):
    """Reentrant checkpointing back-propagates only into blocks whose inputs require grad; with a frozen base that
    takes the input hooks peft and the models install (BLIP-2's Q-Former input comes from frozen query tokens)."""
    keep = _KeepModel()
    out = finetune(assets, family, tmp_path / "adapter", "--lora", "--gradient_checkpointing",
                   "--gradient_checkpointing_kwargs", '{"use_reentrant": true}', callbacks=[keep])
    assert keep.model.get_base_model().is_gradient_checkpointing
    lora_b = {k: v for k, v in adapter_tensors(out).items() if ".lora_B." in k}
    assert lora_b and [k for k, v in lora_b.items() if not v.any()] == []


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_torch_compile_with_lora_and_an_8bit_base(family, assets, tmp_path, monkeypatch):
    """--torch_compile is the stock TrainingArguments flag: the Trainer compiles the (peft-wrapped, 8-bit) model.
    Backend aot_eager: dynamo captures forward and backward graphs as inductor would, without its C++ code generation
    (inductor took 5-7 minutes for the first step of this run on a shared 2-core CPU, with the eager losses).
    transformers exports the backend choice in the environment; monkeypatch undoes it for the next tests."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    counters.clear()
    out = finetune(assets, family, tmp_path / "adapter", "--lora", "--load_in_8bit", "--torch_compile",
                   "--torch_compile_backend", "aot_eager")
    assert counters["stats"]["unique_graphs"] >= 1  # the training step ran through dynamo's compiled graphs
    lora_b = {k: v for k, v in adapter_tensors(out).items() if ".lora_B." in k}
    assert lora_b and [k for k, v in lora_b.items() if not v.any()] == []


# ------------------------------------------------------------------------------------------------------------
# README
# ------------------------------------------------------------------------------------------------------------
def test_the_readme_one_gpu_fine_tuning_example_runs_as_written(assets, tmp_path, monkeypatch):
    """The README section's command and Python block, in a folder laid out like a checkout after `make demo`
    (a tiny BLIP-2 checkpoint with its processor in .demo/checkpoints/blip2, VQA scenes as the demo writes them)."""
    import shlex
    import shutil

    from hf_vlm import scenes
    from hf_vlm.trainers.finetune import main

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("### Fine-tuning on one GPU"):]
    section = section[: section.index("\n### ", 1)]
    command = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1).replace("\\\n", " ").strip()
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    prefix = ".venv/bin/python -m hf_vlm.trainers.finetune "
    assert command.startswith(prefix) and "--lora" in command
    monkeypatch.chdir(tmp_path)
    shutil.copytree(assets / "blip2", ".demo/checkpoints/blip2")
    scenes.export_imagefolder(scenes.vqa_rows(scenes.generate_scenes("train", 8)), ".demo/data/vqa")
    assert main(shlex.split(command[len(prefix):])) == 0
    exec(compile(code, "README", "exec"), {})


def test_a_lora_run_resumed_from_a_checkpoint_ends_with_the_adapter_of_an_uninterrupted_run(assets, tmp_path):
    """checkpoint-N of a LoRA run holds the adapter (with optimizer, scheduler, RNG and data state); a run resumed
    from it continues the adapter's training, LoRA dropout included, to the same weights."""
    import shutil

    steps = ("--max_steps", "3", "--save_strategy", "steps", "--save_steps", "1", "--save_total_limit", "3")
    full = finetune(assets, "coca", tmp_path / "full", "--lora", *steps)
    checkpoint = full / "checkpoint-1"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    shutil.copytree(checkpoint, tmp_path / "resumed" / "checkpoint-1")
    resumed = finetune(assets, "coca", tmp_path / "resumed", "--lora", *steps, "--resume_from_checkpoint", "last")
    expected, got = adapter_tensors(full), adapter_tensors(resumed)
    assert expected.keys() == got.keys()
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []
    at_step_1 = adapter_tensors(checkpoint)
    assert any(not torch.equal(expected[k], at_step_1[k]) for k in expected)  # steps 2 and 3 did train


@pytest.mark.slow
def test_torch_compile_alone_trains_blip2_with_the_eager_losses(assets, tmp_path, monkeypatch):
    """Full fine-tuning (no LoRA) compiled by the Trainer: the same losses and gradient norms as eager, step by step."""
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")

    def history(out: Path) -> list[float]:
        log = json.loads((out / "trainer_state.json").read_text())["log_history"]
        return [value for e in log if "loss" in e for value in (e["loss"], e["grad_norm"])]

    eager = history(finetune(assets, "blip2", tmp_path / "eager"))
    compiled = history(finetune(assets, "blip2", tmp_path / "compiled", "--torch_compile_backend", "aot_eager"))
    assert len(eager) == 4 and compiled == pytest.approx(eager, rel=1e-5)
