"""The data pipeline: real image files in each source format flow through loading, mixing, decoding,
transforms and collation; bad samples are skipped and counted (also inside DataLoader workers)."""

import io
import json
import logging
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from hf_vlm.data import (
    CLIP_MEAN,
    CLIP_STD,
    IGNORE_INDEX,
    SKIP_REASONS,
    ImageTextCollator,
    ImageTextSource,
    PreparedDataset,
    SkipCounter,
    build_image_transform,
    build_training_data,
    image_transform_from_processor,
    load_image_text_dataset,
    load_rgb_image,
    prepare_dataset,
)
from hf_vlm.testing import random_image

IMAGE_SIZE = 32  # small crops keep the tests fast; the recipes' default is 224


def _encode(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _corpus():
    """(key, image bytes, caption) of a small corpus with every kind of bad and unusual sample.

    Good: 6 RGB JPEGs, an RGBA PNG, a grayscale JPEG, a CMYK JPEG, a palette PNG.
    Bad: random bytes, a truncated JPEG (corrupt_image); an empty and a whitespace caption (empty_caption).
    """
    rng = np.random.default_rng(0)
    good_jpeg = _encode(random_image(48, seed=1))
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 0))  # fully transparent: composited onto white
    samples = [
        (f"rgb{i}", _encode(random_image(48, seed=10 + i)), f"a small red circle number {i}")
        for i in range(6)
    ]
    samples += [
        ("rgba", _encode(rgba, "PNG"), "a transparent square"),
        ("gray", _encode(random_image(48, seed=2).convert("L")), "a gray picture"),
        ("cmyk", _encode(random_image(48, seed=3).convert("CMYK")), "a cmyk picture"),
        ("palette", _encode(random_image(48, seed=4).convert("P"), "PNG"), "a palette picture"),
        ("corrupt", rng.integers(0, 256, 500, dtype=np.uint8).tobytes(), "random bytes"),
        ("truncated", good_jpeg[: len(good_jpeg) // 2], "half a jpeg"),
        ("nocaption", _encode(random_image(48, seed=5)), ""),
        ("blankcaption", _encode(random_image(48, seed=6)), "   \n"),
    ]
    return samples


GOOD = 10
CORRUPT = 2
EMPTY = 2


def _add(tar: tarfile.TarFile, name: str, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """The corpus written as webdataset shards (2 shards, .txt captions), an imagefolder with
    metadata.jsonl, one with metadata.csv, and parquet (datasets' Image struct)."""
    import datasets

    root = tmp_path_factory.mktemp("corpora")
    samples = _corpus()
    paths = {"webdataset": root / "wds", "imagefolder": root / "folder", "parquet": root / "parquet"}
    for path in paths.values():
        path.mkdir()
    half = len(samples) // 2
    for shard, part in enumerate((samples[:half], samples[half:])):
        with tarfile.open(paths["webdataset"] / f"shard-{shard:03d}.tar", "w") as tar:
            for key, data, caption in part:
                _add(tar, f"{key}.jpg", data)  # PNG bytes under .jpg too: PIL reads the content
                _add(tar, f"{key}.txt", caption.encode())
    with open(paths["imagefolder"] / "metadata.jsonl", "w") as metadata:
        for key, data, caption in samples:
            (paths["imagefolder"] / f"{key}.img").write_bytes(data)
            metadata.write(json.dumps({"file_name": f"{key}.img", "caption": caption}) + "\n")
    table = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": d, "path": f"{k}.jpg"} for k, d, _ in samples],
            "text": [c for _, _, c in samples],
        },
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
    )
    table.to_parquet(str(paths["parquet"] / "train-00000.parquet"))
    paths["csv_folder"] = root / "csv_folder"
    paths["csv_folder"].mkdir()
    lines = ["file_name,alt_text"]
    for key, data, caption in samples:
        (paths["csv_folder"] / f"{key}.png").write_bytes(data)
        lines.append(f'{key}.png,"{caption}"')
    (paths["csv_folder"] / "metadata.csv").write_text("\n".join(lines) + "\n")
    return paths


def _identity_transform(size=IMAGE_SIZE):
    return build_image_transform("blip2", train=False, image_size=size)


# ---- sources ---------------------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "streaming"])
@pytest.mark.parametrize("fmt", ["webdataset", "imagefolder", "parquet"])
def test_every_source_format_loads_to_the_canonical_columns_and_skips_bad_samples(
    corpora, tmp_path, fmt, streaming
):
    raw = load_image_text_dataset(str(corpora[fmt]), streaming=streaming, cache_dir=tmp_path)
    assert {"image", "text"} <= set(raw.features)
    counter = SkipCounter()
    prepared = prepare_dataset(raw, _identity_transform(), counter, shuffle_buffer=0)
    samples = list(prepared) if streaming else [prepared[i] for i in range(len(prepared))]
    # streaming drops the bad samples; map-style keeps its length and replaces each by the next usable one
    assert len(samples) == (GOOD if streaming else GOOD + CORRUPT + EMPTY)
    assert counter.counts() == {**dict.fromkeys(SKIP_REASONS, 0), "corrupt_image": CORRUPT, "empty_caption": EMPTY}
    for sample in samples:
        assert sample["pixel_values"].shape == (3, IMAGE_SIZE, IMAGE_SIZE)
        assert sample["pixel_values"].dtype == torch.float32
        assert sample["text"].strip() == sample["text"] and sample["text"]
    assert {"a cmyk picture", "a gray picture", "a transparent square", "a palette picture"} <= {
        s["text"] for s in samples
    }


def test_configurable_columns_and_csv_metadata(corpora, tmp_path):
    source = ImageTextSource(str(corpora["csv_folder"]), text_column="alt_text")
    raw = load_image_text_dataset(source, cache_dir=tmp_path)
    assert raw.column_names == ["image", "text", "__key__", "__url__", "__error__"]
    assert "random bytes" in raw["text"]
    assert "" in raw["text"]  # the empty caption: counted as empty when prepared


def test_webdataset_json_captions_and_the_hub_code_path(tmp_path):
    """A webdataset with .json captions (`json.caption`), and a dataset folder read as a Hub dataset
    would be (`format="hub"`: datasets.load_dataset(path_or_name))."""
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "000.tar", "w") as tar:
        for i in range(3):
            _add(tar, f"k{i}.jpg", _encode(random_image(16, seed=i)))
            _add(tar, f"k{i}.json", json.dumps({"caption": f"caption {i}", "width": 16}).encode())
    for streaming in (False, True):
        raw = load_image_text_dataset(
            str(shards / "*.tar"), streaming=streaming, cache_dir=tmp_path / "cache"
        )
        assert [row["text"] for row in raw] == ["caption 0", "caption 1", "caption 2"]
        assert [row["__key__"] for row in raw] == ["k0", "k1", "k2"]

    hub_repo = tmp_path / "hub_repo" / "data"
    hub_repo.mkdir(parents=True)
    import datasets

    datasets.Dataset.from_dict(
        {"picture": [{"bytes": _encode(random_image(16)), "path": "x.jpg"}], "sentence": ["a hub caption"]},
        features=datasets.Features({"picture": datasets.Image(), "sentence": datasets.Value("string")}),
    ).to_parquet(str(hub_repo / "train-00000-of-00001.parquet"))
    source = ImageTextSource(
        str(hub_repo.parent), format="hub", image_column="picture", text_column="sentence"
    )
    raw = load_image_text_dataset(source, cache_dir=tmp_path / "cache")
    assert raw["text"] == ["a hub caption"]


