"""Loading a damaged checkpoint says which file is at fault (issue 16.11)."""

import json

import pytest
import torch
from transformers import AutoModel

import hf_vlm  # noqa: F401  (registers the Auto classes)
from hf_vlm.presets import get_config


@pytest.fixture(scope="module", params=["coca-tiny", "blip2-tiny"])
def saved(request, tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(request.param)
    AutoModel.from_config(get_config(request.param)).save_pretrained(path)
    return path


def test_a_truncated_weights_file_is_named(saved, tmp_path):
    """safetensors' own error ("incomplete metadata, file not fully covered") names no file."""
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(saved, folder)
    weights = folder / "model.safetensors"
    with open(weights, "r+b") as file:
        file.truncate(weights.stat().st_size // 2)
    with pytest.raises(OSError, match=f"{weights} cannot be read .*incomplete or damaged"):
        AutoModel.from_pretrained(folder)


def test_an_unknown_model_type_is_named_with_the_known_ones(saved, tmp_path):
    """transformers would ask to run the folder's custom code (its config.json has an auto_map)."""
    import shutil

    from hf_vlm.evaluation.runner import load_model
    from hf_vlm.registration import load_config

    folder = tmp_path / "copy"
    shutil.copytree(saved, folder)
    config = json.loads((folder / "config.json").read_text())
    assert "auto_map" in config
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "coca_v3"}))
    message = f"{folder / 'config.json'}: model_type 'coca_v3' is not a model type hf-vlm knows \\(blip2_flant5, coca\\)"
    with pytest.raises(ValueError, match=message):
        load_config(folder)
    with pytest.raises(ValueError, match=message):  # hf-vlm eval's loader
        load_model(str(folder))
    with pytest.raises(ValueError, match="has no config.json"):
        load_config(tmp_path)
    assert load_config(saved).model_type == json.loads((saved / "config.json").read_text())["model_type"]
