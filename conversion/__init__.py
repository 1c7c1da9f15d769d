"""Converters from upstream checkpoints (open_clip CoCa, transformers and LAVIS BLIP-2), installed as
`hf_vlm.conversion`: one module per upstream format plus a shared streaming writer."""