def test_synthetic_scenes_exports_load_as_caption_and_vqa_data(tmp_path):
    """hf_vlm.scenes writes webdataset shards (.png/.txt/.json) and imagefolders; both layouts load with
    the default columns (the VQA shards keep question/answers inside KEY.json)."""
    from hf_vlm.scenes import export_scenes

    vqa = export_scenes(
        tmp_path / "vqa", {"train": 2}, layout="vqa", format="webdataset", samples_per_shard=8
    )
    captions = export_scenes(tmp_path / "captions", {"train": 3}, layout="caption", format="imagefolder")
    counter = SkipCounter()
    vqa_raw = load_image_text_dataset(str(vqa["train"]), task="vqa", streaming=True)
    vqa_samples = list(prepare_dataset(vqa_raw, _identity_transform(), counter, shuffle_buffer=0))
    assert len(vqa_samples) > 2 and all(s["question"].endswith("?") and s["answers"] for s in vqa_samples)
    caption_raw = load_image_text_dataset(str(captions["train"]), cache_dir=tmp_path / "cache")
    caption_samples = prepare_dataset(caption_raw, _identity_transform(), counter)
    assert len(caption_samples) == 3 and caption_samples[0]["text"].startswith("a ")
    assert counter.total == 0


def test_missing_sources_and_columns_are_named_in_the_error(corpora, tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        load_image_text_dataset(str(tmp_path / "no-such-dir"))
    with pytest.raises(FileNotFoundError, match=r"\*\.tar"):
        load_image_text_dataset(str(tmp_path / "*.tar"))
    with pytest.raises(KeyError, match=r"no text column 'headline'.*'file_name', 'caption'"):
        load_image_text_dataset(
            ImageTextSource(str(corpora["imagefolder"]), text_column="headline"), cache_dir=tmp_path
        )
    with pytest.raises(RuntimeError, match="could not load Hub dataset 'nobody/no-such-dataset'"):
        load_image_text_dataset("nobody/no-such-dataset", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="weight must be > 0"):
        ImageTextSource.from_spec("shards/*.tar@0")


def _two_sources(root, rows=120):
    """Two webdataset corpora whose captions say where they come from ("a 0", ..., "b 0", ...)."""
    image = _encode(random_image(8))
    for name in ("a", "b"):
        (root / name).mkdir()
        with tarfile.open(root / name / "000.tar", "w") as tar:
            for i in range(rows):
                _add(tar, f"{i:04d}.jpg", image)
                _add(tar, f"{i:04d}.txt", f"{name} {i}".encode())
    return root / "a", root / "b"


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "streaming"])
def test_weighted_mixing_follows_the_weights_and_is_reproducible(tmp_path, streaming):
    a, b = _two_sources(tmp_path)
    specs = [f"{a}@3", f"{b}@1"]

    def origins(seed):
        mixed = load_image_text_dataset(
            specs,
            streaming=streaming,
            seed=seed,
            stopping_strategy="first_exhausted",
            cache_dir=tmp_path / "c",
        )
        return [row["text"].split()[0] for row in mixed]

    first = origins(seed=7)
    assert first == origins(seed=7)  # same seed, same order
    assert first != origins(seed=8)
    share_a = first.count("a") / len(first)
    assert 0.65 < share_a < 0.85, f"source a (weight 0.75) gave {share_a:.2f} of {len(first)} samples"
    assert first.count("a") == 120  # first_exhausted: ends when the heavier source a runs out


