"""The conversion machinery on its own: streaming readers, the sharded safetensors writer, key
accounting, shape checks and atomic output. Formats (CoCa, BLIP-2) are tested in their own files.

The end-to-end target is a tiny transformers GPT-2 whose "upstream" checkpoint is a renamed layout
with separate q/k/v tensors, a `module.` prefix, a tied head and a training counter, so renames,
a many-to-one transform, tied weights and the drop list all take part.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hf_vlm.conversion.core import (
    Drop,
    KeyMismatchError,
    Rule,
    ShapeMismatchError,
    account_keys,
    build_meta_model,
    check_shapes,
    convert_checkpoint,
    rename,
    rules_from_table,
    target_specs,
)
from hf_vlm.conversion.errors import CheckpointError, ConversionError, OutputExistsError
from hf_vlm.conversion.reader import PickleReader, open_checkpoint
from hf_vlm.conversion.writer import (
    SAFE_WEIGHTS_INDEX_NAME,
    ShardedSafetensorsWriter,
    TensorSpec,
    atomic_output_dir,
    parse_size,
    plan_shards,
)

# --------------------------------------------------------------------------------------------------
# a tiny GPT-2 and its checkpoint in an "upstream" layout


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=16,
                        bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval()


UPSTREAM_TABLE = [  # upstream key -> transformers GPT-2 key
    (r"module\.embed\.weight", r"transformer.wte.weight"),
    (r"module\.pos\.weight", r"transformer.wpe.weight"),
    (r"module\.blocks\.(\d+)\.norm1\.(weight|bias)", r"transformer.h.\1.ln_1.\2"),
    (r"module\.blocks\.(\d+)\.norm2\.(weight|bias)", r"transformer.h.\1.ln_2.\2"),
    (r"module\.blocks\.(\d+)\.proj\.(weight|bias)", r"transformer.h.\1.attn.c_proj.\2"),
    (r"module\.blocks\.(\d+)\.fc1\.(weight|bias)", r"transformer.h.\1.mlp.c_fc.\2"),
    (r"module\.blocks\.(\d+)\.fc2\.(weight|bias)", r"transformer.h.\1.mlp.c_proj.\2"),
    (r"module\.norm\.(weight|bias)", r"transformer.ln_f.\1"),
]
UPSTREAM_DROPS = [
    Drop(r"module\.head\.weight", "the LM head is tied to the token embedding"),
    Drop(r"module\.step", "training step counter, not a weight"),
]


def upstream_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's weights as the imaginary upstream code names them: q/k/v separate (GPT-2's Conv1D
    keeps them fused along dim 1 of the weight, dim 0 of the bias)."""
    ours = model.state_dict()
    inverse = {}
    n_layer = model.config.n_layer
    inverse["module.embed.weight"] = ours["transformer.wte.weight"]
    inverse["module.pos.weight"] = ours["transformer.wpe.weight"]
    for i in range(n_layer):
        h = f"transformer.h.{i}"
        for name, ln in (("norm1", "ln_1"), ("norm2", "ln_2")):
            for p in ("weight", "bias"):
                inverse[f"module.blocks.{i}.{name}.{p}"] = ours[f"{h}.{ln}.{p}"]
        q, k, v = ours[f"{h}.attn.c_attn.weight"].chunk(3, dim=1)
        qb, kb, vb = ours[f"{h}.attn.c_attn.bias"].chunk(3, dim=0)
        for name, w, b in (("q", q, qb), ("k", k, kb), ("v", v, vb)):
            inverse[f"module.blocks.{i}.attn.{name}.weight"] = w.contiguous()
            inverse[f"module.blocks.{i}.attn.{name}.bias"] = b.contiguous()
        for name, ours_name in (("proj", "attn.c_proj"), ("fc1", "mlp.c_fc"), ("fc2", "mlp.c_proj")):
            for p in ("weight", "bias"):
                inverse[f"module.blocks.{i}.{name}.{p}"] = ours[f"{h}.{ours_name}.{p}"]
    inverse["module.norm.weight"] = ours["transformer.ln_f.weight"]
    inverse["module.norm.bias"] = ours["transformer.ln_f.bias"]
    inverse["module.head.weight"] = ours["lm_head.weight"]
    inverse["module.step"] = torch.tensor(1000)
    return {k: v.detach().clone().contiguous() for k, v in inverse.items()}


