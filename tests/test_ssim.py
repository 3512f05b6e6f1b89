"""npg.ssim: the conv2d reference against an independent SciPy formulation, the Triton kernels (under
TRITON_INTERPRET=1 on a CPU, compiled on a GPU) against the reference in value and gradients, bad input."""
import os

import numpy as np
import pytest
import torch
from scipy.signal import correlate2d

from npg.similarity import C1, C2, gaussian_window, ssim, ssim_torch


def scipy_ssim(img1, img2, padding, window_size=11, sigma=1.5):
    """Mean SSIM in float64 with SciPy's 2D correlation (zero fill for 'same')."""
    g = gaussian_window(window_size, sigma, torch.float64).numpy()
    window = np.outer(g, g)
    values = []
    planes1 = img1.reshape(-1, *img1.shape[-2:]).double().numpy()
    planes2 = img2.reshape(-1, *img2.shape[-2:]).double().numpy()
    for x, y in zip(planes1, planes2):
        def blur(z):
            return correlate2d(z, window, mode=padding, boundary="fill")
        mu_x, mu_y = blur(x), blur(y)
        var_x = blur(x * x) - mu_x ** 2
        var_y = blur(y * y) - mu_y ** 2
        cov = blur(x * y) - mu_x * mu_y
        values.append(((2 * mu_x * mu_y + C1) * (2 * cov + C2)) / ((mu_x ** 2 + mu_y ** 2 + C1) * (var_x + var_y + C2)))
    return float(np.mean(values))