def test_streaming_shuffle_is_seeded(corpora, tmp_path):
    def order(seed):
        raw = load_image_text_dataset(str(corpora["webdataset"]), streaming=True)
        return [
            s["text"]
            for s in prepare_dataset(raw, _identity_transform(), SkipCounter(), shuffle_buffer=8, seed=seed)
        ]

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert sorted(order(1)) == sorted(order(2))


# ---- images and transforms -------------------------------------------------------------------


def test_non_rgb_images_become_rgb():
    white_cmyk = Image.new("CMYK", (4, 4), (0, 0, 0, 0))
    transparent = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    half_red = Image.new("RGBA", (4, 4), (255, 0, 0, 128))
    gray = Image.new("L", (4, 4), 100)
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 255] * 256)
    deep = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    expected = {
        "cmyk": (white_cmyk, (255, 255, 255)),
        "transparent": (transparent, (255, 255, 255)),
        "half red": (half_red, (255, 127, 127)),
        "gray": (gray, (100, 100, 100)),
        "palette": (palette, (0, 0, 255)),
        "16-bit": (deep, (255, 255, 255)),
    }
    for name, (image, pixel) in expected.items():
        for value in (
            image,
            {"bytes": _encode(image, "PNG" if image.mode != "CMYK" else "JPEG"), "path": None},
        ):
            rgb = load_rgb_image(value, name)
            assert rgb.mode == "RGB", name
            assert np.abs(np.asarray(rgb)[0, 0].astype(int) - pixel).max() <= 2, (name, np.asarray(rgb)[0, 0])


