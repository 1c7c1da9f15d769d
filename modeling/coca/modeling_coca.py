"""CoCa (Contrastive Captioner, Yu et al. 2022) as a transformers model: `CocaModel`.

Read top to bottom: attention (SDPA, with KV cache), the text layer (shared by the text encoder and the
decoder's self-attention blocks), the cross-attention layer, the attentional pooler, the three towers, then
`CocaPreTrainedModel` (init, checkpointing) and `CocaModel` (features, losses, generation).

Data flow: pixel_values -> timm ViT trunk -> attentional pooler -> post LayerNorm -> (contrastive image
embedding, image tokens). input_ids -> text encoder (causal, CLS appended after the text) -> CLS gives the
contrastive text embedding; the token states (before the final LayerNorm) go on into the multimodal decoder,
which cross-attends to the image tokens and predicts the next token.

Module layout, chosen to map one-to-one onto open_clip's `CoCa` (a converter renames keys and splits
open_clip's fused `in_proj_weight`/`in_proj_bias` into our separate q/k/v projections; `proj`,
`text_projection` and the decoder's `text_projection` are transposed into Linear weights):
  vision_model.trunk.*                       <- visual.{conv1, class_embedding, ...} via timm's CLIP filter
  vision_model.attn_pool.{query, layernorm_query, layernorm_context, attention.*} <- visual.attn_pool.*
  vision_model.post_layernorm                <- visual.ln_post;       visual_projection <- visual.proj
  text_model.{token_embedding, position_embedding, cls_embedding, layers.N, final_layer_norm}
                                             <- text.{token_embedding, positional_embedding, cls_emb,
                                                transformer.resblocks.N, ln_final}
  text_projection                            <- text.text_projection
  text_decoder.layers.N.self_attn_block      <- text_decoder.resblocks.N
  text_decoder.layers.N.cross_attn_block     <- text_decoder.cross_attn.N (ln_1, ln_1_kv, attn, ln_2, mlp)
  text_decoder.final_layer_norm, lm_head     <- text_decoder.ln_final, text_decoder.text_projection
  logit_scale                                <- logit_scale
Text layers: layer_norm1 <- ln_1, self_attn.{q,k,v}_proj <- attn.in_proj (split), self_attn.out_proj
<- attn.out_proj, layer_norm2 <- ln_2, mlp.fc1 <- mlp.c_fc, mlp.fc2 <- mlp.c_proj.

Embedding convention (transformers CLIP v5): `get_image_features` / `get_text_features` return the projected,
NOT normalized, embedding in `pooler_output`; `forward` returns L2-normalized `image_embeds` / `text_embeds`.

Hub-portable: imports only torch, transformers, timm and its sibling configuration file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache, StaticLayer
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput

from .configuration_coca import CocaConfig, CocaMultimodalConfig, CocaTextConfig, CocaVisionConfig


@dataclass
class CocaOutput(ModelOutput):
    r"""
    loss: `contrastive_loss_weight * contrastive_loss + caption_loss_weight * caption_loss` (when asked for).
    contrastive_loss: symmetric InfoNCE over the batch gathered from all ranks.
    caption_loss: next-token cross-entropy, padding ignored; with several ranks, normalised by the global batch's
        token count (its mean over ranks is the loss of the whole batch).
    logits_per_image: `[n_images, n_texts]` scaled cosine similarities (local batch).
    logits_per_text: its transpose.
    image_embeds / text_embeds: L2-normalized projected embeddings.
    logits: `[batch, seq, vocab]` caption logits (position t predicts token t+1); computed when images and
        texts pair up (same batch size).
    past_key_values: the generation cache (`CocaCache`: self-attention of both text stacks, image K/V).
    text_model_output / vision_model_output: the towers' outputs (`get_text_features` / `get_image_features`), with
        their `hidden_states` / `attentions` when asked for.
    hidden_states / attentions / cross_attentions: the multimodal decoder's (the layers that predict the caption,
        as a decoder-only LM reports them; `generate` collects these), when asked for.
    """

    loss: torch.FloatTensor | None = None
    contrastive_loss: torch.FloatTensor | None = None
    caption_loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    cross_attentions: tuple[torch.FloatTensor, ...] | None = None

    def to_tuple(self):
        return tuple(v.to_tuple() if isinstance(v, ModelOutput) else v for v in (self[k] for k in self.keys()))


# ----------------------------------------------------------------------------------------------------- attention
def _linear(in_features: int, out_features: int, init_std: float | None = None, bias: bool = True) -> nn.Linear:
    """nn.Linear that carries its init std (read by `_init_weights`; None = `config.initializer_range`).
    Stored on the Linear itself because transformers initializes module by module."""
    layer = nn.Linear(in_features, out_features, bias=bias)
    layer.init_std = init_std
    return layer


def _text_stack_stds(width: int, num_layers: int) -> dict[str, float]:
    """open_clip's text-transformer init (which its CoCa applied to the text encoder only)."""
    proj = width**-0.5 * (2 * num_layers) ** -0.5
    return {"attn": width**-0.5, "attn_out": proj, "fc1": (2 * width) ** -0.5, "fc2": proj}


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Attention written out (`attn_implementation="eager"`): also returns the attention probabilities."""
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.dropout(F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype), p=dropout,
                        training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class CocaAttention(nn.Module):
    """Multi-head attention with separate q/k/v projections (`kv_dim` may differ, as in the pooler).

    Self-attention layers append their K/V to the self-attention cache under `layer_idx`; cross-attention
    layers compute the image K/V once and read them back from the cross-attention cache afterwards.
    The kernel is `config._attn_implementation` (transformers' attention interface); `output_attentions` runs the
    eager one, which returns the attention probabilities. Returns (output, probabilities or None).
    """

    is_causal = False  # masks are always explicit

    def __init__(self, config, embed_dim: int, num_heads: int, kv_dim: int | None = None, layer_idx: int | None = None,
                 is_cross_attention: bool = False, init_stds: dict[str, float] | None = None):
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = getattr(config, "attention_dropout", 0.0)
        self.layer_idx = layer_idx
        self.is_cross_attention = is_cross_attention
        kv_dim = kv_dim or embed_dim
        stds = init_stds or {}
        self.q_proj = _linear(embed_dim, embed_dim, stds.get("attn"))
        self.k_proj = _linear(kv_dim, embed_dim, stds.get("attn"))
        self.v_proj = _linear(kv_dim, embed_dim, stds.get("attn"))
        self.out_proj = _linear(embed_dim, embed_dim, stds.get("attn_out"))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        query = self._heads(self.q_proj(hidden_states))
        if self.is_cross_attention:
            cache = past_key_values.cross_attention_cache if past_key_values is not None else None
            if cache is not None and past_key_values.is_updated.get(self.layer_idx, False):
                key, value = cache.layers[self.layer_idx].keys, cache.layers[self.layer_idx].values
            else:
                if key_value_states is None:
                    raise ValueError("cross-attention needs image tokens (pixel_values) or a filled cache")
                key = self._heads(self.k_proj(key_value_states))
                value = self._heads(self.v_proj(key_value_states))
                if cache is not None:
                    key, value = cache.update(key, value, self.layer_idx)
                    past_key_values.is_updated[self.layer_idx] = True
        else:
            source = hidden_states if key_value_states is None else key_value_states
            key = self._heads(self.k_proj(source))
            value = self._heads(self.v_proj(source))
            if past_key_values is not None:
                cache = (past_key_values.self_attention_cache
                         if isinstance(past_key_values, EncoderDecoderCache) else past_key_values)
                key, value = cache.update(key, value, self.layer_idx)

        implementation = "eager" if output_attentions else self.config._attn_implementation
        attention = eager_attention_forward
        if implementation != "eager":
            attention = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        out, weights = attention(self, query, key, value, attention_mask, scaling=self.scaling,
                                 dropout=self.dropout if self.training else 0.0)
        out = out.reshape(hidden_states.shape[0], hidden_states.shape[1], -1)
        return self.out_proj(out), weights


class CocaMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, init_stds: dict[str, float]):
        super().__init__()
        self.fc1 = _linear(hidden_size, intermediate_size, init_stds["fc1"])
        self.activation_fn = ACT2FN[hidden_act]
        self.fc2 = _linear(intermediate_size, hidden_size, init_stds["fc2"])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


# -------------------------------------------------------------------------------------------------------- layers
class CocaTextLayer(GradientCheckpointingLayer):
    """Pre-LayerNorm causal self-attention block (open_clip `ResidualAttentionBlock`)."""

    def __init__(self, config: CocaTextConfig | CocaMultimodalConfig, layer_idx: int):
        super().__init__()
        stds = _text_stack_stds(config.hidden_size, config.num_hidden_layers)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CocaAttention(
            config, config.hidden_size, config.num_attention_heads, layer_idx=layer_idx, init_stds=stds
        )
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CocaMLP(config.hidden_size, config.intermediate_size, config.hidden_act, stds)

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, output_attentions=False):
        attended, weights = self.self_attn(self.layer_norm1(hidden_states), attention_mask=attention_mask,
                                           past_key_values=past_key_values, output_attentions=output_attentions)
        hidden_states = hidden_states + attended
        return hidden_states + self.mlp(self.layer_norm2(hidden_states)), weights


class CocaCrossAttentionLayer(GradientCheckpointingLayer):
    """Pre-LayerNorm cross-attention block with its own MLP; the image tokens get their own LayerNorm
    (open_clip `ResidualAttentionBlock(is_cross_attention=True)`: ln_1, ln_1_kv, attn, ln_2, mlp)."""

    def __init__(self, config: CocaMultimodalConfig, layer_idx: int):
        super().__init__()
        stds = _text_stack_stds(config.hidden_size, config.num_hidden_layers)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layer_norm_kv = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.cross_attn = CocaAttention(
            config, config.hidden_size, config.num_attention_heads, layer_idx=layer_idx, is_cross_attention=True,
            init_stds=stds,
        )
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CocaMLP(config.hidden_size, config.intermediate_size, config.hidden_act, stds)

    def forward(self, hidden_states, image_tokens=None, past_key_values=None, output_attentions=False):
        image_tokens = self.layer_norm_kv(image_tokens) if image_tokens is not None else None
        attended, weights = self.cross_attn(self.layer_norm1(hidden_states), key_value_states=image_tokens,
                                            past_key_values=past_key_values, output_attentions=output_attentions)
        hidden_states = hidden_states + attended
        return hidden_states + self.mlp(self.layer_norm2(hidden_states)), weights


class CocaDecoderLayer(nn.Module):
    def __init__(self, config: CocaMultimodalConfig, self_attn_layer_idx: int, cross_attn_layer_idx: int):
        super().__init__()
        self.self_attn_block = CocaTextLayer(config, self_attn_layer_idx)
        self.cross_attn_block = CocaCrossAttentionLayer(config, cross_attn_layer_idx)

    def forward(self, hidden_states, image_tokens=None, attention_mask=None, past_key_values=None,
                output_attentions=False):
        """Returns (hidden states, self-attention probabilities, cross-attention probabilities); the probabilities
        are None unless `output_attentions`."""
        hidden_states, self_weights = self.self_attn_block(
            hidden_states, attention_mask=attention_mask, past_key_values=past_key_values,
            output_attentions=output_attentions,
        )
        # image_tokens positionally: a checkpointed block (reentrant) only back-propagates through positional inputs
        hidden_states, cross_weights = self.cross_attn_block(
            hidden_states, image_tokens, past_key_values=past_key_values, output_attentions=output_attentions
        )
        return hidden_states, self_weights, cross_weights


# --------------------------------------------------------------------------------------------------------- towers
class CocaAttentionalPooler(nn.Module):
    """Learned queries cross-attend to the trunk's tokens (open_clip `AttentionalPooler`: ln_q on the
    queries, ln_k on the tokens, no residual)."""

    def __init__(self, config: CocaVisionConfig, hidden_size: int, context_size: int, num_queries: int):
        super().__init__()
        self.query = nn.Parameter(torch.empty(num_queries, hidden_size))
        self.layernorm_query = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.layernorm_context = nn.LayerNorm(context_size, eps=config.layer_norm_eps)
        self.attention = CocaAttention(config, hidden_size, config.pooler_num_attention_heads, kv_dim=context_size)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        queries = self.layernorm_query(self.query).unsqueeze(0).expand(context.shape[0], -1, -1)
        return self.attention(queries, key_value_states=self.layernorm_context(context))[0]


def timm_forward_features(trunk: nn.Module, pixel_values: torch.Tensor, attn_implementation: str,
                          output_attentions: bool = False, output_hidden_states: bool = False):
    """`trunk.forward_features(pixel_values)` of a timm ViT, with transformers' attention switch and outputs.

    timm's blocks attend with SDPA (`fused_attn`) or written out; "eager" (or `output_attentions`) selects the
    latter, whose probabilities pass through `attn.attn_drop`, where a hook records them. Hooks on the blocks record
    the hidden states: the blocks' input, then each block's output. Returns (tokens, hidden_states, attentions)."""
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


class CocaVisionModel(nn.Module):
    """timm trunk -> attentional pooler(s) -> post LayerNorm. Returns (pooled, image_tokens, trunk hidden states,
    trunk attentions): `pooled` `[batch, multimodal hidden]` is the un-projected contrastive embedding,
    `image_tokens` `[batch, n, multimodal hidden]` what the decoder cross-attends to."""

    _supports_sdpa = True  # read by transformers' composite-model checks, as on a PreTrainedModel tower

    def __init__(self, config: CocaVisionConfig, hidden_size: int):
        super().__init__()
        import timm  # heavy; only needed to build the trunk

        self.config = config
        self.trunk = timm.create_model(
            config.timm_model_name, pretrained=False, num_classes=0, global_pool="", img_size=config.image_size,
            **config.timm_model_args,
        )
        if config.pos_embed_type == "sin_cos_2d":
            self.trunk.pos_embed.requires_grad_(False)  # fixed coordinates (filled by `_init_weights`)
        width = self.trunk.num_features
        self.attn_pool = CocaAttentionalPooler(config, hidden_size, width, config.num_pooler_queries)
        self.contrastive_pool = (
            CocaAttentionalPooler(config, hidden_size, width, 1) if config.separate_contrastive_query else None
        )
        self.post_layernorm = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, output_attentions: bool = False, output_hidden_states: bool = False):
        trunk_tokens, hidden_states, attentions = timm_forward_features(
            self.trunk, pixel_values, self.config._attn_implementation, output_attentions, output_hidden_states
        )
        pooled_queries = self.post_layernorm(self.attn_pool(trunk_tokens))
        if self.contrastive_pool is None:
            return pooled_queries[:, 0], pooled_queries[:, 1:], hidden_states, attentions
        pooled = self.post_layernorm(self.contrastive_pool(trunk_tokens))[:, 0]
        return pooled, pooled_queries, hidden_states, attentions


def sin_cos_2d_position_embedding(width: int, grid_size: tuple[int, int], num_prefix_tokens: int = 1) -> torch.Tensor:
    """`(1, num_prefix_tokens + patches, width)`: MAE's fixed 2-D sine-cosine embedding of a square patch grid
    (open_clip's `get_2d_sincos_pos_embed`), zeros for the prefix (class) tokens. Half the channels encode the column,
    half the row, each as sin/cos at `width / 4` frequencies from 1 to 1/10000."""
    if grid_size[0] != grid_size[1] or width % 4:
        raise ValueError(f"pos_embed_type='sin_cos_2d' needs a square patch grid and a width divisible by 4, got grid "
                         f"{tuple(grid_size)} and width {width} (as open_clip)")
    grid = grid_size[0]
    frequencies = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width / 4))
    rows, columns = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                   indexing="ij")
    parts = []
    for coordinate in (columns, rows):  # open_clip/MAE order: the width (x) coordinate first
        angles = coordinate.reshape(-1, 1) * frequencies
        parts += [angles.sin(), angles.cos()]
    patches = torch.cat(parts, dim=1)
    return torch.cat([torch.zeros(num_prefix_tokens, width, dtype=torch.float64), patches]).float()[None]


def _additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool [B, Q, K] (True = may attend) -> additive float mask [B, 1, Q, K]."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)


def _causal_key_mask(key_valid: torch.Tensor, query_length: int,
                     cache_position: torch.Tensor | None = None) -> torch.Tensor:
    """bool [B, Q, K]: query i sees the valid keys j <= its own position. The queries' key positions are
    `cache_position` (a static cache holds more key slots than are filled), by default the last Q of K."""
    key_length = key_valid.shape[1]
    if cache_position is None:
        cache_position = torch.arange(key_length - query_length, key_length, device=key_valid.device)
    causal = torch.arange(key_length, device=key_valid.device)[None, :] <= cache_position[:, None]
    return causal[None] & key_valid[:, None, :]


class CocaTextModel(nn.Module):
    """Unimodal causal text encoder. With `append_cls`, a learned CLS embedding takes the last position
    (`max_position_embeddings - 1`, where open_clip's CLS sits after its 76-token texts), so the text
    embedding does not depend on how much padding a batch has; its final-LayerNormed state is the pooled
    output. Under `legacy_cls_mask` the text is first padded to 76 tokens as open_clip always did, because
    that mask lets the CLS see the first padding position."""

    def __init__(self, config: CocaTextConfig, legacy_cls_mask: bool, legacy_pad_token_id: int):
        super().__init__()
        self.config = config
        self.legacy_cls_mask = legacy_cls_mask
        self.legacy_pad_token_id = legacy_pad_token_id
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.cls_embedding = nn.Parameter(torch.empty(config.hidden_size))
        self.layers = nn.ModuleList([CocaTextLayer(config, i) for i in range(config.num_hidden_layers)])
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    _supports_sdpa = True  # read by transformers' composite-model checks, as on a PreTrainedModel tower

    def forward(self, inputs_embeds, key_valid, position_ids, past_key_values=None, append_cls=False,
                output_attentions=False, output_hidden_states=False, cache_position=None):
        """inputs_embeds: token embeddings [B, L, D]; key_valid: bool [B, keys] (False = padding; keys = past + L, or
        the length of a static cache, where the new tokens sit at `cache_position` [L]). Returns
        (token states [B, L, D] before the final LayerNorm, pooled CLS state or None, hidden states, attentions);
        the hidden states and attentions (CLS included) are None unless asked for."""
        batch, length = inputs_embeds.shape[:2]
        max_positions = self.config.max_position_embeddings
        if append_cls:
            if length >= max_positions:
                raise ValueError(
                    f"text of {length} tokens leaves no position for the CLS token "
                    f"(text_config.max_position_embeddings={max_positions})"
                )
            if self.legacy_cls_mask:
                # open_clip's layout: padding (embedded as its pad id 0) up to 76 tokens, then the CLS.
                pad = self.token_embedding.weight[self.legacy_pad_token_id].to(inputs_embeds.dtype)
                extra = max_positions - 1 - length
                inputs_embeds = torch.cat(
                    [torch.where(key_valid[..., None], inputs_embeds, pad), pad.expand(batch, extra, -1)], dim=1
                )
                key_valid = F.pad(key_valid, (0, extra), value=False)
                position_ids = torch.cat([position_ids, position_ids[:, -1:] + 1 + torch.arange(extra, device=position_ids.device)], dim=1)
            position_ids = F.pad(position_ids, (0, 1), value=max_positions - 1)
            cls_valid = key_valid.new_ones(batch, 1)
            # the released weights were trained with the padding mask shifted one key to the right
            key_valid = torch.cat([cls_valid, key_valid] if self.legacy_cls_mask else [key_valid, cls_valid], dim=1)
        elif not torch.compiler.is_compiling() and int(position_ids.max()) >= max_positions:
            # (a check on data: left out of compiled / exported graphs, where positions come from shapes anyway)
            raise ValueError(f"text longer than text_config.max_position_embeddings={max_positions}")
        hidden_states = inputs_embeds
        if append_cls:
            cls = self.cls_embedding.to(hidden_states.dtype).expand(batch, 1, -1)
            hidden_states = torch.cat([hidden_states, cls], dim=1)
        hidden_states = hidden_states + self.position_embedding(position_ids)
        mask = _additive_mask(_causal_key_mask(key_valid, hidden_states.shape[1], cache_position), hidden_states.dtype)
        all_hidden_states, attentions = [hidden_states], []
        for layer in self.layers:
            hidden_states, weights = layer(hidden_states, attention_mask=mask, past_key_values=past_key_values,
                                           output_attentions=output_attentions)
            all_hidden_states.append(hidden_states)
            attentions.append(weights)
        all_hidden_states = tuple(all_hidden_states) if output_hidden_states else None
        attentions = tuple(attentions) if output_attentions else None
        if not append_cls:
            return hidden_states, None, all_hidden_states, attentions
        return hidden_states[:, :length], self.final_layer_norm(hidden_states[:, -1]), all_hidden_states, attentions


class CocaMultimodalDecoder(nn.Module):
    """Continues the text encoder's token states: causal self-attention + cross-attention to image tokens.
    Its self-attention cache entries follow the text encoder's (layer ids offset by `cache_offset`)."""

    def __init__(self, config: CocaMultimodalConfig, cache_offset: int):
        super().__init__()
        self.layers = nn.ModuleList(
            [CocaDecoderLayer(config, cache_offset + i, i) for i in range(config.num_hidden_layers)]
        )
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states, image_tokens, key_valid, past_key_values=None, output_attentions=False,
                output_hidden_states=False, cache_position=None):
        """Returns (final-LayerNormed states, hidden states, self-attentions, cross-attentions); the last three are
        None unless asked for. `key_valid` / `cache_position` as in `CocaTextModel.forward`."""
        mask = _additive_mask(_causal_key_mask(key_valid, hidden_states.shape[1], cache_position), hidden_states.dtype)
        all_hidden_states, self_attentions, cross_attentions = [hidden_states], [], []
        for layer in self.layers:
            hidden_states, self_weights, cross_weights = layer(
                hidden_states, image_tokens, attention_mask=mask, past_key_values=past_key_values,
                output_attentions=output_attentions,
            )
            all_hidden_states.append(hidden_states)
            self_attentions.append(self_weights)
            cross_attentions.append(cross_weights)
        if not output_attentions:
            self_attentions = cross_attentions = None
        return (self.final_layer_norm(hidden_states), tuple(all_hidden_states) if output_hidden_states else None,
                self_attentions and tuple(self_attentions), cross_attentions and tuple(cross_attentions))


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


# ---------------------------------------------------------------------------------------------------------- cache
class CocaCache(EncoderDecoderCache):
    """The generation cache: self-attention K/V of both text stacks (text encoder layers first, then the decoder's)
    and the image K/V of each decoder layer. Dynamic (the default) or static (`cache_implementation="static"`).

    Beam search reorders only the self-attention K/V: every beam of an image holds the same image K/V, and beams
    never move between images, so copying the image K/V at every step (as `EncoderDecoderCache` does) would
    change nothing."""

    def reorder_cache(self, beam_idx: torch.LongTensor):
        self.self_attention_cache.reorder_cache(beam_idx)


# ----------------------------------------------------------------------------------------------- pretrained base
class CocaPreTrainedModel(PreTrainedModel):
    config_class = CocaConfig
    config: CocaConfig
    base_model_prefix = "coca"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    # the losses are per-batch means and ignore Trainer's `num_items_in_batch`: let Trainer scale them
    accepts_loss_kwargs = False
    # timm's ViT block is called `Block`; the pooler stays whole (its queries attend all trunk tokens).
    _no_split_modules = ["CocaTextLayer", "CocaCrossAttentionLayer", "CocaAttentionalPooler", "Block"]
    # No `_keep_in_fp32_modules`: 8-bit / 4-bit / int8 quantization may take the ViT trunk too, since timm's ViT
    # attention calls its `qkv` Linear (EVA's `F.linear(x, weight=...)`, which int8 weights reject, is BLIP-2's).

    @torch.no_grad()
    def _init_weights(self, module):
        """Every parameter is covered, the vocabulary projection included: open_clip's scheme for both text
        stacks (stds carried by each Linear, see `_linear`), timm's ViT scheme for the trunk, LayerNorms 1/0.
        transformers calls this once per module that owns parameters directly."""
        super()._init_weights(module)  # Linear/Conv: normal(initializer_range), LayerNorm: 1/0, Embedding
        if isinstance(module, nn.Linear) and getattr(module, "init_std", None) is not None:
            init.normal_(module.weight, std=module.init_std)
        elif isinstance(module, CocaTextModel):
            init.normal_(module.token_embedding.weight, std=0.02)
            init.normal_(module.position_embedding.weight, std=0.01)
            init.normal_(module.cls_embedding, std=0.01)
        elif isinstance(module, CocaAttentionalPooler):
            init.normal_(module.query, std=module.query.shape[-1] ** -0.5)
        elif hasattr(self, "vision_model") and module is self.vision_model.trunk:
            # The trunk's own parameters (class token, position embedding) as open_clip's ViT initializes them,
            # N(0, width**-0.5), not timm's 0.02: at small widths timm's leaves position a faint signal next to
            # the patch embedding (demo: a CoCa trained 1,200 steps named the side an object is on by chance).
            # Sizes from the module, not the tensors (which ZeRO-3 partitions).
            width = module.embed_dim
            for name, param in module.named_parameters(recurse=False):
                if name == "pos_embed" and self.config.vision_config.pos_embed_type == "sin_cos_2d":
                    init.copy_(param, sin_cos_2d_position_embedding(width, module.patch_embed.grid_size,
                                                                    module.num_prefix_tokens))
                else:
                    init.normal_(param, std=width**-0.5)
        elif isinstance(module, CocaModel):
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)

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
        vision = getattr(model, "vision_model", None)
        if vision is not None and model.config.vision_config.pos_embed_type == "sin_cos_2d":
            vision.trunk.pos_embed.requires_grad_(False)  # loading replaced the parameter, and its requires_grad
        return loaded

    def save_pretrained(self, save_directory, *args, **kwargs):
        # `register_for_auto_class` maps one Auto class; CoCa also serves these two pipelines' Auto classes.
        self.config.auto_map = {
            **(getattr(self.config, "auto_map", None) or {}),
            **{auto_class: "modeling_coca.CocaModel" for auto_class in _TASK_AUTO_CLASSES},
        }
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _set_gradient_checkpointing(self, enable: bool = True, *args, **kwargs):
        super()._set_gradient_checkpointing(enable, *args, **kwargs)
        if hasattr(self, "vision_model"):
            self.vision_model.trunk.set_grad_checkpointing(enable)


