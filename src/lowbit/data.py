"""Corpora, calibration sampling and evaluation windows (the shared benchmark protocol).

Protocol: calibration = State of the Union 1790-1899 joined with blank lines, 128 random
512-token windows drawn with seed 0; evaluation = the first 64 non-overlapping 512-token
windows of a corpus tokenized whole, without special tokens.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from . import assets

JOIN = "\n\n"


class DataError(ValueError):
    """A corpus name or path cannot be resolved."""


def _sotu(lo: int, hi: int) -> str:
    folder = assets.text_root() / "sotu"
    files = sorted(p for p in folder.glob("*.txt") if lo <= int(p.name[:4]) <= hi)
    if not files:
        raise DataError(f"no State of the Union files for {lo}-{hi} under {folder}")
    return JOIN.join(p.read_text(encoding="utf-8") for p in files)


def _moby() -> str:
    # The package's data.txt is the whole book in order (front matter, chapters, epilogue);
    # the shared protocol's FP reference (47.25) is measured on it.
    return (assets.text_root() / "moby-dick" / "data.txt").read_text(encoding="utf-8")


def hf_text(path: str, name: str | None, split: str, field: str = "text",
            data_files: str | list[str] | None = None, limit: int | None = None) -> str:
    """Join a `datasets` split's text field with blank lines (WikiText-2 / C4 style)."""
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - optional dependency
        raise DataError("the `datasets` package is needed for hub corpora: pip install datasets") from e
    ds = datasets.load_dataset(path, name, split=split, data_files=data_files)
    rows = ds[field] if limit is None else ds.select(range(min(limit, len(ds))))[field]
    return JOIN.join(rows)


# name -> (loader, description). WikiText-2 joins raw lines the usual way; C4 uses the
# first 1,100 documents of the first validation shard, as GPTQ-style evaluations do.
CORPORA: dict[str, tuple[Callable[[], str], str]] = {
    "sotu-calib": (lambda: _sotu(1790, 1899), "State of the Union 1790-1899 (calibration)"),
    "sotu-modern": (lambda: _sotu(1990, 2021), "State of the Union 1990-2021 (evaluation)"),
    "moby": (_moby, "Moby Dick, the whole book in order (evaluation)"),
    "wikitext2": (lambda: hf_text("wikitext", "wikitext-2-raw-v1", "test"), "WikiText-2 raw test (needs network)"),
    "c4": (lambda: hf_text("allenai/c4", None, "validation",
                           data_files="en/c4-validation.00000-of-00008.json.gz", limit=1100),
           "C4 validation shard 0 (needs network)"),
}


def load_text(name_or_path: str) -> str:
    """Text of a named corpus, a .txt file, a folder of .txt files, or a .jsonl file (field "text")."""
    if name_or_path in CORPORA:
        return CORPORA[name_or_path][0]()
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        files = sorted(p.glob("*.txt"))
        if not files:
            raise DataError(f"folder {p} holds no .txt files")
        return JOIN.join(f.read_text(encoding="utf-8") for f in files)
    if p.is_file():
        if p.suffix == ".jsonl":
            rows = []
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise DataError(f"{p}:{i + 1}: expected a JSON object with a \"text\" field") from e
            return JOIN.join(rows)
        return p.read_text(encoding="utf-8")
    if "/" in name_or_path or p.suffix in (".txt", ".jsonl", ".json"):
        raise DataError(f"corpus file not found: {p}")
    names = ", ".join(CORPORA)
    raise DataError(f"unknown corpus {name_or_path!r}: use one of {names}, a .txt/.jsonl file or a folder")


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of the whole text, without special tokens, as a 1-D LongTensor."""
    return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)


def calibration_windows(ids: torch.Tensor, n: int = 128, seq_len: int = 512, seed: int = 0) -> torch.Tensor:
    """`n` random windows of `seq_len` tokens (uniform start positions, seeded)."""
    if n < 1 or seq_len < 2:
        raise DataError(f"need at least 1 calibration window (--n-calib) of at least 2 tokens (--seq-len); "
                        f"got {n} windows of {seq_len}")
    if ids.numel() == 0:
        raise DataError("the calibration text is empty")
    if ids.numel() <= seq_len:
        raise DataError(f"the calibration text is shorter than one window: {ids.numel()} tokens, need more than "
                        f"--seq-len {seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n,), generator=g)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def eval_windows(ids: torch.Tensor, n: int = 64, seq_len: int = 512) -> torch.Tensor:
    """The first `n` non-overlapping windows of `seq_len` tokens (fewer if the text is short)."""
    if n < 1 or seq_len < 2:
        raise DataError(f"need at least 1 evaluation window (--windows) of at least 2 tokens (--seq-len); "
                        f"got {n} windows of {seq_len}")
    k = min(n, ids.numel() // seq_len)
    if k == 0:
        raise DataError(f"evaluation text has {ids.numel()} tokens; need at least seq_len={seq_len}")
    return ids[: k * seq_len].view(k, seq_len)
