"""Fused skinning benchmark: the Triton kernels against the PyTorch reference, in the same run.

Rows ``{bench, size, impl, ms, gbps, device}``; ``size`` is the Gaussian count G (5k, 100k, 1M) with
P = 5000 stage-1 points and J = 20 neighbours. Gaussians sit near random points; their neighbours are
their 20 nearest points and their anchor triangle the 3 nearest (int64 indices, as ``npg.knn`` gives
them). bench "skinning_fwd" times ``skin`` alone, "skinning_fwd_bwd" forward plus backward of all
three gradients (points, logits, quats) for given output gradients.

Achieved bandwidth counts the bytes that must move, each input read once and each output written
once (float32 s = 4, int64 i = 8 bytes):

    forward:  read  points 3P·s, neighbor_idx GJ·i, logits GJ·s, anchors 3G·i, quats 4G·s
              write means 3G·s, rotations 4G·s
    backward: read  the five inputs again + grad_means 3G·s + grad_rotations 4G·s
              write grad_points 3P·s, grad_logits GJ·s, grad_quats 4G·s
    fwd_bwd = forward + backward

It is set against ``measured_copy_gbps()`` (row bench "copy", same convention: read + written); the
reference's gbps uses the same byte count (effective bandwidth); ``copy_fraction`` is gbps over the
copy's. impl "triton" is ``npg.skin`` as called by default (validate=True: one flag read back per
forward), "triton, validate=False" skips that synchronisation; "triton kernels, CUDA graph, ..."
times the bare launches (padding copy + kernels) replayed from a CUDA graph, i.e. the device time
without Python's launch overhead, once with int64 and once with int32 indices (i = 4 bytes).
``sweep()`` times the bare kernels over block sizes from CUDA graphs (used to pick defaults).

Run ``python -m benchmarks.bench_skinning [--json PATH] [--sweep PATH]`` on a GPU machine.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import (  # noqa: E402
    cuda_median_ms, device_name, format_table, graph_median_ms, measured_copy_gbps, write_json)
from npg.skinning import AREA_EPS2, SIN_EPS2, skin, skin_torch  # noqa: E402

POINTS = 5000
NEIGHBOURS = 20
SIZES = [5_000, 100_000, 1_000_000]


def make_problem(G, P=POINTS, J=NEIGHBOURS, seed=0, device="cuda"):
    gen = torch.Generator(device=device).manual_seed(seed)
    points = torch.rand(P, 3, generator=gen, device=device) * 2 - 1
    parents = torch.randint(0, P, (G,), generator=gen, device=device)
    centres = points[parents] + 0.02 * torch.randn(G, 3, generator=gen, device=device)
    neighbor_idx = torch.empty(G, J, dtype=torch.long, device=device)
    for start in range(0, G, 65536):
        chunk = centres[start:start + 65536]
        neighbor_idx[start:start + 65536] = torch.cdist(chunk, points).topk(J, largest=False).indices
    logits = torch.randn(G, J, generator=gen, device=device)
    anchors = neighbor_idx[:, :3].contiguous()
    quats = torch.nn.functional.normalize(torch.randn(G, 4, generator=gen, device=device), dim=1)
    return points, neighbor_idx, logits, anchors, quats


def traffic_bytes(G, P=POINTS, J=NEIGHBOURS, s=4, i=8):
    inputs = 3 * P * s + G * J * i + G * J * s + 3 * G * i + 4 * G * s
    forward = inputs + 3 * G * s + 4 * G * s
    backward = inputs + 3 * G * s + 4 * G * s + 3 * P * s + G * J * s + 4 * G * s
    return forward, forward + backward


def run() -> list[dict]:
    from npg.kernels import skinning as kernels

    device = device_name()
    copy_gbps = measured_copy_gbps()
    rows = [{"bench": "copy", "size": "1 GiB", "impl": "torch copy_", "ms": 2 * 2**30 / copy_gbps / 1e6,
             "gbps": copy_gbps, "device": device}]
    impls = {
        "triton": lambda *a: skin(*a),
        "triton, validate=False": lambda *a: skin(*a, validate=False),
        "torch reference": lambda *a: skin_torch(*a),
    }
    for G in SIZES:
        points, neighbor_idx, logits, anchors, quats = make_problem(G)
        fwd_bytes, fwd_bwd_bytes = traffic_bytes(G)
        grad_means = torch.randn(G, 3, device="cuda")
        grad_rotations = torch.randn(G, 4, device="cuda")
        leaves = [t.clone().requires_grad_() for t in (points, logits, quats)]
        for impl, fn in impls.items():
            with torch.no_grad():
                ms = cuda_median_ms(lambda: fn(points, neighbor_idx, logits, anchors, quats))
            rows.append({"bench": "skinning_fwd", "size": G, "impl": impl, "ms": ms,
                         "gbps": fwd_bytes / (ms * 1e-3) / 1e9, "device": device})

            def forward_backward():
                p, l, q = leaves
                means, rotations = fn(p, neighbor_idx, l, anchors, q)
                torch.autograd.grad((means, rotations), (p, l, q), (grad_means, grad_rotations))

            ms = cuda_median_ms(forward_backward)
            rows.append({"bench": "skinning_fwd_bwd", "size": G, "impl": impl, "ms": ms,
                         "gbps": fwd_bwd_bytes / (ms * 1e-3) / 1e9, "device": device})
        # The kernels' own device time (padding copy included), without Python launch overhead, for
        # the int64 indices npg.knn returns and for int32 ones (fewer bytes to move).
        for index_dtype, i in ((torch.int64, 8), (torch.int32, 4)):
            idx, anc = neighbor_idx.to(index_dtype), anchors.to(index_dtype)
            fwd_b, fwd_bwd_b = traffic_bytes(G, i=i)

            def kernel_forward():
                return kernels.skin_forward(kernels.pad_points(points), idx, logits, anc, quats, SIN_EPS2, AREA_EPS2)

            def kernel_forward_backward():
                padded = kernels.pad_points(points)
                kernels.skin_forward(padded, idx, logits, anc, quats, SIN_EPS2, AREA_EPS2)
                kernels.skin_backward(padded, idx, logits, anc, quats, grad_means, grad_rotations, SIN_EPS2,
                                      AREA_EPS2, True, True, True)

            name = f"triton kernels, CUDA graph, {str(index_dtype).replace('torch.', '')} indices"
            ms = graph_median_ms(kernel_forward)
            rows.append({"bench": "skinning_fwd", "size": G, "impl": name, "ms": ms,
                         "gbps": fwd_b / (ms * 1e-3) / 1e9, "device": device})
            ms = graph_median_ms(kernel_forward_backward)
            rows.append({"bench": "skinning_fwd_bwd", "size": G, "impl": name, "ms": ms,
                         "gbps": fwd_bwd_b / (ms * 1e-3) / 1e9, "device": device})
        torch.cuda.empty_cache()
    return rows


def sweep() -> list[dict]:
    """Bare forward and backward kernels over (BLOCK_G, num_warps) at G = 100k and 1M."""
    from npg.kernels import skinning as kernels

    device = device_name()
    rows = []
    for G in SIZES[1:]:
        points, *rest = make_problem(G)
        problem = (kernels.pad_points(points), *rest)
        fwd_bytes, fwd_bwd_bytes = traffic_bytes(G)
        bwd_bytes = fwd_bwd_bytes - fwd_bytes
        grad_means = torch.randn(G, 3, device="cuda")
        grad_rotations = torch.randn(G, 4, device="cuda")
        for block_g, num_warps in [(16, 1), (32, 1), (32, 2), (32, 4), (64, 2), (64, 4), (128, 4), (128, 8)]:
            config = dict(block_g=block_g, num_warps=num_warps)
            ms = graph_median_ms(lambda: kernels.skin_forward(*problem, SIN_EPS2, AREA_EPS2, **config))
            rows.append({"bench": "skinning_fwd_kernel", "size": G, "impl": f"BLOCK_G={block_g} warps={num_warps}",
                         "ms": ms, "gbps": fwd_bytes / (ms * 1e-3) / 1e9, "device": device})
            ms = graph_median_ms(lambda: kernels.skin_backward(*problem, grad_means, grad_rotations, SIN_EPS2,
                                                              AREA_EPS2, True, True, True, **config))
            rows.append({"bench": "skinning_bwd_kernel", "size": G, "impl": f"BLOCK_G={block_g} warps={num_warps}",
                         "ms": ms, "gbps": bwd_bytes / (ms * 1e-3) / 1e9, "device": device})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows of run() here")
    parser.add_argument("--sweep", metavar="JSON",
                        help="also time the bare kernels over block sizes, rows written here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_skinning needs a CUDA device")
    rows = run()
    print(format_table(rows), flush=True)
    if args.json:
        write_json(rows, args.json)
    if args.sweep:
        tuning = sweep()
        print(format_table(tuning))
        write_json(tuning, args.sweep)


if __name__ == "__main__":
    main()