# ---------------------------------------------------------------------------------------------------------- model
class CocaModel(CocaPreTrainedModel, GenerationMixin):
    """CoCa: zero-shot classification / retrieval (contrastive embeddings) and captioning (`generate`)."""

    # The recommended caption decoding, open_clip's `CoCa.generate` defaults: beam search with 6 beams, 4 to 29 new
    # tokens (its 5 to 30 count the start token; its 3 beam groups need a Hub download in transformers 5, so plain
    # beams). `save_pretrained` writes it into generation_config.json; explicit `generate` arguments still win.
    recommended_generation = {"caption": {"num_beams": 6, "max_new_tokens": 29, "min_new_tokens": 4}}
    # with `cache_implementation="static"` the decoding step compiles as one graph (tests/test_coca_compile.py)
    _can_compile_fullgraph = True

    def __init__(self, config: CocaConfig):
        super().__init__(config)
        # transformers resolves `attn_implementation` on this config; the towers' attention reads their sub-configs
        for key in config.sub_configs:
            if getattr(config, key)._attn_implementation_internal is None:
                getattr(config, key)._attn_implementation_internal = config._attn_implementation
        text_config, multimodal_config = config.text_config, config.multimodal_config
        self.vision_model = CocaVisionModel(config.vision_config, multimodal_config.hidden_size)
        self.visual_projection = _linear(
            multimodal_config.hidden_size, config.projection_dim, multimodal_config.hidden_size**-0.5, bias=False
        )
        self.text_model = CocaTextModel(text_config, config.legacy_cls_mask, config.legacy_pad_token_id)
        self.text_projection = _linear(
            text_config.hidden_size, config.projection_dim, text_config.hidden_size**-0.5, bias=False
        )
        self.text_decoder = CocaMultimodalDecoder(multimodal_config, cache_offset=text_config.num_hidden_layers)
        self.lm_head = _linear(
            multimodal_config.hidden_size, text_config.vocab_size, multimodal_config.hidden_size**-0.5, bias=False
        )
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
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
        return self.text_model.token_embedding

    def set_input_embeddings(self, value):
        self.text_model.token_embedding = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    # ----------------------------------------------------------------------------------------- features
    def get_image_features(self, pixel_values: torch.Tensor, output_attentions: bool | None = None,
                           output_hidden_states: bool | None = None, return_dict: bool | None = None,
                           **kwargs) -> BaseModelOutputWithPooling | tuple:
        """`pooler_output`: projected (not normalized) image embedding; `last_hidden_state`: the image tokens the
        decoder cross-attends to (the attentional pooler's outputs, as wide as the decoder); `hidden_states` /
        `attentions`: the ViT trunk's."""
        output_attentions, output_hidden_states, return_dict = self._output_flags(
            self.config.vision_config, output_attentions, output_hidden_states, return_dict
        )
        pooled, image_tokens, hidden_states, attentions = self.vision_model(
            pixel_values.to(self.dtype), output_attentions, output_hidden_states
        )
        output = BaseModelOutputWithPooling(last_hidden_state=image_tokens, pooler_output=self.visual_projection(pooled),
                                            hidden_states=hidden_states, attentions=attentions)
        return output if return_dict else output.to_tuple()

    def get_text_features(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                          inputs_embeds: torch.Tensor | None = None, output_attentions: bool | None = None,
                          output_hidden_states: bool | None = None, return_dict: bool | None = None,
                          **kwargs) -> BaseModelOutputWithPooling | tuple:
        """`pooler_output`: projected (not normalized) text embedding from the CLS token; `last_hidden_state`:
        the token states (before the final LayerNorm) the decoder continues; `hidden_states` / `attentions`: the
        text encoder's (the appended CLS included)."""
        output_attentions, output_hidden_states, return_dict = self._output_flags(
            self.config.text_config, output_attentions, output_hidden_states, return_dict
        )
        inputs_embeds = self._text_embeddings(input_ids, inputs_embeds)
        key_valid, position_ids, _ = self._text_positions(inputs_embeds, attention_mask)
        token_states, pooled, hidden_states, attentions = self.text_model(
            inputs_embeds, key_valid, position_ids, append_cls=True, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        output = BaseModelOutputWithPooling(last_hidden_state=token_states, pooler_output=self.text_projection(pooled),
                                            hidden_states=hidden_states, attentions=attentions)
        return output if return_dict else output.to_tuple()

    def _output_flags(self, sub_config, output_attentions, output_hidden_states, return_dict):
        """Unset flags follow the config (the model's or the tower's sub-config, as transformers' towers do)."""
        if output_attentions is None:
            output_attentions = self.config.output_attentions or sub_config.output_attentions
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states or sub_config.output_hidden_states
        return output_attentions, output_hidden_states, self.config.return_dict if return_dict is None else return_dict

    def _text_embeddings(self, input_ids, inputs_embeds):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give the text as exactly one of input_ids or inputs_embeds")
        return self.text_model.token_embedding(input_ids) if inputs_embeds is None else inputs_embeds

    @staticmethod
    def _text_positions(inputs_embeds, attention_mask, past_length=0, key_length: int | None = None):
        """Key validity [B, keys], position ids [B, L] and the new tokens' key slots `cache_position` [L].

        A token's position counts the real tokens before it, so left padding (batched generation) and masked-out
        tokens inside a prompt do not shift the positions of the text; padding keeps its place in the row (right
        padding, the training layout: open_clip's 0..L-1). `past_length` is the cache's length (a tensor for a
        static cache, so a compiled decoding step holds no Python int that changes every step); `key_length` the
        number of key slots (past + L; a static cache's full length, the mask being padded to it: its empty slots
        lie after every query, where the causal mask hides them)."""
        batch, length = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        key_length = length if key_length is None else key_length
        if attention_mask is None:
            attention_mask = torch.ones(batch, key_length, dtype=torch.long, device=device)
        elif attention_mask.shape != (batch, key_length):
            # (a check on data for a static cache: left out of compiled graphs, which only see padded masks)
            expected = None if torch.compiler.is_compiling() else (batch, int(past_length) + length)
            if expected is not None and attention_mask.shape != expected:
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, expected {expected} "
                    f"(batch, cached + new tokens)"
                )
            attention_mask = F.pad(attention_mask, (0, key_length - attention_mask.shape[1]))
        key_valid = attention_mask.bool()
        real_before = attention_mask.long().cumsum(-1) - 1
        left_padding = (real_before == -1).sum(-1, keepdim=True)
        in_row = torch.arange(key_length, device=device)[None] - left_padding
        positions = torch.where(key_valid, real_before, in_row).clamp(min=0)
        cache_position = torch.arange(length, device=device) + past_length
        return key_valid, positions[:, cache_position], cache_position

    # ------------------------------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        return_loss: bool | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CocaOutput | tuple:
        r"""
        input_ids: `[batch, seq]` starting with the start-of-text token (right padding; left padding only for
            generation prompts). attention_mask: 1 for tokens, 0 for padding.
        labels: caption targets in the input layout (shifted here: position t predicts labels[t+1]); -100 is
            ignored. Defaults to `input_ids` with padding ignored when a loss is asked for.
        return_loss: compute `loss` (also implied by `labels`).
        past_key_values / use_cache: generation cache. With a cache only caption `logits` are computed (the
            CLS token, appended after the text, has no place in incremental decoding).
        inputs_embeds: the text as token embeddings instead of `input_ids` (a loss then needs `labels`).
        output_attentions / output_hidden_states: the towers' (in `text_model_output` / `vision_model_output`) and
            the multimodal decoder's.
        """
        unknown = set(kwargs) - {"num_items_in_batch", "cache_position", "position_ids"}
        if unknown:
            raise TypeError(f"CocaModel.forward got unexpected keyword arguments {sorted(unknown)}")
        output_attentions, output_hidden_states, return_dict = self._output_flags(
            self.config.multimodal_config, output_attentions, output_hidden_states, return_dict
        )
        want_loss = bool(return_loss) or labels is not None
        has_text = input_ids is not None or inputs_embeds is not None
        if not has_text and pixel_values is None:
            raise ValueError("CocaModel.forward needs input_ids (or inputs_embeds), pixel_values or both")
        if use_cache and past_key_values is None:
            past_key_values = CocaCache(DynamicCache(), DynamicCache())
        if past_key_values is not None and not isinstance(past_key_values, EncoderDecoderCache):
            raise ValueError(
                f"past_key_values must be an EncoderDecoderCache (self-attention of both text stacks + image K/V), "
                f"got {type(past_key_values).__name__}"
            )
        incremental = past_key_values is not None
        cross_cached = incremental and past_key_values.is_updated.get(0, False)

        image_embeds = image_tokens = vision_output = None
        if pixel_values is not None and not cross_cached:  # (the decoder reads cached image K/V from then on)
            vision_output = self.get_image_features(pixel_values, output_attentions, output_hidden_states, True)
            image_embeds, image_tokens = vision_output.pooler_output, vision_output.last_hidden_state

        text_embeds = logits = text_output = None
        decoder_hidden_states = decoder_attentions = cross_attentions = None
        if has_text:
            inputs_embeds = self._text_embeddings(input_ids, inputs_embeds)
            past_length, key_length = 0, None
            if incremental:  # a dynamic cache's length is an int; a static one's a tensor, its key slots fixed
                past_length = past_key_values.get_seq_length()
                key_length = past_key_values.get_mask_sizes(inputs_embeds.shape[1], 0)[0]
            key_valid, position_ids, cache_position = self._text_positions(
                inputs_embeds, attention_mask, past_length, key_length
            )
            if not incremental:
                cache_position = None  # (the CLS token is appended: the queries are all the keys)
            token_states, pooled, hidden_states, attentions = self.text_model(
                inputs_embeds, key_valid, position_ids, past_key_values=past_key_values, append_cls=not incremental,
                output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                cache_position=cache_position,
            )
            if pooled is not None:
                text_embeds = self.text_projection(pooled)
            text_output = BaseModelOutputWithPooling(last_hidden_state=token_states, pooler_output=text_embeds,
                                                     hidden_states=hidden_states, attentions=attentions)
            pairs_up = image_tokens is not None and image_tokens.shape[0] == inputs_embeds.shape[0]
            if pairs_up or cross_cached:
                decoded, decoder_hidden_states, decoder_attentions, cross_attentions = self.text_decoder(
                    token_states, image_tokens if pairs_up else None, key_valid, past_key_values=past_key_values,
                    output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                    cache_position=cache_position,
                )
                logits = self.lm_head(decoded)

        if image_embeds is not None:
            image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
        if text_embeds is not None:
            text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
        logits_per_image = logits_per_text = None
        if image_embeds is not None and text_embeds is not None:
            logits_per_image = self.logit_scale.exp() * image_embeds @ text_embeds.t()
            logits_per_text = logits_per_image.t()

        loss = contrastive_loss = caption_loss = None
        if want_loss:
            if logits is None or text_embeds is None:
                raise ValueError(
                    "a CoCa loss needs pixel_values and input_ids of the same batch size, without a cache "
                    f"(got a text batch of {None if not has_text else tuple(inputs_embeds.shape[:2])}, pixel_values "
                    f"{None if pixel_values is None else tuple(pixel_values.shape)})"
                )
            contrastive_loss = _contrastive_loss(image_embeds, text_embeds, self.logit_scale.exp())
            if labels is None:
                if input_ids is None:
                    raise ValueError("a caption loss from inputs_embeds needs labels (the token ids they embed)")
                labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, -100)
            elif labels.shape != inputs_embeds.shape[:2]:
                raise ValueError(
                    f"labels have shape {tuple(labels.shape)}, expected the text layout {tuple(inputs_embeds.shape[:2])}"
                )
            caption_loss = _caption_loss(logits, labels)
            loss = (self.config.contrastive_loss_weight * contrastive_loss
                    + self.config.caption_loss_weight * caption_loss)

        output = CocaOutput(
            loss=loss, contrastive_loss=contrastive_loss, caption_loss=caption_loss,
            logits_per_image=logits_per_image, logits_per_text=logits_per_text,
            image_embeds=image_embeds, text_embeds=text_embeds, logits=logits,
            past_key_values=past_key_values if use_cache else None,
            text_model_output=text_output, vision_model_output=vision_output,
            hidden_states=decoder_hidden_states, attentions=decoder_attentions, cross_attentions=cross_attentions,
        )
        return output if return_dict else output.to_tuple()

    # --------------------------------------------------------------------------------------- generation
    def generate(self, input_ids=None, attention_mask=None, pixel_values=None, **kwargs):
        """Caption `pixel_values` (transformers' `generate`: greedy, beams, sampling; KV cache by default).

        `input_ids` is an optional prompt; the output is `[input_ids, new tokens]` (the prompt exactly as given,
        padding included, as every decoder-only model returns it). Batched prompts may be left-padded, or encoded
        like captions (`<start> text <end>`, right-padded, as the processor gives them): the model then continues
        each row's text, without its end token. Without a prompt, captions start from the start-of-text token.
        """
        if input_ids is None:
            return super().generate(attention_mask=attention_mask, pixel_values=pixel_values, **kwargs)
        prompt, prompt_mask = self._prompt_layout(input_ids, attention_mask)
        output = super().generate(input_ids=prompt, attention_mask=prompt_mask, pixel_values=pixel_values, **kwargs)
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        copies = sequences.shape[0] // input_ids.shape[0]  # num_return_sequences
        sequences = torch.cat([input_ids.repeat_interleave(copies, dim=0), sequences[:, prompt.shape[1]:]], dim=1)
        if isinstance(output, torch.Tensor):
            return sequences
        output.sequences = sequences
        return output

    def _prompt_layout(self, input_ids, attention_mask):
        """The prompt the model continues: each row's real tokens without a trailing end-of-text token, left-padded
        (a left-padded prompt without end tokens is unchanged)."""
        eos_id, pad_id = self.config.text_config.eos_token_id, self.config.text_config.pad_token_id
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        rows = []
        for ids, keep in zip(input_ids, mask):
            ids = ids[keep]
            rows.append(ids[:-1] if len(ids) > 1 and ids[-1] == eos_id else ids)
        length = max(len(ids) for ids in rows)
        prompt = input_ids.new_full((len(rows), length), pad_id if pad_id is not None else 0)
        prompt_mask = torch.zeros_like(prompt)
        for i, ids in enumerate(rows):
            prompt[i, length - len(ids):] = ids
            prompt_mask[i, length - len(ids):] = 1
        return prompt, prompt_mask

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length):
        # The text passes two stacks and cross-attends to image tokens: a cache sized from one sub-config would not
        # fit, so the caches are built here: self-attention layers for the text encoder then the decoder, and one
        # image K/V layer per decoder layer.
        if model_kwargs.get("past_key_values") is not None or generation_config.use_cache is False:
            return super()._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode,
                                                         batch_size, max_cache_length)
        implementation = generation_config.cache_implementation
        if implementation in (None, "dynamic"):  # (layers are created lazily)
            model_kwargs["past_key_values"] = CocaCache(DynamicCache(), DynamicCache())
        elif implementation == "static":  # fixed shapes: one compiled graph serves every decoding step
            if generation_config.max_cache_len is not None:
                max_cache_length = max(max_cache_length, generation_config.max_cache_len)
            num_self_layers = self.config.text_config.num_hidden_layers + self.config.multimodal_config.num_hidden_layers
            vision_config = self.config.vision_config
            num_image_tokens = vision_config.num_pooler_queries - (0 if vision_config.separate_contrastive_query else 1)
            model_kwargs["past_key_values"] = CocaCache(
                Cache(layers=[StaticLayer(max_cache_length) for _ in range(num_self_layers)]),
                Cache(layers=[StaticLayer(num_image_tokens)
                              for _ in range(self.config.multimodal_config.num_hidden_layers)]),
            )
        else:
            raise ValueError(
                f"CocaModel supports cache_implementation 'dynamic' (the default) or 'static', not {implementation!r}"
            )

    def create_masks_for_generate(self, config, inputs_embeds, attention_mask, past_key_values, **kwargs):
        """`generate` asks for the masks of a compileable (static) cache here. The forward reads the 2D padding mask
        itself; it is only padded to the cache's key slots, so that every decoding step has the same shapes."""
        if attention_mask is None:
            return None
        key_length = past_key_values.get_mask_sizes(inputs_embeds.shape[1], 0)[0]
        return F.pad(attention_mask, (0, key_length - attention_mask.shape[1]))


