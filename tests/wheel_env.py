"""The built hf-vlm distribution, installed where the checkout is not: shared by the tests of what we publish
(test_wheel.py, the Space and the cards).

`built_dist` copies the source tree (no .git, .venv or build outputs) to a scratch folder and runs
`python -m build --no-isolation --skip-dependency-check` there: an sdist, and a wheel built from that sdist, so both must carry every file.
`--no-isolation` uses the project venv's setuptools: an isolated build would download them.

`fresh_venv` makes a virtualenv that has none of the checkout: its own site-packages, then the project venv's
site-packages as a plain path in a .pth file. A plain path (not a site dir) means the .pth files there are not run,
so the project's editable install of hf-vlm (a .pth import hook) is not active; the heavy dependencies (torch,
transformers, gradio, ...) are reused instead of installed, which would take minutes. Installing torch from the
registry at test time is not possible offline either. The wheel goes in with `uv pip install --no-deps`.

Both are built once per test session (per xdist worker) under pytest's base temp folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IGNORED = (".git", ".venv", ".demo", ".transformers-tests", "test-artifacts", "build", "dist", "*.egg-info",
           "__pycache__", ".pytest_cache", ".ruff_cache")

_cache: dict[str, object] = {}


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({result.returncode}):\n"
                           f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def built_dist(tmp_path_factory) -> dict[str, Path]:
    """{"wheel": path, "sdist": path} of hf-vlm built from a copy of the source tree."""
    if "dist" not in _cache:
        root = tmp_path_factory.mktemp("dist")
        source = root / "source"
        shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*IGNORED), symlinks=True)
        _run([sys.executable, "-m", "build", "--no-isolation", "--skip-dependency-check", "--outdir", str(root / "out"), str(source)],
             cwd=root, timeout=600, env={**os.environ, "PIP_NO_INDEX": "1"})
        (wheel,) = (root / "out").glob("hf_vlm-*.whl")
        (sdist,) = (root / "out").glob("hf_vlm-*.tar.gz")
        _cache["dist"] = {"wheel": wheel, "sdist": sdist}
    return _cache["dist"]


def make_venv(path: Path) -> Path:
    """A virtualenv at `path` that sees the project venv's installed packages (but not its hf-vlm); its python."""
    _run([sys.executable, "-m", "venv", "--without-pip", str(path)], timeout=120)
    python = path / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    (Path(purelib) / "_project_venv_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def install(python: Path, *requirements: str | Path) -> None:
    """`uv pip install --no-deps` into the venv of `python`, offline (files only)."""
    uv = Path(sys.executable).with_name("uv")
    _run([str(uv), "pip", "install", "--python", str(python), "--no-deps", "--offline", "--no-index",
          *map(str, requirements)], timeout=300)


def fresh_venv(tmp_path_factory) -> Path:
    """The python of a virtualenv with the built wheel installed (not editable, no checkout on the path)."""
    if "venv" not in _cache:
        python = make_venv(tmp_path_factory.mktemp("wheel_venv") / "venv")
        install(python, built_dist(tmp_path_factory)["wheel"])
        _cache["venv"] = python
    return _cache["venv"]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a command in a fresh venv: offline, no PYTHONPATH, CPU, one thread."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               GRADIO_ANALYTICS_ENABLED="False", HF_HUB_DISABLE_TELEMETRY="1")
    env.update(extra)
    return env
