"""Silhouette chamfer between projected points and a binary mask (stage 1's silhouette loss).

``silhouette_chamfer(points2d [P, 2], mask [H, W] bool) -> (point_to_mask, mask_to_point)``:

* ``point_to_mask``: mean over the points of the squared distance (pixels²) to the nearest mask pixel;
* ``mask_to_point``: mean over the mask pixels of the squared distance to the nearest point.

Coordinates are pixels, x = column, y = row, pixel (x, y) sits at the integer position (x, y) (the
rasterizer's convention). Both terms are differentiable with respect to ``points2d``; the gradients are
the exact ones of the piecewise-quadratic loss, 2(p − q)/P for a point p whose nearest mask pixel is q,
and Σ 2(p − m)/M over the mask pixels m whose nearest point is p.

How (measured, then chosen):

* mask → point must be a nearest-*point* query per mask pixel, since the points move every step: a 2D
  KNN (``npg.knn``, k = 1) of the M mask pixels against the P points.
* point → mask: the nearest mask pixel of an off-grid point. A per-mask nearest-pixel transform
  (``cv2.distanceTransformWithLabels``, ``scipy.ndimage.distance_transform_edt(return_indices=True)``)
  answers it only at integer positions: the nearest mask pixel of round(p) need not be the nearest of p
  (nor, in general, need any answer at the lattice points around p), so its gradients are not exact. Instead we use an exact reduction: if round(p) is a mask pixel it is the nearest one (it is the
  nearest lattice point of all); otherwise the nearest mask pixel can be taken on the mask's boundary
  (mask pixels with a 4-neighbour outside the mask or the image): from any nearer interior pixel one
  could step towards p and get closer unless p lies within half a pixel of it, and then the stepping
  path to round(p) crosses the boundary at the same distance. So point → mask is an exact 2D KNN
  against the B ≪ M boundary pixels.

  Measured for 5000 points and an 800×800 mask of 300k pixels (a disc, 1,748 boundary pixels):
  per-mask transforms on the GPU machine's CPU, ``cv2.distanceTransformWithLabels`` 7.2 ms and
  ``scipy.ndimage.distance_transform_edt(return_indices=True)`` 49.8 ms (and still not exact off the
  grid); on the H100 (CUDA events), ``prepare_mask`` 0.49 ms once per mask, the exact chamfer forward
  1.70 ms and forward+backward 2.60 ms with a prepared mask (3.45 ms preparing the mask inside the call),
  against 78.0 ms for the brute-force reference. On the 2-core CPU machine the exact chamfer
  (cKDTree both ways) takes ~0.33 s forward+backward.

``prepare_mask(mask)`` does the per-mask work (pixel and boundary lists) once; pass its result instead
of the bool mask to reuse it across steps. ``silhouette_chamfer_torch`` is the brute-force reference
over every mask pixel (no boundary reduction) with the same signature.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from npg.neighbors import knn


@dataclass(frozen=True)
class MaskPixels:
    """Per-mask data for :func:`silhouette_chamfer`, computed once by :func:`prepare_mask`."""

    mask: torch.Tensor      # [H, W] bool
    pixels: torch.Tensor    # [M, 2] float32 (x, y) of every mask pixel
    boundary: torch.Tensor  # [B, 2] float32 (x, y) of mask pixels with a 4-neighbour outside mask or image

    def to(self, device) -> "MaskPixels":
        return MaskPixels(self.mask.to(device), self.pixels.to(device), self.boundary.to(device))


def _check_mask(mask) -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"silhouette_chamfer: mask must be a torch.Tensor or MaskPixels, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"silhouette_chamfer: mask must be bool, got {mask.dtype} (use mask > 0.5)")
    if mask.dim() != 2:
        raise ValueError(f"silhouette_chamfer: mask must have shape [H, W], got {list(mask.shape)}")
    if not bool(mask.any()):
        raise ValueError("silhouette_chamfer: the mask is empty (no foreground pixel), the chamfer is undefined")


def _xy(rows_cols: torch.Tensor) -> torch.Tensor:
    return rows_cols.flip(1).to(torch.float32).contiguous()


def prepare_mask(mask: torch.Tensor) -> MaskPixels:
    """Pixel list and boundary pixel list of mask [H, W] bool (on the mask's device)."""
    if isinstance(mask, MaskPixels):
        return mask
    _check_mask(mask)
    padded = F.pad(mask[None, None].to(torch.uint8), (1, 1, 1, 1))[0, 0].bool()  # outside the image = not mask
    interior = mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    boundary = mask & ~interior
    return MaskPixels(mask, _xy(torch.nonzero(mask)), _xy(torch.nonzero(boundary)))


def _check_points(points2d, check_finite: bool = True) -> None:
    if not isinstance(points2d, torch.Tensor):
        raise TypeError(f"silhouette_chamfer: points2d must be a torch.Tensor, got {type(points2d).__name__}")
    if points2d.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"silhouette_chamfer: points2d must be float32 or float64, got {points2d.dtype}")
    if points2d.dim() != 2 or points2d.shape[1] != 2:
        raise ValueError(f"silhouette_chamfer: points2d must have shape [P, 2], got {list(points2d.shape)}")
    if points2d.shape[0] == 0:
        raise ValueError("silhouette_chamfer: points2d is empty, the chamfer is undefined")
    if check_finite and not bool(torch.isfinite(points2d).all()):
        row = int(torch.nonzero(~torch.isfinite(points2d).all(dim=1))[0, 0])
        raise ValueError(f"silhouette_chamfer: points2d contain NaN or Inf (first at row {row})")


