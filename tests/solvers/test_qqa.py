import itertools

import pytest
import torch

from lowbit.solvers.qqa import QQAConfig, anneal_binary, anneal_categorical


def _maxcut_problem(n=14, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = (torch.rand(n, n, generator=g) < 0.5).float() * torch.rand(n, n, generator=g)
    A = torch.triu(A, 1)
    return A + A.T


def _cut(A, x):  # x [B, n] in [0,1]: sum_ij A_ij (x_i (1 - x_j)) / 1 over ordered pairs / 2 * 2
    return torch.einsum("bi,ij,bj->b", x, A, 1 - x)


def _brute_maxcut(A):
    n = A.shape[0]
    xs = torch.tensor(list(itertools.product([0.0, 1.0], repeat=n)))
    return float(_cut(A, xs).max())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_maxcut_finds_brute_force_optimum(seed):
    A = _maxcut_problem(14, seed)
    best = _brute_maxcut(A)
    x, v = anneal_binary(lambda x: -_cut(A, x), 14, QQAConfig(steps=300, replicas=32, seed=seed))
    assert float(-v) == pytest.approx(best, rel=1e-5)
    assert float(_cut(A, x[None])[0]) == pytest.approx(best, rel=1e-5)
    assert set(x.unique().tolist()) <= {0.0, 1.0}


def _ils_problem(n=8, K=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(12, n, generator=g)
    b = A @ (torch.rand(n, generator=g) * (K - 1)) + 0.3 * torch.randn(12, generator=g)
    return A, b


def _ils_value(A, b, p):  # p [B, n, K] one-hot or relaxed
    K = p.shape[-1]
    x = p @ torch.arange(K, dtype=p.dtype)
    return (x @ A.T - b).pow(2).sum(-1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_integer_least_squares_finds_brute_force_optimum(seed):
    n, K = 8, 4
    A, b = _ils_problem(n, K, seed)
    xs = torch.tensor(list(itertools.product(range(K), repeat=n)), dtype=torch.float32)
    brute = float((xs @ A.T - b).pow(2).sum(-1).min())
    # the objective is scaled to O(1) per variable; Langevin noise makes it robust
    idx, v = anneal_categorical(lambda p: 0.1 * _ils_value(A, b, p), n, K,
                                QQAConfig(steps=300, replicas=32, lr=1.0, temperature=0.05, seed=seed))
    assert float(v) / 0.1 <= brute * (1 + 1e-4) + 1e-6
    got = float(_ils_value(A, b, torch.nn.functional.one_hot(idx, K).float()[None])[0])
    assert got == pytest.approx(float(v) / 0.1, rel=1e-4)


def test_batched_problems_and_init_never_lost():
    # P independent max-cut problems in one call; a given (optimal) start is never lost
    As = torch.stack([_maxcut_problem(10, s) for s in range(3)])
    best = torch.tensor([_brute_maxcut(A) for A in As])

    def obj(x):  # x [B, P, n] -> [B, P]
        return -torch.einsum("bpi,pij,bpj->bp", x, As, 1 - x)

    x, v = anneal_binary(obj, (3, 10), QQAConfig(steps=200, replicas=16))
    assert torch.allclose(-v.float(), best, rtol=1e-5)
    # a tiny run cannot lose a known solution
    x2, v2 = anneal_binary(obj, (3, 10), QQAConfig(steps=1, replicas=2), init=x)
    assert torch.equal(x2, x) and torch.all(v2 <= v + 1e-9)


def test_allowed_mask_respected_and_seeded():
    n, K = 6, 3
    allowed = torch.ones(n, K, dtype=torch.bool)
    allowed[:, 2] = False
    obj = lambda p: -(p @ torch.arange(K, dtype=p.dtype)).sum(-1)  # wants the largest level
    cfg = QQAConfig(steps=50, replicas=4, lr=0.3, seed=3)
    idx, v = anneal_categorical(obj, n, K, cfg, allowed=allowed)
    assert torch.equal(idx, torch.ones(n, dtype=torch.long))
    idx2, v2 = anneal_categorical(obj, n, K, cfg, allowed=allowed)
    assert torch.equal(idx, idx2) and float(v) == float(v2)


def _layer_problem(n_in=64, n_out=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in, n_in, generator=g) / n_in**0.5 + torch.eye(n_in)
    x = torch.randn(1024, n_in, generator=g) @ mix
    x[:, :3] *= 8
    return torch.randn(n_out, n_in, generator=g) * 0.05, x.T @ x


@pytest.mark.parametrize("init,act_order,group", [("gptq", True, 16), ("gptq", False, 24), ("rtn", False, -1)])
def test_qqa_solver_never_worse_than_start_and_improves(init, act_order, group):
    from lowbit.formats import IntFormat
    from lowbit.solvers import gptq, layer_loss, rtn
    from lowbit.solvers.qqa import qqa

    w, H = _layer_problem()
    fmt = IntFormat(2, False, group)
    start = gptq(w, fmt, H, act_order=act_order) if init == "gptq" else rtn(w, fmt)
    base = layer_loss(w, start.dequantize(), H)
    q = qqa(w, fmt, H, init=init, act_order=act_order, steps=30, replicas=8, chunk_rows=16)
    got = layer_loss(w, q.dequantize(), H)
    assert got <= base * (1 + 1e-6)
    assert got < 0.97 * base
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= fmt.maxq
    # the stored scales are fp16-exact, so a checkpoint reproduces the weight
    assert torch.equal(q.scale, q.scale.half().float())


def test_qqa_one_step_cannot_lose_the_start():
    from lowbit.formats import IntFormat
    from lowbit.solvers import gptq, layer_loss
    from lowbit.solvers.qqa import qqa

    w, H = _layer_problem(seed=1)
    fmt = IntFormat(3, True, 32)
    base = layer_loss(w, gptq(w, fmt, H).dequantize(), H)
    q = qqa(w, fmt, H, steps=1, replicas=1, rounds=1)
    assert layer_loss(w, q.dequantize(), H) <= base * (1 + 1e-6)


def test_refit_scales_is_least_squares_optimum():
    from lowbit.formats import IntFormat, dequantize, group_index
    from lowbit.solvers import rtn
    from lowbit.solvers.qqa import group_layout, refit_scales, row_losses

    w, H = _layer_problem(n_in=40, n_out=4)
    fmt = IntFormat(2, False, 16)  # 3 groups, the last partial
    q = rtn(w, fmt)
    s = refit_scales(w, q.codes, q.scale, q.zero, H.double(), group_layout(40, 3, group_index(40, fmt)))
    base = row_losses(w - dequantize(q.codes, s, q.zero, fmt), H)
    for eps in (1e-2, -1e-2):  # a perturbed scale is worse (up to fp16 rounding)
        s2 = s.clone()
        s2[:, 1] *= 1 + eps
        assert torch.all(row_losses(w - dequantize(q.codes, s2, q.zero, fmt), H) >= base * (1 - 1e-3))
    assert torch.all(base <= row_losses(w - q.dequantize(), H) * (1 + 1e-3))
