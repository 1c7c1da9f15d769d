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

# gradio 6.31's queue statistics call pandas APIs that pandas 3 deprecates: gradio's warnings, not ours.
pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")

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


def test_images_reach_the_processor_as_the_shared_decoder_gives_them_at_full_size():
    """No downscaling: the Space's pixel_values are eval's and training's (tests/test_images.py)."""
    small = Image.new("RGBA", (300, 200), (255, 0, 0, 128))
    image, notice = space.prepare_image(small)
    assert image.mode == "RGB" and image.size == (300, 200) and image.getpixel((0, 0)) == (255, 127, 127)
    assert notice == "Note: the image was put on a white background where transparent."

    large = Image.new("RGB", (3000, 1500), "blue")
    image, notice = space.prepare_image(large)
    assert image.size == (3000, 1500) and notice == ""
    assert image is not large and large.mode == "RGB"  # the caller's image is left alone


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


def test_the_zero_shot_template_is_plain_text_with_a_length_cap():
    """`{{}}{:>20000000}` once made each label 20 MB through str.format; substituted as text it stays short."""
    hostile = space.check_template("{{}}{:>20000000}")
    assert space.fill_template(hostile, "cat") == "{cat}{:>20000000}"
    assert space.fill_template(space.check_template("{0.__class__} {}"), "cat") == "{0.__class__} cat"
    with pytest.raises(gr.Error, match=f"{space.MAX_TEMPLATE_CHARS + 1} characters long; the limit is"):
        space.check_template("{}" + "x" * (space.MAX_TEMPLATE_CHARS - 1))
    with pytest.raises(gr.Error, match="labels field is .* characters long"):
        space.parse_labels("a" * (space.MAX_LABELS_TEXT_CHARS + 1))
    assert space.parse_labels(",".join(["x" * space.MAX_LABEL_CHARS] * 2)) == ["x" * space.MAX_LABEL_CHARS]


def test_every_text_input_of_the_ui_is_bounded_in_the_browser_too(app_demo):
    """Each textbox a visitor types into has a max_length no larger than the server's own check."""
    bounds = {"vqa-question": space.MAX_QUESTION_CHARS, "retrieval-query": space.MAX_QUESTION_CHARS,
              "zero-shot-labels": space.MAX_LABELS_TEXT_CHARS, "zero-shot-template": space.MAX_TEMPLATE_CHARS}
    boxes = {block.elem_id: block for block in app_demo.blocks.values()
             if isinstance(block, gr.Textbox) and block.interactive is not False and block.elem_id}
    assert {name: box.max_length for name, box in boxes.items()} == bounds


def test_decoding_controls_map_to_generate_arguments_within_bounds():
    assert space.generation_kwargs("recommended", 5, 12, 0.7, 0.5) == {}  # the checkpoint's generation config
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


