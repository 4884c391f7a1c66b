"""Mixed precision on CPU, the proxy of CUDA bf16 training: ``torch.autocast("cpu", bfloat16)``
forward + backward through the MH-MoE layer (every option) and the backbone of every variant; the
gradients are finite and point where the float32 ones do; the grouped-matmul fast path is the one
taken under autocast; ``bf16-true`` (bf16 weights) trains; Lightning's ``bf16-mixed`` runs a step."""

import pytest
import torch
import torch.nn.functional as F

from mmmoe.models import create_model
from mmmoe.moe import MHMoE, MoEConfig
from mmmoe.moe import experts as experts_mod

# widths that keep every grouped-matmul row stride 16-byte aligned in bf16 (multiples of 8)
LAYER_OPTIONS = {
    "mhmoe-h2": dict(num_heads=2, top_k=2),
    "smoe-h1": dict(num_heads=1, top_k=1, head_layer=False, merge_layer=False),
    "mhmoe-h4": dict(num_heads=4, top_k=2),
    "capacity": dict(num_heads=2, top_k=2, capacity_factor=1.0),
    "xmoe": dict(num_heads=2, top_k=2, router="xmoe"),
    "aux-free": dict(num_heads=2, top_k=2, balancing="aux_free"),
    "shared-expert": dict(num_heads=2, top_k=2, shared_expert_hidden=64),
    "bitnet": dict(num_heads=2, top_k=2, bitnet=True),
    "gelu": dict(num_heads=2, top_k=2, activation="gelu"),
    "z-loss": dict(num_heads=2, top_k=2, z_loss_coef=1e-3),
}


def _layer(name: str) -> MHMoE:
    torch.manual_seed(0)
    return MHMoE(MoEConfig(d_model=64, num_experts=8, expert_hidden=32, **LAYER_OPTIONS[name]))


def _grads(module, loss) -> dict:
    module.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def _layer_loss(layer: MHMoE, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    pad = torch.zeros(x.shape[:-1], dtype=torch.bool)
    pad[::2, -5:] = True  # padded text: the routed tokens are scattered back into zeros
    y, out = layer(x, pad)
    return F.mse_loss(y.float(), target) + out.loss.float()


@pytest.mark.parametrize("name", sorted(LAYER_OPTIONS))
def test_layer_bf16_autocast_backward_matches_float32(name):
    layer = _layer(name)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 16, 64, generator=gen)
    target = torch.randn(6, 16, 64, generator=gen)
    ref = _grads(layer, _layer_loss(layer, x, target))
    with torch.autocast("cpu", torch.bfloat16):
        y, _ = layer(x)
        loss = _layer_loss(layer, x, target)
    assert y.dtype == torch.bfloat16  # the experts really ran in bf16
    got = _grads(layer, loss)
    assert set(got) == set(ref)
    for n, g in got.items():
        assert g.dtype == torch.float32, f"{n}: master gradient must stay float32"
        assert torch.isfinite(g).all(), f"{n}: non-finite gradient under autocast"
    # all gradients together within 0.99; each tensor within 0.95 (bf16 rounding of the head layer
    # can flip a near-tied top-k choice, which moves whole rows of one expert or router weight)
    names = sorted(ref)
    assert _cosine(torch.cat([got[n].flatten() for n in names]), torch.cat([ref[n].flatten() for n in names])) > 0.99
    for n in names:
        if ref[n].abs().max() > 0:
            assert _cosine(got[n], ref[n]) > 0.95, f"{n}: cosine {_cosine(got[n], ref[n]):.4f} vs float32"


