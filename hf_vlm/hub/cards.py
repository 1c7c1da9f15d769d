"""Model cards: what a checkpoint folder says about itself, plus the per-variant facts of the project brief,
rendered as a Hub README.md with huggingface_hub's `ModelCard` / `ModelCardData`.

Where things come from:
- computed from the checkpoint (`checkpoint_facts`): parameter counts (total, per top-level module, trainable
  in each training stage; counted on a meta-device copy of the model built from config.json, so no weights
  are loaded), stored dtypes and weight file sizes (safetensors headers and the file system), image size,
  vocabulary sizes, maximum text length;
- stated in the brief (`model_cards/variants.json`): data, recipe, hardware, duration, region, year. A figure
  the brief states and the checkpoint also determines (parameters, vocab, image size, text length) is printed
  as computed, with the brief's figure next to it when they differ;
- per family (`model_cards/families.json` + one Jinja template per family): Hub metadata (pipeline tag, tags),
  names of the model's parts, training stages, usage snippets;
- evaluation (`eval_results.json` next to the weights, written by hf_vlm's evaluation): model-index results.

The variant is found by comparing the checkpoint's config with the presets named in variants.json and
hf_vlm/presets/, so a card never claims facts of a model the weights are not.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

EVAL_RESULTS_FILE = "eval_results.json"
# Config keys that say how a checkpoint was saved, not what the architecture is.
_VOLATILE_CONFIG_KEYS = {
    "transformers_version", "architectures", "auto_map", "dtype", "torch_dtype", "_name_or_path",
    "_commit_hash", "_attn_implementation_autoset", "_attn_implementation", "use_cache", "output_attentions",
    "output_hidden_states", "return_dict", "id2label", "label2id", "problem_type", "chunk_size_feed_forward",
}
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                       "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _card_files():
    return resources.files("hf_vlm.model_cards")


def load_families() -> dict[str, dict]:
    return json.loads(_card_files().joinpath("families.json").read_text(encoding="utf-8"))


def load_variants() -> dict[str, dict]:
    return json.loads(_card_files().joinpath("variants.json").read_text(encoding="utf-8"))


def family_for(model_type: str) -> tuple[str, dict]:
    """(family name, family facts) for a config's model_type; the generic family when none matches."""
    families = load_families()
    for name, family in families.items():
        if model_type in family.get("model_types", []):
            return name, family
    return "generic", families["generic"]


# ---------------------------------------------------------------------------------------------------------
# Facts computed from the checkpoint folder
# ---------------------------------------------------------------------------------------------------------
@dataclass
class CheckpointFacts:
    """Everything about a checkpoint that is computed rather than copied."""

    model_type: str
    architecture: str
    config: dict
    parameters: int  # unique parameters (tied weights once)
    parameters_by_module: dict[str, int]  # top-level module / parameter name -> count
    trainable_by_stage: dict[str, int] = field(default_factory=dict)
    weight_files: dict[str, int] = field(default_factory=dict)  # file name -> bytes
    stored_dtypes: dict[str, int] = field(default_factory=dict)  # dtype -> number of stored tensor elements
    stored_elements: int = 0
    image_size: int | None = None
    vocab_sizes: dict[str, int] = field(default_factory=dict)  # config path -> vocab size
    max_text_length: int | None = None
    has_remote_code: bool = False
    preset: str | None = None  # the hf_vlm preset whose architecture this checkpoint has
    base_model: list[str] = field(default_factory=list)  # named by the weights' safetensors metadata

    @property
    def weight_bytes(self) -> int:
        return sum(self.weight_files.values())

    @property
    def main_dtype(self) -> str | None:
        return max(self.stored_dtypes, key=self.stored_dtypes.get) if self.stored_dtypes else None


def model_class_for(config) -> type:
    """The model class named by config.architectures: one of ours (hf_vlm registration) or transformers'."""
    import transformers

    from hf_vlm.registration import FAMILIES

    architecture = (config.architectures or [None])[0]
    for family in FAMILIES:
        if family.model_type == config.model_type:
            module = importlib.import_module(family.module)
            name = architecture if architecture and hasattr(module, architecture) else family.models["AutoModel"]
            return getattr(module, name)
    if architecture and hasattr(transformers, architecture):
        return getattr(transformers, architecture)
    raise ValueError(
        f"config.json names architectures={config.architectures!r} (model_type {config.model_type!r}), which is "
        "neither an hf_vlm model nor a transformers class"
    )


