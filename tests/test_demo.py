"""`hf-vlm demo`: the short version of the demo pipeline trains both families through trainers/, evaluates
them on held-out scenes, writes cards, and the models beat trivial baselines by a wide margin."""

import dataclasses
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from hf_vlm import demo, scenes
from hf_vlm.evaluation.captioning import cider_d
from hf_vlm.evaluation.vqa import vqa_metrics


def _baselines(num_samples: int) -> dict:
    """What a model that ignores the image scores on the same test scenes."""
    rows = list(scenes.generate_scenes("test", num_samples))
    # VQA: always the most frequent answer of each question type.
    by_type: dict[str, Counter] = {}
    for row in rows:
        for answer, kind in zip(row["answers"], row["question_types"]):
            by_type.setdefault(kind, Counter())[answer] += 1
    questions = [(a, t) for row in rows for a, t in zip(row["answers"], row["question_types"])]
    majority = [by_type[t].most_common(1)[0][0] for _, t in questions]
    vqa = vqa_metrics(majority, [[a] for a, _ in questions])["vqa_accuracy"]
    # Captioning: one caption, the most frequent one, for every image.
    captions = [row["caption"] for row in rows]
    constant = [Counter(captions).most_common(1)[0][0]] * len(captions)
    cider, _ = cider_d(constant, [[c] for c in captions])
    return {"vqa": vqa, "cider": cider, "zero_shot": 1 / len(scenes.SceneConfig().class_names())}


README = Path(__file__).resolve().parents[1] / "README.md"


