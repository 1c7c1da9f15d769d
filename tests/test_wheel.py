"""The wheel is the product: `python -m build` makes an sdist and a wheel (built from that sdist); installed into a
fresh virtualenv (not editable, no checkout on the path: tests/wheel_env.py), `hf-vlm env`, `hf-vlm convert`,
`accelerate launch -m hf_vlm.trainers.pretrain --recipe coca-tiny` (DeepSpeed ZeRO-2 and the accelerate config
taken from the installed package) and `hf-vlm space` work."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tarfile
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
from wheel_env import REPO, built_dist, clean_env, fresh_venv

pytestmark = pytest.mark.slow

# repository folder -> where setup.py installs it
PACKAGE_FOLDERS = {"hf_vlm": "hf_vlm", "modeling": "hf_vlm/modeling", "conversion": "hf_vlm/conversion",
                   "trainers": "hf_vlm/trainers", "model_cards": "hf_vlm/model_cards", "spaces": "hf_vlm/spaces"}


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    return built_dist(tmp_path_factory)


@pytest.fixture(scope="module")
def python(tmp_path_factory) -> Path:
    return fresh_venv(tmp_path_factory)


def run(python: Path, *args: str, cwd: Path, timeout: float = 600, **env) -> subprocess.CompletedProcess:
    """A command of the fresh venv (`hf-vlm`, or `python` for anything else), run outside the checkout."""
    executable = python.with_name(args[0]) if args[0] == "hf-vlm" else python
    command = [str(executable), *args[1:]] if args[0] == "hf-vlm" else [str(python), *args]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=clean_env(**env))
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def _tracked_package_files() -> set[str]:
    """Every file (not Python, not cache) of the installed folders, as the wheel should name it."""
    files = set()
    for folder, installed in PACKAGE_FOLDERS.items():
        for path in (REPO / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc",):
                files.add(f"{installed}/{path.relative_to(REPO / folder).as_posix()}")
    return files


def test_the_wheel_and_the_sdist_carry_every_file_of_the_package(dist):
    """Presets, card templates, DeepSpeed and accelerate configs: every file of the package folders is in the
    wheel (which `build` makes from the sdist, so the sdist has them too); nothing installs a top-level name
    other than hf_vlm."""
    wheel_files = set(zipfile.ZipFile(dist["wheel"]).namelist())
    missing = sorted(_tracked_package_files() - wheel_files)
    assert not missing, f"not in the wheel: {missing}"
    assert {name.split("/")[0] for name in wheel_files} == {"hf_vlm", f"{dist['wheel'].name.split('-py3')[0]}.dist-info"}
    with tarfile.open(dist["sdist"]) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert {"README.md", "pyproject.toml", "setup.py", "hf_vlm/presets/coca-tiny.json",
            "trainers/deepspeed/zero2.json", "model_cards/coca.md"} <= names


def test_the_installed_package_is_the_wheel_not_the_checkout(python, tmp_path):
    out = run(python, "-c", "import hf_vlm, importlib.util; print(hf_vlm.__file__); "
                            "print(importlib.util.find_spec('modeling'), importlib.util.find_spec('trainers'))",
              cwd=tmp_path).stdout.split("\n")
    assert out[0].startswith(str(python.parents[1])) and str(REPO) not in out[0]
    assert out[1] == "None None"  # only the hf_vlm namespace is installed


def test_hf_vlm_env_lists_presets_and_model_types_from_the_wheel(python, tmp_path):
    out = run(python, "hf-vlm", "env", cwd=tmp_path).stdout
    assert "registered model types  blip2_flant5, coca" in out
    assert "coca-large-v2" in out and "blip2-flan-t5-xl" in out


def test_hf_vlm_convert_runs_from_the_wheel(python, tmp_path, t5_tokenizer_dir):
    from test_conversion_blip2 import TINY_QFORMER, TINY_T5, TINY_VISION, transformers_blip2

    source = tmp_path / "transformers-blip2"
    transformers_blip2(TINY_VISION, TINY_QFORMER, TINY_T5, num_query_tokens=8, image_token_index=95).save_pretrained(source)
    for path in t5_tokenizer_dir.iterdir():
        shutil.copy(path, source / path.name)
    run(python, "hf-vlm", "convert", "hf-blip2", str(source), str(tmp_path / "converted"), cwd=tmp_path)
    converted = tmp_path / "converted"
    assert {"config.json", "model.safetensors", "generation_config.json", "modeling_blip2_flant5.py"} <= {
        p.name for p in converted.iterdir()}


@pytest.fixture(scope="module")
def trained(python, tmp_path_factory) -> Path:
    """coca-tiny pretrained for 2 steps by `accelerate launch -m hf_vlm.trainers.pretrain` of the wheel, with the
    accelerate config and the DeepSpeed ZeRO-2 config of the installed package."""
    from hf_vlm.modeling.coca import CocaProcessor
    from hf_vlm.presets import get_config
    from hf_vlm.scenes import export_webdataset, generate_scenes
    from hf_vlm.testing import TINY_CORPUS
    from hf_vlm.tokenization import train_coca_tokenizer

    root = tmp_path_factory.mktemp("wheel_training")
    rows = list(generate_scenes("train", 8, seed=0))
    export_webdataset(rows, root / "shards", samples_per_shard=8)
    tokenizer = train_coca_tokenizer(TINY_CORPUS + [r["caption"] for r in rows], 96)
    image_size = get_config("coca-tiny").vision_config.image_size
    CocaProcessor.from_tokenizer(tokenizer, image_size=image_size).save_pretrained(root / "processor")
    installed = run(python, "-c", "import hf_vlm.trainers, pathlib; print(pathlib.Path(hf_vlm.trainers.__file__).parent)",
                    cwd=root).stdout.strip()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # `python -m accelerate.commands.accelerate_cli` is what the `accelerate` script of this venv would run.
    run(python, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
        f"{installed}/accelerate/multi_gpu.yaml", "--num_processes", "1", "--main_process_port", str(port),
        "-m", "hf_vlm.trainers.pretrain", "--recipe", "coca-tiny", "--deepspeed", "zero2",
        "--processor", str(root / "processor"), "--train_data", str(root / "shards" / "*.tar"),
        "--output_dir", str(root / "out"), "--max_steps", "2", "--per_device_train_batch_size", "4",
        "--logging_steps", "1", "--dataset_cache_dir", str(root / "cache"), cwd=root,
        HF_DATASETS_CACHE=str(root / "cache"), LOGLEVEL="WARNING")
    return root / "out"


def test_accelerate_launch_trains_coca_tiny_with_deepspeed_from_the_wheel(trained):
    assert (trained / "model.safetensors").is_file() and (trained / "generation_config.json").is_file()
    assert (trained / "training_summary.json").is_file()


def test_hf_vlm_space_serves_from_the_wheel(python, trained, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [str(python.with_name("hf-vlm")), "space", "--port", str(port)]
    server = subprocess.Popen(command, cwd=tmp_path, env=clean_env(HF_VLM_COCA=str(trained)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        page = None
        while page is None and server.poll() is None and time.monotonic() < deadline:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5).read().decode()
            except OSError:
                time.sleep(0.5)
        assert page is not None, f"hf-vlm space did not serve:\n{server.stdout.read() if server.poll() is not None else ''}"
        api_names = {dependency.get("api_name") for dependency in json.loads(page)["dependencies"]}
        assert {"caption", "answer", "classify", "retrieve"} <= api_names
    finally:
        server.terminate()
        server.wait(timeout=60)