def _meta_model(config):
    import torch

    cls = model_class_for(config)
    with torch.device("meta"):
        return cls(config)


def _count_parameters(model) -> tuple[int, dict[str, int]]:
    by_module: dict[str, int] = {}
    for name, param in model.named_parameters():  # shared (tied) parameters are listed once
        top = name.split(".")[0]
        by_module[top] = by_module.get(top, 0) + param.numel()
    return sum(by_module.values()), by_module


def _stage_trainable(config, stages: list[dict]) -> dict[str, int]:
    """Trainable parameters in each training stage, as the model classes themselves freeze them: a stage names
    the class that is trained in it (model_cards/families.json); its meta-device copy built from this
    checkpoint's config is counted (parameters with requires_grad)."""
    import torch

    from hf_vlm.registration import FAMILIES

    family = next((f for f in FAMILIES if f.model_type == config.model_type), None)
    out = {}
    for stage in stages:
        module = importlib.import_module(family.module) if family else None
        cls = getattr(module, stage["class"], None)
        if cls is None:
            raise ValueError(f"model_cards/families.json: stage {stage['name']!r} names class {stage['class']!r}, "
                             f"which {family.module if family else 'no registered family'} does not define")
        with torch.device("meta"):
            model = cls(config)
        out[stage["name"]] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return out


def read_weight_headers(folder: Path) -> tuple[dict[str, int], dict[str, int], int, list[str]]:
    """Weight files with sizes, stored elements per dtype, total stored elements, and the `base_model` the
    files' metadata names (a converter records its source there), all from the headers only."""
    files = sorted(folder.glob("*.safetensors"))
    sizes, dtypes, total, base_models = {}, {}, 0, []
    for path in files:
        sizes[path.name] = path.stat().st_size
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            try:
                header = json.loads(f.read(header_len))
            except ValueError as err:
                raise ValueError(f"{path} has an unreadable safetensors header: {err}") from err
        source = header.get("__metadata__", {}).get("base_model")
        if source and source not in base_models:
            base_models.append(source)
        for key, info in header.items():
            if key == "__metadata__":
                continue
            numel = math.prod(info["shape"])
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"], info["dtype"])
            dtypes[dtype] = dtypes.get(dtype, 0) + numel
            total += numel
    for path in sorted(folder.glob("*.bin")):  # legacy PyTorch weights: size only
        sizes[path.name] = path.stat().st_size
    return sizes, dtypes, total, base_models


def _find_values(config: dict, key: str, prefix: str = "") -> dict[str, Any]:
    """All values of `key` in a nested config dict, by dotted path (e.g. text_config.vocab_size)."""
    out = {}
    for k, v in config.items():
        path = f"{prefix}{k}"
        if k == key and isinstance(v, int):
            out[path] = v
        elif isinstance(v, dict):
            out.update(_find_values(v, key, path + "."))
    return out


