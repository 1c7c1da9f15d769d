"""The per-recipe image transforms: training augmentation (torchvision.transforms.v2) and the evaluation
transform (a transformers image processor, the model's own when there is one).

Decoding is not done here: `load_rgb_image` / `to_rgb` (re-exported from here and from hf_vlm.data) live in
hf_vlm.data.images, the one decoder that training, `hf-vlm eval` and the Space share.

The evaluation transform is the model's image processor applied to the decoded RGB image, so the trainer's
evaluation (and "none"-augmentation) samples, `hf-vlm eval`, the processor itself and the Space give
bit-identical `pixel_values` for the same file. Without a processor, `build_image_transform(train=False)`
builds the image processor that the model family's processor uses (see EVAL_RESIZE): the same
`build_image_processor` as `CocaProcessor.from_tokenizer` / `Blip2FlanT5Processor.from_tokenizers`.
"""

from __future__ import annotations

from collections.abc import Sequence

from .images import load_rgb_image, to_rgb  # noqa: F401  (re-exported: pipeline.py and users import them here)

# OpenAI CLIP statistics: used by CoCa (open_clip) and by BLIP-2's EVA ViT (LAVIS, transformers).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Training augmentation per recipe. BLIP-2 (LAVIS `blip_image_train`): random resized crop of 50-100%
# of the image. CoCa adds a horizontal flip and colour jitter. "none" trains on the evaluation transform:
# for data whose text depends on where things are and what colour they have (a crop drops objects the
# caption names, a flip turns "left of" into a lie), such as hf_vlm.scenes.
AUGMENTATIONS = {
    "blip2": {"crop_scale": (0.5, 1.0), "horizontal_flip": False, "color_jitter": None},
    "coca": {"crop_scale": (0.5, 1.0), "horizontal_flip": True, "color_jitter": (0.4, 0.4, 0.4, 0.0)},
    "none": None,
}

# How each model family evaluates, i.e. what its processor's image processor does (bicubic, CLIP mean/std):
# - "square": BLIP-2 resizes the whole image to image_size x image_size, aspect ratio not kept (LAVIS
#   `blip_image_eval`: Resize((s, s)); transformers' BlipImageProcessor; Blip2FlanT5Processor);
# - "shortest_edge": CoCa resizes the short side to image_size and center-crops (open_clip's eval
#   transform: Resize(s) + CenterCrop(s); transformers' CLIPImageProcessor; CocaProcessor).
# "none" names no family: it gets the open_clip form (pass the model's processor to get the model's own).
EVAL_RESIZE = {"blip2": "square", "coca": "shortest_edge", "none": "shortest_edge"}


class ImageProcessorTransform:
    """RGB PIL image -> float32 `pixel_values` [3, H, W] through a transformers image processor (the
    evaluation transform). `kwargs` are passed on each call (size / mean / std overrides)."""

    def __init__(self, image_processor, **kwargs):
        self.image_processor = image_processor
        self.kwargs = kwargs

    def __call__(self, image):
        return self.image_processor(images=image, return_tensors="pt", **self.kwargs)["pixel_values"][0]

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.kwargs.items())
        return f"{type(self).__name__}({type(self.image_processor).__name__}{extra})"


def evaluation_image_processor(
    recipe: str = "blip2",
    *,
    image_size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
):
    """The transformers image processor of the recipe's model family (EVAL_RESIZE): the one that family's
    processor builds (`build_image_processor` next to CocaProcessor / Blip2FlanT5Processor)."""
    from hf_vlm.modeling.blip2_flant5.processing_blip2_flant5 import (
        build_image_processor as blip2_image_processor,
    )
    from hf_vlm.modeling.coca.processing_coca import build_image_processor as coca_image_processor

    if recipe not in EVAL_RESIZE:
        raise ValueError(f"unknown image augmentation {recipe!r}; expected one of {sorted(EVAL_RESIZE)}")
    build = blip2_image_processor if EVAL_RESIZE[recipe] == "square" else coca_image_processor
    return build(image_size, image_mean=mean, image_std=std)


