"""Training recipes, arguments and launch configs: recipe values are the defaults and flags override them;
the papers' numbers are what the recipes say; DeepSpeed/accelerate files are complete; the scripts run
as files and as modules. (Multi-process training runs are in test_train_distributed.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def parse(*argv: str):
    from hf_vlm.trainers.recipes import FINETUNE_STAGES, PRETRAIN_STAGES
    from hf_vlm.trainers.training import parse_arguments

    return parse_arguments(list(argv), PRETRAIN_STAGES + FINETUNE_STAGES, prog="test")


def parse_recipe(name: str, tmp_path, *extra: str):
    """A recipe's arguments as a CPU machine can build them (BF16 needs a GPU; DeepSpeed needs a launcher)."""
    return parse("--recipe", name, "--train_data", "data/", "--output_dir", str(tmp_path),
                 "--bf16", "false", "--deepspeed", "", *extra)


def test_every_recipe_names_a_stage_and_model_and_parses(tmp_path):
    from hf_vlm.presets import list_presets
    from hf_vlm.trainers.recipes import get_recipe, list_recipes

    names = list_recipes()
    assert {"coca-large-v2", "blip2-flan-t5-xl-stage1", "blip2-flan-t5-xl-stage2", "coca-tiny", "blip2-tiny-stage1",
            "blip2-tiny-stage2", "blip2-tiny-caption", "blip2-tiny-vqa", "coca-tiny-caption"} <= set(names)
    for name in names:
        recipe = get_recipe(name)
        assert recipe.model in list_presets(), name
        # a LoRA recipe adapts a saved checkpoint (--model); its preset names the architecture
        checkpoint = ("--model", str(tmp_path / "checkpoint")) if recipe.model_overrides.get("lora") else ()
        _, model_args, _, args = parse_recipe(name, tmp_path, *checkpoint)
        assert model_args.model == (checkpoint[1] if checkpoint else recipe.model)
        assert args.remove_unused_columns is False  # raw image/text columns reach the collator
        for key, value in recipe.training.items():
            if key in ("bf16", "deepspeed", "lr_scheduler_kwargs", "report_to"):  # normalised by transformers
                continue
            got = getattr(args, key)
            assert (got.value if hasattr(got, "value") else got) == value, (name, key)