def _image_size(folder: Path, config: dict) -> int | None:
    """The input resolution the processor produces (preferred) or the vision config declares."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = folder / name
        if path.is_file():
            data = json.loads(path.read_text())
            data = data.get("image_processor", data)
            for key in ("crop_size", "size"):
                size = data.get(key)
                if isinstance(size, int):
                    return size
                if isinstance(size, dict):
                    for sub in ("height", "shortest_edge", "width"):
                        if isinstance(size.get(sub), int):
                            return size[sub]
    sizes = _find_values(config, "image_size")
    return next(iter(sizes.values()), None)


def _max_text_length(folder: Path, config: dict) -> int | None:
    path = folder / "tokenizer_config.json"
    if path.is_file():
        value = json.loads(path.read_text()).get("model_max_length")
        if isinstance(value, int) and value < 10**9:  # transformers writes a huge sentinel for "no limit"
            return value
    for key in ("max_text_length", "context_length", "max_position_embeddings"):
        values = _find_values(config, key)
        if values:
            return next(iter(values.values()))
    return None


def _architecture_dict(config: dict) -> dict:
    return {k: _architecture_dict(v) if isinstance(v, dict) else v
            for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}


def match_preset(config) -> str | None:
    """The hf_vlm preset with exactly this architecture (ignoring how the checkpoint was saved), if any."""
    from hf_vlm.presets import get_config, list_presets, preset_dict

    target = _architecture_dict(config.to_dict())
    for name in list_presets():
        if preset_dict(name).get("model_type") != config.model_type:
            continue
        if _architecture_dict(get_config(name).to_dict()) == target:
            return name
    return None


def checkpoint_facts(checkpoint: str | Path) -> CheckpointFacts:
    """Compute the card's numbers from a checkpoint folder (config.json required; weights optional)."""
    from transformers import AutoConfig

    folder = Path(checkpoint)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a checkpoint folder: it has no config.json")
    config = AutoConfig.from_pretrained(folder)
    config_dict = json.loads((folder / "config.json").read_text())
    model = _meta_model(config)
    total, by_module = _count_parameters(model)
    _, family = family_for(config.model_type)
    sizes, dtypes, stored, base_models = read_weight_headers(folder)
    facts = CheckpointFacts(
        model_type=config.model_type,
        architecture=(config.architectures or [type(model).__name__])[0],
        config=config_dict,
        parameters=total,
        parameters_by_module=by_module,
        trainable_by_stage=_stage_trainable(config, family.get("stages", [])),
        weight_files=sizes,
        stored_dtypes=dtypes,
        stored_elements=stored,
        image_size=_image_size(folder, config_dict),
        vocab_sizes=_find_values(config_dict, "vocab_size"),
        max_text_length=_max_text_length(folder, config_dict),
        has_remote_code="auto_map" in config_dict and any(folder.glob("*.py")),
        preset=match_preset(config),
        base_model=base_models,
    )
    return facts


# ---------------------------------------------------------------------------------------------------------
# Evaluation results (eval_results.json, written by hf_vlm's evaluation)
# ---------------------------------------------------------------------------------------------------------
# Task keys as the evaluation writes them -> (Hub task id, readable name).
EVAL_TASKS = {
    "caption": ("image-to-text", "Image captioning"),
    "captioning": ("image-to-text", "Image captioning"),
    "vqa": ("visual-question-answering", "Visual question answering"),
    "zero-shot": ("zero-shot-image-classification", "Zero-shot image classification"),
    "zero_shot": ("zero-shot-image-classification", "Zero-shot image classification"),
    "zeroshot": ("zero-shot-image-classification", "Zero-shot image classification"),
    # The Hub has no retrieval task id: retrieval ranks CoCa's image and text features.
    "retrieval": ("image-feature-extraction", "Image-text retrieval"),
}
METRIC_NAMES = {"cider": "CIDEr", "bleu4": "BLEU-4", "bleu-4": "BLEU-4", "bleu_4": "BLEU-4", "accuracy": "Accuracy",
                "top1": "Top-1 accuracy", "top5": "Top-5 accuracy", "meteor": "METEOR", "rouge_l": "ROUGE-L",
                "spice": "SPICE"}
_EVAL_METADATA_KEYS = {"dataset", "data", "split", "num_samples", "num_examples", "samples", "config", "model",
                       "model_type", "checkpoint", "revision", "date", "evaluated_at", "notes", "skipped",
                       "num_classes", "num_texts", "template", "prompt"}


@dataclass
class EvalSummary:
    results: list  # huggingface_hub.EvalResult
    skipped: list[str]  # entries that are not numbers, with where they were
    samples: dict[str, str] = field(default_factory=dict)  # task -> "N samples; skipped: ..." (the evaluation's counts)


def _dataset_fields(value, split) -> dict:
    """Dataset of a result: a dict {name, type, split, config}, or a string such as "scenes:test" (name:split)."""
    if isinstance(value, dict):
        name = value.get("name") or value.get("type") or "unspecified"
        return {"dataset_type": value.get("type") or name, "dataset_name": name,
                "dataset_split": value.get("split", split), "dataset_config": value.get("config")}
    name = str(value) if value else "unspecified"
    head, _, tail = name.rpartition(":")
    if head and tail.isidentifier() and split is None:
        name, split = head, tail
    return {"dataset_type": name, "dataset_name": name, "dataset_split": split}


