"""The Gradio Space: captioning (BLIP-2 and CoCa side by side), visual question answering (BLIP-2),
zero-shot classification and text-to-image retrieval (CoCa).

spaces/app.py (the file pushed to a Space) and `hf-vlm space` both call `create_demo()`, so the Space
and the local command cannot drift apart. Everything the UI does lives in this module.

Models come from environment variables, never from the UI (a visitor cannot make the server load a path):

    HF_VLM_BLIP2, HF_VLM_COCA   a local folder or a Hub id
    (unset)                     the `make demo` checkpoints: $HF_VLM_DEMO_DIR/checkpoints/{blip2,coca},
                                HF_VLM_DEMO_DIR defaulting to ./.demo (see `demo_checkpoint`)
    HF_VLM_BLIP2_CAPTION        optional: a BLIP-2 that captions (the demo's blip2-caption, its stage-2
                                checkpoint, when the demo's blip2 is loaded); unset: HF_VLM_BLIP2 captions too

They are loaded once, in bf16 on a GPU when one is available, on the CPU in fp32, or in bf16 with
HF_VLM_CPU_DTYPE=bfloat16 (half the memory: BLIP-2-FlanT5-XL takes ~7.9 GB instead of ~15.8 GB; the pushed Space sets
it). On ZeroGPU hardware the model calls run under `spaces.GPU` (`on_gpu`; a no-op where the `spaces` package is not
installed). Each model decodes as its
checkpoint recommends (generation_config.json; BLIP-2's captions: caption_generation_config.json) unless a visitor
chooses greedy, beam search or sampling.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image, UnidentifiedImageError

from hf_vlm.data import images as image_decoding  # the one decoder: training, eval and the Space
from hf_vlm.data.collators import VQA_PROMPT  # the prompt BLIP-2's VQA fine-tune is trained with
from hf_vlm.data.skips import SkippedSample
from hf_vlm.evaluation.decoding import recommended_generation_config, with_overrides
from hf_vlm.evaluation.ranking import fill_template  # plain-text substitution, never str.format

logger = logging.getLogger(__name__)

BLIP2_ENV = "HF_VLM_BLIP2"
COCA_ENV = "HF_VLM_COCA"
BLIP2_CAPTION_ENV = "HF_VLM_BLIP2_CAPTION"
CPU_DTYPE_ENV = "HF_VLM_CPU_DTYPE"  # float32 (default) or bfloat16: the low-memory CPU path
CPU_DTYPES = ("float32", "bfloat16")
GPU_SECONDS = 60  # ZeroGPU: the longest a model call may hold the GPU (`spaces.GPU(duration=...)`)
DEMO_DIR_ENV = "HF_VLM_DEMO_DIR"
DEFAULT_DEMO_DIR = ".demo"

# Input limits: what a visitor may send before getting a message instead of a result.
# Larger files are refused before they are decoded: the decoder's own decompression-bomb limit, one fact for
# training, eval and the Space. Any size below it reaches the processor as decoded (no downscaling here), so
# the Space's pixel_values are those of `hf-vlm eval` and of training's evaluation transform.
MAX_IMAGE_PIXELS = image_decoding.MAX_IMAGE_PIXELS
MAX_UPLOAD_SIZE = "25mb"
MAX_QUESTION_CHARS = 200
MAX_LABELS = 20
MAX_LABEL_CHARS = 64
MAX_LABELS_TEXT_CHARS = MAX_LABELS * (MAX_LABEL_CHARS + 2)  # the whole comma-separated field, refused before splitting
MAX_TEMPLATE_CHARS = 128
MAX_RETRIEVAL_IMAGES = 16

# Generation controls: (minimum, maximum, default) — the sliders and the server-side checks share them.
# "recommended": the checkpoint's own decoding (generation_config.json); the others override it.
DECODING_STRATEGIES = ("recommended", "greedy", "beam search", "nucleus sampling")
NUM_BEAMS = (1, 8, 3)
MAX_NEW_TOKENS = (1, 64, 20)
TEMPERATURE = (0.1, 2.0, 1.0)
TOP_P = (0.1, 1.0, 0.9)

ZERO_SHOT_TEMPLATE = "a photo of a {}."  # CLIP's; the demo CoCa was trained on scenes.ZERO_SHOT_TEMPLATE

# One worker for all model calls: the models are shared, and on a small CPU parallel calls only thrash.
CONCURRENCY_LIMIT = 1
MAX_QUEUE_SIZE = 32


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


def demo_checkpoint(name: str) -> Path:
    """Where `make demo` writes the checkpoint `name` ("blip2" or "coca"): the one place that says so."""
    return Path(os.environ.get(DEMO_DIR_ENV, DEFAULT_DEMO_DIR)) / "checkpoints" / name


def model_source(env_var: str, demo_name: str) -> str | None:
    """The folder or Hub id to load: the environment variable if set, else the demo checkpoint if present."""
    value = os.environ.get(env_var, "").strip()
    if value:
        return value
    default = demo_checkpoint(demo_name)
    return str(default) if (default / "config.json").is_file() else None


@dataclass
class LoadedModel:
    model: Any
    processor: Any
    source: str
    decoding: dict = field(default_factory=dict)  # task -> the checkpoint's GenerationConfig, read once

    def generation_config(self, task: str, **overrides):
        """The checkpoint's decoding for `task` ("caption", "vqa") with the visitor's explicit choices on top."""
        if task not in self.decoding:
            self.decoding[task] = recommended_generation_config(self.model, task)
        return with_overrides(self.decoding[task], **overrides)

    @property
    def device(self):
        return self.model.device

    @property
    def dtype(self):
        return self.model.dtype


@dataclass
class SpaceModels:
    blip2: LoadedModel | None
    coca: LoadedModel | None
    blip2_caption: LoadedModel | None = None  # captions instead of `blip2` when set (the demo's stage 2)

    def zero_shot_template(self) -> str:
        """The demo CoCa learned captions phrased like its scenes; other checkpoints get CLIP's template."""
        from hf_vlm import scenes

        is_demo = self.coca is not None and Path(self.coca.source).resolve() == demo_checkpoint("coca").resolve()
        return scenes.ZERO_SHOT_TEMPLATE if is_demo else ZERO_SHOT_TEMPLATE

    def describe(self) -> str:
        parts = []
        for title, loaded, env_var in (("BLIP-2", self.blip2, BLIP2_ENV), ("CoCa", self.coca, COCA_ENV)):
            if loaded is None:
                parts.append(f"**{title}**: not loaded (set `{env_var}` or run `make demo`)")
            else:
                dtype = str(loaded.dtype).removeprefix("torch.")
                parts.append(f"**{title}**: `{loaded.source}` ({loaded.device.type}, {dtype})")
        if self.blip2_caption is not None:
            parts.append(f"**BLIP-2 captions**: `{self.blip2_caption.source}`")
        report = demo_checkpoint("coca").parent.parent / "report.html"
        if self.coca is not None and Path(self.coca.source).resolve() == demo_checkpoint("coca").resolve() \
                and report.is_file():
            parts.append(f"**Training report** (open in a browser): `{report.resolve()}`")
        return " · ".join(parts)


