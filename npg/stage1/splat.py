"""Point splatting for stage 1: each point drawn as a small isotropic Gaussian by ``npg.rasterize``.

The flow loss splats fixed per-point features; the metrics splat the cloud's coverage (alpha) to
compare with the masks. A point's radius is tied to the local point spacing of the reference cloud
(RMS distance to its 3 nearest neighbours, like 3DGS initialises scales), so the splats cover the
surface without holes at any image resolution and stay proportionate as the cloud grows from its
initial collapsed state; the rigidity term keeps that spacing valid in the other frames.
"""
from __future__ import annotations

import torch

from npg.camera import Camera

_MIN_SCALE = 1e-6  # coincident points (e.g. the collapsed initial cloud) must not give a zero scale


def spacing_scales(neighbor_dist2: torch.Tensor, factor: float) -> torch.Tensor:
    """Per-point world radius ``factor·sqrt(mean of the (up to) 3 smallest squared distances)``.

    neighbor_dist2 [N, k] ascending squared distances to the nearest neighbours -> [N].
    """
    nearest = neighbor_dist2[:, : min(3, neighbor_dist2.shape[1])]
    return factor * nearest.mean(1).clamp(min=_MIN_SCALE**2).sqrt()


def splat(
    points: torch.Tensor,
    colors: torch.Tensor,
    camera: Camera,
    scales: torch.Tensor,
    opacity: float,
    background: torch.Tensor | None = None,
):
    """Splat one frame. points [N, 3] world; colors [N, 3]; scales [N] world radii -> RasterOutput
    (color [3, H, W], alpha [1, H, W], …). Differentiable w.r.t. points and colors."""
    from npg.raster import rasterize

    count = points.shape[0]
    if colors.shape != (count, 3):
        raise ValueError(f"colors must be [N, 3] = {(count, 3)}, got {tuple(colors.shape)}")
    if scales.shape != (count,):
        raise ValueError(f"scales must be [N] = ({count},), got {tuple(scales.shape)}")
    rotations = torch.zeros(count, 4, device=points.device, dtype=points.dtype)
    rotations[:, 0] = 1.0
    opacities = torch.full((count, 1), float(opacity), device=points.device, dtype=points.dtype)
    return rasterize(
        points.contiguous(),
        opacities,
        camera.to(points.device),
        colors=colors.to(points.dtype).contiguous(),
        scales=scales.detach()[:, None].expand(count, 3).contiguous(),
        rotations=rotations,
        background=background,
    )


def splat_frames(
    points: torch.Tensor,
    colors: torch.Tensor,
    cameras: list[Camera],
    scales: torch.Tensor,
    opacity: float,
):
    """Splat B frames. points [B, N, 3] with one camera each -> (color [B, 3, H, W], alpha [B, 1, H, W])."""
    if points.dim() != 3 or len(cameras) != points.shape[0]:
        raise ValueError(f"points must be [B, N, 3] with one camera per frame; got {tuple(points.shape)} and {len(cameras)} cameras")
    outputs = [splat(frame_points, colors, camera, scales, opacity) for frame_points, camera in zip(points, cameras)]
    return torch.stack([o.color for o in outputs]), torch.stack([o.alpha for o in outputs])
