"""Quality metrics on a 0-100 scale: ROUGE-L F-measure (mean over examples), corpus BLEU (sacrebleu), and repetition."""

from __future__ import annotations

from bild.extras import require

require("eval", "bild's evaluation metrics")

import sacrebleu  # noqa: E402  (after the extra check)
from rouge_score import rouge_scorer  # noqa: E402

from bild.policies import repeated_ngrams


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


def repetition(predictions: list[str], n: int = 4) -> float | None:
    """seq-rep-n (Welleck et al., 2020), x100: the share of an output's word n-grams that repeat an earlier n-gram of
    the same output, mean over the outputs that have at least one n-gram; None if none has.

    A drafter that falls into a loop the large model does not reject (each repeated token is likely under it too)
    shows here, while ROUGE-L against one-sentence references barely moves.
    """
    shares = []
    for prediction in predictions:
        words = prediction.split()
        if len(words) >= n:
            shares.append(sum(repeated_ngrams(words, 0, n)) / (len(words) - n + 1))
    return 100.0 * sum(shares) / len(shares) if shares else None


def _check_lengths(predictions: list[str], references: list[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
