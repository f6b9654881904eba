"""What the kernel dispatchers share: loading a Triton kernel module (remembering why it failed)
and the answer for a CUDA input when it did not load.

CUDA inputs never go to the plain-torch reference because of a failed import: the dispatchers
raise `missing_kernels`, unless LOWBIT_KERNELS=ref asks for the reference on purpose, and then
they say so once per process (`warn_reference_once`). CPU inputs use the reference by design.
"""

from __future__ import annotations

import importlib
import os
import warnings

_FAILED: dict[str, str] = {}  # kernel module -> "ImportError: ..." of its failed import
_WARNED: set[str] = set()     # dispatchers that already warned


def load_kernels(name: str):
    """The module lowbit.kernels.<name>, or None when it does not import (the reason is kept, and
    the import is not retried)."""
    if name in _FAILED:
        return None
    try:
        return importlib.import_module(f"lowbit.kernels.{name}")
    except ImportError as e:
        _FAILED[name] = f"{type(e).__name__}: {e}"
        return None


def import_failure(name: str) -> str:
    """Why lowbit.kernels.<name> did not import ('unavailable' when no failure was recorded)."""
    return _FAILED.get(name, "unavailable")


def interpreting() -> bool:
    """TRITON_INTERPRET set: the Triton kernels run on CPU tensors through the interpreter (tests, CI)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def forced_reference() -> bool:
    """LOWBIT_KERNELS=ref: the plain-torch reference everywhere, on purpose."""
    return os.environ.get("LOWBIT_KERNELS", "") == "ref"


def missing_kernels(who: str, name: str) -> RuntimeError:
    """The one-line error for a CUDA input whose Triton kernels did not import."""
    return RuntimeError(f"{who}: CUDA input but the Triton kernels did not import ({import_failure(name)}); "
                        "install triton, or set LOWBIT_KERNELS=ref to run the slow plain-torch reference on purpose")


def warn_reference_once(who: str, name: str) -> None:
    """Under LOWBIT_KERNELS=ref, say once per process and dispatcher that CUDA inputs run the
    reference because the kernels did not import."""
    if who in _WARNED:
        return
    _WARNED.add(who)
    warnings.warn(f"{who}: the Triton kernels did not import ({import_failure(name)}); CUDA inputs run the slow "
                  "plain-torch reference (LOWBIT_KERNELS=ref)", RuntimeWarning, stacklevel=4)


def cuda_kernels(tk, who: str, name: str) -> bool:
    """For a CUDA input: whether dispatcher `who` runs its kernels (`tk`: the loaded module lowbit.kernels.<name>,
    or None when it did not import). A failed import raises `missing_kernels`, unless LOWBIT_KERNELS=ref asks
    for the reference (then False, with a warning once); under LOWBIT_KERNELS=ref always False."""
    if tk is None:
        if not forced_reference():
            raise missing_kernels(who, name)
        warn_reference_once(who, name)
    return not forced_reference()


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _check_pow2(**tiles: int) -> None:
    """Raise ValueError naming the first tile size that is not a power of two."""
    for name, v in tiles.items():
        if not _pow2(v):
            raise ValueError(f"{name} must be a power of two, got {v}")
