"""Drop-in replacement for the depth/alpha fork of ``diff_gaussian_rasterization``.

Existing 3DGS code switches by changing one import::

    from npg.compat import GaussianRasterizationSettings, GaussianRasterizer

    rasterizer = GaussianRasterizer(raster_settings=GaussianRasterizationSettings(
        image_height=H, image_width=W, tanfovx=tanfovx, tanfovy=tanfovy, bg=bg, scale_modifier=1.0,
        viewmatrix=world_view_transform, projmatrix=full_proj_transform, sh_degree=active_sh_degree,
        campos=camera_center, prefiltered=False, debug=False))
    color, radii, depth, alpha = rasterizer(means3D=xyz, means2D=screenspace_points, shs=features,
        colors_precomp=None, opacities=opacity, scales=scales, rotations=rotations, cov3D_precomp=None)

Argument names, layouts and return values are the fork's: ``viewmatrix`` is w2c.T (row-vector
convention), ``means2D`` [N, 3] is the screen-space gradient sink (``means2D.grad[:, :2]`` is
dL/d(NDC x, y) after backward, column 2 is 0), the result is (color [3, H, W], radii [N] int32,
depth [1, H, W] = Σ w·z, alpha [1, H, W] = Σ w). CPU tensors render through the PyTorch reference,
CUDA tensors through npg's CUDA kernels.

Differences from the fork, all deliberate:

- Gradients are npg's exact ones. The fork's scale gradient is ∂L/∂(scale_modifier·s); npg returns
  ∂L/∂s, i.e. the fork's value multiplied by ``scale_modifier`` (identical when it is 1). Rotation
  gradients are taken through the quaternion formula at q as given, as in the fork; the 0.99 α cap
  is straight-through, as in the fork.
- The camera is rebuilt from ``viewmatrix``, ``tanfovx``/``tanfovy`` and the image size with a
  centred principal point (``npg.Camera.from_fov``); ``projmatrix`` and ``campos`` are not read (the
  fork derives the same projection and centre from them for standard 3DGS cameras). ``prefiltered``
  and ``debug`` are accepted and ignored.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from npg.camera import Camera

NEAR_CULL_Z = 0.2


class GaussianRasterizationSettings(NamedTuple):
    image_height: int
    image_width: int
    tanfovx: float
    tanfovy: float
    bg: torch.Tensor
    scale_modifier: float
    viewmatrix: torch.Tensor
    projmatrix: torch.Tensor
    sh_degree: int
    campos: torch.Tensor
    prefiltered: bool
    debug: bool


def settings_to_camera(settings: GaussianRasterizationSettings) -> Camera:
    """The npg camera the settings describe: w2c = viewmatrix.T, fx = W/(2·tanfovx), centred principal point."""
    w2c = torch.as_tensor(settings.viewmatrix).detach().to("cpu", torch.float64).T
    return Camera.from_fov(w2c, float(settings.tanfovx), float(settings.tanfovy),
                           int(settings.image_width), int(settings.image_height))


class GaussianRasterizer(nn.Module):
    def __init__(self, raster_settings: GaussianRasterizationSettings):
        super().__init__()
        self.raster_settings = raster_settings

    def markVisible(self, positions: torch.Tensor) -> torch.Tensor:
        """[N, 3] -> [N] bool: the point lies in front of the camera's near cull plane (view z > 0.2)."""
        with torch.no_grad():
            view = torch.as_tensor(self.raster_settings.viewmatrix).to(positions)
            z = positions @ view[:3, 2] + view[3, 2]
            return z > NEAR_CULL_Z

    def forward(self, means3D, means2D, opacities, shs=None, colors_precomp=None, scales=None,
                rotations=None, cov3D_precomp=None):
        from npg.raster import rasterize

        if (shs is None) == (colors_precomp is None):
            raise ValueError("Please provide exactly one of either SHs or precomputed colors!")
        if ((scales is None or rotations is None) and cov3D_precomp is None) or (
            (scales is not None or rotations is not None) and cov3D_precomp is not None
        ):
            raise ValueError("Please provide exactly one of either scale/rotation pair or precomputed 3D covariance!")
        settings = self.raster_settings
        out = rasterize(
            means3D,
            opacities,
            settings_to_camera(settings),
            shs=shs,
            sh_degree=int(settings.sh_degree),
            colors=colors_precomp,
            scales=scales,
            rotations=rotations,
            cov3d=cov3D_precomp,
            scale_modifier=float(settings.scale_modifier),
            background=settings.bg,
            means2d=means2D,
        )
        return out.color, out.radii, out.depth, out.alpha
