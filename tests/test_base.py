"""Step bookkeeping of the task base module: aux-loss-free bias updates and tokens/s."""

import torch

from tasks.pretrain import PretrainModule


def test_aux_free_bias_is_updated_once_per_step_with_the_summed_load():
    torch.manual_seed(0)
    m = PretrainModule(backbone=dict(vocab_size=300, depth=2, moe={"balancing": "aux_free"}))
    m.log = lambda *a, **k: None  # not attached to a Trainer
    m.train()
    layers = m.backbone.moe_layers()
    before = {k: l.expert_bias.clone() for k, l in layers.items()}
    img = torch.randn(2, 3, 64, 64)
    ids = torch.randint(5, 300, (2, 6))
    m.on_train_batch_start(None, 0)
    outs = [m.backbone(image=img, text_ids=ids), m.backbone(text_ids=ids)]
    for o in outs:
        m.moe_loss_and_log(o, "x", 2)
    # no bias moves before the step ends (forward never changes it)
    assert all(torch.equal(l.expert_bias, before[k]) for k, l in layers.items())
    m.on_train_batch_end(None, None, 0)  # a micro-batch ending is not an optimiser step
    assert all(torch.equal(l.expert_bias, before[k]) for k, l in layers.items())
    m.update_balancing()  # what optimizer_step runs after the optimiser's step
    for key, layer in layers.items():
        loads = [o.moe[key].expert_load for o in outs if key in o.moe]
        if not loads:
            assert torch.equal(layer.expert_bias, before[key])
            continue
        load = torch.stack(loads).sum(0)
        expected = before[key] + layer.config.bias_update_rate * torch.sign(load.mean() - load)
        torch.testing.assert_close(layer.expert_bias, expected)
    # eval forwards record nothing for the next step
    m.eval()
    m.on_train_batch_start(None, 1)
    m.moe_loss_and_log(m.backbone(image=img, text_ids=ids), "x", 2)
    assert m._step_loads == {} and m._step_tokens == 0


def test_tokens_counted_per_step_exclude_padding():
    m = PretrainModule(backbone=dict(vocab_size=300, depth=2))
    m.log = lambda *a, **k: None
    m.train()
    ids = torch.randint(5, 300, (2, 6))
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    m.on_train_batch_start(None, 0)
    m.moe_loss_and_log(m.backbone(image=torch.randn(2, 3, 64, 64), text_ids=ids, text_pad_mask=pad), "x", 2)
    m.moe_loss_and_log(m.backbone(text_ids=ids), "y", 2)
    assert int(m._step_tokens) == (2 * (17 + 6) - 2) + 2 * 6
