"""VQAv2: the questions and annotations files, result files, the answer vocabulary file, and the
official answer normalisation.

Questions file ``v2_OpenEnded_mscoco_<subtype>_questions.json``::

    {"info", "task_type", "data_type", "license", "data_subtype": "val2014",
     "questions": [{"image_id", "question", "question_id"}, ...]}

Annotations file ``v2_mscoco_<subtype>_annotations.json``::

    {"info", "license", "data_subtype", "annotations": [{"question_id", "image_id", "question_type",
     "answer_type", "multiple_choice_answer", "answers": [{"answer", "answer_confidence",
     "answer_id"}, x10]}, ...]}

Result file: ``[{"question_id": int, "answer": str}]``. Answer vocabulary file: a JSON list of
answers (index = position) or an ``{answer: index}`` object with indices 0..A-1.

:func:`normalize_answer` is the official normalisation (``vqaEval.py`` of GT-Vision-Lab/VQA, the
Python 3 revision on its master branch) of predicted answers: whitespace, then
:func:`process_punctuation`, then :func:`process_digit_article` (lower-case, number words to digits,
articles dropped, contractions fixed). The answer vocabulary (:func:`build_answer_vocab`) and the
readers' soft targets use it too, so a trained model predicts answers in the normalised form; the
scoring (``tasks.metrics.vqa``) applies it as the official script does.
"""

from __future__ import annotations

import functools
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from .io import (
    FormatError,
    PathLike,
    describe,
    id_text_pairs,
    is_int,
    is_path,
    load_input,
    preview,
    read_json,
    source_name,
    unique_by_id,
    write_json,
)

