"""The one image decoder: training, `hf-vlm eval`, bulk inference and the Space all call `load_rgb_image`.

`load_rgb_image(value)` takes what an image column or an upload holds (raw bytes, a file path, datasets'
{"bytes", "path"} dict, a PIL image) and returns a fully decoded 8-bit RGB PIL image, always the same
pixels for the same file:

- **Orientation**: the EXIF orientation tag is applied (a phone photo taken in portrait is upright). A
  malformed EXIF block is ignored: the pixels themselves are still good.
- **16-bit and float images** are scaled to 8 bits by the *type's* range, never by the image's own
  maximum (which would brighten a dark picture and make the result depend on the content):
  `I;16`/`I;16B`/`I;16L` keep their high byte (v >> 8), the same rule PIL applies itself to 16-bit RGB and
  RGBA PNGs (it opens those as 8-bit RGB/RGBA), so a 16-bit gray PNG and the same picture as a 48-bit RGB
  PNG decode to the same values. Mode `I` (32-bit int) is what PIL decodes 16-bit PGM/PPM (and other 16-bit
  data) into, already on the 0..65535 scale, so it gets the same 16-bit rule (values outside are clipped).
  Float images (`F`) are taken as 0..1, the float convention of torchvision (`to_dtype(scale=True)`),
  scikit-image and TIFF writers of float data; values outside are clipped, NaN is 0. (PIL's own
  `convert("RGB")` clips `I;16` at 255 — a near-white picture — and reads `F` as 0..255.)
- **Transparency** (RGBA, LA, PA, premultiplied modes, palette or RGB/L images with a tRNS colour) is
  composited onto one background, `BACKGROUND` = white: what training always did, and what transformers'
  image processors do (`convert_to_rgb`).
- **Other modes** (palette, CMYK, YCbCr, 1-bit, L...) are converted with PIL's `convert("RGB")`.
- **Decompression bombs**: an image whose header announces more than `MAX_IMAGE_PIXELS` pixels is refused
  before its pixels are decoded (PIL's own, higher limit is caught too).

Anything that fails raises `SkippedSample("corrupt_image", detail)`: the training pipeline counts it,
`hf-vlm eval` counts it, the Space shows the detail as a message.
"""

from __future__ import annotations

import io
import warnings

# The decompression-bomb guard: images announcing more pixels than this are refused before decoding.
# One fact for training, eval and the Space (hf_vlm.space.MAX_IMAGE_PIXELS is this value). 50 MP decodes to
# 150 MB of RGB; it is above any camera whose photos are commonly published, and below PIL's own warning
# threshold (Image.MAX_IMAGE_PIXELS, ~89 MP), so ours is the limit that applies.
MAX_IMAGE_PIXELS = 50_000_000

# Where transparent pixels end up: white (as transformers' convert_to_rgb and our training always did).
BACKGROUND = (255, 255, 255)

_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _skip(detail: str, sample_id: str | None, reason: str = "corrupt_image"):
    from .skips import SkippedSample

    return SkippedSample(reason, f"{sample_id}: {detail}" if sample_id else detail)


