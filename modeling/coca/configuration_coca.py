"""CoCa (Contrastive Captioner) configuration: `CocaConfig` and its three sub-configs.

Architecture only (generation settings live in `GenerationConfig`; token ids are read from `text_config`).
CoCa = an image tower (a timm ViT trunk + an attentional pooler), a unimodal causal text encoder whose
appended CLS token gives the contrastive text embedding, and a multimodal decoder that continues the text
encoder's token states with cross-attention to the pooled image tokens and predicts the next token.

Two upstream quirks are flags, so open_clip's released CoCa is expressible exactly:
- `vision_config.separate_contrastive_query=False`: the contrastive image embedding is pooler query 0 and
  only queries 1.. reach the decoder (open_clip); `True` gives the paper's separate contrastive pooler (v2).
- `legacy_cls_mask=True`: open_clip's text-encoder padding mask shifted by one key position, as the
  released weights were trained; `False` is the correct mask.

Hub-portable: imports only transformers (see ../__init__.py).
"""

from __future__ import annotations

import math

from transformers import PreTrainedConfig

# vision_config.pos_embed_type, as open_clip names them
POS_EMBED_TYPES = ("learnable", "sin_cos_2d")


class CocaVisionConfig(PreTrainedConfig):
    r"""The image tower: a timm trunk built with `pretrained=False`, then CoCa's attentional pooler.

    timm_model_name (`str`): timm architecture, e.g. `vit_large_patch14_clip_224`.
    timm_model_args (`dict`): extra `timm.create_model` kwargs (`final_norm: false` keeps the trunk without
        its final norm, as open_clip's CoCa); `num_classes=0`, `global_pool=""` and `img_size` are always set.
    image_size (`int`): input resolution (also the processor's).
    num_pooler_queries (`int`): learned queries of the attentional pooler (256 in CoCa). Their width is the
        multimodal decoder's hidden size.
    pooler_num_attention_heads (`int`): heads of the pooler's cross-attention.
    separate_contrastive_query (`bool`): False (open_clip): query 0 is the contrastive embedding and queries
        1.. are the decoder's image tokens; True: a separate one-query pooler gives the contrastive embedding
        and all `num_pooler_queries` outputs are image tokens.
    layer_norm_eps (`float`): eps of the pooler and post-pool LayerNorms.
    pos_embed_type (`str`): the trunk's position embedding, as open_clip's `vision_cfg.pos_embed_type`:
        "learnable" (initialized N(0, width**-0.5) with the class token, as open_clip's ViT) or "sin_cos_2d"
        (fixed 2-D sine-cosine coordinates, as MAE; not trained).
    """

    model_type = "coca_vision_model"
    base_config_key = "vision_config"

    timm_model_name: str = "vit_base_patch32_clip_224"
    timm_model_args: dict | None = None
    image_size: int = 224
    num_channels: int = 3
    num_pooler_queries: int = 256
    pooler_num_attention_heads: int = 8
    separate_contrastive_query: bool = False
    layer_norm_eps: float = 1e-5
    pos_embed_type: str = "learnable"

    def __post_init__(self, **kwargs):
        if self.pos_embed_type not in POS_EMBED_TYPES:
            raise ValueError(f"vision_config.pos_embed_type={self.pos_embed_type!r}; expected one of {POS_EMBED_TYPES}")
        self.timm_model_args = dict(self.timm_model_args or {})
        for reserved in ("pretrained", "num_classes", "global_pool", "img_size"):
            if reserved in self.timm_model_args:
                raise ValueError(
                    f"vision_config.timm_model_args must not set {reserved!r}: CoCa sets it itself "
                    "(use vision_config.image_size for the resolution)"
                )
        if self.num_pooler_queries < (1 if self.separate_contrastive_query else 2):
            raise ValueError(
                f"vision_config.num_pooler_queries={self.num_pooler_queries} leaves no image tokens for the decoder"
            )
        super().__post_init__(**kwargs)


