"""`make demo` / `hf-vlm demo`: hf-vlm's whole job on a laptop CPU, with no downloads.

1. draws synthetic scenes (hf_vlm.scenes) and exports them like any corpus (webdataset shards for
   captions, an imagefolder for VQA);
2. trains the tokenizers on the training captions and questions;
3. pretrains coca-tiny (contrastive + caption) and blip2-tiny (stage 1, stage 2, VQA fine-tune) with
   the same trainers/ scripts and recipes users launch (`python -m hf_vlm.trainers.pretrain ...`);
4. evaluates both on the held-out test split and prints the table (eval_results.json per checkpoint);
5. writes model cards; 6. serves the Space on 127.0.0.1 with the two models (unless --no-serve).

Checkpoints land in $HF_VLM_DEMO_DIR/checkpoints/{coca,blip2} (hf_vlm.space.demo_checkpoint, where the
Space looks for them); an existing pair is reused unless --force.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# The demo's two checkpoints (evaluated on every task their model type supports), and the targets.
DEMO_MODELS = ("coca", "blip2")
_TQDM_STEPS = re.compile(r"(\d+)/(\d+) \[")
TARGETS = {("blip2", "vqa", "vqa_accuracy"): 0.85, ("coca", "caption", "cider"): 1.5, ("coca", "zero-shot", "top1"): 0.9}


@dataclass(frozen=True)
class StageRun:
    """One training run: a recipe of trainers/recipes/ plus the overrides the demo gives it."""

    name: str  # checkpoint folder under <demo>/runs/
    script: str  # "pretrain" or "finetune"
    recipe: str
    data: str  # "captions" or "vqa"
    max_steps: int
    learning_rate: float
    batch_size: int
    init: str | None = None  # --model: the run whose output this one starts from
    init_qformer_from: str | None = None  # blip2 stage 2: the stage-1 run
    extra_args: tuple[str, ...] = ()


# BLIP-2 freezes a *pretrained* EVA ViT and FlanT5. None can be had offline, and frozen random towers
# cannot learn the task (with a frozen random T5 the stage-2 loss stayed above a uniform guess, 7.0 >
# ln 128; with a frozen random ViT, VQA stayed at the answer prior), so the demo trains them.
TRAIN_TINY_TOWERS = ("--freeze_language_model", "false", "--freeze_vision", "false")


@dataclass(frozen=True)
class DemoPlan:
    """Sizes and schedules of the demo; `quick()` is the same pipeline, short, for tests."""

    image_size: int = 32
    caption_scenes: int = 6000
    vqa_scenes: int = 3000
    test_scenes: int = 300
    vocab_size: int = 128
    # Scene captions and answers name positions and colours, which the recipes' crops, flips and colour
    # jitter would falsify ("left of" flipped is a lie): train on the evaluation transform.
    augmentation: str = "none"
    runs: tuple[StageRun, ...] = field(default_factory=lambda: (
        StageRun("coca", "pretrain", "coca-tiny", "captions", 2500, 2e-3, 64),
        StageRun("blip2-stage1", "pretrain", "blip2-tiny-stage1", "captions", 300, 1e-3, 32,
                 extra_args=TRAIN_TINY_TOWERS[2:]),
        StageRun("blip2-stage2", "pretrain", "blip2-tiny-stage2", "captions", 1000, 2e-3, 32,
                 init_qformer_from="blip2-stage1", extra_args=TRAIN_TINY_TOWERS),
        StageRun("blip2", "finetune", "blip2-tiny-vqa", "vqa", 2500, 1e-3, 32, init="blip2-stage2",
                 extra_args=TRAIN_TINY_TOWERS),
    ))

    @classmethod
    def quick(cls) -> DemoPlan:
        """About 4 minutes on 2 idle cores: enough to beat chance clearly, not to reach the targets."""
        return cls(caption_scenes=2000, vqa_scenes=600, test_scenes=100, runs=(
            StageRun("coca", "pretrain", "coca-tiny", "captions", 300, 2e-3, 32),
            StageRun("blip2-stage1", "pretrain", "blip2-tiny-stage1", "captions", 30, 1e-3, 32,
                     extra_args=TRAIN_TINY_TOWERS[2:]),
            StageRun("blip2-stage2", "pretrain", "blip2-tiny-stage2", "captions", 300, 2e-3, 32,
                     init_qformer_from="blip2-stage1", extra_args=TRAIN_TINY_TOWERS),
            StageRun("blip2", "finetune", "blip2-tiny-vqa", "vqa", 500, 1e-3, 32, init="blip2-stage2",
                     extra_args=TRAIN_TINY_TOWERS),
        ))


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
    """Training data exported like a real corpus; drawn again when the plan's scene counts or size change."""
    from hf_vlm import scenes

    config = scenes.SceneConfig(image_size=plan.image_size)
    captions, vqa = folder / "captions", folder / "vqa"
    facts = {"caption_scenes": plan.caption_scenes, "vqa_scenes": plan.vqa_scenes, "image_size": plan.image_size}
    if _made_for(folder, facts):
        return {"captions": captions, "vqa": vqa}
    shutil.rmtree(folder, ignore_errors=True)
    _log(f"drawing {plan.caption_scenes} training scenes -> {captions}")
    scenes.export_webdataset(scenes.generate_scenes("train", plan.caption_scenes, config=config), captions)
    _log(f"drawing {plan.vqa_scenes} training scenes for VQA -> {vqa}")
    # Scenes after the caption ones: same split and distribution, other images.
    rows = scenes.generate_scenes("train", plan.vqa_scenes, config=config, start=plan.caption_scenes)
    scenes.export_imagefolder(scenes.vqa_rows(rows), vqa)
    _stamp(folder, facts)
    return {"captions": captions, "vqa": vqa}


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


