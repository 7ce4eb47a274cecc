"""Quality metrics on a 0-100 scale: ROUGE-L F-measure (mean over examples) and corpus BLEU (sacrebleu)."""

from __future__ import annotations

import sacrebleu
from rouge_score import rouge_scorer


def rouge_l(predictions: list[str], references: list[str]) -> float | None:
    """Mean ROUGE-L F-measure over examples, x100 (stemmed, as in the usual XSUM/CNN-DM numbers); None if empty."""
    _check_lengths(predictions, references)
    if not predictions:
        return None
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(reference, prediction)["rougeL"].fmeasure for prediction, reference in zip(predictions, references)]
    return 100.0 * sum(scores) / len(scores)


def bleu(predictions: list[str], references: list[str]) -> float | None:
    """sacrebleu corpus BLEU with its default 13a tokenization, one reference per example; None if empty."""
    _check_lengths(predictions, references)
    if not predictions:
        return None
    return float(sacrebleu.corpus_bleu(predictions, [references]).score)


def _check_lengths(predictions: list[str], references: list[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