def build_image_transform(
    recipe: str = "blip2",
    *,
    train: bool = True,
    image_size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    crop_scale: tuple[float, float] | None = None,
):
    """PIL RGB image -> normalized float32 tensor [3, image_size, image_size].

    train=True: the recipe's augmentation (see AUGMENTATIONS; `crop_scale` overrides its crop range).
    train=False, or the "none" recipe: the deterministic evaluation transform of the recipe's model family,
    an `ImageProcessorTransform` over `evaluation_image_processor` (BLIP-2: square resize; CoCa and
    "none": short side + center crop; see EVAL_RESIZE).
    Random choices come from torch's global RNG, which DataLoader seeds per worker from the run's seed.
    """
    import torch
    from torchvision.transforms import InterpolationMode, v2

    if recipe not in AUGMENTATIONS:
        raise ValueError(
            f"unknown image augmentation {recipe!r}; expected one of {sorted(AUGMENTATIONS)}"
        )
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got mean={list(mean)} std={list(std)}")
    bicubic = InterpolationMode.BICUBIC
    augmentation = AUGMENTATIONS[recipe] if train else None
    if augmentation is None:
        return ImageProcessorTransform(
            evaluation_image_processor(recipe, image_size=image_size, mean=mean, std=std)
        )
    steps = [
        v2.RandomResizedCrop(
            image_size,
            scale=crop_scale or augmentation["crop_scale"],
            interpolation=bicubic,
            antialias=True,
        )
    ]
    if augmentation["horizontal_flip"]:
        steps.append(v2.RandomHorizontalFlip())
    if augmentation["color_jitter"]:
        brightness, contrast, saturation, hue = augmentation["color_jitter"]
        steps.append(
            v2.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)
        )
    steps += [
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ]
    return v2.Compose(steps)


def image_transform_from_processor(processor, recipe: str = "blip2", *, train: bool = True, **overrides):
    """The image transform for a model's processor (or image processor).

    Evaluation (train=False, or the "none" recipe): the processor's own image processor, so the pixels are
    exactly the processor's (`image_size`, `mean`, `std` in `overrides` are passed to it on each call).
    Training: `build_image_transform`'s augmentation with the processor's size and mean/std.
    """
    image_processor = getattr(processor, "image_processor", processor)
    if recipe not in AUGMENTATIONS:
        raise ValueError(f"unknown image augmentation {recipe!r}; expected one of {sorted(AUGMENTATIONS)}")
    if (not train or AUGMENTATIONS[recipe] is None) and callable(image_processor):
        return ImageProcessorTransform(image_processor, **_call_overrides(image_processor, **overrides))
    kwargs = {}
    size = _processor_image_size(image_processor)
    if size is not None:
        kwargs["image_size"] = size
    for name, key in (("image_mean", "mean"), ("image_std", "std")):
        value = getattr(image_processor, name, None)
        if value is not None:
            kwargs[key] = tuple(value)
    kwargs.update(overrides)
    return build_image_transform(recipe, train=train, **kwargs)


def _size_value(size, *keys):
    if isinstance(size, int):
        return size
    for key in keys:
        value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
        if isinstance(value, int):
            return value
    return None


def _processor_image_size(image_processor) -> int | None:
    """The side of the square an image processor outputs: its crop size, else its size (ints, dicts or
    SizeDicts with height/width or shortest_edge)."""
    crop = getattr(image_processor, "crop_size", None) if getattr(image_processor, "do_center_crop", True) else None
    for size in (crop, getattr(image_processor, "size", None)):
        if size is not None:
            value = _size_value(size, "height", "shortest_edge")
            if value is not None:
                return value
    return None


def _call_overrides(image_processor, image_size: int | None = None, mean=None, std=None, crop_scale=None) -> dict:
    """Keyword arguments for the image processor's call that apply build_image_transform-style overrides
    (nothing when they match what it does already; `crop_scale` is a training-only setting)."""
    kwargs = {}
    if image_size is not None and image_size != _processor_image_size(image_processor):
        size = getattr(image_processor, "size", None)
        if _size_value(size, "shortest_edge") is not None and _size_value(size, "height") is None:
            kwargs["size"] = {"shortest_edge": image_size}
        else:
            kwargs["size"] = {"height": image_size, "width": image_size}
        if getattr(image_processor, "crop_size", None) is not None:
            kwargs["crop_size"] = {"height": image_size, "width": image_size}
    for key, value, current in (("image_mean", mean, getattr(image_processor, "image_mean", None)),
                                ("image_std", std, getattr(image_processor, "image_std", None))):
        if value is not None and (current is None or list(value) != list(current)):
            kwargs[key] = list(value)
    return kwargs
