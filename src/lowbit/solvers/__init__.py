"""Per-layer weight solvers: given W and H = X X^T, produce codes and scales.

Each solver is registered with its frozen config in `solvers.configs` (`register_config`); the
tables below are read from that registry."""

from __future__ import annotations

from collections.abc import Callable

from .base import QuantizedWeight, SolverError
from .configs import CONFIGS, GPTQConfig, OneBitConfig, QQASolverConfig, RTNConfig, SolverConfig, VQE8Config, \
    VQE8QQAConfig, config_type, register_config
from .gptq import gptq
from .ldlq import vq_e8
from .linalg import layer_loss
from .onebit import onebit
from .qqa import qqa
from .rtn import rtn
from .vq_qqa import vq_e8_qqa

SOLVERS: dict[str, Callable[..., QuantizedWeight]] = {m: c.solver for m, c in CONFIGS.items()}
NEEDS_HESSIAN = {m for m, c in CONFIGS.items() if c.needs_hessian}
# solvers whose result for a row depends only on that row (and H): linears sharing H may be
# stacked into one call. onebit is not (its column scales h are shared by all rows); vq_e8 is,
# but solve_group splits only scalar results
ROW_INDEPENDENT = {m for m, c in CONFIGS.items() if c.row_independent}


def get_solver(name: str) -> Callable[..., QuantizedWeight]:
    """Look a solver up by name, with a clear error."""
    if name not in CONFIGS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(CONFIGS))}")
    return CONFIGS[name].solver


__all__ = ["CONFIGS", "SOLVERS", "NEEDS_HESSIAN", "ROW_INDEPENDENT", "GPTQConfig", "OneBitConfig", "QQASolverConfig",
           "QuantizedWeight", "RTNConfig", "SolverConfig", "SolverError", "VQE8Config", "VQE8QQAConfig", "config_type",
           "get_solver", "gptq", "layer_loss", "onebit", "qqa", "register_config", "rtn", "vq_e8", "vq_e8_qqa"]
