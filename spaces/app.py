"""The hf-vlm Gradio Space: captioning (BLIP-2 and CoCa), visual question answering (BLIP-2), zero-shot
classification and retrieval (CoCa). This is the file pushed to the Space (`hf-vlm push-space`); the UI is
`hf_vlm.space`, which `hf-vlm space` serves too.

Models: HF_VLM_BLIP2 and HF_VLM_COCA (a local folder or a Hub id), as Space variables or the SETTINGS below (which
`hf-vlm push-space` fills in); without either, the `make demo` checkpoints under $HF_VLM_DEMO_DIR (default ./.demo).
"""

import os

try:  # ZeroGPU hardware: `spaces` must be imported before torch initialises CUDA
    import spaces  # noqa: F401
except ImportError:
    pass

# Filled in by `hf-vlm push-space`: the models this Space serves and its CPU dtype (variables of the Space win).
SETTINGS: dict[str, str] = {}
for name, value in SETTINGS.items():
    os.environ.setdefault(name, value)

from hf_vlm.space import create_demo, launch  # noqa: E402  (after SETTINGS: they choose the models)

demo = create_demo()

if __name__ == "__main__":
    launch(demo)
