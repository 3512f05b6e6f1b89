"""Fused, differentiable SSIM (mean structural similarity) with an 11×11 Gaussian window.

    ssim(img1, img2, padding="same") -> scalar mean SSIM

Conventions: Gaussian window of ``window_size`` taps and standard deviation ``sigma`` (normalised to
sum 1), C1 = 0.01², C2 = 0.03² (data range 1), variances as E[x²] − μ², the map averaged over every
pixel of every channel and image.

* ``padding="same"``: the training loss of 3D Gaussian Splatting — the filter sees zeros outside the
  image (conv2d with padding = window_size // 2) and the map has the image's size.
* ``padding="valid"``: the evaluation convention of TiNeuVox/DVGO — only windows that lie inside the
  image, map of size (H − window_size + 1) × (W − window_size + 1). DVGO additionally clips negative
  variances and |cov| > σxσy; for a positive window those only differ by rounding error, so they
  are not applied.

CUDA tensors run the fused Triton kernels of ``npg.kernels.ssim`` (forward and backward, one kernel
each); CPU tensors run ``ssim_torch``, the conv2d formulation (``backend="triton"`` forces the
kernels, e.g. under TRITON_INTERPRET=1).
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from npg._ext import triton_backend

C1 = 0.01 ** 2
C2 = 0.03 ** 2
_PADDINGS = ("same", "valid")


def ssim(img1, img2, padding: str = "same", window_size: int = 11, sigma: float = 1.5, *,
         backend: str = "auto", validate: bool = True):
    """Mean SSIM of two images, differentiable w.r.t. both.

    Args:
        img1, img2: [B, C, H, W] or [C, H, W], float32/float64, same shape and device, values
            nominally in [0, 1].
        padding: "same" (zero padding, training loss) or "valid" (no padding, evaluation).
        window_size: odd number of Gaussian taps (11); sigma: its standard deviation (1.5).
        backend: "auto" (CUDA → Triton, CPU → torch), "triton" or "torch".
        validate: raise a ValueError naming the input when the result is not finite (one
            device→host synchronisation); with False a NaN/Inf input gives a NaN result.

    Returns:
        0-d tensor in the dtype of the images.
    """
    _check_inputs(img1, img2, padding, window_size, sigma)
    if triton_backend("ssim", img1, backend) == "torch":
        return ssim_torch(img1, img2, padding, window_size, sigma, validate=validate)
    window, consts = _kernel_constants(window_size, float(sigma), img1.dtype, img1.device)
    offset = window_size // 2 if padding == "same" else 0
    needs_grad = torch.is_grad_enabled() and (img1.requires_grad or img2.requires_grad)
    value = _SSIMTriton.apply(img1, img2, window, consts, offset, needs_grad)
    if validate and not math.isfinite(value.item()):
        _raise_bad_values(img1, img2)
    return value


def ssim_torch(img1, img2, padding: str = "same", window_size: int = 11, sigma: float = 1.5, *,
               validate: bool = True):
    """Reference: five grouped conv2d with the 2D window outer(g, g), as in 3D Gaussian Splatting."""
    _check_inputs(img1, img2, padding, window_size, sigma)
    squeeze = img1.dim() == 3
    if squeeze:
        img1, img2 = img1[None], img2[None]
    channels = img1.shape[1]
    g = _kernel_constants(window_size, float(sigma), img1.dtype, img1.device)[0]
    window = (g[:, None] * g[None, :]).expand(channels, 1, window_size, window_size).contiguous()
    pad = window_size // 2 if padding == "same" else 0

    def blur(image):
        return F.conv2d(image, window, padding=pad, groups=channels)

    mu1 = blur(img1)
    mu2 = blur(img2)
    mu1_sq, mu2_sq, mu1_mu2 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    sigma1_sq = blur(img1 * img1) - mu1_sq
    sigma2_sq = blur(img2 * img2) - mu2_sq
    sigma12 = blur(img1 * img2) - mu1_mu2
    ssim_map = ((2 * mu1_mu2 + C1) * (2 * sigma12 + C2)) / ((mu1_sq + mu2_sq + C1) * (sigma1_sq + sigma2_sq + C2))
    value = ssim_map.mean()
    if validate and not bool(torch.isfinite(value)):
        _raise_bad_values(img1, img2)
    return value


def gaussian_window(window_size: int, sigma: float, dtype=torch.float32, device=None):
    """[window_size] normalised 1D Gaussian, computed in float64 and then cast."""
    offsets = torch.arange(window_size, dtype=torch.float64) - window_size // 2
    g = torch.exp(-offsets ** 2 / (2.0 * sigma ** 2))
    return (g / g.sum()).to(dtype=dtype, device=device)


@lru_cache(maxsize=16)
def _kernel_constants(window_size, sigma, dtype, device):
    """The window and [C1, C2] on the device, made once per configuration (no copy per call)."""
    return gaussian_window(window_size, sigma, dtype, device), torch.tensor([C1, C2], dtype=dtype, device=device)


class _SSIMTriton(torch.autograd.Function):
    """One autograd node for the whole op: reshaping and the final sum happen inside it, because every
    extra node costs host time that, at training image sizes, exceeds the kernels' device time."""

    @staticmethod
    def forward(ctx, img1, img2, window, consts, offset, needs_grad):
        from npg.kernels import ssim as kernels

        H, W = img1.shape[-2:]
        x = img1.reshape(-1, H, W).contiguous()
        y = img2.reshape(-1, H, W).contiguous()
        ws = window.numel()
        out_h, out_w = (H, W) if offset == ws // 2 else (H - ws + 1, W - ws + 1)
        # the kernel leaves per-program shares of the mean; one sum finishes it
        partial, coef = kernels.ssim_forward(x, y, window, consts, offset, out_h, out_w, needs_grad)
        if needs_grad:
            ctx.save_for_backward(x, y, window, coef)
        ctx.offset = offset
        ctx.shape = img1.shape
        return partial.sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_value):
        from npg.kernels import ssim as kernels

        x, y, window, coef = ctx.saved_tensors
        need_x, need_y = ctx.needs_input_grad[:2]
        grad_x, grad_y = kernels.ssim_backward(x, y, window, coef, grad_value, ctx.offset, need_x, need_y)
        return (None if grad_x is None else grad_x.view(ctx.shape), None if grad_y is None else grad_y.view(ctx.shape),
                None, None, None, None)


