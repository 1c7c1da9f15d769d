"""BLIP-2 with a FlanT5 language model: config, stage-1 / stage-2 models and processor (Hub-portable)."""

from .configuration_blip2_flant5 import Blip2FlanT5Config, Blip2FlanT5QFormerConfig, Blip2FlanT5VisionConfig
from .modeling_blip2_flant5 import (
    Blip2FlanT5ForConditionalGeneration,
    Blip2FlanT5ForPretraining,
    Blip2FlanT5PreTrainedModel,
    Blip2FlanT5QFormerModel,
)
from .processing_blip2_flant5 import Blip2FlanT5Processor

__all__ = [
    "Blip2FlanT5Config",
    "Blip2FlanT5ForConditionalGeneration",
    "Blip2FlanT5ForPretraining",
    "Blip2FlanT5PreTrainedModel",
    "Blip2FlanT5Processor",
    "Blip2FlanT5QFormerConfig",
    "Blip2FlanT5QFormerModel",
    "Blip2FlanT5VisionConfig",
]
