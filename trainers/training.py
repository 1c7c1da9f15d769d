"""The training run shared by pretrain.py and finetune.py: arguments, model, data, stock `Trainer`.

Arguments come from four dataclasses parsed by `HfArgumentParser`: RecipeArguments (--recipe),
ModelArguments, DataArguments and transformers' TrainingArguments. The recipe's values are the
defaults; every flag given on the command line overrides them.

Stages (recipes/__init__.py lists them) pick the model class and the data recipe:
  coca           CocaModel, contrastive + caption loss
  blip2-stage1   Blip2FlanT5ForPretraining (ITC + ITM + ITG), frozen ViT
  blip2-stage2   Blip2FlanT5ForConditionalGeneration, frozen ViT and T5; --init_qformer_from a stage-1 run
  coca-caption   CocaModel fine-tuned on the caption loss only
  blip2-caption / blip2-vqa   Blip2FlanT5ForConditionalGeneration fine-tuning (prompted)
Which parts are frozen is a fact of the model config (freeze_vision / freeze_language_model); the
model sets requires_grad from it and the Trainer's optimizer only takes trainable parameters.

Checkpoints (checkpoints.py): every `checkpoint-N` holds the processor and the model's remote-code files, and
counts only once its completion marker is written, after every file and every `on_save` callback;
`--resume_from_checkpoint last` takes the newest complete one. `--eval_data` adds the Trainer's own eval loop
(eval loss every --eval_steps) on the evaluation transform of the same data pipeline.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from hf_vlm.data.pipeline import MAX_SKIP_FRACTION, SKIP_WINDOW
from hf_vlm.data.transforms import AUGMENTATIONS
from hf_vlm.trainers.lora import LORA_ALPHA, LORA_DROPOUT, LORA_R
from hf_vlm.trainers.recipes import FINETUNE_STAGES, PRETRAIN_STAGES, Recipe, deepspeed_config, get_recipe

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    model_class: str  # "module:Class"
    data_recipe: str  # key of hf_vlm.data.DATA_RECIPES
    config_overrides: tuple = ()  # (name, value) pairs the stage always sets on the model config


STAGES = {
    "coca": Stage("hf_vlm.modeling.coca:CocaModel", "coca"),
    "blip2-stage1": Stage("hf_vlm.modeling.blip2_flant5:Blip2FlanT5ForPretraining", "blip2-stage1"),
    "blip2-stage2": Stage("hf_vlm.modeling.blip2_flant5:Blip2FlanT5ForConditionalGeneration", "blip2-stage2"),
    # CoCa is fine-tuned for captioning with the caption loss alone.
    "coca-caption": Stage("hf_vlm.modeling.coca:CocaModel", "coca", (("contrastive_loss_weight", 0.0),)),
    "blip2-caption": Stage("hf_vlm.modeling.blip2_flant5:Blip2FlanT5ForConditionalGeneration", "blip2-caption"),
    "blip2-vqa": Stage("hf_vlm.modeling.blip2_flant5:Blip2FlanT5ForConditionalGeneration", "blip2-vqa"),
}


@dataclass
class RecipeArguments:
    recipe: str = field(metadata={"help": "recipe name (trainers/recipes/); its values are the defaults"})


@dataclass
class ModelArguments:
    model: str | None = field(
        default=None, metadata={"help": "preset name (hf_vlm.presets), local checkpoint folder or Hub id"}
    )
    processor: str | None = field(
        default=None,
        metadata={"help": "processor or tokenizer folder / Hub id; default: the --model checkpoint's own"},
    )
    init_qformer_from: str | None = field(
        default=None, metadata={"help": "blip2-stage2: stage-1 checkpoint whose ViT and Q-Former to start from"}
    )
    language_model: str | None = field(
        default=None,
        metadata={"help": "blip2-stage2 with --init_qformer_from: T5 folder / Hub id (e.g. google/flan-t5-xl); "
                  "default: the --model preset's T5 config, randomly initialised"},
    )
    freeze_vision: bool | None = field(default=None, metadata={"help": "override the config's freeze_vision"})
    qformer_text_input: bool | None = field(
        default=None, metadata={"help": "override the config's qformer_text_input (BLIP-2: the Q-Former reads the question)"}
    )
    freeze_language_model: bool | None = field(
        default=None, metadata={"help": "override the config's freeze_language_model (BLIP-2)"}
    )
    # Fine-tuning on one GPU (trainers/lora.py): LoRA adapters, optionally on a bitsandbytes-quantized base.
    lora: bool = field(default=False, metadata={"help": "train LoRA adapters only (peft); the run saves the adapter"})
    lora_r: int = field(default=LORA_R, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=LORA_ALPHA, metadata={"help": "LoRA scaling numerator (scale = alpha / r)"})
    lora_dropout: float = field(default=LORA_DROPOUT, metadata={"help": "dropout on the LoRA input"})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "module-name suffixes LoRA adapts; default: the family's (trainers/lora.py)"},
    )
    load_in_8bit: bool = field(
        default=False, metadata={"help": "load the checkpoint's linear layers in 8-bit (bitsandbytes); needs --lora"}
    )
    load_in_4bit: bool = field(
        default=False, metadata={"help": "load the checkpoint's linear layers in 4-bit NF4 (bitsandbytes); needs --lora"}
    )


@dataclass
class DataArguments:
    train_data: list[str] = field(
        default_factory=list,
        metadata={"help": "sources as PATH[@WEIGHT]: webdataset shards (*.tar), imagefolder, parquet, Hub name"},
    )
    streaming: bool = field(default=False, metadata={"help": "stream the sources (needs --max_steps)"})
    image_size: int | None = field(default=None, metadata={"help": "default: the model's image size"})
    augmentation: str | None = field(
        default=None,
        metadata={"help": "training image augmentation (none: the evaluation transform); default: the recipe's",
                  "choices": sorted(AUGMENTATIONS)},
    )
    eval_data: list[str] = field(
        default_factory=list,
        metadata={"help": "evaluation sources (as --train_data, evaluation transform): eval loss every --eval_steps "
                  "(turns on --eval_strategy steps; --eval_steps defaults to --logging_steps)"},
    )
    max_length: int | None = field(default=None, metadata={"help": "text tokens; default: the data recipe's"})
    shuffle_buffer: int = field(default=1000, metadata={"help": "streaming shuffle block (samples)"})
    max_skip_fraction: float = field(
        default=MAX_SKIP_FRACTION,
        metadata={"help": f"stop when more than this share of the last {SKIP_WINDOW} samples a process drew were "
                  "unusable (naming the worst shards); 1 never stops"},
    )
    dataset_cache_dir: str | None = field(default=None, metadata={"help": "datasets cache folder"})


# --------------------------------------------------------------------------------------------------
# Arguments


def _resolve_deepspeed(value):
    """--deepspeed zero2 / zero3 name our configs; anything else is a path (or dict) as transformers takes it."""
    if isinstance(value, str) and value in ("zero2", "zero3"):
        return deepspeed_config(value)
    return value


def parse_arguments(argv: list[str] | None, allowed_stages: tuple[str, ...], prog: str):
    """Parse the command line over the recipe's defaults.

    Returns (recipe, ModelArguments, DataArguments, TrainingArguments). The process group for a
    DeepSpeed run on CPU is set up here, before TrainingArguments initialises the devices.
    """
    import argparse

    from transformers import HfArgumentParser, TrainingArguments

    from hf_vlm.trainers.distributed import init_distributed_state

    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--recipe")
    known, _ = first.parse_known_args(argv)

    parser = HfArgumentParser((RecipeArguments, ModelArguments, DataArguments, TrainingArguments), prog=prog)
    # Our defaults for every recipe: the batches carry raw images/text columns the model does not name; evaluation
    # reports the loss only (no compute_metrics), so the eval loop need not gather every batch's logits.
    parser.set_defaults(remove_unused_columns=False, prediction_loss_only=True)
    recipe = None
    if known.recipe:
        try:
            recipe = get_recipe(known.recipe)
        except ValueError as err:
            raise SystemExit(f"{prog}: {err}") from None
        if recipe.stage not in allowed_stages:
            raise SystemExit(
                f"{prog}: recipe {recipe.name!r} is a {recipe.stage!r} recipe; this script runs "
                f"{', '.join(allowed_stages)} (use {'finetune' if prog.startswith('pretrain') else 'pretrain'}.py)"
            )
        parser.set_defaults(**recipe.defaults())
    namespace = parser.parse_args(argv)
    if recipe is None:  # argparse has already complained about a missing --recipe
        raise SystemExit(f"{prog}: --recipe is required")

    namespace.deepspeed = _resolve_deepspeed(namespace.deepspeed)
    evaluates = _enum_value(namespace.eval_strategy) != "no"
    if namespace.eval_data and not evaluates:  # --eval_data alone means: evaluate during training
        namespace.eval_strategy = "steps"
    elif evaluates and not namespace.eval_data:
        raise SystemExit(f"{prog}: --eval_strategy {_enum_value(namespace.eval_strategy)} needs --eval_data "
                         "(one or more PATH[@WEIGHT] sources)")
    if init_distributed_state(use_deepspeed=bool(namespace.deepspeed)):
        namespace.accelerator_config = {**(namespace.accelerator_config or {}), "use_configured_state": True}
    if namespace.streaming:
        # Every rank reads and decodes its own shards (hf_vlm.data splits the stream by node); accelerate's default
        # for an IterableDataset would have rank 0 read the whole global batch and broadcast it.
        namespace.accelerator_config = {**(namespace.accelerator_config or {}), "dispatch_batches": False}

    outputs = []
    for dtype in parser.dataclass_types:
        names = {f.name for f in fields(dtype) if f.init}
        outputs.append(dtype(**{k: v for k, v in vars(namespace).items() if k in names}))
    _, model_args, data_args, training_args = outputs
    _min_lr_as_rate(training_args)
    if not data_args.train_data:
        raise SystemExit(f"{prog}: --train_data is required (one or more PATH[@WEIGHT] sources)")
    if data_args.streaming and training_args.max_steps <= 0:
        raise SystemExit(f"{prog}: --streaming needs --max_steps (a stream has no length)")
    _check_lora_arguments(model_args, prog)
    return recipe, model_args, data_args, training_args


def _check_lora_arguments(model_args: ModelArguments, prog: str) -> None:
    from hf_vlm.presets import list_presets

    quantized = "--load_in_8bit" if model_args.load_in_8bit else "--load_in_4bit" if model_args.load_in_4bit else None
    if model_args.load_in_8bit and model_args.load_in_4bit:
        raise SystemExit(f"{prog}: --load_in_8bit and --load_in_4bit exclude each other: pick one")
    if quantized and not model_args.lora:
        # the Trainer cannot update integer weights; what trains on a quantized base is an adapter
        raise SystemExit(f"{prog}: {quantized} needs --lora (quantized weights cannot be trained; LoRA adapters can)")
    if (model_args.lora or quantized) and model_args.model in list_presets():
        # a preset's weights are random and never saved with an adapter: the adapter would fit nothing reloadable
        raise SystemExit(
            f"{prog}: {'--lora' if model_args.lora else quantized} needs a checkpoint --model (folder or Hub id) "
            f"to adapt, not the preset {model_args.model!r} (random weights that the adapter does not save)"
        )
    if model_args.lora and model_args.init_qformer_from:
        raise SystemExit(f"{prog}: --lora adapts a saved checkpoint --model; --init_qformer_from builds a new one")


def _enum_value(value) -> str:
    return str(value.value if hasattr(value, "value") else value)


def _min_lr_as_rate(training_args) -> None:
    """`cosine_with_min_lr` with {"min_lr": X}: transformers computes X / optimizer.defaults["lr"], and the
    DeepSpeed ZeRO optimizers have no `defaults` (AttributeError at scheduler creation). The same schedule
    is {"min_lr_rate": X / learning_rate}, which needs no optimizer attribute."""
    kwargs = training_args.lr_scheduler_kwargs
    if _enum_value(training_args.lr_scheduler_type) != "cosine_with_min_lr":
        return
    if isinstance(kwargs, dict) and "min_lr" in kwargs:
        kwargs = dict(kwargs)
        kwargs["min_lr_rate"] = kwargs.pop("min_lr") / training_args.learning_rate
        training_args.lr_scheduler_kwargs = kwargs


# --------------------------------------------------------------------------------------------------
# Model and processor


def _import(path: str):
    import importlib

    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def load_model(stage: Stage, model_args: ModelArguments, compute_dtype=None):
    """The stage's model from a preset (randomly initialised) or a checkpoint, with config overrides;
    --load_in_8bit / --load_in_4bit quantize the checkpoint's linear layers as it loads (4-bit matmuls in
    `compute_dtype`).

    Built with `_from_config` / `from_pretrained`, so that under ZeRO-3 the parameters are created
    partitioned (deepspeed.zero.Init) as transformers does for its own models.
    """
    import hf_vlm  # noqa: F401  (registers our model types with the Auto classes)
    from hf_vlm.presets import get_config, list_presets

    model_class = _import(stage.model_class)
    overrides = dict(stage.config_overrides)
    for name in ("freeze_vision", "freeze_language_model", "qformer_text_input"):
        if getattr(model_args, name) is not None:
            overrides[name] = getattr(model_args, name)
    if model_args.init_qformer_from:
        if not hasattr(model_class, "from_stage1"):
            raise SystemExit(f"--init_qformer_from is for the blip2-stage2 stage, not {model_class.__name__}")
        language_model = model_args.language_model
        if language_model is None:
            if model_args.model not in list_presets():
                raise SystemExit("--init_qformer_from needs --language_model (a T5 folder / Hub id) or a preset --model")
            language_model = get_config(model_args.model).text_config
        return model_class.from_stage1(model_args.init_qformer_from, language_model, **overrides)
    if model_args.model in list_presets():
        return model_class._from_config(get_config(model_args.model, **overrides))
    from hf_vlm.trainers.lora import quantization_config

    quantization = quantization_config(model_args.load_in_8bit, model_args.load_in_4bit, compute_dtype)
    if quantization is not None:
        overrides["quantization_config"] = quantization
    model = model_class.from_pretrained(model_args.model, **overrides)
    _keep_used_weight_conversions(model)
    return model


def _keep_used_weight_conversions(model) -> None:
    """transformers 5.23 loading under ZeRO-3 (deepspeed.zero.Init) keeps every key-renaming rule on the model,
    also the legacy `LayerNorm.gamma -> LayerNorm.weight` one that matched nothing; `save_pretrained` reverses
    them, so every checkpoint of the run would name our Q-Former's LayerNorms `gamma`/`beta`. Keep only the
    rules that were used, as transformers' ordinary loading path does."""
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [c for c in conversions if c.was_used()]


