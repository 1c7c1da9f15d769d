"""Synthetic scenes: deterministic by seed, disjoint splits, and every caption, answer and label
right by the pixels (read back from the rendered image, not from the generator's own metadata);
the webdataset and imagefolder exports read back with tarfile/json/PIL and with `datasets`."""

import io
import json
import re
import tarfile
from collections import deque

import numpy as np
import pytest
from PIL import Image

from hf_vlm.scenes import (
    DEFAULT_COLORS,
    SPLITS,
    SceneConfig,
    export_imagefolder,
    export_scenes,
    export_webdataset,
    generate_scenes,
    sample_scene,
    scene_seed,
    scenes_dataset,
    scenes_iterable_dataset,
    vqa_rows,
    zero_shot_prompts,
)

NUMBERS = {"one": 1, "two": 2, "three": 3}


# ------------------------------------------------------------------ reading a scene from its pixels

def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, each as an array of (y, x) pixels."""
    seen = np.zeros_like(mask)
    found = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        queue, pixels = deque([start]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        found.append(np.array(pixels))
    return found


def classify_shape(pixels: np.ndarray) -> str:
    """By how much of its bounding box a shape fills: square ~1, circle ~pi/4, triangle ~1/2."""
    height = np.ptp(pixels[:, 0]) + 1
    width = np.ptp(pixels[:, 1]) + 1
    fill = len(pixels) / (height * width)
    if fill > 0.95:
        return "square"
    if fill > 0.7:
        return "circle"
    top, bottom = pixels[:, 0].min(), pixels[:, 0].max()
    top_width = (pixels[:, 0] == top).sum()
    bottom_width = (pixels[:, 0] == bottom).sum()
    assert top_width < bottom_width, "a triangle points up"
    return "triangle"


def read_objects(image: Image.Image) -> list[dict]:
    """The objects visible in `image`: one per palette color, each a single connected blob, largest first."""
    pixels = np.asarray(image.convert("RGB"))
    background = pixels[0, 0]
    assert len(set(background.tolist())) == 1, "the background is gray"
    painted = ~(pixels == background).all(-1)
    objects, covered = [], np.zeros_like(painted)
    for color, rgb in DEFAULT_COLORS.items():
        mask = (pixels == np.array(rgb)).all(-1)
        if not mask.any():
            continue
        blobs = components(mask)
        assert len(blobs) == 1, f"the {color} object is one connected shape"
        covered |= mask
        blob = blobs[0]
        objects.append({"color": color, "shape": classify_shape(blob), "area": len(blob),
                        "y": blob[:, 0].mean(), "x": blob[:, 1].mean()})
    assert (covered == painted).all(), "every non-background pixel belongs to an object of a palette color"
    return sorted(objects, key=lambda o: -o["area"])


def position(obj: dict, size: int) -> set[str]:
    """The image halves an object's center lies in."""
    return {"left" if obj["x"] < size / 2 else "right", "top" if obj["y"] < size / 2 else "bottom"}


CAPTION = re.compile(
    r"^a large (?P<color>\w+) (?P<shape>\w+)"
    r"(?: (?P<relation>to the left of|to the right of|above|below) a small (?P<color2>\w+) (?P<shape2>\w+)"
    r"(?: and a small (?P<color3>\w+) (?P<shape3>\w+))?)?$"
)
RELATION_SIDE = {"to the left of": "left", "to the right of": "right", "above": "top", "below": "bottom"}


