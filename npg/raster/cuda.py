"""The CUDA path of the rasterizer: the kernels of ``csrc/raster`` behind an autograd.Function.

``rasterize_cuda`` has the signature and result of ``npg.rasterize`` (see there for the conventions)
and takes float32 CUDA tensors. The forward runs per-Gaussian preprocessing, tile binning (a depth
sort of the Gaussians, then a stable radix sort of the (tile, Gaussian) pairs by tile) and per-tile
front-to-back blending; the backward recomputes nothing but the per-Gaussian chain rule, from the
per-splat gradients that the blending backward sums per warp before one atomic add.

The compiled extension ``npg._raster_cuda`` is loaded on first use (``npg._ext.load("raster")``).
"""
from __future__ import annotations

from typing import Optional

import torch

from npg._ext import load

from .checks import RasterOutput, check_inputs

FOV_CLAMP = 1.3  # x/z and y/z are clamped to ±1.3·tan(half fov) in the EWA Jacobian


def camera_numbers(camera) -> list[float]:
    """The 27 numbers csrc/raster/rasterizer.h takes: w2c row-major (16), campos (3), fx, fy, cx, cy,
    lim_x, lim_y, width, height."""
    w2c = camera.w2c_host
    campos = -(w2c[:3, :3].T @ w2c[:3, 3])
    return (
        w2c.reshape(-1).tolist()
        + campos.tolist()
        + [camera.fx, camera.fy, camera.cx, camera.cy, FOV_CLAMP * camera.tanfovx, FOV_CLAMP * camera.tanfovy]
        + [float(camera.width), float(camera.height)]
    )


# Bit i of the extension's bad-input flags names input i.
_FLAGGED_INPUTS = ("means3d", "opacities", "shs", "colors", "scales", "rotations", "cov3d", "background")


def _raise_for_status(flags: int, num_pairs: int):
    bad = [name for bit, name in enumerate(_FLAGGED_INPUTS) if flags & (1 << bit)]
    if bad:
        raise ValueError(f"{', '.join(bad)} contain{'s' if len(bad) == 1 else ''} NaN or Inf")
    raise ValueError(
        f"the Gaussians cover {num_pairs} (tile, Gaussian) pairs, more than the 2147483647 one render can sort; "
        "render fewer or smaller Gaussians, or a smaller image"
    )


class _RasterizeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means3d, means2d, opacities, shs, colors, scales, rotations, cov3d, background, camera, sh_degree,
                scale_modifier):
        ext = load("raster")
        result = ext.forward(
            means3d, opacities, shs, colors, scales, rotations, cov3d, background, camera, sh_degree, scale_modifier
        )
        if len(result) == 1:
            _raise_for_status(*result[0].tolist())
        (color, depth, alpha, radii, splats, point_list, tile_ranges, final_t, n_contrib) = result
        ctx.camera = camera
        ctx.sh_degree = sh_degree
        ctx.scale_modifier = scale_modifier
        ctx.save_for_backward(means3d, opacities, shs, colors, scales, rotations, cov3d, background, color, depth,
                              final_t, n_contrib, point_list, tile_ranges, splats, radii)
        ctx.mark_non_differentiable(radii)
        return color, depth, alpha, radii

    @staticmethod
    def backward(ctx, grad_color, grad_depth, grad_alpha, _grad_radii):
        (means3d, opacities, shs, colors, scales, rotations, cov3d, background, color, depth, final_t, n_contrib,
         point_list, tile_ranges, splats, radii) = ctx.saved_tensors
        grad_color = grad_color.contiguous()
        (d_means3d, d_means2d, d_opacities, d_shs, d_colors, d_scales, d_rotations, d_cov3d) = load("raster").backward(
            grad_color, grad_depth.contiguous(), grad_alpha.contiguous(), color, depth, final_t, n_contrib, point_list,
            tile_ranges, splats, radii, means3d, opacities, shs, colors, scales, rotations, cov3d, background,
            ctx.camera, ctx.sh_degree, ctx.scale_modifier,
        )
        # The background shows through the final transmittance of every pixel.
        d_background = (grad_color * final_t).sum(dim=(1, 2)) if ctx.needs_input_grad[8] else None
        return (
            d_means3d,
            d_means2d,
            d_opacities.view_as(opacities),
            d_shs if shs is not None else None,
            d_colors if colors is not None else None,
            d_scales if scales is not None else None,
            d_rotations if rotations is not None else None,
            d_cov3d if cov3d is not None else None,
            d_background,
            None,
            None,
            None,
        )


def _contiguous(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if tensor is None else tensor.contiguous()


def rasterize_cuda(
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
) -> RasterOutput:
    """Render N Gaussians with the CUDA kernels. Same arguments and result as ``npg.rasterize``.

    means3d [N, 3], opacities [N] or [N, 1], shs [N, M, 3] or colors [N, 3], scales [N, 3] + rotations
    [N, 4] or cov3d [N, 6], background [3], means2d [N, 3]: float32 tensors on one CUDA device.
    Returns RasterOutput(color [3, H, W], depth [1, H, W], alpha [1, H, W], radii [N] int32, means2d).
    """
    inp = check_inputs(
        means3d, opacities, camera, shs=shs, sh_degree=sh_degree, colors=colors, scales=scales, rotations=rotations,
        cov3d=cov3d, scale_modifier=scale_modifier, background=background, means2d=means2d, dtypes=(torch.float32,),
        check_finite=False,  # the preprocessing kernel flags NaN / Inf inputs in the same sync as the pair count
    )
    if inp.device.type != "cuda":
        raise ValueError(f"the CUDA rasterizer needs CUDA tensors, got tensors on {inp.device}")
    color, depth, alpha, radii = _RasterizeFunction.apply(
        _contiguous(inp.means3d),
        inp.means2d,
        _contiguous(inp.opacities),
        _contiguous(inp.shs),
        _contiguous(inp.colors),
        _contiguous(inp.scales),
        _contiguous(inp.rotations),
        _contiguous(inp.cov3d),
        _contiguous(inp.background),
        camera_numbers(camera),
        inp.sh_degree,
        inp.scale_modifier,
    )
    return RasterOutput(color=color, depth=depth, alpha=alpha, radii=radii, means2d=inp.means2d)
