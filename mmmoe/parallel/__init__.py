"""Expert parallelism for MH-MoE layers: the only part of ``mmmoe`` that touches process groups.

Applied from outside to a built single-device model (the model code stays single-device)::

    layout = ExpertParallelLayout.create(ep_degree=2)      # collective; after init_process_group
    parallelize_experts(model, layout)                     # every MHMoE keeps E / ep_degree experts
    ...forward / backward as usual...
    reduce_gradients(model, layout)                        # or DDP for the replicated weights and
                                                           # reduce_expert_gradients for the experts
    full = full_state_dict(model, layout)                  # layout-independent checkpoint
    drain(model)                                           # after an evaluation loop whose ranks
                                                           # ran different numbers of batches

See :mod:`mmmoe.parallel.expert_parallel` for the dispatch, the capacity semantics and the
gradient-reduction rules.
"""

from mmmoe.parallel.comm import all_to_all, free_port
from mmmoe.parallel.expert_parallel import (
    ExpertParallelDispatcher,
    clip_grad_norm_,
    drain,
    expert_parameter_names,
    full_optimizer_state,
    full_state_dict,
    parallelize_experts,
    reduce_expert_gradients,
    reduce_gradients,
    shard_optimizer_state,
    shard_state_dict,
)
from mmmoe.parallel.layout import ExpertParallelLayout

__all__ = [
    "ExpertParallelDispatcher",
    "ExpertParallelLayout",
    "all_to_all",
    "free_port",
    "clip_grad_norm_",
    "drain",
    "expert_parameter_names",
    "full_optimizer_state",
    "full_state_dict",
    "parallelize_experts",
    "reduce_expert_gradients",
    "reduce_gradients",
    "shard_optimizer_state",
    "shard_state_dict",
]