def load_processor(model_args: ModelArguments):
    """The processor (or tokenizer) that tokenizes the text: --processor, else the checkpoint's own."""
    from transformers import AutoProcessor, AutoTokenizer

    from hf_vlm.presets import list_presets

    source = model_args.processor
    if source is None:
        if model_args.model in list_presets():
            raise SystemExit(
                f"--model {model_args.model} is a preset (random weights, no tokenizer): pass --processor with "
                "a processor or tokenizer folder"
            )
        source = model_args.model
    try:
        return AutoProcessor.from_pretrained(source)
    except (OSError, ValueError, KeyError, TypeError):
        return AutoTokenizer.from_pretrained(source)


def _is_processor(obj) -> bool:
    from transformers import ProcessorMixin

    return isinstance(obj, ProcessorMixin)


def build_data(stage: Stage, model, processor, data_args: DataArguments, training_args, *, train: bool = True):
    """hf_vlm.data's data for the stage: dataset, collator and the skip counter. train=True: --train_data with
    the training augmentation; train=False: --eval_data with the evaluation transform, same pipeline."""
    from hf_vlm.data import build_image_transform, build_training_data, data_recipe

    image_size = data_args.image_size or model.config.vision_config.image_size
    augmentation = data_args.augmentation or data_recipe(stage.data_recipe).augmentation
    kwargs = {}
    if getattr(model.config, "qformer_text_input", False) and hasattr(processor, "qformer_text_input"):
        # the collator then gives the prompt to the question-aware Q-Former (checkpoints save the flag with it)
        processor.qformer_text_input = True
    if _is_processor(processor):
        kwargs["processor"] = processor
        kwargs["image_size"] = image_size
    else:  # a bare tokenizer: the image transform follows the recipe at the model's image size
        kwargs["tokenizer"] = processor
        kwargs["image_transform"] = build_image_transform(augmentation, train=train, image_size=image_size)
    return build_training_data(
        stage.data_recipe,
        data_args.train_data if train else data_args.eval_data,
        train=train,
        augmentation=augmentation,
        max_length=data_args.max_length,
        streaming=data_args.streaming,
        seed=training_args.seed,
        # evaluation order does not matter for a mean loss: no shuffle buffer to fill
        shuffle_buffer=data_args.shuffle_buffer if train else 0,
        cache_dir=data_args.dataset_cache_dir,
        max_skip_fraction=data_args.max_skip_fraction,
        **kwargs,
    )


