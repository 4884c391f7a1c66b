"""WebDataset readers on tiny shards written with tarfile (the schema.py contract)."""

import io
import json
import logging
import pickle
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from data_pipelines import schema
from data_pipelines import readers as W
from data_pipelines.transforms import Normalizer, decode_image


class ByteTokenizer:
    """UTF-8 bytes shifted past the special ids."""

    pad_id, bos_id, eos_id, mask_id, vocab_size = 0, 1, 2, 3, 260

    def encode(self, text):
        return [b + 4 for b in text.encode("utf-8")]

    def decode(self, ids):
        return bytes(i - 4 for i in ids if i >= 4).decode("utf-8")


TOK = ByteTokenizer()


def pixels(seed, h=16, w=16):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def encode_image(arr, fmt="PNG"):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_tar(path, samples):
    """samples: [(key, {suffix: bytes})] -> one tar, members in order."""
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for suffix, data in members.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                info.mtime = 0
                tf.addfile(info, io.BytesIO(data))
    return str(path)


def image_text_samples(shard, n, h=16, w=16):
    out = []
    for i in range(n):
        key = f"s{shard:02d}i{i:03d}"
        out.append(
            (
                key,
                {
                    "jpg": encode_image(pixels(shard * 1000 + i, h, w)),  # PNG bytes under "jpg": decoded by content
                    "txt": f"caption {key} é".encode(),
                    "json": json.dumps({"image_id": shard * 1000 + i}).encode(),
                },
            )
        )
    return out


def make_shards(tmp_path, num_shards, per_shard, prefix="it"):
    urls, samples = [], []
    for s in range(num_shards):
        sm = image_text_samples(s, per_shard)
        samples += sm
        urls.append(write_tar(tmp_path / schema.SHARD_NAME.format(prefix=prefix, index=s), sm))
    return urls, samples


def keys_of(batches):
    return [k for b in batches for k in b["key"]]


def test_raw_samples_equal_what_was_written(tmp_path):
    urls, samples = make_shards(tmp_path, 2, 5)
    stage = W.tar_to_samples(handler=W.SkipCounter())
    got = list(stage(iter([{"url": u} for u in urls])))
    assert [s["__key__"] for s in got] == [k for k, _ in samples]
    for s, (_, members) in zip(got, samples):
        assert {k: v for k, v in s.items() if not k.startswith("__")} == members


def test_decoded_image_text_equals_what_was_written(tmp_path):
    urls, samples = make_shards(tmp_path, 2, 5)
    pipe = W.image_text_pipeline(
        urls, TOK, image_size=16, train=False, batch_size=3, patch_size=4, image_mask_ratio=None, mlm_ratio=None
    )
    batches = list(pipe)
    assert [len(b["key"]) for b in batches] == [3, 3, 3, 1]
    norm = Normalizer()
    mean = torch.tensor(norm.mean).view(3, 1, 1)
    std = torch.tensor(norm.std).view(3, 1, 1)
    by_key = dict(samples)
    for b in batches:
        assert b["image"].dtype == torch.float32 and b["image"].shape[1:] == (3, 16, 16)
        for i, key in enumerate(b["key"]):
            src = by_key[key]
            back = ((b["image"][i] * std + mean) * 255).permute(1, 2, 0)
            assert torch.allclose(back, torch.from_numpy(np.array(decode_image(src["jpg"]))).float(), atol=1e-3)
            ids = b["text_ids"][i][~b["text_pad_mask"][i]].tolist()
            assert ids[0] == TOK.bos_id and ids[-1] == TOK.eos_id
            assert TOK.decode(ids[1:-1]) == src["txt"].decode()
            assert (b["text_ids"][i][b["text_pad_mask"][i]] == TOK.pad_id).all()  # True = padding


