"""Evaluation results on disk and on screen.

`eval_results.json` sits next to the checkpoint's weights and holds one entry per task, merged
across runs (evaluating VQA keeps the caption entry), so the model card can read all of them:

    {"caption": {"metrics": {"cider": 2.31, "bleu4": 0.61, ...}, "data": "scenes:test",
                 "num_samples": 200, "model_type": "coca", "evaluated_at": "2026-11-22T07:40:00Z"},
     "vqa": {...}}
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

RESULTS_FILE = "eval_results.json"


def _results_file(path: str | Path) -> Path:
    path = Path(path)
    return path if path.suffix == ".json" else path / RESULTS_FILE


def load_results(path: str | Path) -> dict:
    """The results in `path` (a checkpoint folder or a .json file); {} when there are none yet."""
    file = _results_file(path)
    if not file.exists():
        return {}
    try:
        results = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON ({err}); move it away to start a fresh results file") from err
    if not isinstance(results, dict):
        raise ValueError(f"{file} must hold a JSON object of tasks, got {type(results).__name__}")
    return results


def save_results(path: str | Path, task: str, entry: dict) -> Path:
    """Merge `entry` as `task` into `path`/eval_results.json (or into `path` itself if it ends in .json),
    written atomically (a temporary file in the same folder, then renamed): a crash never leaves a
    half-written file. Returns the file's path."""
    file = _results_file(path)
    if not file.parent.is_dir():
        raise FileNotFoundError(f"folder {file.parent} does not exist (where {file.name} would go)")
    results = load_results(file)
    results[task] = entry
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(results, handle, indent=2, sort_keys=True)
            handle.write("\n")
        os.replace(tmp, file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return file


def format_table(results: dict) -> str:
    """A plain-text table: one row per (task, metric)."""
    rows = [("task", "metric", "value", "data", "samples")]
    for task, entry in results.items():
        for metric, value in entry.get("metrics", {}).items():
            rows.append((task, metric, f"{value:.4f}", str(entry.get("data", "")), str(entry.get("num_samples", ""))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) if i == 2 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
