"""The PyTorch reference rasterizer: the oracle every other path is tested against.

It implements the conventions of standard 3D Gaussian Splatting (those of ``../shared/refdata``) with
plain torch ops on any device, and differentiates by autograd. Per Gaussian:

- view-space centre (x, y, z) = W·mean + t; culled when z <= 0.2;
- Σ = R·diag(scale_modifier·s)²·Rᵀ with R from the quaternion as given (no normalisation), or the
  precomputed Σ; cov2D = J·W·Σ·Wᵀ·Jᵀ + 0.3·I with J evaluated at x/z, y/z clamped to ±1.3·tanfov;
  dropped when det(cov2D) = 0; conic = cov2D⁻¹;
- radius = ceil(3·sqrt(λ₁)), λ₁ = mid + sqrt(max(0.1, mid² − det)); centre in pixels
  (fx·x/z + cx, fy·y/z + cy); listed in the 16×16 tiles [trunc((p − r)/16), trunc((p + r + 15)/16))
  per axis, clamped to the grid; a Gaussian with no tile gets radius 0;
- colour = SH(normalise(mean − campos)) + 0.5 clamped at 0, or the precomputed colour.

Per pixel, over the Gaussians of its tile front to back by z: power = −½·dᵀ·conic·d with d = centre −
pixel; skip when power > 0; α = min(0.99, o·exp(power)), skip when α < 1/255; stop before the
transmittance would fall below 1e-4; wᵢ = αᵢ·Πⱼ<ᵢ(1 − αⱼ). The 0.99 cap is straight-through in the
backward (∂α/∂o = exp(power) even where capped), as in the reference CUDA rasterizer.

How it stays within memory on a CPU: the discrete part (tile lists, the skip and stop tests) runs
without autograd over chunks of tiles and short runs of each tile's list, dropping tiles whose
pixels have all stopped; it yields the (pixel, Gaussian) pairs that are actually blended, in blending
order. Only those pairs enter the differentiable blend, where each pixel's transmittance is a
segmented cumulative sum of log(1 − α) (in float64).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.utils.checkpoint

from .checks import RasterOutput, check_inputs
from .sh import sh_to_color

TILE = 16
NEAR_CULL_Z = 0.2
FOV_CLAMP = 1.3
COV2D_DILATION = 0.3
ALPHA_MAX = 0.99
ALPHA_MIN = 1.0 / 255.0
TRANSMITTANCE_MIN = 1e-4
# Elements of one [tiles, list run, 256 pixels] block in the no-grad contribution search.
SEARCH_BLOCK_ELEMENTS = 1 << 22
SEARCH_RUN = 32
# Pairs blended per autograd checkpoint.
BLEND_CHUNK_PAIRS = 1 << 23


class Projection(NamedTuple):
    """Per-Gaussian screen-space quantities."""

    xy: torch.Tensor  # [N, 2] pixel coordinates of the centre (differentiable)
    conic: torch.Tensor  # [N, 3] inverse 2D covariance (a, b, c) (differentiable)
    depth: torch.Tensor  # [N] view-space z (differentiable)
    radii: torch.Tensor  # [N] int32, 0 = not rendered
    tile_min: torch.Tensor  # [N, 2] int64 first tile (x, y)
    tile_max: torch.Tensor  # [N, 2] int64 one past the last tile (x, y)


def quaternion_to_rotation(q: torch.Tensor) -> torch.Tensor:
    """[N, 4] (w, x, y, z) -> [N, 3, 3] by the standard formula applied to q as given (not normalised)."""
    r, x, y, z = q.unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - r * z), 2 * (x * z + r * y),
        2 * (x * y + r * z), 1 - 2 * (x * x + z * z), 2 * (y * z - r * x),
        2 * (x * z - r * y), 2 * (y * z + r * x), 1 - 2 * (x * x + y * y),
    ]
    return torch.stack(rows, dim=-1).reshape(q.shape[:-1] + (3, 3))


def covariance_from_scale_rotation(scales: torch.Tensor, rotations: torch.Tensor, scale_modifier: float) -> torch.Tensor:
    """Σ = R·diag(scale_modifier·s)²·Rᵀ: [N, 3], [N, 4] -> [N, 3, 3]."""
    m = quaternion_to_rotation(rotations) * (scale_modifier * scales).unsqueeze(-2)
    return m @ m.transpose(-1, -2)


def covariance_from_upper(cov6: torch.Tensor) -> torch.Tensor:
    """[N, 6] (xx, xy, xz, yy, yz, zz) -> symmetric [N, 3, 3] (an off-diagonal input feeds both entries)."""
    return cov6[:, [0, 1, 2, 1, 3, 4, 2, 4, 5]].reshape(-1, 3, 3)


def project_gaussians(means3d: torch.Tensor, cov3d: torch.Tensor, camera, means2d: torch.Tensor) -> Projection:
    """EWA projection, culling, radii and tile rectangles. means3d [N, 3], cov3d [N, 3, 3].

    ``means2d`` [N, 3] is the screen-space gradient sink: its first two columns, in NDC units, are
    added (with value zero) to the pixel centre used by blending, so their gradient is dL/dNDC.
    """
    dtype, device = means3d.dtype, means3d.device
    w2c = camera.w2c.to(device=device, dtype=dtype)
    rot = w2c[:3, :3]
    view = means3d @ rot.T + w2c[:3, 3]
    x, y, z = view.unbind(-1)
    in_front = z > NEAR_CULL_Z
    # Culled Gaussians get a harmless z so that no inf/NaN enters the graph (their pairs never exist).
    z = torch.where(in_front, z, torch.ones_like(z))

    fx, fy = camera.fx, camera.fy
    lim_x, lim_y = FOV_CLAMP * camera.tanfovx, FOV_CLAMP * camera.tanfovy
    tx = (x / z).clamp(-lim_x, lim_x) * z
    ty = (y / z).clamp(-lim_y, lim_y) * z
    zero = torch.zeros_like(z)
    jacobian = torch.stack(
        [fx / z, zero, -fx * tx / (z * z), zero, fy / z, -fy * ty / (z * z)], dim=-1
    ).reshape(-1, 2, 3)
    m = jacobian @ rot
    cov2d = m @ cov3d @ m.transpose(-1, -2)
    a = cov2d[:, 0, 0] + COV2D_DILATION
    b = cov2d[:, 0, 1]
    c = cov2d[:, 1, 1] + COV2D_DILATION
    det = a * c - b * b
    # det = 0 is the reference's drop rule; a non-finite det (float overflow) is dropped as well.
    kept = in_front & (det != 0) & torch.isfinite(det)
    a, b, c, det = (torch.where(kept, v, torch.ones_like(v)) for v in (a, b, c, det))
    conic = torch.stack([c / det, -b / det, a / det], dim=-1)

    with torch.no_grad():
        mid = 0.5 * (a + c)
        lambda1 = mid + torch.sqrt((mid * mid - det).clamp(min=0.1))
        radius = torch.ceil(3.0 * torch.sqrt(lambda1))

    ndc_to_pixels = torch.tensor([camera.width / 2.0, camera.height / 2.0], dtype=dtype, device=device)
    centre = torch.stack([fx * x / z + camera.cx, fy * y / z + camera.cy], dim=-1)
    sink = means2d[:, :2]
    xy = centre + (sink - sink.detach()) * ndc_to_pixels

    with torch.no_grad():
        # Overflowing centres are dropped; radii past 2³⁰ pixels cover any image and fit int32.
        kept = kept & torch.isfinite(xy).all(dim=-1)
        radius = torch.where(kept, radius.clamp(max=2**30), torch.zeros_like(radius)).unsqueeze(-1)
        p = torch.where(kept.unsqueeze(-1), xy.detach(), torch.zeros_like(xy))
        grid = torch.tensor([_tiles(camera.width), _tiles(camera.height)], dtype=dtype, device=device)
        tile_min = torch.minimum(torch.trunc((p - radius) / TILE).clamp(min=0), grid).long()
        tile_max = torch.minimum(torch.trunc((p + radius + TILE - 1) / TILE).clamp(min=0), grid).long()
        rendered = kept & ((tile_max - tile_min).prod(dim=-1) > 0)
        radii = torch.where(rendered, radius.squeeze(-1), torch.zeros_like(radius.squeeze(-1))).to(torch.int32)
        tile_max = torch.where(rendered.unsqueeze(-1), tile_max, tile_min)
    return Projection(xy=xy, conic=conic, depth=view[:, 2], radii=radii, tile_min=tile_min, tile_max=tile_max)


def _tiles(pixels: int) -> int:
    return (pixels + TILE - 1) // TILE


def bin_gaussians(proj: Projection, num_tiles_x: int, num_tiles: int):
    """Tile lists: (gaussian ids [I] sorted by (tile, depth), first list index per tile [T], count per tile [T])."""
    device = proj.depth.device
    with torch.no_grad():
        extent = proj.tile_max - proj.tile_min
        counts = extent.prod(dim=-1)
        owner = torch.repeat_interleave(torch.arange(counts.shape[0], device=device), counts)
        first = torch.cumsum(counts, 0) - counts
        k = torch.arange(owner.shape[0], device=device) - first[owner]
        width = extent[owner, 0]
        tile = (proj.tile_min[owner, 1] + k // width) * num_tiles_x + proj.tile_min[owner, 0] + k % width
        depth_rank = torch.empty_like(counts)
        depth_rank[torch.sort(proj.depth.detach(), stable=True).indices] = torch.arange(counts.shape[0], device=device)
        order = torch.argsort(tile * max(counts.shape[0], 1) + depth_rank[owner])
        tile_counts = torch.bincount(tile, minlength=num_tiles)
        tile_starts = torch.cumsum(tile_counts, 0) - tile_counts
    return owner[order], tile_starts, tile_counts


def find_contributions(proj: Projection, opacities: torch.Tensor, camera, gaussian_ids, tile_starts, tile_counts):
    """The (pixel, Gaussian) pairs that are blended, each pixel's pairs contiguous and front to back.

    Runs the skip and stop rules without autograd, a block of tiles and a short run of their lists at
    a time, carrying each pixel's transmittance; a tile leaves the block once all its pixels stopped.
    Returns (pixel ids [P] int64 ascending, gaussian ids [P] int64).
    """
    device, dtype = proj.xy.device, proj.xy.dtype
    width, height = camera.width, camera.height
    tiles_x = _tiles(width)
    with torch.no_grad():
        xy, conic, opacity = proj.xy.detach(), proj.conic.detach(), opacities.detach().reshape(-1)
        offset = torch.arange(TILE * TILE, device=device)
        tiles = torch.nonzero(tile_counts).squeeze(1)
        tiles = tiles[torch.argsort(tile_counts[tiles], descending=True)]
        block_tiles = max(1, SEARCH_BLOCK_ELEMENTS // (SEARCH_RUN * TILE * TILE))
        run = torch.arange(SEARCH_RUN, device=device)
        pixel_parts, gaussian_parts = [], []
        for block in torch.split(tiles, block_tiles):
            px = (block % tiles_x * TILE).unsqueeze(1) + offset % TILE  # [T, 256]
            py = (block // tiles_x * TILE).unsqueeze(1) + offset // TILE
            inside = (px < width) & (py < height)
            pixel_id = py * width + px
            pxf, pyf = px.to(dtype).unsqueeze(1), py.to(dtype).unsqueeze(1)  # [T, 1, 256]
            starts, counts = tile_starts[block], tile_counts[block]
            transmittance = torch.where(inside, 1.0, 0.0).to(dtype)  # outside pixels count as stopped
            position = 0
            while block.numel() > 0:
                pos = position + run
                listed = pos < counts.unsqueeze(1)  # [T, S]
                ids = gaussian_ids[(starts.unsqueeze(1) + pos).clamp(max=gaussian_ids.shape[0] - 1)]
                dx = xy[ids, 0].unsqueeze(-1) - pxf  # [T, S, 256]
                dy = xy[ids, 1].unsqueeze(-1) - pyf
                con = conic[ids].unsqueeze(-2)
                power = -0.5 * (con[..., 0] * dx * dx + con[..., 2] * dy * dy) - con[..., 1] * dx * dy
                alpha = (opacity[ids].unsqueeze(-1) * torch.exp(power)).clamp(max=ALPHA_MAX)
                blended = (power <= 0) & (alpha >= ALPHA_MIN) & listed.unsqueeze(-1)
                alpha = torch.where(blended, alpha, torch.zeros_like(alpha))
                after = transmittance.unsqueeze(1) * torch.cumprod(1 - alpha, dim=1)
                blended &= after >= TRANSMITTANCE_MIN
                t, p, s = torch.nonzero(blended.transpose(1, 2), as_tuple=True)
                pixel_parts.append(pixel_id[t, p])
                gaussian_parts.append(ids[t, s])
                transmittance = after[:, -1]
                position += SEARCH_RUN
                active = (position < counts) & (transmittance >= TRANSMITTANCE_MIN).any(dim=1)
                if not bool(active.all()):
                    block, starts, counts = block[active], starts[active], counts[active]
                    px, py, pxf, pyf = px[active], py[active], pxf[active], pyf[active]
                    pixel_id, transmittance = pixel_id[active], transmittance[active]
        if not pixel_parts:
            empty = torch.zeros(0, dtype=torch.long, device=device)
            return empty, empty
        pixels = torch.cat(pixel_parts)
        gaussians = torch.cat(gaussian_parts)
        # Stable: a pixel's pairs arrive in blending order across runs.
        order = torch.sort(pixels, stable=True).indices
    return pixels[order], gaussians[order]


def blend(proj, opacities, colors, pixels, gaussians, background, camera):
    """Differentiable front-to-back blending of the given pairs -> (color [3,H,W], depth [1,H,W], alpha [1,H,W]).

    ``pixels`` ascending with each pixel's pairs in blending order. Large pair lists are blended a
    range of pixels at a time under activation checkpointing, so the memory autograd keeps is
    bounded by BLEND_CHUNK_PAIRS rather than by the scene.
    """
    num_pixels = camera.width * camera.height
    counts = torch.bincount(pixels, minlength=num_pixels)
    ends = torch.cumsum(counts, 0)
    inputs = (proj.xy, proj.conic, proj.depth, opacities.reshape(-1), colors)
    # Pixel ranges holding about BLEND_CHUNK_PAIRS pairs each (a pixel never straddles two ranges).
    targets = torch.tensor(range(BLEND_CHUNK_PAIRS, pixels.shape[0], BLEND_CHUNK_PAIRS), dtype=ends.dtype, device=ends.device)
    cuts = (torch.searchsorted(ends, targets) + 1).clamp(max=num_pixels).tolist()
    bounds = sorted({0, num_pixels, *cuts})
    checkpointed = len(bounds) > 2 and torch.is_grad_enabled()
    sums, log_final = [], []
    for first_pixel, end_pixel in zip(bounds[:-1], bounds[1:]):
        first_pair = int(ends[first_pixel - 1]) if first_pixel > 0 else 0
        end_pair = int(ends[end_pixel - 1])
        args = (pixels[first_pair:end_pair], gaussians[first_pair:end_pair], counts[first_pixel:end_pixel],
                first_pixel, camera.width, *inputs)
        if checkpointed:
            part = torch.utils.checkpoint.checkpoint(_blend_pixel_range, *args, use_reentrant=False)
        else:
            part = _blend_pixel_range(*args)
        sums.append(part[0])
        log_final.append(part[1])
    sums = torch.cat(sums)
    final_transmittance = torch.exp(torch.cat(log_final)).to(sums.dtype)
    color = sums[:, :3] + final_transmittance.unsqueeze(-1) * background
    image = lambda v: v.T.reshape(-1, camera.height, camera.width)
    return image(color), image(sums[:, 3:4]), image(sums[:, 4:5])


def _blend_pixel_range(pixels, gaussians, counts, first_pixel, width, xy, conic, depth, opacities, colors):
    """Blend the pairs of pixels [first_pixel, first_pixel + len(counts)).

    Returns (Σ w·[r, g, b, z, 1] per pixel [P, 5], log of the final transmittance per pixel [P] float64).
    """
    dtype = xy.dtype
    px = (pixels % width).to(dtype)
    py = (pixels // width).to(dtype)
    center = xy[gaussians]
    con = conic[gaussians]
    dx, dy = center[:, 0] - px, center[:, 1] - py
    power = -0.5 * (con[:, 0] * dx * dx + con[:, 2] * dy * dy) - con[:, 1] * dx * dy
    g = opacities[gaussians] * torch.exp(power)
    alpha = g - (g - ALPHA_MAX).clamp(min=0).detach()  # min(0.99, g) with a straight-through gradient

    # Transmittance before each pair: exp of the pixel's running sum of log(1 − α) before it.
    log_keep = torch.log1p(-alpha).double()
    running = torch.cumsum(log_keep, 0) - log_keep
    first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    transmittance = torch.exp(running - running[first]).to(dtype)
    local = pixels - first_pixel
    log_final = torch.zeros(counts.shape[0], dtype=torch.float64, device=xy.device).index_add(0, local, log_keep)

    weight = alpha * transmittance
    values = torch.cat([colors[gaussians], depth[gaussians].unsqueeze(-1), torch.ones_like(weight).unsqueeze(-1)], 1)
    sums = torch.zeros(counts.shape[0], 5, dtype=dtype, device=xy.device).index_add(0, local, weight.unsqueeze(-1) * values)
    return sums, log_final


def rasterize_torch(
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
    """Render N Gaussians with plain PyTorch ops (CPU or GPU, float32 or float64). See ``npg.rasterize``."""
    inp = check_inputs(
        means3d, opacities, camera, shs=shs, sh_degree=sh_degree, colors=colors, scales=scales,
        rotations=rotations, cov3d=cov3d, scale_modifier=scale_modifier, background=background, means2d=means2d,
    )
    if inp.cov3d is not None:
        sigma = covariance_from_upper(inp.cov3d)
    else:
        sigma = covariance_from_scale_rotation(inp.scales, inp.rotations, inp.scale_modifier)
    proj = project_gaussians(inp.means3d, sigma, camera, inp.means2d)
    if inp.shs is not None:
        campos = camera.campos.to(device=inp.device, dtype=inp.dtype)
        rgb = sh_to_color(inp.shs, inp.means3d, campos, inp.sh_degree)
    else:
        rgb = inp.colors

    tiles_x = _tiles(camera.width)
    gaussian_ids, tile_starts, tile_counts = bin_gaussians(proj, tiles_x, tiles_x * _tiles(camera.height))
    pixels, gaussians = find_contributions(proj, inp.opacities, camera, gaussian_ids, tile_starts, tile_counts)
    color, depth, alpha = blend(proj, inp.opacities, rgb, pixels, gaussians, inp.background, camera)
    return RasterOutput(color=color, depth=depth, alpha=alpha, radii=proj.radii, means2d=inp.means2d)
