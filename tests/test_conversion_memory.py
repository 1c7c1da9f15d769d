"""Peak memory of a conversion stays near one output shard, not the model.

A generated checkpoint is converted in a fresh interpreter whose peak resident memory (VmHWM: it
counts the memory-mapped pages a reader touches) is compared with the peak it had after its imports.
Two inputs, each far larger than 1.5 output shards, so a reader that kept what it read would fail:
a 2 GiB Hub folder of two 1 GiB safetensors shards (converted to bfloat16), and a 512 MiB torch zip
pickle read with mmap (float32), the case where touched pages would otherwise pile up.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from hf_vlm.conversion.writer import ShardedSafetensorsWriter, TensorSpec, parse_size

WIDTH = 4096  # one tensor = 4096 x 4096 float32 = 64 MiB
OUTPUT_SHARD = "128MiB"

_CONVERT_AND_MEASURE = textwrap.dedent("""
    import json, os, sys
    import torch
    from torch import nn
    import safetensors.torch, tqdm.auto  # everything the conversion imports, before the baseline
    from hf_vlm.conversion.core import convert_checkpoint, rules_from_table
    from hf_vlm.conversion.reader import open_checkpoint

    def peak_rss():
        # VmHWM, in bytes. Not getrusage's ru_maxrss: Linux carries that across exec from the parent.
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

    source, output, layers, width, shard, dtype = sys.argv[1:]
    layers, width = int(layers), int(width)

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(layers))

    with torch.device("meta"):
        model = Stack()
    baseline = peak_rss()
    reader = open_checkpoint(source)
    rules = rules_from_table(reader.keys(), [(r"layers\\.(\\d+)\\.weight", r"blocks.\\1.weight")])
    summary = convert_checkpoint(reader, rules, [], model, output, dtype=dtype, max_shard_size=shard, progress=False)
    shards = [os.path.getsize(os.path.join(output, f)) for f in os.listdir(output) if f.endswith(".safetensors")]
    print(json.dumps({"baseline": baseline, "peak": peak_rss(), "largest_shard": max(shards),
                      "shards": summary.shards, "output_bytes": summary.output_bytes}))
""")


def _layer(i: int) -> torch.Tensor:
    return torch.full((WIDTH, WIDTH), float(i))


def _write_safetensors_folder(folder, layers: int, shard_size: str) -> None:
    """Streamed with our writer (no fsync: scratch data), so generating costs one tensor of memory."""
    folder.mkdir()
    specs = [TensorSpec(f"layers.{i}.weight", (WIDTH, WIDTH), torch.float32) for i in range(layers)]
    writer = ShardedSafetensorsWriter(folder, specs, shard_size, fsync=False)
    for i, spec in enumerate(specs):
        writer.write(spec.name, _layer(i))
    writer.close()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc (Linux)")
def test_peak_memory_stays_within_one_and_a_half_output_shards(tmp_path):
    disk = shutil.disk_usage(tmp_path)
    assert disk.free > 6e9, f"this test needs ~4 GB of free disk in {tmp_path}, found {disk.free / 1e9:.1f} GB"
    cases = {  # name: (source, layers, output dtype, input bytes)
        "safetensors": (tmp_path / "hub-folder", 32, "bfloat16"),
        "pickle": (tmp_path / "weights.bin", 8, "float32"),
    }
    _write_safetensors_folder(cases["safetensors"][0], 32, "1GiB")  # 2 shards of 16 x 64 MiB
    torch.save({f"layers.{i}.weight": _layer(i) for i in range(8)}, cases["pickle"][0])

    procs = {  # both at once: each interpreter spends most of its time importing
        name: subprocess.Popen(
            [sys.executable, "-c", _CONVERT_AND_MEASURE, str(source), str(tmp_path / f"out-{name}"),
             str(layers), str(WIDTH), OUTPUT_SHARD, dtype],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, (source, layers, dtype) in cases.items()
    }
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr
        measured = json.loads(stdout.strip().splitlines()[-1])
        source, layers, dtype = cases[name]
        files = list(source.iterdir()) if source.is_dir() else [source]
        largest_input = max(p.stat().st_size for p in files)
        growth = measured["peak"] - measured["baseline"]
        print(f"\n{name}: input {sum(p.stat().st_size for p in files) / 2**20:.0f} MiB (largest file "
              f"{largest_input / 2**20:.0f} MiB) -> {measured['shards']} {dtype} shards, largest "
              f"{measured['largest_shard'] / 2**20:.0f} MiB; peak RSS growth {growth / 2**20:.0f} MiB "
              f"(baseline {measured['baseline'] / 2**20:.0f} MiB)")
        assert measured["largest_shard"] <= parse_size(OUTPUT_SHARD) + 4096 and measured["shards"] >= 4  # + header
        assert largest_input > 3 * measured["largest_shard"]  # a reader that kept what it read would fail
        assert growth <= 1.5 * measured["largest_shard"], (name, measured)

        output = tmp_path / f"out-{name}"
        index = json.loads((output / "model.safetensors.index.json").read_text())
        from safetensors import safe_open

        for i in (0, layers - 1):  # the first and last layer arrived, with their values, in the chosen dtype
            key = f"blocks.{i}.weight"
            with safe_open(str(output / index["weight_map"][key]), "pt") as f:
                block = f.get_slice(key)[:2, :2]
            assert block.dtype == getattr(torch, dtype) and torch.equal(block.float(), torch.full((2, 2), float(i)))
        shutil.rmtree(output)
