"""`make demo` / `hf-vlm demo`: hf-vlm's whole job on a laptop CPU, with no downloads.

BLIP-2 is built as the paper builds it, with small stand-ins for its two frozen, pretrained towers:

1. draws synthetic scenes (hf_vlm.scenes) and exports them like any corpus (webdataset shards for
   captions, an imagefolder for VQA, a jsonl of their text);
2. trains the tokenizers on the training captions and questions;
3. pretrains, side by side, coca-tiny (contrastive + caption; its ViT becomes BLIP-2's image encoder, the
   stand-in for EVA ViT-g/14) and a small T5 on the scene text (hf_vlm.demo_lm; the stand-in for FlanT5-XL);
4. trains BLIP-2 with both towers frozen: stage 1 (ITC + ITM + ITG) from the CoCa ViT, stage 2 (LM loss) with
   the T5; then fine-tunes for VQA as the paper does (Q-Former and ViT train, T5 frozen) with the
   question-aware Q-Former. All through the trainers/ scripts and recipes users launch;
5. evaluates on the held-out test split (BLIP-2 captions from the stage-2 checkpoint, answers from the VQA
   one) and prints the table and the targets (eval_results.json per checkpoint);
6. writes model cards and the report (<demo>/report.html, hf_vlm.demo_report);
7. serves the Space on 127.0.0.1 with the models (unless --no-serve).

Checkpoints land in $HF_VLM_DEMO_DIR/checkpoints/{coca,blip2,blip2-caption} (hf_vlm.space.demo_checkpoint, where
the Space looks for them); an existing set is reused unless --force.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hf_vlm.scenes import QUESTION_TYPES

# The demo's checkpoints and the tasks each is evaluated on: BLIP-2's VQA fine-tune answers, its stage-2
# checkpoint captions (VQA fine-tuning teaches the Q-Former to extract answers, not captions).
EVAL_TASKS = {"coca": ("caption", "zero-shot", "retrieval"), "blip2": ("vqa",), "blip2-caption": ("caption",)}
DEMO_MODELS = tuple(EVAL_TASKS)
_TQDM_STEPS = re.compile(r"(\d+)/(\d+) \[")
TARGETS = {
    ("blip2", "vqa", "vqa_accuracy"): 0.85,
    **{("blip2", "vqa", f"vqa_accuracy/{kind}"): 0.7 for kind in QUESTION_TYPES},
    ("blip2-caption", "caption", "cider"): 3.0,
    ("coca", "zero-shot", "top1"): 0.9,
    ("coca", "caption", "cider"): 5.0,
}


@dataclass(frozen=True)
class StageRun:
    """One training run: a recipe of trainers/recipes/ (or the demo's T5 pretraining) plus the demo's overrides.

    The runs it starts from are named by `init`, `vision_from`, `init_qformer_from` and `language_model`; a run
    starts as soon as those are done, so the two tower pretrainings run side by side.
    """

    name: str  # checkpoint folder under <demo>/runs/
    script: str  # "pretrain" / "finetune" (hf_vlm.trainers) or "text-lm" (hf_vlm.demo_lm)
    recipe: str
    data: str  # "captions", "vqa" or "text"
    max_steps: int
    learning_rate: float
    batch_size: int
    init: str | None = None  # --model: the run whose output this one starts from
    vision_from: str | None = None  # blip2 stage 1: the CoCa run whose ViT becomes the frozen image encoder
    init_qformer_from: str | None = None  # blip2 stage 2: the stage-1 run
    language_model: str | None = None  # blip2 stage 2: the T5 run, frozen
    qformer_text_from: str | None = None  # blip2 VQA: the stage-1 run whose Q-Former text path reads the question
    extra_args: tuple[str, ...] = ()
    # Given several CPU cores, train as that many one-thread processes (torchrun, DDP over gloo), each on its share of
    # `batch_size`, rather than one process with that many threads: a tiny model's step is mostly single-threaded
    # Python. VQA examples, measured on 2 cores: 2 x 32 1.1x faster than one process of 64 on 2 threads (64: 1.2x
    # faster than 32); stage 2 at 2 x 16 gained nothing over one process of 32, so it too runs 2 x 32.
    data_parallel: bool = False

    @property
    def family(self) -> str:
        return "coca" if self.recipe.startswith("coca") else "blip2"

    @property
    def builds_init(self) -> bool:
        """Whether `train` builds the run's starting checkpoint, <name>-init: CoCa's from the preset with the demo's
        vision settings, BLIP-2's from the runs it needs."""
        return self.family == "coca" or bool(self.vision_from or self.qformer_text_from)

    @property
    def needs(self) -> tuple[str, ...]:
        return tuple(n for n in (self.init, self.vision_from, self.init_qformer_from, self.language_model,
                               self.qformer_text_from) if n)


# The demo's BLIP-2 at demo size (the shared blip2-tiny preset stays as tests use it): the ViT's shape comes
# from the CoCa run (`blip2_vision_config_from_coca`), the T5's from `DemoPlan.language_model`.
DEMO_QFORMER = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256,
                "cross_attention_frequency": 1}
