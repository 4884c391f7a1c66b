"""COCO caption metrics through ``pycocoevalcap``: BLEU-1..4, METEOR, ROUGE-L, CIDEr(-D), optional SPICE.

This mirrors ``pycocoevalcap.eval.COCOEvalCap`` without needing a COCO ground-truth download: the
references are built locally from Karpathy's ``dataset_coco.json`` (images of one ``split``, image id
= ``cocoid``, references = ``sentences[].raw``), or read from a COCO-format caption file
(``{"images": [{"id"}], "annotations": [{"image_id", "caption", "id"}]}``). Reading those files and
the results is ``data_pipelines.formats.captions``'s job (shared with the shard writers and the
tasks); this module tokenises and scores.

Pipeline, as in COCOEvalCap: references and results are lower-cased and tokenised by pycocoevalcap's
Stanford PTB tokenizer (punctuation tokens dropped), then scored with ``Bleu(4)``, ``Meteor()``,
``Rouge()`` and ``Cider()`` (pycocoevalcap's ``Cider`` is the CIDEr-D variant used by the COCO
server: clipped counts, Gaussian length penalty, sigma 6, idf over the evaluated references).

Scale: the values are pycocoevalcap's raw numbers (BLEU / METEOR / ROUGE-L / SPICE in [0, 1],
CIDEr roughly in [0, 10]). Papers usually report them multiplied by 100 (BLEU-4 40.1, CIDEr 133.6);
:func:`caption_scores` returns both, the raw values at the top level and the same times 100 under
``"x100"``.

Requirements: Java on ``PATH`` (the PTB tokenizer and METEOR are Java programs). SPICE is off by
default: it downloads Stanford CoreNLP on first use (fails offline) and is known to fail on Java
newer than 8.

Rules for the results ``[{"image_id": int, "caption": str}]``: every image id must belong to the
evaluated split; each image at most once (pycocoevalcap cannot score two captions for one image);
an empty caption is allowed (it scores zero). By default the results must cover every image of the
split; with ``allow_subset=True`` only the images present in the results are evaluated (references
and CIDEr's idf then come from those images only, as with COCOEvalCap's ``params['image_id']``).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
from typing import Any, Dict, Iterator, List, Mapping, Sequence, Tuple, Union

from data_pipelines.formats.captions import karpathy_to_coco, load_captions, load_references, references
from data_pipelines.formats.io import PathLike, one_line, preview, source_name
from tasks.metrics import MetricInputError

__all__ = [
    "SCORE_KEYS",
    "CaptionToolError",
    "JavaNotFoundError",
    "require_java",
    "karpathy_to_coco",
    "load_references",
    "load_captions",
    "ptb_tokenize",
    "score_tokenized",
    "caption_scores",
]

#: Metric names, in pycocoevalcap's spelling, in the order they are reported.
SCORE_KEYS: Tuple[str, ...] = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


class CaptionToolError(RuntimeError):
    """pycocoevalcap or one of its Java tools is unavailable or failed."""


class JavaNotFoundError(CaptionToolError):
    """No ``java`` executable on PATH."""


def require_java() -> str:
    """Path of the ``java`` executable, or :class:`JavaNotFoundError` with an explanation."""
    java = shutil.which("java")
    if java is None:
        raise JavaNotFoundError(
            "Java was not found on PATH: pycocoevalcap's PTB tokenizer and METEOR run as Java "
            "programs; install a Java runtime (e.g. OpenJDK 11+, 'apt-get install default-jre-headless')"
        )
    return java


def _import_pycocoevalcap() -> Any:
    try:
        import pycocoevalcap  # noqa: F401
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer  # noqa: F401
    except ImportError as err:
        raise CaptionToolError(
            f"pycocoevalcap is not installed ({err}); install it with 'pip install pycocoevalcap' "
            "(or the project's [eval] extra)"
        ) from None
    return pycocoevalcap


# --------------------------------------------------------------------------------------------
# Tokenisation and scoring
# --------------------------------------------------------------------------------------------


def _single_line(text: str) -> str:
    # The tokenizer reads one caption per line; any line break inside a caption (\r, \u2028, ...,
    # not only \n, which is all pycocoevalcap replaces) would shift every later caption.
    return " ".join(text.splitlines())


def ptb_tokenize(captions: Mapping[int, Sequence[str]]) -> Dict[int, List[str]]:
    """Lower-case and PTB-tokenise captions with pycocoevalcap's ``PTBTokenizer`` (one Java call).

    Keys and per-key order are preserved; the output is checked to line up with the input.
    """
    require_java()
    _import_pycocoevalcap()
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    request = {k: [{"caption": _single_line(c)} for c in caps] for k, caps in captions.items()}
    try:
        out = PTBTokenizer().tokenize(request)
    except OSError as err:
        raise CaptionToolError(f"the PTB tokenizer (java) could not run: {err}") from None
    n_in = sum(len(v) for v in request.values())
    n_out = sum(len(v) for v in out.values())
    if set(out) != set(request) or any(len(out[k]) != len(request[k]) for k in request):
        raise CaptionToolError(f"the PTB tokenizer (java) returned {n_out} captions for {n_in}; "
                               "is Java working ('java -version')?")
    return {k: out[k] for k in request}


@contextlib.contextmanager
def _meteor() -> Iterator[Any]:
    """A pycocoevalcap ``Meteor`` whose Java process is always shut down on exit."""
    from pycocoevalcap.meteor.meteor import Meteor

    try:
        scorer = Meteor()
    except OSError as err:
        raise CaptionToolError(f"METEOR (java) could not start: {err}") from None
    try:
        yield scorer
    finally:
        proc = getattr(scorer, "meteor_p", None)
        # A compute_score that raised leaves the (non-reentrant) lock held; blocking on it here, or
        # in Meteor.__del__ later, would hang. Take it if free, then release it in every case.
        scorer.lock.acquire(blocking=False)
        try:
            if proc is not None:
                for stream in (proc.stdin, proc.stdout, proc.stderr):
                    with contextlib.suppress(Exception):
                        if stream is not None:
                            stream.close()
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
        finally:
            scorer.lock.release()


def _meteor_failure(scorer: Any, err: BaseException) -> CaptionToolError:
    proc = scorer.meteor_p
    detail = ""
    with contextlib.suppress(Exception):
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=5)
        detail = proc.stderr.read().decode("utf-8", "replace")
    lines = [ln for ln in detail.splitlines() if ln.strip()]
    hint = one_line(lines[-1])[:200] if lines else one_line(str(err))[:200]
    return CaptionToolError(f"METEOR (java) failed: {hint}")


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send fd 1 (also of child processes) to stderr, so tools cannot garble JSON printed on stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _spice(gts: Dict[int, List[str]], res: Dict[int, List[str]]) -> float:
    try:
        from pycocoevalcap.spice.spice import Spice

        with _stdout_to_stderr():
            score, _ = Spice().compute_score(gts, res)
    except Exception as err:  # download, Java or parsing failure: all end the same way
        raise CaptionToolError(
            f"SPICE failed ({type(err).__name__}: {one_line(str(err))[:160]}); it downloads Stanford "
            "CoreNLP on first use and needs Java 8; run without SPICE") from None
    return float(score)


def score_tokenized(
    gts: Dict[int, List[str]], res: Dict[int, List[str]], *, spice: bool = False
) -> Dict[str, float]:
    """Run the pycocoevalcap scorers on tokenised references and one-caption-per-image results.

    ``gts`` and ``res`` must have the same keys (the scorers assert it). Raw values.
    """
    _import_pycocoevalcap()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    scores: Dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its length ratio
        bleu, _ = Bleu(4).compute_score(gts, res)
    for k, v in zip(SCORE_KEYS[:4], bleu):
        scores[k] = float(v)
    require_java()
    with _meteor() as meteor:
        try:
            value, _ = meteor.compute_score(gts, res)
        except (ValueError, OSError) as err:
            raise _meteor_failure(meteor, err) from None
    scores["METEOR"] = float(value)
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if spice:
        scores["SPICE"] = _spice(gts, res)
    return scores


def caption_scores(
    gt: Union[PathLike, Mapping[str, Any]],
    results: Union[PathLike, Sequence[Mapping[str, Any]]],
    *,
    split: str = "test",
    spice: bool = False,
    allow_subset: bool = False,
) -> Dict[str, Any]:
    """COCO caption metrics of ``results`` against the references of ``gt`` (see module doc).

    Returns ``{"Bleu_1", ..., "CIDEr"[, "SPICE"], "x100": {same keys times 100}, "num_images",
    "scale"}``; top-level metric values are pycocoevalcap's raw scores.
    """
    refs, where = references(gt, split)
    caps = load_captions(results)
    rname = source_name(results, "results")
    unknown = [i for i in caps if i not in refs]
    if unknown:
        raise MetricInputError(f"{rname}: {len(unknown)} image ids are not in {where}: {preview(unknown)}")
    if allow_subset:
        ids = [i for i in refs if i in caps]
    else:
        missing = [i for i in refs if i not in caps]
        if missing:
            raise MetricInputError(f"{rname}: {len(missing)} of the {len(refs)} images of {where} have "
                                   f"no caption: {preview(missing)} (to evaluate only the captioned "
                                   "images use allow_subset / --subset)")
        ids = list(refs)
    require_java()
    _import_pycocoevalcap()
    gts = ptb_tokenize({i: refs[i] for i in ids})
    res = ptb_tokenize({i: [caps[i]] for i in ids})
    scores = score_tokenized(gts, res, spice=spice)
    out: Dict[str, Any] = dict(scores)
    out["x100"] = {k: 100.0 * v for k, v in scores.items()}
    out["num_images"] = len(ids)
    out["scale"] = "raw pycocoevalcap values; 'x100' has them times 100 as papers report"
    return out
