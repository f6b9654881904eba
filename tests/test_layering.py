"""Import layering: formats and transforms hold the references, kernels depend on them (never the
other way round at import time), and every layer imports on its own in a fresh interpreter."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import lowbit

ROOT = Path(lowbit.__file__).parent


def _module_level_imports(path: Path) -> set[str]:
    """Packages named by the module-level imports of one file (relative ones resolved)."""
    pkg = path.parent.relative_to(ROOT.parent).parts
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            base = list(pkg[: len(pkg) - node.level + 1]) if node.level else []
            out.add(".".join(base + (node.module.split(".") if node.module else [])))
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


@pytest.mark.parametrize("layer,forbidden", [("formats", ("lowbit.kernels", "lowbit.nn", "lowbit.solvers")),
                                             ("transforms", ("lowbit.kernels", "lowbit.nn")),
                                             ("solvers", ("lowbit.kernels", "lowbit.nn")),
                                             ("kernels", ("lowbit.nn",))])
def test_lower_layers_do_not_import_upper_ones(layer, forbidden):
    for path in sorted((ROOT / layer).glob("*.py")):
        bad = [m for m in _module_level_imports(path) if m.startswith(forbidden)]
        assert not bad, f"{path.name} imports {bad} at module level"


def test_each_layer_imports_alone():
    mods = ["lowbit.formats.core", "lowbit.transforms.pairwise", "lowbit.transforms", "lowbit.kernels.pairwise",
            "lowbit.kernels", "lowbit.solvers", "lowbit.nn.quantized", "lowbit.kernels.vector", "lowbit.nn.vector",
            "lowbit.export.vllm_plugin"]
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n" \
           "    for k in [k for k in sys.modules if k.startswith('lowbit')]: del sys.modules[k]\n" \
           "    importlib.import_module(m)\n"
    r = subprocess.run([sys.executable, "-c", code, *mods], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
