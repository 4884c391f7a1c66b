"""tasks.losses.masked_token_loss against the plain full-vocabulary cross-entropy with ignore_index."""

import torch
import torch.nn.functional as F

from data_pipelines.masking import IGNORE_INDEX
from tasks.losses import masked_token_loss


def test_masked_token_loss_matches_full_cross_entropy_with_gradients():
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(8, 11)
    hidden = torch.randn(3, 5, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (3, 5), generator=g)
    labels[torch.rand(3, 5, generator=g) < 0.6] = IGNORE_INDEX
    for smoothing in (0.0, 0.1):
        loss, logits, targets, sel = masked_token_loss(head, hidden, labels, smoothing)
        ref = F.cross_entropy(head(hidden).reshape(-1, 11), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                              label_smoothing=smoothing)
        torch.testing.assert_close(loss, ref)
        torch.testing.assert_close(torch.autograd.grad(loss, hidden)[0], torch.autograd.grad(ref, hidden)[0])
        assert torch.equal(targets, labels[labels != IGNORE_INDEX]) and logits.shape == (int(sel.sum()), 11)


def test_no_labelled_position_gives_a_zero_that_keeps_the_graph():
    head = torch.nn.Linear(4, 7)
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    loss, logits, targets, _ = masked_token_loss(head, hidden, torch.full((2, 3), IGNORE_INDEX))
    assert logits is None and targets.numel() == 0 and loss.item() == 0.0
    loss.backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))
