"""BLIP-2 with a FlanT5 language model: stage-1 (Q-Former pretraining) and stage-2 (image-to-text) models.

Read top to bottom: outputs, the Q-Former (embeddings, attention, layer, encoder, model), the shared
`Blip2FlanT5PreTrainedModel` (vision tower + ln_vision + query tokens + Q-Former), then the two heads:
- `Blip2FlanT5ForPretraining` (stage 1): ITC + ITM + ITG losses as in LAVIS `blip2_qformer.py`, and retrieval
  helpers (image-text similarity, ITM scores).
- `Blip2FlanT5ForConditionalGeneration` (stage 2): the query outputs, projected to T5's width, are prepended to
  the prompt embeddings of transformers' own `T5ForConditionalGeneration` (captioning and VQA).

Parameter names follow transformers' BLIP-2 for the Q-Former (`qformer.encoder.layer.{i}.attention.attention.query`,
`crossattention`, `intermediate_query`, `output_query`, `qformer.layernorm`) and T5 (`language_model.*`), and timm /
LAVIS for the vision tower (`vision_model.blocks.{i}.attn.{qkv,q_bias,v_bias}`, `ln_vision`), so both upstream
checkpoint formats convert by renaming. Hub-portable: imports only torch, transformers, timm and its siblings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel, T5Config, T5ForConditionalGeneration
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    BaseModelOutputWithPoolingAndCrossAttentions,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, logging

from .configuration_blip2_flant5 import Blip2FlanT5Config, Blip2FlanT5QFormerConfig, Blip2FlanT5VisionConfig

logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Outputs


@dataclass
class Blip2FlanT5PretrainingOutput(ModelOutput):
    """Stage-1 output.

    Args:
        loss: itc_loss + itm_loss + itg_loss (with `return_loss`, by default while training).
        itc_loss / itm_loss / itg_loss: image-text contrastive, image-text matching, image-grounded text generation.
            With one image-text pair in the global batch, itc_loss is 0 (one candidate) and itm_loss is 0 (no
            negative), both still in the graph.
        logits_per_image: `(batch, global_batch)` image-to-text similarities (max over query tokens) / temperature;
            global_batch sums every rank's batch.
        logits_per_text: `(batch, global_batch)` text-to-image similarities / temperature.
        itm_logits: `(3 * batch, 2)` match logits for [positives, negative images, negative texts] (class 1 = match);
            `(batch, 2)`, the positives only, when the global batch holds one pair.
        itg_logits: `(batch, text_length, vocab)` next-token logits of the Q-Former text decoder.
        image_embeds: `(batch, num_query_tokens, image_text_hidden_size)` normalized query embeddings.
        text_embeds: `(batch, image_text_hidden_size)` normalized [CLS] text embeddings.
        vision_model_output / qformer_model_output / text_model_output: the vision tower, the Q-Former over the
            queries, and the Q-Former's text encoder (ITC), with hidden states / attentions when asked for.
    """

    loss: torch.FloatTensor | None = None
    itc_loss: torch.FloatTensor | None = None
    itm_loss: torch.FloatTensor | None = None
    itg_loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    itm_logits: torch.FloatTensor | None = None
    itg_logits: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None
    qformer_model_output: BaseModelOutputWithPoolingAndCrossAttentions | None = None
    text_model_output: BaseModelOutputWithPoolingAndCrossAttentions | None = None

    def to_tuple(self):
        return tuple(v.to_tuple() if isinstance(v, ModelOutput) else v for v in (self[k] for k in self.keys()))


@dataclass
class Blip2FlanT5ForConditionalGenerationOutput(ModelOutput):
    """Stage-2 output (sequence-to-sequence).

    Args:
        loss: T5 cross-entropy on `labels` (padding ignored).
        logits: `(batch, target_length, vocab)` T5 decoder logits.
        encoder_last_hidden_state: T5 encoder output over [projected query tokens, prompt].
        image_embeds: `(batch, num_image_tokens, vision_width)` vision tokens after `ln_vision`.
        query_output: `(batch, num_query_tokens, qformer_width)` Q-Former output for the query tokens.
        language_model_inputs: `(batch, num_query_tokens, d_model)` the query outputs projected to T5's width.
        language_model_outputs: T5's full `Seq2SeqLMOutput` (its hidden states and attentions when asked for).
        vision_model_output / qformer_model_output: the vision tower's and the Q-Former's outputs, with hidden states
            and attentions when asked for.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    encoder_last_hidden_state: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    query_output: torch.FloatTensor | None = None
    language_model_inputs: torch.FloatTensor | None = None
    language_model_outputs: ModelOutput | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None
    qformer_model_output: BaseModelOutputWithPoolingAndCrossAttentions | None = None

    def to_tuple(self):
        return tuple(v.to_tuple() if isinstance(v, ModelOutput) else v for v in (self[k] for k in self.keys()))


# ----------------------------------------------------------------------------------------------------------------
# Q-Former


