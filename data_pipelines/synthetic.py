"""Built-in procedurally generated dataset: shape scenes in the on-disk formats of the real benchmarks.

``generate(out_dir, num_images=300, seed=0, image_size=96, num_pairs=None)`` draws scenes of 1-4
coloured shapes with PIL and writes, under ``out_dir``::

    coco/dataset_coco.json                         Karpathy-split captions (official field names)
    coco/train2014/COCO_train2014_%012d.jpg        Karpathy train + restval images
    coco/val2014/COCO_val2014_%012d.jpg            Karpathy val + test images
    vqav2/v2_OpenEnded_mscoco_{train2014,val2014}_questions.json
    vqav2/v2_mscoco_{train2014,val2014}_annotations.json   (images: the coco/ files, image_id = cocoid)
    nlvr2/{train,dev,test1}.json                   JSON lines
    nlvr2/images/<split>/<split>-<set>-<pair>-img{0,1}.png   (JPEG bytes; every fifth pair real PNG)
    text/en.txt                                    English sentences, one a line
    text/multilingual/{en,de,fr,es}.txt            parallel sentences (line i is the same scene)
    scenes.json                                    the drawn scenes, for oracles and debugging
    synth_meta.json                                parameters, counts and file list; written last

Scene model: every object sits in its own region (left, right, top, bottom, center) so that
"what shape is on the left?" has one answer. Every VQA answer and NLVR2 label is computed from
the scene that was drawn, and the question/statement text alone determines how: ``answer_question``
and ``evaluate_statement`` re-derive them by parsing the text (the oracles used by the tests).
Answers are balanced per question template (yes/no 50/50; number and other answers drawn uniformly
among the answers the scene allows), so a model that ignores the image does clearly worse.

Determinism: every image, its captions and questions come from ``numpy.random.default_rng([seed,
stream, index])``; nothing touches global random state. Files are written to a temporary name and
moved into place, and ``synth_meta.json`` is marked complete only at the end, so an interrupted run
is simply redone by the next call; a complete dataset with the same parameters is reused as is.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .formats import captions, nlvr2, vqa
from .formats.io import atomic_write

__all__ = [
    "generate",
    "sample_scene",
    "render_scene",
    "caption_scene",
    "answer_question",
    "evaluate_statement",
    "VQA_QUESTION_KEYS",
    "VQA_ANNOTATION_KEYS",
]

VERSION = 1
META_NAME = "synth_meta.json"
SCENES_NAME = "scenes.json"

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 30, 40),
    "green": (40, 170, 60),
    "blue": (35, 75, 225),
    "yellow": (245, 215, 30),
    "purple": (145, 50, 185),
    "orange": (245, 130, 20),
}
SIZES = ("small", "large")
REGIONS = ("left", "right", "top", "bottom", "center")
BACKGROUNDS = {"grey": (128, 128, 128), "white": (238, 238, 238), "black": (24, 24, 24)}

# region centres as fractions of the image side, and a 3x3 grid cell for spatial relations
_REGION_XY = {"left": (0.2, 0.5), "right": (0.8, 0.5), "top": (0.5, 0.2), "bottom": (0.5, 0.8),
              "center": (0.5, 0.5)}
_GRID = {"left": (0, 1), "right": (2, 1), "top": (1, 0), "bottom": (1, 2), "center": (1, 1)}
_RADIUS = {"small": 0.085, "large": 0.13}
_JITTER = 0.02

REGION_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top",
                 "bottom": "at the bottom", "center": "in the center"}
NUM_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")

# official record layouts (key sets are checked by the tests)
VQA_QUESTIONS_FILE_KEYS = ("info", "task_type", "data_type", "license", "data_subtype", "questions")
VQA_QUESTION_KEYS = ("image_id", "question", "question_id")
VQA_ANNOTATIONS_FILE_KEYS = ("info", "license", "data_subtype", "annotations")
VQA_ANNOTATION_KEYS = ("question_type", "multiple_choice_answer", "answers", "image_id", "answer_type",
                       "question_id")
VQA_ANSWER_KEYS = ("answer", "answer_confidence", "answer_id")
KARPATHY_IMAGE_KEYS = ("filepath", "sentids", "filename", "imgid", "split", "sentences", "cocoid")
KARPATHY_SENTENCE_KEYS = ("tokens", "raw", "imgid", "sentid")
NLVR2_COMMON_KEYS = ("validation", "sentence", "left_url", "writer", "label", "right_url", "synset",
                     "query", "identifier")
NLVR2_SPLITS = ("train", "dev", "test1")

_INFO = {"description": "mmmoe synthetic shapes: procedurally generated questions in the VQAv2 layout",
         "url": "", "version": "2.0", "year": 2025, "contributor": "mmmoe data_pipelines.synthetic",
         "date_created": "2025-01-01 00:00:00"}
_LICENSE = {"url": "", "name": "generated data, no third-party content"}


# ----------------------------------------------------------------------------------------------
# scenes


def sample_scene(rng: np.random.Generator, image_size: int = 96) -> dict:
    """A random scene: background, noise flag and 1-4 objects, each in a distinct region."""
    n = int(rng.integers(1, 5))
    regions = [REGIONS[int(k)] for k in rng.permutation(len(REGIONS))[:n]]
    objects = []
    for region in regions:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        size = SIZES[int(rng.integers(len(SIZES)))]
        fx, fy = _REGION_XY[region]
        jx, jy = rng.uniform(-_JITTER, _JITTER, size=2)
        objects.append({
            "shape": shape, "colour": colour, "size": size, "region": region,
            "x": round((fx + float(jx)) * image_size, 2), "y": round((fy + float(jy)) * image_size, 2),
            "r": round(_RADIUS[size] * image_size, 2),
        })
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    return {"background": background, "noise": bool(rng.random() < 0.5), "objects": objects}


def render_scene(scene: dict, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draw ``scene``; ``rng`` supplies the background noise (used only when scene["noise"])."""
    bg = np.array(BACKGROUNDS[scene["background"]], dtype=np.int16)
    if scene["noise"]:
        noise = rng.integers(-9, 10, size=(image_size, image_size, 1), dtype=np.int16)
        arr = np.clip(bg + noise, 0, 255).astype(np.uint8)
    else:
        arr = np.broadcast_to(bg.astype(np.uint8), (image_size, image_size, 3)).copy()
    img = Image.fromarray(arr, "RGB")
    draw = ImageDraw.Draw(img)
    for o in scene["objects"]:
        x, y, r, fill = o["x"], o["y"], o["r"], COLOURS[o["colour"]]
        if o["shape"] == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        elif o["shape"] == "square":
            h = 0.88 * r
            draw.rectangle([x - h, y - h, x + h, y + h], fill=fill)
        else:  # triangle pointing up, centroid at (x, y)
            dx = 0.866 * r
            draw.polygon([(x, y - r), (x - dx, y + r / 2), (x + dx, y + r / 2)], fill=fill)
    return img