def test_hf_vlm_space_names_a_model_it_cannot_load(tmp_path, monkeypatch, capsys):
    from hf_vlm.cli import main

    monkeypatch.setenv(space.DEMO_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(space.BLIP2_ENV, str(tmp_path / "missing"))
    assert main(["space"]) == 2
    assert f"{tmp_path / 'missing'} (from HF_VLM_BLIP2): no checkpoint there" in capsys.readouterr().err

    monkeypatch.delenv(space.BLIP2_ENV)
    monkeypatch.setenv(space.COCA_ENV, "org/not-in-the-cache")  # offline: the Hub cannot be asked
    assert main(["space"]) == 2
    assert "org/not-in-the-cache (from HF_VLM_COCA): could not load a CocaModel" in capsys.readouterr().err


def test_the_demo_coca_gets_the_scenes_zero_shot_template_and_other_checkpoints_clips(tmp_path, monkeypatch):
    from hf_vlm import scenes

    monkeypatch.setenv(space.DEMO_DIR_ENV, str(tmp_path))
    demo_coca = space.LoadedModel(model=None, processor=None, source=str(space.demo_checkpoint("coca")))
    hub_coca = space.LoadedModel(model=None, processor=None, source="org/coca-large-v2")
    assert space.SpaceModels(blip2=None, coca=demo_coca).zero_shot_template() == scenes.ZERO_SHOT_TEMPLATE
    assert space.SpaceModels(blip2=None, coca=hub_coca).zero_shot_template() == space.ZERO_SHOT_TEMPLATE


def test_space_readme_has_the_front_matter_the_hub_reads():
    from huggingface_hub import SpaceCard

    card = SpaceCard.load(SPACE_DIR / "README.md").data
    assert card.sdk == "gradio"
    assert card.sdk_version == gr.__version__
    assert (SPACE_DIR / card.app_file).is_file()
    assert card.license == "apache-2.0"
    assert len(card.models) == 2 and all("/" in model for model in card.models)
    assert {"image-captioning", "visual-question-answering", "zero-shot-image-classification"} <= set(card.tags)
    assert card.suggested_hardware == "zero-a10g" and card.preload_from_hub == card.models


def test_model_calls_run_under_spaces_gpu_where_the_spaces_package_is_installed(monkeypatch):
    """ZeroGPU: `spaces.GPU` wraps the model calls when importable; elsewhere (and with a checkout's spaces/ folder
    on the path, which has no GPU) the functions are left as they are."""
    import sys
    import types

    def model_call():
        return "ran"

    assert space.on_gpu(model_call) is model_call  # here `import spaces` is this repository's folder, or nothing
    wrapped = []
    fake = types.ModuleType("spaces")
    fake.GPU = lambda duration: lambda fn: wrapped.append((fn, duration)) or (lambda: "on a GPU: " + fn())
    monkeypatch.setitem(sys.modules, "spaces", fake)
    assert space.on_gpu(model_call)() == "on a GPU: ran" and wrapped == [(model_call, space.GPU_SECONDS)]


def test_the_low_memory_cpu_path_loads_bfloat16_weights(tiny_checkpoints, monkeypatch):
    import torch

    monkeypatch.setenv(space.CPU_DTYPE_ENV, "bfloat16")
    assert space.device_and_dtype() == (torch.device("cpu"), torch.bfloat16)
    assert space.load_models(coca=str(tiny_checkpoints["coca"])).coca.dtype == torch.bfloat16
    monkeypatch.setenv(space.CPU_DTYPE_ENV, "float16")
    with pytest.raises(space.ModelLoadError, match="HF_VLM_CPU_DTYPE='float16': choose one of float32, bfloat16"):
        space.device_and_dtype()


def test_the_examples_are_licensed_photographs_then_scenes(tmp_path):
    examples = space.write_examples(tmp_path)
    photos = [Path(e.image_path).name for e in examples[:len(space.EXAMPLE_PHOTOS)]]
    assert photos == list(space.EXAMPLE_PHOTOS) and len(examples) == len(photos) + space.EXAMPLE_SCENES
    licences = (space.photos_folder() / "LICENSES.md").read_text()
    assert all(name in licences for name in photos) and "CC0" in licences and "public domain" in licences
    assert all(Image.open(e.image_path).size[0] >= 256 for e in examples)


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


# ------------------------------------------------------------------------------------ the launched app


def save_tiny_blip2(path: Path, t5_tokenizer_dir: Path) -> Path:
    import torch
    from transformers import AutoTokenizer

    from hf_vlm.modeling.blip2_flant5 import Blip2FlanT5ForConditionalGeneration, Blip2FlanT5Processor
    from hf_vlm.presets import get_config

    config = get_config("blip2-tiny")
    torch.manual_seed(0)
    model = Blip2FlanT5ForConditionalGeneration(config)
    processor = Blip2FlanT5Processor.from_tokenizers(AutoTokenizer.from_pretrained(t5_tokenizer_dir),
                                                     image_size=config.vision_config.image_size)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def save_tiny_coca(path: Path) -> Path:
    import torch

    from hf_vlm.modeling.coca import CocaModel, CocaProcessor
    from hf_vlm.presets import get_config
    from hf_vlm.testing import TINY_CORPUS
    from hf_vlm.tokenization import train_coca_tokenizer

    config = get_config("coca-tiny")
    torch.manual_seed(0)
    model = CocaModel(config)
    tokenizer = train_coca_tokenizer(TINY_CORPUS, vocab_size=config.text_config.vocab_size)
    processor = CocaProcessor.from_tokenizer(tokenizer, image_size=config.vision_config.image_size)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


ENDPOINTS = {"/caption", "/answer", "/classify", "/retrieve"}
GREEDY = ("greedy", space.NUM_BEAMS[2], space.MAX_NEW_TOKENS[2], space.TEMPERATURE[2], space.TOP_P[2])


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory, t5_tokenizer_dir) -> dict[str, Path]:
    """Randomly initialised tiny BLIP-2 and CoCa checkpoints (model + processor), saved like real ones."""
    root = tmp_path_factory.mktemp("space_checkpoints")
    return {"blip2": save_tiny_blip2(root / "blip2", t5_tokenizer_dir), "coca": save_tiny_coca(root / "coca")}