class Blip2FlanT5QFormerEmbeddings(nn.Module):
    """Word + position embeddings of the text path (stage 1). Positions restart at 0 after the query tokens.
    The LayerNorm over [queries, text] is the Q-Former's `layernorm` (transformers' layout)."""

    def __init__(self, config: Blip2FlanT5QFormerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.max_position_embeddings = config.max_position_embeddings

    def forward(self, input_ids: torch.LongTensor) -> torch.Tensor:
        seq_length = input_ids.shape[1]
        if seq_length > self.max_position_embeddings:
            raise ValueError(
                f"input_ids has {seq_length} tokens, more than qformer_config.max_position_embeddings "
                f"({self.max_position_embeddings})"
            )
        position_ids = torch.arange(seq_length, device=input_ids.device)
        return self.word_embeddings(input_ids) + self.position_embeddings(position_ids)[None]


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Attention written out (`attn_implementation="eager"`): also returns the attention probabilities."""
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.dropout(F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype), p=dropout,
                        training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class Blip2FlanT5QFormerMultiHeadAttention(nn.Module):
    """Multi-head attention; keys/values come from the image tokens when `is_cross_attention`. The kernel is
    `config._attn_implementation` (transformers' attention interface); `output_attentions` runs the eager one, which
    returns the attention probabilities. Returns (output, probabilities or None)."""

    is_causal = False  # masks are always explicit

    def __init__(self, config: Blip2FlanT5QFormerConfig, is_cross_attention: bool = False):
        super().__init__()
        self.config = config
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.scaling = self.attention_head_size**-0.5
        self.attention_dropout = config.attention_probs_dropout_prob
        kv_width = config.encoder_hidden_size if is_cross_attention else config.hidden_size
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(kv_width, config.hidden_size)
        self.value = nn.Linear(kv_width, config.hidden_size)

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, output_attentions=False):
        kv_states = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, length, _ = hidden_states.shape

        def heads(x):
            return x.view(x.shape[0], x.shape[1], self.num_attention_heads, self.attention_head_size).transpose(1, 2)

        implementation = "eager" if output_attentions else self.config._attn_implementation
        attention = eager_attention_forward
        if implementation != "eager":
            attention = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        attn_output, weights = attention(
            self, heads(self.query(hidden_states)), heads(self.key(kv_states)), heads(self.value(kv_states)),
            attention_mask, scaling=self.scaling, dropout=self.attention_dropout if self.training else 0.0,
        )
        return attn_output.reshape(batch, length, -1), weights


class Blip2FlanT5QFormerSelfOutput(nn.Module):
    def __init__(self, config: Blip2FlanT5QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class Blip2FlanT5QFormerAttention(nn.Module):
    """Post-norm BERT attention block: attention, projection, dropout, residual, LayerNorm."""

    def __init__(self, config: Blip2FlanT5QFormerConfig, is_cross_attention: bool = False):
        super().__init__()
        self.attention = Blip2FlanT5QFormerMultiHeadAttention(config, is_cross_attention)
        self.output = Blip2FlanT5QFormerSelfOutput(config)

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, output_attentions=False):
        attended, weights = self.attention(hidden_states, attention_mask, encoder_hidden_states, output_attentions)
        return self.output(attended, hidden_states), weights


class Blip2FlanT5QFormerIntermediate(nn.Module):
    def __init__(self, config: Blip2FlanT5QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states):
        return self.intermediate_act_fn(self.dense(hidden_states))


class Blip2FlanT5QFormerOutput(nn.Module):
    def __init__(self, config: Blip2FlanT5QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class Blip2FlanT5QFormerLayer(GradientCheckpointingLayer):
    """Self-attention over [queries, text]; the queries then cross-attend to the image (every
    `cross_attention_frequency`-th layer); queries and text go through separate feed-forward blocks."""

    def __init__(self, config: Blip2FlanT5QFormerConfig, layer_idx: int, with_text_path: bool):
        super().__init__()
        self.attention = Blip2FlanT5QFormerAttention(config)
        self.has_cross_attention = layer_idx % config.cross_attention_frequency == 0
        if self.has_cross_attention:
            self.crossattention = Blip2FlanT5QFormerAttention(config, is_cross_attention=True)
        if with_text_path:
            self.intermediate = Blip2FlanT5QFormerIntermediate(config)
            self.output = Blip2FlanT5QFormerOutput(config)
        self.intermediate_query = Blip2FlanT5QFormerIntermediate(config)
        self.output_query = Blip2FlanT5QFormerOutput(config)

    def forward(self, hidden_states, attention_mask, encoder_hidden_states=None, query_length: int = 0,
                output_attentions: bool = False):
        """Returns (hidden states, self-attention probabilities, cross-attention probabilities); the probabilities
        are None unless `output_attentions` (and the cross-attention's where this layer has none)."""
        attention_output, self_weights = self.attention(hidden_states, attention_mask, None, output_attentions)
        query_part, text_part = attention_output[:, :query_length], attention_output[:, query_length:]
        outputs, cross_weights = [], None
        if query_length > 0:
            if self.has_cross_attention:
                if encoder_hidden_states is None:
                    raise ValueError("the Q-Former's query tokens need encoder_hidden_states (the image embeddings)")
                query_part, cross_weights = self.crossattention(query_part, None, encoder_hidden_states,
                                                                output_attentions)
            outputs.append(self.output_query(self.intermediate_query(query_part), query_part))
        if text_part.shape[1] > 0:
            if not hasattr(self, "intermediate"):
                raise ValueError("this Q-Former was built without its text path (stage 2); text input is not supported")
            outputs.append(self.output(self.intermediate(text_part), text_part))
        hidden_states = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]
        return hidden_states, self_weights, cross_weights


class Blip2FlanT5QFormerEncoder(nn.Module):
    def __init__(self, config: Blip2FlanT5QFormerConfig, with_text_path: bool):
        super().__init__()
        self.layer = nn.ModuleList(
            [Blip2FlanT5QFormerLayer(config, i, with_text_path) for i in range(config.num_hidden_layers)]
        )

    def forward(self, hidden_states, attention_mask, encoder_hidden_states=None, query_length: int = 0,
                output_attentions: bool = False, output_hidden_states: bool = False):
        """Returns (last hidden states, hidden states, self-attentions, cross-attentions); the last three are None
        unless asked for (cross-attentions: one per layer that has one)."""
        all_hidden_states, attentions, cross_attentions = [hidden_states], [], []
        for layer in self.layer:
            # Every argument positional: a checkpointed layer back-propagates through positional tensors only, and
            # each call's arguments then travel with the call (this encoder runs several times per stage-1 forward).
            hidden_states, weights, cross_weights = layer(
                hidden_states, attention_mask, encoder_hidden_states, query_length, output_attentions
            )
            all_hidden_states.append(hidden_states)
            attentions.append(weights)
            if cross_weights is not None:
                cross_attentions.append(cross_weights)
        return (hidden_states, tuple(all_hidden_states) if output_hidden_states else None,
                tuple(attentions) if output_attentions else None,
                tuple(cross_attentions) if output_attentions and cross_attentions else None)


class Blip2FlanT5QFormerModel(nn.Module):
    """The Querying Transformer. Input: query embeddings and/or text tokens; output: their hidden states.

    `text_attention="bidirectional"` (ITC text encoder, ITM) or `"causal"` (ITG: the UniLM mask, in which the
    queries never see the text and each text token sees all queries and the text before it).
    `with_text_path=False` builds the stage-2 Q-Former (no word embeddings, no text feed-forward blocks).
    """

    def __init__(self, config: Blip2FlanT5QFormerConfig, with_text_path: bool = True):
        super().__init__()
        self.config = config
        if with_text_path:
            self.embeddings = Blip2FlanT5QFormerEmbeddings(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.encoder = Blip2FlanT5QFormerEncoder(config, with_text_path)

    def forward(
        self,
        query_embeds: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        text_attention: str = "bidirectional",
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> BaseModelOutputWithPoolingAndCrossAttentions:
        if query_embeds is None and input_ids is None:
            raise ValueError("the Q-Former needs query_embeds, input_ids or both")
        dtype = self.layernorm.weight.dtype
        parts = []
        if query_embeds is not None:
            parts.append(query_embeds.to(dtype))
        if input_ids is not None:
            if not hasattr(self, "embeddings"):
                raise ValueError("this Q-Former was built without its text path (stage 2); input_ids are not supported")
            parts.append(self.embeddings(input_ids).to(dtype))
        embeddings = self.dropout(self.layernorm(torch.cat(parts, dim=1)))
        query_length = 0 if query_embeds is None else query_embeds.shape[1]

        batch, length = embeddings.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.long, device=embeddings.device)
        if attention_mask.shape != (batch, length):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected (batch, queries + text) = {(batch, length)}"
            )
        allowed = attention_mask[:, None, None, :].bool().expand(batch, 1, length, length)
        if text_attention == "causal":
            # UniLM mask: queries see queries only; text sees all queries and the text up to itself.
            position = torch.arange(length, device=embeddings.device)
            is_text_key = position[None, :] >= query_length
            unilm = ~is_text_key | ((position[:, None] >= query_length) & (position[None, :] <= position[:, None]))
            allowed = allowed & unilm
        elif text_attention != "bidirectional":
            raise ValueError(f"text_attention must be 'bidirectional' or 'causal', got {text_attention!r}")
        # Additive float mask: SDPA on every backend, and no fully-masked row (queries always see themselves).
        mask = torch.zeros(allowed.shape, dtype=dtype, device=embeddings.device)
        mask = mask.masked_fill(~allowed, torch.finfo(dtype).min)

        if encoder_hidden_states is not None:
            encoder_hidden_states = encoder_hidden_states.to(dtype)
        sequence_output, hidden_states, attentions, cross_attentions = self.encoder(
            embeddings, mask, encoder_hidden_states, query_length, output_attentions, output_hidden_states
        )
        return BaseModelOutputWithPoolingAndCrossAttentions(
            last_hidden_state=sequence_output, pooler_output=sequence_output[:, 0], hidden_states=hidden_states,
            attentions=attentions, cross_attentions=cross_attentions,
        )


class Blip2FlanT5LMPredictionHead(nn.Module):
    """BERT's masked-LM head (dense, GELU, LayerNorm, vocabulary projection tied to the word embeddings), used
    for image-grounded text generation in stage 1 (LAVIS `Qformer.cls.predictions`)."""

    def __init__(self, config: Blip2FlanT5QFormerConfig):
        super().__init__()
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform.transform_act_fn = ACT2FN[config.hidden_act]
        self.transform.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=True)

    def forward(self, hidden_states):
        t = self.transform
        return self.decoder(t.LayerNorm(t.transform_act_fn(t.dense(hidden_states))))


# ----------------------------------------------------------------------------------------------------------------
# Shared base: vision tower, ln_vision, query tokens, Q-Former


def _create_vision_model(config: Blip2FlanT5VisionConfig) -> nn.Module:
    import timm

    kwargs = dict(
        pretrained=False,
        num_classes=0,
        global_pool="",
        img_size=config.image_size,
        patch_size=config.patch_size,
        embed_dim=config.hidden_size,
        depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        mlp_ratio=config.intermediate_size / config.hidden_size,
        drop_path_rate=config.drop_path_rate,
    )
    if config.timm_model_name.startswith("eva"):
        # BLIP-2 takes EVA's patch tokens before any final norm; ln_vision follows outside the ViT.
        kwargs.update(use_post_transformer_norm=False, norm_layer=_eva_layer_norm(config.layer_norm_eps))
    kwargs.update(config.timm_kwargs)
    return timm.create_model(config.timm_model_name, **kwargs)


def timm_forward_features(trunk: nn.Module, pixel_values: torch.Tensor, attn_implementation: str,
                          output_attentions: bool = False, output_hidden_states: bool = False):
    """`trunk.forward_features(pixel_values)` of a timm ViT (EVA here), with transformers' attention switch and outputs.

    timm's blocks attend with SDPA (`fused_attn`) or written out; "eager" (or `output_attentions`) selects the
    latter, whose probabilities pass through `attn.attn_drop`, where a hook records them. Hooks on the blocks record
    the hidden states: the blocks' input, then each block's output. Returns (tokens, hidden_states, attentions).
    (The same function as CoCa's: each modeling folder is Hub-portable and imports only its siblings.)"""
    fused = attn_implementation != "eager" and not output_attentions
    hidden_states, attentions, hooks = [], [], []
    for block in trunk.blocks:
        block.attn.fused_attn = fused
        if output_hidden_states:
            hooks.append(block.register_forward_hook(lambda module, args, output: hidden_states.append(output)))
        if output_attentions:
            hooks.append(block.attn.attn_drop.register_forward_hook(lambda module, args, output: attentions.append(output)))
    if output_hidden_states:
        hooks.append(trunk.blocks[0].register_forward_pre_hook(lambda module, args: hidden_states.append(args[0])))
    try:
        tokens = trunk.forward_features(pixel_values)
    finally:
        for hook in hooks:
            hook.remove()
    return tokens, tuple(hidden_states) if output_hidden_states else None, tuple(attentions) if output_attentions else None


def _eva_layer_norm(eps: float):
    from functools import partial

    from timm.layers import LayerNorm

    return partial(LayerNorm, eps=eps)


class Blip2FlanT5PreTrainedModel(PreTrainedModel):
    config: Blip2FlanT5Config
    config_class = Blip2FlanT5Config
    base_model_prefix = "blip2_flant5"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["Blip2FlanT5QFormerLayer", "EvaBlock", "T5Block"]
    # The Q-Former and its queries stay fp32 when a checkpoint is loaded in fp16 (as in transformers' BLIP-2).
    _keep_in_fp32_modules = ["query_tokens", "qformer"]
    # Our losses are batch means: the Trainer must scale them for gradient accumulation itself.
    accepts_loss_kwargs = False

    @classmethod
    def is_custom_code(cls) -> bool:
        """False: like transformers' own models, this code initializes through `transformers.initialization`, which
        leaves loaded tensors alone. transformers' guess for custom code marks every module without parameters of its
        own as initialized, which skipped T5's `_init_weights` for its attention blocks: T5 weights missing from a
        checkpoint kept torch's std ~1 (issue 16.5)."""
        return False

    def _build_vision_and_qformer(self, config: Blip2FlanT5Config, with_text_path: bool):
        # transformers resolves `attn_implementation` on this config; the towers' attention reads their sub-configs
        for key in ("vision_config", "qformer_config"):
            if getattr(config, key)._attn_implementation_internal is None:
                getattr(config, key)._attn_implementation_internal = config._attn_implementation
        self.vision_model = _create_vision_model(config.vision_config)
        # what transformers' composite-model code reads on a tower (a PreTrainedModel would carry both)
        self.vision_model.config, self.vision_model._supports_sdpa = config.vision_config, True
        if getattr(config, "quantization_config", None) is not None:
            # Quantization (bitsandbytes, torchao) leaves the ViT alone: timm's EVA attention calls
            # F.linear(x, weight=self.qkv.weight, ...) itself, past a quantized layer's forward, and int8 / 4-bit
            # weights fail there (issue 20.5). Every transformers quantizer skips `_keep_in_fp32_modules`;
            # from_pretrained gives the ViT its load dtype back (no fp32 upcast).
            self._keep_in_fp32_modules = [*type(self)._keep_in_fp32_modules, "vision_model"]
        self.ln_vision = nn.LayerNorm(config.vision_config.hidden_size, eps=config.vision_config.ln_vision_eps)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))
        self.qformer = Blip2FlanT5QFormerModel(config.qformer_config, with_text_path=with_text_path)

    def _apply_freezing(self):
        """Frozen parts (config.freeze_vision / freeze_language_model) get no gradient and stay out of the optimizer."""
        if self.config.freeze_vision:
            self.vision_model.requires_grad_(False)
        if getattr(self.config, "freeze_language_model", False) and hasattr(self, "language_model"):
            self.language_model.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        try:
            loaded = super().from_pretrained(*args, **kwargs)
        except Exception as err:
            named = _name_unreadable_weights(err, args[0] if args else kwargs.get("pretrained_model_name_or_path"))
            if named is err:
                raise
            raise named from err
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        # Loading replaces the parameters, and with them requires_grad: freeze again afterwards.
        model._apply_freezing()
        if getattr(model, "is_quantized", False):
            # the unquantized ViT (see _build_vision_and_qformer) in the dtype the rest was loaded in, not fp32
            model.vision_model.to(model.ln_vision.weight.dtype)
        return loaded

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, Blip2FlanT5PreTrainedModel):
            init.normal_(module.query_tokens, mean=0.0, std=self.config.qformer_config.initializer_range)
            if hasattr(module, "temp"):
                init.constant_(module.temp, 0.07)
        elif type(module).__name__ == "Eva":
            std = self.config.vision_config.initializer_range
            if getattr(module, "pos_embed", None) is not None:
                init.trunc_normal_(module.pos_embed, std=std)
            if getattr(module, "cls_token", None) is not None:
                init.trunc_normal_(module.cls_token, std=std)
        elif getattr(module, "k_bias", None) is not None and getattr(module, "q_bias", None) is not None:
            # EVA attention: trainable q/v biases and a fixed zero key bias (a key bias cannot change softmax).
            init.zeros_(module.q_bias)
            init.zeros_(module.v_bias)
            init.zeros_(module.k_bias)

    def _set_gradient_checkpointing(self, enable: bool = True, *args, **kwargs):
        super()._set_gradient_checkpointing(enable, *args, **kwargs)
        # timm checkpoints the ViT non-reentrant (its reentrant mode cannot pass EVA blocks their keyword arguments).
        self.vision_model.set_grad_checkpointing(enable)
        if enable and not getattr(self, "_require_grads_hooks", None):
            # transformers hooks the inputs only of text models (main_input_name "input_ids"); ours pass through
            # frozen parts too, and reentrant checkpointing needs them (see enable_input_require_grads).
            self.enable_input_require_grads()

    def enable_input_require_grads(self):
        """Under reentrant checkpointing a layer whose inputs need no gradient gives none to the adapters (LoRA)
        inside it. Besides T5's embeddings (transformers' hook), the Q-Former's input needs one: it comes from the
        query tokens, which are frozen under peft (issue 20.2). Installs the hooks once (peft calls this again)."""
        self.disable_input_require_grads()
        super().enable_input_require_grads()
        qformer = self.qformer

        def queries_require_grad(module, args, output):
            if any(p.requires_grad for p in qformer.parameters()):  # a frozen Q-Former needs no backward
                output.requires_grad_(True)

        hook = qformer.layernorm.register_forward_hook(queries_require_grad)
        self._require_grads_hooks = [*self._require_grads_hooks, hook]

    # Auto classes besides `_auto_class` that the saved folder's auto_map should also answer.
    _extra_auto_classes: tuple[str, ...] = ()

    def save_pretrained(self, save_directory, *args, **kwargs):
        if self._auto_class is not None:
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            for auto_class in self._extra_auto_classes:
                auto_map[auto_class] = f"{__name__.split('.')[-1]}.{type(self).__name__}"
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    def train(self, mode: bool = True):
        """Frozen parts stay in eval mode (no dropout / drop-path), as BLIP-2 trains; what trains inside them (LoRA
        layers, unfrozen blocks) follows `mode` (issue 20.3)."""
        super().train(mode)
        if self.config.freeze_vision:
            _eval_except_trainable_parts(self.vision_model, mode)
        if getattr(self.config, "freeze_language_model", False) and hasattr(self, "language_model"):
            _eval_except_trainable_parts(self.language_model, mode)
        return self

    def get_image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(batch, num_image_tokens, vision_width)`: the ViT's tokens after `ln_vision` (computed in fp32, as LAVIS)."""
        return self._vision_output(pixel_values).last_hidden_state

    def _vision_output(self, pixel_values, output_attentions=False, output_hidden_states=False):
        """The vision tower: `last_hidden_state` = its tokens after `ln_vision`, with the ViT's hidden states and
        attentions when asked for."""
        if pixel_values is None or pixel_values.dim() != 4:
            raise ValueError(
                "pixel_values must be a (batch, 3, height, width) tensor, got "
                f"{None if pixel_values is None else tuple(pixel_values.shape)}"
            )
        vision_dtype = self.vision_model.patch_embed.proj.weight.dtype
        image_embeds, hidden_states, attentions = timm_forward_features(
            self.vision_model, pixel_values.to(vision_dtype), self.config.vision_config._attn_implementation,
            output_attentions, output_hidden_states,
        )
        ln = self.ln_vision
        dtype = torch.promote_types(ln.weight.dtype, torch.float32)  # at least fp32
        image_embeds = F.layer_norm(
            image_embeds.to(dtype), ln.normalized_shape, ln.weight.to(dtype), ln.bias.to(dtype), ln.eps
        ).to(ln.weight.dtype)
        return BaseModelOutputWithPooling(last_hidden_state=image_embeds, hidden_states=hidden_states,
                                          attentions=attentions)

    def get_query_output(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """`(batch, num_query_tokens, qformer_width)`: the query tokens after attending to the image."""
        return self._query_output(image_embeds).last_hidden_state

    def _query_output(self, image_embeds, output_attentions=False, output_hidden_states=False,
                      qformer_input_ids=None, qformer_attention_mask=None):
        """The Q-Former over the queries (and, when given, the question's BERT tokens after them, in the same
        self-attention): its output covers every position; the first `num_query_tokens` are the queries'."""
        query_tokens = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        attention_mask = None
        if qformer_input_ids is not None:
            if qformer_input_ids.dim() != 2 or qformer_input_ids.shape[0] != image_embeds.shape[0]:
                raise ValueError(
                    f"qformer_input_ids must be (batch, length) with the batch of pixel_values ({image_embeds.shape[0]}), "
                    f"got {tuple(qformer_input_ids.shape)}"
                )
            if qformer_attention_mask is None:
                qformer_attention_mask = torch.ones_like(qformer_input_ids)
            query_mask = torch.ones(query_tokens.shape[:2], dtype=qformer_attention_mask.dtype,
                                    device=qformer_attention_mask.device)
            attention_mask = torch.cat([query_mask, qformer_attention_mask], dim=1)
        return self.qformer(query_embeds=query_tokens, input_ids=qformer_input_ids, attention_mask=attention_mask,
                            encoder_hidden_states=image_embeds, output_attentions=output_attentions,
                            output_hidden_states=output_hidden_states)

    def _output_flags(self, sub_config, output_attentions, output_hidden_states, return_dict):
        """Unset flags follow the config (the model's or the tower's sub-config, as transformers' towers do)."""
        if output_attentions is None:
            output_attentions = self.config.output_attentions or sub_config.output_attentions
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states or sub_config.output_hidden_states
        return output_attentions, output_hidden_states, self.config.return_dict if return_dict is None else return_dict


def _name_unreadable_weights(error: Exception, source) -> Exception:
    """An error for weights that cannot be read, naming the file: safetensors' own message names none (a truncated
    download or copy, issue 16.11). `error` itself when it is another kind of error."""
    if type(error).__name__ != "SafetensorError":
        return error
    import os

    from safetensors import safe_open

    broken = []
    if source is not None and os.path.isdir(source):
        for name in sorted(os.listdir(source)):
            if name.endswith(".safetensors"):
                try:
                    with safe_open(os.path.join(source, name), "pt"):
                        pass
                except Exception:  # any failure to open names the file
                    broken.append(os.path.join(source, name))
    where = ", ".join(broken) if broken else f"a safetensors file of {source}"
    return OSError(f"{where} cannot be read ({error}); the file is incomplete or damaged: download or save it again")


def _eval_except_trainable_parts(tower: nn.Module, mode: bool):
    """A frozen tower in eval mode, except what trains inside it, which follows `mode`: adapter layers (peft's keep
    the frozen module they wrap as `base_layer`, which stays in eval mode; their dropout trains) and submodules whose
    parameters all require grad. Checkpointed layers (GradientCheckpointingLayer) follow `mode` too, but not their
    children: transformers checkpoints a layer only in training mode, and the frozen T5, which the gradient of
    everything before it (Q-Former, adapters) flows through, would otherwise keep every activation; its dropout
    stays off all the same. Two passes over the modules: the Trainer calls train() every step."""
    if not mode:
        tower.eval()
        return
    trainable = {}  # id(module) -> (any, all) of the parameters under it require grad

    def count(module):
        flags = [p.requires_grad for p in module._parameters.values() if p is not None]  # its own (fast)
        any_grad, all_grad = any(flags), all(flags)
        for child in module.children():
            child_any, child_all = count(child)
            any_grad, all_grad = any_grad or child_any, all_grad and child_all
        trainable[id(module)] = any_grad, all_grad
        return any_grad, all_grad

    def set_training(module, inherited: bool):
        any_grad, all_grad = trainable[id(module)]
        whole = inherited or (any_grad and all_grad)
        base_layer = getattr(module, "base_layer", None)
        adapter = any_grad and isinstance(base_layer, nn.Module)
        module.training = whole or adapter or isinstance(module, GradientCheckpointingLayer)
        for child in module.children():
            set_training(child, whole or (adapter and child is not base_layer))

    count(tower)
    set_training(tower, False)


# ----------------------------------------------------------------------------------------------------------------
# Stage 1


def _with_pooler_output(output: ModelOutput, pooler_output: torch.Tensor) -> ModelOutput:
    """The same output with another `pooler_output` (a new object: a field set after creation would come last in
    `to_tuple()`)."""
    return type(output)(**{**output, "pooler_output": pooler_output})


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """Losses in at least fp32: half-precision logits are upcast, fp32 / fp64 ones kept (`.float()` would round a
    float64 model's losses to fp32)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _batch_shapes(input_ids: torch.Tensor) -> list[tuple[int, int]]:
    """`(batch, text_length)` of every rank, in rank order (one small all_gather; `[input_ids.shape]` on one process).
    Ranks may hold different batch sizes (an epoch's uneven last batches) and text lengths ("longest" padding):
    the gathers below pad to the largest and cut each rank's rows back out, so every rank sees the same global batch."""
    if not _distributed():
        return [tuple(input_ids.shape)]
    import torch.distributed as dist

    shape = torch.tensor(input_ids.shape, dtype=torch.long, device=input_ids.device)
    shapes = [torch.empty_like(shape) for _ in range(dist.get_world_size())]
    dist.all_gather(shapes, shape)
    return [tuple(s.tolist()) for s in shapes]


def _all_gather_rows(tensor: torch.Tensor, batches: list[int], width: int | None = None) -> torch.Tensor:
    """all_gather of `tensor` whose dim 0 is `batches[rank]` on each rank (and dim 1 at most `width`, zero-padded up
    to it): the concatenation of every rank's rows."""
    import torch.distributed as dist

    pad = [0, 0] * (tensor.dim() - 1) + [0, max(batches) - tensor.shape[0]]
    if width is not None:
        pad[-3] = width - tensor.shape[1]
    padded = F.pad(tensor, pad).contiguous()
    gathered = [torch.empty_like(padded) for _ in batches]
    dist.all_gather(gathered, padded)
    return torch.cat([rows[:batch] for rows, batch in zip(gathered, batches)], dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums every rank's gradient for this rank's slice (LAVIS's
    GatherLayer), for batch sizes that may differ between ranks. Written out because
    torch.distributed.nn.all_gather's backward on gloo (all_to_all) returns wrong gradients when the incoming
    gradient comes from an einsum, as in our similarity (seen with torch 2.15)."""

    @staticmethod
    def forward(ctx, tensor, batches):
        rank = _rank()
        ctx.start, ctx.stop = sum(batches[:rank]), sum(batches[: rank + 1])
        return _all_gather_rows(tensor, batches)

    @staticmethod
    def backward(ctx, grad_output):
        import torch.distributed as dist

        grad_output = grad_output.contiguous()
        dist.all_reduce(grad_output)
        return grad_output[ctx.start : ctx.stop], None


def _gather_with_grad(tensor: torch.Tensor, batches: list[int]) -> torch.Tensor:
    """Concatenate `tensor` from all ranks, keeping the gradient path to every rank's copy (no-op on one process)."""
    return _GatherWithGrad.apply(tensor, tuple(batches)) if len(batches) > 1 else tensor


def _gather_no_grad(tensor: torch.Tensor, batches: list[int], width: int | None = None) -> torch.Tensor:
    return _all_gather_rows(tensor, batches, width) if len(batches) > 1 else tensor


class Blip2FlanT5ForPretraining(Blip2FlanT5PreTrainedModel):
    """Stage 1: the Q-Former learns to extract text-relevant image features (LAVIS `Blip2Qformer`).

    `forward(pixel_values, input_ids, attention_mask)` with `input_ids` in the Q-Former's BERT vocabulary
    ([CLS] ... [SEP], padded) returns itc_loss + itm_loss + itg_loss with `return_loss=True` (the default while
    training); in eval mode by default it returns the similarity logits only (retrieval), deterministically.
    """

    _tied_weights_keys = {"lm_head.decoder.weight": "qformer.embeddings.word_embeddings.weight"}
    # The ITG head reads the fp32 Q-Former and its vocabulary projection is the Q-Former's word embeddings.
    _keep_in_fp32_modules = ["query_tokens", "qformer", "lm_head"]

    def __init__(self, config: Blip2FlanT5Config):
        super().__init__(config)
        self._build_vision_and_qformer(config, with_text_path=True)
        qformer_width, embed_dim = config.qformer_config.hidden_size, config.image_text_hidden_size
        self.vision_proj = nn.Linear(qformer_width, embed_dim)
        self.text_proj = nn.Linear(qformer_width, embed_dim)
        self.itm_head = nn.Linear(qformer_width, 2)
        self.lm_head = Blip2FlanT5LMPredictionHead(config.qformer_config)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self._apply_freezing()
        self.post_init()

    def get_input_embeddings(self):
        return self.qformer.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.qformer.embeddings.word_embeddings = value

    def get_output_embeddings(self):
        return self.lm_head.decoder

    def set_output_embeddings(self, new_embeddings):
        self.lm_head.decoder = new_embeddings

    def resize_token_embeddings(self, *args, **kwargs):
        """Resizes the Q-Former's vocabulary (its word embeddings and the tied ITG head) and records the new size in
        `qformer_config`; transformers would write it into `config.get_text_config()`, the T5 config, and the
        resized model would not load again (issue 16.7)."""
        text_config = self.config.get_text_config()
        t5_vocab_size = text_config.vocab_size
        embeddings = super().resize_token_embeddings(*args, **kwargs)
        text_config.vocab_size = t5_vocab_size
        self.config.qformer_config.vocab_size = embeddings.weight.shape[0]
        return embeddings

    def _project(self, head: nn.Linear, hidden_states: torch.Tensor) -> torch.Tensor:
        """A head applied to the (fp32) Q-Former's output in the head's own dtype (fp16 heads after a half-precision
        load, issue 16.6)."""
        return head(hidden_states.to(head.weight.dtype))

    def get_image_features(self, pixel_values: torch.Tensor, output_attentions: bool | None = None,
                           output_hidden_states: bool | None = None, return_dict: bool | None = None,
                           **kwargs) -> BaseModelOutputWithPooling | tuple:
        """last_hidden_state: image tokens after ln_vision; pooler_output: `(batch, num_query_tokens, embed_dim)`
        normalized query embeddings (ITC compares a text with each of them and keeps the maximum); hidden_states /
        attentions: the ViT's."""
        output_attentions, output_hidden_states, return_dict = self._output_flags(
            self.config.vision_config, output_attentions, output_hidden_states, return_dict
        )
        vision_output = self._vision_output(pixel_values, output_attentions, output_hidden_states)
        query_output = self.get_query_output(vision_output.last_hidden_state)
        vision_output = _with_pooler_output(
            vision_output, F.normalize(self._project(self.vision_proj, query_output), dim=-1)
        )
        return vision_output if return_dict else vision_output.to_tuple()

    def get_text_features(self, input_ids: torch.LongTensor, attention_mask=None, output_attentions: bool | None = None,
                          output_hidden_states: bool | None = None, return_dict: bool | None = None,
                          **kwargs) -> BaseModelOutputWithPooling | tuple:
        """last_hidden_state: the Q-Former text encoder's states; pooler_output: `(batch, embed_dim)` the
        normalized projection of [CLS]; hidden_states / attentions: the Q-Former text encoder's."""
        output_attentions, output_hidden_states, return_dict = self._output_flags(
            self.config.qformer_config, output_attentions, output_hidden_states, return_dict
        )
        text_output = self.qformer(input_ids=input_ids, attention_mask=attention_mask,
                                   output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        text_output = _with_pooler_output(
            text_output, F.normalize(self._project(self.text_proj, text_output.last_hidden_state[:, 0]), dim=-1)
        )
        return text_output if return_dict else text_output.to_tuple()

    @staticmethod
    def image_text_similarity(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
        """`(num_images, num_texts)` cosine similarity: the best-matching query token per image-text pair."""
        return torch.einsum("iqd,td->itq", image_feats, text_feats).amax(dim=-1)

    def itm_logits(self, image_embeds, input_ids, attention_mask=None) -> torch.Tensor:
        """`(batch, 2)` match logits for the pairs (image_embeds[i], input_ids[i]); class 1 = the text matches."""
        batch = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        query_tokens = self.query_tokens.expand(batch, -1, -1)
        query_mask = torch.ones(query_tokens.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device)
        output = self.qformer(
            query_embeds=query_tokens,
            input_ids=input_ids,
            attention_mask=torch.cat([query_mask, attention_mask], dim=1),
            encoder_hidden_states=image_embeds,
        ).last_hidden_state
        return self._project(self.itm_head, output[:, : query_tokens.shape[1]]).mean(dim=1)

    @torch.no_grad()
    def itm_scores(self, pixel_values, input_ids, attention_mask=None) -> torch.Tensor:
        """`(batch,)` probability that text i describes image i (the ITM head, for retrieval re-ranking)."""
        logits = self.itm_logits(self.get_image_embeds(pixel_values), input_ids, attention_mask)
        return logits.softmax(dim=-1)[:, 1]

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        return_loss: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> Blip2FlanT5PretrainingOutput | tuple:
        r"""
        return_loss: compute itc + itm + itg. `None` (the default) means "while training": a `model.train()` forward
            returns the losses, a `model.eval()` forward returns the similarity logits only (retrieval, as
            transformers' CLIP/BLIP without `return_loss`). The training collator always passes `return_loss=True`.

        ITM hard negatives come from the global (all-gathered) batch. They are sampled (`torch.multinomial`, in
        proportion to the softmaxed similarities, as LAVIS) only in training mode; in eval mode with
        `return_loss=True` each pair takes its hardest negative (the argmax), so eval forwards are deterministic.
        A global batch of one pair (one process with batch 1, or every rank's batch together) has no negative:
        ITC over one pair is 0 by definition, and ITM scores the positive pairs only with its loss multiplied by 0,
        so that itm_head and the Q-Former's matching path still take part in the backward (DeepSpeed ZeRO needs
        every rank to use the same parameters). The choice depends on the global batch size, which all ranks share.
        Ranks may hold different batch sizes (uneven last batches).
        """
        if input_ids is None or input_ids.dim() != 2 or input_ids.shape[0] != pixel_values.shape[0]:
            raise ValueError(
                f"input_ids must be (batch, length) with the batch of pixel_values ({pixel_values.shape[0]}), got "
                f"{None if input_ids is None else tuple(input_ids.shape)}"
            )
        if return_loss is None:
            return_loss = self.training
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        output_attentions, output_hidden_states, return_dict = self._output_flags(
            self.config.qformer_config, output_attentions, output_hidden_states, return_dict
        )
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)

        vision_output = self._vision_output(pixel_values, output_attentions, output_hidden_states)
        image_embeds = vision_output.last_hidden_state
        qformer_output = self._query_output(image_embeds, output_attentions, output_hidden_states)
        image_feats = F.normalize(self._project(self.vision_proj, qformer_output.last_hidden_state), dim=-1)
        text_output = self.get_text_features(input_ids, attention_mask, output_attentions, output_hidden_states, True)
        text_feat = text_output.pooler_output
        towers = {"vision_model_output": vision_output, "qformer_model_output": qformer_output,
                  "text_model_output": text_output}

        # ITC over the global batch: local images against all texts, local texts against all images.
        shapes = _batch_shapes(input_ids)
        batches = [b for b, _ in shapes]
        image_feats_all = _gather_with_grad(image_feats, batches)
        text_feat_all = _gather_with_grad(text_feat, batches)
        sim_i2t = self.image_text_similarity(image_feats, text_feat_all) / self.temp
        sim_t2i = self.image_text_similarity(image_feats_all, text_feat).t() / self.temp
        if not return_loss:
            output = Blip2FlanT5PretrainingOutput(
                logits_per_image=sim_i2t, logits_per_text=sim_t2i, image_embeds=image_feats, text_embeds=text_feat,
                **towers,
            )
            return output if return_dict else output.to_tuple()

        batch = pixel_values.shape[0]
        offset = sum(batches[: _rank()])
        targets = torch.arange(offset, offset + batch, device=sim_i2t.device)
        itc_loss = (
            F.cross_entropy(_upcast(sim_i2t), targets, label_smoothing=0.1)
            + F.cross_entropy(_upcast(sim_t2i), targets, label_smoothing=0.1)
        ) / 2

        # ITM: for each text a hard negative image, for each image a hard negative text, sampled in proportion
        # to their similarity (the positive pair masked out); the hardest one in eval mode.
        if sum(batches) < 2:
            # No negative in the whole batch: the positives alone, with a zero loss that keeps the graph.
            itm_logits = self.itm_logits(image_embeds, input_ids, attention_mask)
            itm_labels = torch.ones(batch, dtype=torch.long, device=itm_logits.device)
            itm_loss = F.cross_entropy(_upcast(itm_logits), itm_labels) * 0.0
        else:
            width = max(length for _, length in shapes)
            input_ids_all = _gather_no_grad(input_ids, batches, width)
            attention_mask_all = _gather_no_grad(attention_mask, batches, width)
            image_embeds_all = _gather_with_grad(image_embeds, batches)
            with torch.no_grad():
                diagonal = torch.zeros_like(sim_i2t, dtype=torch.bool)
                diagonal[torch.arange(batch), targets] = True
                weights_t2i = _upcast(sim_t2i).masked_fill(diagonal, -10000).softmax(dim=1)
                weights_i2t = _upcast(sim_i2t).masked_fill(diagonal, -10000).softmax(dim=1)
                if self.training:
                    negative_images = torch.multinomial(weights_t2i, 1).squeeze(1)
                    negative_texts = torch.multinomial(weights_i2t, 1).squeeze(1)
                else:
                    negative_images, negative_texts = weights_t2i.argmax(dim=1), weights_i2t.argmax(dim=1)
            # Local texts padded to the longest text of any rank (a no-op on one process).
            local_ids = F.pad(input_ids, (0, width - input_ids.shape[1]))
            local_mask = F.pad(attention_mask, (0, width - attention_mask.shape[1]))
            itm_input_ids = torch.cat([local_ids, local_ids, input_ids_all[negative_texts]], dim=0)
            itm_attention_mask = torch.cat([local_mask, local_mask, attention_mask_all[negative_texts]], dim=0)
            itm_image_embeds = torch.cat([image_embeds, image_embeds_all[negative_images], image_embeds], dim=0)
            itm_logits = self.itm_logits(itm_image_embeds, itm_input_ids, itm_attention_mask)
            itm_labels = torch.cat(
                [torch.ones(batch, dtype=torch.long), torch.zeros(2 * batch, dtype=torch.long)]
            ).to(itm_logits.device)
            itm_loss = F.cross_entropy(_upcast(itm_logits), itm_labels)

        # ITG: the caption decoded from the queries under the UniLM mask, [DEC] in place of [CLS].
        decoder_input_ids = input_ids.clone()
        decoder_input_ids[:, 0] = self.config.qformer_config.dec_token_id
        labels = decoder_input_ids.masked_fill(attention_mask == 0, -100)
        query_tokens = self.query_tokens.expand(batch, -1, -1)
        query_mask = torch.ones(query_tokens.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device)
        itg_output = self.qformer(
            query_embeds=query_tokens,
            input_ids=decoder_input_ids,
            attention_mask=torch.cat([query_mask, attention_mask], dim=1),
            encoder_hidden_states=image_embeds,
            text_attention="causal",
        ).last_hidden_state
        itg_output = itg_output[:, query_tokens.shape[1] :]
        itg_logits = self.lm_head(itg_output.to(self.lm_head.transform.dense.weight.dtype))
        itg_loss = F.cross_entropy(
            _upcast(itg_logits[:, :-1]).reshape(-1, itg_logits.shape[-1]),
            labels[:, 1:].reshape(-1),
            ignore_index=-100,
            label_smoothing=0.1,
        )

        output = Blip2FlanT5PretrainingOutput(
            loss=itc_loss + itm_loss + itg_loss,
            itc_loss=itc_loss,
            itm_loss=itm_loss,
            itg_loss=itg_loss,
            logits_per_image=sim_i2t,
            logits_per_text=sim_t2i,
            itm_logits=itm_logits,
            itg_logits=itg_logits,
            image_embeds=image_feats,
            text_embeds=text_feat,
            **towers,
        )
        return output if return_dict else output.to_tuple()


# ----------------------------------------------------------------------------------------------------------------
# Stage 2

# Stage-1 parameters that stage 2 does not use: the Q-Former's text path and the ITC/ITM/ITG heads.
STAGE1_ONLY_PREFIXES = ("vision_proj.", "text_proj.", "itm_head.", "lm_head.", "temp", "qformer.embeddings.")
STAGE1_ONLY_PATTERNS = (r"qformer\.encoder\.layer\.\d+\.(intermediate|output)\.",)


def is_stage1_only_key(key: str) -> bool:
    import re

    return key.startswith(STAGE1_ONLY_PREFIXES) or any(re.match(p, key) for p in STAGE1_ONLY_PATTERNS)


class Blip2FlanT5ForConditionalGeneration(Blip2FlanT5PreTrainedModel, GenerationMixin):
    """Stage 2: image (+ optional prompt) -> text with a frozen FlanT5.

    T5 encoder input: `cat([language_projection(query_output), embed(prompt)])` with mask
    `cat(ones(num_query_tokens), prompt_mask)`. `labels` are the target tokens (pad positions are ignored).
    """

    _extra_auto_classes = ("AutoModel",)
    # The family's recommended decoding per task, as LAVIS evaluates BLIP-2-FlanT5: VQAv2 with 5 beams, at most 10
    # new tokens, length_penalty -1 (favours short answers); COCO captions with 5 beams, 8 to 30 new tokens.
    # `save_pretrained` writes them into every checkpoint; explicit `generate` arguments still win.
    recommended_generation = {
        "vqa": {"num_beams": 5, "max_new_tokens": 10, "min_new_tokens": 1, "length_penalty": -1.0},
        "caption": {"num_beams": 5, "max_new_tokens": 30, "min_new_tokens": 8},
    }
    _keys_to_ignore_on_load_unexpected = [
        r"^vision_proj\.", r"^text_proj\.", r"^itm_head\.", r"^lm_head\.", r"^temp$", r"^qformer\.embeddings\.",
        *STAGE1_ONLY_PATTERNS,
    ]

    def __init__(self, config: Blip2FlanT5Config):
        super().__init__(config)
        self._build_vision_and_qformer(config, with_text_path=config.qformer_text_input)
        self.language_projection = nn.Linear(config.qformer_config.hidden_size, config.text_config.d_model)
        language_model = T5ForConditionalGeneration(config.text_config)
        if not config.lm_head_is_tied:
            # T5Config always says "tied"; FlanT5 has its own lm_head. Drop that tie (keep the input embeddings
            # shared) before our post_init collects the tied keys.
            language_model._tied_weights_keys = {
                k: v for k, v in T5ForConditionalGeneration._tied_weights_keys.items() if k != "lm_head.weight"
            }
            language_model.all_tied_weights_keys.pop("lm_head.weight", None)
            shared = language_model.shared.weight
            language_model.lm_head.weight = nn.Parameter(
                torch.empty_like(shared).normal_(std=config.text_config.initializer_factor)
            )
        self.language_model = language_model
        self._apply_freezing()
        self.post_init()

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Also writes the family's recommended decoding (`recommended_generation`): the first task's into
        generation_config.json (what `generate` and pipelines use; fields set on `self.generation_config` are kept),
        every other task's into `{task}_generation_config.json`. A model built from a config generates with
        transformers' defaults until saved and loaded again."""
        from transformers import GenerationConfig

        own, ((_, first), *others) = self.generation_config, self.recommended_generation.items()
        default = GenerationConfig()
        saved = GenerationConfig.from_dict({**own.to_dict(), "_from_model_config": False, **{
            k: v for k, v in first.items() if getattr(own, k, None) == getattr(default, k, None)}})
        self.generation_config = saved
        try:
            files = super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.generation_config = own
        if kwargs.get("is_main_process", True):
            ids = {k: getattr(own, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")}
            for task, settings in others:
                GenerationConfig(**ids, **settings).save_pretrained(
                    save_directory, config_file_name=f"{task}_generation_config.json")
        return files

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings):
        self.language_model.set_output_embeddings(new_embeddings)

    def get_encoder(self, modality=None):
        return self.language_model.get_encoder() if modality is None else super().get_encoder(modality=modality)

    def get_image_features(self, pixel_values: torch.Tensor, qformer_input_ids: torch.LongTensor | None = None,
                           qformer_attention_mask: torch.Tensor | None = None, output_attentions: bool | None = None,
                           output_hidden_states: bool | None = None, return_dict: bool | None = None,
                           **kwargs) -> BaseModelOutputWithPooling | tuple:
        """last_hidden_state: image tokens after ln_vision; pooler_output: the query outputs projected to T5's width
        (`(batch, num_query_tokens, d_model)`, the soft visual prompt); hidden_states / attentions: the ViT's.
        `qformer_input_ids` / `qformer_attention_mask`: the question in the Q-Former's BERT vocabulary (required
        with `config.qformer_text_input`, refused without)."""
        output_attentions, output_hidden_states, return_dict = self._output_flags(
            self.config.vision_config, output_attentions, output_hidden_states, return_dict
        )
        vision_output, _ = self._image_features(pixel_values, output_attentions, output_hidden_states,
                                                qformer_input_ids, qformer_attention_mask)
        return vision_output if return_dict else vision_output.to_tuple()

    def _image_features(self, pixel_values, output_attentions=False, output_hidden_states=False,
                        qformer_input_ids=None, qformer_attention_mask=None):
        """(vision output with the projected queries as `pooler_output`, Q-Former output over the queries and the
        question's tokens when the Q-Former reads it)."""
        if self.config.qformer_text_input and qformer_input_ids is None:
            raise ValueError(
                "this model's Q-Former reads the question (config.qformer_text_input=True): pass qformer_input_ids "
                "(and qformer_attention_mask), the question in the Q-Former's BERT vocabulary; the processor makes them"
            )
        if not self.config.qformer_text_input and qformer_input_ids is not None:
            raise ValueError(
                "qformer_input_ids were given but this model's Q-Former reads no text (config.qformer_text_input=False)"
            )
        vision_output = self._vision_output(pixel_values, output_attentions, output_hidden_states)
        qformer_output = self._query_output(vision_output.last_hidden_state, output_attentions, output_hidden_states,
                                            qformer_input_ids, qformer_attention_mask)
        query_output = qformer_output.last_hidden_state[:, : self.config.num_query_tokens]
        # the projection's input dtype: its weight's, or T5's where the weight is quantized (int8 / uint8 under
        # bitsandbytes, issue 20.5)
        weight = self.language_projection.weight
        dtype = weight.dtype if weight.is_floating_point() else self.language_model.get_input_embeddings().weight.dtype
        vision_output = _with_pooler_output(vision_output, self.language_projection(query_output.to(dtype)))
        return vision_output, qformer_output

    def _encoder_inputs(self, pixel_values, input_ids, attention_mask, inputs_embeds=None, output_attentions=False,
                        output_hidden_states=False, qformer_input_ids=None, qformer_attention_mask=None):
        """T5 encoder inputs_embeds and attention_mask: [projected queries, prompt embeddings]. The prompt comes as
        `input_ids` or as T5 input embeddings (`inputs_embeds`)."""
        vision_output, qformer_output = self._image_features(pixel_values, output_attentions, output_hidden_states,
                                                             qformer_input_ids, qformer_attention_mask)
        language_model_inputs = vision_output.pooler_output
        batch = language_model_inputs.shape[0]
        embed_tokens = self.language_model.get_input_embeddings()
        if input_ids is not None and inputs_embeds is not None:
            raise ValueError("give the prompt as input_ids or as inputs_embeds, not both")
        if inputs_embeds is None:
            if input_ids is None:
                # No prompt (captioning): T5's tokenizer turns the empty prompt into a lone </s>, as LAVIS feeds it.
                input_ids = torch.full((batch, 1), self.config.text_config.eos_token_id,
                                       device=language_model_inputs.device)
            inputs_embeds = embed_tokens(input_ids.to(embed_tokens.weight.device))
        if inputs_embeds.shape[0] != batch:
            raise ValueError(f"the prompt has batch {inputs_embeds.shape[0]} but pixel_values has batch {batch}")
        if attention_mask is None:
            attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        inputs_embeds = torch.cat([language_model_inputs.to(inputs_embeds.dtype), inputs_embeds], dim=1)
        query_mask = torch.ones(language_model_inputs.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device)
        return vision_output, qformer_output, inputs_embeds, torch.cat([query_mask, attention_mask], dim=1)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        qformer_input_ids: torch.LongTensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> Blip2FlanT5ForConditionalGenerationOutput | tuple:
        r"""
        input_ids / inputs_embeds: the prompt, as T5 token ids or T5 input embeddings (none: captioning).
        qformer_input_ids / qformer_attention_mask: the question for the Q-Former, in its BERT vocabulary (with
            `config.qformer_text_input`; transformers' InstructBLIP names).
        output_attentions / output_hidden_states: the vision tower's and the Q-Former's (`vision_model_output`,
            `qformer_model_output`) and T5's (`language_model_outputs`).
        Other keyword arguments (`past_key_values`, `use_cache`, `decoder_inputs_embeds`, ...) go to T5.
        """
        output_attentions, output_hidden_states, return_dict = self._output_flags(
            self.config.text_config, output_attentions, output_hidden_states, return_dict
        )
        vision_output, qformer_output, inputs_embeds, encoder_attention_mask = self._encoder_inputs(
            pixel_values, input_ids, attention_mask, inputs_embeds, output_attentions, output_hidden_states,
            qformer_input_ids, qformer_attention_mask,
        )
        kwargs.pop("num_items_in_batch", None)  # losses are means (see accepts_loss_kwargs)
        if labels is not None:
            # Padding in the targets is not a prediction target (T5's pad id is also its decoder start id).
            labels = labels.masked_fill(labels == self.config.text_config.pad_token_id, -100)
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=encoder_attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            labels=labels,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        output = Blip2FlanT5ForConditionalGenerationOutput(
            loss=outputs.loss,
            logits=outputs.logits,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            image_embeds=vision_output.last_hidden_state,
            query_output=qformer_output.last_hidden_state[:, : self.config.num_query_tokens],
            language_model_inputs=vision_output.pooler_output,
            language_model_outputs=outputs,
            vision_model_output=vision_output,
            qformer_model_output=qformer_output,
        )
        return output if return_dict else output.to_tuple()

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        qformer_input_ids: torch.LongTensor | None = None,
        qformer_attention_mask: torch.LongTensor | None = None,
        **generate_kwargs,
    ) -> torch.LongTensor:
        """Caption (no prompt) or answer (prompt such as "Question: {} Short answer:"); returns T5 decoder token ids.

        The prompt comes as `input_ids` or as T5 input embeddings (`inputs_embeds`). Prompts of different lengths
        are padded on the right with their attention_mask; the answers equal those obtained one image at a time.
        With `config.qformer_text_input` the Q-Former also reads the question (`qformer_input_ids`, from the processor).
        """
        _, _, inputs_embeds, encoder_attention_mask = self._encoder_inputs(
            pixel_values, input_ids, attention_mask, inputs_embeds,
            qformer_input_ids=qformer_input_ids, qformer_attention_mask=qformer_attention_mask,
        )
        return self.language_model.generate(
            inputs_embeds=inputs_embeds, attention_mask=encoder_attention_mask, **generate_kwargs
        )

    @classmethod
    def from_stage1(
        cls,
        stage1_path: str | os.PathLike,
        language_model: str | os.PathLike | T5Config | T5ForConditionalGeneration,
        output_loading_info: bool = False,
        **config_overrides,
    ):
        """Build stage 2 from a stage-1 checkpoint folder (`Blip2FlanT5ForPretraining.save_pretrained`) and a T5
        source: a T5 folder / Hub id (weights loaded), a `T5ForConditionalGeneration`, or a `T5Config` (random init).

        Every stage-1 tensor is either loaded or one of the stage-1-only heads (`STAGE1_ONLY_PREFIXES`,
        `STAGE1_ONLY_PATTERNS`), which are reported as intentionally unused; anything else is an error.
        `language_projection` is the only newly initialized part. With `output_loading_info=True` returns
        `(model, {"unused_stage1_keys": [...], "newly_initialized_keys": [...]})`.
        """
        from safetensors.torch import load_file
        from transformers.utils import cached_file

        if isinstance(language_model, (str, os.PathLike)):
            language_model = T5ForConditionalGeneration.from_pretrained(language_model)
        if isinstance(language_model, T5ForConditionalGeneration):
            text_config, t5_state = language_model.config, language_model.state_dict()
        elif isinstance(language_model, T5Config):
            text_config, t5_state = language_model, None
        else:
            raise TypeError(
                "language_model must be a T5 folder / Hub id, a T5ForConditionalGeneration or a T5Config, "
                f"got {type(language_model).__name__}"
            )
        config = Blip2FlanT5Config.from_pretrained(stage1_path, text_config=text_config.to_dict(), **config_overrides)
        model = cls(config)
        if t5_state is not None:
            model.language_model.load_state_dict(t5_state, strict=False)
            expected = set(model.language_model.state_dict())
            missing = expected - set(t5_state)
            if missing:
                raise ValueError(f"the T5 language model lacks {sorted(missing)[:5]} ({len(missing)} tensors)")

        weights_file = cached_file(str(stage1_path), "model.safetensors")
        stage1_state = load_file(weights_file)
        own_keys = set(model.state_dict())
        unused = sorted(k for k in stage1_state if is_stage1_only_key(k) and k not in own_keys)
        unexpected = sorted(k for k in stage1_state if k not in own_keys and not is_stage1_only_key(k))
        if unexpected:
            raise ValueError(f"{weights_file} holds tensors stage 2 does not know: {unexpected[:10]} ({len(unexpected)})")
        loaded = {k: v for k, v in stage1_state.items() if k in own_keys}
        model.load_state_dict(loaded, strict=False)
        newly_initialized = sorted(k for k in own_keys if k not in loaded and not k.startswith("language_model."))
        lacking = sorted(k for k in newly_initialized if not k.startswith("language_projection."))
        if lacking:
            raise ValueError(f"{weights_file} lacks stage-1 tensors: {lacking[:10]} ({len(lacking)})")
        logger.info(
            f"Stage 2 from {stage1_path}: {len(loaded)} tensors loaded; {len(unused)} stage-1-only tensors "
            f"intentionally unused (ITC/ITM/ITG heads, Q-Former text path); language_projection newly initialized."
        )
        if output_loading_info:
            return model, {"unused_stage1_keys": unused, "newly_initialized_keys": newly_initialized}
        return model


# save_pretrained writes "auto_map" and copies the modeling files, so trust_remote_code loading works without hf_vlm.
Blip2FlanT5ForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
Blip2FlanT5ForPretraining.register_for_auto_class("AutoModelForPreTraining")

__all__ = [
    "Blip2FlanT5ForConditionalGeneration",
    "Blip2FlanT5ForPretraining",
    "Blip2FlanT5PreTrainedModel",
    "Blip2FlanT5QFormerModel",
    "Blip2FlanT5PretrainingOutput",
    "Blip2FlanT5ForConditionalGenerationOutput",
]
