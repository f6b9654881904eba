"""Data loaders of the lowbit_cloze tasks: the jsonl files beside this one, read without any hub access."""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _rows(name: str) -> list[dict]:
    with open(HERE / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _split(name: str):
    import datasets

    return {"test": datasets.Dataset.from_list(_rows(name))}


def load_cloze(**kwargs):
    """21 multiple-choice cloze items from Moby Dick, chapter 1: context, four one-word choices, label."""
    return _split("cloze.jsonl")


def load_passages(**kwargs):
    """Four paragraphs of Moby Dick, chapter 1, scored whole (word / byte perplexity)."""
    return _split("passages.jsonl")
