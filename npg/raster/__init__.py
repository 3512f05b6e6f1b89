"""Differentiable tile-based Gaussian rasterizer: one API, a PyTorch reference and a CUDA path.

``rasterize`` picks the implementation from the tensors' device (``backend="auto"``): CUDA tensors go
to the compiled kernels (``npg.raster.cuda``, loaded on first use), CPU tensors to the PyTorch
reference (``npg.raster.reference``). ``backend="torch"`` forces the reference on any device.
"""
from __future__ import annotations

from typing import Optional

import torch

from .checks import RasterOutput, check_inputs, make_means2d
from .reference import rasterize_torch

__all__ = ["rasterize", "RasterOutput", "rasterize_torch", "check_inputs", "make_means2d"]

BACKENDS = ("auto", "torch", "cuda")


def rasterize(
    means3d: torch.Tensor,
    opacities: torch.Tensor,
    camera,
    *,
    shs: Optional[torch.Tensor] = None,
    sh_degree: int = 0,
    colors: Optional[torch.Tensor] = None,
    scales: Optional[torch.Tensor] = None,
    rotations: Optional[torch.Tensor] = None,
    cov3d: Optional[torch.Tensor] = None,
    scale_modifier: float = 1.0,
    background=None,
    means2d: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> RasterOutput:
    """Render N 3D Gaussians seen by ``camera`` (an ``npg.Camera``) with 3DGS conventions.

    Args:
        means3d: [N, 3] world-space centres.
        opacities: [N] or [N, 1], activated (in [0, 1]).
        shs: [N, M, 3] SH coefficients with M >= (sh_degree+1)²; or ``colors`` [N, 3] precomputed RGB.
        scales: [N, 3] activated scales and ``rotations`` [N, 4] quaternions (w, x, y, z), used as
            given (not normalised); or ``cov3d`` [N, 6] world covariances (xx, xy, xz, yy, yz, zz).
        scale_modifier: multiplies every scale.
        background: [3] colour (tensor or 3 numbers), default black.
        means2d: [N, 3] screen-space gradient sink; created (a zero leaf that requires grad when any
            input does) when omitted and returned in the result.
        backend: "auto" (by device), "torch" (the reference, any device) or "cuda".

    Returns:
        RasterOutput(color [3, H, W], depth [1, H, W] = Σ w·z, alpha [1, H, W] = Σ w, radii [N] int32,
        means2d [N, 3]); after backward, ``means2d.grad[:, :2]`` is dL/d(NDC x, y).

    All float inputs share one dtype (float32; float64 on the torch path) and one device. Gradients
    are exact (scale gradients include scale_modifier), except that the 0.99 α cap is
    straight-through, as in the reference CUDA rasterizer.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(means3d, torch.Tensor):
        raise TypeError(f"means3d must be a torch.Tensor, got {type(means3d).__name__}")
    use_cuda = backend == "cuda" or (backend == "auto" and means3d.is_cuda)
    if backend == "cuda" and not means3d.is_cuda:
        raise ValueError(f"backend='cuda' needs CUDA tensors, but means3d is on {means3d.device}")
    kwargs = dict(
        shs=shs, sh_degree=sh_degree, colors=colors, scales=scales, rotations=rotations, cov3d=cov3d,
        scale_modifier=scale_modifier, background=background, means2d=means2d,
    )
    if not use_cuda:
        return rasterize_torch(means3d, opacities, camera, **kwargs)
    from npg._ext import ExtensionUnavailable

    from .cuda import rasterize_cuda

    try:
        return rasterize_cuda(means3d, opacities, camera, **kwargs)
    except ExtensionUnavailable as err:
        raise ExtensionUnavailable(f"{err} Or pass backend='torch' to render CUDA tensors with the PyTorch reference.") from err