def test_eval_transform_is_deterministic_and_normalized_with_clip_statistics():
    mean_color = tuple(round(m * 255) for m in CLIP_MEAN)
    transform = build_image_transform("coca", train=False, image_size=224)
    pixel_values = transform(Image.new("RGB", (300, 200), mean_color))
    assert pixel_values.shape == (3, 224, 224) and pixel_values.dtype == torch.float32
    assert pixel_values.abs().max() < 0.01  # the mean colour normalizes to zero
    white = transform(Image.new("RGB", (50, 80), (255, 255, 255)))
    expected = torch.tensor([(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)])
    torch.testing.assert_close(white[:, 100, 100], expected, atol=1e-4, rtol=0)
    image = random_image(96, seed=3)
    assert torch.equal(transform(image), transform(image))


def test_train_transforms_augment_per_recipe_and_follow_the_seed():
    image = random_image(96, seed=3)
    for recipe in ("blip2", "coca"):
        transform = build_image_transform(recipe, train=True, image_size=64)
        torch.manual_seed(0)
        first = transform(image)
        torch.manual_seed(0)
        assert torch.equal(first, transform(image))
        assert first.shape == (3, 64, 64)
        assert not torch.equal(first, transform(image))

    def names(recipe):
        return [type(step).__name__ for step in build_image_transform(recipe).transforms]

    assert names("blip2")[0] == "RandomResizedCrop" and "ColorJitter" not in names("blip2")
    assert {"RandomHorizontalFlip", "ColorJitter"} <= set(names("coca"))
    # Evaluation: the model family's image processor (BLIP-2 squashes to a square, CoCa crops; tests/test_images.py)
    assert type(build_image_transform(train=False).image_processor).__name__ == "BlipImageProcessor"
    assert type(build_image_transform("coca", train=False).image_processor).__name__ == "CLIPImageProcessor"


def test_augmentation_none_trains_on_the_evaluation_transform(t5_tokenizer, tmp_path):
    """--augmentation none: training images go through the deterministic evaluation transform (for data
    whose captions say where things are and what colour they have), through build_training_data too."""
    from hf_vlm.modeling.coca import CocaProcessor
    from hf_vlm.scenes import export_scenes

    image = random_image(96, seed=3)
    evaluation = build_image_transform("coca", train=False, image_size=64)(image)
    none = build_image_transform("none", train=True, image_size=64)
    torch.manual_seed(0)
    assert torch.equal(none(image), evaluation) and torch.equal(none(image), evaluation)
    with pytest.raises(ValueError, match="unknown image augmentation 'flip'.*'none'"):
        build_image_transform("flip")

    captions = export_scenes(tmp_path / "captions", {"train": 2}, layout="caption", format="imagefolder")
    processor = CocaProcessor.from_tokenizer(t5_tokenizer, image_size=32)
    samples = {}
    for augmentation in (None, "none"):
        data = build_training_data("coca", [str(captions["train"])], processor, augmentation=augmentation,
                                   cache_dir=tmp_path / "cache")
        samples[augmentation] = data.dataset[0]["pixel_values"]
    rows = list(load_image_text_dataset(str(captions["train"]), cache_dir=tmp_path / "cache"))
    expected = build_image_transform("coca", train=False, image_size=32)(load_rgb_image(rows[0]["image"]))
    assert torch.equal(samples["none"], expected)
    assert not torch.equal(samples[None], expected)  # the recipe's crop/flip/jitter


