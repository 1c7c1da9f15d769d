"""`open-clip-coca`: convert an open_clip CoCa checkpoint into a `CocaModel` folder (hf_vlm.modeling.coca).

SOURCE is a state-dict file (.safetensors, .bin, .pt, .pth; open_clip training checkpoints with
`state_dict` and a DDP `module.` prefix included) or a Hub-style folder (`open_clip_config.json` +
weights). The architecture comes from `open_clip_config.json` next to the weights, or from
`--model-config`: an open_clip model name (e.g. coca_ViT-L-14; needs open_clip_torch) or a JSON file in
open_clip's format. The output has open_clip's quirks switched on (`legacy_cls_mask`, query 0 of the
pooler as the contrastive embedding), and a `CocaProcessor` with open_clip's preprocessing and the CLIP
BPE tokenizer (`--tokenizer`, else tokenizer files next to the weights, else the BPE file that
open_clip_torch ships).

Run as `hf-vlm convert open-clip-coca SOURCE OUTPUT` or `python -m hf_vlm.conversion.open_clip_coca`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from hf_vlm.conversion.errors import ConversionError

OPEN_CLIP_CONFIG_NAME = "open_clip_config.json"
INSTALL_OPEN_CLIP = "pip install open_clip_torch"

# open_clip CLIP ViTs that timm names; any other width/depth/patch gets the generic ViT-B/16 entry plus
# explicit sizes. (width, layers, patch_size, head_width, mlp_ratio) -> timm architecture.
TIMM_CLIP_VITS = {
    (768, 12, 32, 64, 4.0): "vit_base_patch32_clip_224",
    (768, 12, 16, 64, 4.0): "vit_base_patch16_clip_224",
    (1024, 24, 14, 64, 4.0): "vit_large_patch14_clip_224",
    (1280, 32, 14, 80, 4.0): "vit_huge_patch14_clip_224",
}
GENERIC_TIMM_VIT = "vit_base_patch16_clip_224"

# open_clip options our CoCa does not implement, with the value that means "off". A config that turns
# one on is refused (naming the option) rather than converted into a model that computes something else.
UNSUPPORTED = {
    "vision_cfg": {"ls_init_value": None, "no_ln_pre": False, "timm_model_name": None,
                   "final_ln_after_pool": False, "block_type": None, "qk_norm": False, "scaled_cosine_attn": False,
                   "scale_heads": False, "scale_attn_inner": False, "scale_attn": False, "scale_fc": False,
                   "act_kwargs": None, "norm_kwargs": None},
    "text_cfg": {"hf_model_name": None, "ls_init_value": None, "no_causal_mask": False, "proj_type": "linear",
                 "proj_bias": False, "final_ln_after_pool": False, "block_type": None, "qk_norm": False,
                 "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False, "scale_attn": False,
                 "scale_fc": False, "act_kwargs": None, "norm_kwargs": None},
    "multimodal_cfg": {"ls_init_value": None},
    "model": {"init_logit_bias": None, "nonscalar_logit_scale": False},
}


# --------------------------------------------------------------------------------------------------
# architecture: open_clip model config -> CocaConfig


def load_open_clip_config(source: Path, model_config: str | None) -> tuple[dict, dict]:
    """(model_cfg, preprocess_cfg) from --model-config, or from open_clip_config.json next to the weights."""
    if model_config is None:
        folder = source if source.is_dir() else source.parent
        path = folder / OPEN_CLIP_CONFIG_NAME
        if not path.is_file():
            raise ConversionError(
                f"no {OPEN_CLIP_CONFIG_NAME} in {folder}: pass --model-config (an open_clip model name such as "
                "coca_ViT-L-14, or a JSON file in open_clip's format)"
            )
        return _read_config_file(path)
    if Path(model_config).is_file():
        return _read_config_file(Path(model_config))
    if model_config.endswith(".json"):
        raise ConversionError(f"--model-config file not found: {model_config}")
    try:
        import open_clip
    except ImportError as err:
        raise ConversionError(
            f"--model-config {model_config!r} is an open_clip model name, which needs open_clip_torch "
            f"({INSTALL_OPEN_CLIP}); or pass the model's JSON file instead"
        ) from err
    cfg = open_clip.get_model_config(model_config)
    if cfg is None:
        known = [name for name in open_clip.list_models() if "coca" in name.lower()]
        raise ConversionError(f"open_clip has no model config {model_config!r}; CoCa configs: {known}")
    return cfg, {}


def _read_config_file(path: Path) -> tuple[dict, dict]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path} is not valid JSON: {err}") from err
    if "model_cfg" in data:  # open_clip_config.json of a Hub repo
        return data["model_cfg"], data.get("preprocess_cfg", {})
    return data, {}


def _check_supported(model_cfg: dict) -> None:
    from hf_vlm.modeling.coca.configuration_coca import POS_EMBED_TYPES

    problems = []
    for section, options in UNSUPPORTED.items():
        cfg = model_cfg if section == "model" else model_cfg.get(section, {})
        for option, off in options.items():
            value = cfg.get(option, off)
            if value != off:
                where = option if section == "model" else f"{section}.{option}"
                problems.append(f"{where}={value!r} (supported: {off!r})")
    vision = model_cfg.get("vision_cfg", {})
    if vision.get("pos_embed_type", "learnable") not in POS_EMBED_TYPES:
        problems.append(f"vision_cfg.pos_embed_type={vision['pos_embed_type']!r} (supported: {POS_EMBED_TYPES})")
    if model_cfg.get("text_cfg", {}).get("embed_cls") is not True:
        problems.append("text_cfg.embed_cls is not true (CoCa's text embedding is its CLS token)")
    if vision.get("attentional_pool") is not True:
        problems.append(f"vision_cfg.attentional_pool={vision.get('attentional_pool')!r} (CoCa's pooler: true)")
    if not isinstance(vision.get("layers", 12), int):
        problems.append("vision_cfg.layers is not an int (a ResNet tower)")
    if "multimodal_cfg" not in model_cfg:
        problems.append("no multimodal_cfg: this is a CLIP config, not CoCa")
    if problems:
        raise ConversionError("this open_clip config uses features CocaModel does not have: " + "; ".join(problems))


def coca_config_from_open_clip(model_cfg: dict, *, pad_token_id: int, bos_token_id: int, eos_token_id: int):
    """The CocaConfig computing what open_clip's `CoCa(**model_cfg)` computes."""
    from hf_vlm.modeling.coca import CocaConfig

    _check_supported(model_cfg)
    vision, text, multimodal = model_cfg["vision_cfg"], model_cfg["text_cfg"], model_cfg["multimodal_cfg"]
    # open_clip dataclass defaults for fields a config may leave out
    image_size = vision.get("image_size", 224)
    if isinstance(image_size, (list, tuple)):
        if len(set(image_size)) != 1:
            raise ConversionError(f"vision_cfg.image_size={image_size}: only square images are supported")
        image_size = image_size[0]
    width, layers = vision.get("width", 768), vision.get("layers", 12)
    patch, head_width, mlp_ratio = vision.get("patch_size", 16), vision.get("head_width", 64), float(vision.get("mlp_ratio", 4.0))
    timm_name = TIMM_CLIP_VITS.get((width, layers, patch, head_width, mlp_ratio))
    timm_args = {"final_norm": False}  # open_clip's CoCa trunk ends without a norm (ln_post follows the pooler)
    if timm_name is None:
        timm_name = GENERIC_TIMM_VIT
        timm_args.update(patch_size=patch, embed_dim=width, depth=layers, num_heads=width // head_width,
                         mlp_ratio=mlp_ratio)
    quick_gelu = bool(model_cfg.get("quick_gelu", False))
    if quick_gelu:
        timm_args["act_layer"] = "quick_gelu"
    act = "quick_gelu" if quick_gelu else "gelu"

    text_width = text.get("width", 512)
    context_length = text.get("context_length", 77)
    vocab_size = text.get("vocab_size", 49408)
    if multimodal.get("vocab_size", vocab_size) != vocab_size:
        raise ConversionError(
            f"multimodal_cfg.vocab_size={multimodal['vocab_size']} differs from text_cfg.vocab_size={vocab_size}"
        )
    kwargs = {}
    if "init_logit_scale" in model_cfg:
        kwargs["logit_scale_init_value"] = float(model_cfg["init_logit_scale"])
    return CocaConfig(
        vision_config={
            "timm_model_name": timm_name, "timm_model_args": timm_args, "image_size": image_size,
            "num_pooler_queries": vision.get("attn_pooler_queries", 256),
            "pooler_num_attention_heads": vision.get("attn_pooler_heads", 8),
            "separate_contrastive_query": False,  # open_clip: query 0 is the contrastive embedding
            "pos_embed_type": vision.get("pos_embed_type", "learnable"),  # sin_cos_2d: the checkpoint holds its values
        },
        text_config={
            "vocab_size": vocab_size, "hidden_size": text_width,
            "intermediate_size": int(text_width * text.get("mlp_ratio", 4.0)),
            "num_hidden_layers": text.get("layers", 12), "num_attention_heads": text.get("heads", 8),
            "max_position_embeddings": context_length + 1,  # + the CLS position
            "hidden_act": act, "pad_token_id": pad_token_id, "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
        },
        multimodal_config={
            "hidden_size": multimodal.get("width", 512),
            "intermediate_size": int(multimodal.get("width", 512) * multimodal.get("mlp_ratio", 4)),
            "num_hidden_layers": multimodal.get("layers", 12), "num_attention_heads": multimodal.get("heads", 8),
            "hidden_act": act,
        },
        projection_dim=model_cfg["embed_dim"],
        contrastive_loss_weight=1.0,
        caption_loss_weight=2.0,  # open_clip's training default (--coca-caption-loss-weight)
        legacy_cls_mask=True,  # open_clip 3.x cannot switch its shifted CLS mask off from a config
        legacy_pad_token_id=text.get("pad_id", 0),
        **kwargs,
    )


