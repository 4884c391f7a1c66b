#!/usr/bin/env python
"""Write WebDataset shards: the same as ``mmmoe data shards <source> ...``.

    python scripts/make_shards.py karpathy --dataset-json dataset_coco.json --image-root coco/ --out shards/
    python scripts/make_shards.py --help
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tasks.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["data", "shards", *sys.argv[1:]]))
