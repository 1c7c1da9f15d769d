"""`hf-vlm caption` and `hf-vlm embed`: what they write equals the models called one image at a time, they read every
source training reads through the same readers and decoder, bad samples are counted and listed, two processes split
the shards without overlap, and a SIGKILLed run restarted with the same command ends with the uninterrupted output."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from test_data_sources import _png, good_samples, write_shard

from hf_vlm.cli import main
from hf_vlm.data import load_rgb_image
from hf_vlm.evaluation.decoding import generation_config_for
from hf_vlm.testing import random_image

ROOT = Path(__file__).resolve().parents[1]
MULTI_GPU_CONFIG = ROOT / "trainers" / "accelerate" / "multi_gpu.yaml"
PROMPT = "Question: what color is the circle? Short answer:"
SHARDS, PER_SHARD = 3, 4  # the good data: 3 shards of 4 samples (batches of 3 leave a partial batch per shard)
# A pipe: command that logs which rank opened which shard, then streams it.
FEED = 'echo "${RANK:-0} $1" >> "$(dirname "$0")/reads.log"; cat "$(dirname "$0")/$1.tar"\n'
# The same, but shards after the first wait until a file `go` exists: a run is stuck in shard 1 until released.
GATE = ('echo "${RANK:-0} $1" >> "$(dirname "$0")/reads.log"\n'
        'if [ "$1" != 000 ]; then while [ ! -e "$(dirname "$0")/go" ]; do sleep 0.1; done; fi\n'
        'cat "$(dirname "$0")/$1.tar"\n')


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, blip2_checkpoint, t5_tokenizer_dir, bert_tokenizer_dir):
    """Tiny random checkpoints: CoCa, BLIP-2 stage 2 (conftest's) and BLIP-2 stage 1 with its Q-Former tokenizer."""
    from transformers import AutoModel, AutoTokenizer, CLIPImageProcessor

    import hf_vlm  # noqa: F401
    from hf_vlm.modeling.blip2_flant5 import Blip2FlanT5ForPretraining, Blip2FlanT5Processor
    from hf_vlm.modeling.coca import CocaProcessor
    from hf_vlm.presets import get_config
    from hf_vlm.testing import TINY_CORPUS
    from hf_vlm.tokenization import train_coca_tokenizer

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("bulk-checkpoints")
    tokenizer = train_coca_tokenizer(TINY_CORPUS, vocab_size=96, model_max_length=32)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CocaProcessor(image_processor, tokenizer).save_pretrained(root / "coca")
    AutoModel.from_config(get_config("coca-tiny")).save_pretrained(root / "coca")
    Blip2FlanT5Processor.from_tokenizers(AutoTokenizer.from_pretrained(t5_tokenizer_dir),
                                         AutoTokenizer.from_pretrained(bert_tokenizer_dir),
                                         image_size=32).save_pretrained(root / "stage1")
    Blip2FlanT5ForPretraining(get_config("blip2-tiny")).save_pretrained(root / "stage1")
    return {"coca": root / "coca", "blip2": blip2_checkpoint, "stage1": root / "stage1"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """3 webdataset shards of 4 samples (`g000.png` + `g000.txt` ...) and the feeder scripts for pipe: sources."""
    folder = tmp_path_factory.mktemp("bulk-shards")
    for s in range(SHARDS):
        write_shard(folder / f"{s:03d}.tar", good_samples("g", PER_SHARD, start=s * PER_SHARD))
    (folder / "feed.sh").write_text(FEED)
    (folder / "gate.sh").write_text(GATE)
    return folder


def _pngs(shards: Path) -> list[bytes]:
    """The image files of the good shards, in order (read with tarfile, not with the readers under test)."""
    pngs = []
    for s in range(SHARDS):
        with tarfile.open(shards / f"{s:03d}.tar") as tar:
            pngs += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".png")]
    return pngs


def _images(shards: Path) -> list:
    """The good samples' images as training's decoder gives them."""
    return [load_rgb_image(data) for data in _pngs(shards)]