def device_and_dtype():
    """bf16 on a GPU (FlanT5 must not run in fp16); on the CPU fp32, or bf16 when HF_VLM_CPU_DTYPE=bfloat16."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    cpu_dtype = os.environ.get(CPU_DTYPE_ENV, "").strip() or "float32"
    if cpu_dtype not in CPU_DTYPES:
        raise ModelLoadError(f"{CPU_DTYPE_ENV}={cpu_dtype!r}: choose one of {', '.join(CPU_DTYPES)}")
    return torch.device("cpu"), getattr(torch, cpu_dtype)


def on_gpu(fn):
    """`fn` run under ZeroGPU's `spaces.GPU` when the `spaces` package is importable (on Hugging Face Spaces),
    unchanged otherwise. ZeroGPU attaches a GPU only while such a function runs."""
    try:
        import spaces
    except ImportError:
        return fn
    gpu = getattr(spaces, "GPU", None)  # run from a checkout's root, `import spaces` finds the spaces/ folder
    return gpu(duration=GPU_SECONDS)(fn) if gpu is not None else fn


class ModelLoadError(RuntimeError):
    """A configured model could not be loaded; the message names the variable, the source and the cause."""


def _load(model_class, processor_class, source: str, env_var: str) -> LoadedModel:
    """`source` is a local folder or a Hub id; failures name the source and the variable that sets it."""
    local = Path(source).expanduser()
    if source.startswith(("/", "./", "../", "~")) or local.exists():
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"{source} (from {env_var}): no checkpoint there (expected a folder with config.json)")
        source = str(local)
    device, dtype = device_and_dtype()
    logger.info("loading %s from %s", model_class.__name__, source)
    try:
        model = model_class.from_pretrained(source, dtype=dtype)
        processor = processor_class.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{source} (from {env_var}): could not load a {model_class.__name__}: {err}") from err
    return LoadedModel(model=model.to(device).eval(), processor=processor, source=source)


def load_models(blip2: str | None = None, coca: str | None = None) -> SpaceModels:
    """Load the two models once. A source of None means: from the environment (see the module docstring).
    Raises ModelLoadError when a configured model cannot be loaded."""
    import hf_vlm  # noqa: F401  (registers the model types with transformers)

    blip2 = blip2 or model_source(BLIP2_ENV, "blip2")
    coca = coca or model_source(COCA_ENV, "coca")
    loaded_blip2 = loaded_coca = loaded_blip2_caption = None
    if blip2:
        from hf_vlm.modeling.blip2_flant5 import Blip2FlanT5ForConditionalGeneration, Blip2FlanT5Processor

        loaded_blip2 = _load(Blip2FlanT5ForConditionalGeneration, Blip2FlanT5Processor, blip2, BLIP2_ENV)
        # The demo's VQA fine-tune answers; its stage-2 checkpoint captions (next to it, only for the demo's own).
        caption = os.environ.get(BLIP2_CAPTION_ENV, "").strip()
        if not caption and Path(blip2).resolve() == demo_checkpoint("blip2").resolve():
            caption = model_source(BLIP2_CAPTION_ENV, "blip2-caption")
        if caption:
            loaded_blip2_caption = _load(Blip2FlanT5ForConditionalGeneration, Blip2FlanT5Processor, caption,
                                         BLIP2_CAPTION_ENV)
    if coca:
        from hf_vlm.modeling.coca import CocaModel, CocaProcessor

        loaded_coca = _load(CocaModel, CocaProcessor, coca, COCA_ENV)
    return SpaceModels(blip2=loaded_blip2, coca=loaded_coca, blip2_caption=loaded_blip2_caption)


# --------------------------------------------------------------------------------------------------
# Input checks: each failure is a gr.Error, which the UI shows as a message and an API client receives
# as an error with that text.
# --------------------------------------------------------------------------------------------------


def check_image_file(path: str | Path, name: str | None = None) -> None:
    """Refuse a file that is not an image, or has too many pixels to decode, with a message naming it."""
    name = name or Path(path).name
    max_pixels = image_decoding.MAX_IMAGE_PIXELS  # read at call time: the decoder's limit is the one fact
    limit = f"images up to {max_pixels // 1_000_000} megapixels are accepted"
    try:
        with warnings.catch_warnings():  # PIL's warning threshold is above ours: refused just below instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as header:  # reads the header only
                width, height = header.size
    except Image.DecompressionBombError:  # PIL's own limit (far above ours) refuses to even open it
        raise gr.Error(f"{name} has far too many pixels; {limit}.") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise gr.Error(f"{name} is not a readable image ({type(err).__name__}). Upload a PNG, JPEG or WebP.") from None
    if width * height > max_pixels:
        raise gr.Error(f"{name} is {width}×{height} pixels; {limit}.")


def checked_image(**kwargs) -> gr.Image:
    """A gr.Image whose uploads are checked by `check_image_file` before gradio decodes them (gradio decodes
    before our functions run, so a bad file would otherwise end as an opaque server error). The check
    wraps this instance's preprocess: subclassing a gradio component makes gradio write a .pyi stub."""
    image = gr.Image(**kwargs)
    decode = image.preprocess  # gradio's own

    def preprocess(payload):
        if payload is not None and payload.path:
            check_image_file(payload.path, Path(payload.orig_name or payload.path).name)
        try:
            return decode(payload)
        except (UnidentifiedImageError, OSError, SyntaxError) as err:  # a header that lied
            raise gr.Error(f"The upload could not be decoded as an image ({type(err).__name__}).") from None

    image.preprocess = preprocess
    return image