def read_eval_results(path: str | Path) -> EvalSummary:
    """Read eval_results.json tolerantly. Each task entry is either {"metrics": {...}, "data": ..., ...} (what
    hf_vlm.evaluation.save_results writes) or a flat {metric: value, "dataset": ...}; a metric may be a number
    or {sub-metric: number} (e.g. retrieval directions). Unknown task keys keep their name as the task type;
    anything that is not a number is skipped, counted and listed."""
    from huggingface_hub import EvalResult

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object {{task: {{metric: value}}}}, got {type(data).__name__}")
    default_dataset = data.get("dataset", data.get("data"))
    default_split = data.get("split")
    results, skipped, samples = [], [], {}
    for task, entry in data.items():
        if task in _EVAL_METADATA_KEYS:
            continue
        if not isinstance(entry, dict):
            skipped.append(f"{task} (not an object of metrics)")
            continue
        task_type, task_name = EVAL_TASKS.get(task.lower(), (task, task.replace("_", " ").capitalize()))
        dataset = _dataset_fields(entry.get("dataset", entry.get("data", default_dataset)),
                                  entry.get("split", default_split))
        metrics = entry["metrics"] if isinstance(entry.get("metrics"), dict) else entry
        if isinstance(entry.get("num_samples"), int):
            dropped = entry.get("skipped") or {}
            dropped = ", ".join(f"{n} {why}" for why, n in dropped.items()) if isinstance(dropped, dict) else str(dropped)
            samples[task] = f"{entry['num_samples']:,} samples" + (f" (skipped: {dropped})" if dropped else "")
        flat: dict[str, Any] = {}
        for key, value in metrics.items():
            if key in _EVAL_METADATA_KEYS:
                continue
            if isinstance(value, dict):
                flat.update({f"{key}/{sub}": v for sub, v in value.items()})
            else:
                flat[key] = value
        for metric, value in flat.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                skipped.append(f"{task}.{metric} ({value!r} is not a number)")
                continue
            results.append(EvalResult(
                task_type=task_type, task_name=task_name, metric_type=metric.lower(),
                metric_name=METRIC_NAMES.get(metric.lower(), metric), metric_value=value,
                **{k: v for k, v in dataset.items() if v is not None},
            ))
    if skipped:
        logger.warning("%s: skipped %d entries that are not metric values: %s", path, len(skipped), "; ".join(skipped))
    return EvalSummary(results, skipped, samples)


# ---------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------
def human_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def human_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _comparisons(facts: CheckpointFacts, stated: dict) -> list[dict]:
    """Figures the brief states and the checkpoint determines: computed value, stated value, agreement."""
    vocab = facts.vocab_sizes.get("text_config.vocab_size", next(iter(facts.vocab_sizes.values()), None))
    computed = {"parameters": facts.parameters, "image_size": facts.image_size,
                "max_text_length": facts.max_text_length, "vocab_size": vocab}
    rows = []
    for key, claim in stated.items():
        value = computed.get(key)
        if value is None:
            continue
        stated_value, text = (claim["value"], claim["text"]) if isinstance(claim, dict) else (claim, f"{claim:,}")
        agrees = abs(value - stated_value) <= 0.005 * abs(stated_value)  # the brief's figures are rounded
        rows.append({"what": key.replace("_", " "), "computed": value, "stated": text, "agrees": agrees})
    return rows


def _parameters_section(facts: CheckpointFacts, family: dict, comparisons: list[dict]) -> str:
    lines = [
        f"Counted from this checkpoint's configuration (unique parameters, tied weights once): "
        f"**{facts.parameters:,}** ({human_count(facts.parameters)}).",
        "",
        "| part | parameters | share |",
        "|---|---:|---:|",
    ]
    labels = family.get("modules", {})
    for name, count in facts.parameters_by_module.items():
        label = f"{labels[name]} (`{name}`)" if name in labels else f"`{name}`"
        lines.append(f"| {label} | {count:,} | {100 * count / max(facts.parameters, 1):.1f}% |")
    if facts.trainable_by_stage:
        lines += ["", "| training stage | trainable parameters |", "|---|---:|"]
        lines += [f"| {stage} | {count:,} |" for stage, count in facts.trainable_by_stage.items()]
    for row in comparisons:
        if row["what"] == "parameters" and not row["agrees"]:
            lines += ["", f"The stated figure for this model is {row['stated']}; the count above is computed from the "
                          f"checkpoint ({facts.parameters:,}) and is the one to use."]
    return "\n".join(lines)


