"""Real spherical harmonics of degree 0–3 in the order and signs of 3D Gaussian Splatting.

A Gaussian's colour seen from direction ``d`` (unit vector from the camera centre to the Gaussian) is
``Σₖ shs[k]·basis(d)[k] + 0.5``, clamped at 0 per channel. The basis is the one 3DGS uses:
C0 for k = 0; −C1·y, +C1·z, −C1·x for k = 1..3; then the usual degree-2 and degree-3 terms.
"""
from __future__ import annotations

import torch

SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199
SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
SH_C3 = (
    -0.5900435899266435,
    2.890611442640554,
    -0.4570457994644658,
    0.3731763325901154,
    -0.4570457994644658,
    1.445305721320277,
    -0.5900435899266435,
)


def num_sh_coefficients(degree: int) -> int:
    return (degree + 1) ** 2


def sh_basis(dirs: torch.Tensor, degree: int) -> torch.Tensor:
    """Basis values for unit directions ``dirs`` [..., 3] -> [..., (degree+1)²]."""
    if not 0 <= degree <= 3:
        raise ValueError(f"sh_degree must be in 0..3, got {degree}")
    x, y, z = dirs.unbind(-1)
    terms = [torch.full_like(x, SH_C0)]
    if degree >= 1:
        terms += [-SH_C1 * y, SH_C1 * z, -SH_C1 * x]
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        xy, yz, xz = x * y, y * z, x * z
        terms += [
            SH_C2[0] * xy,
            SH_C2[1] * yz,
            SH_C2[2] * (2.0 * zz - xx - yy),
            SH_C2[3] * xz,
            SH_C2[4] * (xx - yy),
        ]
    if degree >= 3:
        terms += [
            SH_C3[0] * y * (3.0 * xx - yy),
            SH_C3[1] * xy * z,
            SH_C3[2] * y * (4.0 * zz - xx - yy),
            SH_C3[3] * z * (2.0 * zz - 3.0 * xx - 3.0 * yy),
            SH_C3[4] * x * (4.0 * zz - xx - yy),
            SH_C3[5] * z * (xx - yy),
            SH_C3[6] * x * (xx - 3.0 * yy),
        ]
    return torch.stack(terms, dim=-1)


def eval_sh(shs: torch.Tensor, dirs: torch.Tensor, degree: int) -> torch.Tensor:
    """Σₖ shs[..., k, :]·basis(dirs)[..., k] over the first (degree+1)² coefficients.

    shs [..., M, 3] with M >= (degree+1)², dirs [..., 3] unit vectors -> [..., 3]. No offset, no clamp.
    """
    count = num_sh_coefficients(degree)
    if shs.shape[-2] < count:
        raise ValueError(f"shs holds {shs.shape[-2]} coefficients per Gaussian; sh_degree {degree} needs {count}")
    basis = sh_basis(dirs, degree)
    return (basis.unsqueeze(-1) * shs[..., :count, :]).sum(dim=-2)


def sh_to_color(shs: torch.Tensor, means3d: torch.Tensor, campos: torch.Tensor, degree: int) -> torch.Tensor:
    """The 3DGS view-dependent colour: eval_sh(normalise(mean − campos)) + 0.5, clamped at 0.

    shs [N, M, 3], means3d [N, 3], campos [3] -> [N, 3]. The clamp passes no gradient to a clamped
    channel. A Gaussian sitting exactly at the camera centre gets direction 0 (it is culled anyway).
    """
    offsets = means3d - campos
    length = offsets.norm(dim=-1, keepdim=True)
    dirs = offsets / torch.where(length > 0, length, torch.ones_like(length))
    return (eval_sh(shs, dirs, degree) + 0.5).clamp(min=0.0)