@pytest.fixture(scope="module")
def models(tiny_checkpoints) -> space.SpaceModels:
    """The same checkpoints loaded in the test process: what the app's answers are compared with."""
    return space.load_models(blip2=str(tiny_checkpoints["blip2"]), coca=str(tiny_checkpoints["coca"]))


@pytest.fixture(scope="module")
def app_demo(tiny_checkpoints):
    """spaces/app.py, run as the Space runs it (models named by the environment), served on 127.0.0.1."""
    import runpy

    with pytest.MonkeyPatch.context() as env:
        env.setenv(space.BLIP2_ENV, str(tiny_checkpoints["blip2"]))
        env.setenv(space.COCA_ENV, str(tiny_checkpoints["coca"]))
        demo = runpy.run_path(str(SPACE_DIR / "app.py"))["demo"]  # not __main__: builds, does not launch
    space.launch(demo, host="127.0.0.1", prevent_thread_lock=True, quiet=True)
    yield demo
    demo.close()


@pytest.fixture(scope="module")
def app_url(app_demo) -> str:
    return app_demo.local_url


@pytest.fixture(scope="module")
def client(app_url):
    from gradio_client import Client

    return Client(app_url, verbose=False)


@pytest.fixture(scope="module")
def scene_png(tmp_path_factory) -> Path:
    from hf_vlm.scenes import sample_scene, scene_seed

    path = tmp_path_factory.mktemp("images") / "scene.png"
    sample_scene(scene_seed("test", 7)).render().resize((128, 128), Image.Resampling.NEAREST).save(path)
    return path


def direct_text(loaded: space.LoadedModel, image_path: Path, prompt: str | None = None, **gen_kwargs) -> str:
    """What the checkpoint generates for this image, called without the app: with its own decoding for the task
    (BLIP-2 captions: caption_generation_config.json; otherwise generation_config.json) and `gen_kwargs` on top."""
    import torch
    from transformers import GenerationConfig

    image = Image.open(image_path).convert("RGB")
    inputs = loaded.processor(images=image, return_tensors="pt", **({"text": prompt} if prompt else {}))
    extra = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]} if prompt else {}
    blip2_caption = prompt is None and (Path(loaded.source) / "caption_generation_config.json").is_file()
    config = GenerationConfig.from_pretrained(
        loaded.source, "caption_generation_config.json" if blip2_caption else "generation_config.json")
    with torch.inference_mode():
        token_ids = loaded.model.generate(pixel_values=inputs["pixel_values"], **extra, generation_config=config,
                                          **gen_kwargs)
    return loaded.processor.batch_decode(token_ids, skip_special_tokens=True)[0].strip()


