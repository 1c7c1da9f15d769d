"""Data at scale: shards anywhere (braces, globs, HTTP, fsspec URLs, pipe:), one stream per process, no bad byte
stops a run, augmentation seeded per sample, and a stream that resumes from its position without re-decoding."""

from __future__ import annotations

import functools
import http.server
import io
import itertools
import json
import struct
import tarfile
import threading
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from hf_vlm.data import (
    SKIP_REASONS,
    ImageTextSource,
    SkipCounter,
    TooManySkips,
    build_image_transform,
    build_training_data,
    load_image_text_dataset,
    prepare_dataset,
)
from hf_vlm.data.shards import expand_braces
from hf_vlm.testing import random_image

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for extension, data in members.items():
                _add(tar, f"{key}.{extension}", data)
    return path


def good_samples(prefix: str, count: int, start: int = 0):
    return [(f"{prefix}{i:03d}", {"png": _png(random_image(SIZE, seed=start + i)), "txt": f"{prefix} caption {i}".encode()})
            for i in range(start, start + count)]


def decompression_bomb() -> bytes:
    """A valid 1x1 PNG whose header claims 40000 x 40000 pixels (1.6 gigapixels)."""
    data = bytearray(_png(Image.new("RGB", (1, 1))))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", 40000, 40000)
    crc = zlib.crc32(bytes(data[ihdr:ihdr + 17]))
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def transform():
    return build_image_transform("coca", train=True, image_size=SIZE)


def prepared_list(source, streaming, counter=None, **kwargs):
    counter = counter if counter is not None else SkipCounter()
    raw = load_image_text_dataset(source, streaming=streaming, cache_dir=kwargs.pop("cache_dir", None))
    prepared = prepare_dataset(raw, build_image_transform("none", train=False, image_size=SIZE), counter,
                               shuffle_buffer=0, max_skip_fraction=None, **kwargs)
    if streaming:
        return list(prepared), counter
    return [prepared[i] for i in range(len(prepared))], counter


# ------------------------------------------------------------------------------------------ addresses


