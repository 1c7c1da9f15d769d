"""VQA accuracy: the VQAv2 metric with the official answer normalization (VQA evaluation code).

Normalization: newlines/tabs to spaces; punctuation removed (or turned into a space when it sits
inside a word, unless the answer has a digit-comma-digit); periods not followed by a digit removed;
lowercase; number words "none", "zero".."ten" -> digits; articles a/an/the dropped; apostrophe-less
contractions restored ("dont" -> "don't").

Accuracy of one answer against its reference answers: min(#references equal to it / 3, 1), averaged
over the leave-one-out subsets of the references (with VQAv2's 10 answers: the 10 subsets of 9). With a
single reference it is exact match after normalization. References are normalized like predictions
(the official script leaves VQAv2's already-normalized answers as they are; the result is the same).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence

_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                ",", "?", "!"]
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The official pattern is "(?!<=\d)(\.)(?!\d)"; its first group is a look-ahead that always holds, so
# in effect: a period not followed by a digit.
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# The contractions the official table restores; each is looked up with any one apostrophe left out
# ("couldnt've" and "couldn'tve" -> "couldn't've"), which is exactly the official table's key set.
_CONTRACTED = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've
mustn't must've needn't not've o'clock oughtn't shan't she'd've should've shouldn't shouldn't've
somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've
something'll that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas
wasn't we'd've we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've
who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've
you'd you'd've you'll you're you've""".split()
_CONTRACTIONS = {
    word[:i] + word[i + 1:]: word for word in _CONTRACTED for i, char in enumerate(word) if char == "'"
}


def _strip_punctuation(text: str) -> str:
    out = text
    remove = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for mark in _PUNCTUATION:
        if remove or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out)


def normalize_answer(answer: str) -> str:
    text = _strip_punctuation(answer.replace("\n", " ").replace("\t", " ").strip())
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """The VQA accuracy of one predicted answer (0..1); see the module docstring."""
    if isinstance(references, str) or not references:
        raise ValueError(f"references must be a non-empty list of answers, got {references!r}")
    predicted = normalize_answer(prediction)
    refs = [normalize_answer(r) for r in references]
    if len(refs) == 1:
        return float(predicted == refs[0])
    scores = [min(1.0, sum(ref == predicted for j, ref in enumerate(refs) if j != i) / 3) for i in range(len(refs))]
    return sum(scores) / len(scores)


def vqa_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]],
                question_types: Sequence[str] | None = None) -> dict[str, float]:
    """Mean VQA accuracy, plus one `vqa_accuracy/<type>` per question type when types are given."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("no predictions to score")
    scores = [vqa_accuracy(p, refs) for p, refs in zip(predictions, references)]
    metrics = {"vqa_accuracy": sum(scores) / len(scores)}
    if question_types is not None:
        if len(question_types) != len(scores):
            raise ValueError(f"{len(question_types)} question types for {len(scores)} predictions")
        by_type = defaultdict(list)
        for kind, score in zip(question_types, scores):
            by_type[kind].append(score)
        metrics.update({f"vqa_accuracy/{kind}": sum(v) / len(v) for kind, v in sorted(by_type.items())})
    return metrics
