"""The CUDA rasterizer against the PyTorch reference (run in float64 on the same GPU) on fresh random
scenes: forward outputs and every gradient, all SH degrees, precomputed colours and covariances, odd
image sizes, plus bad input and the edge cases (N = 0, everything culled, a 1×1 image, a singular 2D
covariance, more (tile, Gaussian) pairs than one sort takes). Skipped without a GPU.
"""
from __future__ import annotations

import math

import pytest
import torch

from npg.camera import Camera

pytestmark = pytest.mark.usefixtures("cuda_device")

GRAD_TOL = 1e-2  # relative L2 error of every gradient
IMAGE_MAX_ABS = 1e-2  # float32 may flip the α ≥ 1/255 test at a few pixels
IMAGE_PSNR_DB = 80.0


def look_at_camera(width: int, height: int, tanfov: float, seed: int) -> Camera:
    """A camera at a random spot near the origin looking roughly down +z, fx ≠ fy."""
    g = torch.Generator().manual_seed(seed)
    angles = (torch.rand(3, generator=g) - 0.5) * 0.3
    cx, cy, cz = torch.cos(angles).tolist()
    sx, sy, sz = torch.sin(angles).tolist()
    rx = torch.tensor([[1, 0, 0], [0, cx, -sx], [0, sx, cx]], dtype=torch.float64)
    ry = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]], dtype=torch.float64)
    rz = torch.tensor([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]], dtype=torch.float64)
    w2c = torch.eye(4, dtype=torch.float64)
    w2c[:3, :3] = rz @ ry @ rx
    w2c[:3, 3] = (torch.rand(3, generator=g, dtype=torch.float64) - 0.5) * 0.2
    return Camera.from_fov(w2c, tanfov, tanfov * height / width * 1.03, width, height)


