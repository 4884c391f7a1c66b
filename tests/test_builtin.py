import json

from data_pipelines.builtin import make_builtin_dataset
from data_pipelines.shards import iter_tar_samples, manifest_shard_paths
from tasks.cli import main


def test_builtin_dataset_shards_cover_the_raw_files(tmp_path):
    index = make_builtin_dataset(tmp_path / "synth", num_images=30, seed=3, image_size=32, shard_size=40)
    ds = index["datasets"]
    root = tmp_path / "synth"
    coco = json.loads((root / "coco" / "dataset_coco.json").read_text())
    train_caps = sum(len(im["sentences"]) for im in coco["images"] if im["split"] in ("train", "restval"))
    assert ds["pretrain-image-text"]["total"] == train_caps
    for sub in ("train2014", "val2014"):
        qs = json.loads((root / "vqav2" / f"v2_OpenEnded_mscoco_{sub}_questions.json").read_text())
        assert ds[f"vqa-{sub}"]["total"] == len(qs["questions"])
    dev_lines = (root / "nlvr2" / "dev.json").read_text().strip().splitlines()
    assert ds["nlvr2-dev"]["total"] == len(dev_lines)
    assert all(d["skipped"] == 0 for d in ds.values())
    # shards hold what the manifests say
    paths = manifest_shard_paths(ds["vqa-val2014"]["manifest"])
    samples = [s for p in paths for s in iter_tar_samples(p)]
    assert len(samples) == ds["vqa-val2014"]["total"]
    meta = json.loads(samples[0]["json"])
    assert len(meta["answers"]) == 10 and samples[0]["jpg"][:2] == b"\xff\xd8"
    assert {"pretrain-text-ml-de", "pretrain-text-ml-fr", "pretrain-text-ml-es"} <= set(ds)
    # a second call reuses the finished dataset
    assert make_builtin_dataset(tmp_path / "synth", num_images=30, seed=3, image_size=32, shard_size=40) == index


def test_synth_cli(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path / "d"), "--num-images", "12", "--image-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "nlvr2-dev" in out and "pretrain-image-text" in out
    assert (tmp_path / "d" / "shards" / "index.json").exists()
    assert main(["data", "synth", "--out", str(tmp_path / "e"), "--num-images", "0"]) == 2
