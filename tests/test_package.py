"""The package: one import namespace, the CLI, the offline harness."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import hf_vlm

REPO = Path(__file__).resolve().parents[1]
# The console script installed next to this interpreter (the venv may not be on PATH).
HF_VLM = str(Path(sys.executable).with_name("hf-vlm"))


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_subpackages_live_in_the_hf_vlm_namespace():
    import hf_vlm.conversion
    import hf_vlm.model_cards
    import hf_vlm.modeling
    import hf_vlm.trainers

    assert Path(hf_vlm.modeling.__file__).parent == REPO / "modeling"
    assert Path(hf_vlm.conversion.__file__).parent == REPO / "conversion"
    assert Path(hf_vlm.trainers.__file__).parent == REPO / "trainers"
    assert Path(hf_vlm.model_cards.__file__).parent == REPO / "model_cards"


def test_no_generic_top_level_module_is_installed(tmp_path):
    # Run outside the repository, so only what is installed can be imported.
    code = (
        "import importlib.util as u, json, hf_vlm.modeling, hf_vlm.trainers;"
        "print(json.dumps({n: u.find_spec(n) is not None for n in "
        "['modeling', 'conversion', 'trainers', 'model_cards', 'hf_vlm']}))"
    )
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found == {"modeling": False, "conversion": False, "trainers": False, "model_cards": False, "hf_vlm": True}


def test_modeling_never_imports_hf_vlm():
    # modeling/ is copied to the Hub next to the weights; it must stand without hf_vlm.
    offenders = [
        str(path.relative_to(REPO))
        for path in (REPO / "modeling").rglob("*.py")
        if any(line.lstrip().startswith(("import hf_vlm", "from hf_vlm")) for line in path.read_text().splitlines())
    ]
    assert offenders == []


def test_cli_version():
    result = subprocess.run([HF_VLM, "--version"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"hf-vlm {hf_vlm.__version__}"


def test_cli_env_reports_versions_accelerator_and_models():
    import torch
    import transformers

    result = subprocess.run([HF_VLM, "env"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = {}
    for line in result.stdout.splitlines():
        key, _, value = line.partition("  ")
        rows[key.strip()] = value.strip()
    assert rows["torch"] == torch.__version__
    assert rows["transformers"] == transformers.__version__
    for lib in ("timm", "deepspeed", "gradio"):
        assert rows[lib] and rows[lib] != "not installed", lib
    assert rows["cuda available"] == str(torch.cuda.is_available())
    assert rows["bf16 supported"] in ("True", "False")
    assert rows["registered model types"] == (", ".join(hf_vlm.registered_model_types()) or "none")


def test_cli_without_command_prints_help_and_fails():
    result = subprocess.run([HF_VLM], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "usage: hf-vlm" in result.stdout


def test_tests_run_offline():
    import huggingface_hub
    from huggingface_hub.errors import OfflineModeIsEnabled

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True
    with pytest.raises((OfflineModeIsEnabled, huggingface_hub.errors.LocalEntryNotFoundError)):
        huggingface_hub.hf_hub_download("org/not-a-real-repo", "config.json", cache_dir=os.devnull + "x")


def test_unknown_preset_error_names_the_known_ones():
    from hf_vlm.presets import get_config, list_presets

    with pytest.raises(KeyError, match="unknown preset 'no-such-model'") as err:
        get_config("no-such-model")
    for name in list_presets():
        assert name in str(err.value)


def test_trained_t5_tokenizer_round_trips(t5_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(t5_tokenizer_dir)
    ids = tokenizer("a small red circle left of a blue square").input_ids
    assert ids[-1] == tokenizer.eos_token_id == 1 and tokenizer.pad_token_id == 0
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a small red circle left of a blue square"


def test_run_python_without_hf_vlm_really_blocks_the_package(tmp_path):
    from hf_vlm.testing import run_python_without_hf_vlm

    blocked = run_python_without_hf_vlm("import hf_vlm.modeling", cwd=tmp_path)
    assert blocked.returncode != 0 and "No module named 'hf_vlm.modeling'" in blocked.stderr
    fine = run_python_without_hf_vlm("import transformers, timm; print('ok')", cwd=tmp_path)
    assert fine.returncode == 0 and fine.stdout.strip() == "ok", fine.stderr