# --------------------------------------------------------------------------------------------------
# weights: the key mapping


def _split3(fused):
    """nn.MultiheadAttention's packed in_proj (q; k; v along dim 0) -> our separate projections."""
    return fused.chunk(3, dim=0)


def _transpose(matrix):
    """open_clip multiplies `x @ proj`; a Linear stores the transpose."""
    return matrix.t()


RENAMES = [  # open_clip key -> CocaModel key, transform (None: same tensor)
    # image trunk: timm's ViT layout, the renames of timm's `_convert_openai_clip`
    (r"visual\.class_embedding", "vision_model.trunk.cls_token", lambda t: t.reshape(1, 1, -1)),
    (r"visual\.positional_embedding", "vision_model.trunk.pos_embed", lambda t: t.unsqueeze(0)),
    (r"visual\.conv1\.weight", "vision_model.trunk.patch_embed.proj.weight", None),
    (r"visual\.ln_pre\.(weight|bias)", r"vision_model.trunk.norm_pre.\1", None),
    # attentional pooler, its LayerNorm, the projection
    (r"visual\.attn_pool\.query", "vision_model.attn_pool.query", None),
    (r"visual\.attn_pool\.ln_q\.(weight|bias)", r"vision_model.attn_pool.layernorm_query.\1", None),
    (r"visual\.attn_pool\.ln_k\.(weight|bias)", r"vision_model.attn_pool.layernorm_context.\1", None),
    (r"visual\.ln_post\.(weight|bias)", r"vision_model.post_layernorm.\1", None),
    (r"visual\.proj", "visual_projection.weight", _transpose),
    # text encoder
    (r"text\.token_embedding\.weight", "text_model.token_embedding.weight", None),
    (r"text\.positional_embedding", "text_model.position_embedding.weight", None),
    (r"text\.cls_emb", "text_model.cls_embedding", None),
    (r"text\.ln_final\.(weight|bias)", r"text_model.final_layer_norm.\1", None),
    (r"text\.text_projection", "text_projection.weight", _transpose),
    # multimodal decoder
    (r"text_decoder\.ln_final\.(weight|bias)", r"text_decoder.final_layer_norm.\1", None),
    (r"text_decoder\.text_projection", "lm_head.weight", _transpose),
    (r"logit_scale", "logit_scale", None),
]

