"""Streaming readers for upstream checkpoints: one tensor at a time, never the whole model in memory.

`open_checkpoint(path)` accepts
- a `.safetensors` file: read lazily with `safe_open`, which is re-opened for every tensor so the
  memory map never accumulates pages of tensors already converted;
- a pickle (`.bin`, `.pt`, `.pth`, `.ckpt`) in torch's zip format: `torch.load(weights_only=True,
  mmap=True)`, so no arbitrary Python object is ever unpickled and no tensor is read before it is
  asked for; `release(key)` hands a converted tensor's pages back to the kernel;
- a Hub-style folder: an index json (`*.safetensors.index.json` / `*.bin.index.json`) plus its
  shards, or a single weights file.

Every failure is a `CheckpointError` naming the file (missing, wrong format, truncated or corrupt,
not a plain weights pickle).
"""

from __future__ import annotations

import ctypes
import json
import mmap
import pickle
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch

from hf_vlm.conversion.errors import CheckpointError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Dictionaries that training scripts wrap a state dict in (LAVIS: "model", open_clip: "state_dict").
STATE_DICT_WRAPPERS = ("state_dict", "model", "module")


class CheckpointReader:
    """Lazy access to the tensors of a checkpoint: names, shapes and dtypes without reading data."""

    path: Path

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> torch.dtype:
        raise NotImplementedError

    def get(self, key: str) -> torch.Tensor:
        """The tensor `key`, read now. Treat it as read-only."""
        raise NotImplementedError

    def release(self, key: str) -> None:
        """Called once `key` has been converted and written: its memory may be given back."""

    def file_of(self, key: str) -> Path:
        return self.path

    def nbytes(self, key: str) -> int:
        return _numel(self.shape(key)) * self.dtype(key).itemsize

    def __contains__(self, key: str) -> bool:
        return key in self._key_set()

    def _key_set(self) -> set[str]:
        if not hasattr(self, "_keys_cache"):
            self._keys_cache = set(self.keys())
        return self._keys_cache

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {len(self)} tensors)"


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# --------------------------------------------------------------------------------------------------
# safetensors


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class SafetensorsReader(CheckpointReader):
    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = Path(path)
        self._safe_open = safe_open
        try:
            with safe_open(str(self.path), framework="pt") as f:
                self._specs = {}
                for key in f.keys():
                    piece = f.get_slice(key)
                    dtype = piece.get_dtype()
                    if dtype not in _SAFETENSORS_DTYPES:
                        raise CheckpointError(f"{self.path}: tensor {key!r} has dtype {dtype}, which is not supported")
                    self._specs[key] = (tuple(piece.get_shape()), _SAFETENSORS_DTYPES[dtype])
                self.metadata = f.metadata() or {}
        except CheckpointError:
            raise
        except Exception as err:  # safetensors raises its own SafetensorError / OSError
            raise CheckpointError(
                f"{self.path} is not a readable safetensors file (truncated or corrupt?): {err}"
            ) from err

    def keys(self) -> list[str]:
        return list(self._specs)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._specs[key][0]

    def dtype(self, key: str) -> torch.dtype:
        return self._specs[key][1]

    def get(self, key: str) -> torch.Tensor:
        # A fresh memory map per tensor: the map (and the pages it pulled in) goes away with the tensor.
        try:
            with self._safe_open(str(self.path), framework="pt") as f:
                return f.get_tensor(key)
        except Exception as err:
            raise CheckpointError(f"{self.path}: cannot read tensor {key!r}: {err}") from err


# --------------------------------------------------------------------------------------------------
# pickles (torch.save zip format)

_libc = None


def _drop_pages(tensor: torch.Tensor) -> None:
    """Tell the kernel it may drop the resident pages of a memory-mapped tensor (Linux madvise).

    torch.load(mmap=True) maps the whole file once; every page a conversion touches would otherwise
    stay resident until the end, so peak memory would grow to the size of the file. The mapping is
    private and never written, so a later access simply reads the file again."""
    global _libc
    if not sys.platform.startswith("linux"):
        return
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    storage = tensor.untyped_storage()
    start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page  # whole pages inside the storage only
    if last > first:
        _libc.madvise(first, last - first, 4)  # 4 = MADV_DONTNEED


class PickleReader(CheckpointReader):
    def __init__(self, path: Path):
        self.path = Path(path)
        if not zipfile.is_zipfile(self.path):
            raise CheckpointError(
                f"{self.path} is not a torch.save checkpoint in the zip format (it may be truncated, "
                "corrupt, a legacy non-zip pickle, or another kind of file). Re-save legacy files with "
                "torch.save(state_dict, path) from a trusted environment."
            )
        try:
            obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as err:
            raise CheckpointError(
                f"{self.path} is not a plain weights file: it pickles Python objects that are not tensors or "
                f"containers, and arbitrary objects are never unpickled here. Save its state_dict() instead. "
                f"({str(err).splitlines()[0]})"
            ) from err
        except Exception as err:
            raise CheckpointError(f"{self.path} cannot be read as a torch checkpoint (truncated or corrupt?): {err}") from err
        self._tensors, self.wrapper_key, self.skipped = _find_state_dict(obj, self.path)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].dtype

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def release(self, key: str) -> None:
        _drop_pages(self._tensors[key])


