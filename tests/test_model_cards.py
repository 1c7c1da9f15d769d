"""Model cards: the brief's facts for BLIP-2-FlanT5-XL and CoCa-Large-v2, numbers computed from the checkpoint
(never copied), eval results as model-index, the Hub's environmental-impact section, and `hf-vlm card`."""

from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub import ModelCard

from hf_vlm.cli import main as cli
from hf_vlm.hub import checkpoint_facts, read_eval_results, render_card
from hf_vlm.presets import get_config


def _config_only_checkpoint(tmp_path, preset: str):
    """A folder with the preset's config.json only: what a card can say before weights exist (full size)."""
    folder = tmp_path / preset
    get_config(preset).save_pretrained(folder)
    return folder


def _unique_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() lists tied weights once


def test_blip2_flan_t5_xl_card_states_the_computed_parameter_count_and_the_brief_facts(tmp_path):
    from hf_vlm.modeling.blip2_flant5 import Blip2FlanT5ForConditionalGeneration

    folder = _config_only_checkpoint(tmp_path, "blip2-flan-t5-xl")
    with torch.device("meta"):
        expected = _unique_parameters(Blip2FlanT5ForConditionalGeneration(get_config("blip2-flan-t5-xl")))
    card = render_card(folder, "Salesforce-like/blip2-flan-t5-xl")
    text = str(card)

    assert f"**{expected:,}**" in text
    assert "The stated figure for this model is 13.7 billion parameters; the count above is computed" in text
    for fact in ("ViT-g/14 from EVA-CLIP, pretrained on LAION-2B", "Q-Former", "FlanT5-XL",
                 "CC3M, CC12M, SBU and a filtered subset of LAION-400M", "224x224 with random crop and normalization",
                 "FlanT5 SentencePiece tokenizer", "AdamW", "linear warmup over 10,000 steps to a peak of 1e-4",
                 "cosine decay to 1e-6", "256 per GPU, with gradient accumulation", "(2023)"):
        assert fact in text, fact
    assert "- **Hardware Type:** NVIDIA A100 80GB cluster" in text
    assert "- **Hours used:** about 6 weeks" in text
    assert "- **Compute Region:** Singapore" in text
    assert "- **Carbon Emitted:** not reported" in text

    data = ModelCard(text).data  # the YAML front matter parses back
    assert (data.library_name, data.pipeline_tag, data.license) == ("transformers", "image-text-to-text", "mit")
    assert "laion/laion400m" in data.datasets and len(data.datasets) == 4
    assert data.model_name == "BLIP-2-FlanT5-XL"


def test_blip2_stage_counts_follow_what_each_stage_freezes(tmp_path):
    facts = checkpoint_facts(_config_only_checkpoint(tmp_path, "blip2-flan-t5-xl"))
    by_module = facts.parameters_by_module

    assert sum(by_module.values()) == facts.parameters
    stage1, stage2 = facts.trainable_by_stage.values()
    # Stage 2 trains everything but the frozen image encoder and the frozen FlanT5.
    assert stage2 == facts.parameters - by_module["vision_model"] - by_module["language_model"]
    # Stage 1 adds the Q-Former's text path and heads, and never sees the language model or its projection.
    assert stage1 > stage2 - by_module["language_projection"]
    assert facts.preset == "blip2-flan-t5-xl" and facts.image_size == 224
    assert facts.vocab_sizes["text_config.vocab_size"] == 32128


