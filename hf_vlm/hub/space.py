"""Publishing the Gradio Space: `push_space(repo_id, ...)` (the `hf-vlm push-space` command).

The Space folder is spaces/ of the repository, installed as package data (`hf_vlm.spaces`). What is pushed:
- `app.py`, with its SETTINGS filled in: the model repo ids (HF_VLM_BLIP2 / HF_VLM_COCA) and bf16 weights on a CPU;
- `README.md`, whose front matter names the models under `models` and `preload_from_hub`;
- `requirements.txt`: hf-vlm is not on PyPI, so its wheel goes into `wheels/` and the requirement is that relative
  path (the Hub runs `pip install -r requirements.txt` in the Space's folder). The wheel's own dependencies then come
  from PyPI with the versions the wheel pins. `requirement="hf-vlm==X"` names a published version instead.
Everything goes up in one commit; the Space builds from this folder alone.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from hf_vlm.hub.push import HubPushError

SPACE_FILES = ("app.py", "README.md", "requirements.txt")
WHEELS_FOLDER = "wheels"
_SETTINGS_LINE = "SETTINGS: dict[str, str] = {}\n"


def space_source() -> Path:
    """The Space folder as installed (hf_vlm/spaces in the wheel) or in the checkout (spaces/)."""
    from importlib.resources import files

    try:
        folder = Path(str(files("hf_vlm.spaces")))
    except ModuleNotFoundError:  # an editable install made before spaces/ was package data
        folder = Path(__file__).resolve().parents[2] / "spaces"
    if not all((folder / name).is_file() for name in SPACE_FILES):
        raise HubPushError(f"the Space files ({', '.join(SPACE_FILES)}) are not in {folder}")
    return folder


def render_space(output_dir: str | Path, *, blip2: str | None = None, coca: str | None = None,
                 wheel: str | Path | None = None, requirement: str | None = None) -> list[str]:
    """Write the Space as it is pushed into `output_dir` (new or empty); returns its files."""
    from huggingface_hub import SpaceCard

    if not (blip2 or coca):
        raise HubPushError("name at least one model to serve: blip2 and/or coca (Hub repo ids)")
    if (wheel is None) == (requirement is None):
        raise HubPushError("give either the hf-vlm wheel to upload with the Space (--wheel, from `python -m build`) "
                           "or a published requirement (--requirement 'hf-vlm==X')")
    source, output_dir = space_source(), Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if any(output_dir.iterdir()):
        raise HubPushError(f"staging folder {output_dir} is not empty")

    if wheel is not None:
        wheel = Path(wheel)
        if not (wheel.is_file() and re.fullmatch(r"hf_vlm-[^-]+-py3-none-any\.whl", wheel.name)):
            raise HubPushError(f"{wheel} is not an hf-vlm wheel (dist/hf_vlm-<version>-py3-none-any.whl)")
        (output_dir / WHEELS_FOLDER).mkdir()
        shutil.copy2(wheel, output_dir / WHEELS_FOLDER / wheel.name)
        requirement = f"./{WHEELS_FOLDER}/{wheel.name}"
    lines = (source / "requirements.txt").read_text().splitlines()
    if sum(line.strip() == "hf-vlm" for line in lines) != 1:
        raise HubPushError(f"{source / 'requirements.txt'} must have one line `hf-vlm` to fill in")
    (output_dir / "requirements.txt").write_text(
        "\n".join(requirement if line.strip() == "hf-vlm" else line for line in lines) + "\n")

    settings = {"HF_VLM_BLIP2": blip2, "HF_VLM_COCA": coca, "HF_VLM_CPU_DTYPE": "bfloat16"}
    settings = {name: value for name, value in settings.items() if value}
    app = (source / "app.py").read_text()
    if app.count(_SETTINGS_LINE) != 1:
        raise HubPushError(f"{source / 'app.py'} must have the line {_SETTINGS_LINE.strip()!r} to fill in")
    (output_dir / "app.py").write_text(app.replace(_SETTINGS_LINE, f"SETTINGS: dict[str, str] = {settings!r}\n"))

    card = SpaceCard.load(source / "README.md")
    models = [repo_id for repo_id in (blip2, coca) if repo_id]
    card.data.models = models
    card.data.preload_from_hub = models
    card.save(output_dir / "README.md")
    return sorted(str(p.relative_to(output_dir)) for p in output_dir.rglob("*") if p.is_file())


def push_space(repo_id: str, *, blip2: str | None = None, coca: str | None = None, wheel: str | Path | None = None,
               requirement: str | None = None, private: bool = False, token: str | None = None,
               commit_message: str | None = None) -> str:
    """Render the Space (`render_space`) and upload it to the Space repository `repo_id` in one commit (created as a
    Gradio Space if missing; files of an earlier push that this one lacks are deleted). Returns the commit URL."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="hf_vlm_space_") as staging:
        files = render_space(staging, blip2=blip2, coca=coca, wheel=wheel, requirement=requirement)
        try:
            api.create_repo(repo_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
            existing = set(api.list_repo_files(repo_id, repo_type="space"))
        except Exception as err:  # noqa: BLE001  (named in the message; the token never is)
            raise HubPushError(f"could not create or read the Space {repo_id}: {type(err).__name__}: {err}") from None
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(Path(staging) / name))
                      for name in files]
        stale = sorted(name for name in existing - set(files) - {".gitattributes"})
        operations += [CommitOperationDelete(path_in_repo=name) for name in stale]
        commit = api.create_commit(repo_id, operations, repo_type="space",
                                   commit_message=commit_message or "Upload the hf-vlm Space")
    return commit.commit_url