def _find_state_dict(obj, path: Path) -> tuple[dict[str, torch.Tensor], str | None, list[str]]:
    """The flat {name: tensor} dict inside a loaded pickle: the top level, or one wrapper such as
    LAVIS's {"model": ...} or open_clip's {"state_dict": ...}. Returns it, the wrapper key, and the
    non-tensor entries next to the tensors (epoch counters, optimizer state...), which are reported."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a dict of tensors (a state dict)")
    wrapper = None
    if not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for name in STATE_DICT_WRAPPERS:
            inner = obj.get(name)
            if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                wrapper, obj = name, inner
                break
        else:
            raise CheckpointError(
                f"{path} holds a dict without tensors (keys: {sorted(map(str, obj))[:10]}); expected a state dict, "
                f"possibly wrapped in one of {STATE_DICT_WRAPPERS}"
            )
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    skipped = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    return tensors, wrapper, skipped


# --------------------------------------------------------------------------------------------------
# several files as one checkpoint


class MultiFileReader(CheckpointReader):
    """Shards of one checkpoint (a Hub index json, or weights given as separate files)."""

    def __init__(self, path: Path, readers: list[CheckpointReader], expected: dict[str, Path] | None = None):
        self.path = Path(path)
        self.readers = readers
        self._owner: dict[str, CheckpointReader] = {}
        for reader in readers:
            for key in reader.keys():
                if key in self._owner:
                    raise CheckpointError(
                        f"tensor {key!r} is in two files: {self._owner[key].path} and {reader.path}"
                    )
                self._owner[key] = reader
        if expected is not None:  # the index json's weight_map must agree with the shards
            wrong = [k for k, f in expected.items() if k not in self._owner or self._owner[k].path != f]
            if wrong:
                details = ", ".join(f"{k!r} (index says {expected[k].name})" for k in wrong[:10])
                raise CheckpointError(f"{path}: {len(wrong)} tensors are not in the shard the index names: {details}")
            unlisted = [k for k in self._owner if k not in expected]
            if unlisted:
                raise CheckpointError(f"{path}: {len(unlisted)} tensors in the shards are missing from the index: {unlisted[:10]}")

    def keys(self) -> list[str]:
        return list(self._owner)

    def shape(self, key):
        return self._owner[key].shape(key)

    def dtype(self, key):
        return self._owner[key].dtype(key)

    def get(self, key):
        return self._owner[key].get(key)

    def release(self, key):
        self._owner[key].release(key)

    def file_of(self, key):
        return self._owner[key].file_of(key)


class CombinedReader(CheckpointReader):
    """Several checkpoints read as one, each key prefixed with its part's namespace (e.g. "vision:"), so a
    converter can account for the keys of all of them and errors say which file a key came from."""

    def __init__(self, parts: dict[str, CheckpointReader]):
        self.parts = parts
        self.path = next(iter(parts.values())).path
        self._owner = {f"{ns}{key}": (reader, key) for ns, reader in parts.items() for key in reader.keys()}

    def keys(self) -> list[str]:
        return list(self._owner)

    def shape(self, key):
        reader, inner = self._owner[key]
        return reader.shape(inner)

    def dtype(self, key):
        reader, inner = self._owner[key]
        return reader.dtype(inner)

    def get(self, key):
        reader, inner = self._owner[key]
        return reader.get(inner)

    def release(self, key):
        reader, inner = self._owner[key]
        reader.release(inner)

    def file_of(self, key):
        reader, inner = self._owner[key]
        return reader.file_of(inner)


# --------------------------------------------------------------------------------------------------
# entry point


def open_checkpoint(path: str | Path) -> CheckpointReader:
    """A lazy reader for a weights file or a Hub-style folder (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        return _open_folder(path)
    return _open_file(path)


def _open_file(path: Path) -> CheckpointReader:
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return SafetensorsReader(path)
    if suffix in PICKLE_SUFFIXES:
        return PickleReader(path)
    if suffix == ".json" and path.name.endswith(".index.json"):
        return _open_index(path)
    # Unknown name: recognise the content (a zip archive is torch.save's format).
    if zipfile.is_zipfile(path):
        return PickleReader(path)
    if _looks_like_safetensors(path):
        return SafetensorsReader(path)
    raise CheckpointError(
        f"{path} is not a checkpoint this tool reads: expected a safetensors file "
        f"({', '.join(SAFETENSORS_SUFFIXES)}), a torch.save zip pickle ({', '.join(PICKLE_SUFFIXES)}), "
        "an *.index.json, or a folder holding them"
    )


def _looks_like_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _open_index(index_path: Path) -> CheckpointReader:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index_path} is not a checkpoint index (a json with a 'weight_map'): {err}") from err
    files = {name: index_path.parent / name for name in dict.fromkeys(weight_map.values())}
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        raise CheckpointError(f"{index_path} lists shards that do not exist: {missing}")
    readers = [_open_file(f) for f in files.values()]
    return MultiFileReader(index_path, readers, expected={k: files[v] for k, v in weight_map.items()})


def _open_folder(folder: Path) -> CheckpointReader:
    indexes = sorted(folder.glob("*.safetensors.index.json")) or sorted(folder.glob("*.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(f"{folder} has several index files, pass one of them: {[p.name for p in indexes]}")
    if indexes:
        return _open_index(indexes[0])
    # No index: one weights file, safetensors preferred (Hub repos often carry both formats).
    for suffixes in (SAFETENSORS_SUFFIXES, PICKLE_SUFFIXES):
        found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
        if len(found) == 1:
            return _open_file(found[0])
        if len(found) > 1:
            raise CheckpointError(
                f"{folder} has several weights files and no index json; pass one file: {[p.name for p in found]}"
            )
    raise CheckpointError(
        f"{folder} holds no checkpoint: no *.index.json and no {'/'.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)} file"
    )