def _label_names(stage: Stage) -> list[str]:
    """The batch keys the Trainer's eval loop needs before it computes a loss. transformers guesses them from
    forward's signature (CocaModel: `labels`), but CoCa and BLIP-2 stage 1 batches carry `return_loss=True`
    and no labels: with the guess, evaluation would report no eval_loss for them."""
    from hf_vlm.data import data_recipe

    return ["labels"] if data_recipe(stage.data_recipe).text_role == "labels" else []


def check_tokenizer_fits(model, tokenizer) -> None:
    """Fail before training, naming both sizes, when the tokenizer has ids the model cannot embed
    (e.g. a preset's random model with a larger trained tokenizer), instead of an index error mid-step."""
    num_embeddings = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > num_embeddings:
        raise SystemExit(
            f"the tokenizer has {len(tokenizer)} ids but {type(model).__name__} embeds only {num_embeddings}: "
            "use a tokenizer trained with at most that vocabulary, or a model config whose vocab_size covers it"
        )


# --------------------------------------------------------------------------------------------------
# The run


def _compute_dtype(training_args):
    import torch

    return torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32


def _with_lora(model, model_args: ModelArguments, training_args):
    """The model wrapped with LoRA adapters (trainers/lora.py). Gradient checkpointing is turned on before
    wrapping (peft then hooks the inputs if reentrant checkpointing needs it); the Trainer's own call later
    finds it on."""
    from hf_vlm.trainers.lora import apply_lora

    checkpointing = None
    if training_args.gradient_checkpointing:  # transformers' default: non-reentrant
        checkpointing = training_args.gradient_checkpointing_kwargs or {"use_reentrant": False}
    try:
        model = apply_lora(model, r=model_args.lora_r, alpha=model_args.lora_alpha, dropout=model_args.lora_dropout,
                           target_modules=model_args.lora_target_modules, gradient_checkpointing_kwargs=checkpointing)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("LoRA r=%d alpha=%d: %d of %d parameters trainable", model_args.lora_r, model_args.lora_alpha,
                trainable, total)
    return model


