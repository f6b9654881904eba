"""BENCHMARKS.md is generated (benchmarks/report.py) from the result files and the hand-written notes: a section
edited into BENCHMARKS.md alone would be lost at the next report, so the file must be what the report writes."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmarks_md_is_what_the_report_writes():
    spec = importlib.util.spec_from_file_location("lowbit_bench_report", ROOT / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    assert (ROOT / "BENCHMARKS.md").read_text() == report.render(), (
        "BENCHMARKS.md differs from `python benchmarks/report.py`: put hand-written sections in benchmarks/NOTES.md "
        "or benchmarks/notes/*.md and rerun the report")
