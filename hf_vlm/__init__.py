"""hf-vlm: Hugging Face-native BLIP-2-FlanT5 and CoCa.

`import hf_vlm` registers every model family with transformers' Auto classes, so
`AutoModel.from_pretrained(...)`, `AutoProcessor.from_pretrained(...)` and `transformers.pipeline(...)`
resolve our model types. Presets: `hf_vlm.presets.get_config(name)`.
"""

__version__ = "0.1.0"

from hf_vlm.registration import register_all, registered_model_types

register_all()

__all__ = ["__version__", "register_all", "registered_model_types"]
