"""Model card templates (one per family) and per-variant facts, installed as `hf_vlm.model_cards`.

Rendered by `hf_vlm.hub` with huggingface_hub's ModelCard; numbers that can be computed from a
checkpoint are computed there, never stored here.
"""
