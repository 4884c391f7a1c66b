"""A gloo rank of tests/test_retrieval.py (imports only torch and tasks.contrastive, so it starts fast)."""

import torch
import torch.nn.functional as F

from tasks.contrastive import contrastive_loss


def rank_grads(rank: int, world: int, port: int, out: str) -> None:
    """One gloo rank: its rows of the batch through a shared linear encoder, the gathered loss,
    backward, then the gradients averaged over ranks as DDP does."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x_img, x_txt, ids, enc_i, enc_t = problem()
        rows = [slice(0, 3), slice(3, 5)][rank]  # uneven: 3 and 2 rows
        img = F.normalize(enc_i(x_img[rows]), dim=-1)
        txt = F.normalize(enc_t(x_txt[rows]), dim=-1)
        loss, _ = contrastive_loss(img, txt, torch.tensor(5.0), ids[rows])
        loss.backward()
        grads = [p.grad.clone() for p in (*enc_i.parameters(), *enc_t.parameters())]
        for g in grads:  # DDP: mean over ranks
            dist.all_reduce(g)
            g /= world
        torch.save({"grads": grads, "loss": loss.detach()}, out)
    finally:
        dist.destroy_process_group()


def problem():
    g = torch.Generator().manual_seed(3)
    x_img, x_txt = torch.randn(5, 6, generator=g), torch.randn(5, 4, generator=g)
    ids = torch.tensor([0, 1, 1, 2, 3])
    torch.manual_seed(0)
    return x_img, x_txt, ids, torch.nn.Linear(6, 8), torch.nn.Linear(4, 8)
