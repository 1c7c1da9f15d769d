"""Evaluation of captioning, VQA, zero-shot classification and retrieval.

Metrics (pure python + numpy): `caption_metrics` (COCO's CIDEr-D and BLEU-1..4, exact match),
`vqa_metrics` (the VQAv2 accuracy with its answer normalization), `topk_accuracy` (zero-shot top-1/5),
`retrieval_recall` (R@1/5/10 image->text and text->image). `run_eval` (hf_vlm.evaluation.runner, what
`hf-vlm eval` calls) runs a checkpoint over a dataset; results go to `eval_results.json` next to the
checkpoint (`save_results`).
"""

from hf_vlm.evaluation.captioning import bleu, caption_metrics, cider_d, tokenize_caption
from hf_vlm.evaluation.ranking import retrieval_recall, topk_accuracy
from hf_vlm.evaluation.results import RESULTS_FILE, format_table, load_results, save_results
from hf_vlm.evaluation.runner import TASKS, evaluate, load_eval_data, load_model, run_eval
from hf_vlm.evaluation.vqa import normalize_answer, vqa_accuracy, vqa_metrics

__all__ = [
    "RESULTS_FILE", "TASKS", "bleu", "caption_metrics", "cider_d", "evaluate", "format_table", "load_eval_data",
    "load_model", "load_results", "normalize_answer", "retrieval_recall", "run_eval", "save_results",
    "tokenize_caption", "topk_accuracy", "vqa_accuracy", "vqa_metrics",
]
