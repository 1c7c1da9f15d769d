"""Synthetic scenes: small procedurally drawn images of colored shapes with a caption, question-answer
pairs and a class label, deterministic by seed. The demo trains and evaluates on them (no downloads).

A scene holds 1-3 objects of distinct shapes and distinct colors on a plain gray background. The
first object is the *main* object: always large, the subject of the caption and the class label;
the others are small and lie on one side of it:

    a large red circle
    a large red circle to the left of a small blue square
    a large red circle above a small blue square and a small green triangle

Everything a model must learn is a fixed template over few attributes, so answers are unambiguous
(shapes and colors are unique within a scene, the relation is decided by which half of the image an
object lies in). The class label is "color shape" of the main object (e.g. "red circle"); its
zero-shot prompt, "a large red circle", is exactly the caption of a one-object scene.

Splits draw scene seeds from disjoint integer ranges (`scene_seed`). Scenes are exposed as a
`datasets.Dataset` / `IterableDataset` and exported as webdataset tar shards or as an imagefolder
with metadata.jsonl, which the training data pipeline reads like any other corpus.
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "validation", "test")
# One block of 10**9 consecutive seeds per (base seed, split): the splits never share a scene seed.
SEEDS_PER_SPLIT = 10**9

DEFAULT_SHAPES = ("circle", "square", "triangle")
DEFAULT_COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 230),
    "yellow": (235, 205, 30),
}
# Where the main object lies relative to the others -> the caption's phrase and the position answer.
RELATIONS = {"left": "to the left of", "right": "to the right of", "top": "above", "bottom": "below"}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
ZERO_SHOT_TEMPLATE = "a large {}"
QUESTION_TYPES = ("color", "shape", "count", "position", "yes/no")


@dataclass(frozen=True)
class SceneConfig:
    """What scenes may contain. Radii are fractions of the image size (half the object's extent)."""

    image_size: int = 32
    min_objects: int = 1
    max_objects: int = 3
    shapes: tuple[str, ...] = DEFAULT_SHAPES
    colors: dict[str, tuple[int, int, int]] = field(default_factory=lambda: dict(DEFAULT_COLORS))
    large_radius: float = 0.18
    small_radius: float = 0.11
    # Background: a plain gray level drawn from this range (never one of the saturated shape colors).
    background_range: tuple[int, int] = (30, 225)

    def __post_init__(self):
        unknown = set(self.shapes) - set(_DRAW)
        if unknown:
            raise ValueError(f"SceneConfig.shapes: unknown shape(s) {sorted(unknown)}; known: {sorted(_DRAW)}")
        if not 1 <= self.min_objects <= self.max_objects <= 3:
            raise ValueError(f"SceneConfig: need 1 <= min_objects <= max_objects <= 3, got "
                             f"{self.min_objects}..{self.max_objects}")
        if self.max_objects > min(len(self.shapes), len(self.colors)):
            raise ValueError("SceneConfig: max_objects exceeds the number of shapes or colors "
                             "(objects in a scene have distinct shapes and colors)")
        if self.image_size < 16:
            raise ValueError(f"SceneConfig.image_size must be >= 16 pixels, got {self.image_size}")
        for name, rgb in self.colors.items():
            if len(set(rgb)) == 1:
                raise ValueError(f"SceneConfig.colors[{name!r}] = {rgb} is a gray; it would not stand out "
                                 "from the gray backgrounds")

    def class_names(self) -> list[str]:
        """Zero-shot classes: "color shape" of the main object, e.g. "red circle"."""
        return [f"{color} {shape}" for color in self.colors for shape in self.shapes]


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str  # "large" (the main object) or "small"
    center: tuple[float, float]  # (x, y) in pixels
    radius: float  # half the side of the object's bounding box, in pixels

    @property
    def name(self) -> str:
        return f"{self.size} {self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    seed: int
    image_size: int
    background: tuple[int, int, int]
    objects: tuple[SceneObject, ...]  # objects[0] is the main object
    relation: str | None  # where the main object lies relative to the others; None for one object
    negative: tuple[str, str]  # (color, shape) absent from the scene, for the "no" question

    @property
    def main(self) -> SceneObject:
        return self.objects[0]

    @property
    def label_name(self) -> str:
        return f"{self.main.color} {self.main.shape}"

    @property
    def caption(self) -> str:
        text = f"a {self.main.name}"
        if self.relation is not None:
            others = " and ".join(f"a {obj.name}" for obj in self.objects[1:])
            text += f" {RELATIONS[self.relation]} {others}"
        return text

    def questions(self) -> list[tuple[str, str, str]]:
        """(question, answer, question type) pairs, in a fixed order."""
        qa = []
        for obj in self.objects:
            qa.append((f"what color is the {obj.shape}?", obj.color, "color"))
        for obj in self.objects:
            qa.append((f"what shape is the {obj.color} object?", obj.shape, "shape"))
        qa.append(("how many shapes are there?", NUMBER_WORDS[len(self.objects)], "count"))
        if self.relation is not None:
            qa.append((f"where is the {self.main.color} {self.main.shape}?", self.relation, "position"))
        present = self.objects[self.seed % len(self.objects)]
        qa.append((f"is there a {present.color} {present.shape}?", "yes", "yes/no"))
        qa.append((f"is there a {self.negative[0]} {self.negative[1]}?", "no", "yes/no"))
        return qa

    def render(self, colors: dict[str, tuple[int, int, int]] | None = None):
        """The scene as an RGB PIL image; no anti-aliasing, so every shape pixel has its exact color."""
        from PIL import Image, ImageDraw

        colors = colors or DEFAULT_COLORS
        image = Image.new("RGB", (self.image_size, self.image_size), self.background)
        draw = ImageDraw.Draw(image)
        for obj in self.objects:
            _DRAW[obj.shape](draw, obj.center, obj.radius, colors[obj.color])
        return image


def _circle(draw, center, r, fill):
    x, y = center
    draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)


