"""Triton kernels of the fused NPG skinning (public op: ``npg.skinning.skin``).

One program handles BLOCK_G Gaussians. Per Gaussian it gathers its J neighbour points, blends them with
softmax(logits), builds the orthonormal frame of its anchor triangle, turns the frame into an
(unnormalised) quaternion and composes it with the local quaternion. The backward recomputes all of
that from the saved inputs (nothing but the inputs is kept between the passes) and scatters the
points gradient with atomics. Points are read from a [P, 4] copy padded to 16 bytes per point: the
gathers (20 neighbours and 3 anchor corners per Gaussian) are the kernel's bottleneck, and one
16-byte load per point issues a third of the L1 requests of three 4-byte loads. Forward math lives in small device functions with their hand-written
VJPs next to them. Kernels compute in the dtype of the inputs (float32, or float64 for tests).

Invalid input never leads to an out-of-bounds access: out-of-range indices are masked, and every
Gaussian whose result is not finite (bad index, NaN/Inf input, zero quaternion) raises bit 0 of
``flag`` so the host can raise a clear error after one synchronisation.
"""
import torch
import triton
import triton.language as tl

# Block shape from the H100 sweep (benchmarks/bench_skinning.py --sweep, kernels replayed from CUDA
# graphs): 32 Gaussians and one warp per program was fastest at both G = 100k and 1M (forward 0.022 and
# 0.191 ms, against 0.025 and 0.215 ms with two warps).
DEFAULT_BLOCK_G = 32
DEFAULT_NUM_WARPS = 1


# ----------------------------------------------------------------------------------------------
# device functions: forward math and its VJP side by side
# ----------------------------------------------------------------------------------------------


@triton.jit
def _cross(ax, ay, az, bx, by, bz):
    return ay * bz - az * by, az * bx - ax * bz, ax * by - ay * bx


@triton.jit
def _is_finite(x):
    return (x == x) & (tl.abs(x) < float("inf"))


@triton.jit
def _anchor_frame(ax, ay, az, bx, by, bz, cx, cy, cz, sin_eps2, area_eps2):
    """Frame [e1 e2 n] of triangle (a, b, c); the identity where the triangle is degenerate.

    Degenerate means |u×v|² < max(sin_eps2·|u|²·|v|², area_eps2) with u = b−a, v = c−a (collinear,
    coincident or vanishing). Also returns u, v, 1/|u|, 1/|u×v| for the VJP.
    """
    ux = bx - ax
    uy = by - ay
    uz = bz - az
    vx = cx - ax
    vy = cy - ay
    vz = cz - az
    mx, my, mz = _cross(ux, uy, uz, vx, vy, vz)
    uu = ux * ux + uy * uy + uz * uz
    vv = vx * vx + vy * vy + vz * vz
    mm = mx * mx + my * my + mz * mz
    degenerate = mm < tl.maximum(sin_eps2 * uu * vv, area_eps2)
    inv_u = 1.0 / tl.sqrt(tl.where(degenerate, 1.0, uu))
    inv_m = 1.0 / tl.sqrt(tl.where(degenerate, 1.0, mm))
    e1x = tl.where(degenerate, 1.0, ux * inv_u)
    e1y = tl.where(degenerate, 0.0, uy * inv_u)
    e1z = tl.where(degenerate, 0.0, uz * inv_u)
    nx = tl.where(degenerate, 0.0, mx * inv_m)
    ny = tl.where(degenerate, 0.0, my * inv_m)
    nz = tl.where(degenerate, 1.0, mz * inv_m)
    e2x, e2y, e2z = _cross(nx, ny, nz, e1x, e1y, e1z)
    return (e1x, e1y, e1z, e2x, e2y, e2z, nx, ny, nz, degenerate,
            ux, uy, uz, vx, vy, vz, inv_u, inv_m)


