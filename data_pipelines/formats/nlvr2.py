"""NLVR2: the data files (JSON lines), prediction files, truth values and identifiers.

Data file (``train.json`` / ``dev.json`` / ``test1.json``), one JSON object per line::

    {"identifier": "dev-850-1-0", "sentence": "...", "label": "True"|"False", "left_url", "right_url",
     "writer", "synset", "query", "directory" (train only), "validation", "extra_validations", ...}

An identifier reads ``split-set-pair-sentence``; removing its third field gives the sentence
(:func:`sentence_key`). Labels are the strings "True" / "False" (compared case-insensitively, JSON
booleans accepted: :func:`parse_truth_value`).

Prediction formats accepted (:func:`load_predictions`): a JSON array
``[{"identifier": str, "prediction": "True"|"False"}]``, a JSON object ``{identifier: prediction}``,
JSON lines of such records, or the official CSV: one ``identifier,prediction`` line per example
(an optional ``identifier,prediction`` header line is skipped). Predictions may also be JSON booleans.
:func:`write_predictions` writes the JSON array.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

from .io import FormatError, PathLike, atomic_write, describe, is_path, read_text, source_name, unique_by_id, write_json

__all__ = [
    "parse_truth_value", "sentence_key", "load_labels", "load_predictions", "write_predictions", "write_records",
]


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
            raise FormatError(f"{name}: line {lineno} is not valid JSON ({err.msg})") from None
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
                raise FormatError(f"{name}: not valid JSON ({err.msg} at line {err.lineno} "
                                       f"column {err.colno})") from None
        else:
            records = _json_lines(text, name)
    else:
        records = data
    if not isinstance(records, (list, tuple)):
        raise FormatError(f"{name}: expected NLVR2 records, got {describe(records)}")
    pairs: List[Tuple[str, bool]] = []
    for i, rec in enumerate(records):
        where = f"{name}: record {i + 1}"
        if not isinstance(rec, Mapping):
            raise FormatError(f"{where} is {describe(rec)}, expected a JSON object")
        ident = rec.get("identifier")
        if not isinstance(ident, str):
            raise FormatError(f"{where}: 'identifier' must be a string, got {describe(ident)}")
        if "label" not in rec:
            raise FormatError(f"{where} ({ident}): no 'label' (an unlabelled split cannot be scored)")
        try:
            label = parse_truth_value(rec["label"])
            sentence_key(ident)
        except ValueError as err:
            raise FormatError(f"{where} ({ident}): {err}") from None
        pairs.append((ident, label))
    labels = unique_by_id(pairs, name, "duplicate identifiers")
    if not labels:
        raise FormatError(f"{name}: no examples")
    return labels


def _from_records(records: Any, name: str) -> List[Tuple[str, Any, str]]:
    """(identifier, raw prediction, where) triples from a JSON array / JSON lines / mapping."""
    if isinstance(records, Mapping):
        return [(k, v, f"{name}: {k!r}") for k, v in records.items()]
    if not isinstance(records, (list, tuple)):
        raise FormatError(f"{name}: expected a list of {{\"identifier\", \"prediction\"}} or an "
                               f"object mapping identifier to prediction, got {describe(records)}")
    out = []
    for i, rec in enumerate(records):
        where = f"{name}: entry {i}"
        if not isinstance(rec, Mapping):
            raise FormatError(f"{where} is {describe(rec)}, expected "
                                   f'{{"identifier": str, "prediction": "True"|"False"}}')
        ident = rec.get("identifier")
        if not isinstance(ident, str):
            raise FormatError(f"{where}: 'identifier' must be a string, got {describe(ident)}")
        if "prediction" not in rec:
            raise FormatError(f"{where} ({ident}): no 'prediction'")
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
            raise FormatError(f"{name}: line {lineno}: expected 'identifier,prediction', "
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
                    raise FormatError(f"{name}: not valid JSON ({err.msg} at line {err.lineno} "
                                           f"column {err.colno})") from None
                try:  # JSON lines of {"identifier", "prediction"}
                    triples = _from_records(_json_lines(text, name), name)
                except FormatError:
                    raise FormatError(f"{name}: not valid JSON ({err.msg} at line {err.lineno} "
                                           f"column {err.colno}) nor JSON lines") from None
        else:
            triples = _from_csv(text, name)
    else:
        triples = _from_records(results, name)
    pairs: List[Tuple[str, bool]] = []
    for ident, raw, where in triples:
        try:
            pairs.append((ident, parse_truth_value(raw)))
        except ValueError as err:
            raise FormatError(f"{where}: prediction {err}") from None
    return unique_by_id(pairs, name, "identifiers predicted more than once")


def write_predictions(path: PathLike, predictions: Union[Mapping[str, Any], Sequence[Mapping[str, Any]]]) -> None:
    """Write a prediction file ``[{"identifier", "prediction": "True"|"False"}]`` (one line) from
    ``{identifier: truth value}`` or such a list, checked first so an unscorable file is never written."""
    checked = load_predictions(predictions if isinstance(predictions, Mapping) else list(predictions))
    write_json(path, [{"identifier": i, "prediction": "True" if v else "False"} for i, v in checked.items()],
               indent=None)


def write_records(path: PathLike, records: Sequence[Mapping[str, Any]]) -> None:
    """Write an NLVR2 data file: one JSON object per line (atomically)."""
    atomic_write(path, "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records))
