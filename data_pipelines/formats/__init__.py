"""The official file formats, each read and written in one place.

    io        atomic_write / write_json (the project's one atomic-write idiom and JSON writer),
              FormatError and the checked readers (read_text, read_json, load_input)
    captions  Karpathy's dataset_coco.json, COCO-format caption ground truth, caption result files
    vqa       VQAv2 questions / annotations files, result files, the answer vocabulary file and the
              official answer normalisation (normalize_answer)
    nlvr2     NLVR2 JSON lines, prediction files, truth values, identifiers

Users: the shard writers (``data_pipelines.shards``, ``synthetic``, ``builtin``), the readers (the
VQA soft targets are normalised with ``vqa.normalize_answer``), the metrics (``tasks.metrics``:
they keep the scoring and take the parsing from here) and the task modules (result files). Like all
of ``data_pipelines``, this package depends on nothing above it. A bad input raises :class:`FormatError` (a ``ValueError``) whose message
starts with the file (or the argument's role) and says what is wrong; only JSON and plain text are
read, nothing is unpickled.
"""

from . import captions, io, nlvr2, vqa
from .io import FormatError, atomic_write, read_json, write_json

__all__ = ["captions", "io", "nlvr2", "vqa", "FormatError", "atomic_write", "read_json", "write_json"]
