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
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Mapping, Tuple, Union

from tasks.metrics import MetricInputError, PathLike, describe, is_path, preview, read_text, source_name

__all__ = ["parse_truth_value", "sentence_key", "load_labels", "load_predictions", "nlvr2_scores"]


def parse_truth_value(value: Any) -> bool:
    """``"True"``/``"False"`` in any case (surrounding spaces ignored) or a JSON boolean -> bool."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("true", "false"):
            return v == "true"
    raise ValueError(f"expected 'True' or 'False', got {describe(value)}")


def sentence_key(identifier: str) -> str:
    """The sentence an example belongs to: its identifier without the third (image-pair) field.

    ``"dev-850-1-0"`` -> ``"dev-850-0"``. Raises ``ValueError`` for identifiers with fewer than
    three ``-``-separated fields.
    """
    fields = identifier.split("-")
    if len(fields) < 3:
        raise ValueError(f"identifier {identifier!r} is not of the form split-set-pair-sentence")
    return "-".join(fields[:2] + fields[3:])


def _json_lines(text: str, name: str) -> List[Any]:
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise MetricInputError(f"{name}: line {lineno} is not valid JSON ({err.msg})") from None
    return records


def load_labels(data: Union[PathLike, List[Mapping[str, Any]]]) -> Dict[str, bool]:
    """``{identifier: label}`` from the NLVR2 data file (JSON lines, or a JSON array of the same
    records) or from a list of already-parsed records."""
    name = source_name(data, "data")
    if is_path(data):
        text = read_text(data, "NLVR2 data file")
        stripped = text.lstrip()
        if stripped.startswith("["):
            try:
                records = json.loads(text)
            except json.JSONDecodeError as err:
                raise MetricInputError(f"{name}: not valid JSON ({err.msg} at line {err.lineno} "
                                       f"column {err.colno})") from None
        else:
            records = _json_lines(text, name)
    else:
        records = data
    if not isinstance(records, (list, tuple)):
        raise MetricInputError(f"{name}: expected NLVR2 records, got {describe(records)}")
    labels: Dict[str, bool] = {}
    dups = set()
    for i, rec in enumerate(records):
        where = f"{name}: record {i + 1}"
        if not isinstance(rec, Mapping):
            raise MetricInputError(f"{where} is {describe(rec)}, expected a JSON object")
        ident = rec.get("identifier")
        if not isinstance(ident, str):
            raise MetricInputError(f"{where}: 'identifier' must be a string, got {describe(ident)}")
        if "label" not in rec:
            raise MetricInputError(f"{where} ({ident}): no 'label' (an unlabelled split cannot be scored)")
        try:
            label = parse_truth_value(rec["label"])
            sentence_key(ident)
        except ValueError as err:
            raise MetricInputError(f"{where} ({ident}): {err}") from None
        if ident in labels:
            dups.add(ident)
        labels[ident] = label
    if dups:
        raise MetricInputError(f"{name}: {len(dups)} duplicate identifiers: {preview(dups)}")
    if not labels:
        raise MetricInputError(f"{name}: no examples")
    return labels


def _from_records(records: Any, name: str) -> List[Tuple[str, Any, str]]:
    """(identifier, raw prediction, where) triples from a JSON array / JSON lines / mapping."""
    if isinstance(records, Mapping):
        return [(k, v, f"{name}: {k!r}") for k, v in records.items()]
    if not isinstance(records, (list, tuple)):
        raise MetricInputError(f"{name}: expected a list of {{\"identifier\", \"prediction\"}} or an "
                               f"object mapping identifier to prediction, got {describe(records)}")
    out = []
    for i, rec in enumerate(records):
        where = f"{name}: entry {i}"
        if not isinstance(rec, Mapping):
            raise MetricInputError(f"{where} is {describe(rec)}, expected "
                                   f'{{"identifier": str, "prediction": "True"|"False"}}')
        ident = rec.get("identifier")
        if not isinstance(ident, str):
            raise MetricInputError(f"{where}: 'identifier' must be a string, got {describe(ident)}")
        if "prediction" not in rec:
            raise MetricInputError(f"{where} ({ident}): no 'prediction'")
        out.append((ident, rec["prediction"], f"{where} ({ident})"))
    return out


def _from_csv(text: str, name: str) -> List[Tuple[str, Any, str]]:
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 2 or not fields[0]:
            raise MetricInputError(f"{name}: line {lineno}: expected 'identifier,prediction', "
                                   f"got {line[:60]!r}")
        if lineno == 1 and fields[0].lower() == "identifier":
            continue  # header
        out.append((fields[0], fields[1], f"{name}: line {lineno} ({fields[0]})"))
    return out


def load_predictions(results: Union[PathLike, List[Mapping[str, Any]], Mapping[str, Any]]) -> Dict[str, bool]:
    """``{identifier: predicted truth value}`` from any accepted prediction format (see module doc)."""
    name = source_name(results, "results")
    if is_path(results):
        text = read_text(results, "predictions file")
        stripped = text.lstrip()
        if stripped.startswith(("[", "{")):
            try:
                triples = _from_records(json.loads(text), name)
            except json.JSONDecodeError as err:
                if not stripped.startswith("{"):
                    raise MetricInputError(f"{name}: not valid JSON ({err.msg} at line {err.lineno} "
                                           f"column {err.colno})") from None
                try:  # JSON lines of {"identifier", "prediction"}
                    triples = _from_records(_json_lines(text, name), name)
                except MetricInputError:
                    raise MetricInputError(f"{name}: not valid JSON ({err.msg} at line {err.lineno} "
                                           f"column {err.colno}) nor JSON lines") from None
        else:
            triples = _from_csv(text, name)
    else:
        triples = _from_records(results, name)
    preds: Dict[str, bool] = {}
    dups = set()
    for ident, raw, where in triples:
        try:
            value = parse_truth_value(raw)
        except ValueError as err:
            raise MetricInputError(f"{where}: prediction {err}") from None
        if ident in preds:
            dups.add(ident)
        preds[ident] = value
    if dups:
        raise MetricInputError(f"{name}: {len(dups)} identifiers predicted more than once: {preview(dups)}")
    return preds


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