# open_clip residual blocks -> ours: (block prefix, our prefix, our attention module, part names)
_OUR_PARTS = {"ln_1": "layer_norm1", "ln_1_kv": "layer_norm_kv", "ln_2": "layer_norm2",
              "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_TIMM_PARTS = {"ln_1": "norm1", "ln_2": "norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
BLOCKS = [
    (r"visual\.transformer\.resblocks\.(\d+)", r"vision_model.trunk.blocks.\1", None, _TIMM_PARTS),
    (r"text\.transformer\.resblocks\.(\d+)", r"text_model.layers.\1", "self_attn", _OUR_PARTS),
    (r"text_decoder\.resblocks\.(\d+)", r"text_decoder.layers.\1.self_attn_block", "self_attn", _OUR_PARTS),
    (r"text_decoder\.cross_attn\.(\d+)", r"text_decoder.layers.\1.cross_attn_block", "cross_attn", _OUR_PARTS),
    # the pooler's nn.MultiheadAttention (its own "block" with only the attention part)
    (r"visual\.attn_pool", r"vision_model.attn_pool", "attention", {}),
]

DROPS = []  # every open_clip CoCa tensor has a place (causal masks are non-persistent buffers, never saved)


def coca_rules(source_keys, prefix: str = ""):
    """Rules for every open_clip key `prefix + name` this layout knows; others are left to key accounting."""
    from hf_vlm.conversion.core import Rule

    rules = []
    for key in source_keys:
        name = key[len(prefix):]
        rule = _rule_for(key, name, Rule)
        if rule is not None:
            rules.append(rule)
    return rules


def _rule_for(key, name, Rule):
    for pattern, target, transform in RENAMES:
        match = re.fullmatch(pattern, name)
        if match:
            return Rule((key,), (match.expand(target),), transform)
    for block, ours, attention, parts in BLOCKS:
        match = re.fullmatch(block + r"\.(.+)", name)
        if not match:
            continue
        dest, part = match.expand(ours), match.group(match.re.groups)
        for theirs, mine in parts.items():
            piece = re.fullmatch(re.escape(theirs) + r"\.(weight|bias)", part)
            if piece:
                return Rule((key,), (f"{dest}.{mine}.{piece.group(1)}",))
        if attention is None:  # timm keeps the packed qkv
            piece = re.fullmatch(r"attn\.(?:in_proj_(weight|bias)|out_proj\.(weight|bias))", part)
            if piece:
                kind = "qkv" if piece.group(1) else "proj"
                return Rule((key,), (f"{dest}.attn.{kind}.{piece.group(1) or piece.group(2)}",))
            continue
        piece = re.fullmatch(r"attn\.in_proj_(weight|bias)", part)
        if piece:  # packed q/k/v -> three Linears
            return Rule((key,), tuple(f"{dest}.{attention}.{p}_proj.{piece.group(1)}" for p in "qkv"), _split3)
        piece = re.fullmatch(r"attn\.([qkv])_proj_weight", part)  # MultiheadAttention with kdim != embed_dim
        if piece:
            return Rule((key,), (f"{dest}.{attention}.{piece.group(1)}_proj.weight",))
        piece = re.fullmatch(r"attn\.out_proj\.(weight|bias)", part)
        if piece:
            return Rule((key,), (f"{dest}.{attention}.out_proj.{piece.group(1)}",))
    return None


def _strip_ddp_prefix(keys) -> str:
    """open_clip's training checkpoints keep DDP's `module.` prefix on every key (its loader strips it)."""
    keys = list(keys)
    return "module." if keys and all(k.startswith("module.") for k in keys) else ""


# --------------------------------------------------------------------------------------------------
# tokenizer and processor


def load_tokenizer(source: Path, tokenizer: str | None, context_length: int):
    """--tokenizer (a tokenizer folder or open_clip's BPE .txt.gz), else tokenizer files next to the
    weights, else the CLIP BPE that open_clip_torch ships."""
    from transformers import AutoTokenizer

    from hf_vlm.tokenization import clip_tokenizer_from_open_clip

    if tokenizer is not None:
        path = Path(tokenizer)
        if path.is_dir():
            return AutoTokenizer.from_pretrained(path, model_max_length=context_length)
        if path.is_file():
            return clip_tokenizer_from_open_clip(path, model_max_length=context_length)
        raise ConversionError(f"--tokenizer not found: {tokenizer}")
    folder = source if source.is_dir() else source.parent
    if any((folder / name).is_file() for name in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        return AutoTokenizer.from_pretrained(folder, model_max_length=context_length)
    try:
        return clip_tokenizer_from_open_clip(model_max_length=context_length)
    except ImportError as err:
        raise ConversionError(
            "no tokenizer next to the checkpoint and open_clip_torch is not installed: pass --tokenizer "
            f"(a tokenizer folder, or open_clip's bpe_simple_vocab_16e6.txt.gz), or {INSTALL_OPEN_CLIP}"
        ) from err


def build_processor(tokenizer, image_size: int, preprocess_cfg: dict):
    from hf_vlm.modeling.coca import CocaProcessor

    processor = CocaProcessor.from_tokenizer(tokenizer, image_size=image_size)
    if "mean" in preprocess_cfg:
        processor.image_processor.image_mean = list(preprocess_cfg["mean"])
    if "std" in preprocess_cfg:
        processor.image_processor.image_std = list(preprocess_cfg["std"])
    return processor


# --------------------------------------------------------------------------------------------------
# entry points


def convert(source, output, *, model_config: str | None = None, tokenizer: str | None = None,
            dtype: str = "float32", max_shard_size: str = "2GB", overwrite: bool = False, progress: bool = True):
    """Convert an open_clip CoCa checkpoint; returns the ConversionSummary."""
    from hf_vlm.conversion.core import build_meta_model, convert_checkpoint
    from hf_vlm.conversion.reader import open_checkpoint
    from hf_vlm.conversion.writer import check_output
    from hf_vlm.modeling.coca import CocaModel

    source = Path(source)
    check_output(output, overwrite)
    reader = open_checkpoint(source)  # first: a missing or unreadable SOURCE is the error to report
    model_cfg, preprocess_cfg = load_open_clip_config(source, model_config)
    context_length = model_cfg.get("text_cfg", {}).get("context_length", 77)
    tok = load_tokenizer(source, tokenizer, context_length)
    config = coca_config_from_open_clip(
        model_cfg, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id
    )
    if len(tok) > config.text_config.vocab_size:
        raise ConversionError(f"the tokenizer has {len(tok)} tokens, the model's vocabulary {config.text_config.vocab_size}")
    rules = coca_rules(reader.keys(), _strip_ddp_prefix(reader.keys()))
    model = build_meta_model(CocaModel, config)
    processor = build_processor(tok, config.vision_config.image_size, preprocess_cfg)
    return convert_checkpoint(reader, rules, DROPS, model, output, dtype=dtype, max_shard_size=max_shard_size,
                              overwrite=overwrite, processor=processor, progress=progress)


def add_arguments(parser) -> None:
    parser.add_argument("--model-config", help="open_clip model name (e.g. coca_ViT-L-14) or JSON file in "
                        f"open_clip's format (default: {OPEN_CLIP_CONFIG_NAME} next to the weights)")
    parser.add_argument("--tokenizer", help="tokenizer folder, or open_clip's bpe_simple_vocab_16e6.txt.gz "
                        "(default: tokenizer files next to the weights, else open_clip_torch's BPE)")


def convert_from_args(args):
    return convert(args.source, args.output, model_config=args.model_config, tokenizer=args.tokenizer,
                   dtype=args.dtype, max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                   progress=args.progress)


if __name__ == "__main__":
    import sys

    from hf_vlm.conversion import main

    sys.exit(main("open-clip-coca"))