def random_scene(n: int, camera: Camera, *, sh_degree: int = 0, sh_coefficients: int | None = None,
                 mode: str = "sh", seed: int = 0, device="cuda") -> dict:
    """Gaussians in and around the view frustum (some behind the near plane, some off screen)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.rand(n, generator=g) * 7.0 + 0.05
    spread = 1.4 * camera.tanfovx
    x = (torch.rand(n, generator=g) * 2 - 1) * spread * z
    y = (torch.rand(n, generator=g) * 2 - 1) * spread * z
    view = torch.stack([x, y, z], dim=1).double()
    w2c = camera.w2c.double()
    means = ((view - w2c[:3, 3]) @ w2c[:3, :3]).float()  # R^T (view - t)
    scene = {
        "means3d": means,
        "opacities": torch.rand(n, 1, generator=g) * 1.05,  # a few above the 0.99 cap
    }
    scene["opacities"].clamp_(0.02, 1.0)
    if mode == "colors":
        scene["colors"] = torch.rand(n, 3, generator=g)
    else:
        m = sh_coefficients or (sh_degree + 1) ** 2
        scene["shs"] = torch.randn(n, m, 3, generator=g) * 0.4
    log_scales = torch.rand(n, 3, generator=g) * 3.5 - 5.0  # 0.007 .. 0.2
    scales = torch.exp(log_scales)
    # Non-unit quaternions: the rasterizer uses them as given.
    rotations = torch.randn(n, 4, generator=g) * 0.6 + torch.tensor([0.8, 0.0, 0.0, 0.0])
    if mode == "cov3d":
        from npg.raster.reference import quaternion_to_rotation

        m = quaternion_to_rotation(rotations.double()) * scales.double().unsqueeze(-2)
        # A tenth indefinite, Σ = M·diag(1, 1, −1)·Mᵀ: their conics are indefinite (the power > 0 rule
        # matters) while the 2D covariance keeps a positive eigenvalue (a defined radius).
        signs = torch.ones(n, 3, dtype=torch.float64)
        signs[torch.rand(n, generator=g) < 0.1, 2] = -1.0
        sigma = (m * signs.unsqueeze(-2)) @ m.transpose(-1, -2)
        scene["cov3d"] = sigma[:, [0, 0, 0, 1, 1, 2], [0, 1, 2, 1, 2, 2]].float()
    else:
        scene["scales"] = scales
        scene["rotations"] = rotations
    return {k: v.to(device) for k, v in scene.items()}


def render(scene: dict, camera: Camera, backend: str, dtype, *, sh_degree=0, scale_modifier=1.0, background=None,
           upstream=None):
    """Render and, with upstream gradients, backpropagate; returns (outputs, grads by input name)."""
    from npg.raster import rasterize

    leaves = {k: v.detach().to(dtype).requires_grad_(True) for k, v in scene.items()}
    bg = None if background is None else background.detach().to(dtype).requires_grad_(True)
    out = rasterize(
        leaves["means3d"], leaves["opacities"], camera, shs=leaves.get("shs"), sh_degree=sh_degree,
        colors=leaves.get("colors"), scales=leaves.get("scales"), rotations=leaves.get("rotations"),
        cov3d=leaves.get("cov3d"), scale_modifier=scale_modifier, background=bg, backend=backend,
    )
    grads = {}
    if upstream is not None:
        loss = sum((o.to(torch.float64) * u).sum() for o, u in zip((out.color, out.depth, out.alpha), upstream))
        loss.backward()
        grads = {k: v.grad for k, v in leaves.items()}
        grads["means2d"] = out.means2d.grad
        if bg is not None:
            grads["background"] = bg.grad
    return out, grads


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 1.0) -> float:
    mse = ((a.double() - b.double()) ** 2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    denom = b.norm().item()
    return (a - b).norm().item() / denom if denom > 0 else (a - b).norm().item()


def compare(scene, camera, *, sh_degree=0, scale_modifier=1.0, background=None, check_grads=True, seed=0,
            ref_dtype=torch.float64):
    h, w = camera.height, camera.width
    g = torch.Generator(device="cuda").manual_seed(seed)
    upstream = (
        torch.randn(3, h, w, device="cuda", dtype=torch.float64, generator=g),
        torch.randn(1, h, w, device="cuda", dtype=torch.float64, generator=g) * 0.1,
        torch.randn(1, h, w, device="cuda", dtype=torch.float64, generator=g),
    ) if check_grads else None
    kw = dict(sh_degree=sh_degree, scale_modifier=scale_modifier, background=background, upstream=upstream)
    got, got_grads = render(scene, camera, "cuda", torch.float32, **kw)
    ref, ref_grads = render(scene, camera, "torch", ref_dtype, **kw)

    assert torch.equal(got.radii.cpu(), ref.radii.cpu().to(torch.int32)) or (
        (got.radii.cpu() == ref.radii.cpu()).float().mean() >= 0.999
    ), "radii differ for more than 0.1% of the Gaussians"
    depth_scale = max(ref.depth.abs().max().item(), 1e-6)
    for name, a, b, peak in (("color", got.color, ref.color, 1.0), ("alpha", got.alpha, ref.alpha, 1.0),
                             ("depth", got.depth / depth_scale, ref.depth / depth_scale, 1.0)):
        assert a.shape == b.shape, name
        assert torch.isfinite(a).all(), f"{name} holds NaN or Inf"
        err = (a.double() - b).abs().max().item()
        assert err <= IMAGE_MAX_ABS, f"{name}: max abs error {err:.2e}"
        assert psnr(a, b, peak) >= IMAGE_PSNR_DB, f"{name}: PSNR {psnr(a, b, peak):.1f} dB"
    for name, ref_grad in ref_grads.items():
        got_grad = got_grads[name]
        if ref_grad is None:  # no path from this input to the outputs
            assert got_grad is None or torch.all(got_grad == 0), name
            continue
        assert got_grad is not None and got_grad.shape == ref_grad.shape, name
        assert torch.isfinite(got_grad).all(), f"grad of {name} holds NaN or Inf"
        err = rel_l2(got_grad, ref_grad)
        assert err <= GRAD_TOL, f"grad of {name}: relative L2 error {err:.2e}"
    return got


@pytest.mark.parametrize("sh_degree", [0, 1, 2, 3])
def test_sh_degrees_match_reference(sh_degree):
    camera = look_at_camera(160, 120, 0.6, seed=sh_degree)
    scene = random_scene(1500, camera, sh_degree=sh_degree, seed=10 + sh_degree)
    compare(scene, camera, sh_degree=sh_degree, background=torch.tensor([0.2, 0.4, 0.9], device="cuda"),
            seed=sh_degree)


@pytest.mark.parametrize(
    "n, width, height, seed",
    [(1, 33, 17, 1), (60, 97, 61, 2), (4000, 333, 217, 3), (20000, 640, 360, 4), (3000, 15, 250, 5)],
)
def test_sizes_and_odd_shapes_match_reference(n, width, height, seed):
    camera = look_at_camera(width, height, 0.5, seed=seed)
    scene = random_scene(n, camera, sh_degree=1, seed=seed)
    compare(scene, camera, sh_degree=1, seed=seed)


def test_precomputed_colors_white_background():
    camera = look_at_camera(200, 150, 0.55, seed=7)
    scene = random_scene(3000, camera, mode="colors", seed=7)
    compare(scene, camera, background=torch.ones(3, device="cuda"), seed=7)


def test_precomputed_cov3d_including_indefinite():
    camera = look_at_camera(190, 130, 0.55, seed=8)
    scene = random_scene(3000, camera, mode="cov3d", sh_degree=2, seed=8)
    compare(scene, camera, sh_degree=2, seed=8)


def test_scale_modifier_and_extra_sh_coefficients():
    camera = look_at_camera(128, 96, 0.5, seed=9)
    scene = random_scene(2000, camera, sh_degree=1, sh_coefficients=16, seed=9)
    compare(scene, camera, sh_degree=1, scale_modifier=0.7, seed=9)


def test_large_opaque_gaussians_early_termination():
    camera = look_at_camera(120, 100, 0.5, seed=11)
    scene = random_scene(400, camera, sh_degree=0, seed=11)
    scene["scales"] = scene["scales"] * 8
    scene["opacities"] = torch.full_like(scene["opacities"], 0.999)
    # Against the float32 reference: after two capped splats T = (1 − 0.99)², which is below the 1e-4
    # stop in float32 (as in the reference CUDA rasterizer) but above it in float64.
    compare(scene, camera, seed=11, ref_dtype=torch.float32)


def test_forward_is_deterministic_and_no_grad_works():
    camera = look_at_camera(200, 120, 0.5, seed=12)
    scene = random_scene(5000, camera, sh_degree=3, seed=12)
    from npg.raster import rasterize

    with torch.no_grad():
        a = rasterize(scene["means3d"], scene["opacities"], camera, shs=scene["shs"], sh_degree=3,
                      scales=scene["scales"], rotations=scene["rotations"])
        b = rasterize(scene["means3d"], scene["opacities"], camera, shs=scene["shs"], sh_degree=3,
                      scales=scene["scales"], rotations=scene["rotations"])
    assert torch.equal(a.color, b.color) and torch.equal(a.depth, b.depth) and torch.equal(a.radii, b.radii)


def test_empty_scene_renders_background():
    camera = look_at_camera(40, 30, 0.5, seed=13)
    scene = random_scene(0, camera, sh_degree=1, seed=13)
    background = torch.tensor([0.1, 0.2, 0.3], device="cuda")
    out = compare(scene, camera, sh_degree=1, background=background)
    assert torch.equal(out.color, background.view(3, 1, 1).expand(3, 30, 40))
    assert out.radii.shape == (0,) and torch.all(out.alpha == 0)


def test_everything_culled():
    camera = look_at_camera(64, 48, 0.5, seed=14)
    scene = random_scene(500, camera, sh_degree=0, seed=14)
    w2c = camera.w2c.to("cuda")
    behind = torch.tensor([0.0, 0.0, -1.0], device="cuda")  # view-space z = -1: behind the camera
    scene["means3d"] = (behind - w2c[:3, 3]) @ w2c[:3, :3] + 0.01 * torch.randn_like(scene["means3d"])
    out = compare(scene, camera)
    assert torch.all(out.radii == 0) and torch.all(out.color == 0) and torch.all(out.alpha == 0)


def test_one_pixel_image():
    camera = look_at_camera(1, 1, 0.5, seed=15)
    scene = random_scene(300, camera, sh_degree=2, seed=15)
    scene["scales"] = scene["scales"] * 20  # large enough to cover the pixel
    out = compare(scene, camera, sh_degree=2)
    assert out.color.shape == (3, 1, 1) and out.alpha.item() > 0


def test_singular_2d_covariance_is_culled():
    # Identity camera, fx/z = 256/64 = 4 exactly: a Σ with 16·Σxx = −0.3 makes the dilated 2D
    # covariance [[0, 0], [0, c]], determinant exactly 0 in float32.
    camera = Camera(w2c=torch.eye(4), fx=256.0, fy=256.0, cx=31.5, cy=31.5, width=64, height=64)
    cov3d = torch.tensor([[-0.3 / 16, 0.0, 0.0, 0.5, 0.0, 0.5], [0.5, 0.0, 0.0, 0.5, 0.0, 0.5]])
    means = torch.tensor([[0.0, 0.0, 64.0], [0.0, 0.0, 64.0]])
    from npg.raster import rasterize

    kw = dict(colors=torch.ones(2, 3), cov3d=cov3d)
    ref = rasterize(means, torch.full((2, 1), 0.5), camera, backend="torch", **kw)
    got = rasterize(means.cuda(), torch.full((2, 1), 0.5).cuda(), camera,
                    **{k: v.cuda() for k, v in kw.items()})
    assert ref.radii.tolist()[0] == 0 and got.radii.tolist()[0] == 0
    assert got.radii.tolist()[1] > 0
    assert (got.color.cpu() - ref.color).abs().max() < 1e-5


def _simple_inputs(n=50):
    camera = look_at_camera(32, 32, 0.5, seed=16)
    return camera, random_scene(n, camera, sh_degree=0, seed=16)


def test_bad_input_is_rejected_clearly():
    from npg.raster import rasterize

    camera, s = _simple_inputs()
    base = dict(shs=s["shs"], scales=s["scales"], rotations=s["rotations"])
    bad_means = s["means3d"].clone()
    bad_means[3, 1] = float("nan")
    with pytest.raises(ValueError, match="means3d"):
        rasterize(bad_means, s["opacities"], camera, **base)
    bad_scales = s["scales"].clone()
    bad_scales[0, 0] = float("inf")
    with pytest.raises(ValueError, match="scales"):
        rasterize(s["means3d"], s["opacities"], camera, shs=s["shs"], scales=bad_scales, rotations=s["rotations"])
    with pytest.raises(TypeError):
        rasterize(s["means3d"].double(), s["opacities"].double(), camera, shs=s["shs"].double(),
                  scales=s["scales"].double(), rotations=s["rotations"].double(), backend="cuda")
    with pytest.raises(ValueError, match="rotations"):
        rasterize(s["means3d"], s["opacities"], camera, shs=s["shs"], scales=s["scales"],
                  rotations=s["rotations"][:, :3])
    with pytest.raises(ValueError):
        rasterize(s["means3d"], s["opacities"].cpu(), camera, **base)


def test_kernel_flags_non_finite_inputs():
    """The CUDA path skips the Python NaN scan: the preprocessing kernel flags non-finite inputs."""
    from npg.raster import rasterize

    camera, s = _simple_inputs()
    base = dict(shs=s["shs"], scales=s["scales"], rotations=s["rotations"], backend="cuda")
    bad_opacity = s["opacities"].clone()
    bad_opacity[5] = float("nan")
    with pytest.raises(ValueError, match="opacities"):
        rasterize(s["means3d"], bad_opacity, camera, **base)
    bad_sh = s["shs"].clone()
    bad_sh[:, 0, 1] = float("inf")
    with pytest.raises(ValueError, match="shs"):
        rasterize(s["means3d"], s["opacities"], camera, **{**base, "shs": bad_sh})
    with pytest.raises(ValueError, match="background"):
        rasterize(s["means3d"], s["opacities"], camera, background=torch.tensor([0.0, float("nan"), 0.0], device="cuda"),
                  **base)
    # The render after a rejected call is unaffected.
    out = rasterize(s["means3d"], s["opacities"], camera, **base)
    assert torch.isfinite(out.color).all()


RAW_EXTENSION_CHECKS = """
import torch
from npg._ext import load
from npg.raster.cuda import camera_numbers
from tests.test_raster_cuda import _simple_inputs
ext = load("raster")
camera, s = _simple_inputs()
cam = camera_numbers(camera)
base = dict(means3d=s["means3d"], opacities=s["opacities"], shs=s["shs"], colors=None, scales=s["scales"],
            rotations=s["rotations"], cov3d=None, background=torch.zeros(3, device="cuda"), camera=cam, sh_degree=0,
            scale_modifier=1.0)
