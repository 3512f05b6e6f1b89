"""Triton kernels of the fused SSIM (public op: ``npg.ssim``, defined in ``npg.similarity``).

Both passes are one kernel each: a separable Gaussian filter whose horizontal pass reads shifted rows
(L1-resident) and whose vertical pass runs in registers as a ring of partial sums, so no filtered
moment ever goes to memory. A program owns a TILE_W-wide column strip of TILE_H output rows of one
image plane and walks down the TILE_H + WS − 1 input rows its outputs need:

    input row i contributes w[k]·h(i) to output row r = i − k + OFFSET (k = 0..WS−1), and output row
    r is complete once row r + WS − 1 − OFFSET has been read.

The ring holds one slot per pending output row ([RING, TILE_W] per moment, RING = next power of two
≥ WS); slot s at step t has weight index (t − s) mod RING, so each step is one broadcast FMA, and the
slot that completes is read out and cleared.

Forward: the five moments (x, y, x², y², xy) → SSIM map → per-program shares of the mean (the sum
over the program's outputs divided by the map size; one sum of them is the mean SSIM) and, when a
gradient is needed, the four maps ∂S/∂μx, ∂S/∂μy, ∂S/∂E[x²] (= ∂S/∂E[y²]) and ∂S/∂E[xy].
Backward: the same walk over those four maps with the mirrored offset (the window is symmetric), then
dL/dx = g·(F∗∂μx + 2x·F∗∂E[x²] + y·F∗∂E[xy]) and likewise for y, g = grad_output / map size.
"""
import torch
import triton
import triton.language as tl

# fastest of the tile shapes timed on an H100 at 800×800 RGB (benchmarks/bench_ssim.py --sweep)
DEFAULT_TILE_H = 32
DEFAULT_TILE_W = 64
DEFAULT_NUM_WARPS = 1


@triton.jit
def _ssim_and_partials(mu_x, mu_y, e_xx, e_yy, e_xy, C1, C2):
    """SSIM of the local moments and its derivatives w.r.t. μx, μy, E[x²] (= w.r.t. E[y²]), E[xy]."""
    var_x = e_xx - mu_x * mu_x
    var_y = e_yy - mu_y * mu_y
    cov = e_xy - mu_x * mu_y
    l_num = 2.0 * mu_x * mu_y + C1
    l_den = mu_x * mu_x + mu_y * mu_y + C1
    c_num = 2.0 * cov + C2
    c_den = var_x + var_y + C2
    inv_den = 1.0 / (l_den * c_den)
    s = l_num * c_num * inv_den
    d_mu_x = (2.0 * mu_y * (c_num - l_num) - 2.0 * mu_x * (c_den - l_den) * s) * inv_den
    d_mu_y = (2.0 * mu_x * (c_num - l_num) - 2.0 * mu_y * (c_den - l_den) * s) * inv_den
    d_e_sq = -s / c_den
    d_e_xy = 2.0 * l_num * inv_den
    return s, d_mu_x, d_mu_y, d_e_sq, d_e_xy