__all__ = [
    "PUNCTUATION", "NUMBER_WORDS", "ARTICLES", "CONTRACTIONS", "clean_whitespace", "process_punctuation",
    "process_digit_article", "normalize_answer", "parse_questions", "parse_annotations", "parse_results",
    "load_question_ids", "load_annotations", "load_results",
    "write_questions", "write_annotations", "write_results", "annotation_records", "build_answer_vocab", "answers_from", "read_answer_vocab",
    "answer_index", "write_answer_vocab",
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
# Questions, annotations and result files
# --------------------------------------------------------------------------------------------


def _entries(doc: Any, key: str, name: str, what: str) -> List[Any]:
    """``doc[key]`` when doc is the official file object; a bare list is accepted as the entries."""
    if isinstance(doc, Mapping):
        if key not in doc:
            raise FormatError(f"{name}: no {key!r} list; not a VQA {what} file")
        doc = doc[key]
    if not isinstance(doc, (list, tuple)):
        raise FormatError(f"{name}: expected a list of {what} (or an object with {key!r}), "
                               f"got {describe(doc)}")
    return list(doc)


def _check_unique(ids: Sequence[int], name: str, what: str) -> None:
    counts = Counter(ids)
    dups = [q for q, c in counts.items() if c > 1]
    if dups:
        raise FormatError(f"{name}: {len(dups)} duplicate {what}: {preview(dups)}")


def parse_questions(doc: Any, name: str) -> List[int]:
    ids = []
    for i, q in enumerate(_entries(doc, "questions", name, "questions")):
        if not isinstance(q, Mapping):
            raise FormatError(f"{name}: questions[{i}] is {describe(q)}, expected an object")
        qid = q.get("question_id")
        if not is_int(qid):
            raise FormatError(f"{name}: questions[{i}]: 'question_id' must be an integer, "
                                   f"got {describe(qid)}")
        ids.append(qid)
    _check_unique(ids, name, "question ids")
    return ids


def parse_annotations(doc: Any, name: str) -> List[Mapping[str, Any]]:
    anns = _entries(doc, "annotations", name, "annotations")
    for i, ann in enumerate(anns):
        where = f"{name}: annotations[{i}]"
        if not isinstance(ann, Mapping):
            raise FormatError(f"{where} is {describe(ann)}, expected an object")
        if not is_int(ann.get("question_id")):
            raise FormatError(f"{where}: 'question_id' must be an integer, got "
                                   f"{describe(ann.get('question_id'))}")
        where = f"{name}: question {ann['question_id']}"
        for field in ("question_type", "answer_type"):
            if not isinstance(ann.get(field), str):
                raise FormatError(f"{where}: {field!r} must be a string, got {describe(ann.get(field))}")
        answers = ann.get("answers")
        if not isinstance(answers, (list, tuple)) or not answers:
            raise FormatError(f"{where}: 'answers' must be a non-empty list, got {describe(answers)}")
        for j, a in enumerate(answers):
            if not isinstance(a, Mapping) or not isinstance(a.get("answer"), str):
                raise FormatError(f"{where}: answers[{j}] must be an object with a string "
                                       f"'answer', got {describe(a)}")
    _check_unique([a["question_id"] for a in anns], name, "question ids")
    return anns


def parse_results(doc: Any, name: str) -> Dict[int, str]:
    """``{question_id: answer}`` of a parsed result file; duplicates are an error."""
    pairs = id_text_pairs(doc, name, "question_id", "answer", "question")
    return unique_by_id(pairs, name, "question ids answered more than once")


def load_question_ids(questions: Any) -> List[int]:
    """Question ids of a questions file (path, parsed object or bare list), unique, in file order."""
    doc, name = load_input(questions, "questions")
    return parse_questions(doc, name)


def load_annotations(annotations_file: Any) -> List[Mapping[str, Any]]:
    """Checked annotation records of an annotations file (path, parsed object or bare list)."""
    doc, name = load_input(annotations_file, "annotations")
    return parse_annotations(doc, name)


def load_results(results_file: Any) -> Dict[int, str]:
    """``{question_id: answer}`` of a result file ``[{"question_id", "answer"}]`` (path or list)."""
    doc, name = load_input(results_file, "results")
    return parse_results(doc, name)


def write_questions(path: PathLike, questions: Sequence[Mapping[str, Any]], data_subtype: str,
                    info: Optional[Mapping[str, Any]] = None, license: Optional[Mapping[str, Any]] = None) -> None:
    """Write a VQAv2 questions file (the official header fields, Open-Ended, mscoco) atomically."""
    write_json(path, {"info": dict(info or {}), "task_type": "Open-Ended", "data_type": "mscoco",
                      "license": dict(license or {}), "data_subtype": data_subtype, "questions": list(questions)},
               indent=None)


def write_annotations(path: PathLike, annotations_list: Sequence[Mapping[str, Any]], data_subtype: str,
                      info: Optional[Mapping[str, Any]] = None, license: Optional[Mapping[str, Any]] = None) -> None:
    """Write a VQAv2 annotations file (the official header fields) atomically."""
    write_json(path, {"info": dict(info or {}), "license": dict(license or {}), "data_subtype": data_subtype,
                      "annotations": list(annotations_list)}, indent=None)


def write_results(path: PathLike, answers: Union[Mapping[int, str], Sequence[Mapping[str, Any]]]) -> None:
    """Write a result file ``[{"question_id", "answer"}]`` (one line, like the official ones) from
    ``{question_id: answer}`` or such a list, checked first so an unscorable file is never written."""
    rows = ([{"question_id": q, "answer": a} for q, a in answers.items()] if isinstance(answers, Mapping)
            else list(answers))
    checked = parse_results(rows, os.fspath(path))
    write_json(path, [{"question_id": q, "answer": a} for q, a in checked.items()], indent=None)


# --------------------------------------------------------------------------------------------
# Answer vocabulary
# --------------------------------------------------------------------------------------------


def annotation_records(src: Any, role: str = "annotations") -> Iterator[Mapping[str, Any]]:
    """Yield annotation records from a path, an annotations-file object, a list of records, or a
    list/tuple of several such files (e.g. train and val)."""
    if is_path(src):
        yield from annotation_records(read_json(src, "annotations file"), source_name(src, role))
        return
    if isinstance(src, Mapping):
        if "annotations" not in src:
            raise FormatError(f"{role}: no 'annotations' list; not a VQA annotations file")
        yield from annotation_records(src["annotations"], role)
        return
    if not isinstance(src, Iterable) or isinstance(src, (bytes, str)):
        raise FormatError(f"{role}: expected annotations, got {describe(src)}")
    for i, item in enumerate(src):
        if isinstance(item, Mapping) and "annotations" not in item:
            yield item
        elif is_path(item) or isinstance(item, (Mapping, list, tuple)):
            yield from annotation_records(item, source_name(item, f"{role}[{i}]"))
        else:
            raise FormatError(f"{role}[{i}]: expected an annotation object, got {describe(item)}")


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
    for ann in annotation_records(annotations):
        if use_all_answers:
            texts = [a.get("answer") if isinstance(a, Mapping) else a for a in ann.get("answers") or ()]
        else:
            texts = [ann.get("multiple_choice_answer")]
        for text in texts:
            if not isinstance(text, str):
                raise FormatError(
                    f"annotations: question {ann.get('question_id')}: answer must be a string, got "
                    f"{describe(text)}")
            norm = normalize_answer(text)
            if norm:
                counts[norm] += 1
    kept = [(n, a) for a, n in counts.items() if n >= min_freq]
    kept.sort(key=lambda na: (-na[0], na[1]))
    return [a for _, a in kept]


def answers_from(obj: Any, where: str = "answer_vocab") -> List[str]:
    """Check and normalise a vocabulary given as a list of answers or an {answer: index} mapping."""
    if isinstance(obj, Mapping):
        items = sorted(obj.items(), key=lambda kv: kv[1])
        if [i for _, i in items] != list(range(len(items))):
            raise FormatError(f"{where}: indices of an {{answer: index}} vocabulary must be 0..{len(items) - 1}, "
                              "each used once")
        answers = [a for a, _ in items]
    elif isinstance(obj, (list, tuple)):
        answers = list(obj)
    else:
        raise FormatError(f"{where}: expected a list of answers or an {{answer: index}} object, "
                          f"got {type(obj).__name__}")
    if not answers:
        raise FormatError(f"{where}: the answer vocabulary is empty")
    if not all(isinstance(a, str) for a in answers):
        raise FormatError(f"{where}: answers must be strings")
    dup = [a for a, n in Counter(answers).items() if n > 1]
    if dup:
        raise FormatError(f"{where}: duplicated answers {dup[:5]}")
    return answers


def read_answer_vocab(path: Union[str, os.PathLike]) -> List[str]:
    """Answers by index from a JSON list, or from an ``{answer: index}`` object with indices 0..A-1.
    A missing file is a ``FileNotFoundError``; anything else wrong a :class:`FormatError`."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"answer vocabulary {str(p)!r} does not exist")
    return answers_from(read_json(p, "answer vocabulary"), str(p))


def answer_index(answer_vocab: Union[str, os.PathLike, Mapping[str, int], Sequence[str]]) -> Dict[str, int]:
    """``{answer: index}`` from a vocabulary file, a list of answers (index = position) or a mapping."""
    if is_path(answer_vocab):
        answers = read_answer_vocab(answer_vocab)
    else:
        answers = answers_from(answer_vocab)
    return {a: i for i, a in enumerate(answers)}


def write_answer_vocab(path: PathLike, answers: Sequence[str]) -> None:
    """Write an answer vocabulary file: a JSON list, one answer per line (atomically)."""
    write_json(path, answers_from(list(answers), os.fspath(path)), indent=0)
