"""The shard sample contract: what the writers put in a WebDataset sample and the readers expect.

Every sample is a group of tar members sharing one ``__key__`` (no dots in keys). Members are plain
bytes; nothing is ever pickled. Text members are UTF-8.

Kinds of shard (``KIND`` in the manifest):

``image_text``  pretraining pairs      ``jpg`` image bytes, ``txt`` caption, ``json`` {"image_id"}
``image``       pretraining images     ``jpg``, ``json`` {"image_id"}
``text``        pretraining text       ``txt`` one document/sentence, ``json`` {"lang"}
``caption``     captioning task        ``jpg``, ``json`` {"image_id", "split", "captions": [str, ...]}
``vqa``         VQAv2 task             ``jpg``, ``json`` {"question_id", "image_id", "question",
                                        "answers": [10 str], "answer_type", "question_type",
                                        "multiple_choice_answer"}  (answers absent for test splits)
``nlvr2``       NLVR2 task             ``left.jpg``, ``right.jpg``, ``json`` {"identifier",
                                        "sentence", "label": bool or null}

Image members are stored as the source file's bytes (``jpg`` even when a source ``.png`` of NLVR2
holds a JPEG; real PNG bytes are stored under the same name and decoded by content, not by name).

Shards are named ``<prefix>-%06d.tar`` and described by ``<prefix>.manifest.json``:
{"kind": KIND, "pattern": "<prefix>-{000000..000N}.tar", "shards": [{"name", "samples"}],
 "total": int, "created_by": "mmmoe"}
"""

from __future__ import annotations

KINDS = ("image_text", "image", "text", "caption", "vqa", "nlvr2")

IMAGE_KEY = "jpg"
TEXT_KEY = "txt"
META_KEY = "json"
LEFT_IMAGE_KEY = "left.jpg"
RIGHT_IMAGE_KEY = "right.jpg"

SHARD_NAME = "{prefix}-{index:06d}.tar"
MANIFEST_NAME = "{prefix}.manifest.json"
