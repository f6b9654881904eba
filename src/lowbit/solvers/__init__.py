"""Per-layer weight solvers: given W and H = X X^T, produce codes and scales."""

from __future__ import annotations

from collections.abc import Callable

from .base import QuantizedWeight, SolverError
from .gptq import gptq
from .ldlq import vq_e8
from .linalg import layer_loss
from .onebit import onebit
from .qqa import qqa
from .rtn import rtn
from .vq_qqa import vq_e8_qqa

SOLVERS: dict[str, Callable[..., QuantizedWeight]] = {"rtn": rtn, "gptq": gptq, "qqa": qqa, "onebit": onebit,
                                                  "vq_e8": vq_e8, "vq_e8_qqa": vq_e8_qqa}
NEEDS_HESSIAN = {"gptq", "qqa", "onebit", "vq_e8", "vq_e8_qqa"}
# onebit is not row-independent: its column scales h are shared by all rows
# solvers whose result for a row depends only on that row (and H): linears sharing H may be
# stacked into one call
ROW_INDEPENDENT = {"rtn", "gptq", "qqa"}  # vq_e8 is, but solve_group splits only scalar results


def get_solver(name: str) -> Callable[..., QuantizedWeight]:
    """Look a solver up by name, with a clear error."""
    if name not in SOLVERS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(SOLVERS))}")
    return SOLVERS[name]


__all__ = ["SOLVERS", "NEEDS_HESSIAN", "ROW_INDEPENDENT", "QuantizedWeight", "SolverError", "get_solver", "gptq", "layer_loss", "onebit", "qqa", "rtn"]