def test_pretraining_batch_fields(tmp_path):
    urls, _ = make_shards(tmp_path, 1, 6)
    pipe = W.image_text_pipeline(urls, TOK, image_size=16, patch_size=4, batch_size=6, image_mask_ratio=0.5, shuffle_buffer=4)
    (batch,) = list(pipe)
    assert batch["image_mask"].shape == (6, 4, 4) and batch["image_mask"].dtype == torch.bool
    assert (batch["image_mask"].flatten(1).sum(1) == 8).all()
    labels = batch["mlm_labels"]
    assert labels.shape == batch["text_ids"].shape
    assert ((labels != -100) & batch["text_pad_mask"]).sum() == 0
    assert ((labels != -100).sum(1) >= 1).all()
    (image_only,) = list(W.image_pipeline(urls, image_size=16, patch_size=4, batch_size=8))
    assert set(image_only) == {"key", "image", "image_mask"} and image_only["image"].shape == (6, 3, 16, 16)


@pytest.mark.parametrize("world_size,num_workers", [(1, 0), (1, 2), (2, 2), (3, 2)])
def test_each_sample_once_per_epoch_over_ranks_and_workers(tmp_path, monkeypatch, world_size, num_workers):
    urls, samples = make_shards(tmp_path, 7, 3)  # 7 shards: uneven over ranks x workers
    pipe = W.image_text_pipeline(urls, TOK, image_size=16, patch_size=4, batch_size=3, shuffle_buffer=5)
    epochs = {0: [], 1: []}
    for rank in range(world_size):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
        loader = W.make_loader(pipe, num_workers=num_workers)
        for epoch in (0, 1):
            epochs[epoch] += keys_of(loader)
    for got in epochs.values():
        assert sorted(got) == sorted(k for k, _ in samples)
    assert epochs[0] != epochs[1]  # shard order and shuffle buffer change per epoch


def test_split_by_node_and_worker_partition_the_shards(monkeypatch):
    shards = [f"s{i}" for i in range(11)]
    got = []
    for rank in range(3):
        for worker in range(2):
            monkeypatch.setattr(W.shardlists, "node_info", lambda r=rank: (r, 3))
            monkeypatch.setattr(W.shardlists, "worker_info", lambda w=worker: (w, 2))
            got.append(list(W.split_by_worker(W.split_by_node(iter(shards)))))
    assert sorted(x for part in got for x in part) == sorted(shards)
    assert max(map(len, got)) - min(map(len, got)) <= 1


def test_shard_order_changes_per_epoch_and_matches_across_ranks():
    a = W.EpochShardList([f"s{i}.tar" for i in range(20)], seed=3)
    b = W.EpochShardList([f"s{i}.tar" for i in range(20)], seed=3)
    e0, e1 = [d["url"] for d in a], [d["url"] for d in a]
    assert e0 != e1 and sorted(e0) == sorted(e1)
    b.set_epoch(1)
    assert [d["url"] for d in b] == e1


