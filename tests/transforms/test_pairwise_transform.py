import pytest
import torch

from lowbit.transforms import PairwiseRotation, random_pairs, ranked_pairs
from lowbit.transforms.pairwise import apply_blocks, block_matrices, rotate_ref


def _check_pairs(pairs, mask, n, group):
    seen = set()
    for k in range(pairs.shape[0]):
        valid = pairs[k][mask[k]]
        flat = valid.flatten().tolist()
        assert len(set(flat)) == len(flat), "a channel appears twice in one rotation"
        for a, b in valid.tolist():
            assert 0 <= a < b < n and a // group == b // group
            assert (a, b) not in seen, "a pair is reused across rotations"
            seen.add((a, b))


@pytest.mark.parametrize("n", [7, 64, 576, 1536])
def test_random_pairs_valid_and_seeded(n):
    pairs, mask = random_pairs(n, 8, 128, seed=3)
    _check_pairs(pairs, mask, n, 128)
    assert mask.float().mean() > 0.8
    again, _ = random_pairs(n, 8, 128, seed=3)
    other, _ = random_pairs(n, 8, 128, seed=4)
    assert torch.equal(pairs, again) and not torch.equal(pairs, other)


@pytest.mark.parametrize("n", [64, 576, 200])
def test_ranked_pairs_mix_large_with_small(n):
    imp = torch.rand(n)
    pairs, mask = ranked_pairs(imp, 8, 128)
    _check_pairs(pairs, mask, n, 128)
    a, b = pairs[0, 0].tolist()  # first slot of rotation 0: the largest and smallest of group 0
    g0 = imp[: min(128, n)]
    assert {a, b} == {int(g0.argmax()), int(g0.argmin())}


@pytest.mark.parametrize("n", [64, 576, 1536])
def test_transform_is_exact_and_matches_dense(n):
    torch.manual_seed(0)
    rot = PairwiseRotation.identity(n, 8, 128, seed=1)
    rot.theta = torch.randn(rot.theta.shape)
    rot.scale = torch.rand(n) + 0.5
    w, x = torch.randn(10, n, dtype=torch.float64).float(), torch.randn(4, 3, n)
    torch.testing.assert_close(rot.apply_input(x) @ rot.apply_weight(w).T, x @ w.T, rtol=1e-4, atol=1e-4)
    partner, cos, sin = rot.coefficients()
    B = block_matrices(1 / rot.scale, partner, cos, sin, 128)
    torch.testing.assert_close(apply_blocks(x, B), rot.apply_input(x), rtol=1e-5, atol=1e-5)
    # the pure rotation (scale 1) is orthogonal: its transpose inverts it
    B1 = block_matrices(torch.ones(n), partner, cos, sin, 128)
    torch.testing.assert_close(apply_blocks(apply_blocks(x, B1), B1, transpose=True), x, rtol=1e-5, atol=1e-5)


def test_identity_and_storage_round_trip():
    rot = PairwiseRotation.identity(576, 4, 128, seed=0)
    assert rot.is_identity()
    x = torch.randn(2, 576)
    torch.testing.assert_close(rot.apply_input(x), x)
    rot.theta = torch.randn(rot.theta.shape).half().float()
    rot.scale = (torch.rand(576) + 0.5).half().float()
    back = PairwiseRotation.from_tensors(rot.to_tensors("m"), "m", 128)
    assert torch.equal(back.pairs[back.mask], rot.pairs[rot.mask]) and torch.equal(back.mask, rot.mask)
    torch.testing.assert_close(back.apply_input(x), rot.apply_input(x), rtol=0, atol=0)
    assert rot.nbytes() == 4 * 288 * 2 * 2 + 4 * 288 * 2 + 576 * 2


def test_gradients_reach_angles_and_scales():
    rot = PairwiseRotation.identity(64, 2, 32, seed=0)
    theta = torch.zeros(rot.theta.shape, requires_grad=True)
    from lowbit.transforms import coefficients
    partner, cos, sin = coefficients(rot.pairs, rot.mask, theta, 64)
    scale = torch.ones(64, requires_grad=True)
    y = rotate_ref(torch.randn(5, 64), scale, partner, cos, sin)
    (y * torch.randn_like(y)).sum().backward()
    assert theta.grad.abs().sum() > 0 and scale.grad.abs().sum() > 0
    assert (theta.grad[~rot.mask] == 0).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tokens", [3, 2048])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotated_linear_cuda_matches_cpu(tokens, dtype):
    from lowbit.transforms.modules import RotatedLinear

    torch.manual_seed(0)
    rot = PairwiseRotation.identity(576, 8, 128, seed=2)
    rot.theta, rot.scale = torch.randn(rot.theta.shape), torch.rand(576) + 0.5
    lin = torch.nn.Linear(576, 64)
    cpu = RotatedLinear.wrap(lin, rot)
    x = torch.randn(tokens, 576)
    ref = cpu(x)
    gpu = RotatedLinear.wrap(lin, rot).cuda().to(dtype)
    out = gpu(x.cuda().to(dtype)).float().cpu()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol * ref.abs().max().item())