def direct_probabilities(loaded: space.LoadedModel, image_path: Path, labels: list[str], template: str) -> list[float]:
    import torch

    image = Image.open(image_path).convert("RGB")
    inputs = loaded.processor(images=image, text=[template.format(label) for label in labels], return_tensors="pt",
                              padding=True)
    with torch.inference_mode():
        logits = loaded.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                              pixel_values=inputs["pixel_values"]).logits_per_image
    return logits[0].softmax(-1).tolist()


def test_the_app_exposes_one_api_endpoint_per_task(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert set(endpoints) == ENDPOINTS


def test_model_calls_are_queued_one_at_a_time(app_demo):
    model_events = [fn for fn in app_demo.fns.values() if fn.api_name in {name[1:] for name in ENDPOINTS}]
    assert len(model_events) == len(ENDPOINTS)
    assert {(fn.concurrency_id, fn.concurrency_limit) for fn in model_events} == {("models", space.CONCURRENCY_LIMIT)}
    assert app_demo._queue.max_size == space.MAX_QUEUE_SIZE


def test_models_load_in_bfloat16_where_a_gpu_would_run_them(tiny_checkpoints, monkeypatch, scene_png):
    """On a GPU the Space loads bf16 weights; simulated on the CPU: the app feeds them matching inputs."""
    import torch

    assert space.device_and_dtype() == (torch.device("cpu"), torch.float32)  # this machine has no GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert space.device_and_dtype() == (torch.device("cuda"), torch.bfloat16)

    monkeypatch.setattr(space, "device_and_dtype", lambda: (torch.device("cpu"), torch.bfloat16))
    models = space.load_models(blip2=str(tiny_checkpoints["blip2"]), coca=str(tiny_checkpoints["coca"]))
    assert models.blip2.dtype == models.coca.dtype == torch.bfloat16
    app = space.SpaceApp(models)
    image = Image.open(scene_png)
    short = ("greedy", 1, 4, 1.0, 1.0)
    blip2_caption, coca_caption, _ = app.caption(image, *short, progress=lambda *args, **kwargs: None)
    assert isinstance(blip2_caption, str) and isinstance(coca_caption, str)
    top, chart, _ = app.classify(image, "red circle, blue square", "a large {}")
    assert sum(top.values()) == pytest.approx(1.0, abs=1e-5)


def test_caption_endpoint_returns_both_models_captions(client, models, scene_png):
    from gradio_client import handle_file

    blip2_caption, coca_caption, notice = client.predict(handle_file(str(scene_png)), *GREEDY, api_name="/caption")
    greedy = {"max_new_tokens": GREEDY[2], "num_beams": 1, "do_sample": False}
    assert blip2_caption == direct_text(models.blip2, scene_png, **greedy)
    assert coca_caption == direct_text(models.coca, scene_png, **greedy)
    assert blip2_caption and coca_caption  # random tiny models still say something with these seeds
    assert notice == ""

    beams = client.predict(handle_file(str(scene_png)), "beam search", 3, 6, 1.0, 0.9, api_name="/caption")
    assert beams[:2] == (direct_text(models.blip2, scene_png, max_new_tokens=6, min_new_tokens=6, num_beams=3),
                         direct_text(models.coca, scene_png, max_new_tokens=6, num_beams=3))

    # The default: each checkpoint's recommended decoding, nothing from the sliders.
    recommended = client.predict(handle_file(str(scene_png)), "recommended", 1, 2, 1.0, 0.9, api_name="/caption")
    assert recommended[:2] == (direct_text(models.blip2, scene_png), direct_text(models.coca, scene_png))

    sampled = client.predict(handle_file(str(scene_png)), "nucleus sampling", 1, 4, 0.8, 0.9, api_name="/caption")
    for caption, loaded in zip(sampled[:2], (models.blip2, models.coca)):
        assert isinstance(caption, str)
        assert len(loaded.processor.tokenizer(caption, add_special_tokens=False)["input_ids"]) <= 4 + 1


def test_answer_endpoint_asks_blip2_with_the_vqa_prompt(client, models, scene_png):
    from gradio_client import handle_file

    answer, prompt, notice = client.predict(handle_file(str(scene_png)), "  what color is   the circle? ", *GREEDY,
                                            api_name="/answer")
    assert prompt == "Question: what color is the circle? Short answer:"
    assert answer == direct_text(models.blip2, scene_png, prompt, max_new_tokens=GREEDY[2], num_beams=1)
    assert notice == ""


def test_classify_endpoint_returns_a_probability_per_label(client, models, scene_png):
    from gradio_client import handle_file

    labels = ["red circle", "blue square", "green triangle", "yellow circle"]
    template = "a large {}"
    top, chart, notice = client.predict(handle_file(str(scene_png)), ", ".join(labels) + ", red circle", template,
                                        api_name="/classify")
    confidences = {item["label"]: item["confidence"] for item in top["confidences"]}
    assert set(confidences) == set(labels)  # the duplicate is gone
    assert sum(confidences.values()) == pytest.approx(1.0, abs=1e-5)
    expected = dict(zip(labels, direct_probabilities(models.coca, scene_png, labels, template)))
    assert confidences == pytest.approx(expected, abs=1e-5)
    assert top["label"] == max(expected, key=expected.get)
    assert chart["mark"] == "bar" and chart["columns"] == ["label", "probability"]
    assert dict(chart["data"]) == pytest.approx(expected, abs=1e-5)
    assert notice == ""


def test_retrieve_endpoint_ranks_the_uploaded_images_by_the_query(client, models, tmp_path):
    import torch
    from gradio_client import handle_file

    paths = [Path(e.image_path) for e in space.write_examples(tmp_path)]
    query = "a large red circle"
    ranked, notice = client.predict([{"image": handle_file(str(p))} for p in paths], query, api_name="/retrieve")

    images = [Image.open(p).convert("RGB") for p in paths]
    inputs = models.coca.processor(images=images, text=[query], return_tensors="pt", padding=True)
    with torch.inference_mode():
        probs = models.coca.model(**inputs).logits_per_text[0].softmax(-1).tolist()
    order = sorted(range(len(paths)), key=lambda i: -probs[i])
    assert [Path(item["image"]).name for item in ranked] == [paths[i].name for i in order]
    assert [item["caption"] for item in ranked] == [f"{rank}. {probs[i]:.1%}" for rank, i in enumerate(order, 1)]
    assert notice == ""


def test_what_decoding_changed_is_a_visible_notice(client, models, tmp_path):
    from gradio_client import handle_file

    deep = tmp_path / "deep.png"
    Image.new("I;16", (64, 48), 30000).save(deep)
    *_, notice = client.predict(handle_file(str(deep)), *GREEDY, api_name="/caption")
    assert notice == "Note: the image was scaled from 16 bits to 8 bits per channel."


@pytest.mark.parametrize(
    ("endpoint", "arguments", "message"),
    [
        ("/caption", (None, *GREEDY), "No image: upload one"),
        ("/caption", ("NOT_AN_IMAGE", *GREEDY), "notes.png is not a readable image"),
        ("/caption", ("HUGE", *GREEDY), "huge.png is 10000×6000 pixels"),
        ("/caption", ("IMAGE", "beam search", 99, 8, 1.0, 0.9), "greater than maximum value 8"),
        ("/answer", ("IMAGE", "", *GREEDY), "The question is empty"),
        ("/answer", ("IMAGE", "why? " * 100, *GREEDY), "characters long; the limit is 200"),
        ("/classify", ("IMAGE", " , ", "a photo of a {}."), "No labels"),
        ("/classify", ("IMAGE", "cat, dog", "a photo"), "must contain `{}` exactly once"),
        ("/classify", ("IMAGE", "cat, dog", "{}" + "{:>9}" * 30), "characters long; the limit is 128"),
        ("/classify", ("IMAGE", "cat," * 400, "a photo of a {}."), "labels field is 1600 characters long"),
        ("/retrieve", ([], "a red circle"), "No images: upload a few"),
        ("/retrieve", (["IMAGE"] * (space.MAX_RETRIEVAL_IMAGES + 1), "a red circle"), "at most 16 are searched"),
        ("/retrieve", (["IMAGE", "NOT_AN_IMAGE"], "a red circle"), "notes.png is not a readable image"),
        ("/retrieve", (["IMAGE"], "  "), "The query is empty"),
    ],
)
def test_bad_input_gets_a_message_not_a_traceback(client, scene_png, tmp_path, endpoint, arguments, message):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "huge.png").write_bytes(png_header_claiming(10_000, 6_000))
    files = {"IMAGE": scene_png, "NOT_AN_IMAGE": tmp_path / "notes.png", "HUGE": tmp_path / "huge.png"}

    def upload(value):
        if isinstance(value, list):  # a gallery
            return [{"image": upload(item)} for item in value]
        return handle_file(str(files[value])) if isinstance(value, str) and value in files else value

    arguments = [upload(value) for value in arguments]
    with pytest.raises(AppError) as error:
        client.predict(*arguments, api_name=endpoint)
    assert message in str(error.value)
    assert "Traceback" not in str(error.value)