def prepare_image(image: Image.Image | str | Path | None) -> tuple[Image.Image, str]:
    """The RGB image the models see, decoded by the one decoder (`hf_vlm.data.load_rgb_image`: EXIF
    orientation, 16-bit/float scaling, transparency on white), and a notice saying what decoding changed
    that a visitor might not expect ('' if nothing). `image`: an uploaded file's path (what the image inputs
    give) or a PIL image."""
    if image is None:
        raise gr.Error("No image: upload one, or click an example.")
    name = Path(image).name if isinstance(image, (str, Path)) else "The image"
    try:
        if isinstance(image, Image.Image):
            return image_decoding.load_rgb_image(image), decoding_notice(image)
        with image_decoding.open_image(str(image)) as opened:
            return image_decoding.load_rgb_image(opened), decoding_notice(opened)
    except SkippedSample as skip:
        raise gr.Error(f"{name} could not be decoded as an image: {skip.detail}") from None


def decoding_notice(image: Image.Image) -> str:
    """What `load_rgb_image` does to `image` (not yet converted) beyond decoding it, as a sentence ('' if nothing)."""
    notes = []
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:  # a malformed EXIF block is ignored by the decoder too
        orientation = 1
    if orientation not in (1, None):
        notes.append("rotated upright as its EXIF orientation says")
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        notes.append(f"scaled from {'floating point' if image.mode == 'F' else '16 bits'} to 8 bits per channel")
    if image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info:
        notes.append("put on a white background where transparent")
    return f"Note: the image was {' and '.join(notes)}." if notes else ""