def test_brace_patterns_expand_like_webdataset():
    assert expand_braces("cc3m/{00000..00002}.tar") == ["cc3m/00000.tar", "cc3m/00001.tar", "cc3m/00002.tar"]
    assert expand_braces("{a,b}/{8..10}.tar") == ["a/8.tar", "a/9.tar", "a/10.tar", "b/8.tar", "b/9.tar", "b/10.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="counts down"):
        expand_braces("{3..1}.tar")


def test_readme_launch_line_sources_resolve_as_written(tmp_path, monkeypatch):
    """The README's `--train_data "cc3m/{00000..00331}.tar"` form (relative, braces, @weight), globs and folders."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cc3m").mkdir()
    (tmp_path / "sbu").mkdir()
    for i in range(3):
        write_shard(tmp_path / "cc3m" / f"{i:05d}.tar", good_samples(f"c{i}-", 2))
    write_shard(tmp_path / "sbu" / "00000.tar", good_samples("s", 4))
    readme = (ROOT / "README.md").read_text()
    assert "{00000.." in readme  # the README launch lines use brace patterns
    for spec, count in [("cc3m/{00000..00002}.tar", 6), ("cc3m/*.tar@0.7", 6), ("sbu/", 4),
                        ("cc3m/{00000..00001}.tar@2", 4), ("./sbu/00000.tar", 4)]:
        rows = list(load_image_text_dataset(spec, streaming=True))
        assert len(rows) == count, spec
        assert ImageTextSource.from_spec(spec).weight == (float(spec.rpartition("@")[2]) if "@" in spec else 1.0)
    mixed = list(itertools.islice(load_image_text_dataset(["cc3m/{00000..00002}.tar@0.7", "sbu/@0.3"],
                                                          streaming=True), 10))
    assert {row["text"].split()[0][0] for row in mixed} == {"c", "s"}
    with pytest.raises(FileNotFoundError, match="nothing matches"):
        load_image_text_dataset("cc4m/{00000..00009}.tar")


@pytest.fixture
def http_shards(tmp_path):
    """Two shards served by a real HTTP server on 127.0.0.1 (stopped after the test)."""
    folder = tmp_path / "served"
    folder.mkdir()
    write_shard(folder / "shard-000.tar", good_samples("h", 3))
    write_shard(folder / "shard-001.tar", good_samples("h", 3, start=3))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", folder
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "streaming"])
def test_remote_shards_over_http_fsspec_urls_and_pipe_commands(http_shards, tmp_path, streaming):
    import fsspec

    url, folder = http_shards
    expected = [f"h caption {i}" for i in range(6)]
    # https:// (here http on loopback): a brace pattern of URLs, nothing opened until read
    rows, _ = prepared_list(f"{url}/shard-{{000..001}}.tar", streaming, cache_dir=tmp_path / "c1")
    assert [r["text"] for r in rows] == expected
    # an fsspec filesystem that lists (as hf://, s3://, gs:// do): a remote glob
    memory = fsspec.filesystem("memory")
    for name in ("shard-000.tar", "shard-001.tar"):
        memory.pipe(f"/bucket-{streaming}/{name}", (folder / name).read_bytes())
    rows, _ = prepared_list(f"memory://bucket-{streaming}/*.tar", streaming, cache_dir=tmp_path / "c2")
    assert [r["text"] for r in rows] == expected
    # pipe: the shard is a command's standard output
    rows, _ = prepared_list(f"pipe:cat {folder}/shard-{{000..001}}.tar", streaming, cache_dir=tmp_path / "c3")
    assert [r["text"] for r in rows] == expected


# ------------------------------------------------------------------------------------------ bad data

BAD_WEBDATASET = {
    "corrupt_image": 2,  # zero bytes, not an image
    "oversized_image": 1,  # decompression bomb
    "empty_caption": 2,  # empty, whitespace
    "bad_text_encoding": 1,  # non-UTF-8 .txt
    "bad_json": 1,  # invalid .json holding the caption
    "truncated_member": 1,  # a shard cut inside its last member
    "unreadable_shard": 2,  # a shard that does not exist, a pipe: command that fails
}


@pytest.fixture
def bad_shards(tmp_path):
    """Webdataset shards with every kind of bad byte the issue names, around 9 good samples."""
    folder = tmp_path / "bad"
    folder.mkdir()
    image = _png(random_image(SIZE, seed=99))
    write_shard(folder / "000.tar", [
        *good_samples("g", 3),
        ("zero-bytes", {"png": b"", "txt": b"a caption"}),
        ("not-an-image", {"png": b"<html>404</html>", "txt": b"a caption"}),
        ("bomb", {"png": decompression_bomb(), "txt": b"a caption"}),
        ("empty", {"png": image, "txt": b""}),
        ("whitespace", {"png": image, "txt": b" \n\t "}),
        ("latin1", {"png": image, "txt": "caf\xe9 au lait".encode("latin-1")}),
        ("badjson", {"png": image, "json": b'{"caption": "unterminated'}),
        *good_samples("g", 3, start=3),
    ])
    full = write_shard(folder / "001.tar", good_samples("g", 4, start=6)).read_bytes()
    # cut the shard inside its last member's data: the 3 complete samples before it are kept
    last_png = full.rindex(b"g009.png")
    (folder / "001.tar").write_bytes(full[: last_png + 512 + 40])
    return folder


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "streaming"])
def test_every_bad_sample_member_and_shard_is_skipped_and_counted(bad_shards, tmp_path, streaming, caplog):
    sources = [f"{bad_shards}/{{000..002}}.tar", f"pipe:cat {bad_shards}/000.tar > /dev/null; exit 3"]
    counter = SkipCounter()
    with caplog.at_level("WARNING"):
        rows, counter = prepared_list(sources[0], streaming, counter, cache_dir=tmp_path / "c")
        raw = load_image_text_dataset(sources[1], streaming=streaming, cache_dir=tmp_path / "c2")
        prepared = prepare_dataset(raw, transform(), counter, shuffle_buffer=0, max_skip_fraction=None)
        if streaming:
            assert list(prepared) == []
        else:  # a map-style dataset of nothing but one failed shard is broken, after counting it
            with pytest.raises(RuntimeError, match="looks broken"):
                prepared[0]
    good = {f"g caption {i}" for i in range(9)}
    texts = [r["text"] for r in rows]
    if streaming:
        assert sorted(texts) == sorted(good)
    else:  # map-style keeps its length: each bad row is replaced by the next usable one
        assert set(texts) == good
    assert counter.counts() == {**dict.fromkeys(SKIP_REASONS, 0), **BAD_WEBDATASET}
    logged = caplog.text
    for name in ("000.tar:zero-bytes", "000.tar:bomb", "000.tar:latin1", "000.tar:badjson", "001.tar:g009",
                 "002.tar", "exit 3"):
        assert name in logged, name  # the first skips are logged with shard and key


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "streaming"])
def test_non_utf8_and_invalid_json_metadata_lines_are_counted(tmp_path, streaming):
    folder = tmp_path / "folder"
    folder.mkdir()
    lines = []
    for i in range(3):
        random_image(SIZE, seed=i).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "caption": f"caption {i}"}).encode())
    lines.insert(1, b'{"file_name": "0.png", "caption": "caf\xe9"}')
    lines.insert(2, b'{"file_name": "1.png", "caption": ')
    (folder / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    rows, counter = prepared_list(str(folder), streaming, cache_dir=tmp_path / "c")
    assert {r["text"] for r in rows} == {"caption 0", "caption 1", "caption 2"}
    assert counter.counts()["bad_text_encoding"] == 1 and counter.counts()["bad_json"] == 1


def test_a_mostly_bad_source_stops_the_run_naming_its_worst_shard(tmp_path):
    folder = tmp_path / "mostly_bad"
    folder.mkdir()
    write_shard(folder / "good.tar", good_samples("g", 10))
    write_shard(folder / "bad.tar", [(f"b{i}", {"png": b"junk", "txt": b"x"}) for i in range(10)])
    raw = load_image_text_dataset(f"{folder}/{{good,bad}}.tar", streaming=True)
    prepared = prepare_dataset(raw, transform(), SkipCounter(), shuffle_buffer=0, max_skip_fraction=0.3,
                               skip_window=10)
    with pytest.raises(TooManySkips, match=r"bad\.tar \(\d+\)"):
        list(prepared)


# ------------------------------------------------------------------------------------------ augmentation


def test_augmentation_depends_on_seed_epoch_and_index_only(tmp_path, monkeypatch):
    """Same (seed, epoch, index): the same crop/flip/jitter, whatever the global RNG and the number of workers;
    and preparing a sample touches no generator of the run: the CPU one is restored, no GPU one is reseeded
    (torch.manual_seed reseeded every CUDA generator: the model's dropout on GPU followed the last sample)."""
    folder = tmp_path / "aug"
    folder.mkdir()
    write_shard(folder / "000.tar", good_samples("a", 8))
    raw = load_image_text_dataset(str(folder), cache_dir=tmp_path / "c")
    dataset = prepare_dataset(raw, transform(), SkipCounter(), seed=5)
    torch.manual_seed(1)
    first = dataset[3]["pixel_values"]
    torch.manual_seed(2)
    torch.rand(100)
    assert torch.equal(dataset[3]["pixel_values"], first)
    dataset.set_epoch(1)
    assert not torch.equal(dataset[3]["pixel_values"], first)
    dataset.set_epoch(0)
    batches = {}
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=workers,
                                             collate_fn=lambda s: torch.stack([x["pixel_values"] for x in s]))
        batches[workers] = torch.cat(list(loader))
    assert torch.equal(batches[0], batches[2]) and torch.equal(batches[0][3], first)
    cuda_seeds = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", cuda_seeds.append)
    cpu_state = torch.random.get_rng_state()
    dataset[5]
    assert not cuda_seeds and torch.equal(torch.random.get_rng_state(), cpu_state)


# ------------------------------------------------------------------------------------------ streaming


def test_a_stream_resumes_from_its_state_without_decoding_consumed_samples(bad_shards, tmp_path):
    """A stream stopped after 57 samples (pass 1, mid-block) and resumed from its state_dict gives exactly the
    samples and augmentations of an uninterrupted stream, and decodes only what comes after the stop."""

    def stream():
        raw = load_image_text_dataset(f"{bad_shards}/{{000..001}}.tar", streaming=True)
        return prepare_dataset(raw, transform(), SkipCounter(), shuffle_buffer=4, seed=3, repeat=True,
                               max_skip_fraction=None)

    uninterrupted = stream()
    reference = list(itertools.islice(iter(uninterrupted), 80))
    first = stream()
    head = list(itertools.islice(iter(first), 57))
    state = first.state_dict()
    assert state["pass"] >= 1 and sum(state["skipped"].values()) > 0
    resumed = stream()
    resumed.load_state_dict(state)
    tail = list(itertools.islice(iter(resumed), 23))
    for expected, got in zip(reference, head + tail, strict=True):
        assert expected["text"] == got["text"]
        assert torch.equal(expected["pixel_values"], got["pixel_values"])
    # only what comes after the stop is decoded (bad images included: decoding is how they are found)
    assert resumed.preparer.decoded == uninterrupted.preparer.decoded - first.preparer.decoded < 40
    assert all(resumed.preparer.skipped[k] >= v for k, v in state["skipped"].items())


@pytest.mark.parametrize("streaming", [True, False], ids=["streaming", "map"])
def test_stateful_dataloader_workers_resume_exactly_with_the_delivered_skip_counts(bad_shards, tmp_path,
                                                                                    streaming):
    """2 DataLoader workers, stopped after 2 batches and resumed from the DataLoader's state: the same batches as
    an uninterrupted run, and skip counts (summed over the workers' states) that end equal to its counts."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    from hf_vlm.data.resume import delivered_skips

    def loader():
        raw = load_image_text_dataset(f"{bad_shards}/{{000..001}}.tar", streaming=streaming,
                                      cache_dir=tmp_path / "cache")
        data = prepare_dataset(raw, transform(), SkipCounter(), shuffle_buffer=4, seed=3, repeat=streaming,
                               max_skip_fraction=None)
        return StatefulDataLoader(data, batch_size=3, num_workers=2, collate_fn=lambda s: [x["text"] for x in s],
                                  **({} if streaming else {"shuffle": True,
                                                           "generator": torch.Generator().manual_seed(5)}))

    steps = 12 if streaming else 4  # map-style: 4 batches of the first epoch
    uninterrupted = loader()
    iterator = iter(uninterrupted)
    reference = [next(iterator) for _ in range(steps)]
    reference_skips = delivered_skips(uninterrupted.state_dict())
    del iterator
    first = loader()
    iterator = iter(first)
    head = [next(iterator) for _ in range(2)]
    state = first.state_dict()
    del iterator
    resumed = loader()
    resumed.load_state_dict(state)
    iterator = iter(resumed)
    tail = [next(iterator) for _ in range(steps - 2)]
    assert head + tail == reference
    assert sum(reference_skips.values()) > sum(delivered_skips(state).values()) > 0
    assert delivered_skips(resumed.state_dict()) == reference_skips


@pytest.mark.parametrize("shards", [4, 3], ids=["whole-shards", "uneven"])
def test_each_rank_reads_its_own_part_of_the_stream(tmp_path, t5_tokenizer_dir, shards, monkeypatch):
    """Ranks 0 and 1 (RANK and WORLD_SIZE as a launcher sets them; read when the data is built) read disjoint samples
    that together cover the data, with shards that divide evenly (each rank reads whole shards) and that do not (every
    other sample). Built in this process, once per rank: a subprocess per rank spent 15 s importing."""
    from transformers import AutoTokenizer

    folder = tmp_path / "split"
    folder.mkdir()
    for i in range(shards):
        write_shard(folder / f"{i:03d}.tar", good_samples(f"s{i}-", 6))
    seen = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        data = build_training_data("coca", f"{folder}/*.tar", image_transform=build_image_transform("coca", image_size=16),
                                   tokenizer=AutoTokenizer.from_pretrained(t5_tokenizer_dir), streaming=True,
                                   repeat=False, shuffle_buffer=4, seed=0)
        seen.append([s["text"] for s in data.dataset])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(f"s{i}- caption {j}" for i in range(shards) for j in range(6))
    assert abs(len(seen[0]) - len(seen[1])) <= 6


def test_training_data_split_by_node_keeps_an_endless_stream_for_every_rank(tmp_path, t5_tokenizer_dir,
                                                                             monkeypatch):
    """A rank whose shards run out keeps producing batches (pass after pass), so the other rank never waits."""
    from transformers import AutoTokenizer

    folder = tmp_path / "uneven"
    folder.mkdir()
    write_shard(folder / "000.tar", good_samples("a", 6))
    write_shard(folder / "001.tar", good_samples("b", 2))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    data = build_training_data("coca", f"{folder}/*.tar", image_transform=transform(),
                               tokenizer=AutoTokenizer.from_pretrained(t5_tokenizer_dir), streaming=True,
                               shuffle_buffer=0)  # unshuffled: the shard assignment stays the same every pass
    texts = [s["text"] for s in itertools.islice(iter(data.dataset), 20)]
    assert len(texts) == 20
    assert set(texts[:2]) == {"b caption 0", "b caption 1"}  # the first pass: this rank's shard only


def test_a_pipe_command_that_fails_after_writing_its_shard_is_counted(tmp_path):
    """The samples it wrote are kept; its exit status still counts the shard as unreadable (not lost by tarfile
    stopping at the end-of-archive blocks), and reading only its first sample (the column check) kills it quietly."""
    from hf_vlm.data.shards import first_sample_fields

    shard = write_shard(tmp_path / "000.tar", good_samples("p", 2))
    with open(shard, "ab") as padded:  # more end padding than tarfile reads after the end-of-archive blocks
        padded.write(bytes(200_000))
    command = f"pipe:cat {shard}; exit 3"
    rows = list(load_image_text_dataset(command, streaming=True))
    assert [r["text"] for r in rows[:2]] == ["p caption 0", "p caption 1"] and len(rows) == 3
    assert rows[2]["__error__"].startswith("unreadable_shard\t") and "exited with 3" in rows[2]["__error__"]
    assert first_sample_fields("webdataset", [command]) == (f"{command}:p000", ["png", "txt"])


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "streaming"])
def test_parquet_vqav2_answer_dicts_and_caption_lists_become_canonical_columns(tmp_path, streaming):
    """VQAv2's answers ([{"answer": ...}]) and a list of captions read from parquet as from webdataset .json."""
    import datasets

    image = {"bytes": _png(random_image(SIZE)), "path": "x.png"}
    vqa = tmp_path / "vqa.parquet"
    datasets.Dataset.from_dict({"image": [image], "question": ["what color?"],
                                "answers": [[{"answer": "red", "answer_confidence": "yes"}, {"answer": "blue",
                                                                                             "answer_confidence": "no"}]]}
                               ).to_parquet(str(vqa))
    rows = list(load_image_text_dataset(str(vqa), task="vqa", streaming=streaming, cache_dir=tmp_path / "c"))
    assert rows[0]["answers"] == ["red", "blue"] and rows[0]["question"] == "what color?"
    captions = tmp_path / "captions.parquet"
    datasets.Dataset.from_dict({"image": [image], "caption": [["", "a red circle", "a circle"]]}).to_parquet(
        str(captions))
    rows = list(load_image_text_dataset(str(captions), streaming=streaming, cache_dir=tmp_path / "c"))
    assert rows[0]["text"] == "a red circle"
