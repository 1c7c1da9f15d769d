"""Configuration of BLIP-2 with a FlanT5 language model (model_type "blip2_flant5").

Three parts, each a sub-config:
- `vision_config` (`Blip2FlanT5VisionConfig`): a timm ViT named by `timm_model_name` (EVA ViT-g/14 by default:
  39 blocks, no head, no final norm) followed by `ln_vision`.
- `qformer_config` (`Blip2FlanT5QFormerConfig`): the BERT-style Querying Transformer, including its stage-1 text
  path (BERT vocabulary with the [DEC] token LAVIS appends).
- `text_config`: transformers' own `T5Config`. transformers 5.23's T5Config forces `tie_word_embeddings=True` and
  turns a passed `tie_word_embeddings=False` into `scale_decoder_outputs=False`; as in T5's original convention,
  `scale_decoder_outputs=False` (T5 v1.1 / FlanT5) is what tells our models to build a separate `lm_head`.

Hub-portable: imports only transformers (this file is copied next to saved weights).
"""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


class Blip2FlanT5VisionConfig(PreTrainedConfig):
    r"""The image encoder: `timm.create_model(timm_model_name, pretrained=False, **these fields)` then `ln_vision`.

    hidden_size / num_hidden_layers / num_attention_heads / intermediate_size / image_size / patch_size map to
    timm's embed_dim / depth / num_heads / mlp_ratio / img_size / patch_size; `timm_kwargs` passes anything else.
    `layer_norm_eps` is the ViT blocks' eps, `ln_vision_eps` the eps of the LayerNorm after the ViT
    (1e-6 in transformers' BLIP-2 `post_layernorm`, 1e-5 in LAVIS's `ln_vision`).
    """

    model_type = "blip2_flant5_vision"
    base_config_key = "vision_config"

    timm_model_name: str = "eva_giant_patch14_224"
    image_size: int = 224
    patch_size: int = 14
    hidden_size: int = 1408
    num_hidden_layers: int = 39
    num_attention_heads: int = 16
    intermediate_size: int = 6144
    layer_norm_eps: float = 1e-6
    ln_vision_eps: float = 1e-6
    drop_path_rate: float = 0.0
    timm_kwargs: dict | None = None
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"vision_config.hidden_size ({self.hidden_size}) must be a multiple of "
                f"vision_config.num_attention_heads ({self.num_attention_heads})"
            )
        self.timm_kwargs = dict(self.timm_kwargs or {})
        super().__post_init__(**kwargs)

    @property
    def num_image_tokens(self) -> int:
        """Patch tokens plus the class token: the length of `image_embeds`."""
        return (self.image_size // self.patch_size) ** 2 + 1


class Blip2FlanT5QFormerConfig(PreTrainedConfig):
    r"""The Querying Transformer (BERT-base sized in BLIP-2).

    Every `cross_attention_frequency`-th layer (0, 2, 4, ...) lets the query tokens cross-attend to the image
    tokens (`encoder_hidden_size` wide, set from the vision config). Query positions and text positions have
    separate feed-forward blocks. The text path (word/position embeddings, text FFNs, the stage-1 heads) is used
    in stage 1 (and in stage 2 with `qformer_text_input`): `vocab_size` includes LAVIS's extra `[DEC]` token (`dec_token_id`), which replaces [CLS] as the
    first token for image-grounded text generation. `max_text_length` is the caption length in tokens (LAVIS: 32).
    """

    model_type = "blip2_flant5_qformer"
    base_config_key = "qformer_config"

    vocab_size: int = 30523
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    dec_token_id: int = 30522
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408
    max_text_length: int = 32

    def __post_init__(self, **kwargs):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"qformer_config.hidden_size ({self.hidden_size}) must be a multiple of "
                f"qformer_config.num_attention_heads ({self.num_attention_heads})"
            )
        if not 0 <= self.dec_token_id < self.vocab_size:
            raise ValueError(
                f"qformer_config.dec_token_id ({self.dec_token_id}) must be a token id below vocab_size ({self.vocab_size})"
            )
        if self.cross_attention_frequency < 1:
            raise ValueError(f"qformer_config.cross_attention_frequency must be >= 1, got {self.cross_attention_frequency}")
        super().__post_init__(**kwargs)


class Blip2FlanT5Config(PreTrainedConfig):
    r"""BLIP-2: image encoder -> Q-Former with `num_query_tokens` learned queries -> FlanT5.

    `image_text_hidden_size` is the stage-1 contrastive embedding size (256). `freeze_vision` and
    `freeze_language_model` keep those parts frozen (no gradient, eval mode, not in the optimizer), as BLIP-2 trains
    them. `tie_word_embeddings` ties the stage-1 Q-Former text head to its word embeddings (as LAVIS does); the
    T5 head follows `text_config` (see the module docstring).

    `qformer_text_input`: the stage-2 Q-Former also reads the question / instruction (`qformer_input_ids`, BERT
    tokens), as BLIP-2's VQA fine-tuning (paper section 4.3) and InstructBLIP do: the stage-1 text path (word and
    position embeddings, the text positions' own FFNs) is kept, queries and instruction tokens share
    self-attention, and only the query outputs go to `language_projection`.
    """

    model_type = "blip2_flant5"
    sub_configs_defaults = {
        "vision_config": Blip2FlanT5VisionConfig,
        "qformer_config": Blip2FlanT5QFormerConfig,
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="t5"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    qformer_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    num_query_tokens: int = 32
    image_text_hidden_size: int = 256
    freeze_vision: bool = True
    freeze_language_model: bool = True
    qformer_text_input: bool = False
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    initializer_factor: float = 1.0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.text_config.model_type != "t5":
            raise ValueError(f"text_config must be a T5Config (model_type 't5'), got model_type {self.text_config.model_type!r}")
        if self.text_config.num_decoder_layers != self.text_config.num_layers:
            # transformers 5.23's T5 generate() builds a cache for num_layers and fails with an IndexError otherwise.
            raise ValueError(
                f"text_config.num_decoder_layers ({self.text_config.num_decoder_layers}) must equal "
                f"text_config.num_layers ({self.text_config.num_layers}): T5 generation in transformers 5.23 needs both equal"
            )
        self.qformer_config.encoder_hidden_size = self.vision_config.hidden_size
        self.is_encoder_decoder = True

    @property
    def hidden_size(self) -> int:
        """The widest hidden state (the language model's), which DeepSpeed's "auto" bucket sizes are based on."""
        return self.text_config.hidden_size

    @property
    def lm_head_is_tied(self) -> bool:
        """Original T5 ties (and rescales) its output head; T5 v1.1 / FlanT5 keep a separate, unscaled lm_head."""
        return bool(getattr(self.text_config, "scale_decoder_outputs", True))


__all__ = ["Blip2FlanT5Config", "Blip2FlanT5QFormerConfig", "Blip2FlanT5VisionConfig"]

# save_pretrained writes "auto_map" and copies this file, so trust_remote_code loading works without hf_vlm.
Blip2FlanT5Config.register_for_auto_class()
