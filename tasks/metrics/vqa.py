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
in the normalised form.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Dict, List, Optional, Tuple, Union

from tasks.metrics import (
    MetricInputError,
    PathLike,
    describe,
    is_int,
    is_path,
    preview,
    read_json,
    source_name,
)

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
# Normalisation tables (the data of the official script)
# --------------------------------------------------------------------------------------------

#: Characters the official punctuation step removes or turns into a space, in its order.
PUNCTUATION: Tuple[str, ...] = tuple(";/[]\"{}()=+\\_-><@`,?!")

#: Number words that become digits ("none" counts as zero).
NUMBER_WORDS: Dict[str, str] = {
    word: str(value)
    for value, word in enumerate("zero one two three four five six seven eight nine ten".split())
}
NUMBER_WORDS["none"] = "0"

#: Words dropped by the article step.
ARTICLES = frozenset({"a", "an", "the"})

# Contraction fixes, ``written>replacement`` pairs separated by whitespace. The table is the official
# one, including its oddities: capitalised keys (never hit, since words are lower-cased before the
# lookup) and "somebody'd" mapped to "somebodyd".
_CONTRACTION_PAIRS = """
aint>ain't arent>aren't cant>can't couldve>could've couldnt>couldn't couldn'tve>couldn't've
couldnt've>couldn't've didnt>didn't doesnt>doesn't dont>don't hadnt>hadn't hadnt've>hadn't've
hadn'tve>hadn't've hasnt>hasn't havent>haven't hed>he'd hed've>he'd've he'dve>he'd've hes>he's
howd>how'd howll>how'll hows>how's Id've>I'd've I'dve>I'd've Im>I'm Ive>I've isnt>isn't itd>it'd
itd've>it'd've it'dve>it'd've itll>it'll let's>let's maam>ma'am mightnt>mightn't
mightnt've>mightn't've mightn'tve>mightn't've mightve>might've mustnt>mustn't mustve>must've
neednt>needn't notve>not've oclock>o'clock oughtnt>oughtn't ow's'at>'ow's'at 'ows'at>'ow's'at
'ow'sat>'ow's'at shant>shan't shed've>she'd've she'dve>she'd've she's>she's shouldve>should've
shouldnt>shouldn't shouldnt've>shouldn't've shouldn'tve>shouldn't've somebody'd>somebodyd
somebodyd've>somebody'd've somebody'dve>somebody'd've somebodyll>somebody'll
somebodys>somebody's someoned>someone'd someoned've>someone'd've someone'dve>someone'd've
someonell>someone'll someones>someone's somethingd>something'd somethingd've>something'd've
something'dve>something'd've somethingll>something'll thats>that's thered>there'd
thered've>there'd've there'dve>there'd've therere>there're theres>there's theyd>they'd
theyd've>they'd've they'dve>they'd've theyll>they'll theyre>they're theyve>they've twas>'twas
wasnt>wasn't wed've>we'd've we'dve>we'd've weve>we've werent>weren't whatll>what'll
whatre>what're whats>what's whatve>what've whens>when's whered>where'd wheres>where's
whereve>where've whod>who'd whod've>who'd've who'dve>who'd've wholl>who'll whos>who's
whove>who've whyll>why'll whyre>why're whys>why's wont>won't wouldve>would've wouldnt>wouldn't
wouldnt've>wouldn't've wouldn'tve>wouldn't've yall>y'all yall'll>y'all'll y'allll>y'all'll
yall'd've>y'all'd've y'alld've>y'all'd've y'all'dve>y'all'd've youd>you'd youd've>you'd've
you'dve>you'd've youll>you'll youre>you're youve>you've
"""

#: Contraction written without (or with a misplaced) apostrophe -> canonical spelling.
CONTRACTIONS: Dict[str, str] = dict(pair.split(">", 1) for pair in _CONTRACTION_PAIRS.split())

# A comma between two digits anywhere in the text switches every punctuation mark to "delete".
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# A period is deleted unless a digit follows it (so "2.5" keeps its decimal point). The official
# pattern starts with "(?!<=\d)", a negative *lookahead* (a mistyped lookbehind) that can never fail
# in front of a '.', so it is left out here.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
# The official script passes re.UNICODE (= 32) positionally to sub(), where it lands in ``count``:
# at most 32 periods are removed. Kept for fidelity; real answers never get near it.
_PERIOD_MAX_REMOVALS = 32