def _captions(output) -> dict:
    return pq.read_table(Path(output) / "captions").to_pydict()


def _embeddings(output, kind: str = "img_emb") -> np.ndarray:
    files = sorted((Path(output) / kind).glob("*.npy"))
    return np.concatenate([np.load(f) for f in files])


def _metadata(output) -> dict:
    return pq.read_table(Path(output) / "metadata").to_pydict()


def _summary(output) -> dict:
    return json.loads((Path(output) / "summary.json").read_text())


def _load(path, auto_name: str):
    import transformers

    import hf_vlm  # noqa: F401

    return getattr(transformers, auto_name).from_pretrained(path).eval(), transformers.AutoProcessor.from_pretrained(path)


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "datasets_cache"),
            "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


# ------------------------------------------------------------------------------------------ the models' outputs


def test_captions_equal_one_at_a_time_generate_with_prompts_and_coca_reranking(checkpoints, shards, tmp_path,
                                                                              torch_one_thread):
    spec = f"{shards}/{{000..002}}.tar"
    images = _images(shards)
    keys = [f"g{i:03d}" for i in range(SHARDS * PER_SHARD)]

    # CoCa, no prompt, batches of 3 (a partial batch at the end of every shard), two DataLoader workers.
    assert main(["caption", spec, "--model", str(checkpoints["coca"]), "--output", str(tmp_path / "coca"),
                 "--batch-size", "3", "--max-new-tokens", "5", "--num-workers", "2"]) == 0
    coca, processor = _load(checkpoints["coca"], "AutoModel")
    rows = _captions(tmp_path / "coca")
    assert rows["key"] == keys and rows["index"] == [i % PER_SHARD for i in range(len(keys))]
    assert rows["shard"] == [f"{shards}/{i // PER_SHARD:03d}.tar" for i in range(len(keys))]
    assert rows["source_caption"] == [f"g caption {i}" for i in range(len(keys))]
    decoding = generation_config_for(coca, "caption", max_new_tokens=5)  # the checkpoint's (6 beams), 5 tokens
    assert decoding.num_beams == 6
    with torch.no_grad():
        for image, caption in zip(images, rows["caption"]):
            ids = coca.generate(pixel_values=processor(images=[image], return_tensors="pt").pixel_values,
                                generation_config=decoding)
            assert caption == processor.batch_decode(ids, skip_special_tokens=True)[0].strip()
    assert len(set(rows["caption"])) > 1  # the images differ, and so do their captions

    # BLIP-2 answering one prompt about every image (one shard).
    assert main(["caption", f"{shards}/000.tar", "--model", str(checkpoints["blip2"]), "--output",
                 str(tmp_path / "vqa"), "--prompt", PROMPT, "--batch-size", "3", "--max-new-tokens", "4"]) == 0
    blip2, blip2_processor = _load(checkpoints["blip2"], "AutoModelForImageTextToText")
    answers = _captions(tmp_path / "vqa")["caption"]
    decoding = generation_config_for(blip2, "vqa", max_new_tokens=4)  # a prompt is answered as VQA is decoded
    with torch.no_grad():
        for image, answer in zip(images, answers):
            ids = blip2.generate(**blip2_processor(images=[image], text=PROMPT, return_tensors="pt"),
                                 generation_config=decoding)
            assert answer == blip2_processor.batch_decode(ids, skip_special_tokens=True)[0].strip()

    # BLIP-2 proposes 3 beam candidates per image, CoCa's image-text cosine similarity picks one.
    assert main(["caption", f"{shards}/000.tar", "--model", str(checkpoints["blip2"]), "--output",
                 str(tmp_path / "reranked"), "--rerank-with", str(checkpoints["coca"]), "--num-candidates", "3",
                 "--max-new-tokens", "4", "--num-beams", "3", "--batch-size", "3"]) == 0
    rows = _captions(tmp_path / "reranked")
    decoding = generation_config_for(blip2, "caption", max_new_tokens=4, num_beams=3, num_return_sequences=3)
    with torch.no_grad():
        for i, image in enumerate(images[:PER_SHARD]):
            ids = blip2.generate(**blip2_processor(images=[image], text="", return_tensors="pt"),
                                 generation_config=decoding)
            candidates = [c.strip() for c in blip2_processor.batch_decode(ids, skip_special_tokens=True)]
            assert rows["candidates"][i] == candidates
            image_embed = coca.get_image_features(
                pixel_values=processor(images=[image], return_tensors="pt").pixel_values).pooler_output
            texts = processor(text=candidates, return_tensors="pt", padding=True)
            text_embeds = coca.get_text_features(**texts).pooler_output
            scores = torch.nn.functional.normalize(text_embeds, dim=-1) @ torch.nn.functional.normalize(image_embed,
                                                                                                        dim=-1)[0]
            np.testing.assert_allclose(rows["candidate_scores"][i], scores.tolist(), atol=1e-5)
            assert rows["caption"][i] == candidates[int(scores.argmax())]
            assert rows["score"][i] == pytest.approx(float(scores.max()), abs=1e-5)
    settings = json.loads((tmp_path / "reranked" / "run.json").read_text())
    assert settings["rerank_with"] == str(checkpoints["coca"])
    assert settings["generation"] == {"max_new_tokens": 4, "num_beams": 3}
    assert settings["decoding"]["min_new_tokens"] == 4  # the checkpoint's caption minimum, cut to the maximum