def _encode(img: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, "JPEG", quality=90)
    else:
        img.save(buf, "PNG")
    return buf.getvalue()


def _objs(scene, **crit):
    return [o for o in scene["objects"] if all(o[k] == v for k, v in crit.items())]


def _count(scene, **crit) -> int:
    return len(_objs(scene, **crit))


def _unique(scene, **crit):
    found = _objs(scene, **crit)
    return found[0] if len(found) == 1 else None


# ----------------------------------------------------------------------------------------------
# English grammar (captions and the English corpus)


def _article(text: str) -> str:
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def _join(parts, conj="and") -> str:
    parts = list(parts)
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + f" {conj} " + parts[-1]


def _plural(word: str, n: int) -> str:
    return word if n == 1 else word + "s"


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _np_en(o, style="full") -> str:
    words = ([o["size"]] if style in ("full", "size") else []) + ([o["colour"]] if style in ("full", "colour")
                                                                    else [])
    return _article("a " + " ".join(words + [o["shape"]]))


def _style(rng) -> str:
    u = rng.random()
    return "full" if u < 0.5 else ("colour" if u < 0.85 else "size")


def _relation(a: str, b: str) -> str:
    (ax, ay), (bx, by) = _GRID[a], _GRID[b]
    parts = []
    if ay != by:
        parts.append("above" if ay < by else "below")
    if ax != bx:
        parts.append("to the left of" if ax < bx else "to the right of")
    return " and ".join(parts)


def _cap_regions(s, rng):
    return _join(f"{_np_en(o, _style(rng))} {REGION_PHRASE[o['region']]}" for o in s["objects"])


def _cap_bg(s, rng):
    return f"{_join(_np_en(o, _style(rng)) for o in s['objects'])} on a {s['background']} background"


def _cap_count(s, rng):
    n = len(s["objects"])
    return (f"{NUM_WORDS[n]} {_plural('shape', n)} on a {s['background']} background: "
            + _join(_np_en(o) for o in s["objects"]))


def _cap_relation(s, rng):
    objs = s["objects"]
    if len(objs) < 2:
        return None
    i, j = (int(k) for k in rng.permutation(len(objs))[:2])
    a, b = objs[i], objs[j]
    text = f"{_np_en(a, _style(rng))} {_relation(a['region'], b['region'])} {_np_en(b, _style(rng))}"
    rest = len(objs) - 2
    if rest and rng.random() < 0.5:
        text += f" and {NUM_WORDS[rest]} other {_plural('shape', rest)}"
    return text


def _cap_prefix(s, rng):
    prefix = _pick(rng, ("an image with", "a picture of", "a simple drawing of", "a picture showing"))
    return f"{prefix} {_join(_np_en(o, 'colour') for o in s['objects'])}"


def _cap_there_is(s, rng):
    objs = s["objects"]
    o = objs[int(rng.integers(len(objs)))]
    text = f"there is {_np_en(o, _style(rng))} {REGION_PHRASE[o['region']]}"
    rest = len(objs) - 1
    if rest:
        text += f" and {NUM_WORDS[rest]} other {_plural('shape', rest)}"
    return text


def _cap_shape_counts(s, rng):
    counts = Counter(o["shape"] for o in s["objects"])
    parts = [("a " + sh) if counts[sh] == 1 else f"{NUM_WORDS[counts[sh]]} {sh}s" for sh in SHAPES if counts[sh]]
    text = _join(parts)
    if rng.random() < 0.5:
        text += f" on a {s['background']} background"
    return text


