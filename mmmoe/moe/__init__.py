"""The MH-MoE layer library: config, routers, dispatch, grouped experts, losses, statistics, parity."""

from mmmoe.moe.config import MoEConfig
from mmmoe.moe.mhmoe import MHMoE
from mmmoe.moe.stats import MoEOutput

__all__ = ["MoEConfig", "MHMoE", "MoEOutput"]