@triton.jit
def _anchor_frame_vjp(e1x, e1y, e1z, nx, ny, nz, ux, uy, uz, vx, vy, vz, inv_u, inv_m,
                      g_e1x, g_e1y, g_e1z, g_e2x, g_e2y, g_e2z, g_nx, g_ny, g_nz):
    """Gradients w.r.t. u = b−a and v = c−a from gradients w.r.t. the frame columns e1, e2, n."""
    # e2 = n × e1
    cx, cy, cz = _cross(e1x, e1y, e1z, g_e2x, g_e2y, g_e2z)
    g_nx += cx
    g_ny += cy
    g_nz += cz
    cx, cy, cz = _cross(g_e2x, g_e2y, g_e2z, nx, ny, nz)
    g_e1x += cx
    g_e1y += cy
    g_e1z += cz
    # n = m / |m|
    n_dot = nx * g_nx + ny * g_ny + nz * g_nz
    g_mx = (g_nx - nx * n_dot) * inv_m
    g_my = (g_ny - ny * n_dot) * inv_m
    g_mz = (g_nz - nz * n_dot) * inv_m
    # m = u × v
    g_ux, g_uy, g_uz = _cross(vx, vy, vz, g_mx, g_my, g_mz)
    g_vx, g_vy, g_vz = _cross(g_mx, g_my, g_mz, ux, uy, uz)
    # e1 = u / |u|
    e1_dot = e1x * g_e1x + e1y * g_e1y + e1z * g_e1z
    g_ux += (g_e1x - e1x * e1_dot) * inv_u
    g_uy += (g_e1y - e1y * e1_dot) * inv_u
    g_uz += (g_e1z - e1z * e1_dot) * inv_u
    return g_ux, g_uy, g_uz, g_vx, g_vy, g_vz


@triton.jit
def _matrix_quat_rows(r00, r01, r02, r10, r11, r12, r20, r21, r22):
    """Diagonal (k00..k33) and off-diagonal entries of the symmetric 4×4 matrix K(R) whose row b
    is 4·q_b·q for the unit quaternion q of R (Shepperd): rows are (w, x, y, z)."""
    k00 = 1.0 + r00 + r11 + r22
    k11 = 1.0 + r00 - r11 - r22
    k22 = 1.0 - r00 + r11 - r22
    k33 = 1.0 - r00 - r11 + r22
    a1 = r21 - r12
    a2 = r02 - r20
    a3 = r10 - r01
    s12 = r01 + r10
    s13 = r02 + r20
    s23 = r12 + r21
    return k00, k11, k22, k33, a1, a2, a3, s12, s13, s23


@triton.jit
def _shepperd_branch(k00, k11, k22, k33):
    """Row of K with the largest diagonal (first on ties, like torch.argmax): b0 | b1 | b2 | else."""
    b0 = (k00 >= k11) & (k00 >= k22) & (k00 >= k33)
    b1 = (~b0) & (k11 >= k22) & (k11 >= k33)
    b2 = (~b0) & (~b1) & (k22 >= k33)
    return b0, b1, b2


@triton.jit
def _matrix_to_quat_raw(r00, r01, r02, r10, r11, r12, r20, r21, r22):
    """A positive multiple (between 2 and 4 for a rotation) of the unit quaternion of R, branch-free of
    square roots: the row of K with the largest diagonal."""
    k00, k11, k22, k33, a1, a2, a3, s12, s13, s23 = _matrix_quat_rows(r00, r01, r02, r10, r11, r12, r20, r21, r22)
    b0, b1, b2 = _shepperd_branch(k00, k11, k22, k33)
    fw = tl.where(b0, k00, tl.where(b1, a1, tl.where(b2, a2, a3)))
    fx = tl.where(b0, a1, tl.where(b1, k11, tl.where(b2, s12, s13)))
    fy = tl.where(b0, a2, tl.where(b1, s12, tl.where(b2, k22, s23)))
    fz = tl.where(b0, a3, tl.where(b1, s13, tl.where(b2, s23, k33)))
    return fw, fx, fy, fz