DEMO_BLIP2 = {"num_query_tokens": 8, "image_text_hidden_size": 64}
# VQA fine-tuning as the paper does it: Q-Former and ViT train, the language model stays frozen.
VQA_FINETUNE = ("--freeze_vision", "false", "--freeze_language_model", "true")
# The VQA fine-tune's Q-Former without BERT's dropout (stages 1 and 2 keep it): in the same 3,600 steps colour 0.64 ->
# 0.69, shape 0.62 -> 0.71, overall 0.76 -> 0.80. A small Q-Former fitting a few answers has nothing to regularise.
VQA_QFORMER_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def demo_runs(steps: dict[str, int], coca_batch_size: int) -> tuple[StageRun, ...]:
    """The demo's runs, with `steps` for each: CoCa and the T5 side by side, then BLIP-2 stage 1 (on CoCa's
    ViT) -> stage 2 (on the T5) -> VQA fine-tune (question-aware Q-Former, text path from stage 1)."""
    return (
        StageRun("coca", "pretrain", "coca-tiny", "captions", steps["coca"], 2e-3, coca_batch_size),
        StageRun("t5", "text-lm", "t5-scene-text", "text", steps["t5"], 1e-3, 16),
        StageRun("blip2-stage1", "pretrain", "blip2-tiny-stage1", "captions", steps["blip2-stage1"], 1e-3, 32,
                 vision_from="coca"),
        StageRun("blip2-stage2", "pretrain", "blip2-tiny-stage2", "captions", steps["blip2-stage2"], 2e-3, 64,
                 init_qformer_from="blip2-stage1", language_model="t5", data_parallel=True),
        StageRun("blip2", "finetune", "blip2-tiny-vqa", "vqa", steps["blip2"], 1e-3, 64, init="blip2-stage2",
                 qformer_text_from="blip2-stage1", extra_args=VQA_FINETUNE, data_parallel=True),
    )


