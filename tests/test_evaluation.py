"""Evaluation: the caption metrics agree with the COCO reference scorers (pycocoevalcap) to 1e-6,
VQA accuracy follows the VQAv2 rules, top-k and recall@K count ties against the model, results are
merged into eval_results.json atomically, and `hf-vlm eval` runs real (tiny, random) models end to end."""

import json
import math
import random

import numpy as np
import pytest

from hf_vlm.evaluation import (
    bleu,
    caption_metrics,
    cider_d,
    format_table,
    load_results,
    normalize_answer,
    retrieval_recall,
    save_results,
    tokenize_caption,
    topk_accuracy,
    vqa_accuracy,
    vqa_metrics,
)
from hf_vlm.testing import require

# ------------------------------------------------------------------------- caption metrics

COCO_LIKE = (
    ["A man riding a wave on top of a surfboard.", "A plate of food with broccoli and rice",
     "two dogs playing in the snow", "a red circle to the left of a blue square", "a cat"],
    [["A man riding a wave on a surfboard.", "Surfer riding a large wave in the ocean.",
      "A person on a surf board rides a wave.", "a surfer catches a wave", "Man surfing on a big wave."],
     ["A plate of rice, broccoli and chicken.", "Food on a white plate with broccoli.",
      "a dinner plate with rice and vegetables"],
     ["Two dogs play in the snow.", "A pair of dogs running through snow"],
     ["a large red circle to the left of a small blue square"],
     ["A cat sitting on a couch.", "a small cat on a sofa next to a pillow"]],
)


def random_sets(seed: int):
    rng = random.Random(seed)
    vocab = "a the red blue green circle square triangle man dog on of big small runs left right".split()
    for _ in range(6):
        num_images = rng.randint(2, 9)
        predictions = [" ".join(rng.choices(vocab, k=rng.randint(0, 12))) for _ in range(num_images)]
        references = [[" ".join(rng.choices(vocab, k=rng.randint(1, 12))) for _ in range(rng.randint(1, 5))]
                      for _ in range(num_images)]
        yield predictions, references


@pytest.mark.parametrize("case", ["coco_like", "random", "perfect_and_degenerate"])
def test_cider_and_bleu_match_pycocoevalcap(case):
    require("pycocoevalcap", "pip install 'hf-vlm[dev]'  (or: pip install pycocoevalcap)")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if case == "coco_like":
        sets = [COCO_LIKE]
    elif case == "random":
        sets = list(random_sets(0))
    else:
        refs = COCO_LIKE[1]
        sets = [([r[0] for r in refs], refs),  # every prediction equals its first reference
                (["", "a", "plate", "dogs dogs dogs dogs dogs", "x y z"], refs)]  # empty, short, repeated, unknown

    for predictions, references in sets:
        predictions = [tokenize_caption(p) for p in predictions]
        references = [[tokenize_caption(r) for r in refs] for refs in references]
        gts = {i: refs for i, refs in enumerate(references)}
        res = {i: [p] for i, p in enumerate(predictions)}
        expected_cider, expected_per_image = Cider().compute_score(gts, res)
        expected_bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)

        ours, per_image = cider_d(predictions, references)
        assert ours == pytest.approx(expected_cider, abs=1e-6)
        assert per_image == pytest.approx(list(expected_per_image), abs=1e-6)
        assert bleu(predictions, references) == pytest.approx(expected_bleu, abs=1e-6)


def test_caption_metrics_known_values():
    captions = ["a large red circle to the left", "two small blue squares below it",
                "three green triangles in a row", "one yellow star on gray"]
    perfect = caption_metrics(captions, [[c] for c in captions])
    # No word is shared, so every n-gram has full idf and cosine 1 at every order: CIDEr = 10 exactly.
    assert perfect["cider"] == pytest.approx(10.0)
    assert perfect["bleu4"] == pytest.approx(1.0) and perfect["exact_match"] == 1.0

    # Shuffled predictions share no n-gram with their references.
    wrong = caption_metrics(captions[1:] + captions[:1], [[c] for c in captions])
    assert wrong["cider"] == 0.0 and wrong["bleu1"] < 1e-9 and wrong["exact_match"] == 0.0

    # Half-length correct predictions: precision 1, brevity penalty exp(1 - 12/6) on BLEU.
    halves = caption_metrics(["a large red", "two small blue"], [["a large red circle to the"], ["two small blue squares below it"]])
    assert halves["bleu1"] == pytest.approx(math.exp(1 - 12 / 6))
    assert halves["exact_match"] == 0.0
    # Case and punctuation do not matter; a match against any reference counts.
    assert caption_metrics(["A Red circle."], [["a blue square", "a red circle"]])["exact_match"] == 1.0
    assert tokenize_caption("  A Red-circle,  left. ") == "a red circle left"


