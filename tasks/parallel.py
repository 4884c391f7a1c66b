"""Expert parallelism under Lightning: ``ExpertParallelStrategy``, DDP with MoE experts sharded.

    mmmoe fit --config configs/pretrain/tiny.yaml --config configs/trainer/cpu-ep.yaml        # 2 CPU processes
    mmmoe fit --config configs/pretrain/base.yaml --config configs/trainer/multi-gpu-ep.yaml  # every GPU, NCCL

The strategy is Lightning's ``DDPStrategy`` plus, before DDP wraps the module, the sharding of every
MH-MoE layer's experts with ``mmmoe.parallel.parallelize_experts`` over expert-parallel groups of
``expert_parallel`` consecutive ranks (the model code itself stays single-device). Then:

* DDP averages the replicated (non-expert) weights over all ranks and ignores the expert shards
  (it would otherwise broadcast rank 0's shard and average different experts); after backward the
  expert gradients are summed over the ranks holding the same shard and divided by the world size
  (``mmmoe.parallel.reduce_expert_gradients``), which makes every gradient that of the mean rank
  loss, exactly as plain DDP of the single-device model.
* Gradient clipping by norm uses the norm of the whole model (expert shards summed over the group).
* Checkpoints hold the full expert tensors (gathered from the group; AdamW moments too), the same
  keys and shapes as a single-device run: a checkpoint loads at any expert-parallel degree that
  divides the expert count, in one process (``mmmoe evaluate`` / ``predict``), or as the
  ``init_from`` of a fine-tuning run.
* Routing statistics in the logs are group-wide (see ``mmmoe.parallel.expert_parallel``).

* Evaluation loops may give the ranks different numbers of batches: a rank that finishes early
  serves its experts to the others until all are done (``ExpertParallelDrain``, added
  automatically, at the end of each validation / test / predict epoch).

Constraints: in training every rank must run the same number of steps (the resampled training
readers do); ``expert_parallel`` must divide the world size and every MoE layer's ``num_experts``.
Generation loops (captioning) that stop early on one rank are not covered by the drain.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Mapping, Optional, Union

import pytorch_lightning as pl
import torch
from pytorch_lightning.core.optimizer import LightningOptimizer
from pytorch_lightning.strategies import DDPStrategy
from torch.nn.parallel import DistributedDataParallel

from mmmoe.parallel import (
    ExpertParallelLayout,
    clip_grad_norm_,
    drain,
    expert_parameter_names,
    full_optimizer_state,
    full_state_dict,
    parallelize_experts,
    reduce_expert_gradients,
    shard_optimizer_state,
    shard_state_dict,
)

log = logging.getLogger(__name__)


class ExpertParallelDrain(pl.Callback):
    """At the end of each evaluation epoch a rank that ran out of batches keeps serving its experts
    until every rank is done (``mmmoe.parallel.drain``), so validation / test / predict loaders
    may give the ranks different numbers of batches. Added by ``ExpertParallelStrategy``."""

    def _drain(self, pl_module: pl.LightningModule) -> None:
        drain(pl_module)

    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: pl.LightningModule) -> None:
        self._drain(pl_module)

    def on_test_epoch_end(self, trainer: "pl.Trainer", pl_module: pl.LightningModule) -> None:
        self._drain(pl_module)

    def on_predict_epoch_end(self, trainer: "pl.Trainer", pl_module: pl.LightningModule) -> None:
        self._drain(pl_module)


class ExpertParallelStrategy(DDPStrategy):
    """DDP with the experts of every MH-MoE layer sharded over groups of ``expert_parallel`` ranks.

    Args:
        expert_parallel: expert-parallel degree P (ranks sharing one copy of the experts; divides
            the world size and each layer's expert count). 1 = plain DDP. The world splits into
            world/P groups of consecutive ranks, so P <= GPUs per node keeps the all-to-all
            inside a node.
        capacity_scope: with a capacity factor, ``"group"`` decides drops on the group's
            sub-tokens (as one device on the group's batch), ``"rank"`` on each rank's own (as DDP).
        **kwargs: ``DDPStrategy`` options (``process_group_backend``, ``find_unused_parameters``,
            ``timeout``, ``start_method``...).
    """

    strategy_name = "ddp_expert_parallel"

    def __init__(self, expert_parallel: int = 2, capacity_scope: str = "group", **kwargs: Any):
        super().__init__(**kwargs)
        if isinstance(expert_parallel, bool) or not isinstance(expert_parallel, int) or expert_parallel < 1:
            raise ValueError(f"expert_parallel={expert_parallel!r} must be a positive integer")
        if capacity_scope not in ("group", "rank"):
            raise ValueError(f"capacity_scope={capacity_scope!r} is invalid: allowed group, rank")
        self.expert_parallel = expert_parallel
        self.capacity_scope = capacity_scope
        self.layout: Optional[ExpertParallelLayout] = None

    # ------------------------------------------------------------------ model
    def setup(self, trainer: "pl.Trainer") -> None:
        module = self.model
        assert isinstance(module, pl.LightningModule)
        if self.layout is None:
            self.layout = ExpertParallelLayout.create(self.expert_parallel)
            parallelize_experts(module, self.layout, self.capacity_scope)
            names = expert_parameter_names(module)
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)
            if self.global_rank == 0:
                log.info("%s; %d expert weight tensors sharded", self.layout.describe(), len(names))
        if not any(isinstance(cb, ExpertParallelDrain) for cb in trainer.callbacks):
            trainer.callbacks.insert(0, ExpertParallelDrain())
        super().setup(trainer)
        plugin = self.precision_plugin
        default_clip = plugin.clip_grad_by_norm

        def clip_grad_by_norm(optimizer: torch.optim.Optimizer, clip_val: Union[int, float]) -> None:
            clip_grad_norm_(plugin.main_params(optimizer), float(clip_val), self.lightning_module)

        if not getattr(default_clip, "_expert_parallel", False):
            clip_grad_by_norm._expert_parallel = True  # type: ignore[attr-defined]
            plugin.clip_grad_by_norm = clip_grad_by_norm  # type: ignore[method-assign]

    def optimizer_step(self, optimizer: torch.optim.Optimizer, closure: Callable[[], Any],
                       model: Optional[Any] = None, **kwargs: Any) -> Any:
        # the closure runs forward + backward of the step's last micro-batch (earlier micro-batches
        # of gradient accumulation only accumulate); the expert gradients are complete after it
        def closure_then_reduce() -> Any:
            out = closure()
            reduce_expert_gradients(self.lightning_module, self.layout)
            return out

        return super().optimizer_step(optimizer, closure_then_reduce, model, **kwargs)

    # ------------------------------------------------------------------ checkpoints
    def lightning_module_state_dict(self) -> Dict[str, Any]:
        """Full expert tensors (a collective: Lightning calls it on every rank)."""
        return full_state_dict(self.lightning_module)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        state = checkpoint["state_dict"]
        if self.layout is not None:  # already sharded: cut the full tensors to this rank's shard
            state = shard_state_dict(self.lightning_module, state)
        self.lightning_module.load_state_dict(state, strict=strict)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        return full_optimizer_state(self.lightning_module, optimizer)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        states = [shard_optimizer_state(self.lightning_module, opt, s)
                  for opt, s in zip(self.optimizers, checkpoint["optimizer_states"])]
        super().load_optimizer_state_dict({**checkpoint, "optimizer_states": states})