def check_question(question: str | None, what: str = "question") -> str:
    """Whitespace-normalised text, neither empty nor longer than MAX_QUESTION_CHARS."""
    question = " ".join((question or "").split())
    if not question:
        raise gr.Error(f"The {what} is empty: type a {what} about the image.")
    if len(question) > MAX_QUESTION_CHARS:
        raise gr.Error(f"The {what} is {len(question)} characters long; the limit is {MAX_QUESTION_CHARS}.")
    return question


def parse_labels(text: str | None) -> list[str]:
    """Comma-separated class names -> a list without blanks or duplicates (order kept)."""
    if text is not None and len(text) > MAX_LABELS_TEXT_CHARS:
        raise gr.Error(f"The labels field is {len(text)} characters long; the limit is {MAX_LABELS_TEXT_CHARS}.")
    labels = list(dict.fromkeys(" ".join(part.split()) for part in (text or "").split(",")))
    labels = [label for label in labels if label]
    if not labels:
        raise gr.Error("No labels: type class names separated by commas, e.g. `red circle, blue square`.")
    if len(labels) > MAX_LABELS:
        raise gr.Error(f"{len(labels)} labels given; at most {MAX_LABELS} are accepted.")
    too_long = [label for label in labels if len(label) > MAX_LABEL_CHARS]
    if too_long:
        raise gr.Error(f"Label {too_long[0][:20]!r}... is longer than {MAX_LABEL_CHARS} characters.")
    return labels


def check_template(template: str | None) -> str:
    """A prompt template of at most MAX_TEMPLATE_CHARS with `{}` exactly once. It is filled by `fill_template`
    (plain text substitution), never by str.format: a visitor's `{:>99999999}` stays those characters."""
    if template is not None and len(template) > MAX_TEMPLATE_CHARS:
        raise gr.Error(f"The prompt template is {len(template)} characters long; the limit is {MAX_TEMPLATE_CHARS}.")
    template = (template or "").strip()
    if template.count("{}") != 1:
        raise gr.Error(f"The prompt template must contain `{{}}` exactly once (where the label goes), "
                       f"got {template!r}.")
    return template


def _in_bounds(name: str, value, bounds: tuple) -> None:
    low, high, _ = bounds
    if value is None or not (low <= value <= high):
        raise gr.Error(f"{name} must be between {low} and {high}, got {value}.")


