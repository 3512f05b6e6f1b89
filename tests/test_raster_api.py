"""The public rasterizer API (npg.rasterize) and the drop-in npg.compat layer."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import npg
from npg.camera import Camera
from npg.compat import GaussianRasterizationSettings, GaussianRasterizer, settings_to_camera
from npg.raster import RasterOutput, rasterize, rasterize_torch


def look_at(eye, target=(0.0, 0.0, 0.0), up=(0.0, 0.0, 1.0)) -> torch.Tensor:
    eye, target, up = (np.asarray(v, dtype=np.float64) for v in (eye, target, up))
    forward = (target - eye) / np.linalg.norm(target - eye)
    right = np.cross(forward, up)
    right /= np.linalg.norm(right)
    w2c = np.eye(4)
    w2c[:3, :3] = np.stack([right, np.cross(forward, right), forward])
    w2c[:3, 3] = -w2c[:3, :3] @ eye
    return torch.from_numpy(w2c)


def scene(n: int = 200, seed: int = 0, width: int = 45, height: int = 37, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=g, dtype=torch.float64)
    quats = torch.nn.functional.normalize(torch.randn(n, 4, generator=g, dtype=torch.float64), dim=1)
    inputs = dict(
        means3d=(rand(n, 3) - 0.5) * 2.0,
        opacities=rand(n, 1) * 0.9 + 0.05,
        shs=(rand(n, 16, 3) - 0.5) * 0.6,
        scales=rand(n, 3) * 0.12 + 0.02,
        rotations=quats,
    )
    camera = Camera.from_fov(look_at((3.5, 1.0, 1.2)), 0.55, 0.55 * height / width, width, height)
    return camera, {k: v.to(dtype) for k, v in inputs.items()}


def leaves(inputs):
    return {k: v.clone().requires_grad_(True) for k, v in inputs.items()}


# ----------------------------------------------------------------------------- functional API
def test_public_names():
    assert npg.rasterize is rasterize
    assert npg.RasterOutput is RasterOutput
    assert RasterOutput._fields == ("color", "depth", "alpha", "radii", "means2d")


def test_output_shapes_and_types():
    camera, inputs = scene()
    out = rasterize(**inputs, camera=camera, sh_degree=3)
    assert out.color.shape == (3, 37, 45) and out.depth.shape == (1, 37, 45) and out.alpha.shape == (1, 37, 45)
    assert out.radii.shape == (200,) and out.radii.dtype == torch.int32
    assert out.means2d.shape == (200, 3) and not out.means2d.requires_grad
    assert out.color.dtype == torch.float32
    assert (out.alpha >= 0).all() and (out.alpha <= 1).all() and out.alpha.max() > 0.5
    out64 = rasterize(**scene(dtype=torch.float64)[1], camera=camera, sh_degree=3)
    assert out64.color.dtype == torch.float64
    torch.testing.assert_close(out64.color.float(), out.color, atol=1e-4, rtol=0)


def test_auto_backend_on_cpu_is_the_reference():
    camera, inputs = scene()
    auto = rasterize(**inputs, camera=camera, sh_degree=2)
    forced = rasterize(**inputs, camera=camera, sh_degree=2, backend="torch")
    direct = rasterize_torch(**inputs, camera=camera, sh_degree=2)
    for a, b, c in zip(auto[:4], forced[:4], direct[:4]):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_opacity_layouts_and_background_forms_agree():
    camera, inputs = scene(seed=1)
    base = rasterize(**inputs, camera=camera, sh_degree=1, background=torch.tensor([0.2, 0.3, 0.4]))
    flat = dict(inputs, opacities=inputs["opacities"].reshape(-1))
    other = rasterize(**flat, camera=camera, sh_degree=1, background=(0.2, 0.3, 0.4))
    assert torch.equal(base.color, other.color) and torch.equal(base.alpha, other.alpha)


def test_gradients_reach_every_input_in_its_own_shape():
    camera, inputs = scene(seed=2)
    inputs["opacities"] = inputs["opacities"].reshape(-1)
    params = leaves(inputs)
    out = rasterize(**params, camera=camera, sh_degree=3)
    assert out.means2d.requires_grad and out.means2d.is_leaf
    (out.color.sum() + out.depth.mean() + out.alpha.sum()).backward()
    for name, p in params.items():
        assert p.grad is not None and p.grad.shape == p.shape, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert out.means2d.grad[:, :2].abs().sum() > 0
    assert not out.means2d.grad[:, 2].any()


def test_given_means2d_receives_the_gradient_and_its_value_is_ignored():
    camera, inputs = scene(seed=3)
    params = leaves(inputs)
    sink = torch.full((200, 3), 5.0, requires_grad=True)  # a non-zero value must not move anything
    out = rasterize(**params, camera=camera, sh_degree=0, means2d=sink)
    reference = rasterize(**inputs, camera=camera, sh_degree=0)
    assert out.means2d is sink
    assert torch.equal(out.color, reference.color)
    out.color.sum().backward()
    created = rasterize(**leaves(inputs), camera=camera, sh_degree=0)
    created.color.sum().backward()
    torch.testing.assert_close(sink.grad, created.means2d.grad)


def test_no_grad_needed_means_no_graph():
    camera, inputs = scene(seed=4)
    with torch.no_grad():
        out = rasterize(**leaves(inputs), camera=camera, sh_degree=1)
    assert not out.color.requires_grad and not out.means2d.requires_grad


def test_colors_and_cov3d_inputs_match_shs_and_scales():
    """Degree-0 SH with the matching precomputed colour, and Σ = R·S²·Rᵀ given as cov3d, render the same image."""
    camera, inputs = scene(seed=5)
    shs0 = inputs["shs"][:, :1]
    colors = (shs0[:, 0] * 0.28209479177387814 + 0.5).clamp(min=0)
    rot = npg.raster.reference.quaternion_to_rotation(inputs["rotations"])
    sigma = rot @ torch.diag_embed(inputs["scales"] ** 2) @ rot.transpose(1, 2)
    cov3d = sigma[:, [0, 0, 0, 1, 1, 2], [0, 1, 2, 1, 2, 2]]
    a = rasterize(inputs["means3d"], inputs["opacities"], camera, shs=shs0, scales=inputs["scales"], rotations=inputs["rotations"])
    b = rasterize(inputs["means3d"], inputs["opacities"], camera, colors=colors, cov3d=cov3d)
    torch.testing.assert_close(a.color, b.color, atol=2e-5, rtol=0)
    assert (a.radii == b.radii).float().mean() > 0.99


@pytest.mark.gpu
def test_torch_backend_runs_on_cuda(cuda_device):
    camera, inputs = scene(seed=6)
    cpu = rasterize(**inputs, camera=camera, sh_degree=3)
    gpu = rasterize(**{k: v.to(cuda_device) for k, v in inputs.items()}, camera=camera, sh_degree=3, backend="torch")
    assert gpu.color.is_cuda
    torch.testing.assert_close(gpu.color.cpu(), cpu.color, atol=1e-4, rtol=0)
    assert (gpu.radii.cpu() == cpu.radii).float().mean() > 0.999


# ----------------------------------------------------------------------------- compat
def settings_for(camera: Camera, bg, scale_modifier=1.0, sh_degree=3) -> GaussianRasterizationSettings:
    return GaussianRasterizationSettings(
        image_height=camera.height, image_width=camera.width, tanfovx=camera.tanfovx, tanfovy=camera.tanfovy,
        bg=bg, scale_modifier=scale_modifier, viewmatrix=camera.viewmatrix, projmatrix=camera.projmatrix,
        sh_degree=sh_degree, campos=camera.campos, prefiltered=False, debug=False,
    )


def test_settings_fields_are_the_forks():
    assert GaussianRasterizationSettings._fields == (
        "image_height", "image_width", "tanfovx", "tanfovy", "bg", "scale_modifier", "viewmatrix", "projmatrix",
        "sh_degree", "campos", "prefiltered", "debug",
    )


def test_settings_round_trip_to_camera():
    camera, _ = scene()
    rebuilt = settings_to_camera(settings_for(camera, torch.zeros(3)))
    torch.testing.assert_close(rebuilt.w2c, camera.w2c)
    assert (rebuilt.fx, rebuilt.fy, rebuilt.cx, rebuilt.cy, rebuilt.width, rebuilt.height) == pytest.approx(
        (camera.fx, camera.fy, camera.cx, camera.cy, camera.width, camera.height)
    )


@pytest.mark.parametrize("scale_modifier", [1.0, 0.6])
def test_compat_equals_functional_api(scale_modifier):
    camera, inputs = scene(seed=7)
    bg = torch.tensor([0.1, 0.5, 0.9])
    ours = leaves(inputs)
    out = rasterize(**ours, camera=camera, sh_degree=2, scale_modifier=scale_modifier, background=bg)
    (out.color.sum() + out.depth.sum() + out.alpha.sum()).backward()

    theirs = leaves(inputs)
    # As 3DGS does it: a non-leaf sink with retain_grad.
    screenspace = torch.zeros_like(theirs["means3d"], requires_grad=True) + 0
    screenspace.retain_grad()
    rasterizer = GaussianRasterizer(raster_settings=settings_for(camera, bg, scale_modifier, sh_degree=2))
    color, radii, depth, alpha = rasterizer(
        means3D=theirs["means3d"], means2D=screenspace, shs=theirs["shs"], colors_precomp=None,
        opacities=theirs["opacities"], scales=theirs["scales"], rotations=theirs["rotations"], cov3D_precomp=None,
    )
    (color.sum() + depth.sum() + alpha.sum()).backward()
    torch.testing.assert_close(color, out.color, atol=1e-6, rtol=0)
    torch.testing.assert_close(depth, out.depth, atol=1e-5, rtol=0)
    torch.testing.assert_close(alpha, out.alpha, atol=1e-6, rtol=0)
    assert torch.equal(radii, out.radii)
    for name in inputs:
        torch.testing.assert_close(theirs[name].grad, ours[name].grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(screenspace.grad, out.means2d.grad, atol=1e-5, rtol=1e-4)


def test_compat_with_precomputed_colors_and_covariances():
    camera, inputs = scene(seed=8)
    colors = torch.rand(200, 3)
    cov3d = torch.rand(200, 6) * 0.001 + torch.tensor([0.004, 0.0, 0.0, 0.004, 0.0, 0.004])
    rasterizer = GaussianRasterizer(settings_for(camera, torch.ones(3)))
    color, radii, depth, alpha = rasterizer(inputs["means3d"], torch.zeros(200, 3), inputs["opacities"],
                                            colors_precomp=colors, cov3D_precomp=cov3d)
    out = rasterize(inputs["means3d"], inputs["opacities"], camera, colors=colors, cov3d=cov3d, background=torch.ones(3))
    assert torch.equal(color, out.color) and torch.equal(radii, out.radii)


def test_compat_rejects_ambiguous_inputs():
    camera, inputs = scene()
    rasterizer = GaussianRasterizer(settings_for(camera, torch.zeros(3)))
    sink = torch.zeros(200, 3)
    with pytest.raises(ValueError, match="SHs or precomputed colors"):
        rasterizer(inputs["means3d"], sink, inputs["opacities"], shs=inputs["shs"], colors_precomp=torch.rand(200, 3),
                   scales=inputs["scales"], rotations=inputs["rotations"])
    with pytest.raises(ValueError, match="scale/rotation pair or precomputed 3D covariance"):
        rasterizer(inputs["means3d"], sink, inputs["opacities"], shs=inputs["shs"], scales=inputs["scales"])


def test_mark_visible():
    camera, inputs = scene()
    rasterizer = GaussianRasterizer(settings_for(camera, torch.zeros(3)))
    points = torch.cat([inputs["means3d"], torch.tensor([[10.0, 3.0, 3.5], [3.5, 1.0, 1.2]])])  # behind, at the eye
    visible = rasterizer.markVisible(points)
    z = points.double() @ camera.w2c[2, :3].double() + camera.w2c[2, 3].double()
    assert visible.dtype == torch.bool and torch.equal(visible, z > 0.2)
    assert visible[:200].all() and not visible[200:].any()


def test_compat_on_refdata_settings(refdata_dir):
    """Settings built exactly as 3DGS builds them (the file's float32 viewmatrix/projmatrix/campos)."""
    case = dict(np.load(refdata_dir / "raster" / "odd_size_scalemod.npz"))
    settings = GaussianRasterizationSettings(
        image_height=int(case["cam__height"]), image_width=int(case["cam__width"]),
        tanfovx=float(case["cam__tanfovx"]), tanfovy=float(case["cam__tanfovy"]), bg=torch.from_numpy(case["cam__bg"]),
        scale_modifier=float(case["cam__scale_modifier"]), viewmatrix=torch.from_numpy(case["cam__viewmatrix"]),
        projmatrix=torch.from_numpy(case["cam__projmatrix"]), sh_degree=int(case["cam__sh_degree"]),
        campos=torch.from_numpy(case["cam__campos"]), prefiltered=False, debug=False,
    )
    params = {k: torch.from_numpy(case[f"in__{k}"]).requires_grad_(True) for k in ("means3D", "opacities", "shs", "scales", "rotations")}
    means2d = torch.zeros(params["means3D"].shape[0], 3, requires_grad=True)
    color, radii, depth, alpha = GaussianRasterizer(settings)(
        means3D=params["means3D"], means2D=means2d, opacities=params["opacities"], shs=params["shs"],
        scales=params["scales"], rotations=params["rotations"],
    )
    assert float(np.abs(color.detach().numpy() - case["out__color"]).max()) < 1e-4
    assert np.array_equal(radii.numpy(), case["out__radii"])
    (color * torch.from_numpy(case["upstream__color"])).sum().backward()
    for ours, key in ((means2d, "means2D"), (params["opacities"], "opacities")):
        ref = case[f"grad_color__{key}"]
        assert np.linalg.norm(ours.grad.numpy() - ref) <= 1e-2 * np.linalg.norm(ref)
    # The documented difference: npg's scale gradient is the fork's times scale_modifier.
    ref = case["grad_color__scales"] * float(case["cam__scale_modifier"])
    assert np.linalg.norm(params["scales"].grad.numpy() - ref) <= 1e-2 * np.linalg.norm(ref)


# ----------------------------------------------------------------------------- SH
def test_sh_basis_is_orthonormal_on_the_sphere():
    from npg.raster.sh import sh_basis

    count = 200_000  # Fibonacci sphere: near-uniform directions
    i = torch.arange(count, dtype=torch.float64) + 0.5
    z = 1 - 2 * i / count
    phi = i * math.pi * (3 - math.sqrt(5))
    r = torch.sqrt(1 - z * z)
    dirs = torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], dim=-1)
    basis = sh_basis(dirs, 3)
    gram = basis.T @ basis * (4 * math.pi / count)
    torch.testing.assert_close(gram, torch.eye(16, dtype=torch.float64), atol=1e-4, rtol=0)


