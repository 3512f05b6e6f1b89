"""KNN and 2D silhouette-chamfer benchmarks, each against its baselines in the same run.

Rows ``{bench, size, impl, ms, device}``:

* bench "knn": 5k uniform points k=20 (stage 1's rigidity neighbours), the 138 766 garden points k=3
  (``$NPG_SHARED/refdata/raster/garden_v0.npz``, default ``../shared``, key ``in__means3D``, or the .npy/.npz named by
  ``NPG_BENCH_GARDEN``) and 1M uniform points k=3, for ``npg.knn`` (CUDA, whole call including input
  checks), the bare extension call, tree leaf-size variants, ``npg.mean_dist2_knn3`` (distCUDA2's
  semantics), the exact blocked torch brute force ``knn_torch`` and a cdist+topk brute force where they
  fit, and simple_knn's distCUDA2 timings quoted from ``../shared/refdata/README.md`` (impl
  "distCUDA2 (README)", same GPU model, not measured in this run).
* bench "chamfer2d": 5000 points against an 800×800 mask of 300k pixels, ``npg.silhouette_chamfer``
  forward+backward (prepared mask, and bool mask prepared inside the call) against
  ``silhouette_chamfer_torch``, plus the per-mask nearest-pixel transforms that were considered instead
  (OpenCV, SciPy; CPU, wall clock).

Run ``python -m benchmarks.bench_knn [--json PATH]``; without a GPU only the CPU rows are produced.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import cuda_median_ms, device_name, format_table, write_json  # noqa: E402
from npg.chamfer import prepare_mask, silhouette_chamfer, silhouette_chamfer_torch  # noqa: E402
from npg.neighbors import knn, knn_torch, mean_dist2_knn3  # noqa: E402

# simple_knn distCUDA2 on an H100 (../shared/refdata/README.md, "Reference timings").
DISTCUDA2_README_MS = {"garden 138766 k=3": 17.7, "uniform 1M k=3": 28.5}


def garden_points() -> np.ndarray | None:
    shared = Path(os.environ.get("NPG_SHARED", REPO.parent / "shared"))
    candidates = [os.environ.get("NPG_BENCH_GARDEN"), shared / "refdata" / "raster" / "garden_v0.npz"]
    for path in candidates:
        if path and Path(path).exists():
            data = np.load(path)
            return np.asarray(data if isinstance(data, np.ndarray) else data["in__means3D"], dtype=np.float32)
    return None


def wall_median_ms(fn, warmup: int = 1, iters: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def cdist_topk(points: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute-force baseline as usually written: blocked torch.cdist (matrix-product form) + topk."""
    n = points.shape[0]
    block = max(1, (1 << 27) // n)
    dist2 = torch.empty((n, k), device=points.device)
    index = torch.empty((n, k), dtype=torch.int64, device=points.device)
    for start in range(0, n, block):
        d2 = torch.cdist(points[start:start + block], points).square_()
        rows = torch.arange(d2.shape[0], device=points.device)
        d2[rows, rows + start] = float("inf")
        dist2[start:start + block], index[start:start + block] = torch.topk(d2, k, dim=1, largest=False)
    return dist2, index


def disc_mask(size: int = 800, pixels: int = 300_000) -> torch.Tensor:
    yy, xx = np.mgrid[:size, :size]
    centre = (size - 1) / 2
    return torch.from_numpy((xx - centre) ** 2 + (yy - centre) ** 2 <= pixels / np.pi)


def knn_rows(device: str) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    sets = [("5k uniform k=20", torch.rand(5000, 3, generator=gen), 20)]
    garden = garden_points()
    if garden is not None:
        sets.append(("garden 138766 k=3", torch.from_numpy(garden), 3))
    else:
        print("bench_knn: garden points not found (set NPG_BENCH_GARDEN); skipping that size", file=sys.stderr)
    sets.append(("uniform 1M k=3", torch.rand(1_000_000, 3, generator=gen), 3))

    def add(size, impl, ms, dev=device):
        rows.append({"bench": "knn", "size": size, "impl": impl, "ms": float(ms), "device": dev})

    if not torch.cuda.is_available():
        for size, points, k in sets[:2]:
            add(size, "npg.knn scipy cKDTree (cpu)", wall_median_ms(lambda: knn(points, k), iters=3))
        return rows

    from npg._ext import load

    ext = load("knn")
    for size, cpu_points, k in sets:
        points = cpu_points.cuda()
        add(size, "npg.knn (cuda)", cuda_median_ms(lambda: knn(points, k)))
        add(size, "npg._knn_cuda bare call (no input checks)", cuda_median_ms(lambda: ext.knn(points, None, k, 16 if k <= 8 else 32)))
        for leaf in (8, 16, 32):
            add(size, f"npg._knn_cuda leaf={leaf}", cuda_median_ms(lambda: ext.knn(points, None, k, leaf)))
        if k == 3:
            add(size, "npg.mean_dist2_knn3 (cuda)", cuda_median_ms(lambda: mean_dist2_knn3(points)))
            add(size.replace("k=3", "k=20"), "npg.knn (cuda)", cuda_median_ms(lambda: knn(points, 20)))
        if points.shape[0] <= 200_000:
            few = points.shape[0] > 10_000
            add(size, "torch brute force (knn_torch, exact)",
                cuda_median_ms(lambda: knn_torch(points, k), warmup=1 if few else 5, iters=3 if few else 20))
            add(size, "torch cdist+topk", cuda_median_ms(lambda: cdist_topk(points, k), warmup=1 if few else 5,
                                                         iters=3 if few else 20))
        if size in DISTCUDA2_README_MS:
            add(size, "distCUDA2 (README)", DISTCUDA2_README_MS[size], "NVIDIA H100 (refdata README)")
        del points
        torch.cuda.empty_cache()
    return rows


def chamfer_rows(device: str) -> list[dict]:
    import cv2
    from scipy import ndimage

    rows = []
    size = "5k points x 300k px (800x800)"
    mask = disc_mask()
    gen = torch.Generator().manual_seed(1)
    points = torch.rand(5000, 2, generator=gen) * 640 + 80

    def add(impl, ms, dev=device):
        rows.append({"bench": "chamfer2d", "size": size, "impl": impl, "ms": float(ms), "device": dev})

    background = (~mask.numpy()).astype(np.uint8)
    add("cv2.distanceTransformWithLabels per mask (cpu, not exact off-grid)",
        wall_median_ms(lambda: cv2.distanceTransformWithLabels(background, cv2.DIST_L2, cv2.DIST_MASK_PRECISE,
                                                               labelType=cv2.DIST_LABEL_PIXEL)), "cpu")
    add("scipy distance_transform_edt(return_indices) per mask (cpu)",
        wall_median_ms(lambda: ndimage.distance_transform_edt(background, return_indices=True), iters=3), "cpu")

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    mask_d = mask.to(dev)
    p = points.to(dev).requires_grad_(True)
    prepared = prepare_mask(mask_d)

    def step(fn, m):
        a, b = fn(p, m)
        (a + b).backward()
        p.grad = None

    def forward(fn, m):
        with torch.no_grad():
            fn(p, m)

    timer = cuda_median_ms if cuda else (lambda fn, warmup=1, iters=3: wall_median_ms(fn, warmup, iters))
    add("npg prepare_mask (once per mask)", timer(lambda: prepare_mask(mask_d)))
    add("npg silhouette_chamfer fwd+bwd (prepared mask)", timer(lambda: step(silhouette_chamfer, prepared)))
    add("npg silhouette_chamfer fwd (prepared mask)", timer(lambda: forward(silhouette_chamfer, prepared)))
    add("npg silhouette_chamfer fwd+bwd (bool mask)", timer(lambda: step(silhouette_chamfer, mask_d)))
    if cuda:
        add("torch reference fwd+bwd (silhouette_chamfer_torch)",
            cuda_median_ms(lambda: step(silhouette_chamfer_torch, prepared), warmup=2, iters=5))
    return rows


def run() -> list[dict]:
    device = device_name()
    return knn_rows(device) + chamfer_rows(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows to this JSON file")
    args = parser.parse_args()
    rows = run()
    print(format_table(rows, ["bench", "size", "impl", "ms", "device"]))
    if args.json:
        write_json(rows, args.json)


if __name__ == "__main__":
    main()