def generation_kwargs(decoding: str, num_beams: int, max_new_tokens: int, temperature: float, top_p: float) -> dict:
    """The UI's decoding controls -> keyword arguments of `generate`, each checked against its bounds."""
    if decoding not in DECODING_STRATEGIES:
        raise gr.Error(f"decoding must be one of {', '.join(DECODING_STRATEGIES)}; got {decoding!r}.")
    if decoding == "recommended":
        return {}  # the checkpoint's generation config, as its authors recommend it
    _in_bounds("max new tokens", max_new_tokens, MAX_NEW_TOKENS)
    kwargs = {"max_new_tokens": int(max_new_tokens), "num_beams": 1, "do_sample": False}
    if decoding == "beam search":
        _in_bounds("beams", num_beams, NUM_BEAMS)
        kwargs["num_beams"] = int(num_beams)
    elif decoding == "nucleus sampling":
        _in_bounds("temperature", temperature, TEMPERATURE)
        _in_bounds("top-p", top_p, TOP_P)
        kwargs.update(do_sample=True, temperature=float(temperature), top_p=float(top_p))
    return kwargs


def _visible_errors(fn):
    """Unexpected failures reach the visitor as one line (the traceback goes to the server log)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as err:
            logger.exception("%s failed", fn.__name__)
            raise gr.Error(f"The model could not process this input: {type(err).__name__}: {err}") from None

    return wrapper


# --------------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------------


def _require(loaded: LoadedModel | None, title: str, env_var: str) -> LoadedModel:
    if loaded is None:
        raise gr.Error(f"{title} is not loaded on this server (set {env_var} or run `make demo`).")
    return loaded


@on_gpu
def _generate_text(loaded: LoadedModel, image: Image.Image, prompt: str | None, gen_kwargs: dict) -> str:
    """One decoded generation for `image`; `prompt` (BLIP-2's VQA question) or None (a caption), decoded as the
    checkpoint recommends for that task with the visitor's `gen_kwargs` on top."""
    import torch

    inputs = loaded.processor(images=image, return_tensors="pt", **({} if prompt is None else {"text": prompt}))
    model_inputs = {"pixel_values": inputs["pixel_values"].to(loaded.device, loaded.dtype)}
    if prompt is not None:
        model_inputs.update(input_ids=inputs["input_ids"].to(loaded.device),
                            attention_mask=inputs["attention_mask"].to(loaded.device))
    # a question-aware Q-Former (BLIP-2 qformer_text_input) reads the prompt too, or an empty one for a caption
    model_inputs.update({k: inputs[k].to(loaded.device) for k in ("qformer_input_ids", "qformer_attention_mask")
                         if k in inputs})
    with torch.inference_mode():
        config = loaded.generation_config("caption" if prompt is None else "vqa", **gen_kwargs)
        token_ids = loaded.model.generate(**model_inputs, generation_config=config)
    return loaded.processor.batch_decode(token_ids, skip_special_tokens=True)[0].strip()


@on_gpu
def _logits_per_image(loaded: LoadedModel, images: list, texts: list[str]):
    """CoCa's scaled image-text similarities, [len(images), len(texts)], in fp32."""
    import torch

    inputs = loaded.processor(images=images, text=texts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        outputs = loaded.model(
            input_ids=inputs["input_ids"].to(loaded.device),
            attention_mask=inputs["attention_mask"].to(loaded.device),
            pixel_values=inputs["pixel_values"].to(loaded.device, loaded.dtype),
        )
    return outputs.logits_per_image.float().cpu()


class SpaceApp:
    """The four tasks as plain functions of the inputs (each one is a UI event and an API endpoint)."""

    def __init__(self, models: SpaceModels):
        self.models = models

    @_visible_errors
    def caption(self, image, decoding, num_beams, max_new_tokens, temperature, top_p,
                progress=gr.Progress()):  # noqa: B008  (gradio injects the tracker through this default)
        image, notice = prepare_image(image)
        gen_kwargs = generation_kwargs(decoding, num_beams, max_new_tokens, temperature, top_p)
        if self.models.blip2 is None and self.models.coca is None:
            raise gr.Error("No captioning model is loaded on this server (set HF_VLM_BLIP2 / HF_VLM_COCA).")
        captions = []
        for step, (title, loaded, env_var) in enumerate(
            (("BLIP-2", self.models.blip2_caption or self.models.blip2, BLIP2_ENV), ("CoCa", self.models.coca, COCA_ENV))
        ):
            progress(step / 2, desc=f"{title} captioning")
            if loaded is None:
                captions.append(f"({title} is not loaded: set {env_var})")
            else:
                captions.append(_generate_text(loaded, image, None, gen_kwargs))
        return captions[0], captions[1], notice

    @_visible_errors
    def answer(self, image, question, decoding, num_beams, max_new_tokens, temperature, top_p):
        image, notice = prepare_image(image)
        prompt = VQA_PROMPT.format(check_question(question))
        gen_kwargs = generation_kwargs(decoding, num_beams, max_new_tokens, temperature, top_p)
        loaded = _require(self.models.blip2, "BLIP-2", BLIP2_ENV)
        return _generate_text(loaded, image, prompt, gen_kwargs), prompt, notice

    @_visible_errors
    def classify(self, image, labels_text, template):
        import pandas as pd

        image, notice = prepare_image(image)
        labels = parse_labels(labels_text)
        template = check_template(template)
        loaded = _require(self.models.coca, "CoCa", COCA_ENV)
        logits_per_image = _logits_per_image(loaded, [image], [fill_template(template, label) for label in labels])
        probs = logits_per_image[0].softmax(-1).tolist()
        chart = pd.DataFrame({"label": labels, "probability": probs})
        return dict(zip(labels, probs)), chart, notice

    @_visible_errors
    def retrieve(self, gallery, query):
        """Rank the uploaded images by CoCa's similarity to the text query (text-to-image retrieval)."""
        paths = [item[0] if isinstance(item, (tuple, list)) else item for item in (gallery or [])]
        if not paths:
            raise gr.Error("No images: upload a few images to search among.")
        if len(paths) > MAX_RETRIEVAL_IMAGES:
            raise gr.Error(f"{len(paths)} images uploaded; at most {MAX_RETRIEVAL_IMAGES} are searched.")
        query = check_question(query, what="query")
        images, notices = [], []
        for path in paths:
            check_image_file(path)
            image, notice = prepare_image(path)
            images.append(image)
            if notice:
                notices.append(f"{Path(path).name}: {notice}")
        loaded = _require(self.models.coca, "CoCa", COCA_ENV)
        probs = _logits_per_image(loaded, images, [query])[:, 0].softmax(-1).tolist()
        ranking = sorted(range(len(paths)), key=lambda i: -probs[i])
        ranked = [(paths[i], f"{rank}. {probs[i]:.1%}") for rank, i in enumerate(ranking, start=1)]
        return ranked, "\n\n".join(notices)


# --------------------------------------------------------------------------------------------------
# Examples: public-domain / CC0 photographs shipped with the package (spaces/examples/, licences in LICENSES.md
# there), then synthetic scenes drawn at startup (the `make demo` models' test distribution)
# --------------------------------------------------------------------------------------------------

EXAMPLE_SCENES = 3
EXAMPLE_DISPLAY_SIZE = 256
EXAMPLE_QUESTION_KINDS = ("color", "count", "yes/no")
# file in spaces/examples/ -> (caption, question); from scikit-image's sample data (see LICENSES.md)
EXAMPLE_PHOTOS = {
    "cat.jpg": ("a cat lying on a wooden floor", "what animal is this?"),
    "coffee.jpg": ("a cup of coffee on a saucer", "what is in the cup?"),
    "rocket.jpg": ("a rocket lifting off from a launch pad", "what is taking off?"),
}
PHOTO_LABELS = "cat, dog, cup of coffee, rocket, car"


@dataclass
class Example:
    image_path: str
    caption: str
    question: str
    labels: str


def photos_folder() -> Path | None:
    """spaces/examples/ as installed (package data of the wheel: hf_vlm/spaces/examples) or in the checkout."""
    from importlib.resources import files

    try:
        folder = Path(str(files("hf_vlm.spaces") / "examples"))
    except ModuleNotFoundError:  # an editable install made before spaces/ was package data
        folder = Path(__file__).resolve().parents[1] / "spaces" / "examples"
    return folder if folder.is_dir() else None


def write_examples(folder: str | Path) -> list[Example]:
    """The example photographs (copied into `folder`, where gradio serves files from), then held-out synthetic
    scenes drawn at their training size and enlarged without interpolation so that the processor sees the same
    pixels and visitors see shapes."""
    import shutil

    from hf_vlm import scenes

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    examples = []
    photos = photos_folder()
    for name, (caption, question) in EXAMPLE_PHOTOS.items() if photos else ():
        path = Path(shutil.copy(photos / name, folder / name))
        examples.append(Example(str(path), caption, question, PHOTO_LABELS))
    config = scenes.SceneConfig()
    labels = ", ".join(config.class_names())
    for index in range(EXAMPLE_SCENES):
        scene = scenes.sample_scene(scenes.scene_seed("test", index), config)
        image = scene.render(config.colors).resize((EXAMPLE_DISPLAY_SIZE,) * 2, Image.Resampling.NEAREST)
        path = folder / f"scene_{index}.png"
        image.save(path)
        kind = EXAMPLE_QUESTION_KINDS[index % len(EXAMPLE_QUESTION_KINDS)]
        question = next(q for q, _, qtype in scene.questions() if qtype == kind)
        examples.append(Example(str(path), scene.caption, question, labels))
    return examples


# --------------------------------------------------------------------------------------------------
# The UI
# --------------------------------------------------------------------------------------------------

INTRO = """# hf-vlm: BLIP-2-FlanT5 and CoCa
Caption an image with both models, ask BLIP-2 a question about it, let CoCa pick among your labels, or let
CoCa rank a set of images by a text query.
"""


def _generation_controls():
    with gr.Accordion("Generation settings", open=False):
        decoding = gr.Radio(list(DECODING_STRATEGIES), value="recommended", label="Decoding",
                            info="recommended: each checkpoint's own (generation_config.json); the others use "
                                 "the sliders below")
        with gr.Row():
            num_beams = gr.Slider(*NUM_BEAMS[:2], value=NUM_BEAMS[2], step=1, label="Beams (beam search)")
            max_new_tokens = gr.Slider(*MAX_NEW_TOKENS[:2], value=MAX_NEW_TOKENS[2], step=1, label="Max new tokens")
        with gr.Row():
            temperature = gr.Slider(*TEMPERATURE[:2], value=TEMPERATURE[2], step=0.05, label="Temperature (sampling)")
            top_p = gr.Slider(*TOP_P[:2], value=TOP_P[2], step=0.05, label="Top-p (sampling)")
    return [decoding, num_beams, max_new_tokens, temperature, top_p]


def _image_input(elem_id: str) -> gr.Image:
    # The uploaded file itself (type="filepath", image_mode=None: gradio neither decodes nor converts it), decoded
    # by prepare_image with the decoder training and eval use: gradio's own PIL conversion would turn a 16-bit
    # PNG near-white and put transparency on black.
    return checked_image(type="filepath", image_mode=None, label="Image", sources=["upload", "clipboard"],
                         elem_id=elem_id, height=320)


def build_demo(models: SpaceModels, examples_dir: str | Path | None = None) -> gr.Blocks:
    """The Blocks app for already-loaded models, with its queue configured."""
    app = SpaceApp(models)
    examples = write_examples(examples_dir or tempfile.mkdtemp(prefix="hf_vlm_space_examples_"))
    run = {"concurrency_id": "models", "concurrency_limit": CONCURRENCY_LIMIT}

    with gr.Blocks(title="hf-vlm: BLIP-2 and CoCa") as demo:
        gr.Markdown(INTRO)
        gr.Markdown(models.describe(), elem_id="models")

        with gr.Tab("Caption", id="caption"):
            with gr.Row():
                with gr.Column():
                    image = _image_input("caption-image")
                    controls = _generation_controls()
                    button = gr.Button("Caption", variant="primary", elem_id="caption-button")
                with gr.Column():
                    blip2_caption = gr.Textbox(label="BLIP-2", elem_id="blip2-caption", interactive=False)
                    coca_caption = gr.Textbox(label="CoCa", elem_id="coca-caption", interactive=False)
                    notice = gr.Markdown(elem_id="caption-notice")
            gr.Examples([[e.image_path] for e in examples], inputs=[image], cache_examples=False)
            button.click(app.caption, [image, *controls], [blip2_caption, coca_caption, notice],
                         api_name="caption", **run)

        with gr.Tab("Visual question answering", id="vqa"):
            with gr.Row():
                with gr.Column():
                    image = _image_input("vqa-image")
                    question = gr.Textbox(label="Question", max_length=MAX_QUESTION_CHARS, elem_id="vqa-question",
                                          placeholder="What color is the circle?")
                    gr.Markdown(f"BLIP-2 reads the question as `{VQA_PROMPT.format('<question>')}`.")
                    controls = _generation_controls()
                    button = gr.Button("Answer", variant="primary", elem_id="vqa-button")
                with gr.Column():
                    answer = gr.Textbox(label="Answer", elem_id="vqa-answer", interactive=False)
                    prompt = gr.Textbox(label="Prompt sent to BLIP-2", elem_id="vqa-prompt", interactive=False)
                    notice = gr.Markdown(elem_id="vqa-notice")
            gr.Examples([[e.image_path, e.question] for e in examples], inputs=[image, question], cache_examples=False)
            button.click(app.answer, [image, question, *controls], [answer, prompt, notice], api_name="answer", **run)

        with gr.Tab("Zero-shot classification", id="zero-shot"):
            with gr.Row():
                with gr.Column():
                    image = _image_input("zero-shot-image")
                    labels = gr.Textbox(label="Labels (comma-separated)", elem_id="zero-shot-labels",
                                        max_length=MAX_LABELS_TEXT_CHARS,
                                        placeholder="red circle, blue square, green triangle")
                    template = gr.Textbox(value=models.zero_shot_template(), label="Prompt template ({} = label)",
                                          max_length=MAX_TEMPLATE_CHARS, elem_id="zero-shot-template")
                    button = gr.Button("Classify", variant="primary", elem_id="zero-shot-button")
                with gr.Column():
                    label = gr.Label(label="CoCa's choice", elem_id="zero-shot-label")
                    chart = gr.BarPlot(x="label", y="probability", y_lim=[0, 1], sort="-y",
                                       label="Probabilities", elem_id="zero-shot-chart")
                    notice = gr.Markdown(elem_id="zero-shot-notice")
            gr.Examples([[e.image_path, e.labels] for e in examples], inputs=[image, labels], cache_examples=False)
            button.click(app.classify, [image, labels, template], [label, chart, notice], api_name="classify", **run)

        with gr.Tab("Retrieval", id="retrieval"):
            with gr.Row():
                with gr.Column():
                    gallery = gr.Gallery(type="filepath", label=f"Images to search (up to {MAX_RETRIEVAL_IMAGES})",
                                         file_types=["image"], interactive=True, columns=4, height=320,
                                         elem_id="retrieval-images")
                    query = gr.Textbox(label="Text query", max_length=MAX_QUESTION_CHARS, elem_id="retrieval-query",
                                       placeholder="a large red circle")
                    button = gr.Button("Search", variant="primary", elem_id="retrieval-button")
                with gr.Column():
                    ranked = gr.Gallery(label="Ranked by CoCa (probability over the uploaded images)", columns=4,
                                        height=320, interactive=False, elem_id="retrieval-ranked")
                    notice = gr.Markdown(elem_id="retrieval-notice")
            gr.Examples([[[e.image_path for e in examples], e.caption] for e in examples], inputs=[gallery, query],
                        cache_examples=False)
            button.click(app.retrieve, [gallery, query], [ranked, notice], api_name="retrieve", **run)

    demo.queue(default_concurrency_limit=CONCURRENCY_LIMIT, max_size=MAX_QUEUE_SIZE)
    return demo


def create_demo() -> gr.Blocks:
    """Load the models named by the environment and build the app (what spaces/app.py does)."""
    return build_demo(load_models())


def launch(demo: gr.Blocks, host: str | None = None, port: int | None = None, **kwargs):
    """Serve `demo` with the Space's limits. host/port None: gradio's defaults (GRADIO_SERVER_NAME/PORT)."""
    return demo.launch(server_name=host, server_port=port, max_file_size=MAX_UPLOAD_SIZE, ssr_mode=False,
                       **kwargs)