def test_embeddings_equal_one_at_a_time_features_in_the_autofaiss_layout(checkpoints, shards, tmp_path,
                                                                         torch_one_thread):
    spec = f"{shards}/{{000..002}}.tar"
    images = _images(shards)
    captions = [f"g caption {i}" for i in range(len(images))]
    coca, processor = _load(checkpoints["coca"], "AutoModel")
    assert main(["embed", spec, "--model", str(checkpoints["coca"]), "--output", str(tmp_path / "coca"),
                 "--embeddings", "image", "text", "--output-dtype", "float32", "--batch-size", "3"]) == 0
    out = tmp_path / "coca"
    parts = [f"{s:05d}" for s in range(SHARDS)]
    assert sorted(p.name for p in (out / "img_emb").iterdir()) == [f"img_emb_{p}.npy" for p in parts]
    assert sorted(p.name for p in (out / "text_emb").iterdir()) == [f"text_emb_{p}.npy" for p in parts]
    assert sorted(p.name for p in (out / "metadata").iterdir()) == [f"metadata_{p}.parquet" for p in parts]
    for part in parts:  # row i of each file is the same sample
        assert len(np.load(out / "img_emb" / f"img_emb_{part}.npy")) == pq.read_metadata(
            out / "metadata" / f"metadata_{part}.parquet").num_rows == PER_SHARD
    metadata = _metadata(out)
    assert metadata["caption"] == captions and metadata["key"] == [f"g{i:03d}" for i in range(len(images))]
    image_embeds, text_embeds = _embeddings(out), _embeddings(out, "text_emb")
    assert image_embeds.dtype == np.float32 and image_embeds.shape == (len(images), coca.config.projection_dim)
    with torch.no_grad():
        for i, (image, caption) in enumerate(zip(images, captions)):
            single = coca.get_image_features(pixel_values=processor(images=[image], return_tensors="pt").pixel_values)
            expected = torch.nn.functional.normalize(single.pooler_output, dim=-1)[0].numpy()
            np.testing.assert_allclose(image_embeds[i], expected, atol=1e-5)
            text = coca.get_text_features(**processor(text=[caption], return_tensors="pt")).pooler_output
            np.testing.assert_allclose(text_embeds[i], torch.nn.functional.normalize(text, dim=-1)[0].numpy(),
                                       atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(image_embeds, axis=-1), 1.0, atol=1e-5)

    # float16 by default: the same vectors, rounded
    assert main(["embed", f"{shards}/000.tar", "--model", str(checkpoints["coca"]), "--output",
                 str(tmp_path / "half")]) == 0
    half = _embeddings(tmp_path / "half")
    assert half.dtype == np.float16 and not (tmp_path / "half" / "text_emb").exists()
    np.testing.assert_allclose(half.astype(np.float32), image_embeds[:PER_SHARD], atol=2e-3)

    # BLIP-2 stage 1: the ITC features, one per query token for an image (ITC keeps a text's best query).
    stage1, stage1_processor = _load(checkpoints["stage1"], "AutoModelForPreTraining")
    assert main(["embed", f"{shards}/000.tar", "--model", str(checkpoints["stage1"]), "--output",
                 str(tmp_path / "stage1"), "--embeddings", "image", "text", "--output-dtype", "float32"]) == 0
    image_embeds, text_embeds = _embeddings(tmp_path / "stage1"), _embeddings(tmp_path / "stage1", "text_emb")
    assert image_embeds.shape == (PER_SHARD, stage1.config.num_query_tokens, stage1.config.image_text_hidden_size)
    with torch.no_grad():
        for i, (image, caption) in enumerate(zip(images[:PER_SHARD], captions)):
            pixels = stage1_processor(images=[image], return_tensors="pt").pixel_values
            np.testing.assert_allclose(image_embeds[i], stage1.get_image_features(pixels).pooler_output[0].numpy(),
                                       atol=1e-5)
            tokens = stage1_processor(qformer_text=[caption], return_tensors="pt")
            text = stage1.get_text_features(tokens["qformer_input_ids"], tokens["qformer_attention_mask"])
            np.testing.assert_allclose(text_embeds[i], text.pooler_output[0].numpy(), atol=1e-5)

    with pytest.raises(ValueError, match="stage-2 checkpoint.*embed with the stage-1 checkpoint"):
        main(["embed", spec, "--model", str(checkpoints["blip2"]), "--output", str(tmp_path / "wrong")])
    with pytest.raises(ValueError, match="stage-1 checkpoint.*no language model"):
        main(["caption", spec, "--model", str(checkpoints["stage1"]), "--output", str(tmp_path / "wrong")])