def _square(draw, center, r, fill):
    x, y = center
    draw.rectangle([round(x - r), round(y - r), round(x + r), round(y + r)], fill=fill)


def _triangle(draw, center, r, fill):
    x, y = center  # pointing up, base at the bottom of the bounding box
    draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)


def _diamond(draw, center, r, fill):
    x, y = center
    draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)


_DRAW = {"circle": _circle, "square": _square, "triangle": _triangle, "diamond": _diamond}


def scene_seed(split: str, index: int, seed: int = 0) -> int:
    """The seed of scene `index` of `split`: each (seed, split) pair owns its own block of integers."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if not 0 <= index < SEEDS_PER_SPLIT:
        raise ValueError(f"scene index must be in [0, {SEEDS_PER_SPLIT}), got {index}")
    return (seed * len(SPLITS) + SPLITS.index(split)) * SEEDS_PER_SPLIT + index


def _place(rng: random.Random, box: tuple[float, float, float, float], radius: float) -> tuple[float, float]:
    """A center that keeps a circle/square of `radius` (plus a one-pixel margin) inside `box`."""
    x0, y0, x1, y1 = box
    margin = radius + 1.0
    return (rng.uniform(x0 + margin, x1 - margin), rng.uniform(y0 + margin, y1 - margin))


def sample_scene(seed: int, config: SceneConfig | None = None) -> Scene:
    """The scene of `seed`: same seed and config, same scene (and the same pixels)."""
    config = config or SceneConfig()
    rng = random.Random(seed)
    size = config.image_size
    count = rng.randint(config.min_objects, config.max_objects)
    shapes = rng.sample(list(config.shapes), count)
    colors = rng.sample(list(config.colors), count)
    gray = rng.randint(*config.background_range)
    large, small = config.large_radius * size, config.small_radius * size

    if count == 1:
        relation = None
        centers = [_place(rng, (0, 0, size, size), large)]
    else:
        relation = rng.choice(list(RELATIONS))
        half = size / 2
        halves = {"left": (0, 0, half, size), "right": (half, 0, size, size),
                  "top": (0, 0, size, half), "bottom": (0, half, size, size)}
        opposite = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
        # The main object lies in its half of the image; the others share the opposite half, in slots
        # ordered top to bottom (left/right relations) or left to right (above/below relations).
        main_box = halves[relation]
        x0, y0, x1, y1 = halves[opposite[relation]]
        slots = count - 1
        if relation in ("left", "right"):
            step = (y1 - y0) / slots
            boxes = [(x0, y0 + i * step, x1, y0 + (i + 1) * step) for i in range(slots)]
        else:
            step = (x1 - x0) / slots
            boxes = [(x0 + i * step, y0, x0 + (i + 1) * step, y1) for i in range(slots)]
        centers = [_place(rng, main_box, large)] + [_place(rng, box, small) for box in boxes]

    objects = tuple(
        SceneObject(shape=shape, color=color, size="large" if i == 0 else "small", center=center,
                    radius=large if i == 0 else small)
        for i, (shape, color, center) in enumerate(zip(shapes, colors, centers))
    )
    absent = [(c, s) for c in config.colors for s in config.shapes if (c, s) not in {(o.color, o.shape) for o in objects}]
    return Scene(seed=seed, image_size=size, background=(gray, gray, gray), objects=objects,
                 relation=relation, negative=rng.choice(absent))


def scene_record(scene: Scene, config: SceneConfig | None = None, *, image=True) -> dict:
    """One dataset row: image, caption, questions/answers/question_types, label and the scene's facts."""
    config = config or SceneConfig()
    qa = scene.questions()
    record = {
        "caption": scene.caption,
        "questions": [q for q, _, _ in qa],
        "answers": [a for _, a, _ in qa],
        "question_types": [t for _, _, t in qa],
        "label": config.class_names().index(scene.label_name),
        "label_name": scene.label_name,
        "seed": scene.seed,
        "objects": [
            {"shape": o.shape, "color": o.color, "size": o.size, "center": list(o.center), "radius": o.radius}
            for o in scene.objects
        ],
    }
    if image:
        record = {"image": scene.render(config.colors), **record}
    return record


