"""The models' side of bulk inference: what `hf-vlm caption` and `hf-vlm embed` compute and write per shard.

- `CaptionTask`: a CoCa or BLIP-2 (stage 2) checkpoint's `generate` on batches of images (KV cache on: the models'
  own default), decoded as the checkpoint says unless overridden (`hf_vlm.evaluation.decoding`, as hf-vlm eval:
  generation_config.json; BLIP-2's captions caption_generation_config.json), optionally after a fixed `prompt` (BLIP-2
  answers "Question: what is shown? Short answer:" decoded as it decodes VQA; CoCa continues it). With `rerank_with` (a
  CoCa checkpoint) and `num_candidates` K, K beam (or, with do_sample, sampled) candidates per image are scored by
  CoCa's image-text cosine similarity and the best one kept, with its score, as LAION-COCO was made. Output:
  `captions/<part>.parquet`.
- `EmbedTask`: L2-normalised contrastive embeddings of a CoCa checkpoint (image: `[n, dim]`) or a BLIP-2 stage-1
  checkpoint (its ITC features; image: `[n, num_query_tokens, dim]`, one per query token, since BLIP-2 scores a text
  against its best-matching query), and of the samples' captions (`[n, dim]`), as float16 or float32, in the layout
  clip-retrieval writes and autofaiss / clip-retrieval's index builders read: `img_emb/img_emb_<part>.npy`,
  `text_emb/text_emb_<part>.npy`, `metadata/metadata_<part>.parquet`, row i of each the same sample.
Every output row carries where it came from: `key` (the webdataset key, the imagefolder file name, else the row
number in its shard), `shard` (the input shard), `index` (its row number there), `image_path`, `url` (a `url` field of
the sample, as img2dataset writes it) and the sample's own caption (`caption` in embed metadata, `source_caption` next
to the generated `caption`).
"""

from __future__ import annotations

import functools

from hf_vlm.evaluation.decoding import decoding_summary, generation_config_for

from .run import run_bulk

OUTPUT_DTYPES = ("float16", "float32")
DTYPES = ("auto", "float32", "bfloat16", "float16")
META_COLUMNS = ("key", "shard", "index", "image_path", "url")


def resolve_device(device: str | None) -> str:
    """`device`, else this process's GPU (LOCAL_RANK under a launcher) when there is one, else the CPU."""
    import os

    import torch

    if device:
        return device
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str):
    """The compute dtype: "auto" is bfloat16 on a GPU that supports it, float32 elsewhere."""
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {DTYPES}")
    if dtype == "auto":
        on_gpu = device.startswith("cuda") and torch.cuda.is_available()
        return torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, dtype)


def load_checkpoint(path: str, purpose: str, device: str, dtype):
    """(model, processor) of a checkpoint for `purpose` "caption" (CoCa, BLIP-2 stage 2) or "embed" (CoCa, BLIP-2
    stage 1), with a clear error for a BLIP-2 checkpoint of the other stage."""
    from transformers import AutoModel, AutoModelForImageTextToText, AutoModelForPreTraining, AutoProcessor

    from hf_vlm.registration import load_config  # registers our model types; errors name config.json

    config = load_config(path)
    if config.model_type not in ("coca", "blip2_flant5"):
        raise ValueError(f"{path}: model_type {config.model_type!r}; hf-vlm {purpose} runs coca and blip2_flant5")
    stage1 = "Blip2FlanT5ForPretraining" in (config.architectures or [])
    if config.model_type == "blip2_flant5" and purpose == "caption" and stage1:
        raise ValueError(f"{path} is a BLIP-2 stage-1 checkpoint (Blip2FlanT5ForPretraining): it has no language "
                         "model to caption with; use a stage-2 (or fine-tuned) checkpoint")
    if config.model_type == "blip2_flant5" and purpose == "embed" and not stage1:
        raise ValueError(f"{path} is a BLIP-2 stage-2 checkpoint: its image-text contrastive (ITC) projections are "
                         "those of stage 1; embed with the stage-1 checkpoint (Blip2FlanT5ForPretraining)")
    if config.model_type == "coca":
        auto = AutoModel
    else:
        auto = AutoModelForPreTraining if purpose == "embed" else AutoModelForImageTextToText
    model = auto.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, AutoProcessor.from_pretrained(path)


def _pixels(processor, images):
    return processor(images=list(images), return_tensors="pt")["pixel_values"]


def _text_inputs(processor, model_type: str, texts):
    """Token ids of captions for the model's text tower: CoCa's tokenizer (truncated to its model_max_length, as
    hf-vlm eval does), or the BLIP-2 Q-Former's BERT tokenizer."""
    if model_type == "blip2_flant5":
        encoded = processor(qformer_text=list(texts), return_tensors="pt")
        return {"input_ids": encoded["qformer_input_ids"], "attention_mask": encoded["qformer_attention_mask"]}
    encoded = processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def _normalized(features):
    import torch

    return torch.nn.functional.normalize(features.float(), dim=-1)


