"""The demo's report: `<demo>/report.html`, a page a person opens to see what `make demo` trained.

- the targets and every measured metric (from the evaluation the demo just ran);
- a grid of held-out test scenes: each image with CoCa's and BLIP-2's captions next to the true caption,
  BLIP-2's answer to each question next to the truth, and CoCa's zero-shot top-3 classes;
- the loss curve of every training run, read from its `trainer_state.json`, drawn as inline SVG (no plotting
  library needed at run time).

Images are written beside the page (`report_files/`), so the folder can be copied or served as it is.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

REPORT_NAME = "report.html"
FILES_DIR = "report_files"


def loss_curves(runs_dir: Path, run_names: list[str]) -> dict[str, list[tuple[int, float]]]:
    """{run: [(step, training loss), ...]} from each run's trainer_state.json (runs without one are left out)."""
    curves = {}
    for name in run_names:
        state = runs_dir / name / "trainer_state.json"
        if state.is_file():
            history = json.loads(state.read_text())["log_history"]
            curves[name] = [(entry["step"], float(entry["loss"])) for entry in history if "loss" in entry]
    return curves


def loss_svg(title: str, points: list[tuple[int, float]], width: int = 320, height: int = 180) -> str:
    """A line plot of `points` (step, loss) as an inline SVG element, with its axes' ranges written on it."""
    left, right, top, bottom = 44, 10, 22, 28
    steps, losses = [p[0] for p in points], [p[1] for p in points]
    x_max, y_min, y_max = max(steps + [1]), min(losses + [0.0]), max(losses + [1e-9])
    y_span = (y_max - y_min) or 1.0

    def xy(step, loss):
        x = left + (width - left - right) * step / x_max
        y = top + (height - top - bottom) * (1 - (loss - y_min) / y_span)
        return f"{x:.1f},{y:.1f}"

    line = " ".join(xy(s, v) for s, v in points)
    axis = f"M{left},{top} L{left},{height - bottom} L{width - right},{height - bottom}"
    return (
        f'<svg class="loss-plot" role="img" aria-label="{html.escape(title)} training loss" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">'
        f'<text x="{width / 2}" y="14" text-anchor="middle" font-size="12">{html.escape(title)}</text>'
        f'<path d="{axis}" stroke="#555" fill="none"/>'
        f'<polyline points="{line}" fill="none" stroke="#d62728" stroke-width="1.5"/>'
        f'<text x="{left - 4}" y="{top + 4}" text-anchor="end" font-size="10">{y_max:.2f}</text>'
        f'<text x="{left - 4}" y="{height - bottom}" text-anchor="end" font-size="10">{y_min:.2f}</text>'
        f'<text x="{left}" y="{height - 10}" font-size="10">0</text>'
        f'<text x="{width - right}" y="{height - 10}" text-anchor="end" font-size="10">step {x_max}</text>'
        "</svg>"
    )


def scene_predictions(checkpoints: dict[str, Path], rows: list[dict]) -> list[dict]:
    """Per scene: both models' captions, BLIP-2's answer to each question, CoCa's zero-shot top-3.

    Decoded as the checkpoints recommend (their generation configs), as `hf-vlm eval` and the Space do.
    """
    import torch
    from transformers import AutoProcessor

    import hf_vlm  # noqa: F401  (registers the model types with transformers)
    from hf_vlm import scenes
    from hf_vlm.data.collators import VQA_PROMPT
    from hf_vlm.evaluation.decoding import recommended_generation_config
    from hf_vlm.modeling.blip2_flant5 import Blip2FlanT5ForConditionalGeneration
    from hf_vlm.modeling.coca import CocaModel

    images = [row["image"] for row in rows]
    coca = CocaModel.from_pretrained(checkpoints["coca"]).eval()
    coca_processor = AutoProcessor.from_pretrained(checkpoints["coca"])
    config = scenes.SceneConfig(image_size=images[0].width)
    classes = config.class_names()
    with torch.inference_mode():
        inputs = coca_processor(images=images, text=scenes.zero_shot_prompts(config), return_tensors="pt",
                                padding=True)
        probs = coca(**inputs).logits_per_image.softmax(-1)
        pixels = coca_processor(images=images, return_tensors="pt")["pixel_values"]
        coca_captions = coca_processor.batch_decode(
            coca.generate(pixel_values=pixels, generation_config=recommended_generation_config(coca, "caption")),
            skip_special_tokens=True)

    def blip2_generate(name: str, task: str, prompts: list[str] | None, batch_images: list) -> list[str]:
        model = Blip2FlanT5ForConditionalGeneration.from_pretrained(checkpoints[name]).eval()
        processor = AutoProcessor.from_pretrained(checkpoints[name])
        inputs = processor(images=batch_images, return_tensors="pt",
                           **({} if prompts is None else {"text": prompts}))
        with torch.inference_mode():
            ids = model.generate(**inputs, generation_config=recommended_generation_config(model, task))
        return [text.strip() for text in processor.batch_decode(ids, skip_special_tokens=True)]

    blip2_captions = blip2_generate("blip2-caption", "caption", None, images)
    questions = [(i, q) for i, row in enumerate(rows) for q in row["questions"]]
    answers = blip2_generate("blip2", "vqa", [VQA_PROMPT.format(q) for _, q in questions],
                             [images[i] for i, _ in questions])
    predictions = []
    for i in range(len(rows)):
        top = probs[i].topk(3)
        predictions.append({
            "coca_caption": coca_captions[i].strip(),
            "blip2_caption": blip2_captions[i],
            "answers": [a for (j, _), a in zip(questions, answers) if j == i],
            "zero_shot_top3": [(classes[k], float(p)) for p, k in zip(top.values, top.indices)],
        })
    return predictions


