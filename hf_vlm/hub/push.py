"""Publishing a checkpoint to the Hub: `push_to_hub(checkpoint, repo_id)` (the `hf-vlm push` command).

A peft adapter folder (`finetune.py --lora` output: adapter_config.json, no config.json) is published as an
adapter repository instead of step 1: the adapter, its processor and a card that names the base model by Hub id
(`stage_adapter`); steps 2 and 3 are the same.

1. Stage: load the checkpoint and `save_pretrained` it into a temporary folder (sharded safetensors, config with
   `auto_map` and the model's Python files for `trust_remote_code=True`, generation config, processor and
   tokenizer), then render README.md (hf_vlm.hub.cards) and copy eval_results.json.
2. Check the target: a token must be available (HF_TOKEN or `hf auth login`); the repository is created if
   needed; an existing repository may only hold an earlier push of the same model type (anything else is
   refused, never overwritten).
3. Upload everything in ONE commit (`HfApi.create_commit`), pinned to the head seen in step 2 (`parent_commit`),
   deleting files of the earlier push that the new one does not have (e.g. a shard count that changed). If any
   upload fails, the commit is never sent: the repository keeps its previous head.

The token is passed to huggingface_hub and never printed or put in an error message.

Endpoint: HF_ENDPOINT (huggingface.co by default). With `hf_xet` installed, huggingface_hub uploads LFS content
through Xet storage and does not fall back to classic LFS by itself; for an endpoint that only speaks classic
LFS (a self-hosted mirror, hf_vlm.testing_hub.LocalHub) set HF_HUB_DISABLE_XET=1.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_SIZE = "5GB"
# Files a repository may hold without being "other content" (what the Hub creates with a new repo).
_HUB_DEFAULT_FILES = {".gitattributes"}


class HubPushError(RuntimeError):
    """A push that could not be done; the message says why and what state the repository is in."""


@dataclass
class PushResult:
    repo_id: str
    revision: str
    commit_oid: str
    commit_url: str
    files: list[str]
    deleted: list[str]
    created_repo: bool


def _processor_files(folder: Path) -> bool:
    names = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json", "tokenizer.json")
    return any((folder / name).is_file() for name in names)


def stage_checkpoint(checkpoint: str | Path, output_dir: str | Path, *, max_shard_size: str = DEFAULT_MAX_SHARD_SIZE,
                     repo_id: str | None = None, base_model=None, eval_results=None) -> list[str]:
    """Write the repository content for `checkpoint` into `output_dir` (empty or new); returns the file list."""
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    from hf_vlm.hub.cards import EVAL_RESULTS_FILE, model_class_for, read_weight_headers, write_card
    from hf_vlm.registration import FAMILIES

    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    if not (checkpoint / "config.json").is_file():
        raise HubPushError(f"{checkpoint} is not a checkpoint folder: it has no config.json")
    output_dir.mkdir(parents=True, exist_ok=True)
    if any(output_dir.iterdir()):
        raise HubPushError(f"staging folder {output_dir} is not empty")

    config = AutoConfig.from_pretrained(checkpoint)
    ours = any(f.model_type == config.model_type for f in FAMILIES)
    if ours and not _processor_files(checkpoint):
        raise HubPushError(
            f"{checkpoint} has no processor files (processor_config.json / preprocessor_config.json / tokenizer); "
            "save the processor next to the model (processor.save_pretrained(folder)) so the Hub repo is usable"
        )
    # save_pretrained rewrites the weights' metadata: keep the provenance a converter recorded there.
    base_model = base_model or read_weight_headers(checkpoint)[3] or None

    cls = model_class_for(config)
    model, loading = cls.from_pretrained(checkpoint, dtype="auto", output_loading_info=True)
    problems = {kind: sorted(loading.get(kind) or []) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()):
        details = "; ".join(f"{kind}: {', '.join(map(str, keys[:5]))}{' ...' if len(keys) > 5 else ''}"
                            for kind, keys in problems.items() if keys)
        raise HubPushError(f"{checkpoint} does not load cleanly as {cls.__name__} ({details}); refusing to publish "
                           "weights that would be dropped or freshly initialized")
    model.save_pretrained(output_dir, max_shard_size=max_shard_size)

    if _processor_files(checkpoint):
        try:
            processor = AutoProcessor.from_pretrained(checkpoint)
        except (ValueError, OSError, TypeError) as err:  # a checkpoint with a tokenizer only
            logger.info("no processor in %s (%s); saving its tokenizer", checkpoint, err)
            processor = AutoTokenizer.from_pretrained(checkpoint)
        processor.save_pretrained(output_dir)

    saved_config = json.loads((output_dir / "config.json").read_text())
    if ours and ("auto_map" not in saved_config or not any(output_dir.glob("*.py"))):
        raise HubPushError(
            f"save_pretrained wrote no remote code for {type(model).__name__} (config.json has no auto_map): "
            "the model class must call register_for_auto_class so trust_remote_code=True loading works"
        )
    # The eval results travel with the weights (the card's model-index is built from them).
    results = Path(eval_results) if eval_results else checkpoint / EVAL_RESULTS_FILE
    if eval_results and not results.is_file():
        raise HubPushError(f"eval results file {results} does not exist")
    if results.is_file():
        shutil.copy2(results, output_dir / EVAL_RESULTS_FILE)
    write_card(output_dir, output_dir / "README.md", repo_id=repo_id, base_model=base_model)
    return sorted(str(p.relative_to(output_dir)) for p in output_dir.rglob("*") if p.is_file())


# What an adapter repository carries besides the adapter: the processor it was trained with (and its remote code).
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_PROCESSOR_FILE_PATTERNS = ("processor_config.json", "preprocessor_config.json", "tokenizer*", "special_tokens_map.json",
                            "added_tokens.json", "spiece.model", "vocab.*", "merges.txt", "*.py")


def is_adapter(folder: str | Path) -> bool:
    """A peft adapter folder (finetune.py --lora output): adapter_config.json and no config.json of a full model."""
    folder = Path(folder)
    return (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file()


def _is_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not Path(name).expanduser().exists()


def stage_adapter(adapter: str | Path, output_dir: str | Path, *, repo_id: str, base_model=None) -> list[str]:
    """Write the repository content of a peft adapter folder into `output_dir` (empty or new): adapter config and
    weights, the processor, README.md naming the base. Returns the file list.

    The base is `base_model` (the first, if several) or the adapter config's `base_model_name_or_path`; it must be a
    Hub id, since the card and `PeftModel.from_pretrained` load it from there. A run on a local folder names the
    folder: pass --base-model with the Hub id of the same weights; the pushed adapter_config.json names it."""
    from transformers import AutoConfig

    import hf_vlm  # noqa: F401  (registers our model types, to read the base's config)
    from hf_vlm.hub.cards import read_adapter_config, render_adapter_card

    adapter, output_dir = Path(adapter), Path(output_dir)
    missing = [name for name in _ADAPTER_FILES if not (adapter / name).is_file()]
    if missing:
        raise HubPushError(f"{adapter} is not a complete peft adapter folder: it has no {', '.join(missing)}")
    if not _processor_files(adapter):
        raise HubPushError(f"{adapter} has no processor files: save the processor next to the adapter "
                           "(finetune.py does) so the adapter repo is usable")
    output_dir.mkdir(parents=True, exist_ok=True)
    if any(output_dir.iterdir()):
        raise HubPushError(f"staging folder {output_dir} is not empty")
    config = read_adapter_config(adapter)
    if isinstance(base_model, (list, tuple)):
        base_model = base_model[0] if base_model else None
    base = base_model or config.get("base_model_name_or_path") or ""
    if not _is_hub_id(base):
        raise HubPushError(
            f"the adapter's base model is {base!r}, not a Hub id (org/name): pass --base-model with the Hub id of the "
            "weights it was trained on, so that the card and PeftModel.from_pretrained can load them"
        )
    try:
        base_config = AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as err:
        raise HubPushError(f"cannot read the config of the adapter's base model {base!r}: {err}") from None

    config["base_model_name_or_path"] = base
    (output_dir / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.copy2(adapter / "adapter_model.safetensors", output_dir / "adapter_model.safetensors")
    for pattern in _PROCESSOR_FILE_PATTERNS:
        for path in adapter.glob(pattern):
            if path.is_file():
                shutil.copy2(path, output_dir / path.name)
    card = render_adapter_card(adapter, repo_id, base, base_config)
    (output_dir / "README.md").write_text(str(card), encoding="utf-8")
    return sorted(str(p.relative_to(output_dir)) for p in output_dir.rglob("*") if p.is_file())


def _content_kind(folder: Path) -> str | None:
    """What a repository folder holds: the model_type of its config.json, or "<PEFT type> adapter of <base>"."""
    if (folder / "config.json").is_file():
        return json.loads((folder / "config.json").read_text()).get("model_type")
    if (folder / "adapter_config.json").is_file():
        config = json.loads((folder / "adapter_config.json").read_text())
        return f"{config.get('peft_type')} adapter of {config.get('base_model_name_or_path')}"
    return None


def _describe(err: Exception) -> str:
    """The server's message of an HTTP error (never the request headers, which carry the token)."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(err, HfHubHTTPError) and err.response is not None:
        server = err.response.headers.get("X-Error-Message") or ""
        return f"HTTP {err.response.status_code}{': ' + server if server else ''}"
    cause = err.__cause__
    return f"{err}{f' ({_describe(cause)})' if isinstance(cause, Exception) else ''}"