def generate_scenes(split: str = "train", num_samples: int = 1000, *, seed: int = 0,
                    config: SceneConfig | None = None, start: int = 0) -> Iterator[dict]:
    """Rows of scenes `start .. start + num_samples - 1` of `split` (a generator: nothing is cached)."""
    config = config or SceneConfig()
    for index in range(start, start + num_samples):
        yield scene_record(sample_scene(scene_seed(split, index, seed), config), config)


def scene_features(config: SceneConfig | None = None):
    """The `datasets.Features` of scene rows (the label is a ClassLabel over `config.class_names()`)."""
    import datasets

    config = config or SceneConfig()
    strings = datasets.List(datasets.Value("string"))
    return datasets.Features({
        "image": datasets.Image(),
        "caption": datasets.Value("string"),
        "questions": strings,
        "answers": strings,
        "question_types": strings,
        "label": datasets.ClassLabel(names=config.class_names()),
        "label_name": datasets.Value("string"),
        "seed": datasets.Value("int64"),
        "objects": datasets.List({
            "shape": datasets.Value("string"),
            "color": datasets.Value("string"),
            "size": datasets.Value("string"),
            "center": datasets.List(datasets.Value("float64")),
            "radius": datasets.Value("float64"),
        }),
    })


def scenes_dataset(split: str = "train", num_samples: int = 1000, *, seed: int = 0,
                   config: SceneConfig | None = None, progress: bool = True):
    """An in-memory `datasets.Dataset` of `num_samples` scenes of `split` (images stored as PNG)."""
    import datasets
    from tqdm.auto import tqdm

    config = config or SceneConfig()
    rows = []
    for row in tqdm(generate_scenes(split, num_samples, seed=seed, config=config), total=num_samples,
                    desc=f"scenes:{split}", unit="img", disable=not progress):
        # Encoding the PNG here is ~20x faster than letting `datasets` encode the PIL image.
        rows.append({**row, "image": {"bytes": _image_bytes(row["image"], "png"), "path": None}})
    return datasets.Dataset.from_list(rows, features=scene_features(config), split=split)


def scenes_iterable_dataset(split: str = "train", num_samples: int = 1000, *, seed: int = 0,
                            config: SceneConfig | None = None):
    """A streaming `datasets.IterableDataset` of the same rows as `scenes_dataset` (drawn on the fly)."""
    import datasets

    config = config or SceneConfig()
    return datasets.IterableDataset.from_generator(
        generate_scenes, features=scene_features(config),
        gen_kwargs={"split": split, "num_samples": num_samples, "seed": seed, "config": config},
    )