def test_sh_degree_accepts_numpy_integers_and_checks_coefficients():
    from npg.raster.sh import eval_sh

    camera, inputs = scene(seed=9)
    a = rasterize(**inputs, camera=camera, sh_degree=np.int64(2))
    b = rasterize(**inputs, camera=camera, sh_degree=2)
    assert torch.equal(a.color, b.color)
    with pytest.raises(ValueError, match="needs 16"):
        eval_sh(torch.zeros(2, 9, 3), torch.zeros(2, 3), 3)


def test_camera_to_its_own_device_is_itself_and_keeps_a_host_copy():
    from npg.camera import Camera
    from npg.raster.cuda import camera_numbers

    w2c = torch.eye(4)
    w2c[:3, 3] = torch.tensor([0.1, -0.2, 3.0])
    camera = Camera.from_fov(w2c, 0.5, 0.4, 64, 48)
    assert camera.to("cpu") is camera and camera.to(torch.device("cpu")) is camera
    assert camera.w2c_host.dtype == torch.float64 and camera.w2c_host.device.type == "cpu"
    torch.testing.assert_close(camera.w2c_host, w2c.double())
    numbers = camera_numbers(camera)
    assert numbers[:16] == w2c.double().reshape(-1).tolist()
    torch.testing.assert_close(torch.tensor(numbers[16:19]), camera.campos.float().cpu())
    if torch.cuda.is_available():
        moved = camera.to("cuda")
        assert moved is not camera and moved.to("cuda") is moved and moved.to("cuda:0") is moved
        assert camera_numbers(moved) == numbers