def upstream_rules(source_keys) -> list[Rule]:
    rules = rules_from_table(source_keys, UPSTREAM_TABLE)
    layers = sorted({int(k.split(".")[2]) for k in source_keys if k.startswith("module.blocks.")})
    for i in layers:
        for p, dim in (("weight", 1), ("bias", 0)):
            rules.append(Rule(
                tuple(f"module.blocks.{i}.attn.{n}.{p}" for n in "qkv"),
                (f"transformer.h.{i}.attn.c_attn.{p}",),
                lambda q, k, v, dim=dim: torch.cat([q, k, v], dim=dim),
            ))
    return rules


def convert_upstream(source, output, **kwargs):
    """The whole pipeline a format module runs: reader -> rules/drops -> meta model -> output folder."""
    model = tiny_gpt2()
    reader = open_checkpoint(source)
    meta = build_meta_model(type(model), model.config)
    return convert_checkpoint(reader, upstream_rules(reader.keys()), UPSTREAM_DROPS, meta, output,
                              progress=False, **kwargs)


@pytest.fixture
def upstream_file(tmp_path):
    path = tmp_path / "upstream.safetensors"
    save_file(upstream_state_dict(tiny_gpt2()), str(path))
    return path


# --------------------------------------------------------------------------------------------------
# readers


def test_safetensors_reader_gives_names_shapes_dtypes_lazily_and_exact_tensors(tmp_path):
    tensors = {"a.weight": torch.randn(3, 4), "b": torch.arange(5), "c": torch.randn(2).to(torch.bfloat16)}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    reader = open_checkpoint(tmp_path / "x.safetensors")
    assert sorted(reader.keys()) == sorted(tensors)
    assert reader.shape("a.weight") == (3, 4) and reader.dtype("c") == torch.bfloat16
    for key, tensor in tensors.items():
        assert torch.equal(reader.get(key), tensor)


def test_pickle_reader_unwraps_training_checkpoints_and_reports_non_tensor_entries(tmp_path):
    state = {"visual.proj": torch.randn(4, 2), "logit_scale": torch.tensor(2.0)}
    torch.save({"epoch": 3, "state_dict": state, "name": "run-1"}, tmp_path / "epoch_3.pt")
    reader = open_checkpoint(tmp_path / "epoch_3.pt")
    assert isinstance(reader, PickleReader) and reader.wrapper_key == "state_dict"
    assert sorted(reader.keys()) == ["logit_scale", "visual.proj"]
    assert torch.equal(reader.get("visual.proj"), state["visual.proj"])
    # A flat state dict with a stray counter: the tensors are read, the counter is reported, not hidden.
    torch.save({"w": torch.ones(2), "step": 7}, tmp_path / "flat.bin")
    flat = open_checkpoint(tmp_path / "flat.bin")
    assert flat.keys() == ["w"] and flat.skipped == ["step"]


