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
