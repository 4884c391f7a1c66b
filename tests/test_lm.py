"""English causal LM and multilingual masked LM (tasks/lm.py) on a tiny built-in dataset: perplexity
against a direct computation and against the unigram baseline after a short training; configs."""

import importlib
import inspect
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

pl = pytest.importorskip("pytorch_lightning")

from data_pipelines.builtin import make_builtin_dataset  # noqa: E402
from data_pipelines.datamodules import TextDataModule  # noqa: E402
from data_pipelines.tokenizer import train_tokenizer  # noqa: E402
from tasks.base import init_parameters  # noqa: E402
from tasks.lm import CausalLMModule, MaskedLMModule, PerplexityMeter, UnigramCounts  # noqa: E402

LANGS = ("de", "en", "es", "fr")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared CPU run several times faster on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmdata")
    # 60 images -> 600 English sentences in 6 shards, 300 per language in 3 shards
    make_builtin_dataset(root, num_images=60, seed=0, image_size=64, shard_size=100)
    tok = train_tokenizer(root / "text", root / "tokenizer", vocab_size=300)
    return root, str(tok)


def _trainer(steps):
    return pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0)


def _causal_dm(root, tok):
    s = root / "shards"
    return TextDataModule(tok, train=str(s / "pretrain-text-en-{000000..000004}.tar"),
                          val=str(s / "pretrain-text-en-000005.tar"), mlm_ratio=None, batch_size=16, max_len=40,
                          num_workers=0, pin_memory=False, shuffle_buffer=0)


def _mlm_dm(root, tok):
    s = root / "shards"
    return TextDataModule(tok, train={g: str(s / f"pretrain-text-ml-{g}-{{000000..000001}}.tar") for g in LANGS},
                          val={g: str(s / f"pretrain-text-ml-{g}-000002.tar") for g in LANGS}, mlm_ratio=0.15,
                          batch_size=16, max_len=40, num_workers=0, pin_memory=False, shuffle_buffer=0)


SHORT = dict(backbone=dict(preset="tiny", variant="dense", depth=2),
             optim=dict(lr=1e-3, weight_decay=0.01, warmup_steps=10, min_lr_ratio=1.0))


@pytest.fixture(scope="module")
def causal(data, tmp_path_factory):
    root, tok = data
    torch.manual_seed(0)
    dm = _causal_dm(root, tok)
    module = CausalLMModule(tokenizer=tok, **SHORT)
    _trainer(40).fit(module, datamodule=dm)
    out = tmp_path_factory.mktemp("lm_eval")
    return module, dm, module.evaluate_split(dm, "val", str(out)), out


def test_causal_lm_beats_the_unigram_baseline(causal):
    module, dm, metrics, out = causal
    assert set(metrics) >= {"lm_perplexity", "lm_baseline_perplexity", "lm_nll", "lm_tokens"}
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["lm_perplexity"] < 0.5 * metrics["lm_baseline_perplexity"], metrics  # 9 vs 46 over 3 seeds
    saved = json.loads((out / "lm_metrics.json").read_text())
    assert saved["lm_perplexity"] == pytest.approx(metrics["lm_perplexity"])