@dataclass(frozen=True)
class DemoPlan:
    """Sizes and schedules of the demo; `quick()` is the same pipeline, short, for tests."""

    image_size: int = 32
    caption_scenes: int = 6000
    vqa_scenes: int = 9000
    test_scenes: int = 300
    # Enough for every word of the scene language to be one token (at 128, BPE spelled "bottom" in 6 pieces).
    vocab_size: int = 192
    # The CoCa ViT's position embedding: fixed 2-D sine-cosine coordinates (open_clip's `sin_cos_2d`). Learned ones
    # (timm's init) stayed a faint signal in 1,200 steps: CoCa's captions named the main object's side at chance
    # (0.29; sine-cosine 0.48) and an attention probe on the frozen ViT's tokens read it at 0.61 (sine-cosine 0.89).
    coca_vision: dict = field(default_factory=lambda: {"pos_embed_type": "sin_cos_2d"})
    # The T5 stand-in for FlanT5 (hf_vlm.demo_lm): width and layers of encoder and decoder.
    language_model: dict = field(default_factory=lambda: {"d_model": 128, "num_layers": 2, "num_heads": 4})
    # Scene captions and answers name positions and colours, which the recipes' crops, flips and colour
    # jitter would falsify ("left of" flipped is a lie): train on the evaluation transform.
    augmentation: str = "none"
    # VQA training questions of each type per scene (`scenes.vqa_rows`); None: all. A scene asks one position question
    # but a colour and a shape question per object; one of each gives the types equal shares (position was an eighth).
    vqa_questions_per_type: int | None = 1
    # How often each kept question is asked (`scenes.vqa_rows(type_weights=...)`), a multi-task mixture. Whether the
    # queries carry the main object's side is learned in a jump or not: position asked once per multi-object scene
    # (14% of the questions) gave 0.80 in one run and 0.34 in another, twice 0.95 in both. Count is learned at once but
    # forgotten at a 5% share (0.36); half of the scenes ask it. Colour and shape, the questions that bind an attribute
    # to an object, need the most examples: at the same 173k examples, asked twice 0.76 / 0.73, three times 0.87 / 0.83.
    vqa_type_weights: dict = field(default_factory=lambda: {
        "count": 0.5, "position": 2.0, "color": 3.0, "shape": 3.0, "yes/no": 1.5})
    # Training captions that name only the main object (`scenes.with_subject_captions`), as many web alt-texts do:
    # without them CoCa's zero-shot prompt "a large red circle" matches one-object scenes only (top-1 0.60).
    subject_caption_fraction: float = 0.25
    # Measured from a fresh clone with the T5 at 1,600 x 8, stage 2 at 2,400 x 32 and CoCa at 1,200 steps: 932 s,
    # over the 900-s budget, and VQA 0.843. Each run now takes as many examples a step as its data-parallel processes
    # or its thread digest cheaply; from the same stage 1, each was as good or better at half the steps:
    # - the T5, 800 x 16: reads answers from true captions at 0.933 (1,600 x 8: 0.905; 1,200 x 8: 0.862; lr 2e-3 or a
    #   third layer: worse). It trains beside CoCa (1,000 steps; 1,200 gave caption CIDEr 7.5, zero-shot 0.98) and
    #   stage 1.
    # - stage 2, 1,200 x 64 (2 x 32): the VQA fine-tune from it answered 0.897 where one from 2,400 x 32 answered
    #   0.843. Stage 2 is where the Q-Former learns to carry the scene to the T5 (small objects named right in its
    #   captions: 800 x 32 0.53, 2,400 x 32 0.71).
    # - the VQA fine-tune learns from examples more than steps (3,600 x 32 and 7,200 x 16 both 0.75): 2,700 x 64
    #   (173k) answered 0.84-0.91 in five chains (lr 2e-3: 0.87), 3,600 x 48 (the same 173k) 0.887, 4,400 x 32
    #   (141k) 0.80.
    runs: tuple[StageRun, ...] = field(default_factory=lambda: demo_runs(
        {"coca": 1000, "t5": 800, "blip2-stage1": 300, "blip2-stage2": 1200, "blip2": 2700}, coca_batch_size=64))

    @classmethod
    def quick(cls) -> DemoPlan:
        """A few minutes on 2 idle cores: enough to show the frozen towers stay frozen and the captioner reads
        the image, not to reach the targets."""
        return cls(caption_scenes=1500, vqa_scenes=400, test_scenes=100, runs=demo_runs(
            {"coca": 250, "t5": 100, "blip2-stage1": 30, "blip2-stage2": 125, "blip2": 50}, coca_batch_size=32))

def _log(message: str) -> None:
    print(f"[hf-vlm demo] {message}", flush=True)


def _made_for(folder: Path, facts: dict) -> bool:
    """Whether `folder` was completely made from these plan facts (its stamp is written last)."""
    stamp = folder / "demo_plan.json"
    return stamp.is_file() and json.loads(stamp.read_text()) == facts


def _stamp(folder: Path, facts: dict) -> None:
    tmp = folder / ".demo_plan.json.tmp"
    tmp.write_text(json.dumps(facts, sort_keys=True) + "\n")
    tmp.replace(folder / "demo_plan.json")


def prepare_data(plan: DemoPlan, folder: Path) -> dict[str, Path]:
    """Training data exported like a real corpus; drawn again when the plan's scene counts or size change.

    "text" is the text of every training scene (captions, questions, answers), the T5's pretraining corpus."""
    from hf_vlm import scenes

    config = scenes.SceneConfig(image_size=plan.image_size)
    paths = {"captions": folder / "captions", "vqa": folder / "vqa", "text": folder / "text.jsonl"}
    facts = {"caption_scenes": plan.caption_scenes, "vqa_scenes": plan.vqa_scenes, "image_size": plan.image_size,
             "subject_caption_fraction": plan.subject_caption_fraction,
             "vqa_questions_per_type": plan.vqa_questions_per_type, "vqa_type_weights": plan.vqa_type_weights}
    if _made_for(folder, facts):
        return paths
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    with open(paths["text"], "w") as text:

        def keeping_text(rows):
            for row in rows:
                text.write(json.dumps({k: row[k] for k in ("caption", "questions", "answers")}) + "\n")
                yield row

        _log(f"drawing {plan.caption_scenes} training scenes -> {paths['captions']}")
        rows = keeping_text(scenes.generate_scenes("train", plan.caption_scenes, config=config))  # full captions
        scenes.export_webdataset(scenes.with_subject_captions(rows, plan.subject_caption_fraction), paths["captions"])
        _log(f"drawing {plan.vqa_scenes} training scenes for VQA -> {paths['vqa']}")
        # Scenes after the caption ones: same split and distribution, other images.
        rows = scenes.generate_scenes("train", plan.vqa_scenes, config=config, start=plan.caption_scenes)
        scenes.export_imagefolder(scenes.vqa_rows(keeping_text(rows), per_type=plan.vqa_questions_per_type,
                                                  type_weights=plan.vqa_type_weights),
                                  paths["vqa"])
    _stamp(folder, facts)
    return paths