def _caption_loss_real_vs_shuffled(checkpoint: Path, num_samples: int = 32) -> tuple[float, float]:
    """The caption loss of a BLIP-2 checkpoint on test scenes with their own images, and with the images
    shuffled among the captions: a model that ignores the image scores the same on both."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    rows = list(scenes.generate_scenes("test", num_samples))
    inputs = processor(images=[r["image"] for r in rows], text=[""] * num_samples,
                       text_target=[r["caption"] for r in rows], return_tensors="pt")
    with torch.no_grad():
        real = model(**inputs).loss.item()
        inputs["pixel_values"] = inputs["pixel_values"][torch.randperm(num_samples, generator=torch.Generator().manual_seed(0))]
        shuffled = model(**inputs).loss.item()
    return real, shuffled


def _tensors(folder: Path, prefix: str = "") -> dict:
    from safetensors.torch import load_file

    return {k.removeprefix(prefix): v for k, v in load_file(str(folder / "model.safetensors")).items()
            if k.startswith(prefix)}


def _unchanged(before: dict, after: dict) -> bool:
    """Every tensor of `before` is in `after`, bit for bit (BLIP-2 saves tensors the T5 run does not: the Q-Former,
    the ViT, the embeddings' tied copies)."""
    import torch

    return all(key in after and torch.equal(tensor, after[key]) for key, tensor in before.items())


@pytest.mark.slow
def test_quick_demo_builds_blip2_on_frozen_pretrained_towers(tmp_path, monkeypatch):
    # Laid out as in a checkout (./.demo), so the README's examples can run against it as written.
    demo_dir = tmp_path / ".demo"
    monkeypatch.setenv("HF_VLM_DEMO_DIR", str(demo_dir))
    plan = demo.DemoPlan.quick()
    # Stage 2 and the VQA fine-tune as on an idle machine of 2 cores or more: 2 data-parallel processes (torchrun).
    monkeypatch.setattr(demo, "_processes", lambda run, cores: 2 if run.data_parallel else 1)
    results = demo.run_demo(quick=True, serve=False)
    runs = demo_dir / "runs"
    for name in ("blip2-stage2", "blip2"):
        assert "torch.distributed.run --standalone --nproc_per_node 2" in (runs / f"{name}.log").read_text().split("\n")[0]

    # Every run trained its steps (the trainers/ runs through their recipes); the published checkpoints have cards.
    for run in plan.runs:
        state = json.loads((runs / run.name / "trainer_state.json").read_text())
        assert state["global_step"] == run.max_steps, run.name
        if run.script != "text-lm":
            assert json.loads((runs / run.name / "training_summary.json").read_text())["recipe"] == run.recipe
    for name in demo.DEMO_MODELS:
        checkpoint = demo_dir / "checkpoints" / name
        assert (checkpoint / "config.json").exists() and (checkpoint / "eval_results.json").exists()
        card = (checkpoint / "README.md").read_text()
        assert "model-index:" in card and "| task | dataset | split | metric | value |" in card
    report = json.loads((demo_dir / "demo_results.json").read_text())
    assert len(report["targets"]) == len(demo.TARGETS)
    # The frozen T5's answers from the true captions, per question type (BLIP-2's ceiling): a 100-step T5 already
    # counts the objects named in a caption better than chance (1/3).
    reading = report["language_model_reading"]
    assert set(reading) == {"accuracy", *scenes.QUESTION_TYPES} and all(0 <= v <= 1 for v in reading.values())
    assert reading["count"] > 0.5, reading
    # How much the question-aware Q-Former's soft prompt depends on the question (relative to the image): measured.
    sensitivity = report["qformer_question_sensitivity"]
    assert isinstance(sensitivity, float) and 0 < sensitivity < float("inf"), sensitivity

    # BLIP-2's method: the CoCa ViT and the pretrained T5 stay bit-identical through stage 1 and stage 2 ...
    coca_vit = _tensors(runs / "coca", demo.COCA_TRUNK_PREFIX)
    # (the CoCa ViT's position embedding is fixed sine-cosine coordinates, DemoPlan.coca_vision: CoCa trained the
    # class token, not them)
    coca_init = _tensors(runs / "coca-init", demo.COCA_TRUNK_PREFIX)
    assert json.loads((runs / "coca" / "config.json").read_text())["vision_config"]["pos_embed_type"] == "sin_cos_2d"
    assert _unchanged({"pos_embed": coca_init["pos_embed"]}, coca_vit)
    assert not _unchanged({"cls_token": coca_init["cls_token"]}, coca_vit)
    t5 = _tensors(runs / "t5")
    assert "lm_head.weight" in t5  # FlanT5's own head (demo_lm.flan_t5), frozen with the rest
    assert _unchanged(coca_vit, _tensors(runs / "blip2-stage1", "vision_model."))
    assert _unchanged(coca_vit, _tensors(runs / "blip2-stage2", "vision_model."))
    assert _unchanged(t5, _tensors(runs / "blip2-stage2", "language_model."))
    # ... and VQA fine-tuning trains the ViT with the question-aware Q-Former while the T5 stays frozen.
    vqa = json.loads((runs / "blip2" / "config.json").read_text())
    assert vqa["qformer_text_input"] and vqa["freeze_language_model"] and not vqa["freeze_vision"]
    assert vqa["qformer_config"]["hidden_dropout_prob"] == vqa["qformer_config"]["attention_probs_dropout_prob"] == 0.0
    assert _unchanged(t5, _tensors(runs / "blip2", "language_model."))
    assert not _unchanged(coca_vit, _tensors(runs / "blip2", "vision_model."))

    # Stage 2's captioner reads the image through the frozen towers: shuffled images make its caption loss worse.
    real, shuffled = _caption_loss_real_vs_shuffled(demo_dir / "checkpoints" / "blip2-caption")
    assert real < 0.9 * shuffled, (real, shuffled)
    # CoCa beats the image-blind baselines.
    baseline = _baselines(plan.test_scenes)
    coca = results["coca"]
    assert coca["zero-shot"]["metrics"]["top1"] >= 2 * baseline["zero_shot"], (coca["zero-shot"], baseline)
    assert coca["caption"]["metrics"]["cider"] >= 1.5 * baseline["cider"], (coca["caption"]["metrics"], baseline)

    # The report shows the scenes, both models' outputs and every run's loss curve, in a real browser.
    _check_report_in_chromium(demo_dir / "report.html", num_runs=len(plan.runs))
    # The Space captions with the stage-2 checkpoint, answers with the VQA one, and names the report.
    from hf_vlm import space

    for variable in (space.BLIP2_ENV, space.COCA_ENV, space.BLIP2_CAPTION_ENV):
        monkeypatch.delenv(variable, raising=False)
    models = space.load_models()
    assert Path(models.blip2_caption.source) == demo_dir / "checkpoints" / "blip2-caption"
    assert Path(models.blip2.source) == demo_dir / "checkpoints" / "blip2"
    assert str((demo_dir / "report.html").resolve()) in models.describe()

    # A second run reuses the checkpoints: nothing is retrained.
    before = {name: (demo_dir / "checkpoints" / name / "model.safetensors").stat().st_mtime_ns
              for name in demo.DEMO_MODELS}
    demo.run_demo(quick=True, serve=False)
    after = {name: (demo_dir / "checkpoints" / name / "model.safetensors").stat().st_mtime_ns
             for name in demo.DEMO_MODELS}
    assert before == after

    # The README's "Using the models" examples run as written against the demo checkpoints.
    using = README.read_text().split("## Using the models", 1)[1].split("\n## ", 1)[0]
    for block in re.findall(r"```python\n(.*?)```", using, flags=re.S):
        result = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, f"README example failed:\n{block}\n{result.stderr[-3000:]}"


def _check_report_in_chromium(page_path: Path, num_runs: int) -> None:
    """Open the report in Debian's headless Chromium: every scene image decoded, one loss plot per run with its
    line drawn; a screenshot is kept in test-artifacts/."""
    from hf_vlm.testing import require, require_executable

    chromium = require_executable("chromium", "make system-deps (apt-get install -y chromium)")
    sync_api = require("playwright.sync_api", "pip install playwright (part of hf-vlm[dev])")
    artifacts = README.parent / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(page_path.as_uri())
        images = page.locator(".scene img")
        assert images.count() >= 8
        assert page.evaluate("[...document.querySelectorAll('.scene img')].every(i => i.complete && i.naturalWidth > 0)")
        assert page.locator("#loss-plots svg.loss-plot").count() == num_runs
        widths = page.evaluate("[...document.querySelectorAll('svg.loss-plot polyline')].map(p => p.getBBox().width)")
        assert len(widths) == num_runs and all(w > 50 for w in widths), widths
        assert "BLIP-2 VQA" in page.locator(".scene").first.inner_text()
        page.screenshot(path=artifacts / "demo-report.png", full_page=True)
        browser.close()


def test_target_report_says_reached_missed_and_unmeasured():
    results = {"blip2": {"vqa": {"metrics": {"vqa_accuracy": 0.9, "vqa_accuracy/position": 0.4}}},
               "coca": {"caption": {"metrics": {"cider": 0.5}}}}
    lines = "\n".join(demo.target_report(results))
    assert "blip2 vqa vqa_accuracy: 0.900 (target >= 0.85) reached" in lines
    assert "blip2 vqa vqa_accuracy/position: 0.400 (target >= 0.7) MISSED" in lines
    assert "coca caption cider: 0.500 (target >= 5.0) MISSED" in lines
    assert "coca zero-shot top1: - (target >= 0.9) not measured" in lines
    assert "blip2-caption caption cider: - (target >= 3.0) not measured" in lines


def test_demo_data_is_drawn_again_when_the_plan_changes(tmp_path):
    """Training data left by another plan (other scene counts, image size or question mix) is never reused."""
    small = demo.DemoPlan(caption_scenes=6, vqa_scenes=2)
    paths = demo.prepare_data(small, tmp_path)
    shards = sorted(paths["captions"].glob("*.tar"))
    stamp = (tmp_path / "demo_plan.json").stat().st_mtime_ns
    assert demo.prepare_data(small, tmp_path) == paths
    assert (tmp_path / "demo_plan.json").stat().st_mtime_ns == stamp  # same plan: reused

    larger = demo.DemoPlan(caption_scenes=9, vqa_scenes=3)
    demo.prepare_data(larger, tmp_path)
    import tarfile

    members = [m for shard in sorted(paths["captions"].glob("*.tar")) for m in tarfile.open(shard).getnames()]
    assert len([m for m in members if m.endswith(".txt")]) == 9, (shards, members)
    rows = (paths["vqa"] / "metadata.jsonl").read_text().splitlines()
    assert len({json.loads(row)["seed"] for row in rows}) == 3
    # The T5's text corpus: every training scene's caption, questions and answers.
    text = [json.loads(line) for line in paths["text"].read_text().splitlines()]
    assert len(text) == 9 + 3 and all(row["caption"] and row["questions"] for row in text)

    # Another question mix (`vqa_type_weights`) is another plan too.
    demo.prepare_data(demo.DemoPlan(caption_scenes=9, vqa_scenes=3, vqa_type_weights={"count": 0.0}), tmp_path)
    kinds = [json.loads(row)["question_type"] for row in (paths["vqa"] / "metadata.jsonl").read_text().splitlines()]
    assert kinds and "count" not in kinds


def test_coca_vit_becomes_blip2_image_encoder_weight_for_weight(tmp_path):
    """The CoCa run's ViT, through BLIP-2's swappable timm backbone config, is the same function in BLIP-2:
    same tensors, same image tokens; a vision_config that does not fit is refused naming the tensors."""
    import torch

    from hf_vlm.modeling.blip2_flant5 import Blip2FlanT5Config
    from hf_vlm.modeling.coca import CocaModel
    from hf_vlm.presets import get_config, preset_dict

    torch.manual_seed(0)
    coca = CocaModel._from_config(get_config("coca-tiny")).eval()
    coca.save_pretrained(tmp_path / "coca")
    tiny = {k: v for k, v in preset_dict("blip2-tiny").items() if k != "model_type"}
    vision = demo.blip2_vision_config_from_coca(coca.config.vision_config)
    blip2 = demo.blip2_with_coca_vision(tmp_path / "coca", Blip2FlanT5Config(**{**tiny, "vision_config": vision})).eval()

    trunk = coca.vision_model.trunk.state_dict()
    assert trunk.keys() == blip2.vision_model.state_dict().keys()
    assert all(torch.equal(tensor, blip2.vision_model.state_dict()[key]) for key, tensor in trunk.items())
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(coca.vision_model.trunk.forward_features(pixels), blip2.vision_model.forward_features(pixels))

    deeper = Blip2FlanT5Config(**{**tiny, "vision_config": {**vision, "num_hidden_layers": 3}})
    with pytest.raises(ValueError, match=r"blocks\.2\."):
        demo.blip2_with_coca_vision(tmp_path / "coca", deeper)


def test_some_multi_object_training_scenes_are_captioned_by_their_main_object_only(tmp_path):
    """CoCa's zero-shot prompt "a large red circle" must meet that text on scenes with other objects too; the
    captioning data keeps the full caption the likelier one, and the T5's corpus and the eval keep full captions."""
    rows = list(scenes.generate_scenes("train", 400))
    varied = list(scenes.with_subject_captions(iter(rows), 0.25))
    assert varied == list(scenes.with_subject_captions(iter(rows), 0.25))  # chosen by scene seed
    changed = [(r, v) for r, v in zip(rows, varied) if v["caption"] != r["caption"]]
    multi = [r for r in rows if len(r["objects"]) > 1]
    assert 0.15 * len(multi) < len(changed) < 0.35 * len(multi)
    for row, new in changed:
        main = row["objects"][0]
        assert len(row["objects"]) > 1 and new["full_caption"] == row["caption"]
        assert new["caption"] == scenes.ZERO_SHOT_TEMPLATE.format(f"{main['color']} {main['shape']}")
        assert row["caption"].startswith(new["caption"] + " ")
    assert list(scenes.with_subject_captions(iter(rows), 0.0)) == rows
    with pytest.raises(ValueError, match="fraction"):
        next(scenes.with_subject_captions(iter(rows), 0.5))

    plan = demo.DemoPlan(caption_scenes=200, vqa_scenes=2)
    paths = demo.prepare_data(plan, tmp_path)
    import tarfile

    shard_captions = [tar.extractfile(m).read().decode() for shard in sorted(paths["captions"].glob("*.tar"))
                      for tar in [tarfile.open(shard)] for m in tar.getmembers() if m.name.endswith(".txt")]
    expected = [r["caption"] for r in scenes.with_subject_captions(scenes.generate_scenes("train", 200), 0.25)]
    assert shard_captions == expected and shard_captions != [r["caption"] for r in rows[:200]]
    corpus = [json.loads(line)["caption"] for line in paths["text"].read_text().splitlines()]
    assert corpus[:200] == [r["caption"] for r in rows[:200]]
    assert demo.prepare_data(demo.DemoPlan(caption_scenes=200, vqa_scenes=2, subject_caption_fraction=0.0),
                             tmp_path) == paths
    assert [m for m in tarfile.open(sorted(paths["captions"].glob("*.tar"))[0]).getnames() if m.endswith(".txt")]
    assert (tmp_path / "demo_plan.json").read_text().count('"subject_caption_fraction": 0.0') == 1


def test_the_demo_t5_has_flan_t5s_own_head_and_position_biases_that_differ(tmp_path):
    """transformers 5.23 builds T5 from a config with its head tied to the embeddings; the demo's FlanT5 stand-in
    keeps its own head through save and load, and starts with relative-position biases large enough to use."""
    import torch
    from transformers import T5ForConditionalGeneration

    from hf_vlm import demo_lm
    from hf_vlm.modeling.blip2_flant5 import Blip2FlanT5Config, Blip2FlanT5ForConditionalGeneration
    from hf_vlm.presets import preset_dict

    class Tokenizer:
        pad_token_id, eos_token_id = 0, 1

        def __len__(self):
            return 64

    torch.manual_seed(0)
    config = demo_lm.t5_config(Tokenizer(), demo_lm.TextLMArguments(text_corpus="", processor="", d_model=32))
    model = demo_lm.flan_t5(config)
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    bias = model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    assert 1.5 < bias.std().item() < 2.5
    model.save_pretrained(tmp_path / "t5")
    reloaded = T5ForConditionalGeneration.from_pretrained(tmp_path / "t5")
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)
    assert not torch.equal(reloaded.lm_head.weight, reloaded.shared.weight)
    # BLIP-2 reads it as FlanT5: its own, unscaled head (what `--language_model` of stage 2 relies on).
    tiny = {k: v for k, v in preset_dict("blip2-tiny").items() if k != "model_type"}
    blip2_config = Blip2FlanT5Config(**{**tiny, "text_config": reloaded.config.to_dict()})
    assert not blip2_config.lm_head_is_tied
    blip2 = Blip2FlanT5ForConditionalGeneration(blip2_config)
    assert blip2.language_model.lm_head.weight.data_ptr() != blip2.language_model.shared.weight.data_ptr()