def check_row_against_pixels(row: dict, size: int, class_names: list[str]) -> None:
    objects = read_objects(row["image"])
    main, others = objects[0], objects[1:]
    by_color = {o["color"]: o for o in objects}
    assert all(o["area"] < main["area"] for o in others), "the main object is the only large one"

    # Caption: grammar, attributes and layout.
    match = CAPTION.match(row["caption"])
    assert match, f"caption {row['caption']!r} follows the grammar"
    named = [(match[f"color{i}"], match[f"shape{i}"]) for i in ("", "2", "3") if match[f"color{i}"]]
    assert [(o["color"], o["shape"]) for o in [main]] == named[:1]
    assert sorted((o["color"], o["shape"]) for o in others) == sorted(named[1:])
    if others:
        side = RELATION_SIDE[match["relation"]]
        opposite = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}[side]
        assert side in position(main, size) and all(opposite in position(o, size) for o in others)
        if len(others) == 2:  # the two small objects are named top to bottom, or left to right
            axis = "y" if side in ("left", "right") else "x"
            first, second = by_color[named[1][0]], by_color[named[2][0]]
            assert first[axis] < second[axis]

    # Every answer, recomputed from the pixels.
    for question, answer in zip(row["questions"], row["answers"]):
        if m := re.fullmatch(r"what color is the (\w+)\?", question):
            expected = next(o["color"] for o in objects if o["shape"] == m[1])
        elif m := re.fullmatch(r"what shape is the (\w+) object\?", question):
            expected = by_color[m[1]]["shape"]
        elif question == "how many shapes are there?":
            expected = {1: "one", 2: "two", 3: "three"}[len(objects)]
        elif m := re.fullmatch(r"where is the (\w+) (\w+)\?", question):
            obj = by_color[m[1]]
            assert obj["shape"] == m[2]
            assert answer in position(obj, size)
            expected = answer
        elif m := re.fullmatch(r"is there a (\w+) (\w+)\?", question):
            expected = "yes" if any((o["color"], o["shape"]) == (m[1], m[2]) for o in objects) else "no"
        else:
            raise AssertionError(f"unexpected question {question!r}")
        assert answer == expected, f"{question} -> {answer!r}, the pixels say {expected!r}"

    assert class_names[row["label"]] == f"{main['color']} {main['shape']}" == row["label_name"]


# ------------------------------------------------------------------------------------------ tests

@pytest.mark.parametrize("image_size", [32, 64])
def test_captions_answers_and_labels_match_the_pixels(image_size):
    config = SceneConfig(image_size=image_size)
    counts, kinds = {1: 0, 2: 0, 3: 0}, set()
    for split in SPLITS:
        for row in generate_scenes(split, 150, config=config):
            assert row["image"].size == (image_size, image_size)
            check_row_against_pixels(row, image_size, config.class_names())
            counts[len(row["objects"])] += 1
            kinds.update(row["question_types"])
    assert all(n > 50 for n in counts.values()), f"1, 2 and 3 objects all occur: {counts}"
    assert kinds == {"color", "shape", "count", "position", "yes/no"}


def test_answers_are_balanced_enough_that_the_question_alone_does_not_give_them_away():
    answers = {}
    for row in generate_scenes("train", 600):
        for question, answer in zip(row["questions"], row["answers"]):
            key = re.sub(r"\b(red|green|blue|yellow|circle|square|triangle)\b", "X", question)
            answers.setdefault(key, []).append(answer)
    for key, values in answers.items():
        most_common = max(values.count(v) for v in set(values)) / len(values)
        assert most_common < 0.55, f"{key!r}: one answer covers {most_common:.0%}"


def test_same_seed_same_scene_and_pixels():
    first = list(generate_scenes("validation", 20, seed=3))
    again = list(generate_scenes("validation", 20, seed=3))
    for a, b in zip(first, again):
        assert a["image"].tobytes() == b["image"].tobytes()
        assert {k: v for k, v in a.items() if k != "image"} == {k: v for k, v in b.items() if k != "image"}
    other_seed = list(generate_scenes("validation", 20, seed=4))
    assert [r["caption"] for r in other_seed] != [r["caption"] for r in first]
    # `start` resumes the same sequence: scene i does not depend on the scenes before it.
    assert [r["seed"] for r in generate_scenes("validation", 5, seed=3, start=15)] == [r["seed"] for r in first[15:]]