def test_causal_perplexity_matches_a_direct_computation(causal):
    """exp(mean NLL of every next token, EOS included, padding excluded), from full-vocabulary logits."""
    module, dm, metrics, _ = causal
    module.eval()
    total, count, unigram_text = 0.0, 0, []
    with torch.no_grad():
        for batch in dm.val_dataloader():
            ids, pad = batch["text_ids"], batch["text_pad_mask"]
            h = module.backbone(text_ids=ids, text_pad_mask=pad, attn_mode="prefix_causal").text_hidden
            logp = module.head(h[:, :-1]).log_softmax(-1)
            for b in range(ids.shape[0]):
                n = int((~pad[b]).sum())  # bos + tokens + eos
                tgt = ids[b, 1:n]
                total -= logp[b, torch.arange(n - 1), tgt].double().sum().item()
                count += n - 1
    assert count == metrics["lm_tokens"]
    assert metrics["lm_perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)


def test_causal_generation_from_a_prompt(causal):
    module, _, _, _ = causal
    text = module.generate_text("A large", max_len=12)
    assert isinstance(text, str)
    assert module.generate_text("A large", max_len=12, beam_size=2) is not None


def test_causal_lm_refuses_masked_batches(data):
    root, tok = data
    module = CausalLMModule(tokenizer=tok, **SHORT)
    dm = _mlm_dm(root, tok)
    with pytest.raises(ValueError, match="mlm_ratio=None"):
        module.evaluate_split(dm, "val", "unused")


@pytest.fixture(scope="module")
def masked(data, tmp_path_factory):
    root, tok = data
    torch.manual_seed(0)
    dm = _mlm_dm(root, tok)
    module = MaskedLMModule(tokenizer=tok, **SHORT)
    _trainer(250).fit(module, datamodule=dm)
    out = tmp_path_factory.mktemp("mlm_eval")
    return module, dm, module.evaluate_split(dm, "val", str(out))


def test_masked_lm_beats_the_unigram_baseline_per_language(masked):
    module, dm, m = masked
    for lang in LANGS:
        assert f"mlm_perplexity_{lang}" in m and f"mlm_baseline_perplexity_{lang}" in m
    assert m["mlm_perplexity"] < 0.8 * m["mlm_baseline_perplexity"], m  # 15-16 vs 24 over 3 seeds
    # the overall figure is the token-weighted one: between the per-language extremes
    per_lang = [m[f"mlm_perplexity_{g}"] for g in LANGS]
    assert min(per_lang) <= m["mlm_perplexity"] <= max(per_lang)


def test_masked_lm_evaluation_repeats_exactly(masked, tmp_path):
    module, dm, m = masked
    again = module.evaluate_split(dm, "val", str(tmp_path))
    assert again == m  # the masks of the evaluated text are drawn with a fixed seed


def test_masked_lm_refuses_unmasked_batches(data):
    root, tok = data
    module = MaskedLMModule(tokenizer=tok, **SHORT)
    with pytest.raises(ValueError, match="mlm_ratio"):
        module.evaluate_split(_causal_dm(root, tok), "val", "unused")


def test_missing_split_is_a_clear_error(data):
    root, tok = data
    module = CausalLMModule(tokenizer=tok, **SHORT)
    dm = _causal_dm(root, tok)
    with pytest.raises(ValueError, match="no test split"):
        module.evaluate_split(dm, "test", "unused")


# ------------------------------------------------------------------------------ meters
def test_perplexity_meter_and_unigram_against_hand_computation():
    meter = PerplexityMeter()
    meter.update(torch.tensor([1.0, 2.0, 3.0]), ["de", "en", "de"])
    meter.update(torch.tensor([0.5]), ["en"])
    assert meter.perplexity("de") == pytest.approx(math.exp(2.0))
    assert meter.perplexity("en") == pytest.approx(math.exp(1.25))
    assert meter.perplexity() == pytest.approx(math.exp(6.5 / 4))
    uni = UnigramCounts(vocab_size=4)
    uni.update(torch.tensor([1, 1, 2, 3]), ["a", "a", "a", "b"])
    # group a: counts [0, 2, 1, 0] + 1 each -> p(1) = 3 / 7
    assert uni.log_probs("a")[1].exp().item() == pytest.approx(3 / 7)
    assert uni.nll(torch.tensor([1, 3]), ["a", "b"]).tolist() == pytest.approx([-math.log(3 / 7), -math.log(2 / 5)])
    assert uni.log_probs("unseen").exp().tolist() == pytest.approx([0.25] * 4)


def test_token_losses_skip_ignored_positions_and_use_label_smoothing_only_in_the_loss():
    from mmmoe.models import TokenHead
    from tasks.lm import token_losses

    torch.manual_seed(0)
    head = TokenHead(8, 11)
    h = torch.randn(2, 5, 8)
    labels = torch.tensor([[1, 2, -100, -100, -100], [3, -100, 4, 5, -100]])
    loss, nll, rows = token_losses(head, h, labels, label_smoothing=0.1)
    logits = head(h)
    ref = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), ignore_index=-100, reduction="none")
    assert nll.tolist() == pytest.approx(ref[labels.reshape(-1) != -100].tolist(), rel=1e-5)
    assert rows.tolist() == [0, 0, 1, 1, 1]
    smoothed = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), ignore_index=-100, label_smoothing=0.1)
    assert loss.item() == pytest.approx(smoothed.item(), rel=1e-5)


# ------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("name", ["configs/lm/causal_en.yaml", "configs/lm/mlm_multilingual.yaml",
                                  "configs/finetune/caption.yaml"])
def test_configs_name_real_classes_and_arguments(name):
    cfg = yaml.safe_load((REPO / name).read_text())
    for section in ("model", "data"):
        mod, _, cls = cfg[section]["class_path"].rpartition(".")
        klass = getattr(importlib.import_module(mod), cls)
        unknown = set(cfg[section]["init_args"]) - set(init_parameters(klass))  # base arguments included
        assert not unknown, f"{name}: {section}.init_args {sorted(unknown)}"
    model, data = cfg["model"]["init_args"], cfg["data"]["init_args"]
    assert model["tokenizer"] == data["tokenizer"]
    positions = model["backbone"].get("max_text_len", 40)  # 40: the tiny preset's
    assert data.get("context", data.get("max_len")) <= positions
    inspect.signature(pl.Trainer.__init__).bind(None, **{k: v for k, v in cfg["trainer"].items()
                                                        if k not in ("logger", "callbacks")})