def image_pair(shape, dtype=torch.float64, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=gen, dtype=torch.float64)
    # a noisy, blurred copy: SSIM well inside (0, 1) and not saturated
    y = (0.8 * x + 0.2 * torch.rand(shape, generator=gen, dtype=torch.float64)
         + 0.05 * torch.randn(shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    return x.to(device, dtype), y.to(device, dtype)


def value_and_grads(fn, x, y):
    x = x.detach().clone().requires_grad_()
    y = y.detach().clone().requires_grad_()
    value = fn(x, y)
    return (value.detach(),) + torch.autograd.grad(value, (x, y))


def assert_match(result, reference, value_atol, grad_rtol):
    assert abs(result[0].item() - reference[0].item()) <= value_atol
    for name, a, b in (("d_img1", result[1], reference[1]), ("d_img2", result[2], reference[2])):
        error = (a - b).abs().max().item()
        assert error <= grad_rtol * b.abs().max().item(), f"{name}: max error {error:.3g}"


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("shape,window_size", [((2, 3, 23, 37), 11), ((3, 16, 11), 11), ((1, 2, 9, 14), 5)])
def test_reference_matches_scipy(padding, shape, window_size):
    x, y = image_pair(shape, seed=len(shape))
    expected = scipy_ssim(x, y, padding, window_size)
    assert abs(ssim_torch(x, y, padding, window_size).item() - expected) < 1e-12
    assert 0.2 < expected < 0.99


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_identical_images_give_one(padding):
    x, _ = image_pair((2, 3, 20, 24))
    assert abs(ssim_torch(x, x, padding).item() - 1.0) < 1e-12


def needs_interpreter():
    """Triton on CPU tensors runs under TRITON_INTERPRET=1 (conftest sets it when there is no GPU);
    on a GPU machine the CUDA tests below exercise the compiled kernels instead."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (set by conftest when no GPU is present)")


@pytest.fixture
def triton_available():
    needs_interpreter()


@pytest.mark.usefixtures("triton_available")
@pytest.mark.parametrize("padding", ["same", "valid"])
def test_triton_matches_reference_float64(padding):
    x, y = image_pair((1, 2, 13, 21), seed=3)
    result = value_and_grads(lambda a, b: ssim(a, b, padding, backend="triton"), x, y)
    reference = value_and_grads(lambda a, b: ssim_torch(a, b, padding), x, y)
    assert_match(result, reference, value_atol=1e-13, grad_rtol=1e-11)


@pytest.mark.usefixtures("triton_available")
@pytest.mark.parametrize("padding,shape,window_size", [
    ("same", (2, 1, 9, 7), 5), ("valid", (3, 9, 6), 5), ("same", (1, 1, 5, 4), 1), ("valid", (1, 1, 12, 17), 11),
    ("same", (1, 1, 6, 3), 3)])
def test_triton_matches_reference_odd_shapes(padding, shape, window_size):
    x, y = image_pair(shape, seed=sum(shape))
    result = value_and_grads(lambda a, b: ssim(a, b, padding, window_size, backend="triton"), x, y)
    reference = value_and_grads(lambda a, b: ssim_torch(a, b, padding, window_size), x, y)
    assert_match(result, reference, value_atol=1e-13, grad_rtol=1e-11)


@pytest.mark.usefixtures("triton_available")
@pytest.mark.parametrize("padding", ["same", "valid"])
def test_triton_float32_within_1e5_of_conv(padding):
    x, y = image_pair((1, 2, 16, 19), dtype=torch.float32, seed=9)
    result = value_and_grads(lambda a, b: ssim(a, b, padding, backend="triton"), x, y)
    reference = value_and_grads(lambda a, b: ssim_torch(a, b, padding), x, y)
    assert_match(result, reference, value_atol=1e-5, grad_rtol=1e-5)


@pytest.mark.usefixtures("triton_available")
def test_triton_gradient_of_one_image_and_no_grad():
    x, y = image_pair((2, 7, 9), dtype=torch.float32, seed=4)
    x.requires_grad_()
    value = ssim(x, y, backend="triton")
    (grad,) = torch.autograd.grad(3.0 * value, x)
    xr = x.detach().clone().requires_grad_()
    (expected,) = torch.autograd.grad(3.0 * ssim_torch(xr, y), xr)
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    with torch.no_grad():
        assert abs(ssim(x, y, backend="triton").item() - value.item()) < 1e-7


BAD = {
    "shape mismatch": (lambda x, y: (x, y[..., :-1]), {}, "one shape"),
    "2D image": (lambda x, y: (x[0, 0], y[0, 0]), {}, r"\[B, C, H, W\] or \[C, H, W\]"),
    "5D image": (lambda x, y: (x[None], y[None]), {}, r"\[B, C, H, W\] or \[C, H, W\]"),
    "integer image": (lambda x, y: ((x * 255).to(torch.uint8), y), {}, "img1 must be float32 or float64"),
    "half image": (lambda x, y: (x, y.half()), {}, "img2 must be float32 or float64"),
    "dtype mismatch": (lambda x, y: (x.double(), y), {}, "one dtype"),
    "device mismatch": (lambda x, y: (x, y.to("meta")), {}, "one device"),
    "not a tensor": (lambda x, y: (x.numpy(), y), {}, "img1 must be a torch.Tensor"),
    "empty": (lambda x, y: (x[:, :0], y[:, :0]), {}, "empty"),
    "valid too small": (lambda x, y: (x[..., :10], y[..., :10]), {"padding": "valid"}, "at least 11"),
    "bad padding": (lambda x, y: (x, y), {"padding": "reflect"}, "padding must be"),
    "even window": (lambda x, y: (x, y), {"window_size": 10}, "odd"),
    "bad sigma": (lambda x, y: (x, y), {"sigma": 0.0}, "sigma"),
    "NaN": (lambda x, y: (x, y.index_put((torch.tensor(0), torch.tensor(1), torch.tensor(2), torch.tensor(3)),
                                          torch.tensor(float("nan")))), {}, "img2 contains NaN or Inf"),
    "Inf": (lambda x, y: (x.index_put((torch.tensor(0), torch.tensor(0), torch.tensor(5), torch.tensor(5)),
                                      torch.tensor(float("inf"))), y),
            {"padding": "valid"}, "img1 contains NaN or Inf"),
}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_clear_error(case, backend):
    if backend == "triton":
        needs_interpreter()
    make, kwargs, message = BAD[case]
    x, y = image_pair((1, 2, 12, 12), dtype=torch.float32)
    with pytest.raises(ValueError, match=message):
        ssim(*make(x, y), backend=backend, **kwargs)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.usefixtures("triton_available")
def test_without_validation_nan_propagates():
    x, y = image_pair((1, 1, 8, 8), dtype=torch.float32)
    x[0, 0, 3, 3] = float("nan")
    assert torch.isnan(ssim(x, y, backend="triton", validate=False))
    with pytest.raises(ValueError, match="backend"):
        ssim(x, y, backend="cuda")


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, y = image_pair((3, 12, 12), dtype=torch.float32)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        ssim(x, y, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("shape", [(1, 3, 400, 400), (3, 253, 517), (2, 3, 800, 800)])
def test_cuda_kernels_match_conv(cuda_device, padding, shape, monkeypatch):
    # cuDNN may run float32 convolutions in TF32 (~1e-3 relative): the reference must not
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    x, y = image_pair(shape, dtype=torch.float32, seed=1, device=cuda_device)
    result = value_and_grads(lambda a, b: ssim(a, b, padding), x, y)
    reference = value_and_grads(lambda a, b: ssim_torch(a, b, padding), x, y)
    assert_match(result, reference, value_atol=1e-5, grad_rtol=1e-5)
    float64 = value_and_grads(lambda a, b: ssim_torch(a, b, padding), x.double(), y.double())
    assert_match(result, float64, value_atol=1e-5, grad_rtol=1e-5)