def test_caption_metric_input_errors():
    with pytest.raises(ValueError, match="2 predictions but 1 reference"):
        caption_metrics(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match=r"references\[0\] must be a non-empty list"):
        caption_metrics(["a"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        caption_metrics([], [])


# ---------------------------------------------------------------------------------- VQA

@pytest.mark.parametrize("answer, normalized", [
    ("Two.", "2"), ("The dog", "dog"), ("Yes!", "yes"), ("dont", "don't"), ("couldnt've", "couldn't've"),
    ("2,000", "2000"), ("A man's hat", "man's hat"), ("red-white", "red white"), ("red - white", "red white"),
    ("3.5", "3.5"), ("none\tat all", "0 at all"), (" TEN ", "10"), ("an apple, a pear", "apple pear"),
])
def test_answer_normalization_follows_the_vqa_rules(answer, normalized):
    assert normalize_answer(answer) == normalized


def test_vqa_accuracy_is_min_matches_over_three_averaged_over_leave_one_out():
    # 3 of 10 annotators said "2": leaving one of them out leaves 2 matches (2/3), else 3 (1): 0.9.
    assert vqa_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("2", ["2"] * 2 + ["3"] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    assert vqa_accuracy("2", ["2"] * 10) == 1.0
    assert vqa_accuracy("4", ["2"] * 10) == 0.0
    # A single reference answer: exact match after normalization.
    assert vqa_accuracy("The Circle.", ["circle"]) == 1.0 and vqa_accuracy("square", ["circle"]) == 0.0
    metrics = vqa_metrics(["red", "two", "no"], [["red"], ["3"], ["no"]], ["color", "count", "yes/no"])
    assert metrics == {"vqa_accuracy": pytest.approx(2 / 3), "vqa_accuracy/color": 1.0,
                       "vqa_accuracy/count": 0.0, "vqa_accuracy/yes/no": 1.0}
    with pytest.raises(ValueError, match="non-empty list of answers"):
        vqa_accuracy("red", "red")


# ------------------------------------------------------------------- zero-shot and retrieval

def test_topk_accuracy_counts_ties_against_the_model():
    logits = np.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    assert topk_accuracy(logits, [0, 0, 1], ks=(1, 2, 5)) == {"top1": 1 / 3, "top2": 1 / 3, "top5": 1.0}
    import torch

    assert topk_accuracy(torch.tensor(logits), torch.tensor([0, 2, 0]), ks=(1,)) == {"top1": 2 / 3}
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
        topk_accuracy(logits, [0, 1])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        topk_accuracy(logits, [0, 1, 3])


def test_retrieval_recall_with_several_captions_per_image():
    # 3 images, 6 texts (2 per image). Image 2's texts are ranked below another image's texts.
    text_to_images = [0, 0, 1, 1, 2, 2]
    similarity = np.array([
        [0.9, 0.1, 0.2, 0.0, 0.0, 0.0],
        [0.1, 0.3, 0.2, 0.8, 0.0, 0.0],
        [0.5, 0.0, 0.0, 0.0, 0.3, 0.4],
    ])
    recall = retrieval_recall(similarity, text_to_images, ks=(1, 2))
    # image->text: images 0 and 1 find one of their texts first; image 2's best text (0.4) ranks 2nd.
    assert recall["image_to_text_R@1"] == pytest.approx(2 / 3) and recall["image_to_text_R@2"] == 1.0
    # text->image: t1 scores image 1 above its own image 0, t2 ties its image 1 with image 0 (a tie
    # counts against the model); the other four texts rank their image first.
    assert recall["text_to_image_R@1"] == pytest.approx(4 / 6)
    assert recall["text_to_image_R@2"] == pytest.approx(1.0)
    # A text may describe several images (identical captions): any of them counts.
    assert retrieval_recall(np.array([[0.2], [0.9]]), [[0, 1]], ks=(1,)) == {
        "image_to_text_R@1": 1.0, "text_to_image_R@1": 1.0}
    with pytest.raises(ValueError, match="images \\[2\\] have no text"):
        retrieval_recall(similarity, [0, 0, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="not an image index"):
        retrieval_recall(similarity, [0, 0, 1, 1, 2, 7])


# ------------------------------------------------------------------------------ results file

def test_results_merge_tasks_atomically_and_print_as_a_table(tmp_path):
    save_results(tmp_path, "caption", {"metrics": {"cider": 2.5, "bleu4": 0.5}, "data": "scenes:test", "num_samples": 8})
    path = save_results(tmp_path, "vqa", {"metrics": {"vqa_accuracy": 0.875}, "data": "scenes:test", "num_samples": 8})
    results = json.loads(path.read_text())
    assert set(results) == {"caption", "vqa"} and results["caption"]["metrics"]["cider"] == 2.5
    save_results(tmp_path, "vqa", {"metrics": {"vqa_accuracy": 0.9}})
    assert load_results(tmp_path)["vqa"]["metrics"] == {"vqa_accuracy": 0.9}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval_results.json"]  # no temporary file left

    table = format_table(load_results(tmp_path))
    assert "cider" in table and "2.5000" in table and "0.9000" in table and "scenes:test" in table

    path.write_text("{not json")
    with pytest.raises(ValueError, match="eval_results.json is not valid JSON"):
        save_results(tmp_path, "caption", {"metrics": {}})
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        save_results(tmp_path / "does-not-exist", "caption", {})


# ------------------------------------------------------------------- evaluation data loading

def test_exported_scenes_load_like_the_generated_ones(tmp_path):
    from hf_vlm.evaluation.runner import load_eval_data
    from hf_vlm.scenes import export_imagefolder, export_webdataset, generate_scenes

    generated = load_eval_data("scenes:test", num_samples=5)
    rows = list(generate_scenes("test", 5))
    export_webdataset(rows, tmp_path / "wds" / "test", samples_per_shard=3)
    export_webdataset(rows[:1], tmp_path / "wds" / "train")  # the folder's test split is the one evaluated
    export_imagefolder(rows, tmp_path / "folder" / "test")
    for spec in (tmp_path / "wds", tmp_path / "wds" / "test" / "*.tar", tmp_path / "folder"):
        loaded = load_eval_data(str(spec))
        assert loaded.captions == generated.captions
        assert loaded.questions == generated.questions
        assert [np.asarray(i).tolist() for i in loaded.images] == [np.asarray(i).tolist() for i in generated.images]
        # Class names come from the rows' label_name fields; the labels name the same classes.
        assert [loaded.class_names[i] for i in loaded.labels] == [generated.class_names[i] for i in generated.labels]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="found no webdataset .tar shards, no imagefolder metadata.jsonl"):
        load_eval_data(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="has no split 'validation'"):
        load_eval_data(str(tmp_path / "folder"), split="validation")


def test_undecodable_images_and_missing_captions_are_skipped_and_counted(tmp_path):
    from hf_vlm.evaluation.runner import load_eval_data

    folder = tmp_path / "folder"
    folder.mkdir()
    from hf_vlm.testing import random_image

    random_image(16, seed=0).save(folder / "good.png")
    random_image(16, seed=1).save(folder / "no_caption.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folder / "metadata.jsonl").write_text(
        '{"file_name": "good.png", "caption": "a photo", "label": 0}\n'
        '{"file_name": "broken.png", "caption": "a broken photo", "label": 1}\n'
        '{"file_name": "no_caption.png", "caption": null, "label": 1}\n'
    )
    data = load_eval_data(str(folder), class_names=["a", "b"])
    assert data.skipped == {"corrupt_image": 1}  # training's reason (hf_vlm.data.skips)
    assert data.captions == [["a photo"], []] and data.labels == [0, 1] and data.class_names == ["a", "b"]


# --------------------------------------------------------------- end to end on tiny models

def test_hf_vlm_eval_runs_blip2_caption_and_vqa_and_writes_the_results(blip2_checkpoint, capsys):
    import torch

    from hf_vlm.cli import main
    from hf_vlm.evaluation.runner import VQA_PROMPT, load_eval_data, load_model

    assert main(["eval", str(blip2_checkpoint), "--task", "caption", "vqa", "--num-samples", "3",
                 "--max-new-tokens", "4", "--batch-size", "64"]) == 0
    table = capsys.readouterr().out
    assert "cider" in table and "bleu4" in table and "vqa_accuracy/yes/no" in table

    results = load_results(blip2_checkpoint)
    assert set(results) == {"caption", "vqa"}
    caption, vqa = results["caption"], results["vqa"]
    assert caption["data"] == "scenes:test" and caption["num_samples"] == 3 and caption["skipped"] == {}
    assert 0 <= caption["metrics"]["cider"] <= 10 and 0 <= caption["metrics"]["bleu4"] <= 1
    data = load_eval_data("scenes:test", num_samples=3)
    assert vqa["num_samples"] == len(data.questions)

    # The recorded scores are those of the model's own generations with the checkpoint's recommended decoding (its
    # caption_generation_config.json and generation_config.json), --max-new-tokens winning; computed here directly.
    from transformers import GenerationConfig

    assert caption["generation"] == {"num_beams": 5, "max_new_tokens": 4, "min_new_tokens": 4}
    assert vqa["generation"] == {"num_beams": 5, "max_new_tokens": 4, "min_new_tokens": 1, "length_penalty": -1.0,
                                 "prompt": VQA_PROMPT}
    model, processor = load_model(str(blip2_checkpoint))
    caption_config = GenerationConfig.from_pretrained(blip2_checkpoint, "caption_generation_config.json")
    with torch.inference_mode():
        inputs = processor(images=data.images, return_tensors="pt")
        captions = processor.batch_decode(model.generate(pixel_values=inputs["pixel_values"], max_new_tokens=4,
                                                         min_new_tokens=4, generation_config=caption_config),
                                          skip_special_tokens=True)
        inputs = processor(images=[data.images[q.image_index] for q in data.questions],
                           text=[VQA_PROMPT.format(q.question) for q in data.questions], return_tensors="pt")
        answers = processor.batch_decode(model.generate(**inputs, max_new_tokens=4), skip_special_tokens=True)
    assert [e["prediction"] for e in caption["examples"]] == [c.strip() for c in captions]
    assert caption["metrics"] == pytest.approx(caption_metrics(captions, data.captions))
    assert vqa["metrics"] == pytest.approx(vqa_metrics(answers, [q.answers for q in data.questions],
                                                       [q.question_type for q in data.questions]))


def test_tasks_a_model_cannot_do_are_refused_by_name(blip2_checkpoint):
    from hf_vlm.evaluation.runner import evaluate, load_eval_data, load_model

    model, processor = load_model(str(blip2_checkpoint))
    data = load_eval_data("scenes:test", num_samples=2)
    with pytest.raises(ValueError, match="'zero-shot' is not supported by model_type 'blip2_flant5'.*coca: caption"):
        evaluate(model, processor, data, "zero-shot")
    with pytest.raises(ValueError, match="unknown task 'detection'"):
        evaluate(model, processor, data, "detection")


@pytest.fixture(scope="module")
def coca_checkpoint(tmp_path_factory):
    import torch
    from transformers import AutoModel, CLIPImageProcessor

    import hf_vlm  # noqa: F401
    from hf_vlm.modeling.coca import CocaProcessor
    from hf_vlm.presets import get_config
    from hf_vlm.scenes import generate_scenes
    from hf_vlm.testing import TINY_CORPUS
    from hf_vlm.tokenization import train_coca_tokenizer

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("coca-tiny")
    corpus = TINY_CORPUS + [row["caption"] for row in generate_scenes("train", 200)]
    tokenizer = train_coca_tokenizer(corpus, vocab_size=96, model_max_length=32)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CocaProcessor(image_processor, tokenizer).save_pretrained(path)
    AutoModel.from_config(get_config("coca-tiny")).save_pretrained(path)
    return path


def test_hf_vlm_eval_runs_coca_caption_zero_shot_and_retrieval(coca_checkpoint, capsys):
    import torch

    from hf_vlm.cli import main
    from hf_vlm.evaluation.runner import load_eval_data, load_model

    output = coca_checkpoint / "results" / "coca.json"
    output.parent.mkdir()
    assert main(["eval", str(coca_checkpoint), "--num-samples", "12", "--max-new-tokens", "5",
                 "--output", str(output)]) == 0  # default tasks: all CoCa does
    assert "image_to_text_R@10" in capsys.readouterr().out
    results = load_results(output)
    assert set(results) == {"caption", "zero-shot", "retrieval"}
    zero_shot, retrieval = results["zero-shot"]["metrics"], results["retrieval"]["metrics"]
    assert results["zero-shot"]["num_classes"] == 12 and results["zero-shot"]["template"] == "a large {}"
    assert 0 <= zero_shot["top1"] <= zero_shot["top5"] <= 1
    for direction in ("image_to_text", "text_to_image"):
        assert 0 <= retrieval[f"{direction}_R@1"] <= retrieval[f"{direction}_R@5"] <= retrieval[f"{direction}_R@10"] <= 1

    # The same numbers from the model's own forward (logits_per_image), not the feature path the runner uses.
    model, processor = load_model(str(coca_checkpoint))
    data = load_eval_data("scenes:test", num_samples=12)
    prompts = [f"a large {name}" for name in data.class_names]
    captions = list(dict.fromkeys(c for refs in data.captions for c in refs))
    with torch.inference_mode():
        logits = model(**processor(images=data.images, text=prompts, return_tensors="pt", padding=True)).logits_per_image
        assert zero_shot["top1"] == pytest.approx((logits.argmax(-1) == torch.tensor(data.labels)).float().mean().item())
        logits = model(**processor(images=data.images, text=captions, return_tensors="pt", padding=True,
                                 truncation=True)).logits_per_image
        best_text = [captions[i] for i in logits.argmax(-1).tolist()]
        assert retrieval["image_to_text_R@1"] == pytest.approx(
            np.mean([text in refs for text, refs in zip(best_text, data.captions)]))


def test_hostile_vqa_rows_are_counted_or_cut_never_fatal(blip2_checkpoint, tmp_path):
    """An empty answers list (VQAv2 form), a decompression bomb and a 50,000-character question: the first two are
    skipped and counted, the question is cut to the model's prompt length (it once asked for 81 GB)."""
    from test_data_sources import decompression_bomb

    from hf_vlm.evaluation.runner import (
        VQA_PROMPT,
        evaluate,
        load_eval_data,
        load_model,
        max_prompt_tokens,
        truncate_questions,
    )
    from hf_vlm.testing import random_image

    folder = tmp_path / "vqa"
    folder.mkdir()
    for name, seed in (("long.png", 0), ("no_answers.png", 1)):
        random_image(16, seed=seed).save(folder / name)
    (folder / "bomb.png").write_bytes(decompression_bomb())
    long_question = "what is " + "very " * 10_000 + "red?"
    rows = [{"file_name": "long.png", "question": long_question, "answers": [{"answer": "red"}]},
            {"file_name": "no_answers.png", "question": "what color?", "answers": []},
            {"file_name": "bomb.png", "question": "what color?", "answers": ["red"]}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    data = load_eval_data(str(folder))
    assert data.skipped == {"empty_answer": 1, "oversized_image": 1}
    model, processor = load_model(str(blip2_checkpoint))
    entry = evaluate(model, processor, data, "vqa", max_new_tokens=2)
    assert entry["num_samples"] == 1 and entry["truncated_questions"] == 1
    assert entry["skipped"] == {"empty_answer": 1, "oversized_image": 1}

    (cut,), count = truncate_questions(processor, [long_question])
    prompt_ids = processor(text=VQA_PROMPT.format(cut))["input_ids"][0]
    assert count == 1 and cut.startswith("what is very") and len(prompt_ids) <= max_prompt_tokens(processor)
    assert truncate_questions(processor, ["what color?"]) == (["what color?"], 0)


def test_zero_shot_templates_are_filled_as_plain_text():
    from hf_vlm.evaluation.ranking import fill_template

    assert fill_template("a photo of a {}.", "cat") == "a photo of a cat."
    assert fill_template("{:>20000000}{}", "cat") == "{:>20000000}cat"  # a format spec stays text
    for bad in ("no placeholder", "{} and {}"):
        with pytest.raises(ValueError, match="exactly once"):
            fill_template(bad, "cat")