def test_splits_draw_from_disjoint_seed_ranges():
    seeds = {split: {scene_seed(split, i, seed) for seed in range(3) for i in (0, 1, 10**9 - 1)} for split in SPLITS}
    assert not (seeds["train"] & seeds["validation"] or seeds["train"] & seeds["test"]
                or seeds["validation"] & seeds["test"])
    images = {split: {r["image"].tobytes() for r in generate_scenes(split, 200)} for split in SPLITS}
    assert not (images["train"] & images["test"]) and not (images["validation"] & images["test"])
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        scene_seed("dev", 0)
    with pytest.raises(ValueError, match="scene index"):
        scene_seed("train", 10**9)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="shapes.*hexagon"):
        SceneConfig(shapes=("circle", "hexagon"))
    with pytest.raises(ValueError, match="max_objects"):
        SceneConfig(shapes=("circle", "square"), max_objects=3)
    with pytest.raises(ValueError, match=r"colors\['gray'\]"):
        SceneConfig(colors={"gray": (9, 9, 9), "red": (200, 0, 0), "blue": (0, 0, 200)})
    # A one-object configuration with another palette renders the colors it names.
    config = SceneConfig(max_objects=1, colors={"purple": (130, 40, 200), "orange": (250, 140, 20)},
                         shapes=("diamond", "circle"))
    scene = sample_scene(7, config)
    pixels = np.asarray(scene.render(config.colors))
    assert (pixels == np.array(config.colors[scene.main.color])).all(-1).sum() > 20


def test_datasets_expose_the_same_rows_with_class_labels_and_prompts():
    dataset = scenes_dataset("test", 12, progress=False)
    rows = list(generate_scenes("test", 12))
    names = dataset.features["label"].names
    assert names == SceneConfig().class_names() and len(names) == 12
    assert [zero_shot_prompts()[i] for i in dataset["label"]] == [f"a large {r['label_name']}" for r in rows]
    for got, expected in zip(dataset, rows):
        assert np.array_equal(np.asarray(got["image"]), np.asarray(expected["image"]))
        assert got["caption"] == expected["caption"] and got["answers"] == expected["answers"]
    streamed = list(scenes_iterable_dataset("test", 12))
    assert [r["caption"] for r in streamed] == dataset["caption"]
    flat = list(vqa_rows(rows))
    assert len(flat) == sum(len(r["questions"]) for r in rows)
    assert set(flat[0]) == {"image", "question", "answers", "question_type", "seed"}
    assert [(r["question"], r["answers"]) for r in flat[:len(rows[0]["questions"])]] == [
        (q, [a]) for q, a in zip(rows[0]["questions"], rows[0]["answers"])]
    # Every zero-shot prompt is itself a caption the models are trained on (a one-object scene).
    captions = {r["caption"] for r in generate_scenes("train", 400)}
    assert set(zero_shot_prompts()) <= captions


def test_vqa_rows_can_keep_one_question_of_each_type_per_scene():
    """per_type=1: every question type present in a scene is asked once (the colour and shape question about a
    different object from scene to scene, "yes" and "no" both kept overall), the same ones on every call."""
    from collections import Counter

    rows = list(generate_scenes("train", 300))
    kept = list(vqa_rows(rows, per_type=1))
    by_scene = {}
    for row in kept:
        by_scene.setdefault(row["seed"], []).append(row["question_type"])
    for row in rows:
        assert sorted(by_scene[row["seed"]]) == sorted(set(row["question_types"])), row["seed"]
    pairs = {(r["question"], r["answers"][0]) for r in kept}
    assert pairs <= {(q, a) for r in rows for q, a in zip(r["questions"], r["answers"])}
    kinds = Counter(r["question_type"] for r in kept)
    assert kinds["color"] == kinds["shape"] == kinds["count"] == kinds["yes/no"] == 300 and 0 < kinds["position"] < 300
    answers = Counter(r["answers"][0] for r in kept if r["question_type"] == "yes/no")
    assert min(answers["yes"], answers["no"]) > 100, answers
    main_shape = {row["seed"]: row["objects"][0]["shape"] for row in rows}
    about_small = [r for r in kept if r["question_type"] == "color" and r["question"] != f"what color is the {main_shape[r['seed']]}?"]
    assert len(about_small) > 50  # not always the main object
    assert [(r["seed"], r["question"]) for r in vqa_rows(rows, per_type=1)] == [(r["seed"], r["question"]) for r in kept]