# ------------------------------------------------------------------------------------------ sources and bad data


def test_every_source_form_training_reads_gives_the_same_rows(checkpoints, shards, tmp_path, http_server,
                                                             monkeypatch, torch_one_thread):
    """Brace pattern, folder, glob, HTTP URL, pipe:, imagefolder, parquet and a Hub dataset: the same images in the
    same order give the same embeddings, one output file per input shard."""
    import datasets

    count = SHARDS * PER_SHARD
    folder = tmp_path / "imagefolder"
    folder.mkdir()
    pngs = _pngs(shards)
    for i, data in enumerate(pngs):
        (folder / f"{i:03d}.png").write_bytes(data)
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i:03d}.png", "caption": f"c {i}"})
                                                   + "\n" for i in range(count)))
    parquet = tmp_path / "parquet"
    parquet.mkdir()
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    for s in range(2):  # two files: two shards
        rows = range(s * 6, s * 6 + 6)
        datasets.Dataset.from_dict({"image": [{"bytes": pngs[i], "path": None} for i in rows],
                                    "caption": [f"c {i}" for i in rows]}, features=features).to_parquet(
            parquet / f"{s}.parquet")
    load_dataset = datasets.load_dataset

    def hub(*args, **kwargs):  # the Hub is unreachable here: org/name is answered by the parquet files
        if kwargs.get("path") == "org/name":
            assert kwargs["split"] == "train" and kwargs["streaming"] is True
            return load_dataset("parquet", data_files=sorted(str(p) for p in parquet.glob("*.parquet")),
                                split="train", streaming=True)
        return load_dataset(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", hub)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    url = http_server(shards)
    forms = {"brace": (f"{shards}/{{000..002}}.tar", SHARDS), "folder": (str(shards), SHARDS),
             "glob": (f"{shards}/*.tar", SHARDS), "http": (f"{url}/{{000..002}}.tar", SHARDS),
             "pipe": (f"pipe:cat {shards}/{{000..002}}.tar", SHARDS), "imagefolder": (str(folder), 1),
             "parquet": (f"{parquet}/*.parquet", 2), "hub": ("org/name", 2)}
    reference = None
    for name, (spec, files) in forms.items():
        out = tmp_path / "out" / name
        assert main(["embed", spec, "--model", str(checkpoints["coca"]), "--output", str(out), "--output-dtype",
                     "float32", "--batch-size", "5"]) == 0, name
        embeddings = _embeddings(out)
        assert len(list((out / "img_emb").glob("*.npy"))) == files, name
        if reference is None:
            reference = embeddings
        np.testing.assert_allclose(embeddings, reference, atol=1e-6, err_msg=name)
        summary = _summary(out)
        assert summary["rows"] == count and summary["skipped_total"] == 0 and summary["shards"] == files, name
    assert _metadata(tmp_path / "out" / "imagefolder")["image_path"][0] == str(folder / "000.png")


def test_bad_samples_are_skipped_counted_per_reason_and_listed(checkpoints, tmp_path, torch_one_thread):
    folder = tmp_path / "bad"
    folder.mkdir()
    image = _png(random_image(16, seed=99))
    write_shard(folder / "000.tar", [
        *good_samples("a", 2),
        ("corrupt", {"png": b"<html>404</html>", "txt": b"a caption"}),
        ("latin1", {"png": image, "txt": "caf\xe9 au lait".encode("latin-1")}),
        ("nocaption", {"png": image}),  # fine for images; skipped where its caption is embedded
        *good_samples("a", 1, start=2),
    ])
    full = write_shard(folder / "001.tar", good_samples("b", 3)).read_bytes()
    cut = full.rindex(b"b002.png")
    (folder / "001.tar").write_bytes(full[: cut + 512 + 40])  # cut inside b002's image: b000, b001 kept
    spec = f"{folder}/{{000..002}}.tar"  # 002.tar does not exist

    assert main(["embed", spec, "--model", str(checkpoints["coca"]), "--output", str(tmp_path / "text"),
                 "--embeddings", "image", "text"]) == 0
    summary = _summary(tmp_path / "text")
    assert {k: v for k, v in summary["skipped"].items() if v} == {
        "corrupt_image": 1, "bad_text_encoding": 1, "empty_caption": 1, "truncated_member": 1, "unreadable_shard": 1}
    assert set(summary["skipped"]) >= {"oversized_image", "bad_json"}  # every reason, zeros included
    listed = {(Path(s["shard"]).name, s["key"], s["reason"]) for s in summary["skipped_samples"]}
    assert listed == {("000.tar", "corrupt", "corrupt_image"), ("000.tar", "latin1", "bad_text_encoding"),
                      ("000.tar", "nocaption", "empty_caption"), ("001.tar", "b002", "truncated_member"),
                      ("002.tar", None, "unreadable_shard")}
    assert _metadata(tmp_path / "text")["key"] == ["a000", "a001", "a002", "b000", "b001"]
    assert summary["rows"] == len(_embeddings(tmp_path / "text")) == len(_embeddings(tmp_path / "text", "text_emb"))
    # 002.tar (unreadable) and any shard with no usable sample write no data files, only their record
    assert summary["shards"] == 3 and not list((tmp_path / "text" / "img_emb").glob("*00002.npy"))

    # Captioning does not need captions: the sample without one is captioned.
    assert main(["caption", spec, "--model", str(checkpoints["coca"]), "--output", str(tmp_path / "captions"),
                 "--max-new-tokens", "2"]) == 0
    summary = _summary(tmp_path / "captions")
    assert summary["skipped_total"] == 4 and summary["skipped"]["empty_caption"] == 0
    assert "nocaption" in _captions(tmp_path / "captions")["key"]


def test_an_output_folder_holds_one_run(checkpoints, shards, tmp_path):
    out = tmp_path / "out"
    args = ["embed", f"{shards}/000.tar", "--model", str(checkpoints["coca"]), "--output", str(out)]
    assert main(args) == 0
    with pytest.raises(ValueError, match=r"holds a run with other settings \(embeddings"):
        main([*args, "--embeddings", "image", "text"])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no run.json"):
        main(["embed", f"{shards}/000.tar", "--model", str(checkpoints["coca"]), "--output", str(tmp_path / "other")])


def test_ranks_that_start_together_accept_each_others_run_json(tmp_path, monkeypatch):
    """The race of `accelerate launch --num_processes 2`: while this rank looks, another rank of the same run is
    writing run.json (its hidden temporary file is in the folder), or has just renamed it into place between this
    rank's two looks. Neither is a stranger's folder."""
    from hf_vlm.bulk.run import RUN_FILE, Output

    settings = {"command": "embed", "source": "x", "batch_size": 4}
    writing = tmp_path / "writing"
    writing.mkdir()
    (writing / f".{RUN_FILE}.tmp-12345").write_text("{")  # the other rank, mid-write
    Output(writing, 3).check_settings(settings)
    assert json.loads((writing / RUN_FILE).read_text()) == settings

    renamed = tmp_path / "renamed"
    renamed.mkdir()
    looks = []
    real_is_file = Path.is_file

    def is_file(path):  # the first look finds no run.json; the other rank's rename (and its first shard) follow
        if path.name == RUN_FILE and path.parent == renamed and not looks:
            looks.append(path)
            (renamed / RUN_FILE).write_text(json.dumps(settings))
            (renamed / "progress").mkdir()
            return False
        return real_is_file(path)

    monkeypatch.setattr(Path, "is_file", is_file)
    Output(renamed, 3).check_settings(settings)
    with pytest.raises(ValueError, match=r"holds a run with other settings \(batch_size"):
        Output(renamed, 3).check_settings({**settings, "batch_size": 8})


# ------------------------------------------------------------------------------------------ processes and restarts


@pytest.mark.distributed
def test_two_processes_take_disjoint_shards_that_together_cover_every_sample_once(checkpoints, shards, tmp_path):
    """`accelerate launch --num_processes 2`: rank r opens shards r, r + 2, ... (the pipe: command logs who opened
    which); the outputs are those of one process."""
    (shards / "reads.log").unlink(missing_ok=True)
    spec = f"pipe:sh {shards}/feed.sh {{000..002}}"
    args = ["embed", spec, "--model", str(checkpoints["coca"]), "--embeddings", "image", "text", "--output-dtype",
            "float32", "--batch-size", "3"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(MULTI_GPU_CONFIG),
           "--num_processes", "2", "--main_process_port", str(_free_port()), "-m", "hf_vlm", *args,
           "--output", str(tmp_path / "two")]
    result = subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    reads = sorted(tuple(line.split()) for line in (shards / "reads.log").read_text().splitlines())
    assert reads == [("0", "000"), ("0", "002"), ("1", "001")]  # each shard opened once, by its own rank
    records = [json.loads((tmp_path / "two" / "progress" / f"{s:05d}.json").read_text()) for s in range(SHARDS)]
    assert [r["rank"] for r in records] == [0, 1, 0]
    # each sample exactly once, in shard order; the summary counts all of them (written by whichever rank ended last)
    assert _metadata(tmp_path / "two")["key"] == [f"g{i:03d}" for i in range(SHARDS * PER_SHARD)]
    assert _summary(tmp_path / "two")["rows"] == SHARDS * PER_SHARD
    assert "rank 0:" in result.stdout and "rank 1:" in result.stdout
    (shards / "reads.log").unlink()
    assert main([*args, "--output", str(tmp_path / "one")]) == 0
    for kind in ("img_emb", "text_emb"):
        np.testing.assert_allclose(_embeddings(tmp_path / "two", kind), _embeddings(tmp_path / "one", kind),
                                   atol=1e-6)
    (shards / "reads.log").unlink()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_sigkilled_run_restarted_with_the_same_command_ends_with_the_uninterrupted_output(checkpoints, shards,
                                                                                            tmp_path):
    """Killed while reading shard 1 (its pipe: command waits for `go`), after shard 0 was written: the restart skips
    shard 0, redoes shard 1 and ends with exactly the rows of a run that was never interrupted."""
    (shards / "go").unlink(missing_ok=True)
    (shards / "reads.log").unlink(missing_ok=True)
    out = tmp_path / "killed"
    args = ["caption", f"pipe:sh {shards}/gate.sh {{000..002}}", "--model", str(checkpoints["coca"]), "--output",
            str(out), "--max-new-tokens", "4", "--batch-size", "3"]
    process = subprocess.Popen([sys.executable, "-m", "hf_vlm", *args], env=_env(tmp_path), start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    done = out / "progress" / "00000.json"
    reads_log = shards / "reads.log"

    def reading_shard_1() -> bool:  # shard 0 recorded, and shard 1's pipe: command started (it waits for `go`)
        return done.exists() and reads_log.exists() and " 001" in reads_log.read_text()

    deadline = time.monotonic() + 300
    while not reading_shard_1() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher's whole group: the python process and its pipe: command
    log = process.communicate()[0]
    assert reading_shard_1(), log[-3000:]
    first = (out / "captions" / "00000.parquet").stat().st_mtime_ns
    assert not (out / "progress" / "00001.json").exists() and not (out / "summary.json").exists()

    (shards / "go").touch()
    assert main(args) == 0  # the same command
    assert (out / "captions" / "00000.parquet").stat().st_mtime_ns == first  # shard 0 was not done again
    reads = [line.split()[1] for line in (shards / "reads.log").read_text().splitlines()]
    assert reads == ["000", "001", "001", "002"]  # the restart did not open shard 0
    assert main([*args[:5], str(tmp_path / "uninterrupted"), *args[6:]]) == 0
    killed, uninterrupted = _captions(out), _captions(tmp_path / "uninterrupted")
    assert killed == uninterrupted
    assert killed["key"] == [f"g{i:03d}" for i in range(SHARDS * PER_SHARD)]  # one row per sample
    assert _summary(out)["rows"] == SHARDS * PER_SHARD
    assert not list(out.rglob(".*.tmp*"))  # no temporary file is left behind

    # A shard file that lost its recorded size, and a shard killed between its files' rename and its record: both are
    # done again by the same command, and only they.
    (out / "captions" / "00001.parquet").write_bytes(b"cut short")
    (out / "progress" / "00002.json").unlink()
    untouched = (out / "captions" / "00000.parquet").stat().st_mtime_ns
    assert main(args) == 0
    assert _captions(out) == uninterrupted and (out / "captions" / "00000.parquet").stat().st_mtime_ns == untouched
    (shards / "go").unlink()
    (shards / "reads.log").unlink()


# ------------------------------------------------------------------------------------------ README


def test_the_readme_bulk_examples_run_as_written(checkpoints, tmp_path, monkeypatch, torch_one_thread):
    """The README section's commands, run from a folder laid out like a checkout after `make demo` (tiny models)."""
    import shutil

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Captioning and embedding whole datasets"):]
    section = section[: section.index("\n## ", 1)]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1).replace("\\\n", " ")
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.startswith("hf-vlm ")]
    assert len(commands) >= 4
    monkeypatch.chdir(tmp_path)
    demo = Path(".demo")
    for name, source in (("checkpoints/coca", "coca"), ("checkpoints/blip2", "blip2"),
                         ("checkpoints/blip2-caption", "blip2"), ("runs/blip2-stage1", "stage1")):
        shutil.copytree(checkpoints[source], demo / name)
    (demo / "data" / "captions").mkdir(parents=True)
    for s in range(2):  # as hf_vlm.scenes.export_webdataset names them
        write_shard(demo / "data" / "captions" / f"scenes-{s:06d}.tar", good_samples("s", 3, start=3 * s))
    for command in commands:
        assert main(shlex.split(command)[1:]) == 0, command
        output = Path(shlex.split(command)[shlex.split(command).index("--output") + 1])
        assert _summary(output)["rows"] == 6, command
