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