def _image_file(value):
    """The file object or path an image value points to (datasets' Image(decode=False) gives a dict)."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return io.BytesIO(value["bytes"])
        if value.get("path"):
            return value["path"]
        raise ValueError("image entry has neither bytes nor a path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(value))
    if isinstance(value, str) or hasattr(value, "__fspath__"):
        return value
    raise ValueError(f"unsupported image value of type {type(value).__name__}")


def check_pixel_count(width: int, height: int, sample_id: str | None = None) -> None:
    """Raise SkippedSample("oversized_image") for an image over MAX_IMAGE_PIXELS (a possible decompression bomb)."""
    if width * height > MAX_IMAGE_PIXELS:
        raise _skip(f"decompression bomb: {width}×{height} = {width * height:,} pixels, over the limit of "
                    f"{MAX_IMAGE_PIXELS:,} (hf_vlm.data.images.MAX_IMAGE_PIXELS)", sample_id, "oversized_image")


def open_image(value, sample_id: str | None = None):
    """Open an image value lazily (its header only) and check its size against MAX_IMAGE_PIXELS.
    Raises SkippedSample("corrupt_image") for a missing, unidentifiable or too large image."""
    from PIL import Image

    if value is None:
        raise _skip("no image", sample_id)
    try:
        with warnings.catch_warnings():
            # PIL warns above its own limit; ours is lower, so such an image is refused just below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(_image_file(value))
    except Image.DecompressionBombError as err:  # over twice PIL's limit: it refuses to open it at all
        raise _skip(f"decompression bomb: {err}", sample_id, "oversized_image") from err
    # PIL signals undecodable data with many types (UnidentifiedImageError/OSError, SyntaxError,
    # ValueError, struct.error...): any failure to read one image is a skip.
    except Exception as err:
        raise _skip(f"{type(err).__name__}: {err}", sample_id) from err
    try:
        check_pixel_count(*image.size, sample_id)
    except Exception:
        image.close()
        raise
    return image


def load_rgb_image(value, sample_id: str | None = None):
    """Decode an image value completely into an 8-bit RGB PIL image (see the module docstring for the rules).

    `value`: raw bytes, a file path, a {"bytes", "path"} dict (datasets' `Image(decode=False)`), or a PIL
    image (checked and converted; not closed). `sample_id` prefixes the error detail.
    Raises `SkippedSample("corrupt_image", ...)` for anything that is not a whole, decodable image of at
    most MAX_IMAGE_PIXELS pixels (zero bytes, random bytes, a truncated JPEG, a missing file, a bomb...).
    Decoding is forced with `load()`: PIL opens lazily, and a truncated file only fails when its pixels
    are read.
    """
    from PIL import Image

    if isinstance(value, Image.Image):
        check_pixel_count(*value.size, sample_id)
        try:
            value.load()
            return to_rgb(value)
        except Exception as err:
            raise _skip(f"cannot decode the {value.mode} image: {type(err).__name__}: {err}", sample_id) from err
    image = open_image(value, sample_id)
    with image:
        try:
            image.load()
        except Exception as err:
            raise _skip(f"{type(err).__name__}: {err}", sample_id) from err
        try:
            return to_rgb(image)
        except Exception as err:
            raise _skip(f"cannot convert the {image.mode} image to RGB: {type(err).__name__}: {err}",
                        sample_id) from err


def to_rgb(image):
    """A new 8-bit RGB image of a decoded PIL image: EXIF orientation applied, 16-bit and float scaled by
    their type's range, transparency composited onto BACKGROUND (see the module docstring)."""
    from PIL import Image, ImageOps

    try:
        upright = ImageOps.exif_transpose(image)  # a copy; the caller's image is left alone
    except Exception:  # a malformed EXIF block: the orientation is unknown, the pixels are fine
        upright = image.copy()
    if upright is None:
        upright = image.copy()
    image = upright
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
        image = _to_8_bit(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")  # applies a palette's or an RGB/L image's tRNS transparency
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    rgb = image.convert("RGB")
    rgb.info.pop("transparency", None)
    return rgb


def _to_8_bit(image):
    """An "L" image of a 16-bit (I;16*, I) or float (F) single-channel image, scaled by the type's range."""
    import numpy as np
    from PIL import Image

    if image.mode == "F":
        array = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0)
        array = np.floor(np.clip(array, 0.0, 1.0) * 255.0 + 0.5)
    else:
        array = np.clip(np.asarray(image).astype(np.int64), 0, 65535) >> 8
    return Image.fromarray(array.astype(np.uint8))  # 2-D uint8: mode "L"


__all__ = ["BACKGROUND", "MAX_IMAGE_PIXELS", "check_pixel_count", "load_rgb_image", "open_image", "to_rgb"]