def build_processors(plan: DemoPlan, folder: Path) -> dict[str, Path]:
    """Tokenizers trained on the training text, wrapped in each family's processor and saved."""
    from hf_vlm import scenes
    from hf_vlm.data.collators import VQA_PROMPT
    from hf_vlm.modeling.blip2_flant5 import Blip2FlanT5Processor
    from hf_vlm.modeling.coca import CocaProcessor
    from hf_vlm.tokenization import train_bert_tokenizer, train_coca_tokenizer, train_t5_tokenizer

    paths = {"coca": folder / "coca", "blip2": folder / "blip2"}
    facts = {"vocab_size": plan.vocab_size, "image_size": plan.image_size}
    if _made_for(folder, facts):
        return paths
    config = scenes.SceneConfig(image_size=plan.image_size)
    texts = scenes.zero_shot_prompts(config)
    for row in scenes.generate_scenes("train", 2000, config=config):
        # Every text the models will read or write: captions, VQA prompts as the data recipe phrases them, answers.
        texts += [row["caption"], *(VQA_PROMPT.format(q) for q in row["questions"]), *row["answers"]]
    _log(f"training tokenizers on {len(texts)} texts")
    # BPE: on these small, repetitive texts it keeps whole words (17 tokens a caption instead of 29).
    CocaProcessor.from_tokenizer(
        train_coca_tokenizer(texts, plan.vocab_size, model_type="bpe"), image_size=plan.image_size
    ).save_pretrained(paths["coca"])
    Blip2FlanT5Processor.from_tokenizers(
        train_t5_tokenizer(texts, plan.vocab_size, model_type="bpe"), train_bert_tokenizer(texts, plan.vocab_size),
        image_size=plan.image_size,
    ).save_pretrained(paths["blip2"])
    _stamp(folder, facts)
    return paths


# --------------------------------------------------------------------------------------------------
# The frozen towers: the CoCa run's ViT becomes BLIP-2's image encoder (through the swappable timm backbone)


COCA_TRUNK_PREFIX = "vision_model.trunk."  # CocaModel's timm ViT; BLIP-2's is `vision_model.`


def blip2_vision_config_from_coca(coca_vision_config) -> dict:
    """The `Blip2FlanT5VisionConfig` fields that build the same timm ViT as a CoCa vision config.

    BLIP-2 names timm's embed_dim / depth / num_heads / patch_size / mlp_ratio in transformers' words and passes the
    rest of timm's arguments (e.g. `final_norm`) through `timm_kwargs`; CoCa passes them all as `timm_model_args`.
    """
    args = dict(coca_vision_config.timm_model_args)
    shape = ("patch_size", "embed_dim", "depth", "num_heads")
    missing = [name for name in shape if name not in args]
    if missing:
        raise ValueError(f"the CoCa vision_config.timm_model_args lacks {missing}: name the ViT's shape explicitly")
    hidden_size = args.pop("embed_dim")
    return {
        "timm_model_name": coca_vision_config.timm_model_name,
        "image_size": coca_vision_config.image_size,
        "patch_size": args.pop("patch_size"),
        "hidden_size": hidden_size,
        "num_hidden_layers": args.pop("depth"),
        "num_attention_heads": args.pop("num_heads"),
        "intermediate_size": int(args.pop("mlp_ratio", 4.0) * hidden_size),
        "timm_kwargs": args,
    }


