"""Exact k-nearest neighbours in 2D and 3D.

``knn(points, k, queries=None) -> (dist2 [Q, k], index [Q, k])``, ascending, float32 squared distances
and int64 row indices into ``points``. With ``queries=None`` every point is a query and never its own
neighbour, but exact duplicates of it are, at distance 0 (what 3DGS initialisation and simple_knn's
``distCUDA2`` expect). ``mean_dist2_knn3(points)`` is ``distCUDA2``: the mean squared distance to the
3 nearest other points.

Backends (``backend="auto"`` picks by device):

* ``"cuda"`` (CUDA tensors): ``npg._knn_cuda`` (``csrc/knn/``). The points are sorted along a Morton
  curve (one 30-bit radix sort), cut into leaves of 16 (k <= 8) or 32 consecutive points and grouped
  four by four into an implicit tree of bounding boxes. One thread per query scans its home leaf, then
  walks the tree nearest child first, pruning every box farther than the current k-th distance; the
  top-k lives in registers as (dist2, index) keys. Box and point distances are rounded consistently, so
  the pruning is exact. A tree rather than a uniform grid because real clouds are clustered: on the 138k
  garden points a grid sized from the bounding box has ~1000 points in the cell of a typical point,
  while the Morton leaves always hold 16-32 (a CPU model of the search gave the same per-query work,
  ~150 point and ~120 box tests at k=3, on the garden as on uniform points). Results are ordered by
  (dist2, index) - deterministic - except that, when more than k points lie at distance 0 from a query,
  which of them are returned is unspecified.
* ``"scipy"`` (CPU tensors): ``scipy.spatial.cKDTree``, exact in float64; the k+1 nearest are fetched
  for self-queries and the query's own row removed by index (not "drop the first hit", which could
  drop a duplicate and keep the point itself). Distances are then recomputed in float32 and rows
  re-sorted by (dist2, index), so all backends return the same float32 values.
* ``"torch"``: :func:`knn_torch`, blocked brute force on any device, the reference.

``dist2`` is differentiable with respect to ``points`` and ``queries`` when they require grad (it is then
recomputed from the indices by a gather; the neighbour choice itself is piecewise constant).

Measured (``benchmarks/bench_knn.py`` on an H100, CUDA-event medians, whole ``npg.knn`` call including
the input checks; ``benchmarks/results/kernels_knn.json``):

=====================  ==========  ======================  ==================  =======================
points                 npg.knn     mean_dist2_knn3         torch brute force   distCUDA2 (README)
=====================  ==========  ======================  ==================  =======================
5k uniform, k=20       0.80 ms     -                       0.97 ms (cdist)     -
138k garden, k=3       0.57 ms     0.59 ms (30x faster)    454 ms (cdist)      17.7 ms
1M uniform, k=3        1.77 ms     1.77 ms (16x faster)    does not fit        28.5 ms
=====================  ==========  ======================  ==================  =======================

k=20: 2.06 ms on the garden, 8.66 ms on 1M uniform points. At 5k points the fixed cost of the tree
build (about ten small launches) dominates.
"""
from __future__ import annotations

import numpy as np
import torch

MAX_K = 32