# ---- collators -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_tokenizer():
    """A tiny BERT WordPiece tokenizer (the Q-Former's tokenizer type), trained here."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    from hf_vlm.testing import TINY_CORPUS

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer.train_from_iterator(
        TINY_CORPUS, trainers.WordPieceTrainer(vocab_size=150, special_tokens=specials)
    )
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return BertTokenizerFast(tokenizer_object=tokenizer)


@pytest.fixture(scope="module")
def t5_tokenizer(t5_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(t5_tokenizer_dir)


def _prepared(texts, **extra):
    return [{"pixel_values": torch.randn(3, 8, 8), "text": t, **extra} for t in texts]


def test_coca_collator_tokenizes_captions_to_fixed_length_input_ids(t5_tokenizer):
    samples = _prepared(["a small red circle left of a blue square", "a photo of a cat"])
    batch = ImageTextCollator.for_recipe("coca", t5_tokenizer)(samples)
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "return_loss"}
    assert batch["return_loss"] is True
    assert batch["pixel_values"].shape == (2, 3, 8, 8)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, 76)  # + CLS = 77 positions
    assert batch["input_ids"].dtype == torch.long
    lengths = batch["attention_mask"].sum(1)
    assert lengths[0] > lengths[1]
    assert (batch["input_ids"][batch["attention_mask"] == 0] == t5_tokenizer.pad_token_id).all()
    decoded = t5_tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    assert decoded == [s["text"] for s in samples]


def test_blip2_stage2_collator_puts_the_prompt_in_input_ids_and_the_caption_in_labels(t5_tokenizer):
    samples = _prepared(["a large green triangle above a yellow circle", "a photo of a dog"])
    batch = ImageTextCollator.for_recipe("blip2-caption", t5_tokenizer)(samples)
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "labels"}
    assert t5_tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True) == ["a photo of"] * 2
    labels = batch["labels"]
    assert (labels[1] == IGNORE_INDEX).any() and not (labels[0] == IGNORE_INDEX).any()
    targets = [t5_tokenizer.decode(row[row != IGNORE_INDEX], skip_special_tokens=True) for row in labels]
    assert targets == [s["text"] for s in samples]
    stage2 = ImageTextCollator.for_recipe("blip2-stage2", t5_tokenizer)(samples)  # no prompt: just </s>
    assert stage2["input_ids"].tolist() == [[t5_tokenizer.eos_token_id]] * 2


def test_vqa_collator_formats_the_question_prompt_and_targets_the_most_common_answer(t5_tokenizer):
    samples = [
        {
            "pixel_values": torch.zeros(3, 8, 8),
            "question": "what color is the circle?",
            "answers": ["red", "blue"],
        },
        {"pixel_values": torch.zeros(3, 8, 8), "question": "is there a square?", "answers": ["yes"]},
    ]
    # the tiny tokenizer splits words finely: a longer prompt budget than the recipe's 32 tokens
    batch = ImageTextCollator.for_recipe("blip2-vqa", t5_tokenizer, max_length=128)(samples)
    prompts = t5_tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    assert prompts == [
        "Question: what color is the circle? Short answer:",
        "Question: is there a square? Short answer:",
    ]
    targets = [
        t5_tokenizer.decode(row[row != IGNORE_INDEX], skip_special_tokens=True) for row in batch["labels"]
    ]
    assert targets == ["red", "yes"]


def test_blip2_stage1_collator_uses_the_processors_qformer_bert_tokenizer(t5_tokenizer, bert_tokenizer):
    from types import SimpleNamespace

    processor = SimpleNamespace(tokenizer=t5_tokenizer, qformer_tokenizer=bert_tokenizer)
    batch = ImageTextCollator.for_recipe("blip2-stage1", processor)(
        _prepared(["a red circle", "a blue square"])
    )
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "return_loss"}
    assert (batch["input_ids"][:, 0] == bert_tokenizer.cls_token_id).all()
    assert bert_tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True) == [
        "a red circle",
        "a blue square",
    ]
    with pytest.raises(TypeError, match="qformer_tokenizer"):
        ImageTextCollator.for_recipe("blip2-stage1", SimpleNamespace(tokenizer=t5_tokenizer))


def test_vqa_data_from_disk_with_answer_lists(tmp_path, t5_tokenizer):
    folder = tmp_path / "vqa"
    folder.mkdir()
    rows = [
        ("q0.png", "what color is the circle?", [{"answer": "red"}, {"answer": "blue"}, {"answer": "red"}]),
        ("q1.png", "  ", [{"answer": "yes"}]),  # empty question
        ("q2.png", "is there a square?", []),  # no answer
        ("q3.png", "how many shapes are there?", [{"answer": "two"}]),
    ]
    with open(folder / "metadata.jsonl", "w") as metadata:
        for name, question, answers in rows:
            random_image(16).save(folder / name)
            metadata.write(json.dumps({"file_name": name, "question": question, "answers": answers}) + "\n")
    counter = SkipCounter()
    data = build_training_data(
        "blip2-vqa",
        str(folder),
        counter=counter,
        image_transform=_identity_transform(16),
        tokenizer=t5_tokenizer,
        streaming=True,
        shuffle_buffer=0,
        cache_dir=tmp_path / "c",
        repeat=False,
    )
    samples = list(data.dataset)
    assert [s["answers"][0] for s in samples] == ["red", "two"]
    assert counter.counts()["empty_question"] == 1 and counter.counts()["empty_answer"] == 1
    batch = data.collator(samples)
    assert batch["pixel_values"].shape == (2, 3, 16, 16) and batch["labels"].shape[0] == 2


# ---- skips in DataLoader workers ---------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "streaming"])
def test_skips_in_dataloader_workers_are_counted_and_batches_stay_full(
    corpora, t5_tokenizer, tmp_path, streaming
):
    counter = SkipCounter()  # made before the workers start
    data = build_training_data(
        "coca",
        str(corpora["webdataset"]),
        counter=counter,
        image_transform=_identity_transform(),
        tokenizer=t5_tokenizer,
        streaming=streaming,
        seed=0,
        shuffle_buffer=4,
        cache_dir=tmp_path,
        repeat=False,
    )
    if streaming:
        # Each worker streams its own shard and batches it; like the Trainer's dataloader_drop_last,
        # drop_last removes a worker's partial final batch.
        loader_kwargs = {"drop_last": True}
    else:
        loader_kwargs = {
            "sampler": torch.utils.data.RandomSampler(
                data.dataset, generator=torch.Generator().manual_seed(0)
            )
        }
    loader = torch.utils.data.DataLoader(
        data.dataset, batch_size=2, num_workers=2, collate_fn=data.collator, **loader_kwargs
    )
    batches = list(loader)
    assert all(batch["pixel_values"].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE) for batch in batches)
    assert all(batch["input_ids"].shape == (2, 76) for batch in batches)
    # streaming: shard 0 has 7 usable samples (3 full batches), shard 1 has 3 (1 full batch);
    # map-style: every index yields a sample (bad ones replaced), 14 = 7 full batches.
    assert sum(len(b["input_ids"]) for b in batches) == (8 if streaming else GOOD + CORRUPT + EMPTY)
    assert counter.counts()["corrupt_image"] == CORRUPT
    assert counter.counts()["empty_caption"] == EMPTY


def test_first_skips_are_logged_with_their_file_and_key(corpora, caplog, tmp_path):
    counter = SkipCounter(max_warnings=3)
    raw = load_image_text_dataset(str(corpora["webdataset"]), streaming=True)
    with caplog.at_level(logging.WARNING, logger="hf_vlm.data.skips"):
        list(prepare_dataset(raw, _identity_transform(), counter, shuffle_buffer=0))
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3  # only the first few; the rest are counted
    assert "shard-001.tar:corrupt (corrupt_image)" in messages[0]
    assert "shard-001.tar:truncated (corrupt_image)" in messages[1]
    assert "nocaption (empty_caption)" in messages[2]
    assert counter.total == CORRUPT + EMPTY


def test_map_style_replaces_a_bad_index_with_the_next_usable_sample(corpora, tmp_path):
    raw = load_image_text_dataset(str(corpora["imagefolder"]), cache_dir=tmp_path)
    counter = SkipCounter()
    prepared = prepare_dataset(raw, _identity_transform(), counter)
    assert isinstance(prepared, PreparedDataset) and len(prepared) == len(raw)
    texts = raw["text"]
    unusable = {"random bytes", "half a jpeg", "", "   \n"}
    corrupt = texts.index("random bytes")
    following = texts[corrupt + 1 :] + texts[:corrupt]
    assert prepared[corrupt]["text"] == next(t for t in following if t not in unusable)
    assert (
        counter.counts()["corrupt_image"] == 1
    )  # only the drawn index counts; the walk past others does not


def test_a_dataset_of_only_bad_samples_fails_with_a_clear_error(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"not an image")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "a.jpg", "text": "x"}) + "\n")
    prepared = prepare_dataset(
        load_image_text_dataset(str(folder), cache_dir=tmp_path), _identity_transform(), SkipCounter()
    )
    with pytest.raises(RuntimeError, match="dataset looks broken"):
        prepared[0]


# ---- the stock Trainer -----------------------------------------------------------------------


class _TinyContrastiveModel(torch.nn.Module):
    """Image/text embeddings and a CLIP-style loss: enough to train on the collated batches."""

    def __init__(self, vocab_size: int, image_size: int = IMAGE_SIZE):
        super().__init__()
        self.image_proj = torch.nn.Linear(3 * image_size * image_size, 16)
        self.token_embedding = torch.nn.Embedding(vocab_size, 16)

    def forward(self, pixel_values, input_ids, attention_mask, return_loss=False):
        image_embeds = torch.nn.functional.normalize(self.image_proj(pixel_values.flatten(1)), dim=-1)
        mask = attention_mask.unsqueeze(-1).float()
        text_embeds = (self.token_embedding(input_ids) * mask).sum(1) / mask.sum(1)
        logits_per_image = 10 * image_embeds @ torch.nn.functional.normalize(text_embeds, dim=-1).T
        labels = torch.arange(len(logits_per_image))
        loss = torch.nn.functional.cross_entropy(logits_per_image, labels) if return_loss else None
        return {"loss": loss, "logits_per_image": logits_per_image}


def test_trainer_logs_skip_counts_at_every_logging_step_and_at_the_end(
    corpora, t5_tokenizer, tmp_path, caplog
):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hf_vlm.data import SkippedSamplesCallback

    class ReportingIntegration(TrainerCallback):  # stands in for TensorBoard / W&B (report_to)
        seen = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.seen.append(dict(logs))

    counter = SkipCounter()
    data = build_training_data(
        "coca",
        str(corpora["webdataset"]),
        counter=counter,
        image_transform=_identity_transform(),
        tokenizer=t5_tokenizer,
        max_length=16,
        cache_dir=tmp_path / "cache",
    )
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=7,
        per_device_train_batch_size=2,
        logging_steps=1,
        dataloader_num_workers=2,
        dataloader_drop_last=True,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=_TinyContrastiveModel(len(t5_tokenizer)),
        args=args,
        train_dataset=data.dataset,
        data_collator=data.collator,
        callbacks=[ReportingIntegration()],
    )
    SkippedSamplesCallback.attach(trainer, counter)  # first, so the integrations see the counts
    with caplog.at_level(logging.WARNING, logger="hf_vlm.data.skips"):
        trainer.train()

    step_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(step_logs) == 7
    assert all("skipped/corrupt_image" in entry and "skipped/empty_caption" in entry for entry in step_logs)
    counts = [entry["skipped/corrupt_image"] + entry["skipped/empty_caption"] for entry in step_logs]
    assert counts == sorted(counts)  # running totals
    # 7 steps x 2 = one epoch of the 14 indices: every bad sample drawn once, counted once
    final = trainer.state.log_history[-1]
    assert "train_loss" in final
    assert (final["skipped/corrupt_image"], final["skipped/empty_caption"]) == (CORRUPT, EMPTY)
    assert ReportingIntegration.seen[-1]["skipped/corrupt_image"] == CORRUPT
    assert any("training skipped 4 bad samples" in r.getMessage() for r in caplog.records)


def test_the_models_processors_drive_the_transforms_and_collators(t5_tokenizer, bert_tokenizer):
    """Blip2FlanT5Processor / CocaProcessor as the trainers pass them: image size and mean/std come from
    the image processor, text from its tokenizer (the Q-Former's BERT one for stage 1)."""
    from transformers import CLIPImageProcessor

    from hf_vlm.modeling.blip2_flant5 import Blip2FlanT5Processor
    from hf_vlm.modeling.coca import CocaProcessor

    blip2 = Blip2FlanT5Processor.from_tokenizers(t5_tokenizer, bert_tokenizer, image_size=40)
    coca = CocaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 24},
            crop_size={"height": 24, "width": 24},
            image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
        ),
        tokenizer=t5_tokenizer,
    )
    white = Image.new("RGB", (60, 50), (255, 255, 255))
    blip2_pixels = image_transform_from_processor(blip2, "blip2", train=False)(white)
    assert blip2_pixels.shape == (3, 40, 40)
    expected = torch.tensor([(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)])
    torch.testing.assert_close(blip2_pixels[:, 0, 0], expected, atol=1e-4, rtol=0)
    coca_pixels = image_transform_from_processor(coca, "coca", train=True)(white)
    assert coca_pixels.shape == (3, 24, 24)

    samples = _prepared(["a red circle", "a blue square"])
    stage1 = ImageTextCollator.for_recipe("blip2-stage1", blip2)(samples)
    assert (stage1["input_ids"][:, 0] == bert_tokenizer.cls_token_id).all()
    stage2 = ImageTextCollator.for_recipe("blip2-stage2", blip2)(samples)
    assert stage2["labels"].max() < len(t5_tokenizer)
    assert ImageTextCollator.for_recipe("coca", coca, max_length=32)(samples)["input_ids"].shape == (2, 32)
