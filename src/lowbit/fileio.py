"""Atomic file writes: a temporary file beside the target, then a rename."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json(path: str | Path, obj, indent: int = 1) -> Path:
    """Write `obj` as JSON to `path` atomically (a reader never sees a partial file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=indent))
    os.replace(tmp, path)
    return path


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure to `path` atomically (same suffix, so the same format) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)
    return path