def _caption_inputs(processor, rerank_processor, images, texts):
    """Runs in the DataLoader workers: pixels for the captioner (and for the reranker, whose size may differ)."""
    inputs = {"pixel_values": _pixels(processor, images)}
    if rerank_processor is not None:
        inputs["rerank_pixel_values"] = _pixels(rerank_processor, images)
    return inputs


def _embed_inputs(processor, model_type, image, text, images, texts):
    inputs = {}
    if image:
        inputs["pixel_values"] = _pixels(processor, images)
    if text:
        inputs.update(_text_inputs(processor, model_type, texts))
    return inputs


def _parquet_writer(table):
    import pyarrow.parquet as pq

    return lambda handle: pq.write_table(table, handle)


def _meta_columns(samples) -> dict:
    return {name: [s[name] for s in samples] for name in META_COLUMNS}


class CaptionTask:
    """Captions (or answers to a fixed prompt) with a CoCa or BLIP-2 checkpoint; see the module docstring."""

    name = "caption"
    needs_image, needs_text = True, False

    def __init__(self, model: str, *, prompt: str | None = None, rerank_with: str | None = None,
                 num_candidates: int | None = None, device: str | None = None, dtype: str = "auto",
                 max_new_tokens: int | None = None, num_beams: int | None = None, generation: dict | None = None):
        if (rerank_with is None) != (num_candidates is None):
            raise ValueError("--rerank-with COCA_MODEL and --num-candidates K go together")
        if num_candidates is not None and num_candidates < 2:
            raise ValueError(f"--num-candidates {num_candidates}: reranking needs at least 2 candidates")
        self.model_path, self.prompt, self.rerank_with, self.num_candidates = model, prompt, rerank_with, num_candidates
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model, self.processor = load_checkpoint(model, "caption", self.device, self.dtype)
        self.model_type = self.model.config.model_type
        self.overrides = {k: v for k, v in {"max_new_tokens": max_new_tokens, "num_beams": num_beams,
                                            **(generation or {})}.items() if v is not None}
        # The checkpoint's decoding for the job (hf-vlm eval's rule): BLIP-2 answers a prompt as it answers VQA
        # questions (generation_config.json) and captions as caption_generation_config.json says; CoCa captions.
        decoding = "vqa" if prompt is not None and self.model_type == "blip2_flant5" else "caption"
        self.generation_config = generation_config_for(self.model, decoding, **self.overrides)
        if num_candidates:
            self.generation_config.num_return_sequences = num_candidates
            if not self.generation_config.do_sample:
                self.generation_config.num_beams = max(num_candidates, self.generation_config.num_beams or 1)
        self.generation_config.validate()
        self.reranker, rerank_processor = None, None
        if rerank_with:
            self.reranker, rerank_processor = load_checkpoint(rerank_with, "embed", self.device, self.dtype)
            if self.reranker.config.model_type != "coca":
                raise ValueError(f"--rerank-with {rerank_with}: a CoCa checkpoint scores the candidates; this one is "
                                 f"{self.reranker.config.model_type}")
        self.rerank_processor = rerank_processor
        # One prompt for every image: tokenized once, repeated per batch. BLIP-2 captions after the empty prompt
        # (T5 encodes it as a lone </s>, as LAVIS and the image-text-to-text pipeline caption); CoCa without one.
        text = prompt if prompt is not None else ("" if self.model_type == "blip2_flant5" else None)
        self.prompt_inputs = {} if text is None else {
            k: v for k, v in self.processor(text=[text], return_tensors="pt").items()
            # a question-aware Q-Former (BLIP-2 qformer_text_input) reads the prompt too
            if k in ("input_ids", "attention_mask", "qformer_input_ids", "qformer_attention_mask")}
        self.prepare = functools.partial(_caption_inputs, self.processor, rerank_processor)

    def settings(self) -> dict:
        return {"model": self.model_path, "prompt": self.prompt, "rerank_with": self.rerank_with,
                "num_candidates": self.num_candidates, "generation": self.overrides,
                "decoding": decoding_summary(self.generation_config)}

    def compute(self, inputs: dict) -> dict:
        import torch

        pixel_values = inputs["pixel_values"].to(self.device, self.model.dtype)
        batch = pixel_values.shape[0]
        prompt = {k: v.expand(batch, -1).to(self.device) for k, v in self.prompt_inputs.items()}
        with torch.inference_mode():
            ids = self.model.generate(pixel_values=pixel_values, **prompt, generation_config=self.generation_config)
        texts = [t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True)]
        if self.reranker is None:
            return {"caption": texts}
        k = self.num_candidates
        with torch.inference_mode():
            image = _normalized(self.reranker.get_image_features(
                pixel_values=inputs["rerank_pixel_values"].to(self.device, self.reranker.dtype)).pooler_output)
            tokens = {n: v.to(self.device) for n, v in _text_inputs(self.rerank_processor, "coca", texts).items()}
            text = _normalized(self.reranker.get_text_features(**tokens).pooler_output)
        scores = (text.view(batch, k, -1) * image[:, None]).sum(-1).cpu()
        best = scores.argmax(dim=1).tolist()
        candidates = [texts[i * k:(i + 1) * k] for i in range(batch)]
        return {"caption": [c[b] for c, b in zip(candidates, best)], "score": scores.max(dim=1).values.tolist(),
                "candidates": candidates, "candidate_scores": scores.tolist()}

    def write(self, out, unit: int, samples: list[dict], outputs: list[dict]) -> dict[str, int]:
        import pyarrow as pa

        columns = {**_meta_columns(samples), "source_caption": [s["caption"] for s in samples]}
        for name in outputs[0]:
            columns[name] = [value for output in outputs for value in output[name]]
        name = f"captions/{out.part(unit)}.parquet"
        return {name: out.write(name, _parquet_writer(pa.table(columns)))}


