"""A failed kernel import never sends CUDA inputs to the reference quietly: the dispatchers raise a
one-line error naming the import failure, or, under LOWBIT_KERNELS=ref, warn once. CPU inputs use
the reference. No GPU needed: the import failure is faked in `_common`, the CUDA input by a stub."""

import warnings

import pytest
import torch

from lowbit.kernels import _common
from lowbit.kernels import hadamard as H
from lowbit.kernels import pairwise as P
from lowbit.kernels import quant as Q
from lowbit.kernels import vector as V

FAILURE = "ModuleNotFoundError: No module named 'triton'"
# (dispatch choice, kernel module, name in the messages)
CHOOSERS = [(H._use_kernel, "_hadamard_triton", "fwht"), (P._use_kernels, "_pairwise_triton", "pairwise_rotate"),
            (Q._use_triton, "_quant_triton", "quant_linear"), (V._use_triton, "_vector_triton", "vq_linear")]
IDS = [c[2] for c in CHOOSERS]


class FakeCuda:
    """Just enough of a CUDA tensor for the dispatch choice."""
    is_cuda = True
    requires_grad = False
    shape = (2, 64)


@pytest.fixture
def failed_imports(monkeypatch):
    monkeypatch.setattr(_common, "_FAILED", {m: FAILURE for _, m, _ in CHOOSERS})
    monkeypatch.setattr(_common, "_WARNED", set())
    monkeypatch.delenv("LOWBIT_KERNELS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.mark.parametrize("choose,module,who", CHOOSERS, ids=IDS)
def test_cuda_input_raises_naming_the_import_failure(failed_imports, choose, module, who):
    with pytest.raises(RuntimeError) as e:
        choose(FakeCuda())
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{who}: CUDA input") and FAILURE in msg and "LOWBIT_KERNELS=ref" in msg


def test_dispatchers_raise_before_touching_the_reference(failed_imports):
    n = 64
    scale, partner = torch.ones(n), torch.arange(n, dtype=torch.int32)[None]
    cos, sin = torch.ones(1, n), torch.zeros(1, n)
    with pytest.raises(RuntimeError, match="fwht: CUDA input"):
        H.fwht(FakeCuda())
    with pytest.raises(RuntimeError, match="pairwise_rotate: CUDA input"):
        P.pairwise_rotate(FakeCuda(), scale, partner, cos, sin)


@pytest.mark.parametrize("choose,module,who", CHOOSERS, ids=IDS)
def test_opt_in_reference_warns_once_per_process(failed_imports, monkeypatch, choose, module, who):
    monkeypatch.setenv("LOWBIT_KERNELS", "ref")
    with pytest.warns(RuntimeWarning, match=f"{who}: the Triton kernels did not import") as rec:
        assert choose(FakeCuda()) is False
    assert len(rec) == 1 and FAILURE in str(rec[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise
        assert choose(FakeCuda()) is False
        assert choose(FakeCuda()) is False


@pytest.mark.parametrize("choose,module,who", CHOOSERS, ids=IDS)
def test_cpu_inputs_use_the_reference_without_a_word(failed_imports, choose, module, who):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose(torch.randn(2, 64)) is False


def test_cpu_dispatch_matches_the_reference(failed_imports):
    x = torch.randn(3, 64)
    assert torch.equal(H.fwht(x), H.fwht_ref(x))


@pytest.mark.parametrize("choose,module,who", CHOOSERS, ids=IDS)
def test_cuda_input_takes_the_kernel_when_it_imports(monkeypatch, choose, module, who):
    pytest.importorskip("triton")
    monkeypatch.delenv("LOWBIT_KERNELS", raising=False)
    if _common.load_kernels(module) is None:
        pytest.skip(f"{module} does not import here: {_common.import_failure(module)}")
    assert choose(FakeCuda()) is True


def test_load_kernels_keeps_the_reason(monkeypatch):
    monkeypatch.setattr(_common, "_FAILED", {})
    assert _common.load_kernels("_no_such_kernels") is None
    assert "_no_such_kernels" in _common.import_failure("_no_such_kernels")
    assert _common.import_failure("_hadamard_triton") == "unavailable"