def test_vqa_rows_type_weights_set_the_question_mix():
    """type_weights: 2.0 asks each question of a type twice, 0.2 keeps about a fifth (the same ones on every call),
    unnamed types once; unknown types and negative weights are refused by name."""
    from collections import Counter

    rows = list(generate_scenes("train", 300))
    weights = {"count": 0.2, "position": 2.0}
    once = Counter(r["question_type"] for r in vqa_rows(rows, per_type=1))
    mixed = [(r["seed"], r["question"], r["question_type"]) for r in vqa_rows(rows, per_type=1, type_weights=weights)]
    kinds = Counter(kind for _, _, kind in mixed)
    assert kinds["position"] == 2 * once["position"]
    assert all(kinds[kind] == once[kind] for kind in ("color", "shape", "yes/no"))
    assert 30 <= kinds["count"] <= 90, kinds  # a fifth of 300, drawn
    again = [(r["seed"], r["question"], r["question_type"]) for r in vqa_rows(rows, per_type=1, type_weights=weights)]
    assert again == mixed
    with pytest.raises(ValueError, match="'colour'"):
        list(vqa_rows(rows, type_weights={"colour": 2.0}))
    with pytest.raises(ValueError, match=">= 0"):
        list(vqa_rows(rows, type_weights={"count": -1.0}))


def test_webdataset_shards_read_back(tmp_path):
    rows = list(generate_scenes("train", 7))
    shards = export_webdataset(rows, tmp_path / "wds", samples_per_shard=3)
    assert [p.name for p in shards] == ["scenes-000000.tar", "scenes-000001.tar", "scenes-000002.tar"]
    assert not list((tmp_path / "wds").glob("*.tmp"))
    members = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                members[member.name] = tar.extractfile(member).read()
    assert len(members) == 3 * len(rows)
    for index, row in enumerate(rows):
        key = f"{index:09d}"
        image = Image.open(io.BytesIO(members[f"{key}.png"]))
        assert np.array_equal(np.asarray(image), np.asarray(row["image"]))
        assert members[f"{key}.txt"].decode() == row["caption"]
        meta = json.loads(members[f"{key}.json"])
        assert meta["label"] == row["label"] and meta["caption"] == row["caption"]
        assert [(qa["question"], qa["answer"]) for qa in meta["qa"]] == list(zip(row["questions"], row["answers"]))

    import datasets

    loaded = datasets.load_dataset("webdataset", data_files={"train": [str(p) for p in shards]}, split="train")
    assert loaded["txt"] == [r["caption"] for r in rows]
    assert np.array_equal(np.asarray(loaded[0]["png"]), np.asarray(rows[0]["image"]))


def test_imagefolder_reads_back_with_datasets(tmp_path):
    rows = list(generate_scenes("validation", 5))
    metadata = export_imagefolder(rows, tmp_path / "folder", image_format="jpg")
    lines = [json.loads(line) for line in metadata.read_text().splitlines()]
    assert [line["caption"] for line in lines] == [r["caption"] for r in rows]
    first = Image.open(tmp_path / "folder" / lines[0]["file_name"])
    assert first.size == rows[0]["image"].size and first.format == "JPEG"

    import datasets

    loaded = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "folder"), split="train")
    assert loaded["caption"] == [r["caption"] for r in rows]
    assert loaded["answers"] == [r["answers"] for r in rows]
    with pytest.raises(ValueError, match="image_format"):
        export_imagefolder(rows, tmp_path / "bad", image_format="gif")


def test_the_training_data_pipeline_reads_the_exports_like_any_corpus(tmp_path):
    from hf_vlm.data import load_source

    folders = export_scenes(tmp_path / "caption", {"train": 5}, format="webdataset")
    captions = load_source(str(folders["train"]), task="caption")
    assert captions["text"] == [r["caption"] for r in generate_scenes("train", 5)]

    folders = export_scenes(tmp_path / "vqa", {"test": 3}, layout="vqa", format="imagefolder")
    questions = load_source(str(folders["test"]), task="vqa")
    expected = list(vqa_rows(generate_scenes("test", 3)))
    assert questions["question"] == [r["question"] for r in expected]
    assert questions["answers"] == [r["answers"] for r in expected]
    with pytest.raises(ValueError, match="layout must be"):
        export_scenes(tmp_path / "x", {"test": 1}, layout="detection")