def _checkpoint_section(facts: CheckpointFacts, comparisons: list[dict]) -> str:
    lines = ["| property | value |", "|---|---|"]
    if facts.stored_dtypes:
        dtypes = ", ".join(f"{d} ({n:,} values)" for d, n in facts.stored_dtypes.items())
        lines.append(f"| stored dtype | {dtypes} |")
    if facts.weight_files:
        lines.append(f"| weight files | {len(facts.weight_files)} safetensors file(s), {human_bytes(facts.weight_bytes)} "
                     f"({facts.weight_bytes:,} bytes) |")
    else:
        lines.append("| weight files | none in this folder (architecture card only) |")
    if facts.image_size:
        lines.append(f"| image size | {facts.image_size}x{facts.image_size} |")
    for path, size in facts.vocab_sizes.items():
        lines.append(f"| vocabulary (`{path}`) | {size:,} |")
    if facts.max_text_length:
        lines.append(f"| maximum text length | {facts.max_text_length} tokens |")
    if facts.preset:
        lines.append(f"| hf-vlm preset | `{facts.preset}` |")
    if facts.weight_files:
        lines += ["", "| file | bytes |", "|---|---:|"]
        lines += [f"| `{name}` | {size:,} |" for name, size in facts.weight_files.items()]
    differing = [r for r in comparisons if not r["agrees"] and r["what"] != "parameters"]
    if differing:
        lines.append("")
        lines += [f"- {r['what']}: this checkpoint has {r['computed']:,}; the stated figure for this model is {r['stated']}."
                  for r in differing]
    return "\n".join(lines)


def _variant_section(variant: dict | None, facts: CheckpointFacts) -> str:
    """The brief's description of the variant (architecture, data, recipe), or what is known without one."""
    if variant is None:
        preset = f"the hf-vlm preset `{facts.preset}`" if facts.preset else "no published hf-vlm preset"
        return (f"This checkpoint's architecture matches {preset}. No training facts are recorded for it; "
                "the numbers below are computed from the checkpoint itself.")
    lines = [f"**{variant['display_name']}** ({variant['year']}).", "", "Architecture:"]
    lines += [f"- {item}" for item in variant.get("architecture", [])]
    if variant.get("objective"):
        lines += ["", f"Objective: {variant['objective']}"]
    lines += ["", "### Training data", "", variant.get("training_data", "not reported")]
    if variant.get("preprocessing"):
        lines += ["", "### Preprocessing", ""] + [f"- {item}" for item in variant["preprocessing"]]
    if variant.get("training_procedure"):
        lines += ["", "### Training procedure", ""] + [f"- {item}" for item in variant["training_procedure"]]
        compute = variant.get("compute", {})
        hardware = ", ".join(x for x in (compute.get("hardware_type"), compute.get("duration"),
                                          compute.get("compute_region")) if x)
        if hardware:
            lines.append(f"- Compute: {hardware}.")
    if variant.get("evaluation_protocol"):
        lines += ["", variant["evaluation_protocol"]]
    return "\n".join(lines)


def _environment_section(variant: dict | None) -> str:
    """The Hub's environmental-impact convention (Lacoste et al., 2019): hardware, hours, provider, region, CO2."""
    compute = (variant or {}).get("compute", {})

    def value(key: str) -> str:
        return compute.get(key) or "not reported"

    hours = compute.get("hours_used") or compute.get("duration")
    lines = [
        "Carbon emissions can be estimated using the [Machine Learning Impact calculator]"
        "(https://mlco2.github.io/impact#compute) presented in [Lacoste et al. (2019)](https://arxiv.org/abs/1910.09700).",
        "",
        f"- **Hardware Type:** {value('hardware_type')}",
        f"- **Hours used:** {hours or 'not reported'}",
        f"- **Cloud Provider:** {value('cloud_provider')}",
        f"- **Compute Region:** {value('compute_region')}",
        f"- **Carbon Emitted:** {value('carbon_emitted')}",
    ]
    if compute.get("note"):
        lines += ["", compute["note"]]
    return "\n".join(lines)


