"""npg.knn / npg.mean_dist2_knn3 against brute force, refdata (simple_knn's distCUDA2) and each other."""
import numpy as np
import pytest
import torch

from npg.neighbors import knn, knn_torch, mean_dist2_knn3

CUDA = torch.cuda.is_available()


def brute_force_f64(points, k, queries=None):
    """Third, independent reference: float64 numpy, self row excluded by index."""
    p = points.double().numpy()
    q = p if queries is None else queries.double().numpy()
    d2 = ((q[:, None, :] - p[None, :, :]) ** 2).sum(-1)
    if queries is None:
        np.fill_diagonal(d2, np.inf)
    return np.sort(d2, axis=1)[:, :k]


def cloud(n, dim, kind, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        return torch.rand(n, dim, generator=g) * 2 - 1
    if kind == "clustered":  # tight blobs of very different density, a few far outliers, duplicates
        centres = torch.randn(max(1, n // 200), dim, generator=g) * 3
        which = torch.randint(0, centres.shape[0], (n,), generator=g)
        scale = 10.0 ** torch.empty(centres.shape[0], 1).uniform_(-4, -1, generator=g)
        pts = centres[which] + torch.randn(n, dim, generator=g) * scale[which]
        pts[: max(1, n // 100)] *= 50
        dup = n // 10
        pts[n - dup:] = pts[:dup]
        return pts
    if kind == "planar":  # flat z axis (a degenerate bounding box side)
        pts = torch.rand(n, dim, generator=g)
        pts[:, -1] = 0.25
        return pts
    raise ValueError(kind)


def check_result(points, k, queries, dist2, index, *, expected=None, rtol=1e-5):
    """Shapes, order, validity of every index and distances equal to float64 brute force (expected:
    brute_force_f64 of at least k columns, computed here when not given)."""
    n_queries = points.shape[0] if queries is None else queries.shape[0]
    assert dist2.shape == (n_queries, k) and index.shape == (n_queries, k)
    assert dist2.dtype == torch.float32 and index.dtype == torch.int64
    dist2, index = dist2.cpu(), index.cpu()
    assert bool((index >= 0).all()) and bool((index < points.shape[0]).all())
    assert bool((dist2[:, 1:] >= dist2[:, :-1]).all()), "not ascending"
    # Neighbours of a row are distinct rows, and never the query row itself.
    assert bool((index.sort(dim=1).values[:, 1:] != index.sort(dim=1).values[:, :-1]).all())
    if queries is None:
        assert not bool((index == torch.arange(n_queries)[:, None]).any()), "a point is its own neighbour"
    q = points if queries is None else queries
    recomputed = ((q.cpu()[:, None, :].double() - points.cpu().double()[index]) ** 2).sum(-1)
    if expected is None:
        expected = brute_force_f64(points.cpu(), k, None if queries is None else queries.cpu())
    expected = torch.from_numpy(expected[:, :k])
    torch.testing.assert_close(dist2.double(), expected, rtol=rtol, atol=1e-12)
    torch.testing.assert_close(recomputed, expected, rtol=rtol, atol=1e-12)


SIZES = [2, 5, 33, 257, 1500]
KS = [1, 3, 8, 20, 32]


@pytest.mark.parametrize("backend", ["scipy", "torch"])
@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("kind", ["uniform", "clustered", "planar"])
def test_cpu_backends_match_brute_force(backend, dim, kind):
    for seed, n in enumerate(SIZES):
        points = cloud(n, dim, kind, seed)
        expected = brute_force_f64(points, min(max(KS), n - 1))
        for k in KS:
            if k < n:
                check_result(points, k, None, *knn(points, k, backend=backend), expected=expected)


@pytest.mark.parametrize("backend", ["scipy", "torch"])
@pytest.mark.parametrize("dim", [2, 3])
def test_explicit_queries(backend, dim):
    points = cloud(700, dim, "clustered", 1)
    queries = torch.cat([torch.rand(300, dim) * 4 - 2, points[:50], torch.full((1, dim), 1e4)])
    for k in (1, 7, 32):
        dist2, index = knn(points, k, queries, backend=backend)
        check_result(points, k, queries, dist2, index)
        unchecked = knn(points, k, queries, backend=backend, validate=False)  # the caller vouches for finiteness
        torch.testing.assert_close(unchecked, (dist2, index), rtol=0, atol=0)
        # A query equal to a point finds it (or a duplicate) at distance 0: no self-exclusion here.
        assert bool((dist2[300:350, 0] == 0).all())
    # k may equal N when the queries are not the points.
    small = points[:10]
    check_result(small, 10, queries, *knn(small, 10, queries, backend=backend))
    empty = knn(points, 3, queries[:0], backend=backend)
    assert empty[0].shape == (0, 3) and empty[1].shape == (0, 3)


@pytest.mark.parametrize("backend", ["scipy", "torch"])
def test_duplicates_count_at_zero_but_not_self(backend):
    base = torch.rand(200, 3)
    points = torch.cat([base, base, base[:20]])  # rows i, i+200 (and i+400 for i<20) coincide
    dist2, index = knn(points, 3, backend=backend)
    assert bool((dist2[:200, 0] == 0).all())
    twin = index[:200, 0]
    assert bool(((twin == torch.arange(200) + 200) | (twin == torch.arange(200) + 400)).all())
    assert bool((dist2[:20, :2] == 0).all())  # two copies each
    check_result(points, 3, None, dist2, index)
    # Many identical points: everything at 0, still never the row itself.
    same = torch.full((100, 3), 0.5)
    dist2, index = knn(same, 32, backend=backend)
    assert bool((dist2 == 0).all())
    check_result(same, 32, None, dist2, index)


def test_scipy_order_is_dist_then_index():
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [3.0, 3.0]])
    dist2, index = knn(points, 4, points[:1], backend="scipy")
    assert index.tolist() == [[0, 1, 2, 3]]
    assert dist2.tolist() == [[0.0, 1.0, 1.0, 1.0]]


def test_dist2_gradient():
    points = torch.rand(64, 3, requires_grad=True)
    queries = torch.rand(10, 3, requires_grad=True)
    dist2, index = knn(points, 4, queries)
    dist2.sum().backward()
    diff = (queries[:, None, :] - points[index]).detach()
    torch.testing.assert_close(queries.grad, 2 * diff.sum(1))
    expected = torch.zeros_like(points).index_add_(0, index.reshape(-1), -2 * diff.reshape(-1, 3))
    torch.testing.assert_close(points.grad, expected)
    # Self queries: gradient reaches each point both as query and as neighbour.
    p = torch.rand(30, 2, dtype=torch.float32, requires_grad=True)
    d, i = knn(p, 2)
    d.sum().backward()
    assert p.grad is not None and bool(torch.isfinite(p.grad).all())


def test_bad_input():
    p = torch.rand(10, 3)
    with pytest.raises(ValueError, match="smaller than the number of points"):
        knn(p, 10)
    with pytest.raises(ValueError, match="exceeds the number of points"):
        knn(p, 11, torch.rand(3, 3))
    for k in (0, 33, -1):
        with pytest.raises(ValueError, match="k must be in"):
            knn(torch.rand(100, 3), k)
    with pytest.raises(TypeError, match="k must be an int"):
        knn(p, 2.0)
    with pytest.raises(TypeError, match="float32"):
        knn(p.double(), 2)
    with pytest.raises(TypeError, match="queries must be float32"):
        knn(p, 2, torch.rand(3, 3, dtype=torch.float64))
    for shape in [(10,), (10, 4), (10, 1), (2, 5, 3)]:
        with pytest.raises(ValueError, match="shape"):
            knn(torch.rand(*shape), 1)
    with pytest.raises(ValueError, match=r"queries must have shape \[Q, 3\]"):
        knn(p, 2, torch.rand(3, 2))
    with pytest.raises(ValueError, match="empty"):
        knn(torch.rand(0, 3), 1)
    bad = p.clone()
    bad[4, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf .*row 4"):
        knn(bad, 2)
    bad[4, 1] = float("inf")
    with pytest.raises(ValueError, match="points contain NaN or Inf"):
        knn_torch(bad, 2)
    with pytest.raises(ValueError, match="queries contain NaN"):
        knn(p, 2, torch.tensor([[0.0, float("nan"), 0.0]]))
    with pytest.raises(ValueError, match="unknown backend"):
        knn(p, 2, backend="faiss")
    with pytest.raises(TypeError, match="torch.Tensor"):
        knn(p.numpy(), 2)
    with pytest.raises(ValueError, match="at least 4 points"):
        mean_dist2_knn3(torch.rand(3, 3))
    if not CUDA:
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            knn(p, 2, backend="cuda")


REFDATA_SETS = ["garden", "uniform10k", "clustered5k", "dup1k"]


def _load_distcuda2(refdata_dir):
    path = refdata_dir / "knn" / "knn_distcuda2.npz"
    if not path.exists():
        pytest.skip(f"{path} not found")
    return np.load(path)


def _check_distcuda2(ref, name, device):
    points = torch.from_numpy(ref[f"{name}__points"]).to(device)
    expected = torch.from_numpy(ref[f"{name}__dist2"])
    ours = mean_dist2_knn3(points).cpu()
    if name == "garden":  # stored clamped below at 1e-7, as 3DGS initialisation does
        ours = ours.clamp_min(1e-7)
    rel = ((ours.double() - expected.double()).abs() / expected.double().abs()).max().item()
    assert rel <= 1e-5, f"{name}: max relative error {rel:.3g}"


@pytest.mark.parametrize("name", REFDATA_SETS)
def test_mean_dist2_knn3_matches_distcuda2(refdata_dir, name):
    _check_distcuda2(_load_distcuda2(refdata_dir), name, "cpu")


# ---------------------------------------------------------------------------------------------- CUDA


@pytest.mark.parametrize("name", REFDATA_SETS)
def test_cuda_mean_dist2_knn3_matches_distcuda2(refdata_dir, cuda_device, name):
    _check_distcuda2(_load_distcuda2(refdata_dir), name, cuda_device)


def _check_cuda_against_scipy(points, k, queries=None, leaf_size=None):
    dist2, index = knn(points, k, queries, backend="cuda", leaf_size=leaf_size)
    ref_dist2, _ = knn(points.cpu(), k, None if queries is None else queries.cpu(), backend="scipy")
    assert dist2.is_cuda and index.is_cuda
    torch.testing.assert_close(dist2.cpu(), ref_dist2, rtol=1e-5, atol=1e-12)
    index = index.cpu()
    q = (points if queries is None else queries).cpu().double()
    recomputed = ((q[:, None, :] - points.cpu().double()[index]) ** 2).sum(-1)
    torch.testing.assert_close(recomputed, ref_dist2.double(), rtol=1e-5, atol=1e-12)
    sorted_index = index.sort(dim=1).values
    assert bool((sorted_index[:, 1:] != sorted_index[:, :-1]).all())
    if queries is None:
        assert not bool((index == torch.arange(points.shape[0])[:, None]).any())
    # Deterministic order: ascending (dist2, index), except among several points at distance 0.
    d = dist2.cpu()
    same = (d[:, 1:] == d[:, :-1]) & (d[:, 1:] > 0)
    assert bool((index[:, 1:][same] > index[:, :-1][same]).all())
    return dist2, index


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("kind", ["uniform", "clustered", "planar"])
def test_cuda_matches_reference(cuda_device, dim, kind):
    for seed, n in enumerate([2, 9, 17, 33, 100, 1000, 20000]):
        points = cloud(n, dim, kind, seed).to(cuda_device)
        for k in range(1, 33):
            if k < n and (k in (1, 2, 3, 4, 5, 8, 12, 16, 20, 24, 32) or n <= 100):
                _check_cuda_against_scipy(points, k)


@pytest.mark.parametrize("dim", [2, 3])
def test_cuda_leaf_sizes_and_queries(cuda_device, dim):
    points = cloud(30000, dim, "clustered", 7).to(cuda_device)
    queries = torch.cat([torch.rand(5000, dim, device=cuda_device) * 10 - 5, points[:500],
                         torch.full((3, dim), -1e5, device=cuda_device)])
    for leaf_size in (8, 16, 32, 64):
        for k in (1, 3, 20, 32):
            _check_cuda_against_scipy(points, k, leaf_size=leaf_size)
            _check_cuda_against_scipy(points, k, queries, leaf_size=leaf_size)
    small = points[:5]
    _check_cuda_against_scipy(small, 5, queries)
    empty = knn(points, 3, queries[:0])
    assert empty[0].shape == (0, 3) and empty[0].is_cuda


def test_cuda_large_clustered_and_identical(cuda_device):
    points = cloud(200_000, 3, "clustered", 3).to(cuda_device)
    _check_cuda_against_scipy(points, 3)
    _check_cuda_against_scipy(points, 20)
    same = torch.full((50_000, 3), 0.25, device=cuda_device)
    dist2, index = knn(same, 32)
    assert bool((dist2 == 0).all())
    assert not bool((index == torch.arange(50_000, device=cuda_device)[:, None]).any())
    # Non-contiguous input.
    wide = torch.rand(5000, 6, device=cuda_device)
    _check_cuda_against_scipy(wide[:, ::2], 8)


def test_cuda_gradient_and_errors(cuda_device):
    points = torch.rand(500, 3, device=cuda_device, requires_grad=True)
    dist2, index = knn(points, 5)
    dist2.sum().backward()
    expected = points.detach().clone().requires_grad_(True)
    d_ref = ((expected[:, None, :] - expected[index]) ** 2).sum(-1)
    d_ref.sum().backward()
    torch.testing.assert_close(points.grad, expected.grad)
    with pytest.raises(ValueError, match="queries are on"):
        knn(points.detach(), 2, torch.rand(3, 3))
    bad = points.detach().clone()
    bad[7, 0] = float("nan")
    with pytest.raises(ValueError, match="row 7"):
        knn(bad, 2)
    with pytest.raises(ValueError, match="leaf_size"):
        knn(points.detach(), 2, leaf_size=4)


RAW_EXTENSION_CHECKS = """
import torch
from npg._ext import load
ext = load("knn")
p = torch.rand(500, 3, device="cuda")
calls = [((p.double(), None, 2, 16), "float32"), ((p, None, 2, 4), "leaf_size"), ((p, None, 40, 16), "k must be"),
         ((p[:10], None, 10, 16), "smaller than"), ((p, torch.rand(3, 2, device="cuda"), 2, 16), "shape"),
         ((p.cpu(), None, 2, 16), "CUDA tensor"), ((p[:0], None, 1, 16), "empty")]
for args, message in calls * 2:
    try:
        ext.knn(*args)
    except RuntimeError as err:
        assert message in str(err), (message, str(err))
    else:
        raise AssertionError("no error for " + message)
print("raw-extension-checks-ok")
"""


@pytest.mark.xfail(reason="C++ exceptions thrown by the extension's host checks crashed the process on the H100 "
                          "machine's toolchain (seen 2026-11-25); npg.knn validates in Python first", strict=False)
def test_cuda_extension_checks_its_arguments(cuda_device):
    # In a subprocess: a crash in the extension's error path (seen once on an H100) then fails this test
    # with its output instead of killing the test session.
    import subprocess
    import sys
    from pathlib import Path

    result = subprocess.run([sys.executable, "-c", RAW_EXTENSION_CHECKS], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert result.returncode == 0 and "raw-extension-checks-ok" in result.stdout, result.stdout + result.stderr
