"""Stage-1 loss terms, each returning an unweighted scalar (the trainer applies the weights).

- ``silhouette_loss``: 2D chamfer between projected points and mask pixels (both directions, squared
  pixel distances, mean over each side), through ``npg.silhouette_chamfer``.
- ``positive_depth_loss``: mean(min(z_cam, 0)²).
- ``rigidity_loss``: local rigidity against the reference frame over its k nearest neighbours.
- ``flow_consistency_loss``: features splatted at frame f+1, warped back to f with the forward optical
  flow, against the features splatted at f; masked soft-Huber normalised by mask pixels.
- ``coverage_loss``: the splatted cloud's alpha against the mask, squared error per pixel.
- ``photometric_loss``: splatted point colours against the frames, masked L1.
- ``point_flow_loss``: the projected motion of each visible point from f to f+1 against the optical
  flow sampled at the point (``visible_points``: a point z-buffer on a coarse pixel grid).

None of them builds a dense N×N or N×M matrix; the tests compare each against a plain dense PyTorch
formulation at small sizes.
"""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F


def silhouette_loss(
    points2d: torch.Tensor, masks, pixel_scale: float = 1.0, point_to_mask_weight: float = 1.0
) -> torch.Tensor:
    """Mean over frames of (point_to_mask_weight·point→mask + mask→point) chamfer, in (pixel_scale·pixel)².

    points2d [B, N, 2] pixel coordinates (x, y); masks [B, H, W] bool, or B masks prepared once by
    ``npg.chamfer.prepare_mask`` (what the trainer passes). ``pixel_scale`` expresses the distances in
    the pixels of another resolution (the trainer uses 800/W so that the original NPG weights hold
    whatever resolution we train at). ``point_to_mask_weight`` > 1 pulls points that project outside
    the mask harder than it spreads points over the mask (the original: 1).
    """
    from npg.chamfer import silhouette_chamfer

    if points2d.dim() != 3 or points2d.shape[-1] != 2:
        raise ValueError(f"points2d must be [B, N, 2], got {tuple(points2d.shape)}")
    if len(masks) != points2d.shape[0] or (isinstance(masks, torch.Tensor) and masks.dim() != 3):
        shape = tuple(masks.shape) if isinstance(masks, torch.Tensor) else f"{len(masks)} masks"
        raise ValueError(f"masks must be [B, H, W] with B={points2d.shape[0]}, got {shape}")
    if not bool(torch.isfinite(points2d).all()):  # one device sync for the batch, not one per frame
        frame = int(torch.nonzero(~torch.isfinite(points2d).flatten(1).all(dim=1))[0, 0])
        raise ValueError(f"silhouette_loss: the projected points of frame {frame} of the batch contain NaN or Inf")
    total = points2d.new_zeros(())
    for frame_points, mask in zip(points2d, masks):
        point_to_mask, mask_to_point = silhouette_chamfer(frame_points, mask, validate=False)
        total = total + point_to_mask_weight * point_to_mask + mask_to_point
    return total * (pixel_scale**2) / points2d.shape[0]


def positive_depth_loss(depth: torch.Tensor) -> torch.Tensor:
    """mean(min(z, 0)²) over all entries of the camera-space depths ``depth`` [...]."""
    return depth.clamp(max=0.0).square().mean()


def reference_neighbors(reference: torch.Tensor, k: int):
    """k nearest neighbours of each reference point among the others: (dist2 [N, k], idx [N, k] int64).

    Computed without gradient (the neighbourhood is a choice, not a quantity to optimise).
    """
    from npg.neighbors import knn

    if reference.dim() != 2 or reference.shape[1] != 3:
        raise ValueError(f"reference must be [N, 3], got {tuple(reference.shape)}")
    if not 1 <= k < reference.shape[0]:
        raise ValueError(f"rigidity k must be in [1, N-1] = [1, {reference.shape[0] - 1}], got {k}")
    with torch.no_grad():
        return knn(reference.detach().float().contiguous(), k)


