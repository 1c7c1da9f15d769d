"""Model architectures, installed as `hf_vlm.modeling`. One flat, Hub-portable folder per family.

Files under a family folder import only torch, transformers, timm and their own siblings (relative
imports), never `hf_vlm`: `save_pretrained` copies them next to the weights so that
`AutoModel.from_pretrained(path, trust_remote_code=True)` works where hf_vlm is not installed.
"""