@triton.jit
def _matrix_to_quat_raw_vjp(r00, r01, r02, r10, r11, r12, r20, r21, r22, g_fw, g_fx, g_fy, g_fz):
    """Gradients w.r.t. the nine entries of R (returned row-major) of the selected row of K."""
    k00, k11, k22, k33, a1, a2, a3, s12, s13, s23 = _matrix_quat_rows(r00, r01, r02, r10, r11, r12, r20, r21, r22)
    b0, b1, b2 = _shepperd_branch(k00, k11, k22, k33)
    b3 = (~b0) & (~b1) & (~b2)
    g_k00 = tl.where(b0, g_fw, 0.0)
    g_k11 = tl.where(b1, g_fx, 0.0)
    g_k22 = tl.where(b2, g_fy, 0.0)
    g_k33 = tl.where(b3, g_fz, 0.0)
    g_a1 = tl.where(b0, g_fx, tl.where(b1, g_fw, 0.0))
    g_a2 = tl.where(b0, g_fy, tl.where(b2, g_fw, 0.0))
    g_a3 = tl.where(b0, g_fz, tl.where(b3, g_fw, 0.0))
    g_s12 = tl.where(b1, g_fy, tl.where(b2, g_fx, 0.0))
    g_s13 = tl.where(b1, g_fz, tl.where(b3, g_fx, 0.0))
    g_s23 = tl.where(b2, g_fz, tl.where(b3, g_fy, 0.0))
    g_r00 = g_k00 + g_k11 - g_k22 - g_k33
    g_r11 = g_k00 - g_k11 + g_k22 - g_k33
    g_r22 = g_k00 - g_k11 - g_k22 + g_k33
    g_r01 = g_s12 - g_a3
    g_r10 = g_s12 + g_a3
    g_r02 = g_s13 + g_a2
    g_r20 = g_s13 - g_a2
    g_r12 = g_s23 - g_a1
    g_r21 = g_s23 + g_a1
    return g_r00, g_r01, g_r02, g_r10, g_r11, g_r12, g_r20, g_r21, g_r22


@triton.jit
def _quat_mul(fw, fx, fy, fz, qw, qx, qy, qz):
    """Hamilton product f ⊗ q, (w, x, y, z): R(f ⊗ q) = R(f)·R(q)."""
    rw = fw * qw - fx * qx - fy * qy - fz * qz
    rx = fw * qx + fx * qw + fy * qz - fz * qy
    ry = fw * qy - fx * qz + fy * qw + fz * qx
    rz = fw * qz + fx * qy - fy * qx + fz * qw
    return rw, rx, ry, rz


@triton.jit
def _quat_mul_vjp(fw, fx, fy, fz, qw, qx, qy, qz, gw, gx, gy, gz):
    g_fw = qw * gw + qx * gx + qy * gy + qz * gz
    g_fx = -qx * gw + qw * gx - qz * gy + qy * gz
    g_fy = -qy * gw + qz * gx + qw * gy - qx * gz
    g_fz = -qz * gw - qy * gx + qx * gy + qw * gz
    g_qw = fw * gw + fx * gx + fy * gy + fz * gz
    g_qx = -fx * gw + fw * gx + fz * gy - fy * gz
    g_qy = -fy * gw - fz * gx + fw * gy + fx * gz
    g_qz = -fz * gw + fy * gx - fx * gy + fw * gz
    return g_fw, g_fx, g_fy, g_fz, g_qw, g_qx, g_qy, g_qz


@triton.jit
def _normalize4_vjp(uw, ux, uy, uz, inv_norm, gw, gx, gy, gz):
    """Gradient w.r.t. r of u = r/|r| (given u and 1/|r|)."""
    dot = uw * gw + ux * gx + uy * gy + uz * gz
    return ((gw - uw * dot) * inv_norm, (gx - ux * dot) * inv_norm,
            (gy - uy * dot) * inv_norm, (gz - uz * dot) * inv_norm)


# ----------------------------------------------------------------------------------------------
# loads shared by both passes
# ----------------------------------------------------------------------------------------------


