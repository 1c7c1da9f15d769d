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


def train_sentencepiece_model(texts: Iterable[str], vocab_size: int, *, model_type: str = "unigram",
                              **trainer_options) -> bytes:
    """Train a SentencePiece model with T5's special ids (pad 0, eos 1, unk 2, no bos) unless
    `trainer_options` say otherwise (any SentencePieceTrainer option, e.g. bos_id=3).

    The vocabulary is a soft limit: a tiny corpus yields fewer pieces rather than an error. On small,
    repetitive corpora (captions of synthetic scenes) use model_type="bpe": the unigram trainer stops at
    few pieces there (59 of 128 asked), splitting frequent words into letters, where BPE keeps whole words.
    The transformers tokenizers below are converted from this model as a Unigram pipeline over its pieces
    and scores; for a BPE model their splits can differ from SentencePiece's own, so tokenizer.json (not
    spiece.model) is the tokenizer of record.
    """
    import sentencepiece as spm

    options = dict(pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, hard_vocab_limit=False,
                   minloglevel=2)
    options.update(trainer_options)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
                                   model_type=model_type, **options)
    return model.getvalue()


def train_t5_tokenizer(texts: Iterable[str], vocab_size: int, output_dir: str | Path | None = None, *,
                       model_type: str = "unigram", **kwargs):
    """A `T5Tokenizer` (FlanT5 conventions: pad 0, eos 1, unk 2, no sentinel ids) trained on `texts`.

    Saved to `output_dir` when given (spiece.model is kept next to tokenizer.json).
    """
    from transformers import T5Tokenizer

    model_bytes = train_sentencepiece_model(texts, vocab_size, model_type=model_type)
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


# --------------------------------------------------------------------------------------------------- CoCa
# CoCa v2's SentencePiece ids: T5's pad/eos/unk plus a start-of-text token, which captioning needs (the
# decoder predicts the first word from it). Every text is encoded as `<s> text </s>`.
COCA_SPECIAL_TOKENS = {"pad": ("<pad>", 0), "eos": ("</s>", 1), "unk": ("<unk>", 2), "bos": ("<s>", 3)}

# open_clip's CoCa encodes 76 tokens per text (start and end included); its text encoder appends a CLS.
COCA_CLIP_MAX_LENGTH = 76


def train_coca_tokenizer(
    texts: Iterable[str], vocab_size: int, output_dir: str | Path | None = None, *, model_max_length: int = 76,
    model_type: str = "unigram",
):
    """A fast tokenizer for CoCa v2 trained on `texts`: SentencePiece (unigram by default) with ids pad 0, eos 1, unk 2,
    bos 3 (`COCA_SPECIAL_TOKENS`), encoding every text as `<s> text </s>`.

    The result is a plain `PreTrainedTokenizerFast` (tokenizer.json), loadable with `AutoTokenizer` without
    hf_vlm. Saved to `output_dir` when given (the SentencePiece model is kept as spiece.model).
    """
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast, T5Tokenizer

    (pad, pad_id), (eos, eos_id), (unk, unk_id), (bos, bos_id) = (
        COCA_SPECIAL_TOKENS[k] for k in ("pad", "eos", "unk", "bos")
    )
    model_bytes = train_sentencepiece_model(
        texts, vocab_size, model_type=model_type, pad_id=pad_id, eos_id=eos_id, unk_id=unk_id, bos_id=bos_id,
        pad_piece=pad, eos_piece=eos, unk_piece=unk, bos_piece=bos,
    )
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "spiece.model").write_bytes(model_bytes)
        # T5Tokenizer converts the SentencePiece model into a `tokenizers` Unigram pipeline; we only keep that.
        backend = T5Tokenizer.from_pretrained(tmp, extra_ids=0).backend_tokenizer
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} $B {eos}", special_tokens=[(bos, bos_id), (eos, eos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad,
        model_max_length=model_max_length,
    )
    if tokenizer.convert_tokens_to_ids([pad, eos, unk, bos]) != [pad_id, eos_id, unk_id, bos_id]:
        raise RuntimeError(f"SentencePiece did not keep CoCa's special ids {COCA_SPECIAL_TOKENS}")
    if output_dir is not None:
        tokenizer.save_pretrained(output_dir)
        (Path(output_dir) / "spiece.model").write_bytes(model_bytes)
    return tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to a printable character (open_clip's table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def open_clip_bpe_path() -> Path:
    """The BPE merges file that open_clip_torch ships (`bpe_simple_vocab_16e6.txt.gz`)."""
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall open_clip_torch (pip install open_clip_torch)")
    return path


def clip_tokenizer_from_open_clip(
    bpe_path: str | Path | None = None, output_dir: str | Path | None = None, *, model_max_length: int = COCA_CLIP_MAX_LENGTH
):
    """A transformers `CLIPTokenizer` equal to open_clip's CoCa tokenizer, built from open_clip's BPE file.

    Same vocabulary (49,408: 512 byte symbols, 48,894 merges, `<|startoftext|>` 49406, `<|endoftext|>` 49407),
    same ids for every text token; `model_max_length` 76 as open_clip's CoCa. Padding is `<|endoftext|>`
    (transformers' CLIP convention) where open_clip pads with 0: padding is masked, and a model with
    `legacy_cls_mask` embeds padding as `legacy_pad_token_id` itself. Not done: open_clip's ftfy/html clean-up.
    """
    import gzip

    from transformers import CLIPTokenizer

    lines = gzip.open(bpe_path or open_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]  # open_clip's slice
    alphabet = list(_bytes_to_unicode().values())
    vocab = alphabet + [symbol + "</w>" for symbol in alphabet] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(
        vocab={token: i for i, token in enumerate(vocab)}, merges=merges, model_max_length=model_max_length,
    )
    if output_dir is not None:
        tokenizer.save_pretrained(output_dir)
    return tokenizer
