"""The Gradio Space (hf_vlm.space, spaces/, `hf-vlm space`).

Input checks are tested as functions; the app itself is launched once per module from spaces/app.py
with tiny random BLIP-2 and CoCa checkpoints, then driven through gradio_client (every API endpoint)
and through Debian's headless Chromium with Playwright (marked `browser`).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import gradio as gr
import pytest
from PIL import Image

from hf_vlm import space

REPO = Path(__file__).resolve().parents[1]
SPACE_DIR = REPO / "spaces"
ARTIFACTS = REPO / "test-artifacts"


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header announces width x height pixels (no pixel data): tests the refusal of
    gigantic uploads without allocating them."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------------ input checks


def test_small_images_pass_unchanged_and_large_ones_are_downscaled_with_a_notice():
    small = Image.new("RGBA", (300, 200), (255, 0, 0, 128))
    image, notice = space.prepare_image(small)
    assert image.mode == "RGB" and image.size == (300, 200) and notice == ""

    large = Image.new("RGB", (3000, 1500), "blue")
    image, notice = space.prepare_image(large)
    assert image.size == (space.MAX_IMAGE_SIDE, space.MAX_IMAGE_SIDE // 2)
    assert notice == f"Note: the image was downscaled from 3000×1500 to {space.MAX_IMAGE_SIDE}×512 pixels."
    assert large.size == (3000, 1500)  # the caller's image is left alone


def test_a_missing_image_is_a_message():
    with pytest.raises(gr.Error, match="No image"):
        space.prepare_image(None)


def test_questions_are_normalised_and_bounded():
    assert space.check_question("  what   color is\nthe circle? ") == "what color is the circle?"
    with pytest.raises(gr.Error, match="empty"):
        space.check_question("   ")
    with pytest.raises(gr.Error, match=f"{space.MAX_QUESTION_CHARS + 1} characters long"):
        space.check_question("x" * (space.MAX_QUESTION_CHARS + 1))


def test_labels_are_split_on_commas_without_blanks_or_duplicates():
    assert space.parse_labels(" red circle, blue  square,,red circle , ") == ["red circle", "blue square"]
    with pytest.raises(gr.Error, match="No labels"):
        space.parse_labels(" , ,")
    with pytest.raises(gr.Error, match=f"at most {space.MAX_LABELS}"):
        space.parse_labels(",".join(f"class {i}" for i in range(space.MAX_LABELS + 1)))
    with pytest.raises(gr.Error, match="longer than"):
        space.parse_labels("y" * (space.MAX_LABEL_CHARS + 1))


def test_the_zero_shot_template_needs_exactly_one_placeholder():
    assert space.check_template(" a photo of a {}. ") == "a photo of a {}."
    for bad in ("a photo", "{} and {}", ""):
        with pytest.raises(gr.Error, match="exactly once"):
            space.check_template(bad)


def test_decoding_controls_map_to_generate_arguments_within_bounds():
    assert space.generation_kwargs("greedy", 5, 12, 0.7, 0.5) == {"max_new_tokens": 12, "num_beams": 1, "do_sample": False}
    assert space.generation_kwargs("beam search", 4, 12, 0.7, 0.5) == {"max_new_tokens": 12, "num_beams": 4, "do_sample": False}
    assert space.generation_kwargs("nucleus sampling", 4, 12, 0.7, 0.5) == {
        "max_new_tokens": 12, "num_beams": 1, "do_sample": True, "temperature": 0.7, "top_p": 0.5,
    }
    for args, message in [
        (("contrastive", 1, 12, 1.0, 1.0), "decoding must be one of"),
        (("greedy", 1, space.MAX_NEW_TOKENS[1] + 1, 1.0, 1.0), "max new tokens must be between"),
        (("beam search", space.NUM_BEAMS[1] + 1, 12, 1.0, 1.0), "beams must be between"),
        (("nucleus sampling", 1, 12, 0.0, 1.0), "temperature must be between"),
        (("nucleus sampling", 1, 12, 1.0, 0.0), "top-p must be between"),
    ]:
        with pytest.raises(gr.Error, match=message):
            space.generation_kwargs(*args)


def test_uploads_that_are_not_images_or_too_large_to_decode_are_refused(tmp_path):
    from gradio.data_classes import ImageData

    not_image = tmp_path / "notes.png"
    not_image.write_text("this is text")
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_header_claiming(10_000, 6_000))  # over our limit, under PIL's bomb limit
    gigantic = tmp_path / "gigantic.png"
    gigantic.write_bytes(png_header_claiming(40_000, 40_000))  # over PIL's bomb limit too
    fine = tmp_path / "fine.png"
    Image.new("RGB", (40, 30), "red").save(fine)

    component = space.checked_image(type="pil")
    with pytest.raises(gr.Error, match="notes.png is not a readable image"):
        component.preprocess(ImageData(path=str(not_image), orig_name="notes.png"))
    with pytest.raises(gr.Error, match="huge.png is 10000×6000 pixels; images up to 50 megapixels"):
        component.preprocess(ImageData(path=str(huge), orig_name="huge.png"))
    with pytest.raises(gr.Error, match="gigantic.png has far too many pixels; images up to 50 megapixels"):
        component.preprocess(ImageData(path=str(gigantic), orig_name="gigantic.png"))
    assert component.preprocess(ImageData(path=str(fine), orig_name="fine.png")).size == (40, 30)
    assert component.preprocess(None) is None


# ------------------------------------------------------------------------------- configuration and files


def test_models_come_from_the_environment_then_the_demo_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setenv(space.DEMO_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(space.BLIP2_ENV, raising=False)
    assert space.demo_checkpoint("coca") == tmp_path / "checkpoints" / "coca"
    assert space.model_source(space.BLIP2_ENV, "blip2") is None  # no demo checkpoint yet

    demo_blip2 = tmp_path / "checkpoints" / "blip2"
    demo_blip2.mkdir(parents=True)
    (demo_blip2 / "config.json").write_text("{}")
    assert space.model_source(space.BLIP2_ENV, "blip2") == str(demo_blip2)

    monkeypatch.setenv(space.BLIP2_ENV, "org/blip2-flan-t5-xl")
    assert space.model_source(space.BLIP2_ENV, "blip2") == "org/blip2-flan-t5-xl"


def test_space_readme_has_the_front_matter_the_hub_reads():
    from huggingface_hub import SpaceCard

    card = SpaceCard.load(SPACE_DIR / "README.md").data
    assert card.sdk == "gradio"
    assert card.sdk_version == gr.__version__
    assert (SPACE_DIR / card.app_file).is_file()
    assert card.license == "apache-2.0"
    assert len(card.models) == 2 and all("/" in model for model in card.models)
    assert {"image-captioning", "visual-question-answering", "zero-shot-image-classification"} <= set(card.tags)


def test_space_requirements_install_hf_vlm_and_the_tested_gradio():
    lines = [line.split("#")[0].strip() for line in (SPACE_DIR / "requirements.txt").read_text().splitlines()]
    requirements = [line for line in lines if line]
    assert any(line.startswith("hf-vlm") for line in requirements)
    assert f"gradio=={gr.__version__}" in requirements


def test_hf_vlm_space_refuses_to_start_without_any_model(tmp_path, monkeypatch, capsys):
    from hf_vlm.cli import main

    monkeypatch.setenv(space.DEMO_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(space.BLIP2_ENV, raising=False)
    monkeypatch.delenv(space.COCA_ENV, raising=False)
    assert main(["space", "--port", "7999"]) == 2
    assert "no model to serve" in capsys.readouterr().err