@triton.jit
def _xyz(v):
    """x, y, z of a [..., 4] tensor of padded points (one 16-byte load per point, split in registers)."""
    xz, yw = tl.split(tl.reshape(v, v.shape[:-1] + [2, 2]))
    x, z = tl.split(xz)
    y, w = tl.split(yw)
    return x, y, z


@triton.jit
def _load_chunk(points_ptr, idx_ptr, logits_ptr, g, live, P, J: tl.constexpr, J0: tl.constexpr, BLOCK: tl.constexpr):
    """Neighbours J0 .. J0+BLOCK−1 (those < J) of BLOCK_G Gaussians: logits (−inf outside the chunk),
    coordinates and indices [BLOCK_G, BLOCK], the pair mask and a per-Gaussian 'some index is out of
    range' mask. points_ptr is [P, 4] (padded)."""
    j = J0 + tl.arange(0, BLOCK)
    pair = live[:, None] & (j < J)[None, :]
    offs = g[:, None] * J + j[None, :]
    idx = tl.load(idx_ptr + offs, mask=pair, other=0)
    idx_ok = (idx >= 0) & (idx < P)
    bad_idx = tl.max((pair & ~idx_ok).to(tl.int32), axis=1) > 0
    use = pair & idx_ok
    logit = tl.load(logits_ptr + offs, mask=pair, other=0.0)
    logit = tl.where((j < J)[None, :], logit, float("-inf"))
    c = tl.arange(0, 4)
    p = tl.load(points_ptr + idx[:, :, None] * 4 + c[None, None, :], mask=use[:, :, None], other=0.0)
    px, py, pz = _xyz(p)
    return logit, px, py, pz, idx, pair, bad_idx


@triton.jit
def _blend(points_ptr, idx_ptr, logits_ptr, g, live, P, J: tl.constexpr,
           HEAD: tl.constexpr, TAIL: tl.constexpr):
    """Softmax blend over the J neighbours, loaded as a head chunk of HEAD (a power of two <= J, or 2)
    and a tail chunk of TAIL (0: none) instead of one block padded to the next power of two: for
    J = 20 that is 16 + 4 slots instead of 32, fewer registers and masked lanes per Gaussian.

    Returns the blended mean (mx, my, mz), a 'bad index' mask and, per chunk, weights, px, py, pz,
    idx, pair for the backward pass (the tail's repeat the head's when there is no tail)."""
    lh, hx, hy, hz, ih, pair_h, bad = _load_chunk(points_ptr, idx_ptr, logits_ptr, g, live, P, J, 0, HEAD)
    top = tl.max(lh, axis=1)
    if TAIL > 0:
        lt, tx, ty, tz, it, pair_t, bad_t = _load_chunk(points_ptr, idx_ptr, logits_ptr, g, live, P, J, HEAD, TAIL)
        top = tl.maximum(top, tl.max(lt, axis=1))
        bad = bad | bad_t
    eh = tl.exp(lh - top[:, None])
    total = tl.sum(eh, axis=1)
    if TAIL > 0:
        et = tl.exp(lt - top[:, None])
        total += tl.sum(et, axis=1)
    wh = eh / total[:, None]
    mx = tl.sum(wh * hx, axis=1)
    my = tl.sum(wh * hy, axis=1)
    mz = tl.sum(wh * hz, axis=1)
    if TAIL > 0:
        wt = et / total[:, None]
        mx += tl.sum(wt * tx, axis=1)
        my += tl.sum(wt * ty, axis=1)
        mz += tl.sum(wt * tz, axis=1)
    else:
        wt, tx, ty, tz, it, pair_t = wh, hx, hy, hz, ih, pair_h
    return mx, my, mz, bad, wh, hx, hy, hz, ih, pair_h, wt, tx, ty, tz, it, pair_t


