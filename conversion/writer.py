"""Streaming sharded safetensors writer and the atomic output folder every converter writes into.

The names, shapes and dtypes of all output tensors are known before any data is read (from the
target model built on the meta device), so each shard's safetensors header is written first and the
tensors follow one at a time, straight from the converter to the file: peak memory is about one
tensor, not one shard and never the model. The layout is transformers' own: `model.safetensors`, or
`model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json`.

`atomic_output_dir` gives a hidden temporary folder next to OUTPUT and renames it to OUTPUT only when
everything (weights, config, processor) is written, so a crash, Ctrl-C or SIGTERM leaves no OUTPUT.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from hf_vlm.conversion.errors import ConversionError, OutputExistsError

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "2GB"

_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "2GB" (10^9, as transformers counts) or "512MiB"."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(size), flags=re.IGNORECASE)
        if not match:
            raise ConversionError(f"not a size: {size!r} (examples: 2GB, 500MB, 1GiB, 1000000)")
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])
    if value <= 0:
        raise ConversionError(f"a shard size must be positive, got {size!r}")
    return value


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def plan_shards(specs: list[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """Consecutive groups of at most `max_shard_size` bytes; a larger tensor gets a shard of its own."""
    shards: list[list[TensorSpec]] = []
    current, size = [], 0
    for spec in specs:
        if current and size + spec.nbytes > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += spec.nbytes
    if current:
        shards.append(current)
    return shards


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return [SAFE_WEIGHTS_NAME]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _header(shard: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    entries: dict = {"__metadata__": metadata}
    offset = 0
    for spec in shard:
        if spec.dtype not in _DTYPE_NAMES:
            raise ValueError(f"{spec.name}: dtype {spec.dtype} cannot be stored in safetensors")
        entries[spec.name] = {"dtype": _DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                              "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format pads the header to 8 bytes with spaces
    return len(header).to_bytes(8, "little") + header


class ShardedSafetensorsWriter:
    """Writes the tensors of `specs`, in that order, one `write()` call each, into sharded safetensors.

    The shard plan and every header are fixed up front; `write` checks each tensor against its spec
    (name, shape, dtype), so the files always match the index."""

    def __init__(self, folder: str | Path, specs: list[TensorSpec], max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                 metadata: dict[str, str] | None = None, fsync: bool = True):
        self.folder = Path(folder)
        self.fsync = fsync  # on disk before the atomic rename, so a power loss cannot leave a complete-looking folder
        self.shards = plan_shards(list(specs), parse_size(max_shard_size))
        self.file_names = shard_file_names(len(self.shards))
        self.metadata = {"format": "pt", **(metadata or {})}  # transformers requires format=pt
        self._queue = [(i, spec) for i, shard in enumerate(self.shards) for spec in shard]
        self._position = 0
        self._file = None
        self._open_shard = -1
        self.bytes_written = 0

    @property
    def specs(self) -> list[TensorSpec]:
        return [spec for _, spec in self._queue]

    def expected_next(self) -> str | None:
        return self._queue[self._position][1].name if self._position < len(self._queue) else None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._position >= len(self._queue):
            raise ValueError(f"unexpected tensor {name!r}: every planned tensor is already written")
        shard_index, spec = self._queue[self._position]
        if name != spec.name:
            raise ValueError(f"tensors must come in plan order: got {name!r}, expected {spec.name!r}")
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(
                f"{name}: got shape {tuple(tensor.shape)} {tensor.dtype}, planned {spec.shape} {spec.dtype}"
            )
        if shard_index != self._open_shard:
            self._close_file()
            self._file = open(self.folder / self.file_names[shard_index], "wb")
            self._file.write(_header(self.shards[shard_index], self.metadata))
            self._open_shard = shard_index
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            # Raw little-endian bytes through the buffer protocol, no extra copy.
            self._file.write(memoryview(data.view(torch.uint8).numpy()))
        self.bytes_written += spec.nbytes
        self._position += 1
        if self._position == len(self._queue) or self._queue[self._position][0] != shard_index:
            self._close_file()

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            if self.fsync:
                os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def close(self) -> None:
        """Finish: every planned tensor must have been written; writes the index for several shards."""
        self._close_file()
        if self._position != len(self._queue):
            missing = [spec.name for _, spec in self._queue[self._position:]]
            raise ValueError(f"{len(missing)} planned tensors were never written: {missing[:10]}")
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in self.specs)},
                "weight_map": {spec.name: self.file_names[i] for i, spec in self._queue},
            }
            (self.folder / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# --------------------------------------------------------------------------------------------------
# atomic output folder


def check_output(output: str | Path, overwrite: bool) -> Path:
    """Fail early (before any reading) when OUTPUT exists and --overwrite was not given, or when its folder cannot be
    written."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise OutputExistsError(f"{output} already exists; pass --overwrite (overwrite=True) to replace it")
    if output.exists() and not output.is_dir():
        raise OutputExistsError(f"{output} exists and is not a folder")
    parent = output.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConversionError(f"cannot write {output}: {parent} is not writable")
    return output


