"""The PyTorch reference rasterizer on the rules the refdata files do not exercise.

A naive renderer written here (numpy float64, one pixel and one Gaussian at a time, straight from the
conventions in ../shared/refdata/README.md) checks the forward on tiny scenes that include Gaussians
behind the near plane, indefinite covariances (power > 0), the 0.99 cap, early termination, tile
borders and partial tiles; float64 gradcheck checks the backward.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import npg.raster.reference as reference
from npg.camera import Camera
from npg.raster import rasterize, rasterize_torch


# ----------------------------------------------------------------------------- scenes
def look_at(eye, target=(0.0, 0.0, 0.0), up=(0.0, 0.0, 1.0)) -> torch.Tensor:
    """World-to-camera [4, 4] in OpenCV axes (x right, y down, z forward)."""
    eye, target, up = (np.asarray(v, dtype=np.float64) for v in (eye, target, up))
    forward = (target - eye) / np.linalg.norm(target - eye)
    right = np.cross(forward, up)
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    w2c = np.eye(4)
    w2c[:3, :3] = np.stack([right, down, forward])
    w2c[:3, 3] = -w2c[:3, :3] @ eye
    return torch.from_numpy(w2c)


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=(n, 4))
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def rotation_matrices(q: np.ndarray) -> np.ndarray:
    r, x, y, z = q.T
    return np.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - r * z), 2 * (x * z + r * y),
        2 * (x * y + r * z), 1 - 2 * (x * x + z * z), 2 * (y * z - r * x),
        2 * (x * z - r * y), 2 * (y * z + r * x), 1 - 2 * (x * x + y * y),
    ], axis=-1).reshape(-1, 3, 3)


def upper(cov: np.ndarray) -> np.ndarray:
    return cov[:, [0, 0, 0, 1, 1, 2], [0, 1, 2, 1, 2, 2]]


def tiny_scene(seed: int, n: int = 14, width: int = 37, height: int = 23):
    """Gaussians around the origin seen from ~4 units, with the awkward cases mixed in.

    Returns (camera, means [N,3], opacities [N], colors [N,3], cov [N,3,3]) as float64 numpy arrays.
    """
    rng = np.random.default_rng(seed)
    camera = Camera.from_fov(look_at((4.0, 0.8, 0.6)), 0.5, 0.5 * height / width, width, height)
    means = rng.uniform(-0.8, 0.8, size=(n, 3))
    scales = rng.uniform(0.05, 0.35, size=(n, 3))
    rot = rotation_matrices(random_rotations(n, rng))
    cov = rot @ (scales[:, :, None] ** 2 * rot.transpose(0, 2, 1))
    opacities = rng.uniform(0.2, 0.95, size=n)
    opacities[:3] = 0.999  # the 0.99 cap and early termination
    cov[3] = np.diag([0.09, -0.06, 0.04])  # indefinite: pixels with power > 0 must be skipped
    c2w = torch.linalg.inv(camera.w2c.double()).numpy()
    means[4] = c2w[:3, :3] @ np.array([0.0, 0.0, 0.1]) + c2w[:3, 3]  # in front of the camera but z <= 0.2
    means[5] = c2w[:3, :3] @ np.array([0.3, 0.1, -1.0]) + c2w[:3, 3]  # behind the camera
    # Centre outside the ±1.3·tanfov cone (x/z = 1.6·tanfovx), large enough to reach into the image.
    means[6] = c2w[:3, :3] @ np.array([1.6 * camera.tanfovx * 3.0, 0.0, 3.0]) + c2w[:3, 3]
    cov[6] = np.eye(3) * 0.4**2
    opacities[6] = 0.9
    colors = rng.uniform(0.0, 1.0, size=(n, 3))
    return camera, means, opacities, colors, cov


def naive_render(camera: Camera, means, opacities, colors, cov, background):
    """The conventions executed literally: float64, per pixel, per Gaussian. Returns numpy arrays."""
    w2c = camera.w2c.double().numpy()
    rot, trans = w2c[:3, :3], w2c[:3, 3]
    width, height = camera.width, camera.height
    grid_x, grid_y = -(-width // 16), -(-height // 16)
    radii = np.zeros(len(means), dtype=np.int64)
    splats = []
    for i in range(len(means)):
        x, y, z = rot @ means[i] + trans
        if z <= 0.2:
            continue
        lim_x, lim_y = 1.3 * camera.tanfovx, 1.3 * camera.tanfovy
        tx = min(lim_x, max(-lim_x, x / z)) * z
        ty = min(lim_y, max(-lim_y, y / z)) * z
        jac = np.array([[camera.fx / z, 0.0, -camera.fx * tx / z**2], [0.0, camera.fy / z, -camera.fy * ty / z**2]])
        cov2d = jac @ rot @ cov[i] @ rot.T @ jac.T
        a, b, c = cov2d[0, 0] + 0.3, cov2d[0, 1], cov2d[1, 1] + 0.3
        det = a * c - b * b
        if det == 0:
            continue
        mid = 0.5 * (a + c)
        radius = math.ceil(3.0 * math.sqrt(mid + math.sqrt(max(0.1, mid * mid - det))))
        px, py = camera.fx * x / z + camera.cx, camera.fy * y / z + camera.cy
        x0, x1 = (min(grid_x, max(0, int(v))) for v in ((px - radius) / 16, (px + radius + 15) / 16))
        y0, y1 = (min(grid_y, max(0, int(v))) for v in ((py - radius) / 16, (py + radius + 15) / 16))
        if (x1 - x0) * (y1 - y0) == 0:
            continue
        radii[i] = radius
        splats.append((z, i, px, py, c / det, -b / det, a / det, x0, x1, y0, y1))
    splats.sort(key=lambda s: s[0])

    color = np.zeros((3, height, width))
    depth = np.zeros((1, height, width))
    alpha = np.zeros((1, height, width))
    for v in range(height):
        for u in range(width):
            transmittance = 1.0
            for z, i, px, py, ca, cb, cc, x0, x1, y0, y1 in splats:
                if not (x0 <= u // 16 < x1 and y0 <= v // 16 < y1):
                    continue
                dx, dy = px - u, py - v
                power = -0.5 * (ca * dx * dx + cc * dy * dy) - cb * dx * dy
                if power > 0:
                    continue
                a = min(0.99, opacities[i] * math.exp(power))
                if a < 1.0 / 255.0:
                    continue
                if transmittance * (1 - a) < 1e-4:
                    break
                color[:, v, u] += a * transmittance * colors[i]
                depth[0, v, u] += a * transmittance * z
                transmittance *= 1 - a
            color[:, v, u] += transmittance * np.asarray(background)
            alpha[0, v, u] = 1.0 - transmittance
    return color, depth, alpha, radii


def render_torch(camera, means, opacities, colors, cov, background, dtype=torch.float64, **kw):
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=dtype)
    return rasterize_torch(t(means), t(opacities), camera, colors=t(colors), cov3d=t(upper(cov)),
                           background=t(background), **kw)


# ----------------------------------------------------------------------------- forward rules
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_matches_naive_renderer_float64(seed):
    camera, means, opacities, colors, cov = tiny_scene(seed)
    background = [0.2, 0.4, 0.1]
    expected = naive_render(camera, means, opacities, colors, cov, background)
    out = render_torch(camera, means, opacities, colors, cov, background)
    assert out.color.dtype == torch.float64
    for ours, ref in zip((out.color, out.depth, out.alpha), expected):
        np.testing.assert_allclose(ours.numpy(), ref, atol=1e-9)
    np.testing.assert_array_equal(out.radii.numpy(), expected[3])
    assert (out.radii[[4, 5]] == 0).all(), "Gaussians at z <= 0.2 must be culled"
    assert out.alpha.max() > 0.9, "the scene should exercise opaque pixels"
    assert out.radii[6] > 0 and out.alpha[0, :, -1].max() > 0.05, "the Gaussian outside the clamp cone should show"


def test_matches_naive_renderer_float32():
    camera, means, opacities, colors, cov = tiny_scene(7, n=30, width=53, height=40)
    expected = naive_render(camera, means, opacities, colors, cov, [1.0, 1.0, 1.0])
    out = render_torch(camera, means, opacities, colors, cov, [1.0, 1.0, 1.0], dtype=torch.float32)
    for ours, ref in zip((out.color, out.depth, out.alpha), expected):
        scale = max(float(np.abs(ref).max()), 1.0)
        assert float(np.abs(ours.double().numpy() - ref).max()) / scale < 1e-4
    np.testing.assert_array_equal(out.radii.numpy(), expected[3])


def test_power_above_zero_is_skipped():
    """An indefinite conic gives power > 0 along one axis: those pixels must get nothing."""
    camera = Camera.from_fov(torch.eye(4), 1.0, 1.0, 32, 32)
    means = np.array([[0.0, 0.0, 16.0]])
    cov = np.diag([2.0, -1.0, 1.0])[None]  # fx/z = 1: cov2D + 0.3·I = diag(2.3, -0.7)
    out = render_torch(camera, means, [0.9], [[1.0, 1.0, 1.0]], cov, [0.0, 0.0, 0.0])
    expected = naive_render(camera, means, np.array([0.9]), np.ones((1, 3)), cov, [0.0, 0.0, 0.0])
    np.testing.assert_allclose(out.alpha.numpy(), expected[2], atol=1e-12)
    # The centre is (15.5, 15.5). Pixel (x=15, y=13): power = +4.4, o·exp(power) would cap at 0.99.
    assert out.radii.item() > 0
    assert float(out.alpha[0, 13, 15]) == 0.0 and float(out.alpha[0, 10, 15]) == 0.0
    assert float(out.alpha[0, 15, 13]) > 0.2, "pixels along the positive-definite axis must be blended"


def test_zero_determinant_is_dropped():
    # fx/z = 1 and x = y = 0 make J = [[1, 0, 0], [0, 1, 0]] exactly, so cov2D[0, 0] = -0.3 + 0.3 = 0.
    camera = Camera.from_fov(torch.eye(4), 1.0, 1.0, 16, 16)
    for dtype in (torch.float32, torch.float64):
        t = lambda values: torch.tensor(values, dtype=dtype)
        means = t([[0.0, 0.0, 8.0], [0.1, 0.0, 8.0]])
        cov3d = t([[-0.3, 0.0, 0.0, 1.0, 0.0, 1.0], [2.0, 0.0, 0.0, 2.0, 0.0, 2.0]])
        opacities, colors = t([0.9, 0.5]), t([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        out = rasterize_torch(means, opacities, camera, colors=colors, cov3d=cov3d)
        alone = rasterize_torch(means[1:], opacities[1:], camera, colors=colors[1:], cov3d=cov3d[1:])
        assert out.radii[0] == 0 and out.radii[1] > 0
        assert torch.equal(out.color, alone.color) and torch.equal(out.alpha, alone.alpha)


def test_near_plane_cull():
    camera = Camera.from_fov(torch.eye(4), 1.0, 1.0, 16, 16)
    means = torch.tensor([[0.0, 0.0, 0.19], [0.0, 0.0, 0.2], [0.0, 0.0, 0.25]])
    out = rasterize_torch(means, torch.full((3,), 0.5), camera, colors=torch.ones(3, 3),
                          scales=torch.full((3, 3), 0.01), rotations=torch.tensor([[1.0, 0, 0, 0]]).repeat(3, 1))
    assert out.radii.tolist()[:2] == [0, 0] and out.radii[2] > 0


def test_opacity_cap_is_straight_through():
    """d(Σ alpha)/d(opacity) is Σ exp(power) over blended pixels, also where 0.99 caps α."""
    camera = Camera.from_fov(torch.eye(4), 1.0, 1.0, 16, 16)
    opacity = torch.tensor([0.999], dtype=torch.float64, requires_grad=True)
    cov = np.diag([0.05, 0.05, 0.05])[None]
    # fx = 8, cx = cy = 7.5: the centre lands exactly on pixel (8, 8), where 0.999·G = 0.999 is capped.
    out = rasterize_torch(torch.tensor([[0.25, 0.25, 4.0]], dtype=torch.float64), opacity, camera,
                          colors=torch.ones(1, 3, dtype=torch.float64), cov3d=torch.from_numpy(upper(cov)))
    capped = int((out.alpha == 0.99).sum())
    assert capped > 0, "the scene should hit the cap"
    out.alpha.sum().backward()
    alpha = out.alpha.detach()
    jac = np.array([[2.0, 0.0, -0.125], [0.0, 2.0, -0.125]])  # fx/z = 8/4, −fx·x/z² = −8·0.25/16
    conic = np.linalg.inv(jac @ cov[0] @ jac.T + 0.3 * np.eye(2))
    d = np.stack(np.meshgrid(np.arange(16.0), np.arange(16.0), indexing="xy"), -1) - 8.0  # [y, x, (dx, dy)]
    gauss = torch.from_numpy(np.exp(-0.5 * np.einsum("yxi,ij,yxj->yx", d, conic, d)))
    expected = float(gauss[alpha[0] > 0].sum())
    assert opacity.grad.item() == pytest.approx(expected, rel=1e-9)


def test_empty_scene_renders_background():
    camera = Camera.from_fov(torch.eye(4), 0.5, 0.5, 20, 10)
    means = torch.zeros(0, 3, requires_grad=True)
    shs = torch.zeros(0, 4, 3, requires_grad=True)
    out = rasterize(means, torch.zeros(0, requires_grad=True), camera, shs=shs, sh_degree=1,
                    scales=torch.zeros(0, 3), rotations=torch.zeros(0, 4), background=(0.1, 0.2, 0.3))
    assert out.color.shape == (3, 10, 20) and out.radii.shape == (0,) and out.means2d.shape == (0, 3)
    assert torch.allclose(out.color, torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1).expand(3, 10, 20))
    assert not out.depth.any() and not out.alpha.any()
    (out.color.sum() + out.depth.sum()).backward()
    assert means.grad.shape == (0, 3) and shs.grad.shape == (0, 4, 3)


def test_all_culled_renders_background_with_finite_zero_gradients():
    camera = Camera.from_fov(look_at((4.0, 0.0, 0.0)), 0.5, 0.5, 24, 24)
    means = torch.tensor([[5.0, 0.0, 0.0], [4.0, 0.0, 0.0], [20.0, 1.0, 1.0]], requires_grad=True)  # behind / at the eye
    scales = torch.full((3, 3), 0.2, requires_grad=True)
    rotations = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(3, 1).requires_grad_()
    shs = torch.rand(3, 4, 3, requires_grad=True)
    out = rasterize(means, torch.full((3, 1), 0.8), camera, shs=shs, sh_degree=1, scales=scales, rotations=rotations,
                    background=torch.tensor([1.0, 0.5, 0.0]))
    assert not out.radii.any()
    assert torch.equal(out.color, torch.tensor([1.0, 0.5, 0.0]).view(3, 1, 1).expand(3, 24, 24))
    (out.color.sum() + out.depth.sum() + out.alpha.sum()).backward()
    for tensor in (means, scales, rotations, shs, out.means2d):
        assert torch.equal(tensor.grad, torch.zeros_like(tensor)), "culled Gaussians must get exact zero gradients"


def test_offscreen_gaussian_has_zero_radius():
    camera = Camera.from_fov(torch.eye(4), 0.5, 0.5, 32, 32)
    means = torch.tensor([[0.0, 0.0, 4.0], [10.0, 0.0, 4.0]])
    out = rasterize_torch(means, torch.full((2,), 0.5), camera, colors=torch.ones(2, 3),
                          scales=torch.full((2, 3), 0.05), rotations=torch.tensor([[1.0, 0, 0, 0]]).repeat(2, 1))
    assert out.radii[0] > 0 and out.radii[1] == 0


@pytest.mark.parametrize("seed", [0, 1])
def test_one_pixel_image(seed):
    camera, means, opacities, colors, cov = tiny_scene(seed, width=1, height=1)
    expected = naive_render(camera, means, opacities, colors, cov, [0.3, 0.3, 0.3])
    out = render_torch(camera, means, opacities, colors, cov, [0.3, 0.3, 0.3])
    assert out.color.shape == (3, 1, 1)
    for ours, ref in zip((out.color, out.depth, out.alpha), expected):
        np.testing.assert_allclose(ours.numpy(), ref, atol=1e-9)
    np.testing.assert_array_equal(out.radii.numpy(), expected[3])


def test_chunked_search_and_blend_agree_with_one_pass(monkeypatch):
    camera, means, opacities, colors, cov = tiny_scene(5, n=60, width=70, height=50)

    def run():
        leaves = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (means, opacities, colors, upper(cov))]
        out = rasterize_torch(leaves[0], leaves[1], camera, colors=leaves[2], cov3d=leaves[3])
        (out.color.square().sum() + out.depth.sum() + 3 * out.alpha.sum()).backward()
        return [out.color, out.depth, out.alpha] + [leaf.grad for leaf in leaves] + [out.means2d.grad]

    whole = run()
    monkeypatch.setattr(reference, "SEARCH_BLOCK_ELEMENTS", 3 * 256 * 4)
    monkeypatch.setattr(reference, "SEARCH_RUN", 8)
    monkeypatch.setattr(reference, "BLEND_CHUNK_PAIRS", 2000)
    chunked = run()
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


# ----------------------------------------------------------------------------- gradients
def _gradcheck_scene(seed: int, n: int = 5):
    """One 16×12 tile (no tile-border discontinuities), moderate opacities (no cap, no early stop)."""
    rng = np.random.default_rng(seed)
    camera = Camera.from_fov(look_at((3.0, 0.4, 0.5)), 0.45, 0.45 * 12 / 16, 16, 12)
    means = rng.uniform(-0.25, 0.25, size=(n, 3))
    opacities = rng.uniform(0.3, 0.7, size=(n, 1))
    scales = rng.uniform(0.08, 0.2, size=(n, 3))
    quats = random_rotations(n, rng) * rng.uniform(0.8, 1.2, size=(n, 1))  # not unit: used as given
    return camera, rng, means, opacities, scales, quats


def test_gradcheck_sh_scales_rotations():
    camera, rng, means, opacities, scales, quats = _gradcheck_scene(0)
    shs = rng.normal(scale=0.3, size=(len(means), 9, 3))
    leaves = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (means, opacities, shs, scales, quats)]
    background = torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64)

    def render(m, o, s, sc, q):
        out = rasterize_torch(m, o, camera, shs=s, sh_degree=2, scales=sc, rotations=q, scale_modifier=0.8,
                              background=background)
        return out.color, out.depth, out.alpha

    assert torch.autograd.gradcheck(render, leaves, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_colors_cov3d():
    camera, rng, means, opacities, scales, quats = _gradcheck_scene(1)
    rot = rotation_matrices(quats / np.linalg.norm(quats, axis=1, keepdims=True))
    cov = upper(rot @ (scales[:, :, None] ** 2 * rot.transpose(0, 2, 1)))
    colors = rng.uniform(0, 1, size=(len(means), 3))
    leaves = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (means, opacities, colors, cov)]

    def render(m, o, c, cv):
        out = rasterize_torch(m, o, camera, colors=c, cov3d=cv)
        return out.color, out.depth, out.alpha

    assert torch.autograd.gradcheck(render, leaves, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_means2d_gradient_is_dloss_dndc():
    """Shifting the principal point by δ pixels moves every centre by δ: Σ dL/dNDC · 2/W = dL/dcx."""
    camera, rng, means, opacities, scales, quats = _gradcheck_scene(2)
    colors = torch.tensor(rng.uniform(0, 1, size=(len(means), 3)))
    weights = torch.tensor(rng.normal(size=(3, camera.height, camera.width)))

    def loss(cam, means2d=None):
        out = rasterize_torch(torch.tensor(means), torch.tensor(opacities), cam, colors=colors,
                              scales=torch.tensor(scales), rotations=torch.tensor(quats), means2d=means2d)
        return (out.color * weights).sum() + out.depth.sum() + out.alpha.sum()

    means2d = torch.zeros(len(means), 3, dtype=torch.float64, requires_grad=True)
    loss(camera, means2d).backward()
    assert torch.equal(means2d.grad[:, 2], torch.zeros(len(means), dtype=torch.float64))
    from dataclasses import replace

    delta = 1e-6
    numeric_x = (loss(replace(camera, cx=camera.cx + delta)) - loss(replace(camera, cx=camera.cx - delta))) / (2 * delta)
    numeric_y = (loss(replace(camera, cy=camera.cy + delta)) - loss(replace(camera, cy=camera.cy - delta))) / (2 * delta)
    assert float(means2d.grad[:, 0].sum()) * 2 / camera.width == pytest.approx(float(numeric_x), rel=1e-5)
    assert float(means2d.grad[:, 1].sum()) * 2 / camera.height == pytest.approx(float(numeric_y), rel=1e-5)


# ----------------------------------------------------------------------------- bad input
def _valid_inputs(n: int = 4):
    return dict(
        means3d=torch.rand(n, 3) + torch.tensor([0.0, 0.0, 3.0]),
        opacities=torch.rand(n, 1),
        camera=Camera.from_fov(torch.eye(4), 0.5, 0.5, 16, 16),
        shs=torch.rand(n, 4, 3),
        sh_degree=1,
        scales=torch.rand(n, 3) * 0.1,
        rotations=torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(n, 1),
    )


def _poisoned(name, value):
    def edit(kw):
        kw[name] = kw[name].clone()
        kw[name].view(-1)[1] = value
        return kw
    return edit


def _replace(**changes):
    def edit(kw):
        kw.update(changes)
        return kw
    return edit


def _drop(*names):
    def edit(kw):
        for name in names:
            kw.pop(name)
        return kw
    return edit


BAD_INPUTS = {
    "nan_means3d": (_poisoned("means3d", float("nan")), ValueError, "means3d"),
    "inf_opacities": (_poisoned("opacities", float("inf")), ValueError, "opacities"),
    "nan_shs": (_poisoned("shs", float("nan")), ValueError, "shs"),
    "inf_scales": (_poisoned("scales", -float("inf")), ValueError, "scales"),
    "nan_rotations": (_poisoned("rotations", float("nan")), ValueError, "rotations"),
    "nan_colors": (lambda kw: _replace(shs=None, colors=torch.tensor([[0.5, float("nan"), 0.5]] * 4))(kw), ValueError, "colors"),
    "nan_cov3d": (lambda kw: _replace(scales=None, rotations=None, cov3d=torch.full((4, 6), float("nan")))(kw), ValueError, "cov3d"),
    "nan_means2d": (_replace(means2d=torch.full((4, 3), float("nan"))), ValueError, "means2d"),
    "nan_background": (_replace(background=torch.tensor([0.0, float("nan"), 0.0])), ValueError, "background"),
    "means3d_shape": (_replace(means3d=torch.rand(4, 2)), ValueError, "means3d"),
    "means3d_1d": (_replace(means3d=torch.rand(12)), ValueError, "means3d"),
    "opacities_shape": (_replace(opacities=torch.rand(4, 2)), ValueError, "opacities"),
    "opacities_count": (_replace(opacities=torch.rand(5)), ValueError, "opacities"),
    "shs_shape": (_replace(shs=torch.rand(4, 3)), ValueError, "shs"),
    "rotations_shape": (_replace(rotations=torch.rand(4, 3)), ValueError, "rotations"),
    "cov3d_shape": (lambda kw: _replace(scales=None, rotations=None, cov3d=torch.rand(4, 3, 3))(kw), ValueError, "cov3d"),
    "means2d_shape": (_replace(means2d=torch.zeros(4, 2)), ValueError, "means2d"),
    "background_shape": (_replace(background=torch.zeros(4)), ValueError, "background"),
    "float16": (lambda kw: _replace(means3d=kw["means3d"].half())(kw), TypeError, "dtype"),
    "integer": (_replace(means3d=torch.ones(4, 3, dtype=torch.int64)), TypeError, "dtype"),
    "mixed_dtypes": (lambda kw: _replace(scales=kw["scales"].double())(kw), TypeError, "scales"),
    "mixed_devices": (_replace(opacities=torch.rand(4, 1, device="meta")), ValueError, "opacities"),
    "not_a_tensor": (_replace(shs=[[0.0] * 3] * 4), TypeError, "shs"),
    "shs_and_colors": (_replace(colors=torch.rand(4, 3)), ValueError, "exactly one of shs"),
    "neither_shs_nor_colors": (_drop("shs"), ValueError, "exactly one of shs"),
    "scales_without_rotations": (_drop("rotations"), ValueError, "scales and rotations"),
    "cov3d_and_scales": (_replace(cov3d=torch.rand(4, 6)), ValueError, "not both"),
    "sh_degree_4": (_replace(sh_degree=4), ValueError, "sh_degree"),
    "sh_degree_float": (_replace(sh_degree=1.0), ValueError, "sh_degree"),
    "too_few_sh_coefficients": (_replace(sh_degree=2), ValueError, "needs 9"),
    "scale_modifier_zero": (_replace(scale_modifier=0.0), ValueError, "scale_modifier"),
    "scale_modifier_nan": (_replace(scale_modifier=float("nan")), ValueError, "scale_modifier"),
    "camera_type": (_replace(camera="camera"), TypeError, "Camera"),
    "missing_opacities": (_replace(opacities=None), TypeError, "opacities"),
    "cuda_backend_on_cpu": (_replace(backend="cuda"), ValueError, "CUDA tensors"),
    "unknown_backend": (_replace(backend="opengl"), ValueError, "backend"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_clear_error(case):
    edit, error, message = BAD_INPUTS[case]
    kwargs = edit(_valid_inputs())
    with pytest.raises(error, match=message):
        rasterize(**kwargs)


def test_valid_inputs_render():
    out = rasterize(**_valid_inputs())
    assert out.alpha.max() > 0


def test_overflowing_covariances_are_dropped_not_garbage():
    camera = Camera.from_fov(torch.eye(4), 0.5, 0.5, 32, 32)
    means = torch.tensor([[0.0, 0.0, 4.0], [0.1, 0.0, 4.0], [0.0, 0.1, 4.0]])
    scales = torch.tensor([[1e25, 1e25, 1e25], [1e8, 1e8, 1e8], [0.1, 0.1, 0.1]])
    rotations = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(3, 1)
    out = rasterize_torch(means.requires_grad_(), torch.full((3,), 0.5), camera, colors=torch.ones(3, 3),
                          scales=scales, rotations=rotations)
    assert out.radii[0] == 0, "a covariance that overflows float32 must be dropped"
    assert out.radii[1] == 2**30 and out.radii[2] > 0
    assert torch.isfinite(out.color).all() and out.alpha.max() > 0.3
    out.color.sum().backward()
    assert torch.isfinite(means.grad[1:]).all()


def test_overflowing_centre_is_dropped():
    camera = Camera.from_fov(torch.eye(4), 0.5, 0.5, 32, 32)
    means = torch.tensor([[3e38, 3e38, 0.3], [0.0, 0.0, 4.0]])
    out = rasterize_torch(means, torch.full((2,), 0.5), camera, colors=torch.ones(2, 3),
                          scales=torch.tensor([[3e18, 3e18, 3e18], [0.1, 0.1, 0.1]]), rotations=torch.tensor([[1.0, 0, 0, 0]]).repeat(2, 1))
    assert out.radii.tolist()[0] == 0 and out.radii[1] > 0 and torch.isfinite(out.color).all()
