"""The conversion engine shared by every upstream format.

A converter is data: a list of `Rule`s (source key(s) -> target key(s), with a tensor transform,
like timm's `checkpoint_filter_fn`) and an explicit list of `Drop`s, each with the reason why that
source tensor has no place in our model. `convert_checkpoint` then
1. accounts for every key: a source key that is neither mapped nor dropped, a target key of the
   model that nothing produces, or a key mapped twice is an error naming the keys;
2. checks shapes before reading any data, by running every transform on meta tensors and comparing
   with the target model built on the meta device (errors name the key and both shapes);
3. streams tensor by tensor from the reader into sharded safetensors inside an atomic output
   folder, with a progress bar, then writes config/processor/custom code and renames the folder.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hf_vlm.conversion.errors import ConversionError, KeyMismatchError, ShapeMismatchError
from hf_vlm.conversion.reader import CheckpointReader
from hf_vlm.conversion.writer import (
    DEFAULT_MAX_SHARD_SIZE,
    SAFE_WEIGHTS_INDEX_NAME,
    ShardedSafetensorsWriter,
    TensorSpec,
    atomic_output_dir,
    check_output,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Rule:
    """`transform(*source_tensors)` returns one tensor per target (a tensor or a sequence of them).

    No transform means a rename: one source, one target, same values. Transforms must also run on
    meta tensors (shape checking runs them there); checks on values go under `if not t.is_meta`."""

    sources: tuple[str, ...]
    targets: tuple[str, ...]
    transform: Callable[..., torch.Tensor | Sequence[torch.Tensor]] | None = None

    def __post_init__(self):
        if not self.sources or not self.targets:
            raise ValueError(f"a rule needs at least one source and one target: {self.sources} -> {self.targets}")
        if self.transform is None and (len(self.sources) != 1 or len(self.targets) != 1):
            raise ValueError(f"a rule without transform maps one key to one key: {self.sources} -> {self.targets}")

    def apply(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        out = tensors[0] if self.transform is None else self.transform(*tensors)
        out = [out] if isinstance(out, torch.Tensor) else list(out)
        if len(out) != len(self.targets):
            raise ValueError(f"rule {self.sources} -> {self.targets} produced {len(out)} tensors")
        return out


def rename(source: str, target: str) -> Rule:
    return Rule((source,), (target,))


@dataclass(frozen=True)
class Drop:
    """Source keys (regular expression, matched against the whole key) deliberately not converted."""

    pattern: str
    reason: str

    def matches(self, key: str) -> bool:
        return re.fullmatch(self.pattern, key) is not None


def rules_from_table(keys: Iterable[str], table: Sequence[tuple[str, str]]) -> list[Rule]:
    """Rename rules from a table of (regex, replacement) pairs: the first pattern that matches the
    whole key wins; `\\1`-style groups carry layer indices across. Keys matching no pattern get no
    rule (key accounting reports them unless a Drop covers them)."""
    compiled = [(re.compile(pattern), replacement) for pattern, replacement in table]
    rules = []
    for key in keys:
        for regex, replacement in compiled:
            match = regex.fullmatch(key)
            if match:
                rules.append(rename(key, match.expand(replacement)))
                break
    return rules


# --------------------------------------------------------------------------------------------------
# the target model


@dataclass(frozen=True)
class TargetSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype
    is_parameter: bool


def build_meta_model(model_class, config):
    """The target model with shapes but no memory, to read its expected state dict from."""
    with torch.device("meta"):
        return model_class(config)


def target_specs(model: torch.nn.Module) -> dict[str, TargetSpec]:
    """The tensors a checkpoint of `model` holds, in state-dict order; tied copies are left out the way
    `save_pretrained` leaves them out (from_pretrained ties them again)."""
    state = model.state_dict()
    try:
        from transformers import PreTrainedModel
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        if isinstance(model, PreTrainedModel):
            state = remove_tied_weights_from_state_dict(dict(state), model)
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return {k: TargetSpec(tuple(v.shape), v.dtype, k in parameters) for k, v in state.items()}


# --------------------------------------------------------------------------------------------------
# checks


def _listing(keys: Iterable[str], limit: int = 20) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def account_keys(source_keys: Iterable[str], rules: Sequence[Rule], drops: Sequence[Drop],
                 target_keys: Iterable[str]) -> dict[str, list[str]]:
    """Every source key mapped exactly once or dropped; every target key produced exactly once.
    Returns the dropped keys grouped by reason; raises KeyMismatchError listing every problem."""
    source_keys = list(source_keys)
    source_set, target_set = set(source_keys), set(target_keys)
    problems = []

    used: dict[str, Rule] = {}
    twice = []
    for rule in rules:
        for key in rule.sources:
            if key in used:
                twice.append(key)
            used[key] = rule
    absent = [k for k in used if k not in source_set]
    if absent:
        problems.append(f"{len(absent)} source keys the mapping needs are not in the checkpoint: {_listing(absent)}")
    if twice:
        problems.append(f"{len(twice)} source keys are mapped more than once: {_listing(twice)}")

    dropped: dict[str, list[str]] = {}
    leftover = []
    for key in source_keys:
        if key in used:
            continue
        drop = next((d for d in drops if d.matches(key)), None)
        if drop is None:
            leftover.append(key)
        else:
            dropped.setdefault(drop.reason, []).append(key)
    if leftover:
        problems.append(f"{len(leftover)} source keys are neither mapped nor on the drop list: {_listing(leftover)}")

    produced: dict[str, int] = {}
    for rule in rules:
        for key in rule.targets:
            produced[key] = produced.get(key, 0) + 1
    duplicated = [k for k, n in produced.items() if n > 1]
    unexpected = [k for k in produced if k not in target_set]
    missing = [k for k in target_keys if k not in produced]
    if duplicated:
        problems.append(f"{len(duplicated)} target keys are produced more than once: {_listing(duplicated)}")
    if unexpected:
        problems.append(f"{len(unexpected)} target keys do not exist in the target model: {_listing(unexpected)}")
    if missing:
        problems.append(f"{len(missing)} target keys of the model have no source: {_listing(missing)}")
    if problems:
        raise KeyMismatchError("key accounting failed:\n  " + "\n  ".join(problems))
    return dropped


def check_shapes(reader: CheckpointReader, rules: Sequence[Rule], expected: dict[str, TargetSpec]) -> None:
    """Run every transform on meta tensors shaped like the sources; compare with the target model."""
    problems = []
    for rule in rules:
        inputs = [torch.empty(reader.shape(k), dtype=reader.dtype(k), device="meta") for k in rule.sources]
        try:
            outputs = rule.apply(*inputs)
        except Exception as err:
            shapes = ", ".join(f"{k} {tuple(reader.shape(k))}" for k in rule.sources)
            problems.append(f"cannot convert {shapes}: {err}")
            continue
        for key, tensor in zip(rule.targets, outputs):
            if tuple(tensor.shape) != expected[key].shape:
                problems.append(
                    f"{key}: converted shape {tuple(tensor.shape)} (from {', '.join(rule.sources)} "
                    f"{', '.join(str(reader.shape(k)) for k in rule.sources)}) != model's expected shape "
                    f"{expected[key].shape}"
                )
    if problems:
        raise ShapeMismatchError(
            f"{len(problems)} shape mismatches between the checkpoint and the target config:\n  " + "\n  ".join(problems)
        )


# --------------------------------------------------------------------------------------------------
# conversion


@dataclass
class ConversionSummary:
    output: Path
    parameters: int
    tensors: int
    shards: int
    dtype: str
    output_bytes: int
    source_tensors: int
    dropped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"converted {self.source_tensors} source tensors -> {self.output}",
            f"  parameters:  {self.parameters:,}",
            f"  tensors:     {self.tensors}",
            f"  shards:      {self.shards}",
            f"  dtype:       {self.dtype}",
            f"  output size: {self.output_bytes / 1e9:.3f} GB ({self.output_bytes:,} bytes)",
        ]
        for reason, count in self.dropped.items():
            lines.append(f"  dropped {count} source tensors: {reason}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _out_dtype(spec: TargetSpec, dtype: torch.dtype) -> torch.dtype:
    # --dtype applies to floating-point tensors; integer buffers (position ids...) keep theirs.
    return dtype if spec.dtype.is_floating_point else spec.dtype


def convert_checkpoint(
    reader: CheckpointReader,
    rules: Sequence[Rule],
    drops: Sequence[Drop],
    model: torch.nn.Module,
    output: str | Path,
    *,
    dtype: torch.dtype | str = torch.float32,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    processor=None,
    save_extra: Callable[[Path], None] | None = None,
    progress: bool = True,
) -> ConversionSummary:
    """Convert `reader`'s tensors with `rules` into a `from_pretrained` folder for `model` (a meta
    model of the target class and config), next to `processor` and what the model's own
    save_pretrained writes besides weights (config with `dtype`, generation config, code)."""
    from tqdm.auto import tqdm

    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if dtype not in DTYPES.values():
        raise ConversionError(f"unsupported dtype {dtype}; choose one of {list(DTYPES)}")
    output = check_output(output, overwrite)

    expected = target_specs(model)
    dropped = account_keys(reader.keys(), rules, drops, expected)
    check_shapes(reader, rules, expected)

    # Write in the target model's state-dict order (a rule's targets stay together).
    position = {key: i for i, key in enumerate(expected)}
    ordered = sorted(rules, key=lambda rule: min(position[t] for t in rule.targets))
    specs = [TensorSpec(t, expected[t].shape, _out_dtype(expected[t], dtype)) for rule in ordered for t in rule.targets]

    with atomic_output_dir(output, overwrite) as folder:
        writer = ShardedSafetensorsWriter(folder, specs, max_shard_size)
        total = sum(s.nbytes for s in specs)
        try:
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"converting to {output.name}",
                      disable=not progress) as bar:
                for rule in ordered:
                    tensors = rule.apply(*(reader.get(k) for k in rule.sources))
                    for key, tensor in zip(rule.targets, tensors):
                        spec = expected[key]
                        if tuple(tensor.shape) != spec.shape:  # a transform that depends on values
                            raise ShapeMismatchError(f"{key}: converted shape {tuple(tensor.shape)} != expected {spec.shape}")
                        tensor = tensor.to(_out_dtype(spec, dtype))
                        writer.write(key, tensor)
                        bar.update(tensor.numel() * tensor.element_size())
                    del tensors, tensor  # no reference may keep this rule's memory alive into the next one
                    for k in rule.sources:
                        reader.release(k)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        _save_companions(folder, model, processor, save_extra, dtype)
        output_bytes = sum(p.stat().st_size for p in folder.iterdir() if p.suffix == ".safetensors")

    summary = ConversionSummary(
        output=output,
        parameters=sum(_numel(s.shape) for s in specs if expected[s.name].is_parameter),
        tensors=len(specs),
        shards=len(writer.shards),
        dtype=str(dtype).removeprefix("torch."),
        output_bytes=output_bytes,
        source_tensors=len(reader.keys()),
        dropped={reason: len(keys) for reason, keys in dropped.items()},
    )
    return summary


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _save_companions(folder: Path, model, processor, save_extra, dtype) -> None:
    """Everything next to the weights; config.json last, since it is what makes a folder loadable.

    A transformers model writes its own files with its own `save_pretrained`, weights left out
    (`state_dict={}`): the config (with `dtype`), the generation config, and for a model registered
    with `register_for_auto_class` its code and `auto_map`, so `trust_remote_code=True` works without
    this package. It writes into a scratch folder because save_pretrained deletes shard files it did
    not write itself."""
    import shutil

    if processor is not None:
        processor.save_pretrained(folder)
    if save_extra is not None:
        save_extra(folder)
    if not hasattr(model, "save_pretrained"):
        return
    scratch = folder / ".model-files"
    model.to(dtype).save_pretrained(scratch, state_dict={})  # meta tensors: changing dtype costs nothing
    files = sorted(scratch.iterdir(), key=lambda p: p.name == "config.json")
    for path in files:
        if path.suffix == ".safetensors" or path.name == SAFE_WEIGHTS_INDEX_NAME:
            raise RuntimeError(f"save_pretrained wrote weights ({path.name}) although none were given")
        os.replace(path, folder / path.name)
    shutil.rmtree(scratch)