def _validate(points, k, queries, check_finite: bool = True):
    if not isinstance(points, torch.Tensor):
        raise TypeError(f"knn: points must be a torch.Tensor, got {type(points).__name__}")
    if points.dtype != torch.float32:
        raise TypeError(f"knn: points must be float32, got {points.dtype} (convert with .float())")
    if points.dim() != 2 or points.shape[1] not in (2, 3):
        raise ValueError(f"knn: points must have shape [N, 2] or [N, 3], got {list(points.shape)}")
    n = points.shape[0]
    if n == 0:
        raise ValueError("knn: points is empty")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"knn: k must be an int, got {type(k).__name__}")
    k = int(k)
    if not 1 <= k <= MAX_K:
        raise ValueError(f"knn: k must be in [1, {MAX_K}], got {k}")
    if queries is None:
        if k >= n:
            raise ValueError(f"knn: k = {k} must be smaller than the number of points ({n}) when the points are "
                             "their own queries (a point is not its own neighbour)")
    else:
        if not isinstance(queries, torch.Tensor):
            raise TypeError(f"knn: queries must be a torch.Tensor, got {type(queries).__name__}")
        if queries.dtype != torch.float32:
            raise TypeError(f"knn: queries must be float32, got {queries.dtype}")
        if queries.dim() != 2 or queries.shape[1] != points.shape[1]:
            raise ValueError(f"knn: queries must have shape [Q, {points.shape[1]}] like points, got "
                             f"{list(queries.shape)}")
        if queries.device != points.device:
            raise ValueError(f"knn: queries are on {queries.device} but points on {points.device}")
        if k > n:
            raise ValueError(f"knn: k = {k} exceeds the number of points ({n})")
    for name, tensor in (("points", points), ("queries", queries)) if check_finite else ():
        if tensor is not None and tensor.numel() and not bool(torch.isfinite(tensor).all()):
            row = int(torch.nonzero(~torch.isfinite(tensor).all(dim=1))[0, 0])
            raise ValueError(f"knn: {name} contain NaN or Inf (first at row {row})")
    return k