def with_subject_captions(rows: Iterable[dict], fraction: float, *, seed: int = 0) -> Iterator[dict]:
    """Rows where a `fraction` of the multi-object scenes are captioned by their main object alone ("a large red
    circle"), chosen by scene seed; the scene's full caption stays under "full_caption".

    Web alt-texts vary in detail: many name only the subject. Scene captions never do, so a contrastive model
    trained on them embeds "a large red circle" as the caption of one-object scenes only, and zero-shot prompts
    miss the main object of every other scene. Captioning still learns the full caption (it follows with
    probability 1 - fraction after the main object) and the evaluation references stay the full captions."""
    if not 0.0 <= fraction < 0.5:
        raise ValueError(f"fraction must be in [0, 0.5) so that the full caption stays the likelier one, got {fraction}")
    for row in rows:
        if len(row["objects"]) > 1 and random.Random(f"{seed}-{row['seed']}").random() < fraction:
            row = {**row, "caption": f"a {SceneObject(**row['objects'][0]).name}", "full_caption": row["caption"]}
        yield row


def vqa_rows(rows: Iterable[dict], *, per_type: int | None = None, type_weights: dict[str, float] | None = None,
             seed: int = 0) -> Iterator[dict]:
    """One row per question: image, question, answers (a one-element list, VQAv2's layout), question_type,
    seed. The layout VQA fine-tuning and `hf_vlm.data` (task "vqa") read.

    `per_type`: at most that many questions of each type per scene, drawn by scene seed (None: all). A scene asks
    one count and at most one position question but a colour and a shape question per object; one of each type
    gives every type the same share of a scene's questions.

    `type_weights`: how often each kept question of a type is asked, relative to once, as multi-task training weighs
    its sources: 0.2 keeps a fifth of them (which ones, by scene seed), 2.0 asks each twice. Unnamed types: 1."""
    weights = dict(type_weights or {})
    unknown = set(weights) - set(QUESTION_TYPES)
    if unknown:
        raise ValueError(f"type_weights: unknown question type(s) {sorted(unknown)}; known: {list(QUESTION_TYPES)}")
    negative = {kind: w for kind, w in weights.items() if not w >= 0}
    if negative:
        raise ValueError(f"type_weights must be >= 0, got {negative}")
    for row in rows:
        qa = list(zip(row["questions"], row["answers"], row["question_types"]))
        if per_type is not None:
            rng = random.Random(f"{seed}-{row['seed']}-questions")
            kept = set()
            for kind in dict.fromkeys(row["question_types"]):
                of_kind = [i for i, (_, _, t) in enumerate(qa) if t == kind]
                kept.update(rng.sample(of_kind, min(per_type, len(of_kind))))
            qa = [pair for i, pair in enumerate(qa) if i in kept]
        for question, answer, kind in qa:
            weight = weights.get(kind, 1.0)
            copies, fraction = int(weight), weight - int(weight)
            if fraction:  # one more copy with the fractional part's probability, drawn by scene and question
                copies += random.Random(f"{seed}-{row['seed']}-{question}").random() < fraction
            for _ in range(copies):
                yield {"image": row["image"], "question": question, "answers": [answer], "question_type": kind,
                       "seed": row["seed"]}


def scenes_vqa_dataset(split: str = "train", num_samples: int = 1000, *, seed: int = 0,
                       config: SceneConfig | None = None):
    """An in-memory `datasets.Dataset` with one row per question of `num_samples` scenes."""
    import datasets

    config = config or SceneConfig()
    rows = [{**row, "image": {"bytes": _image_bytes(row["image"], "png"), "path": None}}
            for row in vqa_rows(generate_scenes(split, num_samples, seed=seed, config=config))]
    features = datasets.Features({
        "image": datasets.Image(), "question": datasets.Value("string"),
        "answers": datasets.List(datasets.Value("string")), "question_type": datasets.Value("string"),
        "seed": datasets.Value("int64"),
    })
    return datasets.Dataset.from_list(rows, features=features, split=split)


def zero_shot_prompts(config: SceneConfig | None = None) -> list[str]:
    """One text per class of `config.class_names()`, phrased as the captions phrase it."""
    config = config or SceneConfig()
    return [ZERO_SHOT_TEMPLATE.format(name) for name in config.class_names()]


# ----------------------------------------------------------------------------------------- export

def _image_bytes(image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format={"png": "PNG", "jpg": "JPEG"}[image_format],
               **({"quality": 95} if image_format == "jpg" else {}))
    return buffer.getvalue()


