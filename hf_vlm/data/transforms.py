"""Image decoding and the per-recipe image transforms (torchvision.transforms.v2).

`load_rgb_image` turns whatever an image column holds (datasets' {"bytes", "path"} dict, raw bytes,
a file path, a PIL image) into a fully decoded RGB PIL image, or raises `SkippedSample` so the
pipeline counts it: corrupt, truncated and undecodable files never reach the model.

`build_image_transform` gives the training augmentation of each recipe and the deterministic
evaluation transform; both end in a float32 tensor normalized with the CLIP mean/std (or the
model's image processor's).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

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


def _image_file(value):
    """The bytes or path an image column value points to (datasets' Image(decode=False) gives a dict)."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return io.BytesIO(value["bytes"])
        if value.get("path"):
            return value["path"]
        raise ValueError("image entry has neither bytes nor a path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(value))
    if isinstance(value, str):
        return value
    raise ValueError(f"unsupported image value of type {type(value).__name__}")


def to_rgb(image):
    """RGB view of a PIL image: alpha (RGBA, LA, palette transparency) is composited onto white,
    CMYK/L/P/YCbCr/16-bit are converted; EXIF rotation is applied so the picture is upright."""
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits instead of clipping everything above 255 to white.
        import numpy as np

        array = np.asarray(image, dtype=np.float32)
        peak = array.max() if array.size else 0.0
        scale = 255.0 / (65535.0 if peak > 255 else 255.0)
        image = Image.fromarray(np.clip(array * scale, 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


def load_rgb_image(value, sample_id: str | None = None):
    """Decode an image column value completely and convert it to RGB.

    Raises `SkippedSample("corrupt_image", ...)` for anything that is not a whole, decodable image
    (random bytes, a truncated JPEG, a missing file...). Decoding is forced with `load()`, because
    PIL opens lazily and a truncated file only fails when its pixels are read.
    """
    from PIL import Image

    from .skips import SkippedSample

    where = f"{sample_id}: " if sample_id else ""
    if value is None:
        raise SkippedSample("corrupt_image", f"{where}no image")
    if isinstance(value, Image.Image):
        image = value
    else:
        try:
            image = Image.open(_image_file(value))
            image.load()
        # PIL signals undecodable data with many types (OSError, SyntaxError, ValueError,
        # DecompressionBombError, struct.error...): any failure to decode one sample is a skip.
        except Exception as err:
            raise SkippedSample("corrupt_image", f"{where}{type(err).__name__}: {err}") from err
    try:
        return to_rgb(image)
    except Exception as err:
        raise SkippedSample("corrupt_image", f"{where}cannot convert {image.mode} to RGB: {err}") from err


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
    train=False, or the "none" recipe: deterministic resize of the short side + center crop, as used
    for evaluation.
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
    if augmentation is not None:
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
    else:
        steps = [v2.Resize(image_size, interpolation=bicubic, antialias=True), v2.CenterCrop(image_size)]
    steps += [
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ]
    return v2.Compose(steps)


def image_transform_from_processor(processor, recipe: str = "blip2", *, train: bool = True, **overrides):
    """`build_image_transform` with the size and mean/std of a model's processor (or image processor)."""
    image_processor = getattr(processor, "image_processor", processor)
    kwargs = {}
    # transformers' image processors give sizes as ints, dicts or SizeDicts (height/width or shortest_edge).
    for size in (getattr(image_processor, "crop_size", None), getattr(image_processor, "size", None)):
        if isinstance(size, dict):
            size = size.get("height") or size.get("shortest_edge")
        elif size is not None and not isinstance(size, int):
            size = getattr(size, "height", None) or getattr(size, "shortest_edge", None)
        if isinstance(size, int):
            kwargs["image_size"] = size
            break
    for name, key in (("image_mean", "mean"), ("image_std", "std")):
        value = getattr(image_processor, name, None)
        if value is not None:
            kwargs[key] = tuple(value)
    kwargs.update(overrides)
    return build_image_transform(recipe, train=train, **kwargs)
