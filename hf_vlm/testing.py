"""Helpers for tests (ours and users'): required optional components, small images and captions.

Nothing here downloads anything.
"""

from __future__ import annotations

import importlib
import shutil

# Caption-like sentences for tiny tokenizers and smoke tests.
TINY_CORPUS = [
    f"a {size} {color} {shape} {where} a {color2} {shape2}"
    for size in ("small", "large")
    for color, color2 in (("red", "blue"), ("green", "yellow"), ("white", "black"))
    for shape, shape2 in (("circle", "square"), ("triangle", "circle"), ("square", "triangle"))
    for where in ("left of", "right of", "above", "below")
] + [
    "Question: what color is the circle? Short answer: red",
    "Question: how many shapes are there? Short answer: two",
    "Question: is there a square? Answer: yes",
    "a photo of a cat", "a photo of a dog", "a photo of a car",
]


def require(module: str, install: str):
    """Import `module` or fail the calling test with how to install it (never a silent skip)."""
    import pytest

    try:
        return importlib.import_module(module)
    except ImportError as err:
        pytest.fail(f"{module} is required for this test ({err}); install it with: {install}", pytrace=False)


def require_executable(name: str, install: str) -> str:
    import pytest

    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is required for this test; install it with: {install}", pytrace=False)
    return path


def random_image(size: int = 64, seed: int = 0):
    """A deterministic RGB PIL image with some structure (a gradient plus noise)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    base = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size))], -1)
    noise = rng.normal(0, 20, size=(size, size, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype("uint8"), "RGB")


def run_python_without_hf_vlm(code: str, cwd, timeout: float = 600, env: dict | None = None):
    """Run `code` in a fresh interpreter in which `import hf_vlm` fails, as on a machine without the
    package: proves that `trust_remote_code=True` loading needs only the files saved with the model.
    Returns the CompletedProcess (stdout/stderr as text)."""
    import os
    import subprocess
    import sys

    prelude = "import sys\nsys.modules['hf_vlm'] = None  # any `import hf_vlm...` now raises ImportError\n"
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", prelude + code], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )


def randomize_open_clip_coca_(model, seed: int = 0, pad_token_id: int = 0):
    """Fill an open_clip CoCa with parameters drawn from `seed`, in place (open_clip leaves some, like the
    decoder's vocabulary projection, as torch.empty): LayerNorm weights near 1, the rest near 0 with
    1/sqrt(fan_in) spread; `logit_scale` keeps its init. The padding column of the vocabulary projection
    is zeroed: open_clip's generation loop stops a row that emits `pad_token_id`, transformers' does not,
    so random weights must never pick it. Used by the parity tests and the benchmarks."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name == "logit_scale":
                continue
            is_norm_weight = param.dim() == 1 and ".ln" in f".{name}" and name.endswith("weight")
            std = 0.1 if param.dim() < 2 else param.shape[-1] ** -0.5
            param.copy_((1.0 if is_norm_weight else 0.0) + std * torch.randn(param.shape, generator=generator))
        model.text_decoder.text_projection[:, pad_token_id] = 0
    return model