def blip2_with_coca_vision(coca_checkpoint: str | Path, blip2_config):
    """A `Blip2FlanT5ForPretraining` whose image encoder is the CoCa checkpoint's ViT, weight for weight.

    `blip2_config.vision_config` must describe that ViT (`blip2_vision_config_from_coca`). Strict key accounting:
    every tensor of the CoCa trunk is loaded and every tensor of BLIP-2's ViT comes from it; `ln_vision`, the
    query tokens and the Q-Former keep their fresh init. CoCa's attentional poolers and text towers are not used.
    """
    from safetensors.torch import load_file

    from hf_vlm.modeling.blip2_flant5 import Blip2FlanT5ForPretraining

    coca_state = load_file(str(Path(coca_checkpoint) / "model.safetensors"))
    vit_state = {k.removeprefix(COCA_TRUNK_PREFIX): v for k, v in coca_state.items() if k.startswith(COCA_TRUNK_PREFIX)}
    if not vit_state:
        raise ValueError(f"{coca_checkpoint}/model.safetensors has no {COCA_TRUNK_PREFIX}* tensors: not a CoCa checkpoint")
    model = Blip2FlanT5ForPretraining(blip2_config)
    missing, unexpected = model.vision_model.load_state_dict(vit_state, strict=False)
    if missing or unexpected:
        raise ValueError(f"the CoCa ViT does not fit BLIP-2's vision_config: BLIP-2 tensors not in CoCa {missing}, "
                         f"CoCa tensors BLIP-2 lacks {unexpected}")
    return model


def build_coca_init(plan: DemoPlan, processor: Path, output: Path) -> Path:
    """The CoCa run's starting checkpoint: the coca-tiny preset, randomly initialized, with the demo's vision
    settings (`DemoPlan.coca_vision`) and a vocabulary the size of the demo's tokenizer."""
    from transformers import AutoProcessor

    from hf_vlm.modeling.coca import CocaModel
    from hf_vlm.presets import get_config

    config = get_config("coca-tiny")
    for name, value in plan.coca_vision.items():
        setattr(config.vision_config, name, value)
    processor = AutoProcessor.from_pretrained(processor)
    config.text_config.vocab_size = len(processor.tokenizer)
    CocaModel._from_config(config).save_pretrained(output)
    processor.save_pretrained(output)
    return output


def build_blip2_init(plan: DemoPlan, coca_run: Path, processor: Path, output: Path) -> Path:
    """Stage 1's starting checkpoint: the demo-size BLIP-2 with the CoCa ViT (frozen by the config's freeze_vision)."""
    from transformers import AutoProcessor

    from hf_vlm.modeling.blip2_flant5 import Blip2FlanT5Config
    from hf_vlm.modeling.coca import CocaConfig
    from hf_vlm.presets import preset_dict

    tiny = {k: v for k, v in preset_dict("blip2-tiny").items() if k != "model_type"}
    config = Blip2FlanT5Config(**{
        **tiny, **DEMO_BLIP2,
        "vision_config": blip2_vision_config_from_coca(CocaConfig.from_pretrained(coca_run).vision_config),
        "qformer_config": {**tiny["qformer_config"], **DEMO_QFORMER},
    })
    blip2_with_coca_vision(coca_run, config).save_pretrained(output)
    AutoProcessor.from_pretrained(processor).save_pretrained(output)
    return output


def build_vqa_init(stage1: Path, stage2: Path, processor: Path, output: Path) -> Path:
    """The VQA fine-tune's start: the stage-2 checkpoint with the question-aware Q-Former switched on, as BLIP-2's
    VQA fine-tuning (section 4.3) and InstructBLIP give the question to the Q-Former, and no Q-Former dropout
    (`VQA_QFORMER_DROPOUT`).

    Stage 2 drops the Q-Former's text path (word embeddings, text feed-forwards); it comes back from stage 1, which
    trained it. Strict key accounting: every tensor stage 2 lacks is in stage 1.
    """
    from safetensors.torch import load_file
    from transformers import AutoProcessor

    from hf_vlm.modeling.blip2_flant5 import Blip2FlanT5ForConditionalGeneration

    model, info = Blip2FlanT5ForConditionalGeneration.from_pretrained(
        stage2, qformer_text_input=True, output_loading_info=True)
    stage1_state = load_file(str(stage1 / "model.safetensors"))
    text_path = set(info["missing_keys"])
    if not text_path or text_path - set(stage1_state) or info["unexpected_keys"]:
        raise ValueError(f"the question-aware Q-Former's text path should come from stage 1: missing in both "
                         f"{sorted(text_path - set(stage1_state))}, unexpected {info['unexpected_keys']}")
    model.load_state_dict({key: stage1_state[key] for key in text_path}, strict=False)
    for name, value in VQA_QFORMER_DROPOUT.items():  # the saved config is what the fine-tune builds
        setattr(model.config.qformer_config, name, value)
    model.save_pretrained(output)
    question_aware = AutoProcessor.from_pretrained(processor)
    question_aware.qformer_text_input = True
    question_aware.save_pretrained(output)
    return output


# --------------------------------------------------------------------------------------------------
# Training