def test_coca_large_v2_recipe_is_the_published_setup(tmp_path):
    from hf_vlm.trainers.recipes import get_recipe

    recipe = get_recipe("coca-large-v2")
    training = recipe.training
    assert recipe.stage == "coca" and recipe.model == "coca-large-v2"
    assert (recipe.nodes * recipe.gpus_per_node, training["per_device_train_batch_size"]) == (64, 256)
    assert recipe.global_batch_size == 16_384
    assert training["optim"] == "adamw_torch" and training["learning_rate"] == 1e-4
    assert training["warmup_steps"] == 0.1 and training["lr_scheduler_type"] == "cosine"
    assert training["bf16"] is True
    assert json.loads(Path(training["deepspeed"]).read_text())["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize("stage", [1, 2])
def test_blip2_recipes_warm_up_10000_steps_then_cosine_to_1e6(stage, tmp_path):
    from transformers import get_scheduler

    from hf_vlm.trainers.recipes import get_recipe

    recipe = get_recipe(f"blip2-flan-t5-xl-stage{stage}")
    training = recipe.training
    assert recipe.stage == f"blip2-stage{stage}" and recipe.model == "blip2-flan-t5-xl"
    assert (training["adam_beta1"], training["adam_beta2"], training["weight_decay"]) == (0.9, 0.98, 0.05)
    assert training["lr_scheduler_type"] == "cosine_with_min_lr"
    assert training["lr_scheduler_kwargs"] == {"min_lr": 1e-6}
    assert training["bf16"] is True and training["gradient_accumulation_steps"] > 1
    assert training["per_device_train_batch_size"] * training["gradient_accumulation_steps"] == 256
    assert training["max_steps"] == (250_000 if stage == 1 else 80_000)

    # The schedule the Trainer builds from the parsed arguments (min_lr becomes a rate: see training.py).
    _, _, _, args = parse_recipe(recipe.name, tmp_path)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.get_warmup_steps(args.max_steps),
                              num_training_steps=args.max_steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    lr_at = {step: args.learning_rate * scheduler.lr_lambdas[0](step) for step in (5_000, 10_000, args.max_steps)}
    assert lr_at[5_000] == pytest.approx(0.5e-4)
    assert lr_at[10_000] == pytest.approx(1e-4)
    assert lr_at[args.max_steps] == pytest.approx(1e-6)


def test_command_line_flags_override_the_recipe(tmp_path):
    recipe, model_args, data_args, args = parse_recipe(
        "blip2-tiny-caption", tmp_path, "--learning_rate", "5e-5", "--freeze_vision", "true", "--max_length", "16",
        "--model", "some/checkpoint", "--augmentation", "none",
    )
    assert recipe.name == "blip2-tiny-caption" and data_args.augmentation == "none"
    assert args.learning_rate == 5e-5
    assert model_args.freeze_vision is True and model_args.model == "some/checkpoint"
    assert data_args.max_length == 16
    # Not overridden: the recipe's value (LAVIS-style caption fine-tuning unfreezes the ViT).
    _, model_args, _, args = parse_recipe("blip2-tiny-caption", tmp_path)
    assert model_args.freeze_vision is False and args.learning_rate == 1e-4


def test_streaming_reads_per_rank_and_the_data_position_comes_from_the_checkpoint(tmp_path):
    """--streaming: no rank-0 dispatch of batches (the data position itself comes from the checkpoint's data state:
    hf_vlm.data.resume, tested in test_checkpoints)."""
    _, _, data_args, args = parse_recipe("coca-tiny", tmp_path, "--streaming", "--max_steps", "10")
    assert args.accelerator_config.dispatch_batches is False and args.ignore_data_skip is False
    assert data_args.max_skip_fraction == 0.1
    _, _, data_args, args = parse_recipe("coca-tiny", tmp_path, "--max_skip_fraction", "0.5")
    assert args.accelerator_config.dispatch_batches is None and args.ignore_data_skip is False
    assert data_args.max_skip_fraction == 0.5


def test_bad_arguments_fail_with_a_clear_message(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_recipe("coca-tiny", tmp_path, "--augmentation", "flip")
    assert "argument --augmentation: invalid choice: 'flip'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown recipe 'nope'.*coca-large-v2"):
        parse("--recipe", "nope", "--train_data", "x")
    with pytest.raises(SystemExit, match="--train_data is required"):
        parse("--recipe", "coca-tiny", "--output_dir", str(tmp_path))
    with pytest.raises(SystemExit, match="--streaming needs --max_steps"):
        parse("--recipe", "coca-tiny", "--train_data", "x", "--streaming", "--max_steps", "-1",
              "--output_dir", str(tmp_path))
    from hf_vlm.trainers.recipes import PRETRAIN_STAGES
    from hf_vlm.trainers.training import parse_arguments

    with pytest.raises(SystemExit, match="blip2-caption.*finetune.py"):
        parse_arguments(["--recipe", "blip2-tiny-caption", "--train_data", "x"], PRETRAIN_STAGES, prog="pretrain.py")


def test_deepspeed_configs_leave_the_optimizer_to_the_trainer():
    for stage in (2, 3):
        config = json.loads((ROOT / "trainers" / "deepspeed" / f"zero{stage}.json").read_text())
        # No optimizer/scheduler block: the Trainer's torch AdamW and schedule are used, no CPU Adam is compiled.
        assert "optimizer" not in config and "scheduler" not in config
        assert config["zero_optimization"]["stage"] == stage
        for key in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps",
                    "gradient_clipping"):
            assert config[key] == "auto", key
        assert config["bf16"]["enabled"] == "auto"
    zero3 = json.loads((ROOT / "trainers" / "deepspeed" / "zero3.json").read_text())["zero_optimization"]
    assert zero3["stage3_gather_16bit_weights_on_model_save"] is True


