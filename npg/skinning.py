"""Fused NPG skinning: Gaussians driven by the deformed stage-1 points.

Each Gaussian g has J neighbour points (``neighbor_idx[g]``), blend logits, an anchor triangle
(``anchors[g]`` = a, b, c) and a local quaternion. Its world position and orientation are

    means[g]     = Σⱼ softmax(logits[g])ⱼ · points[neighbor_idx[g, j]]
    rotations[g] = unit quaternion (w, x, y, z) of  R_frame · R(normalize(quats[g]))
    R_frame      = [e1 e2 n],  e1 = normalize(b − a),  n = normalize((b − a) × (c − a)),  e2 = n × e1

The rotations are unit quaternions, ready for the rasterizer (which uses them as given). Their sign
is the one of Shepperd's method on R_frame (the largest of |w|, |x|, |y|, |z| of the frame quaternion
is made positive), composed with q; q and −q describe the same rotation.

Degenerate anchor triangles: when |u×v|² < max(1e-10·|u|²·|v|², 1e-30) with u = b − a, v = c − a
(the angle at a is below ~1e-5 rad, or the points coincide), the frame is the identity, so the
rotation is normalize(q), and no gradient flows from the frame to the triangle's points. Outputs and
gradients stay finite there.

Gradients flow to ``points`` (scatter-add over neighbours and anchor corners), ``logits`` and
``quats``. CUDA tensors run the fused Triton kernels of ``npg.kernels.skinning``; CPU tensors run the
PyTorch reference ``skin_torch`` (``backend="triton"`` forces the kernels, e.g. under
TRITON_INTERPRET=1).
"""
from __future__ import annotations

import torch

from npg._ext import triton_backend

SIN_EPS2 = 1e-10
AREA_EPS2 = 1e-30
MAX_NEIGHBOURS = 32
_FLOATS = (torch.float32, torch.float64)
_INDICES = (torch.int32, torch.int64)


def skin(points, neighbor_idx, logits, anchors, quats, *, backend: str = "auto", validate: bool = True):
    """Blend neighbour positions and compose local rotations with anchor-triangle frames.

    Args:
        points: [P, 3] float32/float64, live stage-1 points.
        neighbor_idx: [G, J] int32/int64 indices into points, 1 ≤ J ≤ 32 (NPG uses 20).
        logits: [G, J] blend logits (same dtype as points). −inf masks a neighbour out.
        anchors: [G, 3] int32/int64 indices (a, b, c) of the anchor triangle.
        quats: [G, 4] local rotations (w, x, y, z), any non-zero norm.
        backend: "auto" (CUDA → Triton, CPU → torch), "triton" or "torch".
        validate: check that every result is finite and raise a ValueError naming the bad input
            otherwise; costs one device→host synchronisation. With False, rows with bad input
            (out-of-range index, NaN/Inf, zero quaternion) come out as NaN instead.

    Returns:
        means [G, 3] and rotations [G, 4] (unit quaternions), same dtype as points.
    """
    _check_inputs(points, neighbor_idx, logits, anchors, quats)
    if triton_backend("skin", points, backend) == "torch":
        return skin_torch(points, neighbor_idx, logits, anchors, quats, validate=validate)
    args = [t.contiguous() for t in (points, neighbor_idx, logits, anchors, quats)]
    return _SkinTriton.apply(*args, validate)


def skin_torch(points, neighbor_idx, logits, anchors, quats, *, validate: bool = True):
    """PyTorch reference of ``skin`` (same signature, same results, differentiable by autograd)."""
    _check_inputs(points, neighbor_idx, logits, anchors, quats)
    _check_index_range(points, neighbor_idx, anchors)
    weights = torch.softmax(logits, dim=1)
    means = torch.einsum("gj,gjc->gc", weights, points[neighbor_idx])
    corners = points[anchors]
    frame_quat = _matrix_to_quat_raw(_anchor_frame(corners[:, 0], corners[:, 1], corners[:, 2]))
    rotations = _quat_mul(frame_quat, quats)
    rotations = rotations / rotations.norm(dim=1, keepdim=True)
    if validate and not bool(torch.isfinite(means).all() & torch.isfinite(rotations).all()):
        _raise_bad_values(points, neighbor_idx, logits, anchors, quats)
    return means, rotations