cases = [(dict(scales=s["scales"].t().contiguous().t()), "contiguous"), (dict(scales=None), "scales"),
         (dict(means3d=s["means3d"].cpu()), "CUDA"), (dict(camera=cam[:-1]), "camera")]
for over, message in cases:
    try:
        ext.forward(**{**base, **over})
    except (ValueError, RuntimeError) as err:
        assert message in str(err), (message, str(err))
    else:
        raise AssertionError("no error for " + message)
print("raw-extension-checks-ok")
"""


@pytest.mark.xfail(reason="C++ exceptions thrown by the extension's host checks crashed the process on the H100 "
                          "machine's toolchain (seen 2026-11-25); the public API validates in Python first", strict=False)
def test_extension_host_checks_raise():
    # In a subprocess, so that a crash fails this test instead of ending the session.
    import subprocess
    import sys
    from pathlib import Path

    result = subprocess.run([sys.executable, "-c", RAW_EXTENSION_CHECKS], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert result.returncode == 0 and "raw-extension-checks-ok" in result.stdout, result.stdout + result.stderr


def test_too_many_tile_pairs_is_a_clear_error():
    # 70 000 Gaussians each covering all 240×135 tiles of a 4K image: 2.27e9 pairs > 2^31 − 1.
    n = 70_000
    camera = Camera.from_fov(torch.eye(4), 0.5, 0.5 * 2160 / 3840, 3840, 2160)
    from npg.raster import rasterize

    means = torch.zeros(n, 3, device="cuda")
    means[:, 2] = 5.0
    with pytest.raises(ValueError, match="pairs"):
        rasterize(means, torch.full((n, 1), 0.9, device="cuda"), camera, colors=torch.rand(n, 3, device="cuda"),
                  scales=torch.full((n, 3), 20.0, device="cuda"),
                  rotations=torch.tensor([[1.0, 0.0, 0.0, 0.0]], device="cuda").expand(n, 4))
