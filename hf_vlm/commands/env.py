"""`hf-vlm env`: what a bug report needs — library versions, accelerator and BF16 support, and the
model types and presets this installation provides."""

from __future__ import annotations

import platform
from importlib import metadata

LIBRARIES = [
    "torch", "torchvision", "transformers", "timm", "huggingface_hub", "accelerate",
    "datasets", "safetensors", "tokenizers", "deepspeed", "gradio", "open_clip_torch",
]


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def collect() -> dict:
    import torch

    import hf_vlm
    from hf_vlm.presets import list_presets

    info = {"hf-vlm": hf_vlm.__version__, "python": platform.python_version(), "platform": platform.platform()}
    info.update({lib: _version(lib) for lib in LIBRARIES})
    info["torch"] = torch.__version__  # with the local build tag, e.g. 2.15.0+cu132
    info["torch built for cuda"] = torch.version.cuda or "no (CPU-only build)"
    cuda = torch.cuda.is_available()
    info["cuda available"] = cuda
    if cuda:
        info["cuda device"] = torch.cuda.get_device_name(0)
        info["bf16 supported"] = torch.cuda.is_bf16_supported()
    else:
        # CPU bf16: supported when a bf16 matmul runs here.
        try:
            torch.ones(2, 2, dtype=torch.bfloat16) @ torch.ones(2, 2, dtype=torch.bfloat16)
            info["bf16 supported"] = True
        except RuntimeError:
            info["bf16 supported"] = False
    info["registered model types"] = ", ".join(hf_vlm.registered_model_types()) or "none"
    info["presets"] = ", ".join(list_presets()) or "none"
    return info


def run(args) -> int:
    info = collect()
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("env", help="print versions, accelerator/BF16 support and registered models")
    parser.set_defaults(func=run)