def train(run: StageRun, plan: DemoPlan, runs_dir: Path, data: dict[str, Path], processors: dict[str, Path], *,
          position: int = 0) -> Path:
    """Launch one recipe through trainers/ exactly as a user would (`python -m hf_vlm.trainers...`).

    The run's full output goes to <runs>/<name>.log; a progress bar here follows its steps.
    """
    from tqdm.auto import tqdm

    output = runs_dir / run.name
    family = "coca" if run.recipe.startswith("coca") else "blip2"
    args = [
        sys.executable, "-m", f"hf_vlm.trainers.{run.script}", "--recipe", run.recipe,
        "--train_data", str(data[run.data]), "--output_dir", str(output),
        "--max_steps", str(run.max_steps), "--learning_rate", str(run.learning_rate),
        "--per_device_train_batch_size", str(run.batch_size), "--save_strategy", "no",
        "--logging_steps", str(max(run.max_steps // 10, 1)), "--processor", str(processors[family]),
        "--disable_tqdm", "false", "--augmentation", plan.augmentation,
    ]
    if run.init:
        args += ["--model", str(runs_dir / run.init)]
    if run.init_qformer_from:
        args += ["--init_qformer_from", str(runs_dir / run.init_qformer_from)]
    args += run.extra_args
    runs_dir.mkdir(parents=True, exist_ok=True)
    log_path = runs_dir / f"{run.name}.log"
    # Tiny models on a small CPU: one thread per run, runs side by side, beats threads that spin-wait on
    # each other (measured 15-20x faster per step on a loaded 2-core machine).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.monotonic()
    with open(log_path, "w") as log, tqdm(total=run.max_steps, desc=run.name, position=position, unit="step",
                                          leave=True) as bar:
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        buffer = b""
        while chunk := process.stdout.read1(4096):
            log.write(chunk.decode(errors="replace"))
            buffer = (buffer + chunk)[-4096:]
            # The Trainer's own tqdm line reads "... 270/600 [..."; follow the newest one.
            steps = _TQDM_STEPS.findall(buffer.decode(errors="replace"))
            if steps and int(steps[-1][1]) == run.max_steps:
                bar.update(int(steps[-1][0]) - bar.n)
        if process.wait() != 0:
            raise RuntimeError(f"training {run.name} failed (exit {process.returncode}); its log: {log_path}\n"
                               + log_path.read_text()[-3000:])
        bar.update(run.max_steps - bar.n)
    _log(f"{run.name} trained in {time.monotonic() - started:.0f} s (log: {log_path})")
    return output


def train_all(plan: DemoPlan, runs_dir: Path, data: dict[str, Path], processors: dict[str, Path]) -> dict:
    """The CoCa run and the BLIP-2 chain (stage 1 -> stage 2 -> VQA) side by side, one core each."""
    from concurrent.futures import ThreadPoolExecutor

    chains: dict[str, list[StageRun]] = {}
    for run in plan.runs:
        chains.setdefault("coca" if run.recipe.startswith("coca") else "blip2", []).append(run)

    def run_chain(position: int, runs: list[StageRun]) -> dict[str, Path]:
        return {run.name: train(run, plan, runs_dir, data, processors, position=position) for run in runs}

    outputs: dict[str, Path] = {}
    with ThreadPoolExecutor(len(chains)) as pool:
        for result in [pool.submit(run_chain, i, runs) for i, runs in enumerate(chains.values())]:
            outputs.update(result.result())
    return outputs


def evaluate(checkpoints: dict[str, Path], plan: DemoPlan) -> dict[str, dict]:
    from hf_vlm.evaluation.runner import run_eval

    results = {}
    for name, checkpoint in checkpoints.items():
        _log(f"evaluating {name} on {plan.test_scenes} held-out test scenes")
        results[name] = run_eval(str(checkpoint), data="scenes:test",
                                 num_samples=plan.test_scenes, scene_image_size=plan.image_size)
    return results


def target_report(results: dict[str, dict]) -> list[str]:
    lines = []
    for (model, task, metric), target in TARGETS.items():
        value = results.get(model, {}).get(task, {}).get("metrics", {}).get(metric)
        verdict = "not measured" if value is None else ("reached" if value >= target else "NOT reached")
        shown = "-" if value is None else f"{value:.3f}"
        lines.append(f"{model} {task} {metric}: {shown} (target >= {target}) {verdict}")
    return lines


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
            shutil.copytree(outputs[name], staging)
            shutil.rmtree(checkpoint, ignore_errors=True)
            staging.replace(checkpoint)
    else:
        _log(f"reusing the checkpoints in {root / 'checkpoints'} (--force retrains)")
    results = evaluate(checkpoints, plan)
    for checkpoint in checkpoints.values():
        write_card(checkpoint)
    report = target_report(results)
    (root / "demo_results.json").write_text(json.dumps(
        {"results": results, "targets": report, "seconds": round(time.monotonic() - started, 1),
         "plan": asdict(plan)}, indent=2, default=str) + "\n")
    _log(f"done in {time.monotonic() - started:.0f} s")
    for line in report:
        _log(line)
    if serve:
        from hf_vlm.space import create_demo, launch

        app = create_demo()
        launch(app, host=host, port=port)
    return results