@triton.jit
def _blend_vjp_chunk(w, px, py, pz, idx, pair, gmx, gmy, gmz, dot, grad_points_ptr, grad_logits_ptr, g,
                     J: tl.constexpr, J0: tl.constexpr, BLOCK: tl.constexpr,
                     NEED_POINTS: tl.constexpr, NEED_LOGITS: tl.constexpr):
    """Gradients of one chunk: logits (stored) and points (atomics), given dot = Σⱼ wⱼ·(g_mean·pⱼ)."""
    if NEED_LOGITS:
        g_w = gmx[:, None] * px + gmy[:, None] * py + gmz[:, None] * pz
        j = J0 + tl.arange(0, BLOCK)
        tl.store(grad_logits_ptr + g[:, None] * J + j[None, :], w * (g_w - dot[:, None]), mask=pair)
    if NEED_POINTS:
        tl.atomic_add(grad_points_ptr + idx * 3 + 0, w * gmx[:, None], mask=pair, sem="relaxed")
        tl.atomic_add(grad_points_ptr + idx * 3 + 1, w * gmy[:, None], mask=pair, sem="relaxed")
        tl.atomic_add(grad_points_ptr + idx * 3 + 2, w * gmz[:, None], mask=pair, sem="relaxed")


@triton.jit
def _chunk_dot(w, px, py, pz, gmx, gmy, gmz):
    return tl.sum(w * (gmx[:, None] * px + gmy[:, None] * py + gmz[:, None] * pz), axis=1)


@triton.jit
def _load_anchor(points_ptr, anchors_ptr, g, live, P, corner: tl.constexpr):
    index = tl.load(anchors_ptr + g * 3 + corner, mask=live, other=0)
    ok = (index >= 0) & (index < P)
    use = live & ok
    c = tl.arange(0, 4)
    x, y, z = _xyz(tl.load(points_ptr + index[:, None] * 4 + c[None, :], mask=use[:, None], other=0.0))
    return x, y, z, index, live & ~ok


