"""Suite-wide settings. The tests run tiny models: one intra-op thread is as fast as several for
them, and avoids the large slowdowns of oversubscribed OpenMP threads when the machine is busy or
DataLoader workers share the cores."""

import torch

torch.set_num_threads(1)


import pytest


@pytest.fixture(scope="session")
def small_synth(tmp_path_factory):
    """A small built-in dataset (40 images, 8 samples per shard, so readers have several shards to
    choose from) with its tokenizer (vocabulary 300), made once per test session."""
    from tasks.fit_cli import prepare_builtin_data

    root = tmp_path_factory.mktemp("small_synth") / "synth"
    wanted = [str(root / "tokenizer.model")] + [
        str(root / "shards" / f"{name}.manifest.json")
        for name in ("pretrain-image-text", "pretrain-image", "pretrain-text-en", "pretrain-image-text-val",
                     "vqa-train2014", "vqa-val2014")
    ]
    prepare_builtin_data(wanted, root, log=lambda s: None, num_images=40, image_size=64, vocab_size=300, shard_size=8)
    return root