def _gather_with_grad(features: torch.Tensor) -> torch.Tensor:
    """All ranks' features, concatenated in rank order; gradients flow back to each rank's own slice, so
    a world of W ranks x B samples gives the loss and (DDP-averaged) gradients of one rank with W x B."""
    import torch.distributed as dist

    if _world_size() == 1:
        return features
    try:  # torch >= 2.15: the differentiable functional collective (torch.distributed.nn's is deprecated)
        from torch.distributed._functional_collectives import all_gather_single
    except ImportError:
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(features), dim=0)
    return all_gather_single(features.contiguous(), 0, dist.group.WORLD)


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _caption_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy per caption token of the global batch (padding, -100, ignored).

    Across W data-parallel ranks, each rank divides its token-loss sum by the mean token count per rank (one
    all-reduce of a scalar): gradients averaged over ranks, and the logged mean over ranks, are then those of one
    process holding the whole global batch, however long the captions on each rank are (a per-rank mean would
    weigh a token of a rank with short captions more). One process: the usual mean over tokens."""
    targets = labels[:, 1:].reshape(-1)
    loss_sum = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets, ignore_index=-100,
                               reduction="sum")
    tokens = (targets != -100).sum()
    world = _world_size()
    if world == 1:
        return loss_sum / tokens
    import torch.distributed as dist
    from torch.distributed._functional_collectives import all_reduce

    return loss_sum * world / all_reduce(tokens, "sum", dist.group.WORLD)


def _contrastive_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor):
    """Symmetric InfoNCE over the global batch (open_clip `ClipLoss`, gather_with_grad, no local loss)."""
    all_images, all_texts = _gather_with_grad(image_embeds), _gather_with_grad(text_embeds)
    logits_per_image = logit_scale * all_images @ all_texts.t()
    targets = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image.float(), targets) + F.cross_entropy(logits_per_image.t().float(), targets)) / 2


_TASK_AUTO_CLASSES = ("AutoModelForZeroShotImageClassification", "AutoModelForImageTextToText")

# save_pretrained copies the modeling files and writes `auto_map`: saved models load without hf_vlm.
CocaModel.register_for_auto_class("AutoModel")

__all__ = ["CocaModel", "CocaOutput", "CocaPreTrainedModel"]
