"""npg.silhouette_chamfer against its brute-force reference, hand values and finite differences."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from npg.chamfer import MaskPixels, prepare_mask, silhouette_chamfer, silhouette_chamfer_torch

CUDA = torch.cuda.is_available()


def blob_mask(height, width, seed, holes=True):
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal((height, width)), sigma=max(1.0, min(height, width) / 8))
    mask = field > np.quantile(field, 0.55)
    if holes:  # isolated background pixels inside the silhouette and lone foreground pixels
        mask[rng.random((height, width)) < 0.02] ^= True
    mask[rng.integers(height), rng.integers(width)] = True
    return torch.from_numpy(mask)


def random_points(n, height, width, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    pts = torch.rand(n, 2, generator=g, dtype=torch.float64)
    pts[:, 0] = pts[:, 0] * (width + 10) - 5  # some outside the image
    pts[:, 1] = pts[:, 1] * (height + 10) - 5
    return pts.to(dtype)


def losses_and_grads(fn, points, mask):
    p = points.clone().requires_grad_(True)
    a, b = fn(p, mask)
    ga, = torch.autograd.grad(a, p, retain_graph=True)
    gb, = torch.autograd.grad(b, p)
    return a.detach(), b.detach(), ga, gb


@pytest.mark.parametrize("shape", [(37, 53), (64, 64), (5, 90), (1, 17)])
@pytest.mark.parametrize("n_points", [1, 7, 300])
@pytest.mark.parametrize("validate", [True, False])
def test_matches_reference(shape, n_points, validate):
    mask = blob_mask(*shape, seed=n_points)
    points = random_points(n_points, *shape, seed=shape[0])
    ours = losses_and_grads(lambda p, m: silhouette_chamfer(p, m, validate=validate), points, mask)
    ref = losses_and_grads(silhouette_chamfer_torch, points, mask)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_point_to_mask_exact_at_ties_and_on_grid():
    """Points on integer and half-integer positions (ties between lattice points, the delicate case of
    the boundary reduction) next to holes: values equal the float64 brute force."""
    mask = blob_mask(40, 40, seed=3)
    xs = torch.arange(-3, 43.5, 0.5, dtype=torch.float64)
    points = torch.stack(torch.meshgrid(xs, xs, indexing="xy"), -1).reshape(-1, 2)
    pixels = torch.nonzero(mask).flip(1).double()
    d2 = ((points[:, None, :] - pixels[None]) ** 2).sum(-1)
    expected_p2m = d2.min(dim=1).values.mean()
    expected_m2p = d2.min(dim=0).values.mean()
    p2m, m2p = silhouette_chamfer(points.float(), mask)
    torch.testing.assert_close(p2m.double(), expected_p2m, rtol=1e-6, atol=0)
    torch.testing.assert_close(m2p.double(), expected_m2p, rtol=1e-6, atol=0)


def test_hand_computed_values_and_gradients():
    mask = torch.zeros(4, 5, dtype=torch.bool)
    mask[1, 2] = True  # pixel x=2, y=1
    mask[3, 4] = True  # pixel x=4, y=3
    points = torch.tensor([[2.3, 1.4], [0.0, 0.0]], requires_grad=True)
    p2m, m2p = silhouette_chamfer(points, mask)
    # point 0 -> (2,1): 0.09 + 0.16; point 1 -> (2,1): 4 + 1. Mask (2,1) -> point 0: 0.25;
    # mask (4,3) -> point 0: 1.7^2 + 1.6^2 = 5.45.
    torch.testing.assert_close(p2m, torch.tensor((0.25 + 5.0) / 2))
    torch.testing.assert_close(m2p, torch.tensor((0.25 + 5.45) / 2))
    (p2m + m2p).backward()
    grad_p2m = torch.tensor([[2 * 0.3, 2 * 0.4], [2 * -2.0, 2 * -1.0]]) / 2
    grad_m2p = torch.tensor([[2 * (0.3 - 1.7), 2 * (0.4 - 1.6)], [0.0, 0.0]]) / 2
    torch.testing.assert_close(points.grad, grad_p2m + grad_m2p)


def test_gradcheck():
    mask = blob_mask(20, 24, seed=5)
    points = random_points(25, 20, 24, seed=9, dtype=torch.float64).requires_grad_(True)
    for fn in (silhouette_chamfer_torch, silhouette_chamfer):
        assert torch.autograd.gradcheck(lambda p: fn(p, mask)[0], (points,), eps=1e-6, atol=1e-7)
        assert torch.autograd.gradcheck(lambda p: fn(p, mask)[1], (points,), eps=1e-6, atol=1e-7)


def test_prepare_mask_boundary_and_reuse():
    mask = blob_mask(30, 41, seed=2)
    prepared = prepare_mask(mask)
    assert isinstance(prepared, MaskPixels) and prepare_mask(prepared) is prepared
    eroded = ndimage.binary_erosion(mask.numpy(), structure=ndimage.generate_binary_structure(2, 1), border_value=0)
    rows, cols = np.nonzero(mask.numpy() & ~eroded)
    expected = {(int(x), int(y)) for x, y in zip(cols, rows)}
    assert {tuple(map(int, b)) for b in prepared.boundary.tolist()} == expected
    assert prepared.pixels.shape[0] == int(mask.sum())
    points = random_points(50, 30, 41, seed=1)
    for a, b in zip(silhouette_chamfer(points, prepared), silhouette_chamfer(points, mask)):
        assert torch.equal(a, b)


def test_bad_input():
    mask = blob_mask(10, 10, seed=0)
    points = random_points(5, 10, 10, seed=0)
    with pytest.raises(ValueError, match="mask is empty"):
        silhouette_chamfer(points, torch.zeros(10, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="points2d is empty"):
        silhouette_chamfer(points[:0], mask)
    bad = points.clone()
    bad[3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf .*row 3"):
        silhouette_chamfer(bad, mask)
    with pytest.raises(TypeError, match="mask must be bool"):
        silhouette_chamfer(points, mask.to(torch.uint8))
    with pytest.raises(ValueError, match=r"mask must have shape \[H, W\]"):
        silhouette_chamfer(points, mask[None])
    with pytest.raises(ValueError, match=r"points2d must have shape \[P, 2\]"):
        silhouette_chamfer(torch.rand(5, 3), mask)
    with pytest.raises(TypeError, match="float32 or float64"):
        silhouette_chamfer(points.long(), mask)
    with pytest.raises(TypeError, match="MaskPixels"):
        silhouette_chamfer(points, mask.numpy())
    with pytest.raises(ValueError, match="mask is empty"):
        silhouette_chamfer_torch(points, torch.zeros(3, 3, dtype=torch.bool))


def test_cuda_matches_cpu(cuda_device):
    mask = blob_mask(300, 420, seed=11)
    points = random_points(4000, 300, 420, seed=4)
    ref = losses_and_grads(silhouette_chamfer_torch, points, mask)
    prepared = prepare_mask(mask.to(cuda_device))
    for m in (mask, prepared):  # a CPU mask is moved to the points' device
        ours = losses_and_grads(silhouette_chamfer, points.to(cuda_device), m)
        for a, b in zip(ours, ref):
            assert a.is_cuda
            torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-6)