def _incomplete_prefix(output: Path) -> str:
    return f".{output.name}.incomplete-"


def remove_leftovers(output: Path) -> list[Path]:
    """Remove the temporary folders of earlier conversions to `output` that were killed (SIGKILL, power loss) before
    they could clean up; each is named on stderr with its size. A folder whose process still runs on this machine is
    left alone (and named). Their names carry the host and the process id that wrote them."""
    import socket
    import sys

    removed = []
    host = socket.gethostname()
    for leftover in sorted(output.parent.glob(_incomplete_prefix(output) + "*")):
        owner = leftover.name[len(_incomplete_prefix(output)):]  # HOST-PID-random (mkdtemp's random has no "-")
        size = sum(f.stat().st_size for f in leftover.rglob("*") if f.is_file())
        if owner.startswith(host + "-"):
            pid = owner[len(host) + 1:].split("-")[0]
            if pid.isdigit() and _process_alive(int(pid)):
                print(f"hf-vlm convert: {leftover} belongs to a conversion that is still running (pid {pid}); "
                      "left alone", file=sys.stderr)
                continue
        elif "-" in owner:
            print(f"hf-vlm convert: {leftover} ({size / 2**20:.1f} MiB) was written on another machine "
                  f"({owner.rsplit('-', 2)[0]}); delete it once no conversion there writes it", file=sys.stderr)
            continue
        shutil.rmtree(leftover, ignore_errors=True)
        print(f"hf-vlm convert: removed {leftover} ({size / 2**20:.1f} MiB), left by an interrupted conversion",
              file=sys.stderr)
        removed.append(leftover)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@contextlib.contextmanager
def _sigterm_as_exception():
    """Turn SIGTERM into SystemExit while converting, so the temporary folder is removed as on Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def atomic_output_dir(output: str | Path, overwrite: bool = False):
    """Yield a temporary folder next to `output`; on success it becomes `output` in one rename.

    On any exception (Ctrl-C and SIGTERM included) the temporary folder is deleted and `output` is
    untouched. Its hidden `.NAME.incomplete-*` name and its missing config.json (written last) keep a
    folder left by SIGKILL from ever being mistaken for a checkpoint."""
    import socket

    output = check_output(output, overwrite).absolute()
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(output)
        # host and pid in the name: a later run can tell a killed conversion's folder from a running one's
        prefix = f"{_incomplete_prefix(output)}{socket.gethostname()}-{os.getpid()}-"
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=output.parent))
    except OSError as err:  # a read-only or full file system, a folder of another user
        raise ConversionError(f"cannot write {output}: {err.strerror or err} ({err.filename or output.parent})") from err
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's private 0700 would otherwise become OUTPUT's mode
    try:
        with _sigterm_as_exception():
            yield tmp
            if output.exists():  # --overwrite: move the old one aside, rename, then delete it
                old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
                os.replace(output, old / output.name)
                os.replace(tmp, output)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