# ------------------------------------------------------------------------------------------------
# reference math (same formulas as the kernels, evaluated in the same order)
# ------------------------------------------------------------------------------------------------


def _anchor_frame(a, b, c):
    """[G, 3, 3] frames with columns e1, e2, n; the identity for degenerate triangles."""
    u = b - a
    v = c - a
    m = torch.linalg.cross(u, v)
    uu = (u * u).sum(1)
    vv = (v * v).sum(1)
    mm = (m * m).sum(1)
    degenerate = mm < torch.clamp(SIN_EPS2 * uu * vv, min=AREA_EPS2)
    one = torch.ones_like(uu)
    # safe denominators keep the unused branch of torch.where free of inf/NaN gradients
    e1 = u / torch.sqrt(torch.where(degenerate, one, uu))[:, None]
    n = m / torch.sqrt(torch.where(degenerate, one, mm))[:, None]
    eye = torch.eye(3, dtype=a.dtype, device=a.device)
    e1 = torch.where(degenerate[:, None], eye[0], e1)
    n = torch.where(degenerate[:, None], eye[2], n)
    e2 = torch.linalg.cross(n, e1)
    return torch.stack([e1, e2, n], dim=2)


def _matrix_to_quat_raw(R):
    """Row of Shepperd's symmetric 4×4 matrix K(R) with the largest diagonal: a positive multiple of
    the quaternion of R, without square roots. Ties go to the first row, as in the kernel."""
    r00, r01, r02 = R[:, 0, 0], R[:, 0, 1], R[:, 0, 2]
    r10, r11, r12 = R[:, 1, 0], R[:, 1, 1], R[:, 1, 2]
    r20, r21, r22 = R[:, 2, 0], R[:, 2, 1], R[:, 2, 2]
    k00 = 1.0 + r00 + r11 + r22
    k11 = 1.0 + r00 - r11 - r22
    k22 = 1.0 - r00 + r11 - r22
    k33 = 1.0 - r00 - r11 + r22
    a1, a2, a3 = r21 - r12, r02 - r20, r10 - r01
    s12, s13, s23 = r01 + r10, r02 + r20, r12 + r21
    K = torch.stack([
        torch.stack([k00, a1, a2, a3], 1),
        torch.stack([a1, k11, s12, s13], 1),
        torch.stack([a2, s12, k22, s23], 1),
        torch.stack([a3, s13, s23, k33], 1),
    ], 1)
    branch = torch.stack([k00, k11, k22, k33], 1).argmax(1)
    return K[torch.arange(len(R), device=R.device), branch]


def _quat_mul(f, q):
    fw, fx, fy, fz = f.unbind(1)
    qw, qx, qy, qz = q.unbind(1)
    return torch.stack([
        fw * qw - fx * qx - fy * qy - fz * qz,
        fw * qx + fx * qw + fy * qz - fz * qy,
        fw * qy - fx * qz + fy * qw + fz * qx,
        fw * qz + fx * qy - fy * qx + fz * qw,
    ], 1)


# ------------------------------------------------------------------------------------------------
# Triton path
# ------------------------------------------------------------------------------------------------


class _SkinTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, points, neighbor_idx, logits, anchors, quats, validate):
        from npg.kernels import skinning as kernels

        padded = kernels.pad_points(points)
        means, rotations, flag = kernels.skin_forward(padded, neighbor_idx, logits, anchors, quats,
                                                      SIN_EPS2, AREA_EPS2)
        if validate and bool(flag.item()):
            _raise_bad_values(points, neighbor_idx, logits, anchors, quats)
        ctx.save_for_backward(padded, neighbor_idx, logits, anchors, quats)
        return means, rotations

    @staticmethod
    def backward(ctx, grad_means, grad_rotations):
        from npg.kernels import skinning as kernels

        points, neighbor_idx, logits, anchors, quats = ctx.saved_tensors
        need_points, _, need_logits, _, need_quats, _ = ctx.needs_input_grad
        grad_points, grad_logits, grad_quats = kernels.skin_backward(
            points, neighbor_idx, logits, anchors, quats, grad_means.contiguous(), grad_rotations.contiguous(),
            SIN_EPS2, AREA_EPS2, need_points, need_logits, need_quats)
        return grad_points, None, grad_logits, None, grad_quats, None


