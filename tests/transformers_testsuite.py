"""transformers' own common model tests, imported from the installed version's sdist (never copied here).

`make setup` downloads the sdist of the installed transformers version from PyPI and extracts its `tests/` folder
into `.transformers-tests/<version>/tests` (gitignored). That sdist ships the top-level `tests/*.py`
(`test_modeling_common.py` with `ModelTesterMixin`) but not the subpackages `test_modeling_common.py` imports:
`tests/generation/test_utils.py` (`GenerationTesterMixin`) and `tests/exporters/test_export.py`
(`ExportTesterMixin`, a base class of `ModelTesterMixin`). Where the sdist lacks them, this loader puts empty
stand-ins in their place, and our own conformance tests (tests/test_transformers_common.py) check what those mixins
would: generation (greedy, sampling, beams, cache, left padding, inputs_embeds, dict outputs) and `torch.export`.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import transformers

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "transformers_tests"


def tests_folder() -> Path:
    return REPO / ".transformers-tests" / transformers.__version__ / "tests"


def _stand_in(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    return module


class GenerationTesterMixin:
    """Stand-in for transformers' `tests/generation/test_utils.py` mixin (not in the sdist): marks a tester whose
    model generates (`ModelTesterMixin.test_generation_tester_mixin_inheritance` checks it)."""


class ExportTesterMixin:
    """Stand-in for transformers' `tests/exporters/test_export.py` mixin (not in the sdist)."""


def load_test_modeling_common() -> types.ModuleType:
    """`tests/test_modeling_common.py` of the installed transformers, as `transformers_tests.test_modeling_common`."""
    import importlib

    if f"{PACKAGE}.test_modeling_common" in sys.modules:
        return sys.modules[f"{PACKAGE}.test_modeling_common"]
    folder = tests_folder()
    if not (folder / "test_modeling_common.py").is_file():
        raise RuntimeError(
            f"transformers {transformers.__version__}'s own tests are not in {folder}: run `make setup` (it downloads "
            f"the transformers=={transformers.__version__} sdist from PyPI and extracts its tests/ there)"
        )
    package = types.ModuleType(PACKAGE)
    package.__path__ = [str(folder)]
    sys.modules[PACKAGE] = package
    for subpackage, module, attributes in (
        ("generation", "test_utils", {"GenerationTesterMixin": GenerationTesterMixin}),
        ("exporters", "test_export", {"ExportTesterMixin": ExportTesterMixin}),
    ):
        if (folder / subpackage / f"{module}.py").is_file():
            continue  # a later sdist that ships it: transformers' own
        parent = sys.modules.setdefault(f"{PACKAGE}.{subpackage}", _stand_in(f"{PACKAGE}.{subpackage}", __path__=[]))
        sys.modules[f"{PACKAGE}.{subpackage}.{module}"] = stand_in = _stand_in(f"{PACKAGE}.{subpackage}.{module}", **attributes)
        setattr(parent, module, stand_in)
    return importlib.import_module(f"{PACKAGE}.test_modeling_common")