def _on_device(mask, device) -> MaskPixels:
    if not isinstance(mask, MaskPixels):
        _check_mask(mask)
        mask = mask.to(device)
    prepared = prepare_mask(mask)
    return prepared if prepared.pixels.device == device else prepared.to(device)


def _losses(points2d, nearest_pixel, pixels, nearest_point):
    """The two chamfer terms given the nearest mask pixel [P, 2] of every point and the nearest point
    index [M] of every mask pixel; differentiable with respect to points2d."""
    point_to_mask = ((points2d - nearest_pixel.to(points2d.dtype)) ** 2).sum(1).mean()
    mask_to_point = ((pixels.to(points2d.dtype) - points2d[nearest_point]) ** 2).sum(1).mean()
    return point_to_mask, mask_to_point


def silhouette_chamfer(points2d: torch.Tensor, mask, *, validate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Chamfer terms (point_to_mask, mask_to_point), two scalars, between points2d [P, 2] (pixels,
    float32/64) and mask [H, W] bool or a :class:`MaskPixels` from :func:`prepare_mask` (moved to the
    points' device if needed). Raises on an empty mask, empty or non-finite points; ``validate=False``
    skips the finiteness test (one device sync) for callers that have made it, e.g. once per batch."""
    _check_points(points2d, check_finite=validate)
    prepared = _on_device(mask, points2d.device)
    height, width = prepared.mask.shape
    with torch.no_grad():
        p = points2d.detach().to(torch.float32)
        lattice = torch.round(p)
        col, row = lattice[:, 0], lattice[:, 1]
        inside = (col >= 0) & (col <= width - 1) & (row >= 0) & (row <= height - 1)
        flat = (row.clamp(0, height - 1) * width + col.clamp(0, width - 1)).long()
        on_mask = inside & prepared.mask.reshape(-1)[flat]
        # p is finite (checked above or by the caller) and mask pixels are integer coordinates
        _, boundary_index = knn(prepared.boundary, 1, p, validate=False)
        nearest_pixel = torch.where(on_mask[:, None], lattice, prepared.boundary[boundary_index[:, 0]])
        _, point_index = knn(p, 1, prepared.pixels, validate=False)
    return _losses(points2d, nearest_pixel, prepared.pixels, point_index[:, 0])


def silhouette_chamfer_torch(points2d: torch.Tensor, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`silhouette_chamfer`: blocked brute force over every mask pixel."""
    _check_points(points2d)
    prepared = _on_device(mask, points2d.device)
    pixels = prepared.pixels.to(points2d.dtype)
    with torch.no_grad():
        p = points2d.detach()
        nearest_pixel = torch.empty_like(p)
        block = max(1, (1 << 24) // pixels.shape[0])
        for start in range(0, p.shape[0], block):
            d2 = ((p[start:start + block, None, :] - pixels[None]) ** 2).sum(-1)
            nearest_pixel[start:start + block] = pixels[d2.argmin(dim=1)]
        nearest_point = torch.empty(pixels.shape[0], dtype=torch.int64, device=p.device)
        block = max(1, (1 << 24) // p.shape[0])
        for start in range(0, pixels.shape[0], block):
            d2 = ((pixels[start:start + block, None, :] - p[None]) ** 2).sum(-1)
            nearest_point[start:start + block] = d2.argmin(dim=1)
    return _losses(points2d, nearest_pixel, pixels, nearest_point)