@triton.jit
def ssim_forward_kernel(
    x_ptr,         # [planes, H, W]
    y_ptr,         # [planes, H, W]
    window_ptr,    # [WS] normalised 1D Gaussian
    consts_ptr,    # [2] C1, C2 (in the dtype of the images)
    partial_ptr,   # [planes * tiles_h * tiles_w] out: each program's share of the mean SSIM
    coef_ptr,      # [4, planes, HO, WO] out when STORE_COEF: ∂S/∂μx, ∂S/∂μy, ∂S/∂E[x²], ∂S/∂E[xy]
    H, W, HO, WO, OFFSET, count, tile_rows,
    WS: tl.constexpr, RING: tl.constexpr, TILE_W: tl.constexpr, STORE_COEF: tl.constexpr,
):
    # The hot loop calls no helper but one: the interpreter pays dearly for each device-function call.
    tile_w = tl.program_id(0)
    tile_h = tl.program_id(1)
    plane = tl.program_id(2)
    cols = tile_w * TILE_W + tl.arange(0, TILE_W)
    no_cols = tl.zeros([TILE_W], dtype=tl.int32)
    row0 = tile_h * tile_rows
    slots = tl.arange(0, RING)
    image = plane.to(tl.int64) * H * W
    plane_out = plane.to(tl.int64) * HO * WO
    coef_stride = tl.num_programs(2).to(tl.int64) * HO * WO
    dtype = x_ptr.dtype.element_ty
    C1 = tl.load(consts_ptr)
    C2 = tl.load(consts_ptr + 1)
    ring_x = tl.zeros([RING, TILE_W], dtype=dtype)
    ring_y = tl.zeros([RING, TILE_W], dtype=dtype)
    ring_xx = tl.zeros([RING, TILE_W], dtype=dtype)
    ring_yy = tl.zeros([RING, TILE_W], dtype=dtype)
    ring_xy = tl.zeros([RING, TILE_W], dtype=dtype)
    total = tl.zeros([TILE_W], dtype=dtype)
    for t in range(0, tile_rows + WS - 1):
        # horizontal pass over input row i (zeros outside the image)
        i = row0 - OFFSET + t
        row_ok = (no_cols + i >= 0) & (no_cols + i < H)
        x_row = x_ptr + image + i * W
        y_row = y_ptr + image + i * W
        h_x = tl.zeros([TILE_W], dtype=dtype)
        h_y = tl.zeros([TILE_W], dtype=dtype)
        h_xx = tl.zeros([TILE_W], dtype=dtype)
        h_yy = tl.zeros([TILE_W], dtype=dtype)
        h_xy = tl.zeros([TILE_W], dtype=dtype)
        for k in tl.static_range(WS):
            c = cols + (k - OFFSET)
            ok = row_ok & (c >= 0) & (c < W)
            xv = tl.load(x_row + c, mask=ok, other=0.0)
            yv = tl.load(y_row + c, mask=ok, other=0.0)
            w = tl.load(window_ptr + k)
            wx = w * xv
            wy = w * yv
            h_x += wx
            h_y += wy
            h_xx += wx * xv
            h_yy += wy * yv
            h_xy += wx * yv
        # vertical pass: add the row to every pending output row (slot s has weight index
        # (t − s) mod RING), then pop the completed slot and clear it for reuse
        k_ring = (t - slots + RING) % RING
        w_ring = tl.load(window_ptr + k_ring, mask=k_ring < WS, other=0.0)[:, None]
        ring_x += w_ring * h_x[None, :]
        ring_y += w_ring * h_y[None, :]
        ring_xx += w_ring * h_xx[None, :]
        ring_yy += w_ring * h_yy[None, :]
        ring_xy += w_ring * h_xy[None, :]
        done = (k_ring == WS - 1)[:, None]
        mu_x = tl.sum(tl.where(done, ring_x, 0.0), axis=0)
        mu_y = tl.sum(tl.where(done, ring_y, 0.0), axis=0)
        e_xx = tl.sum(tl.where(done, ring_xx, 0.0), axis=0)
        e_yy = tl.sum(tl.where(done, ring_yy, 0.0), axis=0)
        e_xy = tl.sum(tl.where(done, ring_xy, 0.0), axis=0)
        ring_x = tl.where(done, 0.0, ring_x)
        ring_y = tl.where(done, 0.0, ring_y)
        ring_xx = tl.where(done, 0.0, ring_xx)
        ring_yy = tl.where(done, 0.0, ring_yy)
        ring_xy = tl.where(done, 0.0, ring_xy)
        r = row0 + t - (WS - 1)  # the output row just completed
        out_ok = (no_cols + r >= row0) & (no_cols + r < HO) & (cols < WO)
        s, d_mu_x, d_mu_y, d_e_sq, d_e_xy = _ssim_and_partials(mu_x, mu_y, e_xx, e_yy, e_xy, C1, C2)
        total += tl.where(out_ok, s, 0.0)
        if STORE_COEF:
            out = coef_ptr + plane_out + r * WO + cols
            tl.store(out, d_mu_x, mask=out_ok)
            tl.store(out + coef_stride, d_mu_y, mask=out_ok)
            tl.store(out + 2 * coef_stride, d_e_sq, mask=out_ok)
            tl.store(out + 3 * coef_stride, d_e_xy, mask=out_ok)
    program = (plane * tl.num_programs(1) + tile_h) * tl.num_programs(0) + tile_w
    tl.store(partial_ptr + program, tl.sum(total, axis=0) / count)