def clean_whitespace(text: str) -> str:
    """Tabs and newlines to spaces, then strip (applied to every answer before anything else)."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """The official punctuation step.

    Each mark of :data:`PUNCTUATION` is deleted when, in the *input* text, it touches a space on
    either side or the text has a comma between two digits; otherwise it is replaced by a space.
    Then periods not followed by a digit are deleted. Case and the apostrophe are left alone.
    """
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        if delete_all or (mark + " ") in text or (" " + mark) in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_PERIOD_MAX_REMOVALS)


def process_digit_article(text: str) -> str:
    """The official word step: lower-case, split on whitespace, number words to digits, drop
    articles, fix contractions, join with single spaces."""
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


@functools.lru_cache(maxsize=1 << 16)
def _punctuation_and_words(text: str) -> str:
    # Answers repeat a lot (yes, no, 2, ...), so the two steps are cached together.
    return process_digit_article(process_punctuation(text))


def normalize_answer(answer: str) -> str:
    """Full answer normalisation: whitespace, punctuation, then number words / articles / contractions.

    This is what the official script applies to every prediction; use it to build answer
    vocabularies and soft targets.
    """
    return _punctuation_and_words(clean_whitespace(answer))


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
# Input loading and validation
# --------------------------------------------------------------------------------------------


def _load(src: Any, role: str) -> Tuple[Any, str]:
    name = source_name(src, role)
    return (read_json(src, f"{role} file") if is_path(src) else src), name


def _entries(doc: Any, key: str, name: str, what: str) -> List[Any]:
    """``doc[key]`` when doc is the official file object; a bare list is accepted as the entries."""
    if isinstance(doc, Mapping):
        if key not in doc:
            raise MetricInputError(f"{name}: no {key!r} list; not a VQA {what} file")
        doc = doc[key]
    if not isinstance(doc, (list, tuple)):
        raise MetricInputError(f"{name}: expected a list of {what} (or an object with {key!r}), "
                               f"got {describe(doc)}")
    return list(doc)


def _check_unique(ids: Sequence[int], name: str, what: str) -> None:
    counts = Counter(ids)
    dups = [q for q, c in counts.items() if c > 1]
    if dups:
        raise MetricInputError(f"{name}: {len(dups)} duplicate {what}: {preview(dups)}")


def _question_ids(doc: Any, name: str) -> List[int]:
    ids = []
    for i, q in enumerate(_entries(doc, "questions", name, "questions")):
        if not isinstance(q, Mapping):
            raise MetricInputError(f"{name}: questions[{i}] is {describe(q)}, expected an object")
        qid = q.get("question_id")
        if not is_int(qid):
            raise MetricInputError(f"{name}: questions[{i}]: 'question_id' must be an integer, "
                                   f"got {describe(qid)}")
        ids.append(qid)
    _check_unique(ids, name, "question ids")
    return ids


def _annotations(doc: Any, name: str) -> List[Mapping[str, Any]]:
    anns = _entries(doc, "annotations", name, "annotations")
    for i, ann in enumerate(anns):
        where = f"{name}: annotations[{i}]"
        if not isinstance(ann, Mapping):
            raise MetricInputError(f"{where} is {describe(ann)}, expected an object")
        if not is_int(ann.get("question_id")):
            raise MetricInputError(f"{where}: 'question_id' must be an integer, got "
                                   f"{describe(ann.get('question_id'))}")
        where = f"{name}: question {ann['question_id']}"
        for field in ("question_type", "answer_type"):
            if not isinstance(ann.get(field), str):
                raise MetricInputError(f"{where}: {field!r} must be a string, got {describe(ann.get(field))}")
        answers = ann.get("answers")
        if not isinstance(answers, (list, tuple)) or not answers:
            raise MetricInputError(f"{where}: 'answers' must be a non-empty list, got {describe(answers)}")
        for j, a in enumerate(answers):
            if not isinstance(a, Mapping) or not isinstance(a.get("answer"), str):
                raise MetricInputError(f"{where}: answers[{j}] must be an object with a string "
                                       f"'answer', got {describe(a)}")
    _check_unique([a["question_id"] for a in anns], name, "question ids")
    return anns


def _results(doc: Any, name: str) -> Dict[int, str]:
    if not isinstance(doc, (list, tuple)):
        raise MetricInputError(f"{name}: results must be a JSON array of "
                               f'{{"question_id": int, "answer": str}}, got {describe(doc)}')
    answers: Dict[int, str] = {}
    dups = []
    for i, r in enumerate(doc):
        if not isinstance(r, Mapping):
            raise MetricInputError(f"{name}: entry {i} is {describe(r)}, expected "
                                   f'{{"question_id": int, "answer": str}}')
        qid, ans = r.get("question_id"), r.get("answer")
        if not is_int(qid):
            raise MetricInputError(f"{name}: entry {i}: 'question_id' must be an integer, "
                                   f"got {describe(qid)}")
        if not isinstance(ans, str):
            raise MetricInputError(f"{name}: entry {i} (question {qid}): 'answer' must be a string, "
                                   f"got {describe(ans)}")
        if qid in answers:
            dups.append(qid)
        answers[qid] = ans
    if dups:
        raise MetricInputError(f"{name}: {len(set(dups))} question ids answered more than once: "
                               f"{preview(set(dups))}")
    return answers


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
    qdoc, qname = _load(questions_json, "questions")
    adoc, aname = _load(annotations_json, "annotations")
    rdoc, rname = _load(results, "results")
    question_ids = _question_ids(qdoc, qname)
    anns = _annotations(adoc, aname)
    predicted = _results(rdoc, rname)
    if not anns:
        raise MetricInputError(f"{aname}: no annotations to evaluate")

    qset = set(question_ids)
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


# --------------------------------------------------------------------------------------------
# Answer vocabulary
# --------------------------------------------------------------------------------------------


def _annotation_records(src: Any, role: str = "annotations") -> Iterator[Mapping[str, Any]]:
    """Yield annotation records from a path, an annotations-file object, a list of records, or a
    list/tuple of several such files (e.g. train and val)."""
    if is_path(src):
        yield from _annotation_records(read_json(src, "annotations file"), source_name(src, role))
        return
    if isinstance(src, Mapping):
        if "annotations" not in src:
            raise MetricInputError(f"{role}: no 'annotations' list; not a VQA annotations file")
        yield from _annotation_records(src["annotations"], role)
        return
    if not isinstance(src, Iterable) or isinstance(src, (bytes, str)):
        raise MetricInputError(f"{role}: expected annotations, got {describe(src)}")
    for i, item in enumerate(src):
        if isinstance(item, Mapping) and "annotations" not in item:
            yield item
        elif is_path(item) or isinstance(item, (Mapping, list, tuple)):
            yield from _annotation_records(item, source_name(item, f"{role}[{i}]"))
        else:
            raise MetricInputError(f"{role}[{i}]: expected an annotation object, got {describe(item)}")


def build_answer_vocab(
    annotations: Any,
    min_freq: int = 9,
    *,
    use_all_answers: bool = False,
) -> List[str]:
    """Answer classes for a VQA head: normalised answers seen at least ``min_freq`` times.

    ``annotations``: a path, an annotations-file object, a list of annotation records, or a list of
    several files (paths or objects) counted together (the usual VQAv2 vocabulary pools train and val).
    Each annotation counts its ``multiple_choice_answer`` once; with ``use_all_answers`` each of its
    (typically 10) human answers counts instead. Answers go through :func:`normalize_answer`; the
    empty string is never a class. Sorted by frequency, most frequent first, ties alphabetically.
    With the defaults on VQAv2 train+val this is the familiar 3,129-answer list (as a set).
    """
    if min_freq < 1:
        raise ValueError(f"min_freq must be >= 1, got {min_freq}")
    counts: Counter = Counter()
    for ann in _annotation_records(annotations):
        if use_all_answers:
            texts = [a.get("answer") if isinstance(a, Mapping) else a for a in ann.get("answers") or ()]
        else:
            texts = [ann.get("multiple_choice_answer")]
        for text in texts:
            if not isinstance(text, str):
                raise MetricInputError(
                    f"annotations: question {ann.get('question_id')}: answer must be a string, got "
                    f"{describe(text)}")
            norm = normalize_answer(text)
            if norm:
                counts[norm] += 1
    kept = [(n, a) for a, n in counts.items() if n >= min_freq]
    kept.sort(key=lambda na: (-na[0], na[1]))
    return [a for _, a in kept]