@pytest.mark.parametrize("impl", ["grouped", "blocked"])
def test_fast_grouped_path_is_taken_under_autocast(monkeypatch, impl):
    """Fails if any grouped matmul of forward or backward falls back to the per-expert loop, on the
    accelerator path (grouped, forced here on CPU) and on the CPU path (blocked)."""
    if not experts_mod._HAS_GROUPED_MM:
        pytest.skip("this torch has no _grouped_mm")

    def no_loop(*args, **kwargs):
        raise AssertionError(f"a path other than {impl} (or the per-expert fallback loop) taken under autocast")

    monkeypatch.setattr(experts_mod, "_loop_mm", no_loop)
    monkeypatch.setattr(experts_mod, "_loop_wgrad", no_loop)
    other = {"blocked": experts_mod._FusedExperts, "grouped": experts_mod._BlockedExperts}[impl]
    monkeypatch.setattr(other, "apply", no_loop)
    for name in ("mhmoe-h2", "smoe-h1", "gelu", "bitnet"):
        layer = _layer(name)
        layer.experts.impl = impl
        x = torch.randn(5, 13, 64)  # an odd number of rows (the weight-gradient operand is padded)
        with torch.autocast("cpu", torch.bfloat16):
            y, out = layer(x)
        (y.float().square().mean() + out.loss).backward()
        assert layer.experts.w_in.grad is not None and torch.isfinite(layer.experts.w_in.grad).all()


def test_bf16_true_weights_train():
    layer = _layer("mhmoe-h2").to(torch.bfloat16)
    x = torch.randn(4, 8, 64, dtype=torch.bfloat16)
    y, out = layer(x)
    assert y.dtype == torch.bfloat16
    (y.float().square().mean() + out.loss).backward()
    for n, p in layer.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all(), n


def _backbone_loss(model, image, ids, target):
    # regression to a fixed random target (a squared norm of the LayerNorm output would be nearly
    # constant, and its gradients mostly rounding noise)
    out = model(image=image, text_ids=ids)
    return F.mse_loss(out.hidden.float(), target) + out.aux_loss.float()


@pytest.mark.parametrize("variant", ["dense", "smoe", "fine-grained", "mhmoe-h2", "mhmoe-h3"])
def test_backbone_bf16_autocast_every_variant(variant):
    torch.manual_seed(0)
    model = create_model("tiny", variant, depth=2, vl_layers=1, vocab_size=300)
    gen = torch.Generator().manual_seed(2)
    image = torch.randn(3, 3, 64, 64, generator=gen)
    ids = torch.randint(5, 300, (3, 12), generator=gen)
    target = torch.randn(3, 1 + 16 + 12, 96, generator=gen)
    ref = _grads(model, _backbone_loss(model, image, ids, target))
    with torch.autocast("cpu", torch.bfloat16):
        loss = _backbone_loss(model, image, ids, target)
    got = _grads(model, loss)
    assert set(got) == set(ref)
    flat_ref = torch.cat([ref[n].flatten() for n in sorted(ref)])
    flat_got = torch.cat([got[n].flatten() for n in sorted(got)])
    assert torch.isfinite(flat_got).all()
    assert _cosine(flat_got, flat_ref) > 0.99
    for n in ref:  # every large tensor on its own too
        if ref[n].numel() >= 1024 and ref[n].abs().max() > 0:
            assert _cosine(got[n], ref[n]) > 0.98, f"{variant} {n}: {_cosine(got[n], ref[n]):.4f}"


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_lightning_bf16_precisions_train_a_step(precision):
    import pytorch_lightning as pl

    from mmmoe.models import BackboneSpec
    from tasks.base import MMMoEModule, OptimSpec

    class Tiny(MMMoEModule):
        def __init__(self):
            super().__init__(backbone=BackboneSpec("tiny", "mhmoe-h2", depth=2),
                             optim=OptimSpec(warmup_steps=1, min_lr_ratio=0.1))

        def training_step(self, batch, batch_idx):
            out = self.backbone(image=batch)
            return out.hidden.float().square().mean() + self.moe_loss_and_log(out, "", batch.shape[0])

    torch.manual_seed(0)
    module = Tiny()
    before = {n: p.detach().float().clone() for n, p in module.named_parameters()}
    data = torch.utils.data.DataLoader(torch.randn(4, 3, 64, 64), batch_size=2)
    # gradient clipping as every shipped config has it (Lightning refuses it with fused optimisers under AMP)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", devices=1, precision=precision, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         gradient_clip_val=1.0)
    trainer.fit(module, data)
    moved = [n for n, p in module.named_parameters() if not torch.equal(p.detach().float(), before[n])]
    assert "backbone.blocks.1.ffn.ways.vision.experts.w_in" in moved
    assert all(torch.isfinite(p).all() for p in module.parameters())