def _evaluation_section(evaluation: EvalSummary) -> str:
    if not evaluation.results:
        return "No evaluation results were found next to this checkpoint (`eval_results.json`)."
    lines = ["| task | dataset | split | metric | value |", "|---|---|---|---|---:|"]
    for r in evaluation.results:
        lines.append(f"| {r.task_name} | {r.dataset_name} | {r.dataset_split or ''} | {r.metric_name} | "
                     f"{r.metric_value:.4g} |")
    if evaluation.samples:
        lines += [""] + [f"- {task}: {text}" for task, text in evaluation.samples.items()]
    if evaluation.skipped:
        lines += ["", f"{len(evaluation.skipped)} entries of eval_results.json are not numbers and are not shown: "
                      + "; ".join(evaluation.skipped)]
    return "\n".join(lines)


def render_card(checkpoint: str | Path, repo_id: str | None = None, *, base_model: str | list[str] | None = None,
                eval_results: str | Path | None = None, variant: str | None = None, facts: CheckpointFacts | None = None):
    """Render the model card of a checkpoint folder as a `huggingface_hub.ModelCard`.

    repo_id: the Hub id used in the usage snippets (defaults to the folder name, for local loading).
    base_model: Hub id(s) this checkpoint was fine-tuned or converted from; by default the `base_model` key of
        the weight files' safetensors metadata, if any.
    eval_results: an eval JSON; defaults to `eval_results.json` in the checkpoint folder when present.
    variant: a key of model_cards/variants.json; by default the variant whose preset the checkpoint matches.
    """
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(checkpoint)
    facts = facts or checkpoint_facts(folder)
    family_name, family = family_for(facts.model_type)
    variants = load_variants()
    if variant is None:
        variant = next((name for name, v in variants.items() if v.get("preset") == facts.preset), None)
    elif variant not in variants:
        raise KeyError(f"unknown variant {variant!r}; model_cards/variants.json has: {', '.join(variants)}")
    elif variants[variant]["family"] != family_name:
        raise ValueError(f"variant {variant!r} is a {variants[variant]['family']} model; this checkpoint is "
                         f"{facts.model_type!r}")
    facts_of_variant = variants.get(variant) if variant else None

    eval_path = Path(eval_results) if eval_results else folder / EVAL_RESULTS_FILE
    if eval_results and not eval_path.is_file():
        raise FileNotFoundError(f"eval results file {eval_path} does not exist")
    evaluation = read_eval_results(eval_path) if eval_path.is_file() else EvalSummary([], [])

    repo_id = repo_id or folder.resolve().name
    model_name = facts_of_variant["display_name"] if facts_of_variant else repo_id.split("/")[-1]
    # Provenance: given by the caller (fine-tuned from ...), else recorded in the weights (converted from ...).
    base_model = base_model or facts.base_model or None
    tags = list(dict.fromkeys(family.get("tags", []) + (["custom_code"] if facts.has_remote_code else [])))
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=family.get("pipeline_tag"),
        tags=tags,
        license=(facts_of_variant or {}).get("license", family.get("license")),
        datasets=(facts_of_variant or {}).get("datasets") or None,
        base_model=base_model,
        model_name=model_name,
        eval_results=evaluation.results or None,
    )
    comparisons = _comparisons(facts, (facts_of_variant or {}).get("stated", {}))
    # The Auto class for trust_remote_code loading must be one that config.json's auto_map names.
    auto_map = facts.config.get("auto_map", {})
    preferred = family.get("auto_class", "AutoModel")
    remote_auto_class = preferred if preferred in auto_map else next(
        (name for name in auto_map if name.startswith("AutoModel")), None)
    context = {
        # The usage snippets are for the family's inference class; other classes (BLIP-2's stage-1
        # Blip2FlanT5ForPretraining) get a pointer instead of code that would not run.
        "usage": facts.architecture == family.get("usage_class", facts.architecture),
        "auto_class": preferred,
        "remote_auto_class": remote_auto_class,
        "repo_id": repo_id,
        "model_name": model_name,
        "variant": facts_of_variant,
        "facts": facts,
        "variant_section": _variant_section(facts_of_variant, facts),
        "parameters_section": _parameters_section(facts, family, comparisons),
        "checkpoint_section": _checkpoint_section(facts, comparisons),
        "environment_section": _environment_section(facts_of_variant),
        "evaluation_section": _evaluation_section(evaluation),
        "hf_vlm_version": importlib.import_module("hf_vlm").__version__,
    }
    template = _card_files().joinpath(family["template"]).read_text(encoding="utf-8")
    return ModelCard.from_template(card_data, template_str=template, **context)


