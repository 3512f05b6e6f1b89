"""Fused SSIM benchmark: the Triton kernels against the conv2d implementation, in the same run.

Rows ``{bench, size, impl, ms, device}`` for RGB images of 400×400 and 800×800 ([1, 3, H, W], float32,
padding "same", the training loss). bench "ssim_fwd_bwd" is the training use: SSIM of a rendered image
(requires grad) against a target, then its backward; "ssim_fwd" the value alone (evaluation, no
gradient state). impl "triton" is ``npg.ssim`` as called by default (validate=True: the scalar is read
back once per call), "triton, validate=False" skips that synchronisation; "conv2d" is ``ssim_torch``
(five grouped 11×11 conv2d, 3D Gaussian Splatting's formulation, PyTorch's default cuDNN settings)
under autograd, and "conv2d, validate=False" the same without its finiteness check. At these sizes
both are dominated by host launch overhead, so impls "..., CUDA graph" also time the same calls
(validate=False, autograd included) replayed from a CUDA graph: the device time of each
implementation's kernels. ``sweep()`` times the bare kernels over tile shapes (used to pick defaults).

Run ``python -m benchmarks.bench_ssim [--json PATH] [--sweep PATH]`` on a GPU machine.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import cuda_median_ms, device_name, format_table, graph_median_ms, write_json  # noqa: E402
from npg.similarity import C1, C2, gaussian_window, ssim, ssim_torch  # noqa: E402

SIZES = [400, 800]


def image_pair(size, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    target = torch.rand(1, 3, size, size, generator=gen, device="cuda")
    render = (0.9 * target + 0.1 * torch.rand(target.shape, generator=gen, device="cuda")).clamp(0, 1)
    return render, target


def run() -> list[dict]:
    device = device_name()
    impls = {
        "triton": lambda a, b: ssim(a, b),
        "triton, validate=False": lambda a, b: ssim(a, b, validate=False),
        "conv2d": lambda a, b: ssim_torch(a, b),
        "conv2d, validate=False": lambda a, b: ssim_torch(a, b, validate=False),
    }
    rows = []
    for size in SIZES:
        render, target = image_pair(size)
        leaf = render.clone().requires_grad_()
        for impl, fn in impls.items():
            def forward_backward():
                (grad,) = torch.autograd.grad(1.0 - fn(leaf, target), leaf)
                return grad

            with torch.no_grad():
                ms = cuda_median_ms(lambda: fn(render, target))
            rows.append({"bench": "ssim_fwd", "size": f"{size}x{size}", "impl": impl, "ms": ms, "device": device})
            ms = cuda_median_ms(forward_backward)
            rows.append({"bench": "ssim_fwd_bwd", "size": f"{size}x{size}", "impl": impl, "ms": ms, "device": device})
        for impl, fn in (("triton", ssim), ("conv2d", ssim_torch)):
            def forward():
                with torch.no_grad():
                    return fn(render, target, validate=False)

            def forward_backward_graphed():
                return torch.autograd.grad(1.0 - fn(leaf, target, validate=False), leaf)

            for bench, body in (("ssim_fwd", forward), ("ssim_fwd_bwd", forward_backward_graphed)):
                rows.append({"bench": bench, "size": f"{size}x{size}", "impl": f"{impl}, CUDA graph",
                             "ms": graph_median_ms(body), "device": device})
    return rows


def sweep() -> list[dict]:
    """Bare forward (with the gradient maps) and backward kernels over tile shapes at 800×800."""
    from npg.kernels import ssim as kernels

    device = device_name()
    render, target = image_pair(800)
    x, y = render.reshape(3, 800, 800), target.reshape(3, 800, 800)
    window = gaussian_window(11, 1.5, torch.float32, "cuda")
    consts = torch.tensor([C1, C2], device="cuda")
    grad_out = torch.ones((), device="cuda")
    rows = []
    for tile_h in (16, 32, 64):
        for tile_w, num_warps in ((32, 1), (64, 2), (128, 4), (64, 1)):
            config = dict(tile_h=tile_h, tile_w=tile_w, num_warps=num_warps)
            name = f"TILE_H={tile_h} TILE_W={tile_w} warps={num_warps}"
            ms = cuda_median_ms(lambda: kernels.ssim_forward(x, y, window, consts, 5, 800, 800, True, **config))
            rows.append({"bench": "ssim_fwd_kernel", "size": "800x800", "impl": name, "ms": ms, "device": device})
            _, coef = kernels.ssim_forward(x, y, window, consts, 5, 800, 800, True, **config)
            ms = cuda_median_ms(lambda: kernels.ssim_backward(x, y, window, coef, grad_out, 5, True, False, **config))
            rows.append({"bench": "ssim_bwd_kernel", "size": "800x800", "impl": name, "ms": ms, "device": device})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows of run() here")
    parser.add_argument("--sweep", metavar="JSON",
                        help="also time the bare kernels over tile shapes, rows written here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_ssim needs a CUDA device")
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