def test_deepspeed_auto_values_resolve_from_training_arguments(tmp_path):
    """HfTrainerDeepSpeedConfig fills every "auto" from TrainingArguments + the model's hidden size."""
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    from hf_vlm.presets import get_config

    _, _, _, args = parse_recipe("coca-tiny", tmp_path, "--gradient_accumulation_steps", "3")
    for stage in (2, 3):
        ds = HfTrainerDeepSpeedConfig(str(ROOT / "trainers" / "deepspeed" / f"zero{stage}.json"))
        ds.trainer_config_process(args)
        config = get_config("coca-tiny")
        ds.trainer_config_finalize(args, type("M", (), {"config": config})(), num_training_steps=10)
        text = json.dumps(ds.config)
        assert '"auto"' not in text, text
        assert ds.config["gradient_accumulation_steps"] == 3
        assert ds.config["train_micro_batch_size_per_gpu"] == args.per_device_train_batch_size


def test_accelerate_configs_for_one_gpu_eight_gpus_and_eight_nodes():
    import yaml

    expected = {"single_gpu": (1, 1), "multi_gpu": (1, 8), "multi_node": (8, 64)}
    for name, (machines, processes) in expected.items():
        config = yaml.safe_load((ROOT / "trainers" / "accelerate" / f"{name}.yaml").read_text())
        assert config["distributed_type"] == "DEEPSPEED"
        assert (config["num_machines"], config["num_processes"]) == (machines, processes), name
        # accelerate refuses these next to a DeepSpeed JSON (the recipe's --deepspeed holds them).
        assert "mixed_precision" not in config and "zero_stage" not in config["deepspeed_config"]


def test_deepspeed_broadcast_handles_0_dim_parameters():
    """logit_scale / temp are 0-dim; DeepSpeed 0.19 views parameters as bytes to broadcast them."""
    from hf_vlm.trainers.distributed import _as_bytes, patch_deepspeed_scalar_broadcast

    scale = torch.nn.Parameter(torch.tensor(2.5))
    view = _as_bytes(scale.data)
    assert view.dtype == torch.uint8 and view.numel() == 4
    view.copy_(_as_bytes(torch.tensor(-1.0)))  # a broadcast writes into the view: the parameter changes
    assert scale.item() == -1.0
    patched = patch_deepspeed_scalar_broadcast()
    import deepspeed.runtime.engine as engine

    assert patched == [] or "DeepSpeedEngine._broadcast_model" in patched
    assert "view(torch.uint8)" not in __import__("inspect").getsource(engine.DeepSpeedEngine._broadcast_model)


def test_our_forwards_do_not_get_the_trainers_num_items_in_batch_scaling():
    from hf_vlm.modeling.blip2_flant5 import Blip2FlanT5ForConditionalGeneration, Blip2FlanT5ForPretraining
    from hf_vlm.modeling.coca import CocaModel
    from hf_vlm.trainers.training import forward_uses_num_items_in_batch

    for model_class in (CocaModel, Blip2FlanT5ForPretraining, Blip2FlanT5ForConditionalGeneration):
        assert not forward_uses_num_items_in_batch(model_class), model_class.__name__

    class Normalising(torch.nn.Module):
        def forward(self, x, labels=None, num_items_in_batch=None):
            return x

    assert forward_uses_num_items_in_batch(Normalising())


