"""Test harness: every test runs offline (HF_HUB_OFFLINE=1) and deterministic."""

import os

# Set before any test module imports huggingface_hub / transformers (they read it at import).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `make test` runs two xdist workers on the two cores: one thread each (inherited by the tests'
# subprocesses). Tiny models on oversubscribed cores were 15-60x slower with spin-waiting OpenMP threads.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    """Register the markers transformers' own common tests use (tests/test_transformers_common.py imports them from
    its sdist; `--strict-markers` rejects unregistered ones)."""
    import re

    from transformers_testsuite import tests_folder

    common = tests_folder() / "test_modeling_common.py"
    if common.is_file():
        for name in sorted(set(re.findall(r"\bmark\.([A-Za-z_][A-Za-z0-9_]*)", common.read_text()))):
            config.addinivalue_line("markers", f"{name}: used by transformers' common model tests")


# Modules whose tests share costly module (or per-worker) fixtures: DeepSpeed launches, the built wheel and its venv,
# pushed repositories, the Space's models and browser. Under xdist each group runs on one worker (see below).
XDIST_GROUPS = {"test_train_distributed.py": "train_distributed", "test_wheel.py": "wheel",
                "test_space_push.py": "wheel", "test_hub.py": "hub", "test_space.py": "space"}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`make test` runs `pytest -n 2` (xdist's `--dist load`), which hands out single tests: the tests of a module
    with costly module fixtures landed on both workers, and each worker built those fixtures (the wheel was built
    twice). This scheduler hands out each XDIST_GROUPS group as one unit (the largest first) and the other tests one
    by one, as before. (xdist's own `--dist loadgroup` keys on a node id suffix that pytest 9 no longer keeps.)
    An explicit other `--dist` is left alone."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            group = XDIST_GROUPS.get(nodeid.split("::", 1)[0].rsplit("/", 1)[-1])
            return f"group:{group}" if group else nodeid

    return GroupScheduling(config, log)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """On xdist workers, the modules that hold a `slow` test first: xdist hands out the groups (largest first), then
    single tests in this order, and a long test handed out last made one worker finish minutes after the other.
    Whole modules move, in file order, so that a module's tests stay together (its module fixtures are built once)."""
    if hasattr(config, "workerinput"):
        slow_modules = {getattr(item, "module", None) for item in items if item.get_closest_marker("slow")}
        items.sort(key=lambda item: getattr(item, "module", None) not in slow_modules)  # a stable sort


@pytest.fixture(autouse=True)
def _offline_and_seeded(monkeypatch):
    """No test reaches the network; every test starts from the same RNG state."""
    import huggingface_hub.constants
    import torch

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def t5_tokenizer_dir(tmp_path_factory):
    """A tiny FlanT5-style SentencePiece tokenizer trained on TINY_CORPUS, saved to a folder."""
    from hf_vlm.testing import TINY_CORPUS
    from hf_vlm.tokenization import train_t5_tokenizer

    path = tmp_path_factory.mktemp("t5_tokenizer")
    train_t5_tokenizer(TINY_CORPUS, vocab_size=96, output_dir=path)
    return path


@pytest.fixture(scope="session")
def bert_tokenizer_dir(tmp_path_factory):
    """A tiny BLIP-2 Q-Former (BERT WordPiece) tokenizer trained on TINY_CORPUS: 256 ids, [DEC] = 255 (blip2-tiny)."""
    from hf_vlm.testing import TINY_CORPUS
    from hf_vlm.tokenization import train_bert_tokenizer

    path = tmp_path_factory.mktemp("bert_tokenizer")
    train_bert_tokenizer(TINY_CORPUS, vocab_size=256, output_dir=path)
    return path


@pytest.fixture(scope="module")
def torch_one_thread():
    """One intra-op thread for tiny models: on a shared 2-core machine, torch's spinning worker threads make small
    matmuls ~50x slower (measured). Restored after the module."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def http_server():
    """`serve(folder) -> "http://127.0.0.1:PORT"`: a real HTTP server on the loopback serving a folder's files
    (stopped after the test)."""
    import functools
    import http.server
    import threading

    servers = []

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    def serve(folder) -> str:
        handler = functools.partial(Quiet, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def blip2_checkpoint(tmp_path_factory):
    """A blip2-tiny checkpoint folder (random weights, 32-pixel processor) for `hf-vlm eval` runs."""
    import torch
    from transformers import AutoModelForImageTextToText

    import hf_vlm  # noqa: F401
    from hf_vlm.modeling.blip2_flant5 import Blip2FlanT5Processor
    from hf_vlm.presets import get_config
    from hf_vlm.testing import TINY_CORPUS
    from hf_vlm.tokenization import train_t5_tokenizer

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("blip2-tiny")
    processor = Blip2FlanT5Processor.from_tokenizers(train_t5_tokenizer(TINY_CORPUS, vocab_size=96), image_size=32)
    AutoModelForImageTextToText.from_config(get_config("blip2-tiny")).save_pretrained(path)
    processor.save_pretrained(path)
    return path