@triton.jit
def _load_frame(points_ptr, anchors_ptr, g, live, P, sin_eps2, area_eps2):
    ax, ay, az, ia, bad_a = _load_anchor(points_ptr, anchors_ptr, g, live, P, 0)
    bx, by, bz, ib, bad_b = _load_anchor(points_ptr, anchors_ptr, g, live, P, 1)
    cx, cy, cz, ic, bad_c = _load_anchor(points_ptr, anchors_ptr, g, live, P, 2)
    (e1x, e1y, e1z, e2x, e2y, e2z, nx, ny, nz, degenerate,
     ux, uy, uz, vx, vy, vz, inv_u, inv_m) = _anchor_frame(ax, ay, az, bx, by, bz, cx, cy, cz, sin_eps2, area_eps2)
    return (e1x, e1y, e1z, e2x, e2y, e2z, nx, ny, nz, degenerate, ux, uy, uz, vx, vy, vz, inv_u, inv_m,
            ia, ib, ic, bad_a | bad_b | bad_c)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def skin_forward_kernel(
    points_ptr,      # [P, 4] (x, y, z, padding)
    idx_ptr,         # [G, J] int32/int64
    logits_ptr,      # [G, J]
    anchors_ptr,     # [G, 3] int32/int64
    quats_ptr,       # [G, 4] (w, x, y, z), any norm > 0
    means_ptr,       # [G, 3] out
    rotations_ptr,   # [G, 4] out, unit
    flag_ptr,        # [1] int32, set to 1 when some Gaussian's result is not finite
    G, P, sin_eps2, area_eps2,
    J: tl.constexpr, HEAD: tl.constexpr, TAIL: tl.constexpr, BLOCK_G: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    live = g < G

    mx, my, mz, bad_idx, wh, hx, hy, hz, ih, pair_h, wt, tx, ty, tz, it, pair_t = _blend(
        points_ptr, idx_ptr, logits_ptr, g, live, P, J, HEAD, TAIL)

    (e1x, e1y, e1z, e2x, e2y, e2z, nx, ny, nz, degenerate, ux, uy, uz, vx, vy, vz, inv_u, inv_m,
     ia, ib, ic, bad_anchor) = _load_frame(points_ptr, anchors_ptr, g, live, P, sin_eps2, area_eps2)
    fw, fx, fy, fz = _matrix_to_quat_raw(e1x, e2x, nx, e1y, e2y, ny, e1z, e2z, nz)
    qw = tl.load(quats_ptr + g * 4 + 0, mask=live, other=1.0)
    qx = tl.load(quats_ptr + g * 4 + 1, mask=live, other=0.0)
    qy = tl.load(quats_ptr + g * 4 + 2, mask=live, other=0.0)
    qz = tl.load(quats_ptr + g * 4 + 3, mask=live, other=0.0)
    rw, rx, ry, rz = _quat_mul(fw, fx, fy, fz, qw, qx, qy, qz)
    # a zero quaternion gives 0·inf = NaN here, which the flag reports
    inv_norm = 1.0 / tl.sqrt(rw * rw + rx * rx + ry * ry + rz * rz)
    rw *= inv_norm
    rx *= inv_norm
    ry *= inv_norm
    rz *= inv_norm

    bad_index = bad_idx | bad_anchor
    mx = tl.where(bad_index, float("nan"), mx)
    rw = tl.where(bad_index, float("nan"), rw)
    finite = (_is_finite(mx) & _is_finite(my) & _is_finite(mz) & _is_finite(rw) & _is_finite(rx)
              & _is_finite(ry) & _is_finite(rz))
    tl.atomic_max(flag_ptr + tl.zeros([BLOCK_G], dtype=tl.int32), 1, mask=live & ~finite, sem="relaxed")

    tl.store(means_ptr + g * 3 + 0, mx, mask=live)
    tl.store(means_ptr + g * 3 + 1, my, mask=live)
    tl.store(means_ptr + g * 3 + 2, mz, mask=live)
    tl.store(rotations_ptr + g * 4 + 0, rw, mask=live)
    tl.store(rotations_ptr + g * 4 + 1, rx, mask=live)
    tl.store(rotations_ptr + g * 4 + 2, ry, mask=live)
    tl.store(rotations_ptr + g * 4 + 3, rz, mask=live)


@triton.jit
def skin_backward_kernel(
    points_ptr,        # [P, 4] (x, y, z, padding)
    idx_ptr,           # [G, J]
    logits_ptr,        # [G, J]
    anchors_ptr,       # [G, 3]
    quats_ptr,         # [G, 4]
    grad_means_ptr,    # [G, 3]
    grad_rot_ptr,      # [G, 4]
    grad_points_ptr,   # [P, 3] accumulated with atomics (zero-initialised by the host)
    grad_logits_ptr,   # [G, J] out
    grad_quats_ptr,    # [G, 4] out
    G, P, sin_eps2, area_eps2,
    J: tl.constexpr, HEAD: tl.constexpr, TAIL: tl.constexpr, BLOCK_G: tl.constexpr,
    NEED_POINTS: tl.constexpr, NEED_LOGITS: tl.constexpr, NEED_QUATS: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    live = g < G
    gmx = tl.load(grad_means_ptr + g * 3 + 0, mask=live, other=0.0)
    gmy = tl.load(grad_means_ptr + g * 3 + 1, mask=live, other=0.0)
    gmz = tl.load(grad_means_ptr + g * 3 + 2, mask=live, other=0.0)

    # means = Σ_j w_j p_j, w = softmax(logits)
    if NEED_POINTS or NEED_LOGITS:
        mx, my, mz, bad_idx, wh, hx, hy, hz, ih, pair_h, wt, tx, ty, tz, it, pair_t = _blend(
            points_ptr, idx_ptr, logits_ptr, g, live, P, J, HEAD, TAIL)
        dot = _chunk_dot(wh, hx, hy, hz, gmx, gmy, gmz)
        if TAIL > 0:
            dot += _chunk_dot(wt, tx, ty, tz, gmx, gmy, gmz)
        _blend_vjp_chunk(wh, hx, hy, hz, ih, pair_h, gmx, gmy, gmz, dot, grad_points_ptr, grad_logits_ptr, g,
                         J, 0, HEAD, NEED_POINTS, NEED_LOGITS)
        if TAIL > 0:
            _blend_vjp_chunk(wt, tx, ty, tz, it, pair_t, gmx, gmy, gmz, dot, grad_points_ptr, grad_logits_ptr, g,
                             J, HEAD, TAIL, NEED_POINTS, NEED_LOGITS)

    # rotations = normalize(f(R_frame) ⊗ q)
    if NEED_POINTS or NEED_QUATS:
        (e1x, e1y, e1z, e2x, e2y, e2z, nx, ny, nz, degenerate, ux, uy, uz, vx, vy, vz, inv_u, inv_m,
         ia, ib, ic, bad_anchor) = _load_frame(points_ptr, anchors_ptr, g, live, P, sin_eps2, area_eps2)
        fw, fx, fy, fz = _matrix_to_quat_raw(e1x, e2x, nx, e1y, e2y, ny, e1z, e2z, nz)
        qw = tl.load(quats_ptr + g * 4 + 0, mask=live, other=1.0)
        qx = tl.load(quats_ptr + g * 4 + 1, mask=live, other=0.0)
        qy = tl.load(quats_ptr + g * 4 + 2, mask=live, other=0.0)
        qz = tl.load(quats_ptr + g * 4 + 3, mask=live, other=0.0)
        rw, rx, ry, rz = _quat_mul(fw, fx, fy, fz, qw, qx, qy, qz)
        inv_norm = 1.0 / tl.sqrt(rw * rw + rx * rx + ry * ry + rz * rz)
        grw = tl.load(grad_rot_ptr + g * 4 + 0, mask=live, other=0.0)
        grx = tl.load(grad_rot_ptr + g * 4 + 1, mask=live, other=0.0)
        gry = tl.load(grad_rot_ptr + g * 4 + 2, mask=live, other=0.0)
        grz = tl.load(grad_rot_ptr + g * 4 + 3, mask=live, other=0.0)
        grw, grx, gry, grz = _normalize4_vjp(rw * inv_norm, rx * inv_norm, ry * inv_norm, rz * inv_norm, inv_norm,
                                             grw, grx, gry, grz)
        g_fw, g_fx, g_fy, g_fz, g_qw, g_qx, g_qy, g_qz = _quat_mul_vjp(fw, fx, fy, fz, qw, qx, qy, qz,
                                                                       grw, grx, gry, grz)
        if NEED_QUATS:
            tl.store(grad_quats_ptr + g * 4 + 0, g_qw, mask=live)
            tl.store(grad_quats_ptr + g * 4 + 1, g_qx, mask=live)
            tl.store(grad_quats_ptr + g * 4 + 2, g_qy, mask=live)
            tl.store(grad_quats_ptr + g * 4 + 3, g_qz, mask=live)
        if NEED_POINTS:
            g_r00, g_r01, g_r02, g_r10, g_r11, g_r12, g_r20, g_r21, g_r22 = _matrix_to_quat_raw_vjp(
                e1x, e2x, nx, e1y, e2y, ny, e1z, e2z, nz, g_fw, g_fx, g_fy, g_fz)
            g_ux, g_uy, g_uz, g_vx, g_vy, g_vz = _anchor_frame_vjp(
                e1x, e1y, e1z, nx, ny, nz, ux, uy, uz, vx, vy, vz, inv_u, inv_m,
                g_r00, g_r10, g_r20, g_r01, g_r11, g_r21, g_r02, g_r12, g_r22)
            # a degenerate triangle uses the constant identity frame: no gradient to its points
            moving = live & ~degenerate
            tl.atomic_add(grad_points_ptr + ia * 3 + 0, -g_ux - g_vx, mask=moving, sem="relaxed")
            tl.atomic_add(grad_points_ptr + ia * 3 + 1, -g_uy - g_vy, mask=moving, sem="relaxed")
            tl.atomic_add(grad_points_ptr + ia * 3 + 2, -g_uz - g_vz, mask=moving, sem="relaxed")
            tl.atomic_add(grad_points_ptr + ib * 3 + 0, g_ux, mask=moving, sem="relaxed")
            tl.atomic_add(grad_points_ptr + ib * 3 + 1, g_uy, mask=moving, sem="relaxed")
            tl.atomic_add(grad_points_ptr + ib * 3 + 2, g_uz, mask=moving, sem="relaxed")
            tl.atomic_add(grad_points_ptr + ic * 3 + 0, g_vx, mask=moving, sem="relaxed")
            tl.atomic_add(grad_points_ptr + ic * 3 + 1, g_vy, mask=moving, sem="relaxed")
            tl.atomic_add(grad_points_ptr + ic * 3 + 2, g_vz, mask=moving, sem="relaxed")


# ----------------------------------------------------------------------------------------------
# host launchers (inputs already checked and made contiguous by npg.skinning)
# ----------------------------------------------------------------------------------------------


def _grid(G, block_g):
    return (max(1, triton.cdiv(G, block_g)),)


def _chunks(J):
    """HEAD, TAIL of ``_blend`` for J neighbours: J = 20 -> 16 + 4, 7 -> 4 + 4, 16 -> 16 + 0, 1 -> 2 + 0."""
    head = max(2, 1 << (J.bit_length() - 1))
    rest = J - head
    return {"HEAD": head, "TAIL": max(2, triton.next_power_of_2(rest)) if rest > 0 else 0}


def pad_points(points):
    """[P, 3] -> [P, 4] contiguous (zero padding), the layout both kernels gather from."""
    return torch.nn.functional.pad(points, (0, 1))


def skin_forward(points, neighbor_idx, logits, anchors, quats, sin_eps2, area_eps2,
                 block_g=DEFAULT_BLOCK_G, num_warps=DEFAULT_NUM_WARPS):
    """Launch the forward kernel on padded points [P, 4] (``pad_points``).
    Returns (means [G,3], rotations [G,4], flag [1] int32)."""
    G, J = neighbor_idx.shape
    means = torch.empty((G, 3), dtype=points.dtype, device=points.device)
    rotations = torch.empty((G, 4), dtype=points.dtype, device=points.device)
    flag = torch.zeros(1, dtype=torch.int32, device=points.device)
    if G > 0:
        skin_forward_kernel[_grid(G, block_g)](
            points, neighbor_idx, logits, anchors, quats, means, rotations, flag,
            G, points.shape[0], sin_eps2, area_eps2,
            J=J, **_chunks(J), BLOCK_G=block_g,
            num_warps=num_warps)
    return means, rotations, flag


def skin_backward(points, neighbor_idx, logits, anchors, quats, grad_means, grad_rotations, sin_eps2, area_eps2,
                  need_points, need_logits, need_quats, block_g=DEFAULT_BLOCK_G, num_warps=DEFAULT_NUM_WARPS):
    """Launch the backward kernel on padded points [P, 4]. Returns (grad_points [P, 3], grad_logits,
    grad_quats); None where not needed."""
    G, J = neighbor_idx.shape
    grad_points = torch.zeros((points.shape[0], 3), dtype=points.dtype, device=points.device) if need_points else None
    grad_logits = torch.empty_like(logits) if need_logits else None
    grad_quats = torch.empty_like(quats) if need_quats else None
    if G > 0 and (need_points or need_logits or need_quats):
        skin_backward_kernel[_grid(G, block_g)](
            points, neighbor_idx, logits, anchors, quats, grad_means, grad_rotations,
            grad_points if need_points else points, grad_logits if need_logits else logits,
            grad_quats if need_quats else quats,
            G, points.shape[0], sin_eps2, area_eps2,
            J=J, **_chunks(J), BLOCK_G=block_g,
            NEED_POINTS=need_points, NEED_LOGITS=need_logits, NEED_QUATS=need_quats,
            num_warps=num_warps)
    return grad_points, grad_logits, grad_quats