def test_coca_large_v2_card_holds_the_brief_facts_and_agrees_on_vocab_and_image_size(tmp_path):
    from hf_vlm.modeling.coca import CocaModel

    folder = _config_only_checkpoint(tmp_path, "coca-large-v2")
    with torch.device("meta"):
        expected = _unique_parameters(CocaModel(get_config("coca-large-v2")))
    text = str(render_card(folder, "org/coca-large-v2"))

    assert f"**{expected:,}**" in text
    for fact in ("ViT-L/14", "T5-Large-like text stack", "Contrastive loss plus captioning loss, weighted equally",
                 "4 billion filtered, deduplicated web image-text pairs",
                 "224x224 with random crop, horizontal flip and color jitter",
                 "SentencePiece vocabulary of 32,000 tokens, at most 77 tokens", "AdamW, learning rate 1e-4",
                 "10% linear warmup, then cosine decay", "Global batch: 16,384", "DeepSpeed ZeRO-2, BF16",
                 "zero-shot ImageNet classification and COCO captioning", "(2023)"):
        assert fact in text, fact
    assert "- **Hardware Type:** 64 NVIDIA A100 80GB GPUs (NVLink, InfiniBand)" in text
    assert "- **Hours used:** over 12,000 GPU-hours (about 4 weeks of training)" in text
    assert "- **Compute Region:** United States" in text
    # The brief's vocabulary, image size and text length agree with the checkpoint: no discrepancy is reported.
    assert "the stated figure for this model" not in text
    assert "| vocabulary (`text_config.vocab_size`) | 32,000 |" in text
    assert "| image size | 224x224 |" in text
    data = ModelCard(text).data
    assert (data.pipeline_tag, data.license, data.model_name) == (
        "zero-shot-image-classification", "apache-2.0", "CoCa-Large-v2")


def test_card_numbers_come_from_the_checkpoint_files(tmp_path, t5_tokenizer_dir):
    from transformers import T5Tokenizer

    from hf_vlm.modeling.blip2_flant5 import Blip2FlanT5ForConditionalGeneration, Blip2FlanT5Processor

    folder = tmp_path / "blip2-bf16"
    model = Blip2FlanT5ForConditionalGeneration(get_config("blip2-tiny")).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="300KB")
    Blip2FlanT5Processor.from_tokenizers(T5Tokenizer.from_pretrained(t5_tokenizer_dir), image_size=40).save_pretrained(folder)

    facts = checkpoint_facts(folder)
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) >= 2
    assert facts.weight_files == {p.name: p.stat().st_size for p in shards}
    assert facts.parameters == _unique_parameters(model) == facts.stored_elements
    assert facts.stored_dtypes == {"bfloat16": facts.parameters}
    assert facts.image_size == 40  # from the processor, not the config (32): what the model is fed
    assert facts.preset == "blip2-tiny"

    text = str(render_card(folder))
    assert f"| stored dtype | bfloat16 ({facts.parameters:,} values) |" in text
    for shard in shards:
        assert f"| `{shard.name}` | {shard.stat().st_size:,} |" in text
    # A tiny checkpoint is not BLIP-2-FlanT5-XL: none of that variant's facts are claimed.
    assert "13.7" not in text and "Singapore" not in text
    assert "matches the hf-vlm preset `blip2-tiny`" in text
    assert "- **Hardware Type:** not reported" in text


def test_eval_results_are_read_tolerantly_and_skips_are_counted(tmp_path):
    from hf_vlm.evaluation import save_results

    save_results(tmp_path, "caption", {"metrics": {"cider": 1.25, "bleu4": 0.5}, "data": "coco:val", "num_samples": 10,
                                       "skipped": {"no caption": 2}})
    save_results(tmp_path, "retrieval", {"metrics": {"image_to_text": {"R@1": 0.5, "R@5": 1.0}}, "data": "coco:val"})
    legacy = json.loads((tmp_path / "eval_results.json").read_text())
    legacy["vqa"] = {"accuracy": 0.625, "dataset": {"name": "VQAv2", "type": "HuggingFaceM4/VQAv2", "split": "val"}}
    legacy["zero-shot"] = {"top1": "n/a", "top5": 0.875}
    legacy["notes"] = "a free-form note is metadata, not a task"
    (tmp_path / "eval_results.json").write_text(json.dumps(legacy))

    summary = read_eval_results(tmp_path / "eval_results.json")
    got = {(r.task_type, r.metric_type): (r.metric_value, r.dataset_name, r.dataset_split) for r in summary.results}
    assert got == {
        ("image-to-text", "cider"): (1.25, "coco", "val"),
        ("image-to-text", "bleu4"): (0.5, "coco", "val"),
        ("image-feature-extraction", "image_to_text/r@1"): (0.5, "coco", "val"),
        ("image-feature-extraction", "image_to_text/r@5"): (1.0, "coco", "val"),
        ("visual-question-answering", "accuracy"): (0.625, "VQAv2", "val"),
        ("zero-shot-image-classification", "top5"): (0.875, "unspecified", None),
    }
    assert summary.skipped == ["zero-shot.top1 ('n/a' is not a number)"]
    assert summary.samples == {"caption": "10 samples (skipped: 2 no caption)"}  # the evaluation's own counts

    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        read_eval_results(tmp_path / "broken.json")