class _Exploit:
    """Unpickling this would run code (here: create a file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_reader_never_unpickles_arbitrary_objects(tmp_path):
    marker = tmp_path / "code-was-run"
    torch.save({"w": torch.ones(2), "payload": _Exploit(str(marker))}, tmp_path / "evil.bin")
    with pytest.raises(CheckpointError, match=r"evil\.bin is not a plain weights file"):
        open_checkpoint(tmp_path / "evil.bin")
    assert not marker.exists()


def test_pickle_reader_hands_converted_pages_back_and_still_reads_correct_values(tmp_path):
    tensor = torch.randn(512, 1024)  # 2 MB: spans many pages
    torch.save({"w": tensor}, tmp_path / "w.bin")
    reader = open_checkpoint(tmp_path / "w.bin")
    assert torch.equal(reader.get("w"), tensor)
    reader.release("w")  # drops the mapped pages; a later read comes from the file again
    assert torch.equal(reader.get("w"), tensor)


def _write_shards(folder, shards: dict[str, dict[str, torch.Tensor]], index_name=SAFE_WEIGHTS_INDEX_NAME):
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for file_name, tensors in shards.items():
        if file_name.endswith(".safetensors"):
            save_file(tensors, str(folder / file_name))
        else:
            torch.save(tensors, folder / file_name)
        weight_map.update({k: file_name for k in tensors})
    (folder / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("suffix,index_name", [(".safetensors", "model.safetensors.index.json"),
                                               (".bin", "pytorch_model.bin.index.json")])
def test_hub_folder_with_index_reads_every_shard(tmp_path, suffix, index_name):
    shards = {f"model-00001-of-00002{suffix}": {"a": torch.randn(2)}, f"model-00002-of-00002{suffix}": {"b": torch.randn(3)}}
    _write_shards(tmp_path / "repo", shards, index_name)
    reader = open_checkpoint(tmp_path / "repo")
    assert sorted(reader.keys()) == ["a", "b"]
    assert torch.equal(reader.get("b"), shards[f"model-00002-of-00002{suffix}"]["b"])
    assert reader.file_of("b").name == f"model-00002-of-00002{suffix}"


def test_hub_folder_prefers_safetensors_and_refuses_to_guess_between_files(tmp_path):
    single = tmp_path / "single"
    single.mkdir()
    save_file({"from_safetensors": torch.ones(1)}, str(single / "open_clip_model.safetensors"))
    torch.save({"from_pickle": torch.ones(1)}, single / "open_clip_pytorch_model.bin")
    (single / "open_clip_config.json").write_text("{}")
    assert open_checkpoint(single).keys() == ["from_safetensors"]

    ambiguous = tmp_path / "ambiguous"
    ambiguous.mkdir()
    torch.save({"a": torch.ones(1)}, ambiguous / "one.bin")
    torch.save({"b": torch.ones(1)}, ambiguous / "two.pt")
    with pytest.raises(CheckpointError, match=r"several weights files.*one\.bin.*two\.pt"):
        open_checkpoint(ambiguous)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        open_checkpoint(empty)


def test_index_that_disagrees_with_its_shards_is_an_error_naming_the_problem(tmp_path):
    _write_shards(tmp_path / "missing", {"model-00001-of-00002.safetensors": {"a": torch.ones(1)}})
    index = json.loads((tmp_path / "missing" / SAFE_WEIGHTS_INDEX_NAME).read_text())
    index["weight_map"]["b"] = "model-00002-of-00002.safetensors"
    (tmp_path / "missing" / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"lists shards that do not exist.*model-00002-of-00002"):
        open_checkpoint(tmp_path / "missing")

    _write_shards(tmp_path / "dup", {"s1.safetensors": {"a": torch.ones(1)}, "s2.safetensors": {"a": torch.ones(1), "b": torch.ones(1)}})
    index = {"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}  # s2 holds a second 'a'
    (tmp_path / "dup" / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"'a' is in two files.*s1\.safetensors.*s2\.safetensors"):
        open_checkpoint(tmp_path / "dup")


def test_missing_wrong_format_and_truncated_files_are_errors_naming_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"not found: .*nothing\.bin"):
        open_checkpoint(tmp_path / "nothing.bin")

    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes\.txt is not a checkpoint"):
        open_checkpoint(tmp_path / "notes.txt")
    (tmp_path / "fake.safetensors").write_text("not safetensors at all")
    with pytest.raises(CheckpointError, match=r"fake\.safetensors is not a readable safetensors file"):
        open_checkpoint(tmp_path / "fake.safetensors")

    save_file({"w": torch.randn(256, 256)}, str(tmp_path / "full.safetensors"))
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors is not a readable safetensors file"):
        open_checkpoint(tmp_path / "cut.safetensors")

    torch.save({"w": torch.randn(256, 256)}, tmp_path / "full.bin")
    data = (tmp_path / "full.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.bin is not a torch\.save checkpoint in the zip format"):
        open_checkpoint(tmp_path / "cut.bin")

    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"legacy\.pth .*legacy non-zip pickle"):
        open_checkpoint(tmp_path / "legacy.pth")


def test_unknown_extension_is_recognised_by_content(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "weights.data")
    assert open_checkpoint(tmp_path / "weights.data").keys() == ["w"]
    save_file({"v": torch.ones(2)}, str(tmp_path / "weights.raw"))
    assert open_checkpoint(tmp_path / "weights.raw").keys() == ["v"]


# --------------------------------------------------------------------------------------------------
# writer


def test_parse_size_reads_decimal_and_binary_units():
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("1GiB") == 2**30
    assert parse_size(1234) == 1234
    for bad in ("two gigs", "0", "-1GB"):
        with pytest.raises(ConversionError, match="size"):
            parse_size(bad)


def test_shard_plan_respects_the_maximum_and_gives_an_oversized_tensor_its_own_shard():
    specs = [TensorSpec(f"t{i}", (n,), torch.float32) for i, n in enumerate([10, 10, 10, 100, 5])]
    shards = plan_shards(specs, max_shard_size=80)  # bytes: 40, 40, 40, 400, 20
    assert [[s.name for s in shard] for shard in shards] == [["t0", "t1"], ["t2"], ["t3"], ["t4"]]


def test_streaming_writer_output_reads_back_exactly_with_safetensors_and_index(tmp_path):
    tensors = {
        "embed.weight": torch.randn(64, 16),
        "layer.0.weight": torch.randn(16, 16).to(torch.bfloat16),
        "position_ids": torch.arange(8),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(3.5),
    }
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    writer = ShardedSafetensorsWriter(tmp_path, specs, max_shard_size=1024)
    for key, tensor in tensors.items():
        writer.write(key, tensor)
    writer.close()
    index = json.loads((tmp_path / SAFE_WEIGHTS_INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(s.nbytes for s in specs)
    assert len(set(index["weight_map"].values())) == len(writer.shards) > 1
    for key, tensor in tensors.items():
        with safe_open(str(tmp_path / index["weight_map"][key]), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert torch.equal(f.get_tensor(key), tensor), key


def test_writer_rejects_tensors_out_of_plan(tmp_path):
    specs = [TensorSpec("a", (2,), torch.float32), TensorSpec("b", (3,), torch.float32)]
    writer = ShardedSafetensorsWriter(tmp_path, specs)
    with pytest.raises(ValueError, match="expected 'a'"):
        writer.write("b", torch.zeros(3))
    with pytest.raises(ValueError, match=r"a: got shape \(3,\)"):
        writer.write("a", torch.zeros(3))
    writer.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match=r"never written: \['b'\]"):
        writer.close()


def test_atomic_output_appears_only_on_success_and_never_overwrites_by_accident(tmp_path):
    output = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output_dir(output) as folder:
            (folder / "model.safetensors").write_bytes(b"partial")
            raise RuntimeError("boom")
    assert not output.exists() and list(tmp_path.iterdir()) == []  # temporary folder removed too

    with atomic_output_dir(output) as folder:
        (folder / "config.json").write_text("{}")
    assert (output / "config.json").read_text() == "{}"
    umask = os.umask(0)
    os.umask(umask)
    assert output.stat().st_mode & 0o777 == 0o777 & ~umask  # a normal folder, not mkdtemp's private 0700

    with pytest.raises(OutputExistsError, match="already exists; pass --overwrite"):
        with atomic_output_dir(output):
            pass
    with atomic_output_dir(output, overwrite=True) as folder:
        (folder / "config.json").write_text('{"new": 1}')
    assert (output / "config.json").read_text() == '{"new": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --------------------------------------------------------------------------------------------------
# key accounting and shapes


def test_key_accounting_names_leftover_missing_and_duplicated_keys():
    rules = [rename("a", "A"), rename("b", "B"), rename("c", "B"), rename("ghost", "G")]
    with pytest.raises(KeyMismatchError) as err:
        account_keys(["a", "b", "c", "extra.1", "optimizer.x"], rules, [Drop(r"optimizer\..*", "optimizer state")],
                     ["A", "B", "C"])
    message = str(err.value)
    assert "source keys the mapping needs are not in the checkpoint: ghost" in message
    assert "neither mapped nor on the drop list: extra.1" in message
    assert "produced more than once: B" in message
    assert "do not exist in the target model: G" in message
    assert "have no source: C" in message
    assert "optimizer.x" not in message  # dropped with a reason, not an error


def test_key_accounting_returns_dropped_keys_by_reason():
    dropped = account_keys(["a", "opt.1", "opt.2"], [rename("a", "A")], [Drop(r"opt\.\d", "optimizer state")], ["A"])
    assert dropped == {"optimizer state": ["opt.1", "opt.2"]}


def test_shape_check_names_the_key_and_both_shapes_before_reading_data(upstream_file, tmp_path):
    reader = open_checkpoint(upstream_file)
    model = tiny_gpt2()
    wider = type(model.config)(**{**model.config.to_dict(), "n_embd": 48})
    expected = target_specs(build_meta_model(type(model), wider))
    with pytest.raises(ShapeMismatchError) as err:
        check_shapes(reader, upstream_rules(reader.keys()), expected)
    assert "transformer.wte.weight: converted shape (100, 32) (from module.embed.weight (100, 32)) != model's expected shape (100, 48)" in str(err.value)
    # and the full conversion stops before creating anything
    meta = build_meta_model(type(model), wider)
    with pytest.raises(ShapeMismatchError):
        convert_checkpoint(reader, upstream_rules(reader.keys()), UPSTREAM_DROPS, meta, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_tied_copies_are_not_expected_in_the_checkpoint():
    model = tiny_gpt2()
    specs = target_specs(build_meta_model(type(model), model.config))
    assert "lm_head.weight" not in specs and "transformer.wte.weight" in specs


# --------------------------------------------------------------------------------------------------
# end to end


def test_conversion_writes_a_folder_from_pretrained_loads_with_identical_weights_and_outputs(upstream_file, tmp_path):
    from transformers import AutoModelForCausalLM

    reference = tiny_gpt2()
    summary = convert_upstream(upstream_file, tmp_path / "converted", max_shard_size="20KB")
    assert summary.shards > 1 and summary.dtype == "float32"
    assert summary.tensors == len(target_specs(reference)) == 28
    assert summary.parameters == sum(p.numel() for p in reference.parameters())  # tied head counted once
    assert summary.dropped == {"the LM head is tied to the token embedding": 1, "training step counter, not a weight": 1}
    assert "parameters:  " in str(summary) and "dropped 1 source tensors: training step counter" in str(summary)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "converted").eval()
    for key, tensor in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    ids = torch.tensor([[5, 7, 9, 11]])
    assert torch.equal(loaded(ids).logits, reference(ids).logits)


def test_bfloat16_conversion_stores_bfloat16_and_records_it_in_the_config(upstream_file, tmp_path):
    summary = convert_upstream(upstream_file, tmp_path / "bf16", dtype="bfloat16")
    assert summary.dtype == "bfloat16" and summary.shards == 1
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        assert torch.equal(f.get_tensor("transformer.h.0.attn.c_attn.bias"),
                           tiny_gpt2().state_dict()["transformer.h.0.attn.c_attn.bias"].to(torch.bfloat16))
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_failure_mid_conversion_leaves_no_output(upstream_file, tmp_path):
    reader = open_checkpoint(upstream_file)
    rules = upstream_rules(reader.keys())

    def fail(q, k, v):
        if not q.is_meta:  # passes the shape check, fails on real data half-way through
            raise RuntimeError("disk on fire")
        return torch.cat([q, k, v], dim=1)

    rules = [Rule(r.sources, r.targets, fail) if r.targets == ("transformer.h.1.attn.c_attn.weight",) else r for r in rules]
    model = tiny_gpt2()
    with pytest.raises(RuntimeError, match="disk on fire"):
        convert_checkpoint(reader, rules, UPSTREAM_DROPS, build_meta_model(type(model), model.config),
                           tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["upstream.safetensors"]


def test_existing_output_is_refused_before_any_work_unless_overwrite(upstream_file, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="out already exists"):
        convert_upstream(upstream_file, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").exists()
    convert_upstream(upstream_file, tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "config.json").exists()


def _conversion_interrupted_by(send_signal, upstream_file, output):
    """Run the conversion; half-way through (inside the fused-qkv transform of layer 1, after the
    first shards are written) `send_signal()` is called."""
    reader = open_checkpoint(upstream_file)

    def interrupt(q, k, v):
        if not q.is_meta:
            send_signal()
            time.sleep(30)  # the signal arrives during this sleep
        return torch.cat([q, k, v], dim=1)

    rules = [Rule(r.sources, r.targets, interrupt) if r.targets == ("transformer.h.1.attn.c_attn.weight",) else r
             for r in upstream_rules(reader.keys())]
    model = tiny_gpt2()
    convert_checkpoint(reader, rules, UPSTREAM_DROPS, build_meta_model(type(model), model.config), output,
                       progress=False, max_shard_size="20KB")


@pytest.mark.parametrize("signum,raised", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, SystemExit)])
def test_ctrl_c_or_sigterm_mid_conversion_removes_everything(upstream_file, tmp_path, signum, raised):
    sigterm_handler = signal.getsignal(signal.SIGTERM)
    # Ctrl-C as in a fresh `hf-vlm convert` process: an earlier test in this worker (the Space's server)
    # may have replaced Python's default SIGINT handler.
    sigint_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(raised):
            _conversion_interrupted_by(lambda: os.kill(os.getpid(), signum), upstream_file, tmp_path / "out")
    finally:
        signal.signal(signal.SIGINT, sigint_handler)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["upstream.safetensors"]
    assert signal.getsignal(signal.SIGTERM) is sigterm_handler  # the conversion's handler is gone again


_KILLED_CONVERSION = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from test_conversion_core import _conversion_interrupted_by
    _conversion_interrupted_by(lambda: os.kill(os.getpid(), signal.SIGKILL), {source!r}, {output!r})
""")