def test_pretrain_runs_as_a_file_from_any_directory(tmp_path):
    """`accelerate launch trainers/pretrain.py` runs the file (the distributed tests import the module, and
    `python -m hf_vlm.trainers.finetune` trains in test_finetune_vqa_runs_as_a_module below; finetune.py
    starts with the same lines as pretrain.py). Python puts trainers/ first on sys.path for a file run: its
    deepspeed/ and accelerate/ folders must not shadow the packages."""
    cmd = [sys.executable, str(ROOT / "trainers" / "pretrain.py"), "--help"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for flag in ("--recipe", "--model", "--train_data", "--init_qformer_from", "--learning_rate", "--deepspeed"):
        assert flag in result.stdout, flag


def test_finetune_vqa_runs_as_a_module_with_the_vit_unfrozen_and_t5_frozen(tmp_path, t5_tokenizer_dir):
    """LAVIS-style VQA fine-tuning (blip2-tiny-vqa: ViT trained, FlanT5 frozen) on image + question + answers
    shards, single process, as `python -m hf_vlm.trainers.finetune`."""
    from safetensors.torch import load_file

    from hf_vlm.modeling.blip2_flant5 import Blip2FlanT5ForConditionalGeneration
    from hf_vlm.presets import get_config
    from hf_vlm.scenes import export_scenes

    folders = export_scenes(tmp_path / "vqa", {"train": 8}, layout="vqa")
    torch.manual_seed(0)
    Blip2FlanT5ForConditionalGeneration(get_config("blip2-tiny")).save_pretrained(tmp_path / "initial")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "hf_vlm.trainers.finetune", "--recipe", "blip2-tiny-vqa",
           "--model", str(tmp_path / "initial"), "--processor", str(t5_tokenizer_dir),
           "--train_data", str(folders["train"]), "--output_dir", str(out), "--max_steps", "3",
           "--per_device_train_batch_size", "4", "--logging_steps", "1", "--save_strategy", "no",
           "--dataset_cache_dir", str(tmp_path / "cache")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]

    model = Blip2FlanT5ForConditionalGeneration.from_pretrained(out)
    assert model.config.freeze_vision is False and model.config.freeze_language_model is True
    initial, final = load_file(str(tmp_path / "initial" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    vision = [k for k in final if k.startswith("vision_model.")]
    t5 = [k for k in final if k.startswith("language_model.") and k in initial]
    assert vision and t5
    assert any(not torch.equal(initial[k], final[k]) for k in vision)  # unfrozen: trained
    assert all(torch.equal(initial[k], final[k]) for k in t5)  # frozen: bit-identical
    losses = [e["loss"] for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert len(losses) == 3 and all(v == v and v > 0 for v in losses)


def test_hf_vlm_cli_passes_every_argument_to_the_training_scripts(capsys):
    from hf_vlm.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--help"])
    assert exit_info.value.code == 0
    assert "--recipe" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="pretrain.py: unknown recipe 'nope'"):
        main(["pretrain", "--recipe", "nope", "--train_data", "x"])


def test_frozen_parts_are_not_in_the_trainers_optimizer(tmp_path):
    """The model config freezes parts (requires_grad=False); the stock Trainer's AdamW gets only the rest."""
    from transformers import Trainer, TrainingArguments

    from hf_vlm.modeling.blip2_flant5 import Blip2FlanT5ForConditionalGeneration
    from hf_vlm.presets import get_config

    model = Blip2FlanT5ForConditionalGeneration(get_config("blip2-tiny"))
    assert model.config.freeze_vision and model.config.freeze_language_model
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True))
    optimizer = trainer.create_optimizer()
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in in_optimizer}
    # LAVIS trains ln_vision (the LayerNorm after the frozen ViT) with the Q-Former.
    assert names and all(n.startswith(("qformer.", "query_tokens", "language_projection.", "ln_vision.")) for n in names)
    assert not any(n.startswith(("vision_model.", "language_model.")) for n in names)
    assert names == {n for n, p in model.named_parameters() if p.requires_grad}


def test_a_tokenizer_larger_than_the_model_vocab_is_refused_before_training(t5_tokenizer_dir):
    from transformers import AutoTokenizer

    from hf_vlm.modeling.coca import CocaModel
    from hf_vlm.presets import get_config
    from hf_vlm.trainers.training import check_tokenizer_fits

    tokenizer = AutoTokenizer.from_pretrained(t5_tokenizer_dir)
    config = get_config("coca-tiny")
    config.text_config.vocab_size = len(tokenizer)
    check_tokenizer_fits(CocaModel(config), tokenizer)  # fits exactly: no error
    config.text_config.vocab_size = len(tokenizer) - 1
    with pytest.raises(SystemExit, match=f"the tokenizer has {len(tokenizer)} ids but CocaModel embeds only "
                                         f"{len(tokenizer) - 1}"):
        check_tokenizer_fits(CocaModel(config), tokenizer)