_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 2px 6px; font-size: 13px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(330px, 1fr)); gap: 12px; }
.scene { border: 1px solid #ccc; border-radius: 6px; padding: 8px; display: flex; gap: 8px; font-size: 12px; }
.scene img { width: 128px; height: 128px; image-rendering: pixelated; flex: none; }
.ok { color: #1a7f37; } .wrong { color: #cf222e; font-weight: bold; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; }
"""


def _scene_card(index: int, image_file: str, row: dict, prediction: dict) -> str:
    esc = html.escape
    answers = "".join(
        f'<li>{esc(q)} <span class="{"ok" if a == truth else "wrong"}">{esc(a) or "(empty)"}</span>'
        f'{"" if a == truth else f" (truth: {esc(truth)})"}</li>'
        for q, a, truth in zip(row["questions"], prediction["answers"], row["answers"]))
    top3 = ", ".join(f"{esc(name)} {p:.2f}" for name, p in prediction["zero_shot_top3"])
    return (
        f'<div class="scene" id="scene-{index}"><img src="{image_file}" alt="test scene {index}">'
        f'<div><b>truth:</b> {esc(row["caption"])}<br><b>CoCa:</b> {esc(prediction["coca_caption"])}<br>'
        f'<b>BLIP-2:</b> {esc(prediction["blip2_caption"])}<br><b>CoCa zero-shot top-3:</b> {top3}'
        f'<br><b>BLIP-2 VQA:</b><ul>{answers}</ul></div></div>'
    )


def write_report(demo_dir: Path, *, results: dict, targets: list[str], run_names: list[str],
                 checkpoints: dict[str, Path], image_size: int, num_scenes: int = 12, notes: str = "") -> Path:
    """Write `<demo_dir>/report.html` and its images; returns the page's path."""
    from hf_vlm import scenes

    files = demo_dir / FILES_DIR
    files.mkdir(parents=True, exist_ok=True)
    rows = list(scenes.generate_scenes("test", num_scenes, config=scenes.SceneConfig(image_size=image_size)))
    predictions = scene_predictions(checkpoints, rows)
    cards = []
    for i, (row, prediction) in enumerate(zip(rows, predictions)):
        row["image"].save(files / f"scene_{i}.png")
        cards.append(_scene_card(i, f"{FILES_DIR}/scene_{i}.png", row, prediction))
    metrics = "".join(
        f"<tr><td>{html.escape(model)}</td><td>{html.escape(task)}</td><td>{html.escape(name)}</td>"
        f"<td>{value:.3f}</td></tr>"
        for model, tasks in results.items() for task, entry in tasks.items()
        for name, value in entry.get("metrics", {}).items() if isinstance(value, (int, float)))
    plots = "".join(loss_svg(name, points) for name, points in loss_curves(demo_dir / "runs", run_names).items())
    page = (
        '<!doctype html><html><head><meta charset="utf-8"><title>hf-vlm demo report</title>'
        f"<style>{_STYLE}</style></head><body><h1>hf-vlm demo report</h1><p>{html.escape(notes)}</p>"
        "<h2>Targets</h2><ul id=\"targets\">"
        + "".join(f"<li>{html.escape(line)}</li>" for line in targets)
        + f'</ul><h2>Held-out test scenes</h2><div class="grid">{"".join(cards)}</div>'
        f'<h2>Training loss</h2><div class="plots" id="loss-plots">{plots}</div>'
        f'<h2>All metrics ({html.escape(str(len(results)))} checkpoints)</h2>'
        f"<table><tr><th>checkpoint</th><th>task</th><th>metric</th><th>value</th></tr>{metrics}</table>"
        "</body></html>\n"
    )
    path = demo_dir / REPORT_NAME
    path.write_text(page)
    return path
