"""NLVR2 accuracy and consistency, as defined by the official ``nlvr2/eval/metrics.py`` (lil-lab/nlvr).

* accuracy: share of examples whose predicted truth value equals the label (compared
  case-insensitively, "true" == "True");
* consistency: NLVR2 pairs one sentence with several image pairs; an identifier reads
  ``split-set-pair-sentence`` (e.g. ``dev-850-1-0``), and removing its third field (the pair) gives
  the sentence. Consistency is the share of those sentences whose examples are *all* right.

Differences from the official script, all of them stricter: a prediction for an identifier that is
not in the data file, a duplicated identifier, and a prediction or label other than true/false are
errors (the official script ignores extra predictions, keeps the last duplicate and counts an
unknown value as wrong).

Prediction formats accepted (:func:`load_predictions`): a JSON array
``[{"identifier": str, "prediction": "True"|"False"}]``, a JSON object ``{identifier: prediction}``,
JSON lines of such records, or the official CSV: one ``identifier,prediction`` line per example
(an optional ``identifier,prediction`` header line is skipped). Predictions may also be JSON booleans.
Reading the files (and these formats) lives in ``data_pipelines.formats.nlvr2``; this module scores.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Union

from data_pipelines.formats.io import PathLike, preview, source_name
from data_pipelines.formats.nlvr2 import load_labels, load_predictions, parse_truth_value, sentence_key
from tasks.metrics import MetricInputError

__all__ = ["parse_truth_value", "sentence_key", "load_labels", "load_predictions", "nlvr2_scores"]


def nlvr2_scores(
    data: Union[PathLike, List[Mapping[str, Any]]],
    results: Union[PathLike, List[Mapping[str, Any]], Mapping[str, Any]],
) -> Dict[str, Any]:
    """Accuracy and consistency of ``results`` on the labelled NLVR2 ``data``.

    Every example of ``data`` needs exactly one prediction, and every prediction must belong to an
    example; otherwise :class:`MetricInputError` lists the offending identifiers.

    Returns ``{"accuracy", "consistency"}`` in percent (unrounded) and the counts behind them:
    ``num_examples``, ``num_correct``, ``num_sentences``, ``num_consistent``.
    """
    labels = load_labels(data)
    preds = load_predictions(results)
    dname, rname = source_name(data, "data"), source_name(results, "results")
    missing = [i for i in labels if i not in preds]
    unknown = [i for i in preds if i not in labels]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"{len(missing)} examples of {dname} have no prediction: {preview(missing)}")
        if unknown:
            parts.append(f"{len(unknown)} predicted identifiers are not in {dname}: {preview(unknown)}")
        raise MetricInputError(f"{rname}: " + "; ".join(parts))

    correct = 0
    sentence_ok: Dict[str, bool] = {}
    for ident, label in labels.items():
        right = preds[ident] == label
        correct += right
        key = sentence_key(ident)
        sentence_ok[key] = sentence_ok.get(key, True) and right
    consistent = sum(sentence_ok.values())
    return {
        "accuracy": 100.0 * correct / len(labels),
        "consistency": 100.0 * consistent / len(sentence_ok),
        "num_examples": len(labels),
        "num_correct": correct,
        "num_sentences": len(sentence_ok),
        "num_consistent": consistent,
    }