def _processes(run: StageRun, cores: int) -> int:
    """How many data-parallel processes `run` trains as on `cores` CPU cores (`StageRun.data_parallel`): one per core
    when its batch splits evenly, one on a GPU machine (the Trainer takes the GPU)."""
    import torch

    if not run.data_parallel or cores < 2 or run.batch_size % cores or torch.cuda.is_available():
        return 1
    return cores


def _command(run: StageRun, plan: DemoPlan, runs_dir: Path, data: dict[str, Path], processors: dict[str, Path],
             processes: int = 1):
    """The command line of one run, as a user would type it; `processes` > 1: a `torchrun` launch on CPU."""
    common = [
        "--output_dir", str(runs_dir / run.name), "--max_steps", str(run.max_steps),
        "--learning_rate", str(run.learning_rate),
        "--per_device_train_batch_size", str(run.batch_size // processes),
        "--save_strategy", "no", "--logging_steps", str(max(run.max_steps // 20, 1)), "--disable_tqdm", "false",
        "--report_to", "none",
    ]
    # Both kinds of script parse TrainingArguments, so either launches the same way.
    module = "hf_vlm.demo_lm" if run.script == "text-lm" else f"hf_vlm.trainers.{run.script}"
    launch = [sys.executable, "-m", module]
    if processes > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                  "-m", module]
        common += ["--use_cpu", "true"]  # else the Trainer sees no GPU and no distributed run: each rank trains alone
    if run.script == "text-lm":
        model = [f"--{name}={value}" for name, value in plan.language_model.items()]
        return [*launch, "--text_corpus", str(data["text"]), "--processor", str(processors["blip2"]), *model,
                *common, "--warmup_steps", "0.05", "--lr_scheduler_type", "cosine"]
    processor = runs_dir / f"{run.name}-init" if run.builds_init else processors[run.family]
    args = [*launch, "--recipe", run.recipe, "--train_data", str(data[run.data]), "--processor", str(processor),
            "--augmentation", plan.augmentation, *common]
    if run.builds_init:
        args += ["--model", str(runs_dir / f"{run.name}-init")]
    elif run.init:
        args += ["--model", str(runs_dir / run.init)]
    if run.init_qformer_from:
        args += ["--init_qformer_from", str(runs_dir / run.init_qformer_from)]
    if run.language_model:
        args += ["--language_model", str(runs_dir / run.language_model)]
    return args + list(run.extra_args)


def train(run: StageRun, plan: DemoPlan, runs_dir: Path, data: dict[str, Path], processors: dict[str, Path], *,
          position: int = 0, threads: int = 1) -> Path:
    """Launch one run exactly as a user would (`python -m hf_vlm.trainers...`).

    The run's full output goes to <runs>/<name>.log; a progress bar here follows its steps.
    """
    from tqdm.auto import tqdm

    output = runs_dir / run.name
    runs_dir.mkdir(parents=True, exist_ok=True)
    # Starting checkpoints (`StageRun.builds_init`) are built here rather than in a trainer: CoCa's from the preset,
    # the towers BLIP-2 starts from from finished runs.
    if run.family == "coca":
        build_coca_init(plan, processors["coca"], runs_dir / f"{run.name}-init")
    if run.vision_from:
        build_blip2_init(plan, runs_dir / run.vision_from, processors["blip2"], runs_dir / f"{run.name}-init")
    if run.qformer_text_from:
        build_vqa_init(runs_dir / run.qformer_text_from, runs_dir / run.init, processors["blip2"],
                       runs_dir / f"{run.name}-init")
    processes = _processes(run, threads)
    args = _command(run, plan, runs_dir, data, processors, processes)
    log_path = runs_dir / f"{run.name}.log"
    # Tiny models on a small CPU: runs side by side with a thread each beat threads that spin-wait on each other
    # (measured 15-20x faster per step on a loaded 2-core machine); a run alone gets the cores (`train_all`).
    per_process = max(1, threads // processes)
    env = {**os.environ, "OMP_NUM_THREADS": str(per_process), "MKL_NUM_THREADS": str(per_process),
           "TOKENIZERS_PARALLELISM": "false"}
    started = time.monotonic()
    with open(log_path, "w") as log, tqdm(total=run.max_steps, desc=run.name, position=position, unit="step",
                                          leave=True) as bar:
        log.write(" ".join(args) + "\n")
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        buffer = b""
        while chunk := process.stdout.read1(4096):
            log.write(chunk.decode(errors="replace"))
            log.flush()
            buffer = (buffer + chunk)[-4096:]
            # The Trainer's own tqdm line reads "... 270/600 [..."; follow the newest one.
            steps = _TQDM_STEPS.findall(buffer.decode(errors="replace"))
            if steps and int(steps[-1][1]) == run.max_steps:
                bar.update(int(steps[-1][0]) - bar.n)
        if process.wait() != 0:
            raise RuntimeError(f"training {run.name} failed (exit {process.returncode}); its log: {log_path}\n"
                               + log_path.read_text()[-3000:])
        bar.update(run.max_steps - bar.n)
    seconds = time.monotonic() - started
    layout = f"{processes} processes x {per_process} thread" if processes > 1 else f"{threads} thread(s)"
    _log(f"{run.name} trained in {seconds:.0f} s, {run.max_steps / seconds:.2f} steps/s, {layout} "
         f"(load {os.getloadavg()[0]:.1f}; log: {log_path})")
    return output


def _core_budget() -> int:
    """The cores the demo's runs may share: OMP_NUM_THREADS when the caller set it (pytest-xdist workers set 1 each,
    so a test's demo never spins threads on the other worker's core), else every CPU."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return os.cpu_count() or 1


def train_all(plan: DemoPlan, runs_dir: Path, data: dict[str, Path], processors: dict[str, Path]) -> dict:
    """Every run in its own thread, started when the runs it needs are done: CoCa and the T5 side by side, one
    core each, then the BLIP-2 chain (stage 1 -> stage 2 -> VQA)."""
    from concurrent.futures import ThreadPoolExecutor

    names = [run.name for run in plan.runs]
    for run in plan.runs:
        unknown = [n for n in run.needs if n not in names[:names.index(run.name)]]
        if unknown:
            raise ValueError(f"demo run {run.name!r} needs {unknown}, which are not runs listed before it")
    futures = {}
    all_submitted = threading.Event()

    def run_after_needs(position: int, run: StageRun) -> Path:
        all_submitted.wait()
        for name in run.needs:
            futures[name].result()
        # The cores are shared among the runs that can run now: CoCa and the T5 get one each; stage 2 and the
        # VQA fine-tune, alone on the critical path, get them all (1.4x faster on 2 cores than one thread).
        can_run = [r for r in plan.runs if r is run or (
            r.name in futures and not futures[r.name].done() and all(futures[n].done() for n in r.needs))]
        threads = max(1, _core_budget() // len(can_run))
        return train(run, plan, runs_dir, data, processors, position=position, threads=threads)

    with ThreadPoolExecutor(len(plan.runs)) as pool:
        for position, run in enumerate(plan.runs):
            futures[run.name] = pool.submit(run_after_needs, position, run)
        all_submitted.set()
        return {name: future.result() for name, future in futures.items()}


# Which run each published checkpoint is.
PUBLISHED_RUNS = {"coca": "coca", "blip2": "blip2", "blip2-caption": "blip2-stage2"}


def evaluate(checkpoints: dict[str, Path], plan: DemoPlan) -> dict[str, dict]:
    from hf_vlm.evaluation.runner import run_eval

    results = {}
    for name, checkpoint in checkpoints.items():
        _log(f"evaluating {name} ({', '.join(EVAL_TASKS[name])}) on {plan.test_scenes} held-out test scenes")
        results[name] = run_eval(str(checkpoint), EVAL_TASKS[name], data="scenes:test",
                                 num_samples=plan.test_scenes, scene_image_size=plan.image_size)
    return results


def question_sensitivity(checkpoint: str | Path, num_scenes: int = 100, image_size: int = 32) -> float:
    """How much a question-aware BLIP-2's soft prompt depends on the question, relative to the image: over
    three-object test scenes, the mean distance between the projected queries for "what color is the <first shape>?"
    and "... <second shape>?" on the same image, divided by that between two images under the same question.
    0 means the Q-Former ignores the question; the frozen language model then answers from one prompt per image."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from hf_vlm import scenes
    from hf_vlm.data.collators import VQA_PROMPT

    model = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    if not model.config.qformer_text_input:
        raise ValueError(f"{checkpoint}: its Q-Former does not read the question (qformer_text_input=False)")
    config = scenes.SceneConfig(image_size=image_size)
    rows = [row for row in scenes.generate_scenes("test", num_scenes, config=config) if len(row["objects"]) == 3]
    if len(rows) < 2:
        raise ValueError(f"{num_scenes} test scenes hold fewer than two three-object scenes")
    pixel_values = processor.image_processor([row["image"] for row in rows], return_tensors="pt")["pixel_values"]

    def soft_prompt(pixels, question_index):
        prompts = [VQA_PROMPT.format(row["questions"][question_index]) for row in rows]  # 0, 1: the first colours
        with torch.no_grad():
            return model.get_image_features(pixels, **processor.question_inputs(prompts)).pooler_output

    asked = soft_prompt(pixel_values, 0)
    other_question = (asked - soft_prompt(pixel_values, 1)).norm(dim=-1).mean()
    other_image = (asked - soft_prompt(pixel_values.roll(1, dims=0), 0)).norm(dim=-1).mean()
    return (other_question / other_image).item()


def target_report(results: dict[str, dict]) -> list[str]:
    lines = []
    for (model, task, metric), target in TARGETS.items():
        value = results.get(model, {}).get(task, {}).get("metrics", {}).get(metric)
        verdict = "not measured" if value is None else ("reached" if value >= target else "MISSED")
        shown = "-" if value is None else f"{value:.3f}"
        lines.append(f"{model} {task} {metric}: {shown} (target >= {target}) {verdict}")
    return lines


def write_demo_report(plan: DemoPlan, root: Path, results: dict, targets: list[str], notes: str = "") -> Path:
    """<demo>/report.html from the published checkpoints and the runs' trainer_state.json (hf_vlm.demo_report)."""
    from hf_vlm.demo_report import write_report
    from hf_vlm.space import demo_checkpoint

    return write_report(root, results=results, targets=targets, run_names=[run.name for run in plan.runs],
                        checkpoints={name: demo_checkpoint(name) for name in DEMO_MODELS},
                        image_size=plan.image_size, notes=notes)


def run_demo(*, force: bool = False, serve: bool = True, quick: bool = False, host: str = "127.0.0.1",
             port: int | None = None) -> dict[str, dict]:
    from hf_vlm.hub import write_card
    from hf_vlm.space import demo_checkpoint

    plan = DemoPlan.quick() if quick else DemoPlan()
    checkpoints = {name: demo_checkpoint(name) for name in DEMO_MODELS}
    root = checkpoints["coca"].parent.parent
    started = time.monotonic()
    if force or not all((path / "config.json").exists() for path in checkpoints.values()):
        data = prepare_data(plan, root / "data")
        processors = build_processors(plan, root / "processors")
        outputs = train_all(plan, root / "runs", data, processors)
        for name, checkpoint in checkpoints.items():
            # Publish atomically: the Space only ever sees a complete checkpoint folder.
            staging = checkpoint.with_name(f".{name}.tmp")
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(outputs[PUBLISHED_RUNS[name]], staging)
            shutil.rmtree(checkpoint, ignore_errors=True)
            staging.replace(checkpoint)
    else:
        _log(f"reusing the checkpoints in {root / 'checkpoints'} (--force retrains)")
    results = evaluate(checkpoints, plan)
    for checkpoint in checkpoints.values():
        write_card(checkpoint)
    report = target_report(results)
    # The ceiling of BLIP-2's VQA: the frozen T5 answering from the true caption where BLIP-2 gives it the queries.
    reading = None
    if (root / "runs" / "t5" / "config.json").exists():
        from hf_vlm.demo_lm import reading_accuracy

        reading = reading_accuracy(root / "runs" / "t5", num_scenes=plan.test_scenes, image_size=plan.image_size)
    sensitivity = question_sensitivity(checkpoints["blip2"], num_scenes=plan.test_scenes, image_size=plan.image_size)
    seconds = time.monotonic() - started
    (root / "demo_results.json").write_text(json.dumps(
        {"results": results, "targets": report, "language_model_reading": reading,
         "qformer_question_sensitivity": sensitivity, "seconds": round(seconds, 1),
         "load_average": os.getloadavg(), "plan": asdict(plan)}, indent=2, default=str) + "\n")
    page = write_demo_report(plan, root, results, report,
                             notes=f"{seconds:.0f} s on {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} "
                                   "at the end")
    _log(f"done in {seconds:.0f} s")
    for line in report:
        _log(line)
    if reading:
        _log("the frozen T5 answers from the true caption (BLIP-2's ceiling): "
             + ", ".join(f"{kind} {value:.3f}" for kind, value in reading.items()))
    _log(f"how much BLIP-2's soft prompt changes with the question, relative to the image: {sensitivity:.3f}")
    _log(f"report: {page}")
    if serve:
        from hf_vlm.space import create_demo, launch

        app = create_demo()
        launch(app, host=host, port=port)
    return results