def test_card_command_writes_a_readme_with_model_index(tmp_path, capsys):
    from hf_vlm.evaluation import save_results

    folder = _config_only_checkpoint(tmp_path, "blip2-tiny")
    save_results(folder, "vqa", {"metrics": {"accuracy": 0.5}, "data": "scenes:test"})
    output = tmp_path / "card" / "README.md"
    output.parent.mkdir()

    assert cli(["card", str(folder), "--output", str(output), "--repo-id", "org/blip2-tiny",
                "--base-model", "org/blip2-base"]) == 0
    assert f"wrote {output}" in capsys.readouterr().out
    data = ModelCard.load(output).data
    assert data.base_model == ["org/blip2-base"]
    assert [(r.task_type, r.metric_type, r.metric_value) for r in data.eval_results] == [
        ("visual-question-answering", "accuracy", 0.5)]
    assert 'from_pretrained("org/blip2-tiny", trust_remote_code=True)' in output.read_text()


def test_card_command_errors_name_the_problem(tmp_path, capsys):
    assert cli(["card", str(tmp_path)]) == 1
    assert f"{tmp_path} is not a checkpoint folder: it has no config.json" in capsys.readouterr().err
    folder = _config_only_checkpoint(tmp_path, "blip2-tiny")
    assert cli(["card", str(folder), "--variant", "blip2-flan-t5-xxl"]) == 1
    assert "unknown variant 'blip2-flan-t5-xxl'" in capsys.readouterr().err
    assert cli(["card", str(folder), "--variant", "coca-large-v2"]) == 1  # a card never borrows another family's facts
    assert "variant 'coca-large-v2' is a coca model; this checkpoint is 'blip2_flant5'" in capsys.readouterr().err


def test_provenance_recorded_in_the_weights_becomes_base_model_and_survives_staging(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import BertConfig, BertModel

    from hf_vlm.hub import stage_checkpoint

    converted = tmp_path / "converted"
    BertModel(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(converted)
    weights = converted / "model.safetensors"
    save_file(load_file(weights), weights, metadata={"format": "pt", "base_model": "google-bert/bert-base-uncased"})

    assert ModelCard(str(render_card(converted))).data.base_model == ["google-bert/bert-base-uncased"]
    assert render_card(converted, base_model="org/other").data.base_model == "org/other"  # the caller decides
    staged = tmp_path / "staged"
    files = stage_checkpoint(converted, staged)
    assert {"README.md", "config.json", "model.safetensors"} <= set(files)
    assert ModelCard.load(staged / "README.md").data.base_model == ["google-bert/bert-base-uncased"]


def test_a_stage1_blip2_card_points_to_stage2_instead_of_snippets_that_would_not_run(tmp_path):
    config = get_config("blip2-tiny")
    config.architectures = ["Blip2FlanT5ForPretraining"]
    config.save_pretrained(tmp_path / "stage1")

    text = str(render_card(tmp_path / "stage1", "org/blip2-stage1"))
    assert "```python" not in text
    assert "This is a `Blip2FlanT5ForPretraining` checkpoint (stage 1" in text
    assert 'Blip2FlanT5ForConditionalGeneration.from_stage1("org/blip2-stage1", language_model=...)' in text