# ------------------------------------------------------------------------------------------------
# input checks
# ------------------------------------------------------------------------------------------------


def _check_inputs(points, neighbor_idx, logits, anchors, quats):
    named = {"points": points, "neighbor_idx": neighbor_idx, "logits": logits, "anchors": anchors, "quats": quats}
    for name, value in named.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"skin: {name} must be a torch.Tensor, got {type(value).__name__}")
    if points.dim() != 2 or points.shape[1] != 3:
        raise ValueError(f"skin: points must have shape [P, 3], got {list(points.shape)}")
    if points.dtype not in _FLOATS:
        raise ValueError(f"skin: points must be float32 or float64, got {points.dtype}")
    if neighbor_idx.dim() != 2:
        raise ValueError(f"skin: neighbor_idx must have shape [G, J], got {list(neighbor_idx.shape)}")
    G, J = neighbor_idx.shape
    if not 1 <= J <= MAX_NEIGHBOURS:
        raise ValueError(f"skin: the neighbour count J must be in [1, {MAX_NEIGHBOURS}], got {J}")
    expected = {"logits": (G, J), "anchors": (G, 3), "quats": (G, 4)}
    for name, shape in expected.items():
        if tuple(named[name].shape) != shape:
            raise ValueError(f"skin: {name} must have shape {list(shape)} (G={G}, J={J} from neighbor_idx), "
                             f"got {list(named[name].shape)}")
    for name in ("neighbor_idx", "anchors"):
        if named[name].dtype not in _INDICES:
            raise ValueError(f"skin: {name} must be int32 or int64, got {named[name].dtype}")
    for name in ("logits", "quats"):
        if named[name].dtype != points.dtype:
            raise ValueError(f"skin: {name} must have the dtype of points ({points.dtype}), got {named[name].dtype}")
    for name, value in named.items():
        if value.device != points.device:
            raise ValueError(f"skin: all inputs must be on one device; points is on {points.device}, "
                             f"{name} on {value.device}")
    if G > 0 and points.shape[0] == 0:
        raise ValueError("skin: points is empty but neighbor_idx/anchors refer to it")


def _check_index_range(points, neighbor_idx, anchors):
    P = points.shape[0]
    for name, index in (("neighbor_idx", neighbor_idx), ("anchors", anchors)):
        if index.numel() and bool(((index < 0) | (index >= P)).any()):
            bad = index[(index < 0) | (index >= P)][0].item()
            raise ValueError(f"skin: {name} holds index {bad}, outside [0, {P}) (P = number of points)")


def _raise_bad_values(points, neighbor_idx, logits, anchors, quats):
    """Called when some result is not finite: find the input that caused it and say so."""
    _check_index_range(points, neighbor_idx, anchors)
    used = torch.zeros(points.shape[0], dtype=torch.bool, device=points.device)
    used[neighbor_idx.reshape(-1).long()] = True
    used[anchors.reshape(-1).long()] = True
    if not bool(torch.isfinite(points[used]).all()):
        raise ValueError("skin: points referenced by neighbor_idx/anchors contain NaN or Inf")
    if bool((torch.isnan(logits) | (logits == float("inf"))).any()):
        raise ValueError("skin: logits contain NaN or +Inf")
    if bool((logits == float("-inf")).all(dim=1).any()):
        raise ValueError("skin: a row of logits is entirely -Inf (no neighbour left to blend)")
    if not bool(torch.isfinite(quats).all()):
        raise ValueError("skin: quats contain NaN or Inf")
    if bool((quats.abs().amax(dim=1) < 1e-18).any()):
        raise ValueError("skin: quats contain a zero (or near-zero, |q| < 1e-18) quaternion")
    raise ValueError("skin: the result is not finite although every input is; coordinates or quaternions "
                     "are too large for the dtype")
