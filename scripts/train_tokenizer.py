#!/usr/bin/env python
"""Train a SentencePiece tokenizer: the same as ``mmmoe tokenizer train ...``.

    python scripts/train_tokenizer.py --input corpus/ --out tok/mmmoe --vocab-size 64000
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tasks.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tokenizer", "train", *sys.argv[1:]]))