def _check_inputs(img1, img2, padding, window_size, sigma):
    for name, image in (("img1", img1), ("img2", img2)):
        if not isinstance(image, torch.Tensor):
            raise ValueError(f"ssim: {name} must be a torch.Tensor, got {type(image).__name__}")
        if image.dim() not in (3, 4):
            raise ValueError(f"ssim: {name} must be [B, C, H, W] or [C, H, W], got shape {list(image.shape)}")
        if image.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"ssim: {name} must be float32 or float64, got {image.dtype}")
    if img1.shape != img2.shape:
        raise ValueError(f"ssim: img1 and img2 must have one shape, got {list(img1.shape)} and {list(img2.shape)}")
    if img1.dtype != img2.dtype:
        raise ValueError(f"ssim: img1 and img2 must have one dtype, got {img1.dtype} and {img2.dtype}")
    if img1.device != img2.device:
        raise ValueError(f"ssim: img1 and img2 must be on one device, got {img1.device} and {img2.device}")
    if img1.numel() == 0:
        raise ValueError(f"ssim: empty images (shape {list(img1.shape)})")
    if padding not in _PADDINGS:
        raise ValueError(f"ssim: padding must be 'same' or 'valid', got {padding!r}")
    if not isinstance(window_size, int) or window_size < 1 or window_size % 2 == 0:
        raise ValueError(f"ssim: window_size must be a positive odd integer, got {window_size!r}")
    if not sigma > 0:
        raise ValueError(f"ssim: sigma must be positive, got {sigma!r}")
    H, W = img1.shape[-2:]
    if padding == "valid" and (H < window_size or W < window_size):
        raise ValueError(f"ssim: padding='valid' needs images of at least {window_size}×{window_size} pixels, "
                         f"got {H}×{W}")


def _raise_bad_values(img1, img2):
    for name, image in (("img1", img1), ("img2", img2)):
        if not bool(torch.isfinite(image).all()):
            raise ValueError(f"ssim: {name} contains NaN or Inf")
    raise ValueError("ssim: the result is not finite although both images are; their values are too large "
                     "for the dtype (SSIM expects a data range of 1)")