def test_hf_vlm_space_serves_the_app_with_the_models_named_by_the_environment(tiny_checkpoints, models, scene_png,
                                                                            monkeypatch, capsys):
    """The command runs as a user runs it (blocking in `launch`), here in a thread so the test can call it
    and then stop it."""
    import socket
    import threading

    from gradio_client import Client, handle_file

    from hf_vlm.cli import main

    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv(space.BLIP2_ENV, str(tiny_checkpoints["blip2"]))
    monkeypatch.setenv(space.COCA_ENV, str(tiny_checkpoints["coca"]))
    built, build_demo = [], space.build_demo

    def build_and_keep(*args, **kwargs):  # the real build; the test keeps the app to stop it at the end
        built.append(build_demo(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(space, "build_demo", build_and_keep)
    exit_codes = []
    command = threading.Thread(target=lambda: exit_codes.append(main(["space", "--port", str(port)])), daemon=True)
    command.start()
    try:
        if not wait_for_port(port, command):
            pytest.fail(f"hf-vlm space did not serve on port {port}:\n{capsys.readouterr()}")
        blip2_caption, coca_caption, _ = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(
            handle_file(str(scene_png)), *GREEDY, api_name="/caption")
    finally:
        for demo in built:
            demo.close()  # ends `launch`'s blocking loop: the command returns
        command.join(timeout=60)
    greedy = {"max_new_tokens": GREEDY[2], "num_beams": 1}
    assert blip2_caption == direct_text(models.blip2, scene_png, **greedy)
    assert coca_caption == direct_text(models.coca, scene_png, **greedy)
    assert exit_codes == [0]
    assert f"BLIP-2: {tiny_checkpoints['blip2']} (cpu, float32)" in capsys.readouterr().out


def wait_for_port(port: int, thread, timeout: float = 180) -> bool:
    """True once something listens on 127.0.0.1:`port`; False if `thread` died or `timeout` passed (a guard
    against a hung start, not a speed check)."""
    import socket
    import time

    deadline = time.monotonic() + timeout
    while thread.is_alive() and time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.2)
    return False


# ------------------------------------------------------------------------------ a real browser (Chromium)


@pytest.fixture(scope="module")
def chromium() -> str:
    from hf_vlm.testing import require_executable

    return require_executable("chromium", "make system-deps (apt-get install -y chromium)")


@pytest.fixture(scope="module")
def page(chromium, app_url):
    """A page of the app in Debian's headless Chromium (Playwright's own browser download is not used)."""
    from hf_vlm.testing import require

    sync_api = require("playwright.sync_api", "pip install playwright (part of hf-vlm[dev])")
    with sync_api.sync_playwright() as playwright:
        # --no-sandbox: the tests may run as root; --disable-dev-shm-usage: containers have a tiny /dev/shm.
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(30_000)
        page.goto(app_url)
        yield page
        browser.close()


@pytest.mark.browser
def test_in_the_browser_a_visitor_captions_asks_and_classifies(page, models, scene_png):
    from playwright.sync_api import expect

    ARTIFACTS.mkdir(exist_ok=True)
    recommended = {}  # the UI's default decoding: each checkpoint's generation config

    page.get_by_role("tab", name="Caption").click()
    page.locator("#caption-image input[type=file]").set_input_files(str(scene_png))
    page.click("#caption-button")
    expect(page.locator("#blip2-caption textarea")).to_have_value(direct_text(models.blip2, scene_png, **recommended))
    expect(page.locator("#coca-caption textarea")).to_have_value(direct_text(models.coca, scene_png, **recommended))
    page.screenshot(path=ARTIFACTS / "space-caption.png", full_page=True)

    page.get_by_role("tab", name="Visual question answering").click()
    page.locator("#vqa-image input[type=file]").set_input_files(str(scene_png))
    page.fill("#vqa-question textarea", "how many shapes are there?")
    page.click("#vqa-button")
    prompt = "Question: how many shapes are there? Short answer:"
    expect(page.locator("#vqa-prompt textarea")).to_have_value(prompt)
    expect(page.locator("#vqa-answer textarea")).to_have_value(direct_text(models.blip2, scene_png, prompt, **recommended))
    page.screenshot(path=ARTIFACTS / "space-vqa.png", full_page=True)

    page.get_by_role("tab", name="Zero-shot classification").click()
    page.locator("#zero-shot-image input[type=file]").set_input_files(str(scene_png))
    labels = ["red circle", "blue square", "green triangle"]
    page.fill("#zero-shot-labels textarea", ", ".join(labels))
    template = page.locator("#zero-shot-template textarea").input_value()
    page.click("#zero-shot-button")
    probabilities = direct_probabilities(models.coca, scene_png, labels, template)
    expect(page.locator("#zero-shot-label")).to_contain_text(labels[probabilities.index(max(probabilities))])
    expect(page.locator("#zero-shot-chart canvas, #zero-shot-chart svg").first).to_be_visible()
    page.screenshot(path=ARTIFACTS / "space.png", full_page=True)


@pytest.mark.browser
def test_in_the_browser_examples_load_with_one_click_and_errors_are_shown(page, tmp_path):
    from playwright.sync_api import expect

    page.reload()
    page.get_by_role("tab", name="Visual question answering").click()
    page.click("#vqa-button")  # nothing uploaded yet
    expect(page.get_by_text("No image: upload one, or click an example.")).to_be_visible()

    examples = space.write_examples(tmp_path)  # the same scenes the app drew at startup
    page.locator("tr").filter(has_text=examples[0].question).first.click()
    expect(page.locator("#vqa-question textarea")).to_have_value(examples[0].question)
    expect(page.locator("#vqa-image img")).to_be_visible()


@pytest.mark.browser
def test_in_the_browser_a_visitor_searches_uploaded_images_by_text(page, tmp_path):
    from playwright.sync_api import expect

    examples = space.write_examples(tmp_path)
    page.reload()
    page.get_by_role("tab", name="Retrieval").click()
    page.locator("#retrieval-images input[type=file]").set_input_files([e.image_path for e in examples])
    page.fill("#retrieval-query textarea", examples[1].caption)
    page.click("#retrieval-button")
    ranked = page.locator("#retrieval-ranked")
    for rank in range(1, len(examples) + 1):
        expect(ranked).to_contain_text(f"{rank}. ")
    expect(ranked.locator("img")).to_have_count(len(examples))
    page.screenshot(path=ARTIFACTS / "space-retrieval.png", full_page=True)
