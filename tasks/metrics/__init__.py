"""Official benchmark metrics, re-implemented: VQA accuracy, NLVR2 accuracy / consistency, COCO captions.

Submodules (imported lazily by their users; ``caption`` needs the optional ``pycocoevalcap``):

``tasks.metrics.vqa``      VQA answer normalisation, accuracy (overall / per answer type / per
                           question type / per question), answer vocabulary.
``tasks.metrics.nlvr2``    NLVR2 accuracy and consistency.
``tasks.metrics.caption``  BLEU-1..4, METEOR, ROUGE-L, CIDEr(-D), optional SPICE via pycocoevalcap.

Every scorer accepts either already-parsed Python objects or paths to the files. The files are read
by ``data_pipelines.formats`` (one reader per official format, shared with the shard writers and the
tasks); problems with the inputs raise :class:`MetricInputError` (``formats.FormatError``, a
``ValueError``) whose message starts with the file path (or with the argument's role when an object
was passed) and says what is wrong, in one line. Only JSON and plain text are ever read; nothing is
unpickled.
"""

from __future__ import annotations

from data_pipelines.formats.io import (
    FormatError,
    PathLike,
    describe,
    is_int,
    is_path,
    one_line,
    preview,
    read_json,
    read_text,
    source_name,
)

#: The error every scorer raises for a bad input (the formats' error, under its historical name).
MetricInputError = FormatError

__all__ = [
    "MetricInputError", "PathLike", "is_path", "source_name", "read_text", "read_json", "preview",
    "describe", "is_int", "one_line",
]
