"""`hf-vlm eval --data` reads what training's `--train_data` reads, through the same code: brace patterns, HTTP URLs,
`pipe:` commands, parquet and Hub datasets, with training's skip reasons for every bad member, line and shard."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from test_data_sources import ROOT, _png, decompression_bomb, good_samples, write_shard

from hf_vlm.cli import main
from hf_vlm.data import load_rgb_image
from hf_vlm.evaluation import load_results
from hf_vlm.evaluation.runner import Question, load_eval_data
from hf_vlm.testing import random_image

NUM = 5
CLASSES = ["cat", "dog"]


def _fields(i: int) -> dict:
    """One evaluation row's fields: two captions, two questions (VQAv2 answer dicts for one), a named label."""
    return {"captions": [f"a caption {i}", f"another caption {i}"],
            "questions": [f"what is {i}?", f"is it {i}?"],
            "answers": [["red", "red", "blue"], [{"answer": "yes"}, {"answer": "no"}]],
            "question_types": ["what", "yes/no"], "label": i % 2, "label_name": CLASSES[i % 2]}


def _image(i: int) -> bytes:
    return _png(random_image(16, seed=i))


def _expected_questions() -> list[Question]:
    return [Question(i, q, a, t) for i in range(NUM) for q, a, t in
            ((f"what is {i}?", ["red", "red", "blue"], "what"), (f"is it {i}?", ["yes", "no"], "yes/no"))]


def _check(data, count: int = NUM) -> None:
    assert data.skipped == {}
    assert data.captions == [[f"a caption {i}", f"another caption {i}"] for i in range(count)]
    assert data.questions == _expected_questions()[: 2 * count]
    assert data.labels == [i % 2 for i in range(count)] and data.class_names == CLASSES
    for i, image in enumerate(data.images):  # the pixels training's decoder gives the same file
        assert np.array_equal(np.asarray(image), np.asarray(load_rgb_image(_image(i))))


@pytest.fixture
def shards(tmp_path):
    """The same rows as webdataset shards (`KEY.png` + `KEY.json`), 3 + 2 samples."""
    folder = tmp_path / "shards"
    folder.mkdir()
    samples = [(f"s{i:03d}", {"png": _image(i), "json": json.dumps(_fields(i)).encode()}) for i in range(NUM)]
    write_shard(folder / "shard-000.tar", samples[:3])
    write_shard(folder / "shard-001.tar", samples[3:])
    return folder


def _eval(checkpoint, data: str, output, *extra) -> dict:
    """`hf-vlm eval --data DATA` (caption + VQA, 2 new tokens): its results file."""
    assert main(["eval", str(checkpoint), "--task", "caption", "vqa", "--data", data, "--max-new-tokens", "2",
                 "--device", "cpu", "--output", str(output), *extra]) == 0
    return load_results(output)


@pytest.mark.parametrize("form", ["brace", "http", "pipe", "parquet"])
def test_eval_reads_brace_patterns_http_pipe_commands_and_parquet(form, shards, tmp_path, http_server,
                                                                  blip2_checkpoint):
    import datasets

    if form == "brace":
        spec = f"{shards}/shard-{{000..001}}.tar"
    elif form == "http":  # an https:// address, here plain HTTP on the loopback
        spec = f"{http_server(shards)}/shard-{{000..001}}.tar"
    elif form == "pipe":
        spec = f"pipe:cat {shards}/shard-{{000..001}}.tar"
    else:  # parquet with a ClassLabel feature: the class names come from it
        rows = [_fields(i) for i in range(NUM)]
        columns = {name: [row[name] for row in rows] for name in ("captions", "questions", "question_types", "label")}
        columns["answers"] = [[answers if isinstance(answers[0], str) else [a["answer"] for a in answers]
                               for answers in row["answers"]] for row in rows]
        columns["image"] = [{"bytes": _image(i), "path": f"{i}.png"} for i in range(NUM)]
        spec = str(tmp_path / "eval.parquet")
        features = datasets.Features({"captions": datasets.List(datasets.Value("string")),
                                      "questions": datasets.List(datasets.Value("string")),
                                      "question_types": datasets.List(datasets.Value("string")),
                                      "label": datasets.ClassLabel(names=CLASSES),
                                      "answers": datasets.List(datasets.List(datasets.Value("string"))),
                                      "image": datasets.Image()})
        datasets.Dataset.from_dict(columns, features=features).to_parquet(spec)

    _check(load_eval_data(spec))
    _check(load_eval_data(spec, num_samples=2), count=2)  # read only as far as needed
    results = _eval(blip2_checkpoint, spec, tmp_path / "results.json")
    assert results["caption"]["data"] == spec and results["caption"]["num_samples"] == NUM
    assert results["vqa"]["num_samples"] == 2 * NUM
    assert results["caption"]["skipped"] == results["vqa"]["skipped"] == {}


