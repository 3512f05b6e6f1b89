"""Input validation and the result type shared by the rasterizer's PyTorch and CUDA paths.

Both ``rasterize_torch`` and ``rasterize_cuda`` call :func:`check_inputs` first, so bad input gets
the same clear ``ValueError`` / ``TypeError`` on every path (never a kernel fault or a silent wrong
image).
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional, Sequence

import torch

from .sh import num_sh_coefficients


class RasterOutput(NamedTuple):
    """What ``npg.rasterize`` returns.

    color [3, H, W]: Σ wᵢ·cᵢ + T·background; depth [1, H, W]: Σ wᵢ·zᵢ (view-space z, not normalised);
    alpha [1, H, W]: Σ wᵢ = 1 − T; radii [N] int32: screen radius in pixels, 0 = not rendered;
    means2d [N, 3]: the screen-space gradient sink — after backward, ``means2d.grad[:, :2]`` is
    dL/d(NDC x, y) of each projected centre through the blending step (column 2 stays 0).
    """

    color: torch.Tensor
    depth: torch.Tensor
    alpha: torch.Tensor
    radii: torch.Tensor
    means2d: torch.Tensor


class RasterInputs(NamedTuple):
    """Validated inputs: every tensor on ``device`` in ``dtype``; opacities always viewed as [N, 1]."""

    means3d: torch.Tensor  # [N, 3]
    opacities: torch.Tensor  # [N, 1]
    shs: Optional[torch.Tensor]  # [N, M, 3]
    colors: Optional[torch.Tensor]  # [N, 3]
    scales: Optional[torch.Tensor]  # [N, 3]
    rotations: Optional[torch.Tensor]  # [N, 4]
    cov3d: Optional[torch.Tensor]  # [N, 6]
    means2d: torch.Tensor  # [N, 3]
    background: torch.Tensor  # [3]
    sh_degree: int
    scale_modifier: float
    device: torch.device
    dtype: torch.dtype


def _check_shape(name: str, tensor: torch.Tensor, expected: Sequence[Optional[int]], layout: str) -> None:
    ok = tensor.dim() == len(expected) and all(e is None or s == e for s, e in zip(tensor.shape, expected))
    if not ok:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(tensor.shape)}")


def make_means2d(means3d: torch.Tensor, differentiable: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
    """A zero [N, 3] screen-space gradient sink; a leaf that requires grad when any input does."""
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in differentiable)
    return torch.zeros(means3d.shape[0], 3, dtype=means3d.dtype, device=means3d.device, requires_grad=needs_grad)


def check_inputs(
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
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.float64),
    check_finite: bool = True,
) -> RasterInputs:
    """Validate the arguments of ``rasterize`` and return them normalised as :class:`RasterInputs`.

    Raises ``ValueError`` naming the argument for a wrong shape, a missing or doubled choice
    (exactly one of shs / colors, and one of scales + rotations / cov3d), an sh_degree outside 0..3 or
    above what ``shs`` holds, a non-positive scale_modifier, or NaN / Inf values; ``TypeError`` for a
    non-tensor, a dtype outside ``dtypes`` or tensors of mixed dtypes; ``ValueError`` for tensors on
    different devices. N = 0 is valid (the render is the background). ``means2d`` defaults to a zero
    sink from :func:`make_means2d`. ``check_finite=False`` skips the NaN / Inf scan (one pass over
    every input and a host sync) for callers whose kernels detect non-finite values themselves.
    """
    from npg.camera import Camera

    if not isinstance(camera, Camera):
        raise TypeError(f"camera must be an npg.Camera, got {type(camera).__name__}")
    for name, value in (("means3d", means3d), ("opacities", opacities)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if (shs is None) == (colors is None):
        raise ValueError("pass exactly one of shs (with sh_degree) or colors")
    if cov3d is None and (scales is None or rotations is None):
        raise ValueError("pass scales and rotations together, or cov3d")
    if cov3d is not None and (scales is not None or rotations is not None):
        raise ValueError("pass either scales + rotations or cov3d, not both")
    if isinstance(sh_degree, bool) or not isinstance(sh_degree, numbers.Integral) or not 0 <= sh_degree <= 3:
        raise ValueError(f"sh_degree must be an int in 0..3, got {sh_degree!r}")
    sh_degree = int(sh_degree)
    scale_modifier = float(scale_modifier)
    if not math.isfinite(scale_modifier) or scale_modifier <= 0:
        raise ValueError(f"scale_modifier must be a positive finite number, got {scale_modifier}")

    n = means3d.shape[0] if means3d.dim() > 0 else -1
    tensors = {"means3d": means3d, "opacities": opacities, "shs": shs, "colors": colors, "scales": scales,
               "rotations": rotations, "cov3d": cov3d, "means2d": means2d}
    layouts = {
        "means3d": ((n, 3), "[N, 3]"),
        "shs": ((n, None, 3), "[N, M, 3]"),
        "colors": ((n, 3), "[N, 3]"),
        "scales": ((n, 3), "[N, 3]"),
        "rotations": ((n, 4), "[N, 4] (w, x, y, z)"),
        "cov3d": ((n, 6), "[N, 6] (xx, xy, xz, yy, yz, zz)"),
        "means2d": ((n, 3), "[N, 3]"),
    }
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if name == "opacities":
            if not (tensor.dim() == 1 and tensor.shape[0] == n) and not (tensor.dim() == 2 and tensor.shape == (n, 1)):
                raise ValueError(f"opacities must have shape [N] or [N, 1] with N = {n}, got {tuple(tensor.shape)}")
        else:
            _check_shape(name, tensor, *layouts[name])

    device, dtype = means3d.device, means3d.dtype
    if dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"means3d has dtype {str(dtype).replace('torch.', '')}; this path takes {allowed}")
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device} but means3d is on {device}: put every input on one device")
        if tensor.dtype != dtype:
            raise TypeError(f"{name} has dtype {tensor.dtype} but means3d has {dtype}: use one floating dtype")

    if shs is not None and shs.shape[1] < num_sh_coefficients(sh_degree):
        raise ValueError(
            f"shs holds {shs.shape[1]} coefficients per Gaussian but sh_degree {sh_degree} needs "
            f"{num_sh_coefficients(sh_degree)}"
        )

    if background is None:
        background = torch.zeros(3, dtype=dtype, device=device)
    elif isinstance(background, torch.Tensor):
        if background.device != device:
            raise ValueError(f"background is on {background.device} but means3d is on {device}")
        if background.shape != (3,):
            raise ValueError(f"background must have shape [3], got {tuple(background.shape)}")
        background = background.to(dtype)
    else:
        values = [float(v) for v in background]
        if len(values) != 3:
            raise ValueError(f"background must hold 3 values, got {len(values)}")
        background = torch.tensor(values, dtype=dtype, device=device)
    tensors["background"] = background

    # One host sync for all finiteness tests rather than one per argument.
    named = [(name, t) for name, t in tensors.items() if t is not None and t.numel() > 0]
    if check_finite and named:
        finite = torch.stack([torch.isfinite(t.detach()).all() for _, t in named]).tolist()
        bad = [name for (name, _), ok in zip(named, finite) if not ok]
        if bad:
            raise ValueError(f"{', '.join(bad)} contain{'s' if len(bad) == 1 else ''} NaN or Inf")

    if means2d is None:
        means2d = make_means2d(means3d, (means3d, opacities, shs, colors, scales, rotations, cov3d))
    return RasterInputs(
        means3d=means3d,
        opacities=opacities.reshape(n, 1),
        shs=shs,
        colors=colors,
        scales=scales,
        rotations=rotations,
        cov3d=cov3d,
        means2d=means2d,
        background=background,
        sh_degree=sh_degree,
        scale_modifier=scale_modifier,
        device=device,
        dtype=dtype,
    )