def write_card(checkpoint: str | Path, output: str | Path | None = None, **kwargs) -> Path:
    """Render the card of `checkpoint` and write it atomically (default: CHECKPOINT/README.md)."""
    output = Path(output) if output else Path(checkpoint) / "README.md"
    card = render_card(checkpoint, **kwargs)
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_text(str(card), encoding="utf-8")
    tmp.replace(output)
    return output


# ---------------------------------------------------------------------------------------------------------
# Adapter cards (peft LoRA adapters trained with `finetune.py --lora`)
# ---------------------------------------------------------------------------------------------------------
ADAPTER_CONFIG_FILE = "adapter_config.json"


def read_adapter_config(folder: str | Path) -> dict:
    path = Path(folder) / ADAPTER_CONFIG_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable adapter config: {err}") from None


def render_adapter_card(adapter: str | Path, repo_id: str, base_model: str, base_config) -> Any:
    """The model card of a peft adapter folder as a `huggingface_hub.ModelCard`: the base it adapts (`base_model`,
    a Hub id, and its config), the LoRA settings and size, the training run (`training_summary.json` of
    finetune.py, when present), and a usage snippet that loads the base by id and the adapter on it."""
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(adapter)
    adapter_config = read_adapter_config(folder)
    family_name, family = family_for(base_config.model_type)
    sizes, _, elements, _ = read_weight_headers(folder)
    summary_path = folder / "training_summary.json"
    training = None
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        lora = summary.get("lora") or {}
        quantization = "8-bit" if lora.get("load_in_8bit") else "4-bit NF4" if lora.get("load_in_4bit") else None
        training = {"recipe": summary.get("recipe"), "stage": summary.get("stage"),
                    "global_step": summary.get("global_step"), "quantization": quantization}
    # trust_remote_code loading needs an Auto class that the base's config.json auto_map names
    auto_map = getattr(base_config, "auto_map", None) or {}
    auto_class = family.get("auto_class", "AutoModel")
    if auto_map and auto_class not in auto_map:
        auto_class = next((name for name in auto_map if name.startswith("AutoModel")), auto_class)
    peft_type = adapter_config.get("peft_type", "LORA")
    tags = list(dict.fromkeys(family.get("tags", []) + ["peft", peft_type.lower(), "adapter"]))
    model_name = repo_id.split("/")[-1]
    card_data = ModelCardData(library_name="peft", pipeline_tag=family.get("pipeline_tag"), tags=tags,
                              license=family.get("license"), base_model=base_model, model_name=model_name)
    context = {
        "model_name": model_name,
        "repo_id": repo_id,
        "base_model": base_model,
        "base_architecture": (base_config.architectures or [base_config.model_type])[0],
        "model_type": base_config.model_type,
        "family_title": {"coca": "CoCa", "blip2_flant5": "BLIP-2-FlanT5"}.get(family_name, family_name),
        "auto_class": auto_class,
        "peft_type": "LoRA" if peft_type == "LORA" else peft_type,
        "r": adapter_config.get("r"),
        "lora_alpha": adapter_config.get("lora_alpha"),
        "lora_dropout": adapter_config.get("lora_dropout"),
        "target_modules": ", ".join(f"`{m}`" for m in sorted(adapter_config.get("target_modules") or [])),
        "adapter_parameters": human_count(elements),
        "adapter_bytes": human_bytes(sum(sizes.values())),
        "training": training,
        "hf_vlm_version": importlib.import_module("hf_vlm").__version__,
    }
    template = _card_files().joinpath("adapter.md").read_text(encoding="utf-8")
    return ModelCard.from_template(card_data, template_str=template, **context)
