"""Shard addresses and our own readers for webdataset tars and imagefolder metadata: no bad byte stops a run.

Addresses (`--train_data`, `hf-vlm eval --data`) are expanded here and nowhere else:
  - brace patterns `cc3m/{00000..00331}.tar` (zero padding kept) and lists `{train,val}`, as webdataset and
    open_clip write them;
  - globs `shards/*.tar`, `data/**/*.parquet`, also on remote filesystems that can list (`hf://`, `s3://`, `gs://`);
  - remote URLs read through fsspec (`https://`, `hf://datasets/org/name/...`, `s3://`, `gs://`; the last two need
    the `s3fs` / `gcsfs` packages);
  - `pipe:COMMAND`: the shard is the standard output of a shell command (`pipe:aws s3 cp s3://b/x.tar -`).
Nothing remote is opened while resolving (except listing a remote glob): a shard is opened when a DataLoader
worker reaches it, so 64 ranks never fetch 40,000 shard headers at start-up.

The readers yield one row per sample with the canonical columns (see `hf_vlm.data.sources`) and NEVER raise for
bad data. A sample, member or shard that cannot be read becomes a row whose `__error__` column says why
("<reason>\t<detail>", a reason of `hf_vlm.data.skips.SKIP_REASONS`), with `__url__` and `__key__` naming it;
`hf_vlm.data.pipeline` counts and logs it. With task `RAW` the readers keep every field of a sample instead of the
canonical columns (what `hf-vlm eval` reads: several captions, question lists, labels), with the same error rows.
This is why hf-vlm reads tars and metadata files itself instead of through `datasets`' webdataset/imagefolder
builders, which stop the whole stream on one truncated member or one non-UTF-8 caption, naming neither shard nor key.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
import subprocess
import tarfile
from collections.abc import Iterator

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "img", "image")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
# The reader task that keeps every field of a sample (`hf-vlm eval`); "caption"/"vqa" give the canonical columns.
RAW = "raw"
# Members decoded in RAW rows besides images: JSON parsed, text as UTF-8 (webdataset's own decoders for these).
JSON_EXTENSIONS = ("json", "jsn")
TEXT_EXTENSIONS = ("txt", "text", "transcript", "cls", "cls2", "index", "inx", "id")

_BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_BRACE_LIST = re.compile(r"\{([^{}]*,[^{}]*)\}")
# webdataset's rule: the key is the path up to the first dot of the file name, the rest is the extension.
_KEY_AND_EXTENSION = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


# ------------------------------------------------------------------------------------------------ addresses


def expand_braces(pattern: str) -> list[str]:
    """`a/{000..002}.tar` -> a/000.tar, a/001.tar, a/002.tar (width of the first bound kept); `{x,y}` -> x, y.
    Several braces expand as a product, left to right."""
    matches = [m for m in (_BRACE_RANGE.search(pattern), _BRACE_LIST.search(pattern)) if m]
    if not matches:
        return [pattern]
    match = min(matches, key=lambda m: m.start())  # the leftmost brace varies slowest
    head, tail = pattern[: match.start()], pattern[match.end():]
    if match.re is _BRACE_LIST:
        return [p for option in match.group(1).split(",") for p in expand_braces(f"{head}{option}{tail}")]
    first, last = match.group(1), match.group(2)
    if int(last) < int(first):
        raise ValueError(f"brace range {match.group(0)} in {pattern!r} counts down")
    width = len(first) if first.startswith("0") else 0
    return [p for n in range(int(first), int(last) + 1) for p in expand_braces(f"{head}{n:0{width}d}{tail}")]


def is_pipe(address: str) -> bool:
    return address.startswith("pipe:")


def is_remote(address: str) -> bool:
    """A URL read through fsspec (any `scheme://` except file://), or a pipe: command."""
    return is_pipe(address) or ("://" in address and not address.startswith("file://"))


def _filesystem(address: str):
    import fsspec

    return fsspec.core.url_to_fs(address)


def expand_address(address: str) -> list[str]:
    """Every shard/file an address names (braces and globs expanded), in order. Local globs and remote globs
    on listable filesystems are listed; plain remote URLs and pipe: commands are kept as they are."""
    found: list[str] = []
    for pattern in expand_braces(address):
        if is_pipe(pattern) or not glob.has_magic(pattern):
            found.append(pattern if is_remote(pattern) else os.path.expanduser(pattern))
        elif is_remote(pattern):
            fs, path = _filesystem(pattern)
            protocol = pattern.split("://", 1)[0]
            found.extend(f"{protocol}://{p}" if "://" not in p else p for p in sorted(fs.glob(path)))
        else:
            found.extend(sorted(glob.glob(os.path.expanduser(pattern), recursive=True)))
    return found


def is_directory(address: str) -> bool:
    if is_pipe(address):
        return False
    if not is_remote(address):
        return os.path.isdir(address)
    if address.startswith(("http://", "https://")):
        return False  # HTTP servers cannot be listed: name the shards (a brace pattern)
    fs, path = _filesystem(address)
    try:
        return fs.isdir(path)
    except Exception:  # noqa: BLE001 - unreachable or unauthorised: let the reader count it as unreadable
        return False


def list_directory(address: str, pattern: str) -> list[str]:
    """Files under a (local or remote) folder whose name matches `pattern` (recursive)."""
    if not is_remote(address):
        return sorted(glob.glob(os.path.join(address, "**", pattern), recursive=True))
    fs, path = _filesystem(address)
    protocol = address.split("://", 1)[0]
    return sorted(f"{protocol}://{p}" for p in fs.glob(f"{path.rstrip('/')}/**/{pattern}"))


def open_binary(address: str):
    """A readable binary file object for a local path, an fsspec URL or a pipe: command. For pipe: the
    object's close() raises OSError when the command failed."""
    if is_pipe(address):
        return _PipeReader(address[len("pipe:"):])
    if not is_remote(address):
        return open(address, "rb")
    import fsspec

    return fsspec.open(address, "rb").open()


class _PipeReader(io.RawIOBase):
    def __init__(self, command: str):
        self.command = command
        self.process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = self.process.stdout.readinto(buffer)
        self.at_end = count == 0 and len(buffer) > 0
        return count

    def close(self) -> None:
        if self.closed:
            return
        early = not getattr(self, "at_end", False)
        if early:  # the reader stopped before the end: the command's exit status says nothing about the shard
            self.process.kill()
        self.process.stdout.close()
        error = self.process.stderr.read().decode(errors="replace").strip()
        self.process.stderr.close()
        code = self.process.wait()
        super().close()
        if code != 0 and not early:
            raise OSError(f"command {self.command!r} exited with {code}" + (f": {error[-300:]}" if error else ""))


def file_signature(addresses: list[str]) -> str:
    """What the map-style cache depends on: local files' sizes and modification times, remote addresses as is."""
    parts = []
    for address in addresses:
        if not is_remote(address) and os.path.exists(address):
            stat = os.stat(address)
            parts.append(f"{address}:{stat.st_size}:{stat.st_mtime_ns}")
        else:
            parts.append(address)
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------ rows

ROW_COLUMNS = ("image", "text", "question", "answers", "__key__", "__url__", "__error__")


def error_row(reason: str, detail: str, url: str, key: str | None = None) -> dict:
    return {"image": None, "text": None, "question": None, "answers": None,
            "__key__": key, "__url__": url, "__error__": f"{reason}\t{detail}"}


class _BadField(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _text(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _BadField("bad_text_encoding", f"{where} is not UTF-8 ({err.reason} at byte {err.start})") from None


def _parse_json(data: bytes | str, where: str):
    text = _text(data, where) if isinstance(data, bytes) else data
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise _BadField("bad_json", f"{where} is not valid JSON ({err.msg} at {err.pos})") from None


def answer_list(value) -> list[str] | None:
    """A list of answer strings from a string, a list of strings or VQAv2's [{"answer": ...}] (order kept)."""
    if value is None:
        return None
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, list):
        return [str(value)]
    out = [v.get("answer") if isinstance(v, dict) else v for v in value]
    return [v if isinstance(v, str) else str(v) for v in out if v is not None]


def text_value(value) -> str | None:
    """A caption/question field: a string, or the first string of a list (several captions); else None."""
    if isinstance(value, list):
        value = next((v for v in value if isinstance(v, str) and v.strip()), value[0] if value else None)
    if value is None or isinstance(value, str):
        return value
    return str(value)


class Columns:
    """Which member/field of a sample plays each role. A name is a webdataset extension (`txt`, `jpg`), a metadata
    column, or a dotted JSON field (`json.caption`). `None` roles try the defaults of `hf_vlm.data.sources`."""

    def __init__(self, image=None, text=None, question=None, answers=None, defaults=None):
        self.wanted = {"image": image, "text": text, "question": question, "answers": answers}
        self.defaults = defaults or {}

    def candidates(self, role: str) -> tuple[str, ...]:
        wanted = self.wanted[role]
        return (wanted,) if wanted else tuple(self.defaults.get(role, ()))


def _lookup(fields: dict, name: str, where: str, parsed: dict):
    """The value of `name` in a sample's fields: a plain field, or `parent.field` inside a JSON member/object."""
    if name in fields:
        return fields[name]
    parent, dot, child = name.partition(".")
    if not dot or parent not in fields:
        return None
    if parent not in parsed:
        value = fields[parent]
        parsed[parent] = _parse_json(value, f"{where} .{parent}") if isinstance(value, (bytes, str)) else value
    container = parsed[parent]
    return container.get(child) if isinstance(container, dict) else None


def _build_row(fields: dict, columns: Columns, task: str, url: str, key: str, where: str) -> dict:
    """Canonical row from one sample's fields (bytes for tar members, values for metadata rows); task RAW: every
    field (see `_raw_row`)."""
    if task == RAW:
        return _raw_row(fields, url, key, where)
    parsed: dict = {}
    row = {"image": None, "text": None, "question": None, "answers": None, "__key__": key, "__url__": url,
           "__error__": None}
    try:
        for name in columns.candidates("image"):
            if fields.get(name) is not None:
                value = fields[name]
                row["image"] = value if isinstance(value, dict) else {"bytes": value, "path": f"{key}.{name}"}
                break
        roles = ("text",) if task == "caption" else ("question", "answers")
        for role in roles:
            for name in columns.candidates(role):
                value = _lookup(fields, name, where, parsed)
                if value is None:
                    continue
                if isinstance(value, bytes):
                    value = _text(value, f"{where} .{name}")
                row[role] = answer_list(value) if role == "answers" else text_value(value)
                break
    except _BadField as bad:
        return error_row(bad.reason, bad.detail, url, key)
    return row


def _raw_row(fields: dict, url: str, key: str, where: str) -> dict:
    """Every field of one sample plus `__key__`/`__url__`/`__error__`: image members as {"bytes", "path"}, JSON
    members parsed and text members decoded (a bad one makes the sample a `bad_json` / `bad_text_encoding` error
    row), other members as bytes; metadata values as they are."""
    row = {}
    try:
        for name, value in fields.items():
            if not isinstance(value, bytes):
                row[name] = value
            elif name in IMAGE_EXTENSIONS:
                row[name] = {"bytes": value, "path": f"{key}.{name}"}
            elif name in JSON_EXTENSIONS:
                row[name] = _parse_json(value, f"{where} .{name}")
            elif name in TEXT_EXTENSIONS:
                row[name] = _text(value, f"{where} .{name}")
            else:
                row[name] = value
    except _BadField as bad:
        return error_row(bad.reason, bad.detail, url, key)
    return {**row, "__key__": key, "__url__": url, "__error__": None}


# ------------------------------------------------------------------------------------------------ readers


def iter_webdataset(shards: list[str], columns: Columns, task: str, signature: str = "") -> Iterator[dict]:
    """Rows of webdataset tar shards: one sample = the members sharing a key (`0001.jpg`, `0001.txt`, ...).

    A shard that cannot be opened gives one `unreadable_shard` row; a member cut short (a truncated download, a
    disk error) gives one `truncated_member` row for its sample and ends that shard, since a tar stream cannot be
    re-synchronised after a bad header; the samples before it are kept. `signature` only keys datasets' cache.
    """
    for url in shards:
        yield from _iter_shard(url, columns, task)


class _ShardError(Exception):
    """A tar stream that broke off; `key` is the sample being read then (None: nothing could be read)."""

    def __init__(self, key: str | None, error: Exception):
        super().__init__(f"{type(error).__name__}: {error}")
        self.key = key


def _tar_samples(stream) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample of a webdataset tar stream, by webdataset's key rule. Raises
    _ShardError when the stream breaks off (a truncated member, a bad header)."""
    key, fields = None, {}
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                match = _KEY_AND_EXTENSION.match(info.name)
                if match is None or os.path.basename(info.name).startswith("."):
                    continue  # no extension, or a hidden file (macOS `._x`): not a sample member
                member_key, extension = match.group(1), match.group(2).lower()
                if member_key != key and key is not None:
                    yield key, fields
                    fields = {}
                key = member_key
                fields[extension] = tar.extractfile(info).read()
                if len(fields[extension]) != info.size:
                    raise EOFError(f"member {info.name} has {len(fields[extension])} of {info.size} bytes")
        while stream.read(1 << 16):  # the end padding, so that a pipe: command has ended when it is closed
            pass
    except (tarfile.TarError, EOFError, OSError, ValueError) as err:
        raise _ShardError(key, err) from err
    if key is not None:
        yield key, fields


def _iter_shard(url: str, columns: Columns, task: str) -> Iterator[dict]:
    try:
        stream = open_binary(url)
    except Exception as err:  # noqa: BLE001 - missing file, HTTP 404, no permission...: one counted row
        yield error_row("unreadable_shard", f"cannot open shard: {type(err).__name__}: {err}", url)
        return
    failure = None
    try:
        for key, fields in _tar_samples(stream):
            yield _build_row(fields, columns, task, url, key, f"{url}:{key}")
    except GeneratorExit:  # the consumer stopped early: close quietly
        try:
            stream.close()
        except Exception:  # noqa: BLE001 - also at interpreter exit, when module globals are gone
            pass
        raise
    except _ShardError as err:
        failure = ("truncated_member", str(err), err.key) if err.key else ("unreadable_shard", str(err), None)
    try:
        stream.close()
    except OSError as err:  # a pipe: command that failed (its tar is then short or empty too)
        failure = ("unreadable_shard", f"{err}" + (f"; {failure[1]}" if failure else ""), None)
    if failure:
        yield error_row(failure[0], failure[1], url, failure[2])


def iter_imagefolder(metadata_files: list[str], columns: Columns, task: str, signature: str = "") -> Iterator[dict]:
    """Rows of imagefolders: `metadata.jsonl` / `metadata.csv` with a `file_name` column next to the images.

    Each line is decoded on its own, so a non-UTF-8 or invalid-JSON line is one counted row (`bad_text_encoding`,
    `bad_json`, keyed by its line number), not a failed source. Local images are referenced by path; remote
    images are read into the row (bytes), since the decoder cannot open a URL."""
    for url in metadata_files:
        folder = url.rsplit("/", 1)[0] if is_remote(url) else os.path.dirname(url)
        try:
            with open_binary(url) as handle:
                lines = handle.read().splitlines()
        except Exception as err:  # noqa: BLE001
            yield error_row("unreadable_shard", f"cannot read metadata: {type(err).__name__}: {err}", url)
            continue
        yield from (_metadata_csv if url.endswith(".csv") else _metadata_jsonl)(lines, url, folder, columns, task)


def _metadata_jsonl(lines, url, folder, columns, task):
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        key = f"line {number}"
        try:
            record = _parse_json(line, f"{url}:{key}")
            if not isinstance(record, dict):
                raise _BadField("bad_json", f"{url}:{key} is not a JSON object")
        except _BadField as bad:
            yield error_row(bad.reason, bad.detail, url, key)
            continue
        yield _metadata_row(record, url, folder, key, columns, task)


def _metadata_csv(lines, url, folder, columns, task):
    header = None
    for number, line in enumerate(lines, start=1):
        key = f"line {number}"
        try:
            text = _text(line, f"{url}:{key}")
        except _BadField as bad:
            if header is None:
                yield error_row("unreadable_shard", f"{bad} (the header line)", url)
                return
            yield error_row(bad.reason, bad.detail, url, key)
            continue
        values = next(csv.reader([text]), [])
        if header is None:
            header = values
            continue
        if values:
            yield _metadata_row(dict(zip(header, values)), url, folder, key, columns, task)


def _metadata_row(record: dict, url: str, folder: str, key: str, columns: Columns, task: str) -> dict:
    file_name = record.get("file_name")
    fields = dict(record)
    if isinstance(file_name, str) and file_name:
        path = f"{folder}/{file_name}" if is_remote(url) else os.path.join(folder, file_name)
        key = file_name
        if is_remote(path):
            try:
                with open_binary(path) as handle:
                    fields["image"] = {"bytes": handle.read(), "path": path}
            except Exception as err:  # noqa: BLE001
                return error_row("corrupt_image", f"cannot read {path}: {type(err).__name__}: {err}", url, key)
        else:
            fields["image"] = {"bytes": None, "path": path}
    else:
        fields.pop("image", None)
    return _build_row(fields, columns, task, url, key, f"{url}:{key}")


def first_sample_fields(fmt: str, files: list[str]) -> tuple[str, list[str]] | None:
    """(where, field names) of the first readable sample of a webdataset/imagefolder source, to check its columns
    before training starts; None when no file among the first few can be read (the readers will count that)."""
    for url in files[:3]:
        try:
            if fmt == "webdataset":
                with open_binary(url) as stream:
                    for key, fields in _tar_samples(stream):
                        names = list(fields)
                        record = json.loads(fields["json"]) if "json" in fields else None
                        names += [f"json.{k}" for k in record] if isinstance(record, dict) else []
                        return f"{url}:{key}", names
            else:
                with open_binary(url) as handle:
                    first = handle.readline() if url.endswith(".jsonl") else None
                    if first is None:  # csv: the header
                        header = next(csv.reader([handle.readline().decode()]), [])
                        return url, ["image", *header] if "file_name" in header else header
                    record = json.loads(first)
                    return f"{url}:line 1", ["image", *record] if "file_name" in record else list(record)
        except Exception:  # noqa: BLE001 - unreadable here: the reader counts it when it gets there
            continue
    return None
