"""Caption metrics: CIDEr-D and BLEU-1..4 exactly as the COCO caption evaluation computes them
(pycocoevalcap's Cider and Bleu scorers), plus exact match. Pure python, no Java.

COCO tokenizes with the Stanford PTB tokenizer (Java) and drops punctuation tokens; here
`tokenize_caption` lowercases and strips punctuation, which gives the same tokens for plain captions.
The scores themselves match pycocoevalcap to floating-point precision on the same tokens (tests).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def tokenize_caption(text: str) -> str:
    """Lowercase, punctuation replaced by spaces, single spaces between words."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def _ngram_counts(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def _check(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("no predictions to score")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"references[{i}] must be a non-empty list of strings, got {refs!r}")


def cider_d(predictions: Sequence[str], references: Sequence[Sequence[str]], *, n: int = 4,
            sigma: float = 6.0) -> tuple[float, list[float]]:
    """CIDEr-D (Vedantam et al. 2015, as in the COCO evaluation): per image, the mean over n-gram
    orders 1..n of the tf-idf cosine similarity between the candidate and each reference (candidate
    weights clipped at the reference's), times a Gaussian length penalty, averaged over references,
    times 10. Document frequencies come from the references of the evaluated set itself.

    Inputs are whitespace-tokenized strings (see `tokenize_caption`). Returns (corpus score, per image).
    """
    _check(predictions, references)
    test_counts = [_ngram_counts(p.split(), n) for p in predictions]
    ref_counts = [[_ngram_counts(r.split(), n) for r in refs] for refs in references]
    document_frequency = Counter(ngram for refs in ref_counts for ngram in set().union(*refs))
    log_num_images = math.log(len(ref_counts))

    def tf_idf(counts: Counter):
        vectors = [{} for _ in range(n)]
        norms = [0.0] * n
        length = 0
        for ngram, term_frequency in counts.items():
            order = len(ngram) - 1
            weight = term_frequency * (log_num_images - math.log(max(1.0, document_frequency[ngram])))
            vectors[order][ngram] = weight
            norms[order] += weight * weight
            if order == 1:  # COCO's scorer measures length in bigrams (its `n == 1` branch); kept for parity
                length += term_frequency
        return vectors, [math.sqrt(x) for x in norms], length

    scores = []
    for test, refs in zip(test_counts, ref_counts):
        vec, norm, length = tf_idf(test)
        total = [0.0] * n
        for ref in refs:
            vec_ref, norm_ref, length_ref = tf_idf(ref)
            penalty = math.exp(-((length - length_ref) ** 2) / (2 * sigma**2))
            for order in range(n):
                value = sum(min(weight, vec_ref[order].get(ngram, 0.0)) * vec_ref[order].get(ngram, 0.0)
                            for ngram, weight in vec[order].items())
                if norm[order] != 0 and norm_ref[order] != 0:
                    value /= norm[order] * norm_ref[order]
                total[order] += value * penalty
        scores.append(sum(total) / n / len(refs) * 10.0)
    return sum(scores) / len(scores), scores


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]], *, n: int = 4) -> list[float]:
    """Corpus BLEU-1..n as COCO computes it: clipped n-gram precisions summed over the corpus,
    geometric mean, brevity penalty against the sum of per-image "closest" reference lengths
    (ties go to the shorter reference). Inputs are whitespace-tokenized strings."""
    _check(predictions, references)
    tiny, small = 1e-15, 1e-9  # COCO's smoothing constants: a zero count gives ~0, never a division error
    guess, correct = [0] * n, [0] * n
    test_length = ref_length = 0
    for prediction, refs in zip(predictions, references):
        words = prediction.split()
        counts = _ngram_counts(words, n)
        max_ref_counts: Counter = Counter()
        ref_lengths = []
        for ref in refs:
            ref_words = ref.split()
            ref_lengths.append(len(ref_words))
            max_ref_counts |= _ngram_counts(ref_words, n)  # | keeps the maximum count per n-gram
        test_length += len(words)
        ref_length += min((abs(length - len(words)), length) for length in ref_lengths)[1]
        for k in range(n):
            guess[k] += max(0, len(words) - k)
        for ngram, count in counts.items():
            correct[len(ngram) - 1] += min(max_ref_counts[ngram], count)
    scores, product = [], 1.0
    for k in range(n):
        product *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (test_length + tiny) / (ref_length + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def caption_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """CIDEr (CIDEr-D), BLEU-1..4 and exact match of raw caption strings (tokenized here)."""
    _check(predictions, references)
    predictions = [tokenize_caption(p) for p in predictions]
    references = [[tokenize_caption(r) for r in refs] for refs in references]
    cider_score, _ = cider_d(predictions, references)
    bleus = bleu(predictions, references)
    exact = sum(p in refs for p, refs in zip(predictions, references)) / len(predictions)
    return {"cider": cider_score, **{f"bleu{k + 1}": b for k, b in enumerate(bleus)}, "exact_match": exact}