def test_runs_side_by_side_share_the_cores_and_a_run_alone_gets_them_all(monkeypatch, tmp_path):
    """CoCa and the T5 start together with a thread each; stage 1 shares the cores with the T5 still running;
    stage 2 and the VQA fine-tune run alone with every core. Each run starts only after the runs it needs."""
    import threading

    t5_started, t5_may_finish = threading.Event(), threading.Event()
    started, threads_seen = [], {}

    def fake_train(run, plan, runs_dir, data, processors, *, position=0, threads=1):
        started.append(run.name)
        threads_seen[run.name] = threads
        if run.name == "coca":
            t5_started.wait(timeout=30)  # CoCa trains while the T5 starts
        if run.name == "t5":
            t5_started.set()
            t5_may_finish.wait(timeout=30)  # still training while CoCa and stage 1 finish
        if run.name == "blip2-stage1":
            t5_may_finish.set()
        return runs_dir / run.name

    monkeypatch.setattr(demo, "train", fake_train)
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    plan = demo.DemoPlan()
    outputs = demo.train_all(plan, tmp_path, {}, {})
    assert set(outputs) == {run.name for run in plan.runs}
    assert threads_seen == {"coca": 1, "t5": 1, "blip2-stage1": 1, "blip2-stage2": 2, "blip2": 2}
    for run in plan.runs:
        assert all(started.index(need) < started.index(run.name) for need in run.needs), started

    # A caller's OMP_NUM_THREADS is the budget (an xdist worker's one core): no run spins a second thread.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    started.clear(), threads_seen.clear(), t5_started.clear(), t5_may_finish.clear()
    demo.train_all(plan, tmp_path, {}, {})
    assert set(threads_seen.values()) == {1} and len(threads_seen) == len(plan.runs)