class CocaTextConfig(PreTrainedConfig):
    r"""The unimodal text encoder (causal self-attention; a CLS embedding is appended after the text).

    max_position_embeddings (`int`): learned positions, the CLS included (open_clip: 76 text tokens + CLS = 77).
    pad_token_id / bos_token_id / eos_token_id: the tokenizer's ids; `bos` starts every caption (CLIP BPE:
        49406 `<|startoftext|>`, 49407 `<|endoftext|>`, which also pads, as in transformers' CLIP).
    """

    model_type = "coca_text_model"
    base_config_key = "text_config"

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    pad_token_id: int | None = 49407
    bos_token_id: int | None = 49406
    eos_token_id: int | None = 49407

    def __post_init__(self, **kwargs):
        _check_heads("text_config", self.hidden_size, self.num_attention_heads)
        super().__post_init__(**kwargs)


class CocaMultimodalConfig(PreTrainedConfig):
    r"""The multimodal text decoder: each layer is a causal self-attention block, then a cross-attention block
    (to the image tokens) with its own MLP; then a final LayerNorm and an untied vocabulary projection
    (vocabulary size = `text_config.vocab_size`)."""

    model_type = "coca_multimodal_model"
    base_config_key = "multimodal_config"

    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0

    def __post_init__(self, **kwargs):
        _check_heads("multimodal_config", self.hidden_size, self.num_attention_heads)
        super().__post_init__(**kwargs)


class CocaConfig(PreTrainedConfig):
    r"""CoCa: `vision_config`, `text_config` (unimodal encoder), `multimodal_config` (decoder), plus

    projection_dim (`int`): width of the contrastive image/text embeddings.
    logit_scale_init_value (`float`): initial log temperature, log(1/0.07) as CLIP.
    contrastive_loss_weight / caption_loss_weight (`float`): loss = cw * contrastive + capw * caption
        (open_clip's defaults 1.0 / 2.0; our v2 uses 1.0 / 1.0).
    legacy_cls_mask (`bool`): reproduce open_clip's shifted CLS padding mask (released weights only). Under it
        the CLS also sees the first padding position, so what is embedded there matters:
    legacy_pad_token_id (`int`): the id embedded at padding positions under `legacy_cls_mask` (open_clip pads
        with 0), whatever the tokenizer padded with.
    initializer_range (`float`): std of the generic Linear/Embedding init (see `_init_weights` for the rest).

    `hidden_size` resolves to the text width (DeepSpeed "auto" bucket sizes read it).
    """

    model_type = "coca"
    sub_configs_defaults = {
        "vision_config": CocaVisionConfig,
        "text_config": CocaTextConfig,
        "multimodal_config": CocaMultimodalConfig,
    }

    vision_config: dict | CocaVisionConfig | None = None
    text_config: dict | CocaTextConfig | None = None
    multimodal_config: dict | CocaMultimodalConfig | None = None
    projection_dim: int = 512
    logit_scale_init_value: float = math.log(1 / 0.07)
    contrastive_loss_weight: float = 1.0
    caption_loss_weight: float = 2.0
    legacy_cls_mask: bool = False
    legacy_pad_token_id: int = 0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.multimodal_config.hidden_size != self.text_config.hidden_size:
            raise ValueError(
                f"multimodal_config.hidden_size ({self.multimodal_config.hidden_size}) must equal "
                f"text_config.hidden_size ({self.text_config.hidden_size}): the decoder continues the text "
                "encoder's token states"
            )

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size


def _check_heads(name: str, hidden_size: int, num_heads: int) -> None:
    if hidden_size % num_heads:
        raise ValueError(f"{name}.hidden_size ({hidden_size}) is not divisible by num_attention_heads ({num_heads})")


__all__ = ["CocaConfig", "CocaMultimodalConfig", "CocaTextConfig", "CocaVisionConfig"]

# save_pretrained copies this file and writes `auto_map`, so saved models load without hf_vlm.
CocaConfig.register_for_auto_class()