@triton.jit
def ssim_backward_kernel(
    x_ptr,           # [planes, H, W]
    y_ptr,           # [planes, H, W]
    window_ptr,      # [WS]
    coef_ptr,        # [4, planes, HO, WO] from the forward
    grad_out_ptr,    # dL/d(mean SSIM) in its first element
    grad_x_ptr,      # [planes, H, W] out (when NEED_X)
    grad_y_ptr,      # [planes, H, W] out (when NEED_Y)
    H, W, HO, WO, OFFSET, count, tile_rows,
    WS: tl.constexpr, RING: tl.constexpr, TILE_W: tl.constexpr,
    NEED_X: tl.constexpr, NEED_Y: tl.constexpr,
):
    tile_w = tl.program_id(0)
    tile_h = tl.program_id(1)
    plane = tl.program_id(2)
    cols = tile_w * TILE_W + tl.arange(0, TILE_W)
    no_cols = tl.zeros([TILE_W], dtype=tl.int32)
    row0 = tile_h * tile_rows
    slots = tl.arange(0, RING)
    image = plane.to(tl.int64) * H * W
    plane_coef = plane.to(tl.int64) * HO * WO
    coef_stride = tl.num_programs(2).to(tl.int64) * HO * WO
    dtype = x_ptr.dtype.element_ty
    scale = tl.load(grad_out_ptr).to(dtype) / count
    ring_mx = tl.zeros([RING, TILE_W], dtype=dtype)
    ring_my = tl.zeros([RING, TILE_W], dtype=dtype)
    ring_sq = tl.zeros([RING, TILE_W], dtype=dtype)
    ring_xy = tl.zeros([RING, TILE_W], dtype=dtype)
    # the transposed filter of a symmetric window is the same window with the mirrored offset
    mirrored = WS - 1 - OFFSET
    for t in range(0, tile_rows + WS - 1):
        i = row0 - mirrored + t
        row_ok = (no_cols + i >= 0) & (no_cols + i < HO)
        coef_row = coef_ptr + plane_coef + i * WO
        h_mx = tl.zeros([TILE_W], dtype=dtype)
        h_my = tl.zeros([TILE_W], dtype=dtype)
        h_sq = tl.zeros([TILE_W], dtype=dtype)
        h_xy = tl.zeros([TILE_W], dtype=dtype)
        for k in tl.static_range(WS):
            c = cols + (k - mirrored)
            ok = row_ok & (c >= 0) & (c < WO)
            w = tl.load(window_ptr + k)
            h_mx += w * tl.load(coef_row + c, mask=ok, other=0.0)
            h_my += w * tl.load(coef_row + coef_stride + c, mask=ok, other=0.0)
            h_sq += w * tl.load(coef_row + 2 * coef_stride + c, mask=ok, other=0.0)
            h_xy += w * tl.load(coef_row + 3 * coef_stride + c, mask=ok, other=0.0)
        k_ring = (t - slots + RING) % RING
        w_ring = tl.load(window_ptr + k_ring, mask=k_ring < WS, other=0.0)[:, None]
        ring_mx += w_ring * h_mx[None, :]
        ring_my += w_ring * h_my[None, :]
        ring_sq += w_ring * h_sq[None, :]
        ring_xy += w_ring * h_xy[None, :]
        done = (k_ring == WS - 1)[:, None]
        f_mx = tl.sum(tl.where(done, ring_mx, 0.0), axis=0)
        f_my = tl.sum(tl.where(done, ring_my, 0.0), axis=0)
        f_sq = tl.sum(tl.where(done, ring_sq, 0.0), axis=0)
        f_xy = tl.sum(tl.where(done, ring_xy, 0.0), axis=0)
        ring_mx = tl.where(done, 0.0, ring_mx)
        ring_my = tl.where(done, 0.0, ring_my)
        ring_sq = tl.where(done, 0.0, ring_sq)
        ring_xy = tl.where(done, 0.0, ring_xy)
        r = row0 + t - (WS - 1)  # the image row just completed
        ok = (no_cols + r >= row0) & (no_cols + r < H) & (cols < W)
        at = image + r * W + cols
        xv = tl.load(x_ptr + at, mask=ok, other=0.0)
        yv = tl.load(y_ptr + at, mask=ok, other=0.0)
        if NEED_X:
            tl.store(grad_x_ptr + at, scale * (f_mx + 2.0 * xv * f_sq + yv * f_xy), mask=ok)
        if NEED_Y:
            tl.store(grad_y_ptr + at, scale * (f_my + 2.0 * yv * f_sq + xv * f_xy), mask=ok)