def _pairwise_dist2(queries: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Exact squared distances [Q, N] from differences (no |a|^2 + |b|^2 - 2ab cancellation)."""
    return ((queries[:, None, :] - points[None, :, :]) ** 2).sum(-1)


def _gather_dist2(points: torch.Tensor, queries: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """dist2 [Q, k] of given neighbours index [Q, k], differentiable with respect to both inputs."""
    return ((queries[:, None, :] - points[index]) ** 2).sum(-1)


def knn_torch(points: torch.Tensor, k: int, queries: torch.Tensor | None = None):
    """Reference: blocked brute force, same contract as :func:`knn` (ties in arbitrary order)."""
    k = _validate(points, k, queries)
    return _with_grad(points, queries, *_knn_torch(points, k, queries))


def _knn_torch(points: torch.Tensor, k: int, queries: torch.Tensor | None):
    with torch.no_grad():
        p = points.detach()
        q = p if queries is None else queries.detach()
        n, d = p.shape
        n_queries = q.shape[0]
        dist2 = torch.empty((n_queries, k), dtype=torch.float32, device=p.device)
        index = torch.empty((n_queries, k), dtype=torch.int64, device=p.device)
        block = max(1, (1 << 24) // (n * d))
        for start in range(0, n_queries, block):
            stop = min(start + block, n_queries)
            d2 = _pairwise_dist2(q[start:stop], p)
            if queries is None:
                rows = torch.arange(stop - start, device=p.device)
                d2[rows, rows + start] = float("inf")
            values, idx = torch.topk(d2, k, dim=1, largest=False, sorted=True)
            dist2[start:stop] = values
            index[start:stop] = idx
    return dist2, index


def _knn_scipy(points: torch.Tensor, k: int, queries: torch.Tensor | None):
    from scipy.spatial import cKDTree

    p32 = points.detach().cpu()
    q32 = p32 if queries is None else queries.detach().cpu()
    n_queries = q32.shape[0]
    if n_queries == 0:
        return torch.empty((0, k), dtype=torch.float32), torch.empty((0, k), dtype=torch.int64)
    p64 = p32.double().numpy()
    tree = cKDTree(p64)
    if queries is None:
        _, idx = tree.query(p64, k + 1, workers=-1)
        idx = idx.reshape(n_queries, k + 1)
        own = idx == np.arange(n_queries)[:, None]
        # The row itself is among the k+1 unless more than k duplicates tie with it at 0; then any one
        # of the k+1 (all at distance 0) can go, and the last is dropped.
        drop = np.where(own.any(axis=1), own.argmax(axis=1), k)
        keep = np.ones_like(idx, dtype=bool)
        keep[np.arange(n_queries), drop] = False
        idx = idx[keep].reshape(n_queries, k)
    else:
        _, idx = tree.query(q32.double().numpy(), k, workers=-1)
        idx = idx.reshape(n_queries, k)
    index = torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64))
    dist2 = _gather_dist2(p32, q32, index)
    if k == 1:
        return dist2.to(points.device), index.to(points.device)
    # Ascending by (dist2, index) in float32: sort by index, then stably by distance.
    index, by_index = torch.sort(index, dim=1)
    dist2 = torch.gather(dist2, 1, by_index)
    dist2, by_dist = torch.sort(dist2, dim=1, stable=True)
    index = torch.gather(index, 1, by_dist)
    return dist2.to(points.device), index.to(points.device)


def _knn_cuda(points: torch.Tensor, k: int, queries: torch.Tensor | None, leaf_size: int | None):
    from npg._ext import load

    if leaf_size is None:
        leaf_size = 16 if k <= 8 else 32
    dist2, index = load("knn").knn(points.detach(), None if queries is None else queries.detach(), k, leaf_size)
    return dist2, index


def _with_grad(points, queries, dist2, index):
    needs_grad = torch.is_grad_enabled() and (points.requires_grad or (queries is not None and queries.requires_grad))
    if needs_grad:
        dist2 = _gather_dist2(points, points if queries is None else queries, index)
    return dist2, index


def knn(points: torch.Tensor, k: int, queries: torch.Tensor | None = None, *, backend: str = "auto",
        leaf_size: int | None = None, validate: bool = True):
    """k nearest points of every query, exact.

    Args:
        points: [N, D] float32, D in {2, 3}, finite.
        k: 1..32; below N when ``queries`` is None, at most N otherwise.
        queries: [Q, D] float32 on the device of ``points``, or None for the points themselves (a point
            is then not its own neighbour; its exact duplicates are, at distance 0).
        backend: "auto" (CUDA kernel for CUDA tensors, cKDTree on the CPU), "cuda", "scipy" or "torch".
        leaf_size: CUDA tree leaf size (8..64); default 16 for k <= 8, else 32.
        validate: check that points and queries are finite, raising a ValueError that names the first
            bad row (a device sync per tensor). False is for callers that have checked already, e.g.
            once for a whole batch; the neighbours of non-finite coordinates are then meaningless.

    Returns:
        dist2 [Q, k] float32 squared distances, ascending; index [Q, k] int64 rows of ``points``.
    """
    k = _validate(points, k, queries, check_finite=validate)
    if leaf_size is not None and (isinstance(leaf_size, bool) or not isinstance(leaf_size, int) or not 8 <= leaf_size <= 64):
        raise ValueError(f"knn: leaf_size must be an int in [8, 64], got {leaf_size!r}")
    if backend == "auto":
        backend = "cuda" if points.is_cuda else "scipy"
    if backend == "torch":
        dist2, index = _knn_torch(points, k, queries)
    elif backend == "cuda":
        if not points.is_cuda:
            raise ValueError(f"knn: backend='cuda' needs CUDA tensors, points are on {points.device}")
        dist2, index = _knn_cuda(points, k, queries, leaf_size)
    elif backend == "scipy":
        dist2, index = _knn_scipy(points, k, queries)
    else:
        raise ValueError(f"knn: unknown backend {backend!r} (auto, cuda, scipy, torch)")
    return _with_grad(points, queries, dist2, index)


def mean_dist2_knn3(points: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """distCUDA2: mean squared distance [N] from each point of points [N, 3] to its 3 nearest others.

    Duplicates count at distance 0, so the result can be 0; 3DGS clamps it (``clamp_min(1e-7)``) before
    taking the log of its square root as the initial scale.
    """
    if isinstance(points, torch.Tensor) and points.dim() == 2 and points.shape[0] < 4:
        raise ValueError(f"mean_dist2_knn3: needs at least 4 points, got {points.shape[0]}")
    dist2, _ = knn(points, 3, backend=backend)
    return dist2.mean(dim=1)
