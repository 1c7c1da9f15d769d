"""Zero-shot classification top-k accuracy and image-text retrieval recall@K, from scores.

Ties count against the model: an item is "in the top k" only if fewer than k competitors score at
least as high. (A model that gives every candidate the same score gets 0, not 100%.)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def fill_template(template: str, label: str) -> str:
    """A zero-shot prompt: `template` with its one `{}` replaced by `label` as plain text. Never str.format, so
    a template such as `{{}}{:>99999999}` (from a Space visitor or a --template) stays those characters."""
    if template.count("{}") != 1:
        raise ValueError(f"a zero-shot template must contain {{}} exactly once (where the class name goes), "
                         f"got {template!r}")
    return template.replace("{}", label)


def _as_matrix(scores, name: str) -> np.ndarray:
    if hasattr(scores, "detach"):  # a torch tensor
        scores = scores.detach().float().cpu().numpy()
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or 0 in scores.shape:
        raise ValueError(f"{name} must be a non-empty 2-D matrix, got shape {scores.shape}")
    return scores


def _best_rank(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """Per row: the 0-based rank of its best relevant column, counting ties against it."""
    best = np.where(relevant, scores, -np.inf).max(axis=1, keepdims=True)
    # competitors scoring at least as high as the best relevant one, the relevant ones excluded
    return ((scores >= best) & ~relevant).sum(axis=1)


def topk_accuracy(logits, labels: Sequence[int], ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Zero-shot classification: logits [num_images, num_classes], labels [num_images] ->
    {"top1": ..., "top5": ...} (a k larger than the number of classes is capped at it)."""
    logits = _as_matrix(logits, "logits")
    labels = np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels, dtype=np.int64)
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"labels must have shape ({logits.shape[0]},) to match logits {logits.shape}, "
                         f"got {labels.shape}")
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(f"labels must lie in [0, {logits.shape[1]}), got {labels.min()}..{labels.max()}")
    relevant = np.zeros_like(logits, dtype=bool)
    relevant[np.arange(len(labels)), labels] = True
    rank = _best_rank(logits, relevant)
    return {f"top{k}": float((rank < min(k, logits.shape[1])).mean()) for k in ks}


def retrieval_recall(similarity, text_to_images: Sequence[int | Sequence[int]],
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K both ways from similarity [num_images, num_texts].

    `text_to_images[t]` is the image (or images) text t describes; several texts per image are the
    COCO/Flickr setting (5 captions each). Image->text: an image counts as found if any of its texts
    is among its top K texts. Text->image: a text counts if one of its images is among its top K.
    """
    similarity = _as_matrix(similarity, "similarity")
    num_images, num_texts = similarity.shape
    if len(text_to_images) != num_texts:
        raise ValueError(f"text_to_images has {len(text_to_images)} entries for {num_texts} texts")
    relevant = np.zeros((num_images, num_texts), dtype=bool)
    for text, images in enumerate(text_to_images):
        for image in [images] if np.isscalar(images) else images:
            if not 0 <= image < num_images:
                raise ValueError(f"text_to_images[{text}] = {image} is not an image index (0..{num_images - 1})")
            relevant[image, text] = True
    if not relevant.any(axis=1).all():
        missing = np.flatnonzero(~relevant.any(axis=1))[:5].tolist()
        raise ValueError(f"images {missing} have no text in text_to_images")
    image_rank = _best_rank(similarity, relevant)
    text_rank = _best_rank(similarity.T, relevant.T)
    metrics = {}
    for k in ks:
        metrics[f"image_to_text_R@{k}"] = float((image_rank < k).mean())
    for k in ks:
        metrics[f"text_to_image_R@{k}"] = float((text_rank < k).mean())
    return metrics