def _tiling(rows, cols, tile_h, tile_w):
    """Rows per program (no more than there are) and the power-of-two strip width."""
    return min(tile_h, rows), min(tile_w, max(16, triton.next_power_of_2(cols)))


def _grid(planes, rows, cols, tile_h, tile_w):
    return (triton.cdiv(cols, tile_w), triton.cdiv(rows, tile_h), planes)


def ssim_forward(x, y, window, consts, offset, out_h, out_w, store_coef,
                 tile_h=DEFAULT_TILE_H, tile_w=DEFAULT_TILE_W, num_warps=DEFAULT_NUM_WARPS):
    """x, y: contiguous [planes, H, W]; window [WS] and consts [C1, C2] in their dtype.

    Returns (per-program shares of the mean SSIM, whose sum is the mean, and the coefficient maps
    [4, planes, out_h, out_w] or None).
    """
    planes, H, W = x.shape
    tile_h, tile_w = _tiling(out_h, out_w, tile_h, tile_w)
    grid = _grid(planes, out_h, out_w, tile_h, tile_w)
    partial = torch.empty(grid[0] * grid[1] * grid[2], dtype=x.dtype, device=x.device)
    coef = torch.empty((4, planes, out_h, out_w), dtype=x.dtype, device=x.device) if store_coef else None
    ws = window.numel()
    ssim_forward_kernel[grid](
        x, y, window, consts, partial, coef if store_coef else partial,
        H, W, out_h, out_w, offset, planes * out_h * out_w, tile_h,
        WS=ws, RING=triton.next_power_of_2(ws), TILE_W=tile_w, STORE_COEF=store_coef,
        num_warps=num_warps)
    return partial, coef


def ssim_backward(x, y, window, coef, grad_out, offset, need_x, need_y,
                  tile_h=DEFAULT_TILE_H, tile_w=DEFAULT_TILE_W, num_warps=DEFAULT_NUM_WARPS):
    """Gradients of the mean SSIM w.r.t. x and y ([planes, H, W]; None where not needed).

    grad_out: dL/d(mean SSIM) in its first element (an expanded tensor is fine: nothing else is read).
    """
    planes, H, W = x.shape
    out_h, out_w = coef.shape[2], coef.shape[3]
    grad_x = torch.empty_like(x) if need_x else None
    grad_y = torch.empty_like(y) if need_y else None
    ws = window.numel()
    tile_h, tile_w = _tiling(H, W, tile_h, tile_w)
    ssim_backward_kernel[_grid(planes, H, W, tile_h, tile_w)](
        x, y, window, coef, grad_out, grad_x if need_x else x, grad_y if need_y else y,
        H, W, out_h, out_w, offset, planes * out_h * out_w, tile_h,
        WS=ws, RING=triton.next_power_of_2(ws), TILE_W=tile_w, NEED_X=need_x, NEED_Y=need_y,
        num_warps=num_warps)
    return grad_x, grad_y