class EmbedTask:
    """Contrastive image and/or caption embeddings with a CoCa or BLIP-2 stage-1 checkpoint; see the module
    docstring."""

    name = "embed"

    def __init__(self, model: str, *, embeddings=("image",), output_dtype: str = "float16", device: str | None = None,
                 dtype: str = "auto"):
        embeddings = tuple(dict.fromkeys(embeddings))
        if not embeddings or set(embeddings) - {"image", "text"}:
            raise ValueError(f"embeddings {embeddings}: choose image, text or both")
        if output_dtype not in OUTPUT_DTYPES:
            raise ValueError(f"output dtype {output_dtype!r}: expected one of {OUTPUT_DTYPES}")
        self.model_path, self.embeddings, self.output_dtype = model, embeddings, output_dtype
        self.needs_image, self.needs_text = "image" in embeddings, "text" in embeddings
        self.device = resolve_device(device)
        self.model, self.processor = load_checkpoint(model, "embed", self.device, resolve_dtype(dtype, self.device))
        self.model_type = self.model.config.model_type
        if self.needs_text and self.model_type == "blip2_flant5" and self.processor.qformer_tokenizer is None:
            raise ValueError(f"{model}: text embeddings need the Q-Former's tokenizer (qformer_tokenizer/), which this "
                             "checkpoint's processor lacks")
        self.prepare = functools.partial(_embed_inputs, self.processor, self.model_type, self.needs_image,
                                         self.needs_text)

    def settings(self) -> dict:
        return {"model": self.model_path, "embeddings": list(self.embeddings), "output_dtype": self.output_dtype}

    def compute(self, inputs: dict) -> dict:
        import torch

        out = {}
        with torch.inference_mode():
            if self.needs_image:
                pixel_values = inputs["pixel_values"].to(self.device, self.model.dtype)
                out["image"] = _normalized(self.model.get_image_features(pixel_values=pixel_values).pooler_output)
            if self.needs_text:
                tokens = {n: inputs[n].to(self.device) for n in ("input_ids", "attention_mask")}
                out["text"] = _normalized(self.model.get_text_features(**tokens).pooler_output)
        return {name: value.cpu().numpy().astype(self.output_dtype) for name, value in out.items()}

    def write(self, out, unit: int, samples: list[dict], outputs: list[dict]) -> dict[str, int]:
        import numpy as np
        import pyarrow as pa

        part, files = out.part(unit), {}
        for kind, folder in (("image", "img_emb"), ("text", "text_emb")):
            if kind in self.embeddings:
                array = np.concatenate([output[kind] for output in outputs])
                name = f"{folder}/{folder}_{part}.npy"
                files[name] = out.write(name, lambda handle, a=array: np.save(handle, a))
        # Written last: a metadata file is there only when its embeddings are.
        table = pa.table({**_meta_columns(samples), "caption": [s["caption"] for s in samples]})
        name = f"metadata/metadata_{part}.parquet"
        files[name] = out.write(name, _parquet_writer(table))
        return files


def run_caption(source: str, model: str, output, *, split: str | None = None, batch_size: int = 16,
                num_workers: int = 0, seed: int = 0, **task_kwargs) -> dict:
    """`hf-vlm caption SOURCE --model MODEL --output OUTPUT` (task_kwargs: CaptionTask's)."""
    return run_bulk(CaptionTask(model, **task_kwargs), source, output, split=split, batch_size=batch_size,
                    num_workers=num_workers, seed=seed)


def run_embed(source: str, model: str, output, *, split: str | None = None, batch_size: int = 64,
              num_workers: int = 0, seed: int = 0, **task_kwargs) -> dict:
    """`hf-vlm embed SOURCE --model MODEL --output OUTPUT` (task_kwargs: EmbedTask's)."""
    return run_bulk(EmbedTask(model, **task_kwargs), source, output, split=split, batch_size=batch_size,
                    num_workers=num_workers, seed=seed)
