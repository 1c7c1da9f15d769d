"""CoCa (Contrastive Captioner): config, model and processor. Hub-portable (no hf_vlm imports)."""

from .configuration_coca import CocaConfig, CocaMultimodalConfig, CocaTextConfig, CocaVisionConfig
from .modeling_coca import CocaModel, CocaOutput, CocaPreTrainedModel
from .processing_coca import CocaProcessor

__all__ = [
    "CocaConfig",
    "CocaModel",
    "CocaMultimodalConfig",
    "CocaOutput",
    "CocaPreTrainedModel",
    "CocaProcessor",
    "CocaTextConfig",
    "CocaVisionConfig",
]