def bad_shards(tmp_path):
    good0 = image_text_samples(0, 6)
    shard0 = list(good0)
    shard0.insert(2, ("garbage", {"jpg": b"\xff\xd8 this is not a jpeg" * 10, "txt": b"a caption"}))
    shard0.insert(4, ("nocaption", {"jpg": encode_image(pixels(7)), "json": b"{}"}))
    shard0.insert(5, ("latin1", {"jpg": encode_image(pixels(8)), "txt": "caf\xe9".encode("latin-1")}))
    u0 = write_tar(tmp_path / "bad-000000.tar", shard0)

    good1 = image_text_samples(1, 8)
    full = write_tar(tmp_path / "full.tar", good1)
    raw = Path(full).read_bytes()
    # cut in the middle of sample 5's image data: samples 0..4 are complete
    with tarfile.open(full) as tf:
        member = tf.getmember(f"{good1[5][0]}.jpg")
    u1 = tmp_path / "bad-000001.tar"
    u1.write_bytes(raw[: member.offset_data + member.size // 2])

    good2 = image_text_samples(2, 4)
    u2 = write_tar(tmp_path / "bad-000002.tar", good2)
    expected = [k for k, _ in good0] + [k for k, _ in good1[:5]] + [k for k, _ in good2]
    return [u0, str(u1), u2], expected


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_samples_are_skipped_and_counted(tmp_path, monkeypatch, caplog, num_workers):
    monkeypatch.setattr(time, "sleep", lambda s: pytest.fail("no sleeping on bad data"))
    urls, expected = bad_shards(tmp_path)
    pipe = W.image_text_pipeline(urls, TOK, image_size=16, patch_size=4, batch_size=4, shuffle_buffer=3)
    loader = W.make_loader(pipe, num_workers=num_workers)
    want = {**{k: 0 for k in W.SKIP_KINDS}, "corrupt_image": 1, "missing_field": 1, "bad_utf8": 1, "truncated_tar": 1}
    with caplog.at_level(logging.INFO, logger="data_pipelines.readers"):
        for epoch in range(2):
            got = keys_of(loader)
            assert sorted(got) == sorted(expected)  # every good sample arrives, once
            assert loader.last_skips == want  # counted per epoch (the loader closes each epoch)
    assert pipe.skips.history == [want, want]
    assert sum(pipe.skips.counts().values()) == 8
    summaries = [r.getMessage() for r in caplog.records if "this epoch" in r.getMessage()]
    assert summaries == ["image_text: skipped 4 this epoch (corrupt_image=1, truncated_tar=1, missing_field=1, bad_utf8=1)"] * 2
    assert sum(pipe.skips.report().values()) == 0  # nothing new since the last epoch closed


def test_truncation_inside_a_header_is_counted_and_does_not_leak(tmp_path):
    first = image_text_samples(0, 4)
    full = write_tar(tmp_path / "full.tar", first)
    with tarfile.open(full) as tf:
        member = tf.getmember(f"{first[2][0]}.txt")
    cut = tmp_path / "cut-000000.tar"
    cut.write_bytes(Path(full).read_bytes()[: member.offset + 100])  # inside sample 2's txt header
    same_keys = write_tar(tmp_path / "cut-000001.tar", image_text_samples(0, 4))  # same keys as the cut shard
    skips = W.SkipCounter()
    got = list(W.tar_to_samples(handler=skips, required=("jpg", "txt"))(iter([{"url": str(cut)}, {"url": same_keys}])))
    keys = [s["__key__"] for s in got]
    assert keys == [k for k, _ in first[:2]] + [k for k, _ in first]  # sample 2 had no txt yet: dropped
    assert all(set(s) >= {"jpg", "txt", "json"} for s in got)
    assert skips.counts()["truncated_tar"] == 1 and sum(skips.counts().values()) == 1


def test_missing_shard_is_counted(tmp_path):
    urls, samples = make_shards(tmp_path, 1, 3)
    pipe = W.image_text_pipeline([str(tmp_path / "nope.tar"), *urls], TOK, image_size=16, patch_size=4, train=False)
    assert sorted(keys_of(pipe)) == sorted(k for k, _ in samples)
    assert pipe.skips.counts()["unreadable_shard"] == 1


class CreatesFileWhenUnpickled:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_members_are_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled.txt"
    payload = pickle.dumps(CreatesFileWhenUnpickled(str(marker)))
    sample = image_text_samples(0, 1)[0]
    members = {**sample[1], "pyd": payload, "pth": payload, "pickle": payload}
    url = write_tar(tmp_path / "p-000000.tar", [(sample[0], members), *image_text_samples(0, 3)[1:]])
    for pipe in (
        W.image_text_pipeline(url, TOK, image_size=16, patch_size=4, train=False),
        W.image_pipeline(url, image_size=16, patch_size=4, train=False),
    ):
        (batch,) = list(pipe)
        assert len(batch["key"]) == 3
        assert not any(isinstance(v, (list, dict)) and "pyd" in v for v in batch.values())
    raw = list(W.tar_to_samples(handler=W.SkipCounter(), keep=None)(iter([{"url": url}])))
    assert raw[0]["pyd"] == payload  # read as bytes when asked for, still not unpickled
    assert not marker.exists()
    # the payload is live: unpickling it would have created the file
    pickle.loads(payload).close()
    assert marker.exists()


def test_skip_counter_logs_at_bounded_rate_without_sleeping(caplog, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(W.errors.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(W.errors.time, "sleep", lambda s: pytest.fail("the skip handler must never sleep"))
    skips = W.SkipCounter("t", log_first=5, log_interval=30.0)
    with caplog.at_level(logging.WARNING, logger="data_pipelines.readers"):
        for _ in range(10_000):
            assert skips(W.SampleError("corrupt_image", "bad"))
        assert len(caplog.records) == 5 + 1  # the first 5 one by one, then one line per 30 s
        clock[0] += 29.0
        skips(W.SampleError("corrupt_image", "bad"))
        assert len(caplog.records) == 6
        clock[0] += 2.0
        skips(W.SampleError("missing_field", "bad"))  # a new kind: its first errors are logged anyway
        skips(W.SampleError("corrupt_image", "bad"))
        assert len(caplog.records) == 8 and "#10002" in caplog.records[-1].getMessage()
    assert skips.counts()["corrupt_image"] == 10_002
    with pytest.raises(KeyError):  # a bug is not bad data: raised, not counted
        skips(KeyError("x"))
    assert skips(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad")) and skips.counts()["bad_utf8"] == 1


def test_skip_handler_is_fast():
    skips = W.SkipCounter("t")
    logging.getLogger("data_pipelines.readers").disabled = True
    try:
        start = time.perf_counter()
        for _ in range(2000):
            skips(W.SampleError("corrupt_image", "bad"))
        assert time.perf_counter() - start < 1.0  # ~10 us each; a sleep per sample would take minutes
    finally:
        logging.getLogger("data_pipelines.readers").disabled = False


def test_vqa_batch(tmp_path):
    vocab = {"yes": 0, "no": 1, "2": 2, "red": 3}
    metas = [
        {"question_id": 11, "image_id": 1, "question": "is it red?", "answers": ["yes"] * 4 + ["no"] * 2 + ["maybe"] * 4},
        {"question_id": 12, "image_id": 1, "question": "how many?", "answers": ["2"] * 10},
        {"question_id": 13, "image_id": 2, "question": "what color?", "answers": ["red"] + ["blue"] * 9},
    ]
    url = write_tar(
        tmp_path / "vqa-000000.tar",
        [(f"q{m['question_id']}", {"jpg": encode_image(pixels(i)), "json": json.dumps(m).encode()}) for i, m in enumerate(metas)]
        + [("noq", {"jpg": encode_image(pixels(9)), "json": json.dumps({"question_id": 14, "answers": []}).encode()})],
    )
    (batch,) = list(W.vqa_pipeline(url, TOK, vocab, image_size=16, train=False))
    assert batch["question_id"].tolist() == [11, 12, 13]
    expected = torch.tensor([[1.0, 2 / 3, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1 / 3]])
    assert torch.allclose(batch["vqa_targets"], expected)
    assert batch["image"].shape == (3, 3, 16, 16) and batch["answers"][1] == ["2"] * 10
    assert batch["text_ids"].shape[0] == 3
    assert W.vqa_pipeline(url, TOK, vocab).skips is not None
    (test_batch,) = list(W.vqa_pipeline(url, TOK, vocab, image_size=16, train=False, with_answers=False))
    assert "vqa_targets" not in test_batch and len(test_batch["key"]) == 3


def test_nlvr2_and_caption_batches(tmp_path):
    rows = [("True", 1), (False, 0), (None, -1)]
    url = write_tar(
        tmp_path / "nlvr2-000000.tar",
        [
            (
                f"dev-{i}-0-0",
                {
                    "left.jpg": encode_image(pixels(i), "JPEG"),
                    "right.jpg": encode_image(pixels(100 + i), "JPEG"),
                    "json": json.dumps({"identifier": f"dev-{i}-0-0", "sentence": "the left one has more", "label": lab}).encode(),
                },
            )
            for i, (lab, _) in enumerate(rows)
        ],
    )
    (batch,) = list(W.nlvr2_pipeline(url, TOK, image_size=16, train=False))
    assert batch["label"].tolist() == [want for _, want in rows]
    assert batch["image_left"].shape == batch["image_right"].shape == (3, 3, 16, 16)
    assert not torch.equal(batch["image_left"], batch["image_right"])
    assert batch["identifier"] == ["dev-0-0-0", "dev-1-0-0", "dev-2-0-0"]

    caps = write_tar(
        tmp_path / "cap-000000.tar",
        [
            (f"c{i}", {"jpg": encode_image(pixels(i), "JPEG"), "json": json.dumps({"image_id": 500 + i, "split": "test", "captions": [f"cap {i} a", f"cap {i} b"]}).encode()})
            for i in range(3)
        ],
    )
    (batch,) = list(W.caption_pipeline(caps, TOK, image_size=16, train=False))
    assert batch["image_id"].tolist() == [500, 501, 502]
    ids = batch["caption_ids"][0][~batch["caption_pad_mask"][0]].tolist()
    assert TOK.decode(ids[1:-1]) == "cap 0 a" and batch["captions"][2] == ["cap 2 a", "cap 2 b"]
    (train_batch,) = list(W.caption_pipeline(caps, TOK, image_size=16, train=True, shuffle_buffer=0))
    assert sorted(train_batch["image_id"].tolist()) == [500, 501, 502]


def test_text_pipeline_mixes_languages_once_per_epoch(tmp_path):
    urls_by_lang = {}
    expected = []
    for lang, n in (("en", 40), ("de", 10)):
        samples = [(f"{lang}{i:03d}", {"txt": f"{lang} sentence {i}".encode(), "json": json.dumps({"lang": lang}).encode()}) for i in range(n)]
        expected += [k for k, _ in samples]
        urls_by_lang[lang] = [write_tar(tmp_path / f"{lang}-{s:06d}.tar", samples[s::2]) for s in range(2)]
    pipe = W.text_pipeline(urls_by_lang, TOK, batch_size=8, shuffle_buffer=4, sizes={"en": 40, "de": 10})
    batches = list(W.make_loader(pipe, num_workers=2))
    assert sorted(keys_of(batches)) == sorted(expected)
    assert {lang for b in batches for lang in b["lang"]} == {"en", "de"}
    assert all((b["mlm_labels"] != -100).any() for b in batches)
    probs = W.language_probs({"en": 40, "de": 10}, 0.5)
    assert probs["en"] == pytest.approx(2 / 3)
    assert W.language_probs({"en": 40, "de": 10}, 0.0) == {"en": 0.5, "de": 0.5}


def test_resampled_reader_has_fixed_epoch_length(tmp_path):
    urls, _ = make_shards(tmp_path, 2, 5)
    pipe = W.image_text_pipeline(urls, TOK, image_size=16, patch_size=4, batch_size=4, resampled=True, epoch_samples=20, shuffle_buffer=4)
    batches = list(pipe)
    assert len(batches) == 5 and all(len(b["key"]) == 4 for b in batches)


def test_no_stock_decode_stage_in_any_reader(tmp_path):
    urls, _ = make_shards(tmp_path, 1, 2)
    pipes = [
        W.image_text_pipeline(urls, TOK),
        W.image_pipeline(urls),
        W.text_pipeline(urls, TOK),
        W.vqa_pipeline(urls, TOK, {"a": 0}),
        W.nlvr2_pipeline(urls, TOK),
        W.caption_pipeline(urls, TOK),
    ]
    for pipe in pipes:
        for stage in pipe.pipeline:
            assert not isinstance(stage, wds.autodecode.Decoder)
            assert "decode" not in getattr(getattr(stage, "f", None), "__name__", "")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_hostile_shards_and_samples_are_counted_by_kind(tmp_path, monkeypatch):
    import gzip

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # 16x16 passes, 20x20 is a "bomb"
    good = image_text_samples(0, 4)
    gz = tmp_path / "h-000000.tar.gz"
    gz.write_bytes(gzip.compress(Path(write_tar(tmp_path / "plain.tar", good)).read_bytes()))
    empty = tmp_path / "h-000001.tar"
    empty.write_bytes(b"")
    noise = tmp_path / "h-000002.tar"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    jpeg = encode_image(pixels(5), "JPEG")
    more = image_text_samples(3, 3)
    odd = [
        ("cutjpeg", {"jpg": jpeg[: len(jpeg) // 2], "txt": b"half an image"}),
        more[0],
        ("bomb", {"jpg": encode_image(pixels(6, 20, 20)), "txt": b"too many pixels"}),
        ("blank", {"jpg": encode_image(pixels(7)), "txt": b" \n\t "}),
        more[1],
    ]
    mixed = write_tar(tmp_path / "h-000003.tar", odd)
    dup = tmp_path / "h-000004.tar"
    with tarfile.open(dup, "w") as tf:  # the same member twice in one sample
        for name, data in (("twice.jpg", jpeg), ("twice.txt", b"one"), ("twice.txt", b"two"), *[(f"{more[2][0]}.{k}", v) for k, v in more[2][1].items()]):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    urls = [str(gz), str(empty), str(noise), mixed, str(dup)]
    pipe = W.image_text_pipeline(urls, TOK, image_size=16, patch_size=4, batch_size=4, train=False)
    loader = W.make_loader(pipe)
    assert sorted(keys_of(loader)) == sorted(k for k, _ in good + more)
    assert {k: v for k, v in loader.last_skips.items() if v} == {
        "truncated_tar": 2, "corrupt_image": 2, "missing_field": 1, "duplicate_member": 1,
    }


def test_hostile_json_fields_are_counted_by_kind(tmp_path):
    img = encode_image(pixels(1))
    ok = {"question_id": 1, "question": "what?", "answers": ["yes"] * 10}
    rows = [
        ("ok", json.dumps(ok).encode()),
        ("latin1", json.dumps({**ok, "question": "caf\u00e9"}, ensure_ascii=False).encode("latin-1")),
        ("notjson", b"{question_id: 3"),
        ("array", b"[1, 2]"),
        ("qidstr", json.dumps({**ok, "question_id": "4"}).encode()),
        ("qidbool", json.dumps({**ok, "question_id": True}).encode()),
        ("noq", json.dumps({"question_id": 6, "answers": []}).encode()),
        ("badanswers", json.dumps({**ok, "answers": [1, 2]}).encode()),
        ("deep", b"[" * 100_000 + b"]" * 100_000),  # RecursionError inside json
        ("longint", b'{"question_id": ' + b"9" * 5000 + b"}"),  # over Python's int digit limit
        ("qidhuge", json.dumps({**ok, "question_id": 10**20}).encode()),  # does not fit int64
        ("qidnan", b'{"question_id": NaN, "question": "q", "answers": []}'),
    ]
    url = write_tar(tmp_path / "v-000000.tar", [(k, {"jpg": img, "json": j}) for k, j in rows] + [("nojson", {"jpg": img})])
    pipe = W.vqa_pipeline(url, TOK, {"yes": 0}, image_size=16, train=False)
    loader = W.make_loader(pipe)
    assert keys_of(loader) == ["ok"]
    assert {k: v for k, v in loader.last_skips.items() if v} == {
        "bad_utf8": 1, "bad_json": 4, "bad_value": 5, "missing_field": 2,
    }
    nl = write_tar(
        tmp_path / "n-000000.tar",
        [
            (f"n{i}", {"left.jpg": img, "right.jpg": img, "json": json.dumps({"sentence": "s", "label": lab}).encode()})
            for i, lab in enumerate([True, "maybe", 3, None])
        ],
    )
    loader = W.make_loader(W.nlvr2_pipeline(nl, TOK, image_size=16, train=False))
    assert keys_of(loader) == ["n0", "n3"] and loader.last_skips["bad_value"] == 2


def test_oversized_members_drop_their_sample_unread(tmp_path):
    samples = image_text_samples(0, 3)
    samples[1][1]["jpg"] = encode_image(pixels(1, 64, 64))  # ~12 kB PNG
    url = write_tar(tmp_path / "o-000000.tar", samples)
    skips = W.SkipCounter()
    stage = W.tar_to_samples(handler=skips, keep=("jpg", "txt"), max_member_bytes=4000)
    got = list(stage(iter([{"url": url}])))
    assert [s["__key__"] for s in got] == [samples[0][0], samples[2][0]]
    assert skips.counts()["oversized_member"] == 1 and sum(skips.counts().values()) == 1


def test_uint8_batches_normalised_later_equal_float_batches(tmp_path):
    urls, _ = make_shards(tmp_path, 1, 5)
    f32 = list(W.image_text_pipeline(urls, TOK, image_size=16, patch_size=4, train=False, mlm_ratio=None))
    u8 = list(W.image_text_pipeline(urls, TOK, image_size=16, patch_size=4, train=False, mlm_ratio=None, normalize=False))
    assert u8[0]["image"].dtype == torch.uint8 and u8[0]["image"].shape == f32[0]["image"].shape
    nested = W.normalize_images({"image_text": u8[0], "text": {"text_ids": u8[0]["text_ids"]}})
    out = nested["image_text"]["image"]
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert torch.allclose(out, f32[0]["image"], atol=1e-6)
    assert torch.equal(u8[0]["text_ids"], f32[0]["text_ids"])


def test_urls_from_patterns_lists_and_manifests(tmp_path):
    urls, samples = make_shards(tmp_path, 3, 2)
    manifest = tmp_path / schema.MANIFEST_NAME.format(prefix="it")
    manifest.write_text(json.dumps({
        "kind": "image_text", "pattern": "it-{000000..000002}.tar", "total": 6, "created_by": "test",
        "shards": [{"name": f"it-{i:06d}.tar", "samples": 2} for i in range(3)],
    }))
    pattern = str(tmp_path / "it-{000000..000002}.tar")
    assert W.expand_urls(pattern) == urls
    assert W.expand_urls(str(manifest)) == urls
    assert W.expand_urls([urls[0], pattern + "::" + urls[1]]) == [urls[0], *urls, urls[1]]
    assert W.manifest_total(urls) == 6
    pipe = W.image_text_pipeline(str(manifest), TOK, image_size=16, patch_size=4, train=False)
    assert sorted(keys_of(pipe)) == sorted(k for k, _ in samples)
    with pytest.raises(ValueError, match="no shards"):
        W.EpochShardList([])


def test_seeded_shuffle_repeats_per_seed_and_epoch_and_keeps_every_sample():
    from data_pipelines.readers import SeededShuffle

    def run(seed, epoch):
        sh = SeededShuffle(50, initial=10, seed=seed)
        sh.set_epoch(epoch)
        return list(sh(iter(range(300))))

    a = run(0, 0)
    assert sorted(a) == list(range(300)) and a != list(range(300))
    assert run(0, 0) == a
    assert run(0, 1) != a and run(1, 0) != a


@pytest.mark.parametrize("num_shards,world", [(1, 2), (3, 4), (4, 2), (5, 3)])
def test_eval_split_leaves_no_rank_empty_and_reads_each_sample_once(monkeypatch, num_shards, world):
    """Evaluation readers split by shard when every rank can have one, else by sample."""
    shards = [[f"s{i}-{j}" for j in range(7)] for i in range(num_shards)]  # a shard = its samples
    per_rank = []
    for rank in range(world):
        for worker in range(2):
            monkeypatch.setattr(W.shardlists, "node_info", lambda r=rank: (r, world))
            monkeypatch.setattr(W.shardlists, "worker_info", lambda w=worker: (w, 2))
            split = W.EvalNodeSplit()
            # lazily chained, as in a pipeline: the shard stage runs only when samples are pulled
            mine = W.split_by_worker(split.shards(iter(range(num_shards))))
            samples = (s for i in mine for s in shards[i])
            if worker == 0:
                per_rank.append([])
            per_rank[-1] += list(split.samples(samples))
            assert split.by_sample == (num_shards < world)
    assert all(per_rank), "a rank received no evaluation sample"
    everything = sorted(s for part in per_rank for s in part)
    assert everything == sorted(s for shard in shards for s in shard)  # each sample exactly once


def test_is_rank_zero_reads_the_launcher_variables(monkeypatch):
    for var in W.RANK_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    assert W.is_rank_zero()
    for var in W.RANK_VARIABLES:
        monkeypatch.setenv(var, "0")
        assert W.is_rank_zero()
        monkeypatch.setenv(var, "2")
        assert not W.is_rank_zero()
        monkeypatch.delenv(var)