def forward_uses_num_items_in_batch(model) -> bool:
    """Whether `model.forward` normalises its loss by the Trainer's `num_items_in_batch`.

    The Trainer assumes so for any forward with **kwargs and then multiplies the loss by the number of
    processes (to undo a per-token normalisation over the global batch). Our forwards take **kwargs but
    average their losses per batch, so that factor would make both the gradients and the logged loss
    world_size times too large. Only a forward that names the argument gets it.
    """
    return "num_items_in_batch" in inspect.signature(model.forward).parameters


def run(argv: list[str] | None, allowed_stages: tuple[str, ...], prog: str, callbacks=()) -> str:
    """Parse, build, train, save. Returns the output folder. `callbacks`: extra TrainerCallbacks."""
    from transformers import Trainer, set_seed

    from hf_vlm.data import SkippedSamplesCallback
    from hf_vlm.data.resume import DataStateCallback, enable_stateful_dataloader
    from hf_vlm.trainers.checkpoints import CompleteCheckpointCallback, resolve_resume
    from hf_vlm.trainers.distributed import patch_deepspeed_scalar_broadcast

    recipe, model_args, data_args, training_args = parse_arguments(argv, allowed_stages, prog)
    stage = STAGES[recipe.stage]
    if training_args.deepspeed:
        patch_deepspeed_scalar_broadcast()

    set_seed(training_args.seed)
    model = load_model(stage, model_args, compute_dtype=_compute_dtype(training_args))
    processor = load_processor(model_args)
    data = build_data(stage, model, processor, data_args, training_args)
    check_tokenizer_fits(model, data.collator.tokenizer)
    if model_args.lora:
        model = _with_lora(model, model_args, training_args)
    eval_dataset = None
    if data_args.eval_data:
        eval_dataset = build_data(stage, model, processor, data_args, training_args, train=False).dataset
        if training_args.label_names is None:
            training_args.label_names = _label_names(stage)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=data.dataset,
        eval_dataset=eval_dataset,
        data_collator=data.collator,
        processing_class=processor,  # saved into every checkpoint-N: checkpoints evaluate and fine-tune as they are
        callbacks=list(callbacks),
    )
    # First in line, so that report_to integrations (TensorBoard, W&B) log the skip counts too.
    skips = SkippedSamplesCallback.attach(trainer, data.counter)
    trainer.model_accepts_loss_kwargs = forward_uses_num_items_in_batch(model)

    # `last`: the newest complete checkpoint-N in output_dir; a path must be a complete checkpoint.
    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir, prog)
    # The data position and skip counts go into every checkpoint; a resumed run continues from there without
    # loading any consumed sample again, with the skip counts of the delivered batches.
    enable_stateful_dataloader(trainer)
    trainer.add_callback(DataStateCallback(data.counter, resume_from=resume))

    # Last in line: a checkpoint is marked complete after every other on_save callback has written into it.
    CompleteCheckpointCallback.attach(trainer)
    trainer.train(resume_from_checkpoint=resume)

    # Final weights + processor (the Trainer's processing_class) in output_dir: `from_pretrained(output_dir)`.
    trainer.save_model(training_args.output_dir)
    trainer.save_state()  # trainer_state.json: the log history (losses, skip counts) of the whole run
    skipped = skips.skipped_counts(training_args)  # a collective: every rank calls it
    if trainer.is_world_process_zero():
        summary = {"recipe": recipe.name, "stage": recipe.stage, "model": model_args.model,
                   "init_qformer_from": model_args.init_qformer_from, "global_step": trainer.state.global_step,
                   "skipped_samples": skipped}
        if model_args.lora:  # output_dir holds the adapter: what it was trained on
            summary["lora"] = {"r": model_args.lora_r, "alpha": model_args.lora_alpha,
                               "dropout": model_args.lora_dropout,
                               "target_modules": sorted(model.peft_config["default"].target_modules),
                               "load_in_8bit": model_args.load_in_8bit, "load_in_4bit": model_args.load_in_4bit}
        Path(training_args.output_dir, "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    trainer.accelerator.wait_for_everyone()
    return training_args.output_dir


def main_for(stages: tuple[str, ...], prog: str):
    def main(argv: list[str] | None = None, callbacks=()) -> int:
        logging.basicConfig(level=os.environ.get("LOGLEVEL", "INFO").upper(), format="%(levelname)s %(name)s: %(message)s")
        run(argv, stages, prog, callbacks)
        return 0

    return main


__all__ = ["FINETUNE_STAGES", "PRETRAIN_STAGES", "STAGES", "DataArguments", "ModelArguments", "Recipe",
           "RecipeArguments", "main_for", "parse_arguments", "run"]