def test_a_hub_dataset_name_is_loaded_with_datasets_in_its_test_split(monkeypatch):
    """`--data org/name` goes to `datasets.load_dataset` (the Hub is not reachable here: it is answered locally)."""
    import datasets

    def split(rows):
        columns = {"image": [{"bytes": _image(i), "path": None} for i in rows], "caption": [f"c{i}" for i in rows],
                   "label": [i % 2 for i in rows]}
        features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string"),
                                      "label": datasets.ClassLabel(names=CLASSES)})
        return datasets.Dataset.from_dict(columns, features=features).to_iterable_dataset()

    calls = []

    def load_dataset(**kwargs):
        calls.append(kwargs)
        return datasets.IterableDatasetDict({"train": split([0, 1, 2]), "test": split([3, 4])})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    data = load_eval_data("org/name")
    assert calls == [{"path": "org/name", "name": None, "streaming": True}]
    assert data.captions == [["c3"], ["c4"]] and data.labels == [1, 0] and data.class_names == CLASSES
    assert load_eval_data("org/name", split="train").captions == [["c0"], ["c1"], ["c2"]]
    with pytest.raises(ValueError, match="has no split 'validation'; it has: train, test"):
        load_eval_data("org/name", split="validation")


def test_split_folders_weights_and_missing_sources(shards, tmp_path):
    root = tmp_path / "splits"
    for split, count in (("train", 2), ("validation", 3)):
        (root / split).mkdir(parents=True)
        write_shard(root / split / "000.tar", good_samples(split, count))
    with pytest.raises(ValueError, match=r"several splits \(train, validation\) and no 'test'; choose one with --split"):
        load_eval_data(str(root))
    assert load_eval_data(str(root), split="validation").captions == [[f"validation caption {i}"] for i in range(3)]
    with pytest.raises(ValueError, match="has no split 'test'; it has: train, validation"):
        load_eval_data(str(root), split="test")
    with pytest.raises(ValueError, match="names files; --split chooses a split sub-folder"):
        load_eval_data(f"{shards}/*.tar", split="test")
    with pytest.raises(ValueError, match="evaluation reads one source; drop the @WEIGHT"):
        load_eval_data(f"{shards}/*.tar@0.5")
    with pytest.raises(FileNotFoundError, match="nothing matches it.*or use scenes:SPLIT"):
        load_eval_data(f"{tmp_path}/none-{{000..002}}.tar")


# ------------------------------------------------------------------------------------------ bad data

EXPECTED_SKIPS = {  # training's reasons (hf_vlm.data.skips.SKIP_REASONS)
    "corrupt_image": 3,  # zero bytes, not an image, no image member at all
    "oversized_image": 1,  # a decompression bomb
    "bad_text_encoding": 2,  # a non-UTF-8 .txt caption, a non-UTF-8 metadata.jsonl line
    "bad_json": 2,  # an invalid .json member, an invalid metadata.jsonl line
    "truncated_member": 1,  # a shard cut inside its last member: the samples before it are kept
    "unreadable_shard": 2,  # a shard that does not exist, a pipe: command that fails
    "empty_question": 1,
    "empty_answer": 1,
}


@pytest.fixture
def bad_data(tmp_path):
    """Every kind of bad byte the data path meets, around 7 good samples: webdataset shards and an imagefolder."""
    folder = tmp_path / "bad"
    folder.mkdir()
    image = _image(99)
    qa = {"questions": ["", "what color?", "what shape?"], "answers": [["red"], [" "], ["circle"]]}
    write_shard(folder / "000.tar", [
        *good_samples("g", 2),
        ("zero-bytes", {"png": b"", "txt": b"a caption"}),
        ("not-an-image", {"png": b"<html>404</html>", "txt": b"a caption"}),
        ("no-image", {"txt": b"a caption"}),
        ("bomb", {"png": decompression_bomb(), "txt": b"a caption"}),
        ("latin1", {"png": image, "txt": "caf\xe9 au lait".encode("latin-1")}),
        ("badjson", {"png": image, "json": b'{"caption": "unterminated'}),
        ("whitespace", {"png": image, "txt": b" \n\t "}),  # kept: only captioning leaves it out
        ("questions", {"png": image, "json": json.dumps(qa).encode()}),  # 1 good question of 3
        *good_samples("g", 2, start=2),
    ])
    full = write_shard(folder / "001.tar", good_samples("g", 3, start=4)).read_bytes()
    last = full.rindex(b"g006.png")
    (folder / "001.tar").write_bytes(full[: last + 512 + 40])  # cut inside g006's image: g004, g005 kept
    metadata = tmp_path / "metadata"
    metadata.mkdir()
    random_image(16, seed=7).save(metadata / "7.png")
    (metadata / "metadata.jsonl").write_bytes(b'{"file_name": "7.png", "caption": "g caption 7"}\n'
                                              b'{"file_name": "7.png", "caption": "caf\xe9"}\n'
                                              b'{"file_name": "7.png", "caption": \n')
    return folder, metadata


