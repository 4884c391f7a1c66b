"""Weighted mixing of shard sets: realised proportions over 10,000 samples within 2 points of the
weights on one process and over 2 ranks x 2 workers; every (rank, worker) draws its own
reproducible sequence; epoch readers read every sample once; the real image-text pipeline (shards,
DataLoader workers, ranks from RANK / WORLD_SIZE) tags batches with their set; the data module
accepts the mapping; bad specs give clear errors."""

import itertools
from collections import Counter

import pytest

from data_pipelines import readers as W
from data_pipelines.readers import shardlists
from data_pipelines.mixing import MixedSource, count_sources, mixed_pipeline, parse_mix, proportions
from tests.test_wds import TOK, make_shards

WEIGHTS = {"coco": 0.5, "web": 0.3, "books": 0.2}


def endless(name):
    return ({"i": i, "from": name} for i in itertools.count())


class Endless:
    def __init__(self, name):
        self.name = name

    def __iter__(self):
        return endless(self.name)


def draw(n, seed=0):
    src = MixedSource({k: Endless(k) for k in WEIGHTS}, {k: 10 * w for k, w in WEIGHTS.items()}, seed=seed)
    out = list(itertools.islice(iter(src), n))
    assert all(s["source"] == s["from"] for s in out)
    return [s["source"] for s in out]


def assert_close(tags, tol=0.02):
    c = Counter(tags)
    for k, w in WEIGHTS.items():
        assert abs(c[k] / len(tags) - w) < tol, (k, c[k] / len(tags), w)


def test_proportions_one_process():
    tags = draw(10_000)
    assert_close(tags)
    assert draw(500) == tags[:500]  # reproducible
    assert draw(500, seed=1) != tags[:500]


def test_proportions_two_ranks_two_workers(monkeypatch):
    streams = {}
    for rank, worker in itertools.product(range(2), range(2)):
        monkeypatch.setattr(shardlists, "node_info", lambda r=rank: (r, 2))
        monkeypatch.setattr(shardlists, "worker_info", lambda w=worker: (w, 2))
        streams[rank, worker] = draw(2_500)
    assert_close([t for s in streams.values() for t in s])
    firsts = {tuple(s[:50]) for s in streams.values()}
    assert len(firsts) == 4  # every (rank, worker) has its own sequence


def test_epoch_mode_reads_every_sample_once():
    finite = {"a": [{"i": i} for i in range(30)], "b": [{"i": i} for i in range(5)]}
    src = MixedSource(finite, {"a": 1.0, "b": 9.0}, seed=0)
    out = list(src)
    assert sorted((s["source"], s["i"]) for s in out) == sorted((k, s["i"]) for k, v in finite.items() for s in v)
    # b (weight 0.9) is used up early; afterwards only a remains
    assert [s["source"] for s in out[-10:]] == ["a"] * 10


def test_parse_mix_errors():
    assert parse_mix("x.tar") is None and parse_mix(["a.tar"]) is None
    assert parse_mix({"a": "a.tar", "b": {"shards": ["b.tar"], "weight": 3}}) == {"a": ("a.tar", 1.0), "b": (["b.tar"], 3.0)}
    with pytest.raises(ValueError, match=r"image_text.b: weight must be a positive number"):
        parse_mix({"a": "a.tar", "b": {"shards": "b.tar", "weight": 0}}, "image_text")
    with pytest.raises(ValueError, match=r"expected \{shards: URLS, weight: W\}"):
        parse_mix({"a": {"urls": "a.tar"}})
    with pytest.raises(ValueError, match="non-empty mapping"):
        parse_mix({})


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    a, _ = make_shards(root, 2, 10, prefix="seta")
    b, _ = make_shards(root, 2, 10, prefix="setb")
    return {"a": a, "b": b}


def test_real_pipeline_epoch_mode_tags_and_reads_all(two_sets):
    pipe = mixed_pipeline(W.image_text_pipeline, {"a": {"shards": two_sets["a"], "weight": 3}, "b": two_sets["b"]},
                          tokenizer=TOK, image_size=16, patch_size=4, batch_size=6, shuffle_buffer=4)
    batches = list(W.make_loader(pipe))
    tags = [t for b in batches for t in b["source"]]
    assert len(tags) == 40 and Counter(tags) == {"a": 20, "b": 20}
    assert batches[0]["image"].shape[1:] == (3, 16, 16) and "mlm_labels" in batches[0]
    counts = {}
    count_sources({"image_text": batches[0], "text": {"lang": ["en", "de"]}}, counts)
    assert proportions(counts)["mix/text/en"] == 0.5
    assert sum(v for k, v in proportions(counts).items() if k.startswith("mix/image_text/")) == pytest.approx(1.0)


def test_real_pipeline_resampled_two_ranks_two_workers(two_sets, monkeypatch):
    spec = {"a": {"shards": two_sets["a"], "weight": 0.7}, "b": {"shards": two_sets["b"], "weight": 0.3}}
    tags = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        pipe = mixed_pipeline(W.image_text_pipeline, spec, tokenizer=TOK, image_size=16, patch_size=4, batch_size=50,
                              shuffle_buffer=4, resampled=True, epoch_samples=2_000, image_mask_ratio=None,
                              mlm_ratio=None)
        got = [t for b in W.make_loader(pipe, num_workers=2) for t in b["source"]]
        assert len(got) == 1_000  # epoch_samples / (ranks x workers) per worker
        tags += got
    share = Counter(tags)["a"] / len(tags)
    assert abs(share - 0.7) < 0.03, share


def test_pretrain_datamodule_accepts_weighted_sets(two_sets):
    from data_pipelines.datamodules import PretrainDataModule

    dm = PretrainDataModule(tokenizer=TOK, image_text={"a": {"shards": two_sets["a"], "weight": 1}, "b": two_sets["b"]},
                            image={"a": two_sets["a"], "b": {"shards": two_sets["b"], "weight": 2}}, batch_size=4,
                            image_size=16, patch_size=4, epoch_samples=8, num_workers=0, pin_memory=False,
                            shuffle_buffer=4)
    dm.setup("fit")
    batch, _, _ = next(iter(dm.train_dataloader()))
    assert set(batch["image_text"]["source"]) <= {"a", "b"} and set(batch["image"]["source"]) <= {"a", "b"}
    with pytest.raises(ValueError, match="image_text.b: weight"):
        PretrainDataModule(tokenizer=TOK, image_text={"b": {"shards": two_sets["b"], "weight": -1}}).setup("fit")