def test_sigkill_mid_conversion_leaves_no_output_and_no_loadable_folder(upstream_file, tmp_path):
    """Nothing can clean up after SIGKILL: the hidden temporary folder stays, but OUTPUT does not exist
    and the leftover (no config.json, which is written last) is not a checkpoint to from_pretrained."""
    from transformers import AutoModelForCausalLM

    code = _KILLED_CONVERSION.format(tests=os.path.dirname(__file__), source=str(upstream_file),
                                     output=str(tmp_path / "out"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (tmp_path / "out").exists()
    [leftover] = [p for p in tmp_path.iterdir() if p.name != "upstream.safetensors"]
    assert leftover.name.startswith(".out.incomplete-")
    written = sorted(p.name for p in leftover.iterdir())
    assert written and all(name.endswith(".safetensors") for name in written)  # killed while writing weights
    with pytest.raises((OSError, ValueError)):
        AutoModelForCausalLM.from_pretrained(leftover)


def _convert(upstream_file, output):
    reader = open_checkpoint(upstream_file)
    model = tiny_gpt2()
    return convert_checkpoint(reader, upstream_rules(reader.keys()), UPSTREAM_DROPS,
                              build_meta_model(type(model), model.config), output, progress=False)


def test_a_rerun_removes_what_a_killed_conversion_left_and_names_it(upstream_file, tmp_path, capsys):
    """Issue 16.12: the hidden folder a SIGKILLed conversion leaves (gigabytes at full size) is removed by the next
    conversion to the same OUTPUT, which names it; a folder whose process still runs is left alone."""
    code = _KILLED_CONVERSION.format(tests=os.path.dirname(__file__), source=str(upstream_file),
                                     output=str(tmp_path / "out"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    [killed] = [p for p in tmp_path.iterdir() if p.name.startswith(".out.incomplete-")]
    running = tmp_path / f".out.incomplete-{socket.gethostname()}-{os.getpid()}-abc123"  # this process: alive
    running.mkdir()
    _convert(upstream_file, tmp_path / "out")
    err = capsys.readouterr().err
    assert f"removed {killed}" in err and "interrupted conversion" in err and not killed.exists()
    assert f"{running} belongs to a conversion that is still running" in err and running.exists()
    assert (tmp_path / "out" / "config.json").is_file()


def test_an_unwritable_output_folder_is_a_one_line_error(upstream_file, tmp_path, monkeypatch, capsys):
    """Issue 16.12: a read-only OUTPUT parent gave a raw PermissionError traceback; now `hf-vlm convert` prints one
    line naming the folder (as root, permissions do not stop us: the operating system's refusal is simulated)."""
    import tempfile

    from hf_vlm.conversion import writer

    def refuse(*args, dir=None, **kwargs):
        raise PermissionError(13, "Permission denied", str(dir))

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with pytest.raises(ConversionError, match=f"cannot write {tmp_path / 'out'}: Permission denied \\({tmp_path}\\)"):
        _convert(upstream_file, tmp_path / "out")
    monkeypatch.setattr(writer.os, "access", lambda path, mode: False)
    with pytest.raises(ConversionError, match=f"{tmp_path} is not writable"):
        writer.check_output(tmp_path / "new" / "out", overwrite=False)
