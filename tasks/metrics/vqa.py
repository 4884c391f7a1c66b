"""VQA (v1/v2) open-ended accuracy, written from the behaviour of the official ``vqaEval.py``.

The official evaluation (GT-Vision-Lab/VQA, ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``, the
Python 3 revision on its master branch) does, for every question id, in annotation-file order:

1. the predicted answer: replace ``\\n`` and ``\\t`` by spaces, strip, then always
   :func:`process_punctuation` and :func:`process_digit_article` (lower-case, number words to
   digits, articles dropped, contractions fixed);
2. the ground-truth answers are used as written, except that when they are *not* all identical
   every one of them goes through :func:`process_punctuation` (only that step: no lower-casing, no
   number words, no articles). So a prediction "2" never matches ground truths "two", and unanimous
   ground truths must equal the normalised prediction character for character;
3. leave-one-out: for each ground-truth answer record, drop it (every record *equal* to it, comparing
   the whole record, i.e. answer text, confidence and answer id), count the remaining answers equal to
   the prediction, score ``min(1, count / 3)``; the question's accuracy is the mean of these scores;
4. report ``round(100 * mean, 2)`` overall, per answer type, per question type, and per question.

Older revisions (Python 2, and copies vendored elsewhere) differ in details, e.g. the punctuation
list or which side is normalised; this module follows the master revision described above.

:func:`normalize_answer` is the full normalisation (whitespace, punctuation, number words, articles,
contractions) that the official script applies to predictions; the answer vocabulary
(:func:`build_answer_vocab`) and the soft targets use it too, so a trained model predicts answers
in the normalised form. The normalisation, the answer vocabulary and the readers of the questions,
annotations and result files live in ``data_pipelines.formats.vqa`` (shared with the shard writers
and the readers); this module scores.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Dict, List, Optional, Tuple, Union

from data_pipelines.formats.io import PathLike, load_input, preview
from data_pipelines.formats.vqa import (
    ARTICLES,
    CONTRACTIONS,
    NUMBER_WORDS,
    PUNCTUATION,
    build_answer_vocab,
    clean_whitespace,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    parse_annotations,
    parse_questions,
    parse_results,
)
from tasks.metrics import MetricInputError

__all__ = [
    "PUNCTUATION",
    "NUMBER_WORDS",
    "ARTICLES",
    "CONTRACTIONS",
    "clean_whitespace",
    "process_punctuation",
    "process_digit_article",
    "normalize_answer",
    "question_accuracy",
    "vqa_accuracy",
    "build_answer_vocab",
]


# --------------------------------------------------------------------------------------------
# Per-question accuracy
# --------------------------------------------------------------------------------------------


def _record_key(record: Mapping[str, Any]) -> Optional[Tuple[Any, ...]]:
    """A hashable stand-in for whole-record equality, or None when a value is not hashable."""
    try:
        key = tuple(sorted(record.items()))
        hash(key)
        return key
    except TypeError:
        return None


def _duplicate_counts(records: Sequence[Any]) -> List[int]:
    """For each record, how many records (itself included) are equal to it.

    Plain strings stand for distinct annotators, so each counts once; mappings are compared whole,
    as the official script compares its answer dicts.
    """
    if all(not isinstance(r, Mapping) for r in records):
        return [1] * len(records)
    keys = [_record_key(r) if isinstance(r, Mapping) else ("#", i) for i, r in enumerate(records)]
    if all(k is not None for k in keys):
        counts = Counter(keys)
        return [counts[k] for k in keys]
    return [sum(1 for other in records if other == r) if isinstance(r, Mapping) else 1 for r in records]


def question_accuracy(answer: str, gt_answers: Sequence[Union[str, Mapping[str, Any]]]) -> float:
    """Accuracy in [0, 1] of one predicted ``answer`` against a question's ground-truth answers.

    ``gt_answers`` are the annotation's ``answers`` records (``{"answer", "answer_confidence",
    "answer_id"}``; compared whole for the leave-one-out step, as officially) or plain strings (one
    per annotator). Normally there are 10; any non-zero number works.
    """
    if len(gt_answers) == 0:
        raise ValueError("a question needs at least one ground-truth answer")
    records: List[Any] = [dict(gt) if isinstance(gt, Mapping) else gt for gt in gt_answers]
    texts = [r["answer"] if isinstance(r, dict) else r for r in records]
    predicted = normalize_answer(answer)
    if len(set(texts)) > 1:
        texts = [process_punctuation(t) for t in texts]
        for i, rec in enumerate(records):
            if isinstance(rec, dict):
                rec["answer"] = texts[i]
            else:
                records[i] = texts[i]
    hits = [t == predicted for t in texts]
    total_hits = sum(hits)
    dup = _duplicate_counts(records)
    # Removing record i removes every record equal to it (dup[i] of them); they all share its answer.
    scores = [min(1.0, (total_hits - dup[i] * hits[i]) / 3.0) for i in range(len(records))]
    return float(sum(scores)) / len(scores)



# --------------------------------------------------------------------------------------------
# Dataset accuracy
# --------------------------------------------------------------------------------------------


def vqa_accuracy(
    questions_json: Union[PathLike, Mapping[str, Any], Sequence[Any]],
    annotations_json: Union[PathLike, Mapping[str, Any], Sequence[Any]],
    results: Union[PathLike, Sequence[Mapping[str, Any]]],
    *,
    ndigits: int = 2,
) -> Dict[str, Any]:
    """Official VQA accuracy of ``results`` on the questions of ``questions_json``.

    Each argument is a path or the already-parsed JSON: the questions file
    (``{"questions": [{"question_id", ...}]}``), the annotations file (``{"annotations": [...]}``) and
    the results list ``[{"question_id": int, "answer": str}]``. The question ids of the three must be
    the same set (as the official ``loadRes`` demands); otherwise :class:`MetricInputError` lists the
    missing, extra or duplicated ids.

    Returns ``{"overall", "perAnswerType", "perQuestionType", "perQuestion", "num_questions"}`` with
    accuracies in percent rounded to ``ndigits`` (2 like the official script); ``perQuestion`` maps
    question id to its rounded accuracy (the official ``evalQA``).
    """
    qdoc, qname = load_input(questions_json, "questions")
    adoc, aname = load_input(annotations_json, "annotations")
    rdoc, rname = load_input(results, "results")
    qids = parse_questions(qdoc, qname)
    anns = parse_annotations(adoc, aname)
    predicted = parse_results(rdoc, rname)
    if not anns:
        raise MetricInputError(f"{aname}: no annotations to evaluate")

    qset = set(qids)
    aset = {a["question_id"] for a in anns}
    if qset != aset:
        parts = []
        if aset - qset:
            parts.append(f"annotated but not in the questions file: {preview(aset - qset)}")
        if qset - aset:
            parts.append(f"without annotation: {preview(qset - aset)}")
        raise MetricInputError(f"{aname}: annotations do not match {qname}: " + "; ".join(parts))
    rset = set(predicted)
    if rset != qset:
        parts = []
        if qset - rset:
            parts.append(f"{len(qset - rset)} questions have no answer: {preview(qset - rset)}")
        if rset - qset:
            parts.append(f"{len(rset - qset)} answered question ids are not in {qname}: "
                         f"{preview(rset - qset)}")
        raise MetricInputError(f"{rname}: results must answer exactly the questions of {qname}; "
                               + "; ".join(parts))

    overall: List[float] = []
    by_answer_type: Dict[str, List[float]] = {}
    by_question_type: Dict[str, List[float]] = {}
    per_question: Dict[int, float] = {}
    for ann in anns:
        qid = ann["question_id"]
        acc = question_accuracy(predicted[qid], ann["answers"])
        overall.append(acc)
        by_question_type.setdefault(ann["question_type"], []).append(acc)
        by_answer_type.setdefault(ann["answer_type"], []).append(acc)
        per_question[qid] = round(100 * acc, ndigits)

    def pct(values: List[float]) -> float:
        return round(100 * float(sum(values)) / len(values), ndigits)

    return {
        "overall": pct(overall),
        "perAnswerType": {k: pct(v) for k, v in by_answer_type.items()},
        "perQuestionType": {k: pct(v) for k, v in by_question_type.items()},
        "perQuestion": per_question,
        "num_questions": len(overall),
    }