def test_bad_members_lines_and_shards_are_counted_under_trainings_reasons(bad_data, tmp_path, caplog,
                                                                          blip2_checkpoint):
    folder, metadata = bad_data
    with caplog.at_level("WARNING"):
        data = load_eval_data(f"{folder}/{{000..002}}.tar")  # 002.tar does not exist
    failed = load_eval_data(f"pipe:cat {folder}/000.tar > /dev/null; exit 3")
    from_metadata = load_eval_data(str(metadata))
    skipped = {reason: data.skipped.get(reason, 0) + failed.skipped.get(reason, 0) + from_metadata.skipped.get(reason, 0)
               for reason in {*data.skipped, *failed.skipped, *from_metadata.skipped}}
    assert skipped == EXPECTED_SKIPS
    assert failed.images == [] and from_metadata.captions == [["g caption 7"]]
    good = [[f"g caption {i}"] for i in range(6)]
    assert data.captions == good[:2] + [[], []] + good[2:]  # whitespace and the questions sample have no caption
    assert data.questions == [Question(3, "what shape?", ["circle"])]
    for where in ("000.tar:zero-bytes", "000.tar:bomb", "000.tar:latin1", "000.tar:badjson", "001.tar:g006",
                  "002.tar"):
        assert where in caplog.text, where  # the first skips are logged with shard and key

    # hf-vlm eval runs on it: the task counts what it leaves out next to the bad data
    results = _eval(blip2_checkpoint, f"{folder}/{{000..002}}.tar", tmp_path / "results.json")
    assert results["caption"]["num_samples"] == 6 and results["vqa"]["num_samples"] == 1
    assert results["caption"]["skipped"] == {**data.skipped, "empty_caption": 2}
    assert results["vqa"]["skipped"] == data.skipped


def test_csv_labels_may_be_numbers_or_class_names(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(3):
        random_image(16, seed=i).save(folder / f"{i}.png")
    (folder / "metadata.csv").write_text("file_name,caption,label\n0.png,zero,dog\n1.png,one,cat\n2.png,two,dog\n")
    data = load_eval_data(str(folder / "metadata.csv"))
    assert data.class_names == ["cat", "dog"] and data.labels == [1, 0, 1]
    assert load_eval_data(str(folder / "metadata.csv"), class_names=["dog", "cat"]).labels == [0, 1, 0]
    (folder / "metadata.csv").write_text("file_name,caption,label\n0.png,zero,1\n1.png,one,0\n")
    data = load_eval_data(str(folder), class_names=["cat", "dog"])
    assert data.labels == [1, 0] and data.captions == [["zero"], ["one"]]


def test_the_readme_eval_data_forms_load_as_written(tmp_path, monkeypatch, http_server):
    """Each `--data` form of the README's eval paragraph, run from a folder that holds what it names (the https://
    host is a local HTTP server, the Hub dataset answered locally)."""
    import datasets

    readme = (ROOT / "README.md").read_text()
    paragraph = readme[readme.index("`hf-vlm eval CHECKPOINT --data SOURCE`"):].split("\n\n")[0]
    forms = [f.strip('"') for f in re.findall(r'`--data ("[^"]+"|\S+)`', paragraph)]
    assert len(forms) == 6, forms
    monkeypatch.chdir(tmp_path)
    Path("shards").mkdir()
    for i in range(10):
        write_shard(Path(f"shards/{i:03d}.tar"), [(f"k{i}", {"png": _image(i), "txt": f"caption {i}".encode()})])
    Path("folder").mkdir()
    for i in range(10):
        random_image(16, seed=i).save(f"folder/{i}.png")
    Path("folder/metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "caption": f"caption {i}"})
                                                     + "\n" for i in range(10)))
    rows = {"image": [{"bytes": _image(i), "path": None} for i in range(10)], "caption": [f"caption {i}" for i in range(10)]}
    datasets.Dataset.from_dict(rows, features=datasets.Features({"image": datasets.Image(),
                                                                  "caption": datasets.Value("string")})
                               ).to_parquet("eval.parquet")
    load_dataset = datasets.load_dataset
    hub = datasets.Dataset.from_parquet("eval.parquet", cache_dir=str(tmp_path / "cache")).to_iterable_dataset()
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda *args, **kwargs: datasets.IterableDatasetDict({"test": hub})
                        if kwargs.get("path") == "org/name" else load_dataset(*args, **kwargs))
    url = http_server(tmp_path)
    for form in forms:
        data = load_eval_data(form.replace("https://host", url))
        assert data.skipped == {} and data.captions == [[f"caption {i}"] for i in range(10)], form