def rigidity_loss(points: torch.Tensor, reference: torch.Tensor, neighbor_idx: torch.Tensor) -> torch.Tensor:
    """Local rigidity: mean over frames and points of Σⱼ (|x_r,n − x_r,j|² − |x_f,n − x_f,j|²)².

    points [B, N, 3] (frames f), reference [N, 3] (the reference frame r, differentiable too),
    neighbor_idx [N, k] int64: the k nearest neighbours j of each point n in the reference frame.
    """
    if points.dim() != 3 or points.shape[-1] != 3:
        raise ValueError(f"points must be [B, N, 3], got {tuple(points.shape)}")
    if reference.shape != points.shape[1:]:
        raise ValueError(f"reference must be [N, 3] = {tuple(points.shape[1:])}, got {tuple(reference.shape)}")
    if neighbor_idx.dim() != 2 or neighbor_idx.shape[0] != points.shape[1]:
        raise ValueError(f"neighbor_idx must be [N, k] with N={points.shape[1]}, got {tuple(neighbor_idx.shape)}")
    reference_d2 = (reference[:, None, :] - reference[neighbor_idx]).square().sum(-1)  # [N, k]
    frame_d2 = (points[:, :, None, :] - points[:, neighbor_idx]).square().sum(-1)  # [B, N, k]
    return (reference_d2[None] - frame_d2).square().sum(-1).mean()


def soft_huber(d: torch.Tensor, eps: float) -> torch.Tensor:
    """ρ(d) = ε(√(1 + d²/ε²) − 1): quadratic below ε, ≈ |d| above."""
    return eps * (torch.sqrt(1.0 + (d / eps).square()) - 1.0)


