"""One rank of the DDP equivalence check (run by tests/test_ddp.py as ``python -m tests.ddp_worker``).

Both the ranks and the single-process reference train :class:`RegressionTask` on the same global
batches: rank r of W takes rows r, r+W, r+2W, ... of each global batch of W*B rows; the reference
takes all of them. Lightning reads the rank layout from the environment (LOCAL_RANK, NODE_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), so it starts no processes itself.
"""

from __future__ import annotations

import argparse
import os
from typing import Dict, List

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from mmmoe.models import BackboneSpec
from tasks.base import MMMoEModule, OptimSpec

GLOBAL_BATCH = 8
STEPS = 3
VARIANTS = ("dense", "mhmoe-h2")


class RegressionTask(MMMoEModule):
    """Image-only regression of the backbone's output to a fixed target: a per-sample mean loss, so
    the mean over ranks of the rank losses is the loss of the global batch (what DDP assumes)."""

    backbone_inputs = ("image",)

    def __init__(self, variant: str = "dense"):
        # aux-free balancing (no batch-level aux loss, which would not split over ranks), a bias
        # step large enough to move in 3 steps
        moe = {"balancing": "aux_free", "bias_update_rate": 0.05, "z_loss_coef": 0.0} if variant != "dense" else {}
        super().__init__(backbone=BackboneSpec("tiny", variant, depth=2, vl_layers=1, moe=moe),
                         optim=OptimSpec(lr=3e-3, warmup_steps=1, min_lr_ratio=0.1))

    def training_step(self, batch, batch_idx):
        image, target = batch
        out = self.backbone(image=image)
        return F.mse_loss(out.hidden, target) + self.moe_loss_and_log(out, "", image.shape[0])


def global_batches(seed: int = 0) -> List[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(STEPS, GLOBAL_BATCH, 3, 64, 64, generator=gen)
    targets = torch.randn(STEPS, GLOBAL_BATCH, 17, 96, generator=gen)
    return [(images[i], targets[i]) for i in range(STEPS)]


class Slices(torch.utils.data.Dataset):
    """Step i yields this rank's rows of global batch i (already batched)."""

    def __init__(self, rank: int, world: int):
        self.items = [(x[rank::world].clone(), y[rank::world].clone()) for x, y in global_batches()]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def train(variant: str, rank: int, world: int, **trainer_kwargs) -> Dict[str, torch.Tensor]:
    pl.seed_everything(0, workers=True, verbose=False)
    module = RegressionTask(variant)
    loader = torch.utils.data.DataLoader(Slices(rank, world), batch_size=None, shuffle=False)
    trainer = pl.Trainer(max_steps=STEPS, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                         **trainer_kwargs)
    trainer.fit(module, loader)
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    state["trainable"] = torch.tensor([p.requires_grad for p in module.parameters()])
    return state


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True, help="folder for rank<r>-<variant>.pt")
    args = p.parse_args()
    torch.set_num_threads(1)
    rank, world = int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    for variant in VARIANTS:
        state = train(variant, rank, world, devices=world, strategy="ddp")
        torch.save(state, os.path.join(args.out, f"rank{rank}-{variant}.pt"))


if __name__ == "__main__":
    main()
