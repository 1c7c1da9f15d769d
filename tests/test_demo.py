"""`hf-vlm demo`: the short version of the demo pipeline trains both families through trainers/, evaluates
them on held-out scenes, writes cards, and the models beat trivial baselines by a wide margin."""

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


@pytest.mark.slow
def test_quick_demo_trains_evaluates_and_beats_baselines(tmp_path, monkeypatch):
    # Laid out as in a checkout (./.demo), so the README's examples can run against it as written.
    demo_dir = tmp_path / ".demo"
    monkeypatch.setenv("HF_VLM_DEMO_DIR", str(demo_dir))
    plan = demo.DemoPlan.quick()
    results = demo.run_demo(quick=True, serve=False)

    # Every run went through trainers/ and logged its steps; the checkpoints the Space loads exist with cards.
    for run in plan.runs:
        summary = json.loads((demo_dir / "runs" / run.name / "training_summary.json").read_text())
        assert summary["recipe"] == run.recipe and summary["global_step"] == run.max_steps
    for name in demo.DEMO_MODELS:
        checkpoint = demo_dir / "checkpoints" / name
        assert (checkpoint / "config.json").exists() and (checkpoint / "eval_results.json").exists()
        card = (checkpoint / "README.md").read_text()
        assert "model-index:" in card and "| task | dataset | split | metric | value |" in card
    report = json.loads((demo_dir / "demo_results.json").read_text())
    assert len(report["targets"]) == len(demo.TARGETS)

    # CoCa (the quick run: CIDEr 3.97, zero-shot top-1 0.30) beats image-blind baselines by a wide margin.
    baseline = _baselines(plan.test_scenes)
    coca, blip2 = results["coca"], results["blip2"]
    assert coca["zero-shot"]["metrics"]["top1"] >= 2.5 * baseline["zero_shot"], (coca["zero-shot"], baseline)
    assert coca["caption"]["metrics"]["cider"] >= 2 * baseline["cider"], (coca["caption"]["metrics"], baseline)
    # BLIP-2 learns slower from random towers: in the quick budget it reaches the answer prior (0.47, the
    # majority baseline 0.40) and its stage-2 captioner reads the image.
    assert blip2["vqa"]["metrics"]["vqa_accuracy"] >= baseline["vqa"] - 0.05, (blip2["vqa"]["metrics"], baseline)
    real, shuffled = _caption_loss_real_vs_shuffled(demo_dir / "runs" / "blip2-stage2")
    assert real < 0.9 * shuffled, (real, shuffled)

    # A second run reuses the checkpoints: nothing is retrained.
    before = {name: (demo_dir / "checkpoints" / name / "model.safetensors").stat().st_mtime_ns
              for name in demo.DEMO_MODELS}
    demo.run_demo(quick=True, serve=False)
    after = {name: (demo_dir / "checkpoints" / name / "model.safetensors").stat().st_mtime_ns
             for name in demo.DEMO_MODELS}
    assert before == after

    # The README's Python examples run as written against the demo checkpoints.
    for block in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S):
        result = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, f"README example failed:\n{block}\n{result.stderr[-3000:]}"


def test_target_report_says_reached_missed_and_unmeasured():
    results = {"blip2": {"vqa": {"metrics": {"vqa_accuracy": 0.9}}},
               "coca": {"caption": {"metrics": {"cider": 0.5}}}}
    lines = "\n".join(demo.target_report(results))
    assert "blip2 vqa vqa_accuracy: 0.900 (target >= 0.85) reached" in lines
    assert "coca caption cider: 0.500 (target >= 1.5) NOT reached" in lines
    assert "coca zero-shot top1: - (target >= 0.9) not measured" in lines


def test_demo_data_is_drawn_again_when_the_plan_changes(tmp_path):
    """Training data left by another plan (other scene counts or image size) is never reused."""
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
