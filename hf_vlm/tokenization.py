"""Train SentencePiece tokenizers on captions and wrap them as transformers fast tokenizers.

FlanT5's and CoCa-v2's tokenizers are SentencePiece models; the real files cannot be downloaded
here, so tests and the demo train small ones on their own captions. The result is a standard
transformers tokenizer (saved as tokenizer.json), loadable without hf_vlm.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Iterable
from pathlib import Path


def train_sentencepiece_model(texts: Iterable[str], vocab_size: int, *, model_type: str = "unigram") -> bytes:
    """Train a SentencePiece model with T5's special ids (pad 0, eos 1, unk 2, no bos).

    The vocabulary is a soft limit: a tiny corpus yields fewer pieces rather than an error.
    """
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return model.getvalue()


def train_t5_tokenizer(texts: Iterable[str], vocab_size: int, output_dir: str | Path | None = None, **kwargs):
    """A `T5Tokenizer` (FlanT5 conventions: pad 0, eos 1, unk 2, no sentinel ids) trained on `texts`.

    Saved to `output_dir` when given (spiece.model is kept next to tokenizer.json).
    """
    from transformers import T5Tokenizer

    model_bytes = train_sentencepiece_model(texts, vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "spiece.model").write_bytes(model_bytes)
        tokenizer = T5Tokenizer.from_pretrained(tmp, extra_ids=0, **kwargs)
    if output_dir is not None:
        tokenizer.save_pretrained(output_dir)
        (Path(output_dir) / "spiece.model").write_bytes(model_bytes)
    return tokenizer


def train_bert_tokenizer(
    texts: Iterable[str], vocab_size: int, output_dir: str | Path | None = None, *, dec_token: str = "[DEC]"
):
    """A lower-casing BERT WordPiece tokenizer (the BLIP-2 Q-Former's) trained on `texts`, with exactly
    `vocab_size` ids: [PAD] 0, [UNK], [CLS], [SEP], [MASK], the learned pieces, `[unusedN]` fillers, and LAVIS's
    `dec_token` (the bos token that starts image-grounded generation) as the last id, `vocab_size - 1`.

    Saved to `output_dir` when given.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.train_from_iterator(
        list(texts), trainers.WordPieceTrainer(vocab_size=vocab_size - 1, special_tokens=specials, show_progress=False)
    )
    learned = sorted(wordpiece.get_vocab().items(), key=lambda item: item[1])
    pieces = [token for token, _ in learned if token not in specials]
    if len(specials) + len(pieces) > vocab_size - 1:
        raise ValueError(f"vocab_size {vocab_size} is too small for the trained pieces ({len(pieces)})")
    fillers = [f"[unused{i}]" for i in range(vocab_size - 1 - len(specials) - len(pieces))]
    vocab = {token: i for i, token in enumerate(specials + pieces + fillers + [dec_token])}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, bos_token=dec_token)
    if tokenizer.convert_tokens_to_ids(dec_token) != vocab_size - 1 or len(tokenizer) != vocab_size:
        raise AssertionError(f"{dec_token} must be the last of {vocab_size} ids, got {tokenizer.convert_tokens_to_ids(dec_token)}")
    if output_dir is not None:
        tokenizer.save_pretrained(output_dir)
    return tokenizer

