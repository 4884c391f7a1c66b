"""The MH-MoE layer library: config, routers, dispatch, grouped experts, losses, statistics, parity."""

from mmmoe.moe.config import MoEConfig
from mmmoe.moe.mhmoe import MHMoE
from mmmoe.moe.parity import ParityRow, format_parity_table, solve_parity
from mmmoe.moe.stats import MoEOutput

__all__ = ["MoEConfig", "MHMoE", "MoEOutput", "ParityRow", "solve_parity", "format_parity_table"]
