"""The hf-vlm Gradio Space: captioning (BLIP-2 and CoCa), visual question answering (BLIP-2) and
zero-shot classification (CoCa). This is the file pushed to the Space; the UI is `hf_vlm.space`,
which `hf-vlm space` serves too.

Models: HF_VLM_BLIP2 and HF_VLM_COCA (a local folder or a Hub id), set as Space variables; without them
the `make demo` checkpoints under $HF_VLM_DEMO_DIR (default ./.demo) are used when present.
"""

from hf_vlm.space import create_demo, launch

demo = create_demo()

if __name__ == "__main__":
    launch(demo)