def test_a_data_parallel_run_alone_trains_as_one_process_a_core_on_its_share_of_the_batch(monkeypatch, tmp_path):
    """Stage 2 and the VQA fine-tune, given 2 cores: `torchrun` with 2 one-thread CPU processes of 32 (the same
    global batch of 64); given one core, a batch that does not split, or a GPU: one process of 64, as a user would
    launch it."""
    import torch

    plan = demo.DemoPlan()
    vqa = next(run for run in plan.runs if run.name == "blip2")
    assert vqa.data_parallel and vqa.batch_size == 64
    data = {"vqa": tmp_path / "vqa"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert demo._processes(vqa, 2) == 2 and demo._processes(vqa, 1) == 1
    assert demo._processes(dataclasses.replace(vqa, batch_size=63), 2) == 1
    assert [run.name for run in plan.runs if demo._processes(run, 2) == 2] == ["blip2-stage2", "blip2"]

    command = demo._command(vqa, plan, tmp_path, data, {}, processes=2)
    assert command[:7] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m"]
    assert command[7] == "hf_vlm.trainers.finetune"
    options = dict(zip(command[8::2], command[9::2]))
    assert options["--per_device_train_batch_size"] == "32" and options["--use_cpu"] == "true"
    single = demo._command(vqa, plan, tmp_path, data, {})
    assert single[:3] == [sys.executable, "-m", "hf_vlm.trainers.finetune"] and "--use_cpu" not in single
    assert dict(zip(single[3::2], single[4::2]))["--per_device_train_batch_size"] == "64"
    # The T5 script takes TrainingArguments too: made data-parallel, it launches the same way.
    t5 = dataclasses.replace(next(run for run in plan.runs if run.name == "t5"), data_parallel=True)
    t5_command = demo._command(t5, plan, tmp_path, {"text": tmp_path / "text.jsonl"}, {"blip2": tmp_path}, processes=2)
    assert t5_command[2:8] == ["torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "hf_vlm.demo_lm"]
    def value(option):
        return t5_command[t5_command.index(option) + 1]

    assert value("--per_device_train_batch_size") == "8" and value("--use_cpu") == "true"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert demo._processes(vqa, 2) == 1