def _in_image(xy: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """[..., 2] pixel positions (x, y), pixel centres at integers -> [...] bool: within the outer centres."""
    return (xy[..., 0] >= 0) & (xy[..., 0] <= width - 1) & (xy[..., 1] >= 0) & (xy[..., 1] <= height - 1)


def _sampling_grid(xy: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """[..., 2] pixel positions -> grid_sample coordinates (align_corners=True: -1 and +1 are the
    centres of the first and last pixels)."""
    return torch.stack([2.0 * xy[..., 0] / max(width - 1, 1) - 1.0, 2.0 * xy[..., 1] / max(height - 1, 1) - 1.0], dim=-1)


def warp_back(image_next: torch.Tensor, flow: torch.Tensor):
    """Warp frame f+1 back onto frame f with the forward flow f→f+1.

    image_next [B, C, H, W]; flow [B, H, W, 2] in pixels (dx, dy): pixel (x, y) of frame f moves to
    (x + dx, y + dy) in frame f+1. Returns (warped [B, C, H, W] bicubic, valid [B, H, W] bool) where
    ``valid`` is False for pixels whose flow leaves the image.
    """
    batch, _, height, width = image_next.shape
    if flow.shape != (batch, height, width, 2):
        raise ValueError(f"flow must be [B, H, W, 2] = {(batch, height, width, 2)}, got {tuple(flow.shape)}")
    ys, xs = torch.meshgrid(
        torch.arange(height, device=flow.device, dtype=flow.dtype),
        torch.arange(width, device=flow.device, dtype=flow.dtype),
        indexing="ij",
    )
    target = torch.stack([xs, ys], dim=-1) + flow  # [B, H, W, 2]
    valid = _in_image(target, width, height)
    grid = _sampling_grid(target, width, height)
    warped = F.grid_sample(image_next, grid.to(image_next.dtype), mode="bicubic", padding_mode="border", align_corners=True)
    return warped, valid


def flow_consistency_loss(
    rendered: torch.Tensor,
    rendered_next: torch.Tensor,
    flow: torch.Tensor,
    masks: torch.Tensor,
    eps: float = 0.01,
) -> torch.Tensor:
    """Masked soft-Huber between features at f and features at f+1 warped back with the flow.

    rendered, rendered_next [B, C, H, W] (splatted features of frames f and f+1); flow [B, H, W, 2]
    forward flow f→f+1 in pixels; masks [B, H, W] bool silhouettes of frame f. Per pair:
    Σ_pixels,channels ρ(diff) over pixels in the mask whose flow stays inside the image, divided by
    that pixel count (at least 1); mean over pairs.
    """
    if rendered.shape != rendered_next.shape or rendered.dim() != 4:
        raise ValueError(
            f"rendered and rendered_next must both be [B, C, H, W], got {tuple(rendered.shape)} and {tuple(rendered_next.shape)}"
        )
    if masks.shape != (rendered.shape[0], *rendered.shape[2:]):
        raise ValueError(f"masks must be [B, H, W] = {(rendered.shape[0], *rendered.shape[2:])}, got {tuple(masks.shape)}")
    warped, valid = warp_back(rendered_next, flow)
    weight = (masks & valid).to(rendered.dtype)[:, None]  # [B, 1, H, W]
    penalty = soft_huber((rendered - warped) * weight, eps)
    per_pair = penalty.flatten(1).sum(1) / weight.flatten(1).sum(1).clamp(min=1.0)
    return per_pair.mean()


def coverage_loss(alpha: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """mean((alpha − mask)²) over frames and pixels. alpha [B, 1, H, W] splatted coverage in [0, 1];
    masks [B, H, W] bool silhouettes."""
    if alpha.dim() != 4 or alpha.shape[1] != 1 or masks.shape != (alpha.shape[0], *alpha.shape[2:]):
        raise ValueError(f"alpha must be [B, 1, H, W] and masks [B, H, W] alike, got {tuple(alpha.shape)} and {tuple(masks.shape)}")
    return (alpha[:, 0] - masks.to(alpha.dtype)).square().mean()


def photometric_loss(rendered: torch.Tensor, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Masked L1 between splatted point colours and the frames: per frame, Σ |rendered − image| over
    the mask's pixels and the channels, divided by 3 × the mask's pixel count (at least 1); mean over
    frames. rendered, images [B, 3, H, W] (images composited over black); masks [B, H, W] bool."""
    if rendered.shape != images.shape or rendered.dim() != 4 or rendered.shape[1] != 3:
        raise ValueError(f"rendered and images must both be [B, 3, H, W], got {tuple(rendered.shape)} and {tuple(images.shape)}")
    if masks.shape != (rendered.shape[0], *rendered.shape[2:]):
        raise ValueError(f"masks must be [B, H, W] = {(rendered.shape[0], *rendered.shape[2:])}, got {tuple(masks.shape)}")
    weight = masks.to(rendered.dtype)[:, None]  # [B, 1, H, W]
    per_frame = ((rendered - images).abs() * weight).flatten(1).sum(1) / (3.0 * weight.flatten(1).sum(1).clamp(min=1.0))
    return per_frame.mean()


def visible_points(pixels: torch.Tensor, depth: torch.Tensor, masks: torch.Tensor, cell, tolerance) -> torch.Tensor:
    """Which points a frame sees: a point z-buffer, computed without gradient.

    pixels [B, N, 2] projections (x, y), depth [B, N] camera-space z, masks [B, H, W] bool. The image is
    cut into square cells ``cell`` (>= 1) pixels wide; a point is visible when it projects inside the
    image and the mask, lies in front of the camera, and its depth is within ``tolerance`` (world
    units) of the nearest point in its cell. ``cell`` and ``tolerance``: numbers or 0-d tensors on the
    points' device (so a training step need not read them back to the host). Returns [B, N] bool.
    """
    if pixels.dim() != 3 or pixels.shape[-1] != 2 or depth.shape != pixels.shape[:2]:
        raise ValueError(f"pixels must be [B, N, 2] and depth [B, N], got {tuple(pixels.shape)} and {tuple(depth.shape)}")
    if masks.dim() != 3 or masks.shape[0] != pixels.shape[0]:
        raise ValueError(f"masks must be [B, H, W] with B={pixels.shape[0]}, got {tuple(masks.shape)}")
    if not isinstance(cell, torch.Tensor) and not cell >= 1:
        raise ValueError(f"cell must be >= 1 pixel, got {cell}")
    batch, height, width = masks.shape
    with torch.no_grad():
        x, y = pixels[..., 0].round().long(), pixels[..., 1].round().long()
        inside = (x >= 0) & (x < width) & (y >= 0) & (y < height) & (depth > 0) & torch.isfinite(depth)
        x, y = x.clamp(0, width - 1), y.clamp(0, height - 1)
        frame = torch.arange(batch, device=pixels.device)[:, None].expand_as(x)
        inside &= masks[frame, y, x]
        # cells of at least a pixel number fewer than W per row and H rows: index them on that bound
        cells = torch.div(y, cell, rounding_mode="floor").long() * width + torch.div(x, cell, rounding_mode="floor").long()
        flat = (frame * (width * height) + cells).flatten()
        z = torch.where(inside, depth, torch.full_like(depth, math.inf)).flatten()
        nearest = torch.full((batch * width * height,), math.inf, device=depth.device, dtype=depth.dtype)
        nearest = nearest.scatter_reduce(0, flat, z, reduce="amin")
        return inside & (depth <= nearest[flat].view_as(depth) + tolerance)


def sample_flow(flow: torch.Tensor, pixels: torch.Tensor):
    """Bilinear flow at sub-pixel positions. flow [B, H, W, 2] in pixels, pixels [B, N, 2] (x, y) ->
    (flow at the points [B, N, 2], valid [B, N] bool: inside the image, and so is the flow's target)."""
    _, height, width, _ = flow.shape
    grid = _sampling_grid(pixels, width, height)[:, :, None]  # [B, N, 1, 2]
    sampled = F.grid_sample(
        flow.permute(0, 3, 1, 2), grid.to(flow.dtype), mode="bilinear", padding_mode="border", align_corners=True
    )[..., 0].transpose(1, 2)  # [B, N, 2]
    return sampled, _in_image(pixels, width, height) & _in_image(pixels + sampled, width, height)


def point_flow_loss(
    pixels: torch.Tensor,
    pixels_next: torch.Tensor,
    flow: torch.Tensor,
    visible: torch.Tensor,
    pixel_scale: float = 1.0,
    eps: float = 1.0,
) -> torch.Tensor:
    """Each visible point's projected motion from frame f to f+1 against the optical flow at it.

    pixels, pixels_next [B, N, 2]: the points projected in frames f and f+1 (each by its own camera);
    flow [B, H, W, 2] forward flow f→f+1 in pixels; visible [B, N] bool (``visible_points`` of frame
    f). The residual r = pixels_next − pixels − flow(pixels), with the flow sampled bilinearly at the
    detached position. Per pair: the mean over the visible points whose flow stays in the image of the
    soft-Huber ε(√(1 + (pixel_scale·|r|)²/ε²) − 1), ``eps`` and the result in pixels of the
    ``pixel_scale``-times finer image; 0 for a pair without such points; mean over pairs.
    """
    if pixels.shape != pixels_next.shape or pixels.dim() != 3 or pixels.shape[-1] != 2:
        raise ValueError(
            f"pixels and pixels_next must both be [B, N, 2], got {tuple(pixels.shape)} and {tuple(pixels_next.shape)}"
        )
    if flow.dim() != 4 or flow.shape[0] != pixels.shape[0] or flow.shape[-1] != 2:
        raise ValueError(f"flow must be [B, H, W, 2] with B={pixels.shape[0]}, got {tuple(flow.shape)}")
    if visible.shape != pixels.shape[:2]:
        raise ValueError(f"visible must be [B, N] = {tuple(pixels.shape[:2])}, got {tuple(visible.shape)}")
    with torch.no_grad():
        motion, valid = sample_flow(flow, pixels.detach())
    weight = (visible & valid).to(pixels.dtype)
    # soft_huber of |r| written with |r|² (the norm's gradient is undefined at r = 0)
    residual2 = (pixels_next - pixels - motion.to(pixels.dtype)).square().sum(-1) * pixel_scale**2
    penalty = eps * (torch.sqrt(1.0 + residual2 / eps**2) - 1.0)
    per_pair = (penalty * weight).sum(1) / weight.sum(1).clamp(min=1.0)
    return per_pair.mean()