def _cap_colours(s, rng):
    objs = s["objects"]
    if len(objs) == 1:
        return f"a single {objs[0]['colour']} {objs[0]['shape']}"
    colours = list(dict.fromkeys(o["colour"] for o in objs))
    n = NUM_WORDS[len(objs)]
    if len(colours) == 1:
        return f"{n} {colours[0]} shapes"
    return f"{n} shapes in {_join(colours)}"


def _cap_bg_with(s, rng):
    return f"a {s['background']} background with {_join(_np_en(o, _style(rng)) for o in s['objects'])}"


_CAPTION_TEMPLATES = (_cap_regions, _cap_bg, _cap_count, _cap_relation, _cap_prefix, _cap_there_is,
                      _cap_shape_counts, _cap_colours, _cap_bg_with)


def _sentence(text: str) -> str:
    text = _article(text)
    return text[0].upper() + text[1:] + "."


def _tokens(raw: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", raw.lower())


def caption_scene(scene: dict, rng: np.random.Generator, k: int = 5) -> list[str]:
    """``k`` distinct captions (raw form: capitalised, final period) describing ``scene``."""
    out: list[str] = []
    for _ in range(4):
        for t in rng.permutation(len(_CAPTION_TEMPLATES)):
            text = _CAPTION_TEMPLATES[int(t)](scene, rng)
            if text is None:
                continue
            raw = _sentence(text)
            if raw not in out:
                out.append(raw)
            if len(out) == k:
                return out
    while len(out) < k:  # tiny scenes can exhaust the grammar: repeat (never happens in practice)
        out.append(out[len(out) % max(1, len(out))])
    return out


# ----------------------------------------------------------------------------------------------
# multilingual grammar: the same abstract sentences rendered with small word tables


_DE_ADJ = {"small": "klein", "large": "groß", "red": "rot", "green": "grün", "blue": "blau", "yellow": "gelb",
           "purple": "violett", "orange": "orangefarben"}
_DE_NOUN = {"circle": "Kreis", "square": "Quadrat", "triangle": "Dreieck"}
_FR = {"small": "petit", "large": "grand", "red": "rouge", "green": "vert", "blue": "bleu", "yellow": "jaune",
       "purple": "violet", "orange": "orange", "circle": "cercle", "square": "carré", "triangle": "triangle"}
_ES = {"small": "pequeño", "large": "grande", "red": "rojo", "green": "verde", "blue": "azul",
       "yellow": "amarillo", "purple": "morado", "orange": "naranja", "circle": "círculo", "square": "cuadrado",
       "triangle": "triángulo"}
_ML = {
    "en": {
        "np": lambda o: f"a {o['size']} {o['colour']} {o['shape']}",
        "region": REGION_PHRASE,
        "bg": {b: f"on a {b} background" for b in BACKGROUNDS},
        "count": lambda n: f"{NUM_WORDS[n]} {_plural('shape', n)}",
        "colon": ":", "and": "and",
        "the": {s: f"the {s}" for s in SHAPES}, "is": "is",
        "pred": {**{c: c for c in COLOURS}, **{s: s for s in SIZES}},
    },
    "de": {
        "np": lambda o: "ein " + " ".join(
            a + ("er" if o["shape"] == "circle" else "es")
            for a in (_DE_ADJ[o["size"]], _DE_ADJ[o["colour"]])) + " " + _DE_NOUN[o["shape"]],
        "region": {"left": "links", "right": "rechts", "top": "oben", "bottom": "unten",
                   "center": "in der Mitte"},
        "bg": {"grey": "auf grauem Hintergrund", "white": "auf weißem Hintergrund",
               "black": "auf schwarzem Hintergrund"},
        "count": lambda n: ("eine Form" if n == 1 else f"{('zwei', 'drei', 'vier')[n - 2]} Formen"),
        "colon": ":", "and": "und",
        "the": {"circle": "der Kreis", "square": "das Quadrat", "triangle": "das Dreieck"}, "is": "ist",
        "pred": {"red": "rot", "green": "grün", "blue": "blau", "yellow": "gelb", "purple": "violett",
                 "orange": "orange", "small": "klein", "large": "groß"},
    },
    "fr": {
        "np": lambda o: (f"un {_FR[o['size']]} {_FR[o['shape']]} {_FR[o['colour']]}"),
        "region": {"left": "à gauche", "right": "à droite", "top": "en haut", "bottom": "en bas",
                   "center": "au centre"},
        "bg": {"grey": "sur un fond gris", "white": "sur un fond blanc", "black": "sur un fond noir"},
        "count": lambda n: ("une forme" if n == 1 else f"{('deux', 'trois', 'quatre')[n - 2]} formes"),
        "colon": " :", "and": "et",
        "the": {s: f"le {_FR[s]}" for s in SHAPES}, "is": "est",
        "pred": {k: _FR[k] for k in (*COLOURS, *SIZES)},
    },
    "es": {
        "np": lambda o: f"un {_ES[o['shape']]} {_ES[o['colour']]} {_ES[o['size']]}",
        "region": {"left": "a la izquierda", "right": "a la derecha", "top": "arriba", "bottom": "abajo",
                   "center": "en el centro"},
        "bg": {"grey": "sobre un fondo gris", "white": "sobre un fondo blanco", "black": "sobre un fondo negro"},
        "count": lambda n: ("una forma" if n == 1 else f"{('dos', 'tres', 'cuatro')[n - 2]} formas"),
        "colon": ":", "and": "y",
        "the": {s: f"el {_ES[s]}" for s in SHAPES}, "is": "es",
        "pred": {k: _ES[k] for k in (*COLOURS, *SIZES)},
    },
}
ML_LANGS = ("en", "de", "fr", "es")


def _ml_plan(scene, rng) -> tuple:
    """Language-independent choice of sentence frame for one multilingual line."""
    frame = int(rng.integers(4))
    objs = scene["objects"]
    if frame == 3:
        o = objs[int(rng.integers(len(objs)))]
        return (3, o["shape"], o["colour"] if rng.random() < 0.6 else o["size"])
    return (frame,)


def _ml_render(scene, plan, lang) -> str:
    L = _ML[lang]
    objs = scene["objects"]
    frame = plan[0]
    if frame == 0:
        text = _join((f"{L['np'](o)} {L['region'][o['region']]}" for o in objs), L["and"])
    elif frame == 1:
        text = f"{_join((L['np'](o) for o in objs), L['and'])} {L['bg'][scene['background']]}"
    elif frame == 2:
        text = (f"{L['count'](len(objs))} {L['bg'][scene['background']]}{L['colon']} "
                + _join((L["np"](o) for o in objs), L["and"]))
    else:
        text = f"{L['the'][plan[1]]} {L['is']} {L['pred'][plan[2]]}"
    if lang == "en":
        text = _article(text)
    return text[0].upper() + text[1:] + "."


# ----------------------------------------------------------------------------------------------
# templates shared by generation and the text-only oracles

_DOMAINS = {
    "colour": {c: c for c in COLOURS},
    "shape": {s: s for s in SHAPES},
    "size": {s: s for s in SIZES},
    "where": {REGION_PHRASE[r]: r for r in REGIONS},
    "bg": {b: b for b in BACKGROUNDS},
    "side": {"the left": "left", "the right": "right"},
    "cmp": {"the right image than in the left": ("right", "left"),
            "the left image than in the right": ("left", "right")},
    "numshape": {f"{NUM_WORDS[n]} {_plural(s, n)}": (s, n) for s in SHAPES for n in range(1, 5)},
}


class _Template:
    def __init__(self, pattern, fn, answer_type=None, question_type=None):
        self.pattern, self.fn = pattern, fn
        self.answer_type, self.question_type = answer_type, question_type
        self.fields = re.findall(r"\{(\w+)\}", pattern)
        rx = []
        for part in re.split(r"(\{\w+\})", pattern):
            if part.startswith("{"):
                name = part[1:-1]
                alts = sorted(_DOMAINS[name], key=len, reverse=True)
                rx.append(f"(?P<{name}>" + "|".join(map(re.escape, alts)) + ")")
            else:
                rx.append(re.escape(part))
        self.regex = re.compile("".join(rx))
        self.fillings = []  # (text, kwargs)
        for combo in itertools.product(*(_DOMAINS[f] for f in self.fields)):
            shown = dict(zip(self.fields, combo))
            kwargs = {f: _DOMAINS[f][shown[f]] for f in self.fields}
            self.fillings.append((_article(pattern.format(**shown)), kwargs))

    def parse(self, text):
        m = self.regex.fullmatch(text)
        return None if m is None else {f: _DOMAINS[f][m.group(f)] for f in self.fields}


def _yn(b: bool) -> str:
    return "yes" if b else "no"


def _at(scene, where):
    return _unique(scene, region=where)


def _colour_of_unique_shape(s, shape):
    o = _unique(s, shape=shape)
    return None if o is None else o["colour"]


def _is_shape_colour(s, shape, colour):
    o = _unique(s, shape=shape)
    return None if o is None else _yn(o["colour"] == colour)


def _unique_attr(s, attr, **crit):
    o = _unique(s, **crit)
    return None if o is None else o[attr]


VQA_TEMPLATES = (
    _Template("is there a {colour} {shape}?", lambda s, colour, shape: _yn(_count(s, colour=colour, shape=shape) > 0),
              "yes/no", "is there a"),
    _Template("is there a {shape} {where}?", lambda s, shape, where: _yn(_count(s, shape=shape, region=where) > 0),
              "yes/no", "is there a"),
    _Template("is there a {size} {shape}?", lambda s, size, shape: _yn(_count(s, size=size, shape=shape) > 0),
              "yes/no", "is there a"),
    _Template("are there any {colour} shapes?", lambda s, colour: _yn(_count(s, colour=colour) > 0),
              "yes/no", "are there any"),
    _Template("is the {shape} {colour}?", _is_shape_colour, "yes/no", "is the"),
    _Template("is the background {bg}?", lambda s, bg: _yn(s["background"] == bg), "yes/no", "is the"),
    _Template("how many {shape}s are there?", lambda s, shape: str(_count(s, shape=shape)), "number", "how many"),
    _Template("how many {colour} shapes are there?", lambda s, colour: str(_count(s, colour=colour)),
              "number", "how many"),
    _Template("how many {size} shapes are there?", lambda s, size: str(_count(s, size=size)), "number",
              "how many"),
    _Template("how many shapes are there?", lambda s: str(len(s["objects"])), "number", "how many"),
    _Template("what color is the {shape}?", _colour_of_unique_shape, "other", "what color is the"),
    _Template("what color is the shape {where}?", lambda s, where: _unique_attr(s, "colour", region=where),
              "other", "what color is the"),
    _Template("what shape is {where}?", lambda s, where: _unique_attr(s, "shape", region=where), "other",
              "what shape is"),
    _Template("what size is the {colour} {shape}?",
              lambda s, colour, shape: _unique_attr(s, "size", colour=colour, shape=shape), "other", "what size is"),
    _Template("where is the {colour} {shape}?",
              lambda s, colour, shape: _unique_attr(s, "region", colour=colour, shape=shape), "other", "where is the"),
    _Template("what color is the background?", lambda s: s["background"], "other", "what color is the"),
)
_VQA_BY_TYPE = {t: [q for q in VQA_TEMPLATES if q.answer_type == t] for t in ("yes/no", "number", "other")}


def _side(left, right, side):
    return left if side == "left" else right


def _n_shapes(scene):
    return len(scene["objects"])


NLVR2_TEMPLATES = (
    _Template("{side} image contains exactly {numshape}",
              lambda L, R, side, numshape: _count(_side(L, R, side), shape=numshape[0]) == numshape[1]),
    _Template("both images contain a {colour} shape",
              lambda L, R, colour: _count(L, colour=colour) > 0 and _count(R, colour=colour) > 0),
    _Template("both images contain a {shape}",
              lambda L, R, shape: _count(L, shape=shape) > 0 and _count(R, shape=shape) > 0),
    _Template("neither image contains a {colour} {shape}",
              lambda L, R, colour, shape: _count(L, colour=colour, shape=shape) + _count(R, colour=colour,
                                                                                         shape=shape) == 0),
    _Template("exactly one image contains a {colour} {shape}",
              lambda L, R, colour, shape: (_count(L, colour=colour, shape=shape) > 0)
              != (_count(R, colour=colour, shape=shape) > 0)),
    _Template("there are more {shape}s in {cmp} image",
              lambda L, R, shape, cmp: _count(_side(L, R, cmp[0]), shape=shape)
              > _count(_side(L, R, cmp[1]), shape=shape)),
    _Template("there are more shapes in {cmp} image",
              lambda L, R, cmp: _n_shapes(_side(L, R, cmp[0])) > _n_shapes(_side(L, R, cmp[1]))),
    _Template("{side} image has a {size} {colour} shape",
              lambda L, R, side, size, colour: _count(_side(L, R, side), size=size, colour=colour) > 0),
    _Template("each image contains at least two shapes", lambda L, R: _n_shapes(L) >= 2 and _n_shapes(R) >= 2),
    _Template("both images have the same number of shapes", lambda L, R: _n_shapes(L) == _n_shapes(R)),
    _Template("at least one image has a {bg} background",
              lambda L, R, bg: L["background"] == bg or R["background"] == bg),
)


def _normalise_text(text: str) -> str:
    text = text.strip().lower().rstrip(".")
    return re.sub(r"\ban\b", "a", text)


def answer_question(scene: dict, question: str) -> str:
    """Oracle: parse a generated VQA question and answer it from ``scene``."""
    q = _normalise_text(question)
    for tpl in VQA_TEMPLATES:
        kwargs = tpl.parse(q)
        if kwargs is not None:
            ans = tpl.fn(scene, **kwargs)
            if ans is None:
                raise ValueError(f"question has no unique answer for this scene: {question!r}")
            return ans
    raise ValueError(f"not a question of the synthetic grammar: {question!r}")


def evaluate_statement(left: dict, right: dict, sentence: str) -> bool:
    """Oracle: parse a generated NLVR2 sentence and decide it on the (left, right) scenes."""
    s = _normalise_text(sentence)
    for tpl in NLVR2_TEMPLATES:
        kwargs = tpl.parse(s)
        if kwargs is not None:
            return bool(tpl.fn(left, right, **kwargs))
    raise ValueError(f"not a sentence of the synthetic grammar: {sentence!r}")


# ----------------------------------------------------------------------------------------------
# VQA questions and annotations

_ALTERNATIVES = {
    "yes": ("no",), "no": ("yes",),
    "red": ("orange", "pink"), "orange": ("red", "yellow"), "yellow": ("orange", "gold"),
    "green": ("blue", "lime"), "blue": ("purple", "navy"), "purple": ("blue", "violet"),
    "grey": ("gray", "silver"), "white": ("gray",), "black": ("gray", "dark"),
    "circle": ("round", "oval"), "square": ("rectangle", "box"), "triangle": ("pyramid",),
    "small": ("tiny", "large"), "large": ("big", "small"),
    "left": ("on left", "center"), "right": ("on right", "center"), "top": ("up", "center"),
    "bottom": ("down", "center"), "center": ("middle", "left"),
}


def _alternative(answer: str, rng) -> str:
    if answer.isdigit():
        n = int(answer)
        options = [NUM_WORDS[n], str(n + 1)] + ([str(n - 1)] if n > 0 else [])
        return _pick(rng, options)
    return _pick(rng, _ALTERNATIVES[answer])


def _make_questions(scene, rng, n):
    out, seen = [], set()
    for _ in range(4 * n):
        if len(out) == n:
            break
        u = rng.random()
        atype = "yes/no" if u < 0.4 else ("number" if u < 0.6 else "other")
        want = ("yes" if rng.random() < 0.5 else "no") if atype == "yes/no" else None
        tpls = _VQA_BY_TYPE[atype]
        for ti in rng.permutation(len(tpls)):
            tpl = tpls[int(ti)]
            results = [(text, a) for text, kw in tpl.fillings
                       if text not in seen and (a := tpl.fn(scene, **kw)) is not None]
            if want is not None:
                results = [r for r in results if r[1] == want]
            else:
                answers = sorted({a for _, a in results})
                if answers:
                    pick = _pick(rng, answers)
                    results = [r for r in results if r[1] == pick]
            if not results:
                continue
            text, ans = _pick(rng, results)
            out.append((tpl, text, ans))
            seen.add(text)
            break
    return out


def _human_answers(answer, rng):
    """10 (answer, confidence) pairs; ~15% of questions get 1-4 differing answers."""
    answers = [answer] * 10
    conf = ["yes" if rng.random() < 0.9 else "maybe" for _ in range(10)]
    if rng.random() < 0.15:
        k = int(rng.integers(1, 5))
        alt = _alternative(answer, rng)
        for j in rng.choice(10, size=k, replace=False):
            answers[int(j)] = alt
            conf[int(j)] = "maybe" if rng.random() < 0.6 else "no"
    return [{"answer": a, "answer_confidence": c, "answer_id": i + 1} for i, (a, c) in enumerate(zip(answers, conf))]


# ----------------------------------------------------------------------------------------------
# NLVR2 sentence selection


def _nlvr2_sentences(rng, pairs, k, counts):
    """Choose ``k`` sentences for a set of (left, right) scene pairs, steering the split's True
    share towards one half and preferring sentences whose label varies across the set's pairs."""
    chosen, seen = [], set()
    for _ in range(k):
        best = None
        for _c in range(6):
            tpl = NLVR2_TEMPLATES[int(rng.integers(len(NLVR2_TEMPLATES)))]
            L, R = pairs[int(rng.integers(len(pairs)))]
            want = bool(rng.random() < 0.5)
            opts = [(text, kw) for text, kw in tpl.fillings if text not in seen and bool(tpl.fn(L, R, **kw)) == want]
            if not opts:
                continue
            text, kw = _pick(rng, opts)
            truths = [bool(tpl.fn(a, b, **kw)) for a, b in pairs]
            t, n = sum(truths), len(truths)
            score = abs((counts[0] + t) / (counts[0] + counts[1] + n) - 0.5)
            if n > 1 and t in (0, n):
                score += 0.25
            if best is None or score < best[0]:
                best = (score, text, truths)
        if best is not None:
            _, text, truths = best
            seen.add(text)
            counts[0] += sum(truths)
            counts[1] += len(truths) - sum(truths)
            chosen.append((_sentence(text), truths))
    return chosen


# ----------------------------------------------------------------------------------------------
# writing


class _Writer:
    def __init__(self, root: Path):
        self.root = root
        self.files: list[str] = []
        self._dirs: set[Path] = set()

    def write(self, rel: str, data: bytes | str) -> None:
        path = self.root / rel
        if path.parent not in self._dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(path.parent)
        atomic_write(path, data)
        self.files.append(rel)

    def write_json(self, rel: str, obj) -> None:
        self.write(rel, json.dumps(obj))

    def path(self, rel: str) -> Path:
        """Where a format writer (``data_pipelines.formats``) puts the file ``rel``; recorded."""
        self.files.append(rel)
        return self.root / rel


_OWNED_PATTERNS = {
    "coco/train2014": re.compile(r"COCO_train2014_\d{12}\.jpg"),
    "coco/val2014": re.compile(r"COCO_val2014_\d{12}\.jpg"),
    **{f"nlvr2/images/{s}": re.compile(rf"{s}-\d+-\d+-img[01]\.png") for s in NLVR2_SPLITS},
}
_TMP = re.compile(r".+\.\d+\.tmp")


def _cleanup(root: Path, keep: set[str]) -> None:
    """Remove leftovers of an earlier generation into the same directory (only our own names)."""
    for rel in ("", "coco", "vqav2", "nlvr2", "text", "text/multilingual", *_OWNED_PATTERNS):
        d = root / rel
        if not d.is_dir():
            continue
        pat = _OWNED_PATTERNS.get(rel)
        for entry in os.scandir(d):
            if not entry.is_file():
                continue
            name_rel = f"{rel}/{entry.name}" if rel else entry.name
            if _TMP.fullmatch(entry.name) or (pat is not None and pat.fullmatch(entry.name)
                                              and name_rel not in keep):
                os.unlink(entry.path)


def _load_meta(root: Path):
    try:
        with open(root / META_NAME, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _split_sizes(n: int, frac: float = 0.1) -> int:
    return max(1, round(frac * n)) if n >= 3 else 0


def _paths(root: Path) -> dict:
    rel = {
        "coco_json": "coco/dataset_coco.json",
        "coco_images": "coco",
        "vqav2_dir": "vqav2",
        "nlvr2_dir": "nlvr2",
        "nlvr2_images": "nlvr2/images",
        "text_en": "text/en.txt",
        "scenes": SCENES_NAME,
        "meta": META_NAME,
    }
    for sub in ("train2014", "val2014"):
        rel[f"vqav2_{sub}_questions"] = f"vqav2/v2_OpenEnded_mscoco_{sub}_questions.json"
        rel[f"vqav2_{sub}_annotations"] = f"vqav2/v2_mscoco_{sub}_annotations.json"
    for split in NLVR2_SPLITS:
        rel[f"nlvr2_{split}"] = f"nlvr2/{split}.json"
    for lang in ML_LANGS:
        rel[f"text_multilingual_{lang}"] = f"text/multilingual/{lang}.txt"
    return {k: str(root / v) for k, v in rel.items()}


def generate(out_dir, num_images: int = 300, seed: int = 0, image_size: int = 96, num_pairs: int | None = None) -> dict:
    """Write the synthetic dataset under ``out_dir`` (see the module docstring) and return a summary:
    {"out_dir", "params", "cached", "seconds", "counts": {...per dataset and split...}, "paths": {...}}.

    A complete dataset with the same parameters already in ``out_dir`` is reused (``cached`` True)."""
    t0 = time.perf_counter()
    num_images, seed, image_size = int(num_images), int(seed), int(image_size)
    num_pairs = num_images if num_pairs is None else int(num_pairs)
    if num_images < 1 or num_pairs < 0:
        raise ValueError("num_images must be >= 1 and num_pairs >= 0")
    if image_size < 32:
        raise ValueError("image_size must be >= 32")
    root = Path(out_dir).resolve()
    params = {"version": VERSION, "num_images": num_images, "seed": seed, "image_size": image_size,
              "num_pairs": num_pairs}

    meta = _load_meta(root)
    if (meta is not None and meta.get("complete") and meta.get("params") == params
            and all((root / rel).is_file() for rel in meta.get("files", ()))):
        return {"out_dir": str(root), "params": params, "cached": True, "seconds": time.perf_counter() - t0,
                "counts": meta["counts"], "paths": _paths(root)}
    owned = meta is not None
    root.mkdir(parents=True, exist_ok=True)
    atomic_write(root / META_NAME, json.dumps({"params": params, "complete": False}))
    w = _Writer(root)
    scenes: dict = {"image_size": image_size, "coco": {}, "nlvr2": {}}
    counts: dict = {}

    # ---- COCO images, Karpathy captions, VQA ------------------------------------------------
    rng0 = np.random.default_rng([seed, 0])
    cocoids = [int(c) + 1 for c in rng0.choice(max(581929, 4 * num_images), size=num_images, replace=False)]
    perm = rng0.permutation(num_images)
    n_test, n_val = _split_sizes(num_images), _split_sizes(num_images)
    n_rest = int(0.03 * num_images)
    split = ["train"] * num_images
    for rank, i in enumerate(perm):
        if rank < n_test:
            split[int(i)] = "test"
        elif rank < n_test + n_val:
            split[int(i)] = "val"
        elif rank < n_test + n_val + n_rest:
            split[int(i)] = "restval"

    images, vqa_q, vqa_a = [], {"train2014": [], "val2014": []}, {"train2014": [], "val2014": []}
    for i in range(num_images):
        rng = np.random.default_rng([seed, 1, i])
        scene = sample_scene(rng, image_size)
        img = render_scene(scene, image_size, rng)
        cocoid = cocoids[i]
        sub = "train2014" if split[i] in ("train", "restval") else "val2014"
        filename = f"COCO_{sub}_{cocoid:012d}.jpg"
        w.write(f"coco/{sub}/{filename}", _encode(img))
        scenes["coco"][str(cocoid)] = scene

        sentids = list(range(5 * i, 5 * i + 5))
        sentences = [{"tokens": _tokens(raw), "raw": raw, "imgid": i, "sentid": sid}
                     for raw, sid in zip(caption_scene(scene, rng, 5), sentids)]
        images.append({"filepath": sub, "sentids": sentids, "filename": filename, "imgid": i,
                       "split": split[i], "sentences": sentences, "cocoid": cocoid})

        for k, (tpl, text, ans) in enumerate(_make_questions(scene, rng, int(rng.integers(3, 6)))):
            qid = cocoid * 1000 + k
            answers = _human_answers(ans, rng)
            mc = Counter(a["answer"] for a in answers).most_common(1)[0][0]
            vqa_q[sub].append({"image_id": cocoid, "question": text, "question_id": qid})
            vqa_a[sub].append({"question_type": tpl.question_type, "multiple_choice_answer": mc,
                               "answers": answers, "image_id": cocoid, "answer_type": tpl.answer_type,
                               "question_id": qid})

    captions.write_karpathy(w.path("coco/dataset_coco.json"), images)
    counts["coco"] = {"images": num_images, "captions": 5 * num_images,
                      **{s: split.count(s) for s in ("train", "restval", "val", "test")}}
    counts["vqav2"] = {}
    for sub in ("train2014", "val2014"):
        vqa.write_questions(w.path(f"vqav2/v2_OpenEnded_mscoco_{sub}_questions.json"), vqa_q[sub], sub,
                            _INFO, _LICENSE)
        vqa.write_annotations(w.path(f"vqav2/v2_mscoco_{sub}_annotations.json"), vqa_a[sub], sub, _INFO, _LICENSE)
        types = Counter(a["answer_type"] for a in vqa_a[sub])
        counts["vqav2"][sub] = {"images": len({q["image_id"] for q in vqa_q[sub]}), "questions": len(vqa_q[sub]),
                                **{t: types.get(t, 0) for t in ("yes/no", "number", "other")}}

    # ---- NLVR2 ----------------------------------------------------------------------------
    n_dev, n_t1 = _split_sizes(num_pairs), _split_sizes(num_pairs)
    pair_counts = {"train": num_pairs - n_dev - n_t1, "dev": n_dev, "test1": n_t1}
    counts["nlvr2"] = {}
    g = 0
    for si, sp in enumerate(NLVR2_SPLITS):
        lines, tf = [], [0, 0]
        n_sets = math.ceil(pair_counts[sp] / 4)
        for set_id in range(n_sets):
            npairs = min(4, pair_counts[sp] - 4 * set_id)
            pairs = []
            for p in range(npairs):
                rng = np.random.default_rng([seed, 2, g])
                g += 1
                L, R = sample_scene(rng, image_size), sample_scene(rng, image_size)
                fmt = "PNG" if (set_id + p) % 5 == 0 else "JPEG"
                for side, sc in ((0, L), (1, R)):
                    w.write(f"nlvr2/images/{sp}/{sp}-{set_id}-{p}-img{side}.png",
                            _encode(render_scene(sc, image_size, rng), fmt))
                scenes["nlvr2"][f"{sp}-{set_id}-{p}"] = {"left": L, "right": R}
                pairs.append((L, R))
            srng = np.random.default_rng([seed, 3, si, set_id])
            theme = Counter(o["shape"] for L, R in pairs for o in L["objects"] + R["objects"]).most_common(1)[0][0]
            synset, query = f"{theme}.n.01", f"{theme} shapes {int(srng.integers(1, 100))}"
            for s_idx, (sentence, truths) in enumerate(_nlvr2_sentences(srng, pairs, 2 + int(srng.integers(2)), tf)):
                writer = str(int(srng.integers(1, 200)))
                for p, truth in enumerate(truths):
                    ident = f"{sp}-{set_id}-{p}-{s_idx}"
                    label = "True" if truth else "False"
                    rec = {"validation": {str(int(srng.integers(1, 200))): label}, "sentence": sentence,
                           "left_url": f"https://synthetic.invalid/nlvr2/{sp}/{sp}-{set_id}-{p}-img0.png",
                           "writer": writer, "label": label,
                           "right_url": f"https://synthetic.invalid/nlvr2/{sp}/{sp}-{set_id}-{p}-img1.png",
                           "synset": synset, "query": query, "identifier": ident}
                    if sp == "train":
                        rec["directory"] = set_id % 100
                    else:
                        rec["extra_validations"] = {str(int(srng.integers(1, 200)) + 200 * j): label for j in range(4)}
                    lines.append(rec)
        nlvr2.write_records(w.path(f"nlvr2/{sp}.json"), lines)
        counts["nlvr2"][sp] = {"sets": n_sets, "pairs": pair_counts[sp], "examples": len(lines),
                               "true": tf[0], "false": tf[1]}

    # ---- text -----------------------------------------------------------------------------
    n_en, n_ml = max(200, 10 * num_images), max(100, 5 * num_images)
    rng = np.random.default_rng([seed, 4])
    en = []
    for _ in range(n_en):
        sc = sample_scene(rng, image_size)
        en.append(_sentence(_CAPTION_TEMPLATES[int(rng.integers(len(_CAPTION_TEMPLATES)))](sc, rng)
                            or _cap_regions(sc, rng)))
    w.write("text/en.txt", "".join(line + "\n" for line in en))
    rng = np.random.default_rng([seed, 5])
    ml = {lang: [] for lang in ML_LANGS}
    for _ in range(n_ml):
        sc = sample_scene(rng, image_size)
        plan = _ml_plan(sc, rng)
        for lang in ML_LANGS:
            ml[lang].append(_ml_render(sc, plan, lang))
    for lang in ML_LANGS:
        w.write(f"text/multilingual/{lang}.txt", "".join(line + "\n" for line in ml[lang]))
    counts["text"] = {"en": n_en, "multilingual": n_ml}

    w.write_json(SCENES_NAME, scenes)
    if owned:
        _cleanup(root, set(w.files))
    atomic_write(root / META_NAME, json.dumps({"params": params, "complete": True, "counts": counts,
                                                "files": sorted(w.files)}))
    return {"out_dir": str(root), "params": params, "cached": False, "seconds": time.perf_counter() - t0,
            "counts": counts, "paths": _paths(root)}