def _existing_content(api, repo_id: str, revision: str) -> dict[str, str] | None:
    """{path: blob id} at `revision`, or None when that branch does not exist yet."""
    from huggingface_hub.errors import RevisionNotFoundError
    from huggingface_hub.hf_api import RepoFile

    try:
        return {f.path: f.blob_id for f in api.list_repo_tree(repo_id, revision=revision, recursive=True)
                if isinstance(f, RepoFile)}
    except RevisionNotFoundError:
        return None


def _remote_model_type(api, repo_id: str, revision: str, scratch: Path, remote_files) -> str | None:
    """What the repository holds at `revision` (`_content_kind`: model_type of its config.json, or its adapter),
    None when neither (downloaded into `scratch`, so the user's HF cache is not touched)."""
    from huggingface_hub.errors import EntryNotFoundError

    for name in ("config.json", "adapter_config.json"):
        if name not in remote_files:
            continue
        try:
            api.hf_hub_download(repo_id, name, revision=revision, local_dir=scratch)
            return _content_kind(Path(scratch))
        except (EntryNotFoundError, ValueError):
            return None
    return None


def push_to_hub(checkpoint: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                commit_message: str | None = None, token: str | None = None, endpoint: str | None = None,
                max_shard_size: str = DEFAULT_MAX_SHARD_SIZE, base_model=None, eval_results=None) -> PushResult:
    """Publish `checkpoint` as `repo_id` (see the module docstring). Raises HubPushError with a clear message."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    token = token or get_token()
    if not token:
        raise HubPushError(
            "no Hugging Face token: set the HF_TOKEN environment variable or run `hf auth login` "
            "(a token with write access is needed to push)"
        )
    api = HfApi(endpoint=endpoint, token=token)
    revision = revision or "main"
    if "/" not in repo_id:
        try:
            repo_id = f"{api.whoami()['name']}/{repo_id}"
        except HfHubHTTPError as err:
            raise HubPushError(f"could not identify the token's user to complete repo id {repo_id!r}: "
                               f"{_describe(err)}") from None

    with tempfile.TemporaryDirectory(prefix="hf-vlm-push-") as tmp:
        staging = Path(tmp) / "repo"
        if is_adapter(checkpoint):
            if eval_results:
                raise HubPushError("--eval-results is for model checkpoints; an adapter card names its base only")
            files = stage_adapter(checkpoint, staging, repo_id=repo_id, base_model=base_model)
        else:
            files = stage_checkpoint(checkpoint, staging, max_shard_size=max_shard_size, repo_id=repo_id,
                                     base_model=base_model, eval_results=eval_results)
        local_model_type = _content_kind(staging)
        print(f"staged {len(files)} files for {repo_id} ({sum((staging / f).stat().st_size for f in files):,} bytes)")

        try:
            existed = api.repo_exists(repo_id)
            if not existed:
                api.create_repo(repo_id, private=private, exist_ok=True)
                print(f"created {'private ' if private else ''}repository {repo_id}")
            elif private and not api.repo_info(repo_id).private:
                print(f"note: {repo_id} already exists and is public; --private applies to new repositories only")
            if revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            remote = _existing_content(api, repo_id, revision)
            if remote is None:
                raise HubPushError(f"revision {revision!r} of {repo_id} does not exist and could not be created")
            other = sorted(set(remote) - _HUB_DEFAULT_FILES)
            if other:
                remote_type = _remote_model_type(api, repo_id, revision, Path(tmp) / "remote", remote)
                if remote_type != local_model_type:
                    shown = ", ".join(other[:8]) + (f" and {len(other) - 8} more" if len(other) > 8 else "")
                    raise HubPushError(
                        f"{repo_id}@{revision} already holds other content ({shown}; model type "
                        f"{remote_type!r}, this checkpoint is {local_model_type!r}). Nothing was uploaded; choose "
                        "another repo id or revision, or remove those files first."
                    )
            parent = api.repo_info(repo_id, revision=revision).sha
        except HfHubHTTPError as err:
            raise HubPushError(f"cannot push to {repo_id}@{revision}: {_describe(err)}") from None

        stale = sorted(set(remote) - set(files) - _HUB_DEFAULT_FILES)
        operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(staging / f)) for f in files]
        operations += [CommitOperationDelete(path_in_repo=f) for f in stale]
        message = commit_message or (f"Upload {local_model_type} with hf-vlm" if is_adapter(checkpoint)
                                     else f"Upload {local_model_type} checkpoint with hf-vlm")
        try:
            info = api.create_commit(repo_id, operations, commit_message=message, revision=revision,
                                     parent_commit=parent)
        except (HfHubHTTPError, RuntimeError, OSError, ValueError) as err:
            raise HubPushError(
                f"upload to {repo_id}@{revision} failed: {_describe(err)}. No commit was made; "
                f"{_head_state(api, repo_id, revision, parent)}"
            ) from None
    print(f"pushed {len(files)} files to {repo_id}@{revision} in commit {info.oid[:10]}")
    return PushResult(repo_id, revision, info.oid, info.commit_url, files, stale, not existed)


def _head_state(api, repo_id: str, revision: str, parent: str) -> str:
    """Confirm from the server that the failed push left the branch where it was."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        head = api.repo_info(repo_id, revision=revision).sha
    except HfHubHTTPError as err:
        return f"could not re-check the repository ({_describe(err)})"
    if head == parent:
        return f"the repository is unchanged ({revision} is still at {parent[:10]})."
    return f"{revision} moved from {parent[:10]} to {head[:10]} meanwhile (another writer)."