def _metadata(row: dict) -> dict:
    """The JSON facts of a row: everything but the image (a scene row's QA also as a list of pairs)."""
    meta = {key: value for key, value in row.items() if key != "image"}
    if "questions" in row:
        meta["qa"] = [{"question": q, "answer": a, "question_type": t}
                      for q, a, t in zip(row["questions"], row["answers"], row["question_types"])]
    return meta


def _check_format(image_format: str) -> None:
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")


def export_webdataset(rows: Iterable[dict], output_dir: str | Path, *, samples_per_shard: int = 1000,
                      image_format: str = "png", prefix: str = "scenes") -> list[Path]:
    """Write rows as webdataset tar shards `{prefix}-000000.tar`, ...: per sample `KEY.png` (or .jpg),
    `KEY.txt` (the caption, when the rows have one) and `KEY.json` (every other field: caption, qa,
    label, objects; or question, answers for `vqa_rows`). Each shard is written to a temporary name
    and renamed when complete. Returns the shard paths."""
    _check_format(image_format)
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    shards: list[Path] = []
    tar = None

    def close():
        tar.close()
        os.replace(shards[-1].with_suffix(".tar.tmp"), shards[-1])

    def add(name: str, data: bytes):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0  # reproducible shards
        tar.addfile(info, io.BytesIO(data))

    for index, row in enumerate(rows):
        if index % samples_per_shard == 0:
            if tar is not None:
                close()
            shards.append(output_dir / f"{prefix}-{len(shards):06d}.tar")
            tar = tarfile.open(shards[-1].with_suffix(".tar.tmp"), "w")
        key = f"{index:09d}"
        add(f"{key}.{image_format}", _image_bytes(row["image"], image_format))
        if "caption" in row:
            add(f"{key}.txt", row["caption"].encode())
        add(f"{key}.json", json.dumps(_metadata(row)).encode())
    if tar is not None:
        close()
    return shards


def export_imagefolder(rows: Iterable[dict], output_dir: str | Path, *, image_format: str = "png") -> Path:
    """Write rows as an imagefolder: `output_dir/KEY.png` plus `metadata.jsonl` (file_name, caption,
    questions, answers, question_types, label, ...), which `load_dataset("imagefolder", data_dir=...)`
    reads. metadata.jsonl is written last and atomically: its presence means the folder is complete."""
    _check_format(image_format)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, row in enumerate(rows):
        file_name = f"{index:09d}.{image_format}"
        (output_dir / file_name).write_bytes(_image_bytes(row["image"], image_format))
        meta = _metadata(row)
        meta.pop("qa", None)  # the parallel lists already hold it, as columns
        lines.append(json.dumps({"file_name": file_name, **meta}))
    tmp = output_dir / "metadata.jsonl.tmp"
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, output_dir / "metadata.jsonl")
    return output_dir / "metadata.jsonl"


def export_scenes(output_dir: str | Path, num_samples: dict[str, int], *, layout: str = "caption",
                  format: str = "webdataset", seed: int = 0, config: SceneConfig | None = None,
                  samples_per_shard: int = 1000) -> dict[str, Path]:
    """Write each split of `num_samples` ({"train": 5000, "test": 200, ...}) to `output_dir/SPLIT/`, as
    webdataset shards or an imagefolder; `layout` "caption" gives one row per scene, "vqa" one row per
    question. Returns {split: folder}. Shows a progress bar per split."""
    from tqdm.auto import tqdm

    if layout not in ("caption", "vqa"):
        raise ValueError(f"layout must be 'caption' or 'vqa', got {layout!r}")
    if format not in ("webdataset", "imagefolder"):
        raise ValueError(f"format must be 'webdataset' or 'imagefolder', got {format!r}")
    folders = {}
    for split, count in num_samples.items():
        rows = tqdm(generate_scenes(split, count, seed=seed, config=config), total=count,
                    desc=f"scenes:{split} -> {format}", unit="img")
        if layout == "vqa":
            rows = vqa_rows(rows)
        folder = Path(output_dir) / split
        if format == "webdataset":
            export_webdataset(rows, folder, samples_per_shard=samples_per_shard)
        else:
            export_imagefolder(rows, folder)
        folders[split] = folder
    return folders
