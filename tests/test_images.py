"""The one image decoder (hf_vlm.data.images): real files on disk, decoded the same way by training, `hf-vlm eval`,
the model's processor and the Space, down to bit-identical `pixel_values`; bad files are counted or refused by name.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

from hf_vlm import space
from hf_vlm.data import (
    MAX_IMAGE_PIXELS,
    SkipCounter,
    SkippedSample,
    build_image_transform,
    build_training_data,
    image_transform_from_processor,
    load_rgb_image,
)
from hf_vlm.data import images as decoder
from hf_vlm.evaluation import runner

pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")

IMAGE_SIZE = 32
W, H = 64, 48


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_16_bit(array: np.ndarray) -> bytes:
    """A 16-bit-per-channel PNG written by hand (PIL writes only 16-bit grayscale): [H, W, 3] -> 48-bit RGB."""
    height, width, channels = array.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows))
            + _chunk(b"IEND", b""))


def png_header_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header announces width x height RGB pixels: a decompression bomb's signature."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"")) + _chunk(b"IEND", b"")


# The 16-bit gray data: a horizontal ramp over the whole 0..65535 range.
RAMP_16 = np.tile(np.linspace(0, 65535, W).round().astype(np.uint16), (H, 1))
RAMP_FLOAT = np.tile(np.linspace(0.0, 1.0, W, dtype=np.float32), (H, 1))
LEFT, RIGHT = (slice(None), slice(0, W // 2 - 4)), (slice(None), slice(W // 2 + 4, W))


def _rgb(array_2d: np.ndarray) -> np.ndarray:
    return np.repeat(array_2d[..., None], 3, axis=2)


def _halves(left, right) -> np.ndarray:
    out = np.zeros((H, W, 3), np.uint8)
    out[:, : W // 2] = left
    out[:, W // 2:] = right
    return out


def write_good_files(folder: Path) -> dict[str, tuple[np.ndarray, int]]:
    """Every kind of unusual but valid image, written to `folder`; name -> (expected RGB pixels, tolerance)."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}

    Image.fromarray(RAMP_16).save(folder / "gray16.png")  # mode I;16
    ramp_8 = _rgb((RAMP_16 >> 8).astype(np.uint8))
    expected["gray16.png"] = (ramp_8, 0)

    (folder / "rgb48.png").write_bytes(png_16_bit(_rgb(RAMP_16)))  # the same picture as 48-bit RGB
    expected["rgb48.png"] = (ramp_8, 0)

    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[:, : W // 2] = (255, 0, 0, 0)  # transparent red: only the background shows
    rgba[:, W // 2:] = (0, 0, 255, 255)
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    expected["rgba.png"] = (_halves((255, 255, 255), (0, 0, 255)), 0)

    palette = Image.fromarray(_halves(0, 1)[..., 0], "L").convert("P")
    palette.putpalette([0, 0, 0, 0, 200, 0] + [0] * (256 * 3 - 6))
    palette.save(folder / "palette.png", transparency=0)  # index 0 (black) is transparent
    expected["palette.png"] = (_halves((255, 255, 255), (0, 200, 0)), 0)

    Image.new("CMYK", (W, H), (0, 255, 255, 0)).save(folder / "cmyk.jpg", quality=95)  # red in CMYK
    expected["cmyk.jpg"] = (np.full((H, W, 3), (255, 0, 0), np.uint8), 8)

    la = np.zeros((H, W, 2), np.uint8)
    la[:, : W // 2] = (100, 0)
    la[:, W // 2:] = (100, 255)
    Image.fromarray(la, "LA").save(folder / "la.png")
    expected["la.png"] = (_halves((255, 255, 255), (100, 100, 100)), 0)

    stored = Image.fromarray(_halves((255, 0, 0), (0, 0, 255)))  # left red, right blue, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": the left half ends on top
    stored.save(folder / "exif6.jpg", quality=95, exif=exif)
    upright = np.zeros((W, H, 3), np.uint8)
    upright[: W // 2] = (255, 0, 0)
    upright[W // 2:] = (0, 0, 255)
    expected["exif6.jpg"] = (upright, 40)  # JPEG blurs the red/blue edge: checked away from it below

    Image.fromarray(RAMP_FLOAT).save(folder / "float.tiff")  # mode F, 0..1
    expected["float.tiff"] = (_rgb(np.floor(RAMP_FLOAT * 255 + 0.5).astype(np.uint8)), 0)

    (folder / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": name, "caption": name}) + "\n" for name in expected)
    )
    return expected


@pytest.fixture(scope="module")
def good_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good_images")
    return folder, write_good_files(folder)


@pytest.fixture(scope="module")
def processors(tmp_path_factory, t5_tokenizer_dir):
    """Each family's processor as `from_tokenizer(s)` builds it, saved and reloaded: (processor, folder)."""
    from transformers import AutoTokenizer

    from hf_vlm.modeling.blip2_flant5 import Blip2FlanT5Processor
    from hf_vlm.modeling.coca import CocaProcessor

    tokenizer = AutoTokenizer.from_pretrained(t5_tokenizer_dir)
    built = {
        "blip2": (Blip2FlanT5Processor, Blip2FlanT5Processor.from_tokenizers(tokenizer, image_size=IMAGE_SIZE)),
        "coca": (CocaProcessor, CocaProcessor.from_tokenizer(tokenizer, image_size=IMAGE_SIZE)),
    }
    out = {}
    for family, (cls, processor) in built.items():
        folder = tmp_path_factory.mktemp(f"{family}_processor")
        processor.save_pretrained(folder)
        out[family] = (cls, processor, folder)
    return out


# ------------------------------------------------------------------------------------------ decoding


def test_every_unusual_file_decodes_to_the_expected_rgb_pixels(good_files):
    folder, expected = good_files
    for name, (pixels, tolerance) in expected.items():
        path = folder / name
        for value in (str(path), path, path.read_bytes(), {"bytes": path.read_bytes(), "path": None},
                      {"bytes": None, "path": str(path)}, Image.open(path)):
            image = load_rgb_image(value, name)
            assert image.mode == "RGB" and image.size == (pixels.shape[1], pixels.shape[0]), (name, image.size)
            got = np.asarray(image).astype(int)
            if name == "exif6.jpg":  # away from the blurred edge
                got, want = got[[4, -4]], pixels[[4, -4]].astype(int)
            else:
                want = pixels.astype(int)
            assert np.abs(got - want).max() <= tolerance, (name, type(value).__name__)

    # The bugs this decoder fixes: PIL's own conversion clips 16-bit to white and reads float as 0..255.
    assert np.asarray(Image.open(folder / "gray16.png").convert("RGB")).mean() > 250
    assert np.asarray(load_rgb_image(str(folder / "gray16.png"))).mean() == pytest.approx(127, abs=2)
    assert np.asarray(Image.open(folder / "float.tiff").convert("RGB")).mean() < 1
    assert np.asarray(load_rgb_image(str(folder / "float.tiff"))).mean() == pytest.approx(127.5, abs=1)
    # PIL opens a 48-bit PNG as 8-bit RGB (the high byte): the same rule as ours for 16-bit gray
    assert Image.open(folder / "rgb48.png").mode == "RGB" and Image.open(folder / "gray16.png").mode == "I;16"


def test_sixteen_bit_and_float_are_scaled_by_the_type_range_not_the_image_maximum():
    dark = np.full((4, 4), 4096, np.uint16)  # a dark 16-bit picture stays dark (not stretched to white)
    assert np.asarray(load_rgb_image(Image.fromarray(dark)))[0, 0].tolist() == [16, 16, 16]
    big_endian = Image.frombytes("I;16B", (4, 4), dark.astype(">u2").tobytes())
    assert np.asarray(load_rgb_image(big_endian))[0, 0].tolist() == [16, 16, 16]
    as_int32 = Image.fromarray(dark.astype(np.int32))  # mode I: what PIL decodes 16-bit PGM into
    assert as_int32.mode == "I" and np.asarray(load_rgb_image(as_int32))[0, 0].tolist() == [16, 16, 16]
    pgm = b"P5 2 2 65535\n" + np.full(4, 40000, ">u2").tobytes()
    assert np.asarray(load_rgb_image(pgm))[0, 0].tolist() == [156, 156, 156]
    floats = Image.fromarray(np.array([[-1.0, 0.25], [2.0, np.nan]], np.float32))
    assert np.asarray(load_rgb_image(floats))[..., 0].tolist() == [[0, 64], [255, 0]]


def test_bad_files_are_skipped_as_corrupt_or_oversized_images_naming_what_is_wrong(tmp_path):
    noise = Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), np.uint8))
    buffer = io.BytesIO()
    noise.save(buffer, "JPEG")
    bad = {
        "zero.png": (b"", "UnidentifiedImageError"),
        "random.jpg": (np.random.RandomState(1).bytes(2000), "UnidentifiedImageError"),
        "truncated.jpg": (buffer.getvalue()[: len(buffer.getvalue()) // 2], "truncated"),
        "bomb.png": (png_header_claiming(10_000, 6_000), "decompression bomb: 10000×6000"),  # under PIL's limit
        "gigantic.png": (png_header_claiming(40_000, 40_000), "decompression bomb"),  # over twice PIL's
    }
    assert not issubclass(Image.DecompressionBombError, OSError)  # why `except OSError` let it through
    assert MAX_IMAGE_PIXELS < Image.MAX_IMAGE_PIXELS  # ours applies before PIL's warning
    for name, (data, detail) in bad.items():
        (tmp_path / name).write_bytes(data)
        for value in (data, {"bytes": data, "path": None}, str(tmp_path / name)):
            with pytest.raises(SkippedSample) as skip:
                load_rgb_image(value, name)
            reason = "oversized_image" if "bomb" in detail else "corrupt_image"
            assert skip.value.reason == reason and skip.value.detail.startswith(f"{name}: ")
            assert detail in skip.value.detail, skip.value.detail
    with pytest.raises(SkippedSample, match="no image"):
        load_rgb_image(None)
    with pytest.raises(SkippedSample, match="FileNotFoundError"):
        load_rgb_image(str(tmp_path / "missing.png"))


def test_the_pixel_limit_is_one_constant_for_training_eval_and_the_space(tmp_path, monkeypatch):
    assert space.MAX_IMAGE_PIXELS == decoder.MAX_IMAGE_PIXELS == MAX_IMAGE_PIXELS
    path = tmp_path / "big.png"
    Image.new("RGB", (1001, 1000), "red").save(path)
    assert load_rgb_image(str(path)).size == (1001, 1000)
    monkeypatch.setattr(decoder, "MAX_IMAGE_PIXELS", 1_000_000)
    for value in (str(path), Image.open(path)):
        with pytest.raises(SkippedSample, match="decompression bomb: 1001×1000 = 1,001,000 pixels"):
            load_rgb_image(value)
    with pytest.raises(gr.Error, match="big.png is 1001×1000 pixels; images up to 1 megapixels"):
        space.check_image_file(path)
    with pytest.raises(gr.Error, match="big.png could not be decoded as an image: decompression bomb"):
        space.prepare_image(str(path))


# ---------------------------------------------------------------- one file, one set of pixel_values


def _training_pixel_values(folder: Path, processor, recipe: str, tmp_path: Path) -> dict[str, torch.Tensor]:
    """pixel_values of each file as the training pipeline prepares it with the evaluation transform."""
    data = build_training_data(recipe, [str(folder)], processor, train=False, cache_dir=tmp_path / recipe)
    samples = [data.dataset[i] for i in range(len(data.dataset))]
    assert data.counter.total == 0
    return {sample["text"]: sample["pixel_values"] for sample in samples}


@pytest.mark.parametrize("family", ["blip2", "coca"])
def test_one_file_gives_bit_identical_pixel_values_in_training_eval_the_processor_and_the_space(
        family, good_files, processors, tmp_path):
    from gradio.data_classes import ImageData
    from transformers import AutoProcessor

    import hf_vlm  # noqa: F401  (AutoProcessor resolves our processors)

    folder, expected = good_files
    processor_class, processor, saved = processors[family]
    recipe = {"blip2": "blip2-stage2", "coca": "coca"}[family]

    # (a) the trainer's evaluation transform: from the processor, without one, and through the data pipeline
    from_processor = image_transform_from_processor(processor, family, train=False)
    standalone = build_image_transform(family, train=False, image_size=IMAGE_SIZE)
    trained = _training_pixel_values(folder, processor, recipe, tmp_path)
    # (b) hf-vlm eval: its data loader, then the processor loaded as `hf-vlm eval` loads it, in one batch
    data = runner.load_eval_data(str(folder))
    assert data.skipped == {}
    evaluated = runner.image_inputs(AutoProcessor.from_pretrained(saved), data.images)
    evaluated = {refs[0]: pixels for refs, pixels in zip(data.captions, evaluated)}
    # (d) the Space: its image input hands over the file untouched, prepare_image decodes it
    space_processor = processor_class.from_pretrained(saved)
    component = space._image_input("test-image")

    assert set(trained) == set(evaluated) == set(expected)
    for name in expected:
        path = folder / name
        decoded = load_rgb_image(str(path))
        # (c) the model's processor, given the decoded image
        reference = processor(images=decoded, return_tensors="pt")["pixel_values"][0]
        assert reference.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and reference.dtype == torch.float32
        uploaded = component.preprocess(ImageData(path=str(path), orig_name=name))
        assert uploaded == str(path)  # gradio neither decodes nor converts it
        shown, _ = space.prepare_image(uploaded)
        in_space = space_processor(images=shown, return_tensors="pt")["pixel_values"][0]
        for path_name, pixels in (("transform from the processor", from_processor(decoded)),
                                  ("build_image_transform", standalone(decoded)),
                                  ("training pipeline", trained[name]),
                                  ("hf-vlm eval", evaluated[name]),
                                  ("the Space", in_space)):
            assert torch.equal(pixels, reference), f"{name}: {path_name} differs from the processor"
        # a sensible picture: the 16-bit ramp is mid-gray on average, not near-white
        mean = reference.mean(dim=(1, 2)) * torch.tensor(processor.image_processor.image_std) \
            + torch.tensor(processor.image_processor.image_mean)
        if name in ("gray16.png", "rgb48.png", "float.tiff"):
            assert 0.35 < mean.mean().item() < 0.65, (name, mean)


def test_each_family_evaluates_as_its_upstream_does():
    """BLIP-2 (LAVIS blip_image_eval) squashes the whole image to a square; CoCa (open_clip) resizes the short
    side and center-crops: a 2:1 image whose outer quarters are red keeps them in BLIP-2's view only."""
    wide = np.zeros((32, 64, 3), np.uint8)
    wide[:, :16] = wide[:, 48:] = (255, 0, 0)
    image = Image.fromarray(wide)
    blip2 = build_image_transform("blip2", train=False, image_size=32)(image)
    coca = build_image_transform("coca", train=False, image_size=32)(image)
    red = build_image_transform("coca", train=False, image_size=32)(Image.new("RGB", (32, 32), (255, 0, 0)))
    assert torch.equal(blip2[:, :, 0], red[:, :, 0])  # the red edge is in the square
    assert not torch.allclose(coca[:, :, 0], red[:, :, 0], atol=0.5)  # cropped away


# ------------------------------------------------------------------------------- bad files downstream


def test_bad_files_are_counted_by_eval_and_training_and_refused_by_the_space(good_files, tmp_path):
    from hf_vlm.data.pipeline import SamplePreparer

    folder = tmp_path / "mixed"
    folder.mkdir()
    good_folder, _ = good_files
    (folder / "gray16.png").write_bytes((good_folder / "gray16.png").read_bytes())
    bad = {"zero.png": b"", "random.jpg": np.random.RandomState(1).bytes(500),
           "bomb.png": png_header_claiming(10_000, 6_000), "gigantic.png": png_header_claiming(40_000, 40_000)}
    for name, data in bad.items():
        (folder / name).write_bytes(data)
    names = ["gray16.png", *bad]
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "caption": n}) + "\n" for n in names))

    data = runner.load_eval_data(str(folder))  # used to crash on the bomb (DecompressionBombError)
    assert data.skipped == {"corrupt_image": 2, "oversized_image": 2}  # training's reasons (hf_vlm.data.skips)
    assert data.captions == [["gray16.png"]]

    counter = SkipCounter()
    preparer = SamplePreparer(build_image_transform("coca", train=False, image_size=IMAGE_SIZE), counter)
    for name in names:
        prepared = preparer({"image": {"bytes": (folder / name).read_bytes(), "path": name}, "text": "a caption"})
        assert (prepared is None) == (name in bad)
    bombs = sum("bomb" in name or "gigantic" in name for name in bad)
    assert counter.counts()["corrupt_image"] == len(bad) - bombs and counter.counts()["oversized_image"] == bombs

    with pytest.raises(gr.Error, match="zero.png could not be decoded as an image: UnidentifiedImageError"):
        space.prepare_image(str(folder / "zero.png"))
    with pytest.raises(gr.Error, match="gigantic.png could not be decoded as an image: decompression bomb"):
        space.prepare_image(str(folder / "gigantic.png"))


def test_the_space_says_what_decoding_changed(good_files):
    folder, _ = good_files
    notices = {name: space.prepare_image(str(folder / name))[1] for name in
               ("exif6.jpg", "gray16.png", "float.tiff", "rgba.png", "palette.png", "cmyk.jpg")}
    assert notices == {
        "exif6.jpg": "Note: the image was rotated upright as its EXIF orientation says.",
        "gray16.png": "Note: the image was scaled from 16 bits to 8 bits per channel.",
        "float.tiff": "Note: the image was scaled from floating point to 8 bits per channel.",
        "rgba.png": "Note: the image was put on a white background where transparent.",
        "palette.png": "Note: the image was put on a white background where transparent.",
        "cmyk.jpg": "",
    }
