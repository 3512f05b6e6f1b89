"""Stage 1: model, losses against dense PyTorch formulations, a tiny CPU training run, export round
trip, resume after an interrupted run, and clear errors for bad scenes.

The tests write their own tiny scene: a textured ellipsoid that moves, turns and changes shape, seen
by a camera on an arc (D-NeRF layout, RGBA PNGs, 64×64).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from npg.stage1 import (
    DeformationModel,
    Stage1Config,
    Stage1Trainer,
    load_stage1,
    losses,
    read_ply_points,
    train_stage1,
    write_ply_points,
)
from npg.chamfer import silhouette_chamfer
from npg.stage1.export import export_stage1
from npg.stage1.model import positional_encoding, time_to_tau
from npg.stage1.trainer import LOSS_NAMES, lr_factor, main, project, resolve_config, scene_defaults

# ----------------------------------------------------------------------------------- tiny scene


def _ellipsoid_pose(t: float):
    """Centre [3], rotation [3, 3] and semi-axes [3] of the test object at time t ∈ [0, 1]."""
    centre = np.array([0.25 * math.sin(2 * math.pi * t), 0.0, 0.15 * t])
    angle = 1.2 * t
    c, s = math.cos(angle), math.sin(angle)
    rotation = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    axes = np.array([0.8 * (1 + 0.25 * math.sin(2 * math.pi * t)), 0.55, 0.5 * (1 - 0.2 * math.sin(2 * math.pi * t))])
    return centre, rotation, axes


def _render_frame(c2w_gl: np.ndarray, focal: float, size: int, t: float, supersample: int = 3):
    """RGBA uint8 [size, size, 4] of the textured ellipsoid by ray casting (supersampled edges)."""
    n = size * supersample
    coords = (np.arange(n) + 0.5) / supersample - 0.5  # sub-pixel positions in pixel units
    xs, ys = np.meshgrid(coords, coords)
    centre_px = (size - 1) / 2
    dirs_cam = np.stack([(xs - centre_px) / focal, -(ys - centre_px) / focal, -np.ones_like(xs)], -1)
    dirs = dirs_cam @ c2w_gl[:3, :3].T
    origin = c2w_gl[:3, 3]
    centre, rotation, axes = _ellipsoid_pose(t)
    o = ((origin - centre) @ rotation) / axes
    d = (dirs @ rotation) / axes
    a = (d * d).sum(-1)
    b = 2 * (d * o).sum(-1)
    cc = (o * o).sum() - 1.0
    disc = b * b - 4 * a * cc
    hit = disc > 0
    s = (-b - np.sqrt(np.where(hit, disc, 0.0))) / (2 * a)
    q = o + s[..., None] * d  # unit-sphere coordinates of the hit, attached to the object
    u = np.arctan2(q[..., 1], q[..., 0])
    v = np.arcsin(np.clip(q[..., 2], -1, 1))
    checker = ((np.floor(u / (2 * np.pi) * 8) + np.floor(v / np.pi * 5)) % 2).astype(np.float64)
    shade = 0.55 + 0.45 * np.clip(-(q * (d / np.linalg.norm(d, axis=-1, keepdims=True))).sum(-1), 0, 1)
    color = np.stack([0.2 + 0.7 * checker, 0.3 + 0.4 * (1 - checker), 0.5 + 0.3 * np.sin(3 * u) ** 2], -1) * shade[..., None]
    color = np.where(hit[..., None], color, 0.0)
    alpha = hit.astype(np.float64)
    color = color.reshape(size, supersample, size, supersample, 3).mean((1, 3))
    alpha = alpha.reshape(size, supersample, size, supersample).mean((1, 3))
    straight = np.where(alpha[..., None] > 0, color / np.maximum(alpha[..., None], 1e-6), 0.0)
    rgba = np.concatenate([straight, alpha[..., None]], -1)
    return np.clip(np.round(rgba * 255), 0, 255).astype(np.uint8)


def _camera_c2w(azimuth: float, elevation: float = 0.35, radius: float = 4.0) -> np.ndarray:
    """OpenGL camera-to-world looking at the origin (D-NeRF convention, z up)."""
    position = radius * np.array([math.cos(elevation) * math.cos(azimuth), math.cos(elevation) * math.sin(azimuth), math.sin(elevation)])
    back = position / np.linalg.norm(position)  # the camera looks along -z = towards the origin
    right = np.cross([0.0, 0.0, 1.0], back)
    right /= np.linalg.norm(right)
    up = np.cross(back, right)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, up, back, position
    return c2w


def write_tiny_scene(root: Path, size: int = 64, frames: int = 12, val_frames: int = 4, rgb_only: bool = False) -> Path:
    import imageio.v2 as imageio

    angle_x = 0.69
    focal = size / (2 * math.tan(angle_x / 2))
    splits = {"train": np.linspace(0, 1, frames), "val": (np.arange(val_frames) + 0.5) / val_frames}
    for split, times in splits.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        entries = []
        for index, t in enumerate(times):
            c2w = _camera_c2w(0.9 * t + (0.4 if split == "val" else 0.0))
            rgba = _render_frame(c2w, focal, size, float(t))
            imageio.imwrite(root / split / f"r_{index:03d}.png", rgba[..., :3] if rgb_only else rgba)
            entries.append({"file_path": f"./{split}/r_{index:03d}", "time": float(t), "transform_matrix": c2w.tolist()})
        (root / f"transforms_{split}.json").write_text(json.dumps({"camera_angle_x": angle_x, "frames": entries}))
    return root


@pytest.fixture(scope="module")
def tiny_scene(tmp_path_factory) -> Path:
    return write_tiny_scene(tmp_path_factory.mktemp("scene") / "tiny_blob")


def tiny_config(**overrides) -> Stage1Config:
    """A model small enough for tens of CPU iterations in seconds."""
    base = dict(
        num_points=200, num_basis=8, width=64, bottleneck=16, num_blocks=2, rigidity_k=6, window=4,
        iterations=30, lr=3e-3, checkpoint_every=10, log_every=5, device="cpu", progress=False,
        preview=True, w_rigidity=50.0, reference_frame=0,
    )
    base.update(overrides)
    return Stage1Config(**base)


# ---------------------------------------------------------------------------------------- model


def test_time_mapping_matches_frame_index_and_is_continuous():
    frames = 7
    index = torch.arange(frames, dtype=torch.float64)
    tau = time_to_tau(index / (frames - 1), frames)
    torch.testing.assert_close(tau, (index + 1) / frames)
    midway = time_to_tau(torch.tensor([0.5 / (frames - 1)], dtype=torch.float64), frames)
    assert tau[0] < midway[0] < tau[1]


def test_positional_encoding_layout():
    tau = torch.tensor([0.1, 0.7])
    encoded = positional_encoding(tau, 3)
    expected = [tau]
    for i in range(3):
        expected += [torch.sin(tau * 2**i), torch.cos(tau * 2**i)]
    torch.testing.assert_close(encoded, torch.stack(expected, -1))


def test_model_initialisation_and_shapes():
    model = DeformationModel(num_points=50, num_basis=6, num_frames=10, num_frequencies=4, width=32, bottleneck=8, num_blocks=3)
    torch.testing.assert_close(model.basis.norm(dim=0), torch.ones(50, 3))  # normalised over K
    for layer in [model.stem, model.head, *[l for b in model.blocks for l in (b.reduce, b.middle, b.expand)]]:
        assert torch.count_nonzero(layer.bias) == 0
        assert 0.005 < layer.weight.std().item() < 0.02
    times = torch.tensor([0.0, 0.33, 1.0])
    points = model(times)
    assert points.shape == (3, 50, 3)
    coefficients = model.coefficients(times)
    torch.testing.assert_close(points, torch.einsum("bk,knc->bnc", coefficients, model.basis))
    points.sum().backward()
    assert model.basis.grad is not None and model.stem.weight.grad is not None
    assert model.features.shape == (50, 3) and not model.features.requires_grad
    with pytest.raises(ValueError, match="1-D"):
        model(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="NaN"):
        model(torch.tensor([float("nan")]))


def test_model_is_reproducible_from_its_seed():
    a = DeformationModel(num_points=20, num_basis=4, num_frames=5, width=16, bottleneck=4, num_blocks=1, seed=3)
    torch.rand(100)  # the global RNG must not matter
    b = DeformationModel(num_points=20, num_basis=4, num_frames=5, width=16, bottleneck=4, num_blocks=1, seed=3)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, msg=name)


def test_frame_embedding_interpolates_between_frames():
    model = DeformationModel(num_points=10, num_basis=4, num_frames=5, width=16, bottleneck=4, num_blocks=1, frame_embedding_dim=3)
    with torch.no_grad():
        model.frame_embedding.copy_(torch.arange(15, dtype=torch.float32).reshape(5, 3))
    codes = model._frame_code(torch.tensor([0.0, 0.25, 0.375, 1.0]))
    torch.testing.assert_close(codes[0], model.frame_embedding[0])
    torch.testing.assert_close(codes[1], model.frame_embedding[1])
    torch.testing.assert_close(codes[2], 0.5 * (model.frame_embedding[1] + model.frame_embedding[2]))
    torch.testing.assert_close(codes[3], model.frame_embedding[4])
    model(torch.tensor([0.1, 0.9])).sum().backward()
    assert model.frame_embedding.grad is not None


# ---------------------------------------------------------------------------------------- losses


def dense_chamfer(points2d: torch.Tensor, mask: torch.Tensor):
    ys, xs = torch.nonzero(mask, as_tuple=True)
    pixels = torch.stack([xs, ys], -1).to(points2d.dtype)
    d2 = torch.cdist(points2d, pixels).square()
    return d2.min(1).values.mean(), d2.min(0).values.mean()


@pytest.mark.parametrize("point_to_mask_weight", [1.0, 4.0])
def test_silhouette_loss_matches_dense_chamfer(point_to_mask_weight):
    generator = torch.Generator().manual_seed(0)
    masks = torch.zeros(3, 17, 23, dtype=torch.bool)
    masks[0, 3:9, 4:15] = True
    masks[1, 10:16, 2:6] = True
    masks[1, 1:3, 18:22] = True
    masks[2, 5, 7] = True
    points = (torch.rand(3, 40, 2, generator=generator) * torch.tensor([26.0, 20.0]) - 1.5).requires_grad_()
    ours = losses.silhouette_loss(points, masks, pixel_scale=2.0, point_to_mask_weight=point_to_mask_weight)
    reference_points = points.detach().clone().requires_grad_()
    halves = [dense_chamfer(p, m) for p, m in zip(reference_points, masks)]
    expected = sum(point_to_mask_weight * p2m + m2p for p2m, m2p in halves) * 4.0 / 3
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    ours.backward()
    expected.backward()
    torch.testing.assert_close(points.grad, reference_points.grad, rtol=1e-4, atol=1e-5)
    bad = points.detach().clone()
    bad[2, 5, 1] = float("nan")
    with pytest.raises(ValueError, match="frame 2 of the batch contain NaN"):
        losses.silhouette_loss(bad, masks)


def test_positive_depth_loss():
    depth = torch.tensor([[2.0, -0.5, 0.0], [-1.0, 3.0, 0.1]], requires_grad=True)
    loss = losses.positive_depth_loss(depth)
    torch.testing.assert_close(loss, torch.tensor((0.25 + 1.0) / 6))
    loss.backward()
    torch.testing.assert_close(depth.grad, torch.tensor([[0.0, -1.0 / 6, 0.0], [-2.0 / 6, 0.0, 0.0]]))


def dense_rigidity(points, reference, k):
    """The original's formulation: two dense N×N distance matrices, top-k on the reference."""
    reference_d2 = torch.cdist(reference, reference).square()
    reference_d2 = reference_d2 + torch.diag(torch.full((len(reference),), float("inf")))  # not its own neighbour
    idx = reference_d2.topk(k, largest=False).indices
    frame_d2 = torch.cdist(points, points).square()
    ref_knn = torch.gather(torch.cdist(reference, reference).square(), 1, idx)
    frame_knn = torch.gather(frame_d2, 2, idx.expand(len(points), -1, -1))
    return (ref_knn[None] - frame_knn).square().sum(-1).mean()


@pytest.mark.parametrize("count,k", [(30, 5), (97, 10), (64, 20)])
def test_rigidity_loss_matches_dense_formulation(count, k):
    generator = torch.Generator().manual_seed(count)
    reference = torch.randn(count, 3, generator=generator, dtype=torch.float64).requires_grad_()
    points = (reference.detach() + 0.1 * torch.randn(4, count, 3, generator=generator, dtype=torch.float64)).requires_grad_()
    _, idx = losses.reference_neighbors(reference.float(), k)
    ours = losses.rigidity_loss(points, reference, idx)
    reference2 = reference.detach().clone().requires_grad_()
    points2 = points.detach().clone().requires_grad_()
    expected = dense_rigidity(points2, reference2, k)
    torch.testing.assert_close(ours, expected)
    ours.backward()
    expected.backward()
    torch.testing.assert_close(points.grad, points2.grad)
    torch.testing.assert_close(reference.grad, reference2.grad)


def test_rigidity_loss_is_zero_for_rigid_motion():
    reference = torch.randn(50, 3)
    _, idx = losses.reference_neighbors(reference, 8)
    angle = 0.7
    rotation = torch.tensor([[math.cos(angle), -math.sin(angle), 0.0], [math.sin(angle), math.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    moved = (reference @ rotation.T + torch.tensor([1.0, -2.0, 0.5]))[None]
    assert losses.rigidity_loss(moved, reference, idx).item() < 1e-8
    with pytest.raises(ValueError, match="rigidity k"):
        losses.reference_neighbors(reference, 50)


def test_soft_huber():
    d = torch.tensor([0.0, 0.001, 0.5, -2.0], dtype=torch.float64)
    eps = 0.01
    torch.testing.assert_close(losses.soft_huber(d, eps), eps * (torch.sqrt(1 + d**2 / eps**2) - 1))
    assert abs(losses.soft_huber(torch.tensor(3.0), eps).item() - (3.0 - eps)) < 1e-4  # ≈ |d| far out


def bicubic_sample(image: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """PyTorch's bicubic (Keys, A = −0.75) at pixel coordinates (x, y), border clamping; image [C, H, W]."""

    def weights(t):
        a = -0.75

        def near(s):
            return ((a + 2) * s - (a + 3)) * s * s + 1

        def far(s):
            return ((a * s - 5 * a) * s + 8 * a) * s - 4 * a

        return [far(t + 1), near(t), near(1 - t), far(2 - t)]

    height, width = image.shape[1:]
    x0, y0 = math.floor(x), math.floor(y)
    wx, wy = weights(x - x0), weights(y - y0)
    value = torch.zeros(image.shape[0], dtype=image.dtype)
    for j in range(4):
        for i in range(4):
            xi = min(max(x0 - 1 + i, 0), width - 1)
            yj = min(max(y0 - 1 + j, 0), height - 1)
            value += wy[j] * wx[i] * image[:, yj, xi]
    return value


def test_warp_back_is_bicubic_and_masks_out_of_bounds():
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 9, 11, generator=generator, dtype=torch.float64)
    flow = (torch.rand(1, 9, 11, 2, generator=generator, dtype=torch.float64) - 0.5) * 6
    warped, valid = losses.warp_back(image, flow)
    for y in range(9):
        for x in range(11):
            tx, ty = x + flow[0, y, x, 0].item(), y + flow[0, y, x, 1].item()
            inside = 0 <= tx <= 10 and 0 <= ty <= 8
            assert bool(valid[0, y, x]) == inside
            if inside:
                torch.testing.assert_close(warped[0, :, y, x], bicubic_sample(image[0], tx, ty))


def test_flow_consistency_loss_matches_explicit_sum():
    generator = torch.Generator().manual_seed(2)
    rendered_next = torch.rand(2, 3, 8, 10, generator=generator, dtype=torch.float64)
    shift = (2, -1)  # integer flow: the warp is an exact shift
    flow = torch.zeros(2, 8, 10, 2, dtype=torch.float64)
    flow[..., 0], flow[..., 1] = shift
    rendered = torch.rand(2, 3, 8, 10, generator=generator, dtype=torch.float64, requires_grad=True)
    masks = torch.rand(2, 8, 10, generator=generator) > 0.4
    ours = losses.flow_consistency_loss(rendered, rendered_next, flow, masks, eps=0.01)
    per_pair = []
    for b in range(2):
        total, count = 0.0, 0
        for y in range(8):
            for x in range(10):
                tx, ty = x + shift[0], y + shift[1]
                if masks[b, y, x] and 0 <= tx < 10 and 0 <= ty < 8:
                    diff = rendered[b, :, y, x] - rendered_next[b, :, ty, tx]
                    total = total + (0.01 * (torch.sqrt(1 + (diff / 0.01) ** 2) - 1)).sum()
                    count += 1
        per_pair.append(total / max(count, 1))
    expected = torch.stack(per_pair).mean()
    torch.testing.assert_close(ours, expected)
    (grad_ours,) = torch.autograd.grad(ours, rendered)
    (grad_expected,) = torch.autograd.grad(expected, rendered)
    torch.testing.assert_close(grad_ours, grad_expected)


def test_coverage_loss_matches_explicit_sum_and_checks_shapes():
    generator = torch.Generator().manual_seed(3)
    alpha = torch.rand(3, 1, 7, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    masks = torch.rand(3, 7, 5, generator=generator) > 0.5
    ours = losses.coverage_loss(alpha, masks)
    total = 0.0
    for b in range(3):
        for y in range(7):
            for x in range(5):
                total = total + (alpha[b, 0, y, x] - float(masks[b, y, x])) ** 2
    expected = total / (3 * 7 * 5)
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(torch.autograd.grad(ours, alpha)[0], torch.autograd.grad(expected, alpha)[0])
    with pytest.raises(ValueError, match="alpha must be"):
        losses.coverage_loss(alpha[:, 0], masks)
    with pytest.raises(ValueError, match="alpha must be"):
        losses.coverage_loss(alpha, masks[:2])


def test_photometric_loss_matches_explicit_sum_and_checks_shapes():
    generator = torch.Generator().manual_seed(4)
    rendered = torch.rand(2, 3, 6, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    images = torch.rand(2, 3, 6, 5, generator=generator, dtype=torch.float64)
    masks = torch.rand(2, 6, 5, generator=generator) > 0.4
    masks[1] = False  # an empty mask counts as one pixel: no division by zero
    ours = losses.photometric_loss(rendered, images, masks)
    per_frame = []
    for b in range(2):
        total, count = 0.0, 0
        for y in range(6):
            for x in range(5):
                if masks[b, y, x]:
                    count += 1
                    total = total + sum(abs(rendered[b, c, y, x] - images[b, c, y, x]) for c in range(3))
        per_frame.append(total / (3 * max(count, 1)))
    expected = (per_frame[0] + per_frame[1]) / 2
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(torch.autograd.grad(ours, rendered)[0], torch.autograd.grad(expected, rendered)[0])
    with pytest.raises(ValueError, match="rendered and images"):
        losses.photometric_loss(rendered[:, :2], images[:, :2], masks)
    with pytest.raises(ValueError, match="masks must be"):
        losses.photometric_loss(rendered, images, masks[:1])


def test_visible_points_is_a_point_z_buffer():
    """Against a per-point loop: in the image, in the mask, in front, and within the tolerance of the
    nearest depth among the points of its cell."""
    generator = torch.Generator().manual_seed(4)
    batch, count, height, width, cell, tolerance = 2, 300, 13, 17, 2.5, 0.2
    pixels = torch.rand(batch, count, 2, generator=generator) * torch.tensor([width + 4.0, height + 4.0]) - 2.0
    depth = torch.rand(batch, count, generator=generator) * 2.0 - 0.1
    depth[0, 5] = float("nan")
    masks = torch.rand(batch, height, width, generator=generator) > 0.3
    ours = losses.visible_points(pixels, depth, masks, cell, tolerance)
    for b in range(batch):
        x, y = pixels[b, :, 0].round().long(), pixels[b, :, 1].round().long()
        usable = [
            0 <= int(x[n]) < width and 0 <= int(y[n]) < height and bool(depth[b, n] > 0) and bool(masks[b, y[n], x[n]])
            for n in range(count)
        ]
        cell_of = [(int(float(y[n]) // cell), int(float(x[n]) // cell)) for n in range(count)]
        nearest = {}
        for n in range(count):
            if usable[n]:
                nearest[cell_of[n]] = min(nearest.get(cell_of[n], math.inf), float(depth[b, n]))
        expected = [usable[n] and float(depth[b, n]) <= nearest[cell_of[n]] + tolerance for n in range(count)]
        assert ours[b].tolist() == expected
    assert 0 < int(ours.sum()) < ours.numel()
    with pytest.raises(ValueError, match="depth"):
        losses.visible_points(pixels, depth[:, :-1], masks, cell, tolerance)
    with pytest.raises(ValueError, match="masks"):
        losses.visible_points(pixels, depth, masks[:1], cell, tolerance)
    with pytest.raises(ValueError, match="cell"):
        losses.visible_points(pixels, depth, masks, 0.5, tolerance)
    as_tensors = losses.visible_points(pixels, depth, masks, torch.tensor(cell), torch.tensor(tolerance))
    assert torch.equal(as_tensors, ours)


def test_point_flow_loss_matches_explicit_sum():
    """Flow sampled bilinearly at each point (a loop over the four pixels around it), the soft-Huber of
    the scaled residual norm, mean over visible points with the flow's target in the image, mean over
    pairs; the gradient reaches both frames' points, not the sampling position."""
    generator = torch.Generator().manual_seed(5)
    batch, count, height, width, scale, eps = 3, 40, 9, 12, 4.0, 2.0
    flow = (torch.rand(batch, height, width, 2, generator=generator, dtype=torch.float64) - 0.5) * 4
    pixels = (torch.rand(batch, count, 2, generator=generator, dtype=torch.float64) * torch.tensor([width + 1.0, height + 1.0]) - 1.0)
    pixels.requires_grad_(True)
    pixels_next = (pixels.detach() + torch.randn(batch, count, 2, generator=generator, dtype=torch.float64)).requires_grad_(True)
    visible = torch.rand(batch, count, generator=generator) > 0.3
    visible[2] = False  # a pair without visible points adds 0
    ours = losses.point_flow_loss(pixels, pixels_next, flow, visible, scale, eps)

    def bilinear(b, x, y):
        x0, y0 = math.floor(x), math.floor(y)
        total = torch.zeros(2, dtype=torch.float64)
        for dy in (0, 1):
            for dx in (0, 1):
                wx = (x - x0) if dx else (1 - (x - x0))
                wy = (y - y0) if dy else (1 - (y - y0))
                xi, yi = min(max(x0 + dx, 0), width - 1), min(max(y0 + dy, 0), height - 1)
                total = total + wx * wy * flow[b, yi, xi]
        return total

    per_pair = []
    for b in range(batch):
        total, used = 0.0, 0
        for n in range(count):
            x, y = float(pixels[b, n, 0].detach()), float(pixels[b, n, 1].detach())
            if not (visible[b, n] and 0 <= x <= width - 1 and 0 <= y <= height - 1):
                continue
            motion = bilinear(b, x, y)
            if not (0 <= x + motion[0] <= width - 1 and 0 <= y + motion[1] <= height - 1):
                continue
            residual = pixels_next[b, n] - pixels[b, n] - motion
            total = total + eps * (torch.sqrt(1 + (scale**2) * residual.square().sum() / eps**2) - 1)
            used += 1
        per_pair.append(total / max(used, 1) if used else torch.zeros((), dtype=torch.float64))
    expected = torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in per_pair]).mean()
    torch.testing.assert_close(ours, expected)
    for leaf in (pixels, pixels_next):
        (grad_ours,) = torch.autograd.grad(ours, leaf, retain_graph=True)
        (grad_expected,) = torch.autograd.grad(expected, leaf, retain_graph=True)
        torch.testing.assert_close(grad_ours, grad_expected)
        assert grad_ours.abs().sum() > 0
    # points that follow the flow exactly cost nothing
    with torch.no_grad():
        motion, _ = losses.sample_flow(flow, pixels)
    exact = losses.point_flow_loss(pixels.detach(), pixels.detach() + motion, flow, visible, scale, eps)
    assert float(exact) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="pixels_next"):
        losses.point_flow_loss(pixels, pixels_next[:, :-1], flow, visible)
    with pytest.raises(ValueError, match="flow"):
        losses.point_flow_loss(pixels, pixels_next, flow[:1], visible)
    with pytest.raises(ValueError, match="visible"):
        losses.point_flow_loss(pixels, pixels_next, flow, visible[:, :-1])


def test_point_flow_term_reaches_the_model_and_is_off_by_default(tiny_scene, tmp_path):
    trainer = Stage1Trainer(tiny_scene, tmp_path, tiny_config(w_point_flow=1.0))
    terms = trainer.batch_losses(torch.arange(0, 4), skip_unweighted=True)
    assert float(terms["point_flow"].detach()) > 0
    terms["point_flow"].backward()
    assert trainer.model.basis.grad is not None and trainer.model.basis.grad.abs().sum() > 0
    off = Stage1Trainer(tiny_scene, tmp_path / "off", tiny_config())
    assert float(off.batch_losses(torch.arange(0, 4), skip_unweighted=True)["point_flow"].detach()) == 0
    assert float(off.batch_losses(torch.arange(0, 4))["point_flow"].detach()) > 0  # reported even when off
    for name, value in (("w_point_flow", -1.0), ("point_flow_eps", 0.0), ("point_flow_cell", 0.0), ("point_flow_depth_tolerance", -1.0)):
        with pytest.raises(ValueError, match=name):
            tiny_config(**{name: value}).validate()


def test_photometric_term_moves_the_points_and_its_colours_train(tiny_scene, tmp_path):
    """The term reaches the deformation model through the splat's position gradients (a cue on where
    the points are, not only on their colours), and the per-point colours get their own rate."""
    trainer = Stage1Trainer(tiny_scene, tmp_path, tiny_config(w_photometric=1.0, photometric_color_lr=0.05))
    assert trainer.scheduler.base_lrs == [3e-3, 0.05]
    terms = trainer.batch_losses(torch.arange(0, 4), skip_unweighted=True)
    terms["photometric"].backward()
    assert trainer.model.basis.grad is not None and trainer.model.basis.grad.abs().sum() > 0
    assert trainer.point_colors.grad.abs().sum() > 0
    off = Stage1Trainer(tiny_scene, tmp_path / "off", tiny_config())
    assert len(off.optimizer.param_groups) == 1
    assert float(off.batch_losses(torch.arange(0, 4), skip_unweighted=True)["photometric"]) == 0
    with pytest.raises(ValueError, match="w_photometric"):
        tiny_config(w_photometric=-1.0).validate()
    # Trained alone it falls (more slowly than the other terms: the checker texture is finer than the splats).
    weights = {f"w_{name}": float(name == "photometric") for name in LOSS_NAMES}
    alone = Stage1Trainer(tiny_scene, tmp_path / "alone", tiny_config(iterations=60, photometric_color_lr=0.05, **weights))
    before = alone.evaluate_losses()["photometric"]
    alone.train()
    after = alone.evaluate_losses()["photometric"]
    assert after < 0.85 * before, f"photometric did not fall: {before} -> {after}"


def test_project_matches_camera():
    from npg.camera import Camera

    w2c = torch.eye(4)
    w2c[:3, 3] = torch.tensor([0.1, -0.2, 4.0])
    camera = Camera(w2c=w2c, fx=50.0, fy=55.0, cx=31.5, cy=30.5, width=64, height=62)
    # depths 1-7: clear of MIN_DEPTH, below which project clamps z and Camera.project does not (an unseeded draw once
    # put a point at depth 0.04)
    points = torch.randn(1, 20, 3, generator=torch.Generator().manual_seed(0))
    points[..., 2] = points[..., 2].clamp(-3.0, 3.0)
    pixels, depth = project(points, w2c[None], torch.tensor([[50.0, 55.0, 31.5, 30.5]]))
    expected_pixels, expected_depth = camera.project(points[0])
    torch.testing.assert_close(pixels[0], expected_pixels)
    torch.testing.assert_close(depth[0], expected_depth)


def test_schedule_and_scene_defaults():
    assert lr_factor(0, 100, 5, 0.05) == pytest.approx(0.2)
    assert lr_factor(4, 100, 5, 0.05) == pytest.approx(1.0)
    assert lr_factor(5, 100, 5, 0.05) == pytest.approx(1.0)
    assert lr_factor(100, 100, 5, 0.05) == pytest.approx(0.05)
    assert scene_defaults("dnerf_lego_tiny")["num_basis"] == 30
    assert scene_defaults("dnerf_lego_tiny")["rigidity_k"] == 20
    assert scene_defaults("jumpingjacks")["w_rigidity"] == 5e6
    assert scene_defaults("generated_arc")["num_basis"] == 47
    resolved = resolve_config(Stage1Config(iterations=1000), "trex", num_frames=5)
    assert resolved.num_basis == 30 and resolved.reference_frame == 4 and resolved.warmup_iterations == 50
    assert resolve_config(Stage1Config(), "generated_arc", num_frames=150).reference_frame == 75  # the middle
    assert resolve_config(Stage1Config(), "jumpingjacks", num_frames=150).reference_frame == 0
    assert resolve_config(Stage1Config(reference_frame=3), "generated_arc", num_frames=150).reference_frame == 3
    with pytest.raises(ValueError, match="reference_frame"):
        resolve_config(Stage1Config(reference_frame=9), "x", num_frames=5)


# ------------------------------------------------------------------------------------- training


def set_bad_cloud(trainer: Stage1Trainer, behind_camera: bool) -> None:
    """Put the model in a bad state so that the loss terms have something to reduce: a blob of the
    wrong shape that wobbles non-rigidly over time (silhouette, rigidity, flow) and, with
    ``behind_camera``, 10% of the points on the optical axis 3 units behind the first camera (depth).

    Built directly: basis 0 = the blob with coefficient 1, basis 1 = the wobble with a coefficient that
    varies over the frames (the head reads the first principal direction of the trunk's features).
    """
    generator = torch.Generator().manual_seed(7)
    model, data = trainer.model, trainer.data
    count = model.num_points
    behind = (torch.rand(count, generator=generator) < 0.1) & behind_camera
    campos = data.cameras[0].campos
    with torch.no_grad():
        model.basis.zero_()
        model.basis[0] = torch.randn(count, 3, generator=generator) * 0.4
        model.basis[0, behind] = campos * (1 + 3.0 / campos.norm())
        model.basis[1] = torch.randn(count, 3, generator=generator) * 0.3
        model.basis[1, behind] = 0.0
        features = model.blocks(torch.nn.functional.leaky_relu(model.stem(model.encode(data.times)), 0.01))
        centred = features - features.mean(0)
        direction = torch.linalg.svd(centred, full_matrices=False).Vh[0]
        spread = (centred @ direction).std()
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.bias[0] = 1.0
        model.head.weight[1] = direction / spread
        model.head.bias[1] = -(features.mean(0) @ direction) / spread


@pytest.mark.parametrize("term", ["silhouette", "depth", "rigidity", "flow", "coverage", "point_flow"])
def test_each_loss_term_falls_when_trained(term, tiny_scene, tmp_path):
    """Trained alone from a bad state, each term falls over all training frames (through the whole
    pipeline: model, projection, kNN, splatting, warping)."""
    weights = {f"w_{name}": float(name == term) for name in LOSS_NAMES}
    trainer = Stage1Trainer(tiny_scene, tmp_path, tiny_config(iterations=12, lr=1e-3, **weights))
    set_bad_cloud(trainer, behind_camera=term == "depth")
    before = trainer.evaluate_losses()[term]
    assert before > 0
    trainer.train()
    after = trainer.evaluate_losses()[term]
    assert after < 0.9 * before, f"{term} did not fall: {before} -> {after}"


def test_flow_pairs_whose_cameras_turn_too_far_are_dropped(tiny_scene, tmp_path):
    from npg.stage1.trainer import flow_pairs_usable

    def turned(degrees):  # world-to-camera of a camera turned about the world y axis
        a = math.radians(degrees)
        w2c = torch.eye(4)
        w2c[:3, :3] = torch.tensor([[math.cos(a), 0.0, -math.sin(a)], [0.0, 1.0, 0.0], [math.sin(a), 0.0, math.cos(a)]])
        w2c[:3, 3] = torch.tensor([0.1, -0.2, 4.0])
        return w2c

    w2c = torch.stack([turned(d) for d in (0.0, 10.0, 40.0, 45.0, 45.0)])
    assert flow_pairs_usable(w2c, 20.0).tolist() == [True, False, True, True]
    assert flow_pairs_usable(w2c, 35.0).tolist() == [True, True, True, True]
    assert flow_pairs_usable(w2c, None).tolist() == [True] * 4
    assert flow_pairs_usable(w2c[:1], 20.0).numel() == 0

    frames = torch.arange(0, 4)
    kept = Stage1Trainer(tiny_scene, tmp_path / "kept", tiny_config(flow_max_view_change_deg=None))
    assert all(kept.flow_pair_usable) and float(kept.batch_losses(frames)["flow"].detach()) > 0
    dropped = Stage1Trainer(tiny_scene, tmp_path / "dropped", tiny_config(flow_max_view_change_deg=0.0))
    assert not any(dropped.flow_pair_usable) and float(dropped.batch_losses(frames)["flow"].detach()) == 0
    with pytest.raises(ValueError, match="flow_max_view_change_deg"):
        tiny_config(flow_max_view_change_deg=-1.0).validate()


@pytest.mark.parametrize("edge_windows", [True, False])
def test_windows_cover_the_frames_of_a_pass_evenly(edge_windows, tiny_scene, tmp_path):
    trainer = Stage1Trainer(tiny_scene, tmp_path, tiny_config(edge_windows=edge_windows))
    frames, window = len(trainer.data), trainer.window
    passes = frames + window - 1 if edge_windows else frames - window + 1
    counts = torch.zeros(frames, dtype=torch.long)
    for _ in range(passes):
        batch = trainer.next_window()
        assert len(batch) >= 1 and torch.equal(batch, torch.arange(int(batch[0]), int(batch[-1]) + 1))
        counts[batch] += 1
    assert not trainer.pending_windows  # one pass drawn, no start twice
    if edge_windows:  # every frame in exactly `window` windows
        assert torch.equal(counts, torch.full((frames,), window))
    else:  # full windows only: the first and last frames in one window each
        assert counts[0] == counts[-1] == 1 and counts.max() == window


@pytest.mark.parametrize("edge_windows", [True, False])
def test_frames_in_play_grow_from_the_reference_frame(edge_windows, tiny_scene, tmp_path):
    config = tiny_config(edge_windows=edge_windows, temporal_growth=0.5, iterations=40, reference_frame=2, window=2)
    trainer = Stage1Trainer(tiny_scene, tmp_path, config)
    frames = len(trainer.data)
    assert frames >= 5
    reaches = []
    for iteration in range(config.iterations):
        trainer.iteration = iteration
        first, last = trainer.frames_in_play()
        batch = trainer.next_window()
        assert first <= int(batch[0]) and int(batch[-1]) <= last  # windows stay within the frames in play
        assert torch.equal(batch, torch.arange(int(batch[0]), int(batch[-1]) + 1))
        reaches.append((first, last))
        if (first, last) != (0, frames - 1):
            assert iteration < 20 and not trainer.pending_windows  # the shuffled passes start after the growth
    farthest = frames - 1 - 2
    assert reaches[0] == (1, 3)  # half a window (1 frame) either side of frame 2
    # halfway through the growth: ceil(1 + (farthest - 1) / 2) frames either side
    assert reaches[10] == (0, min(frames - 1, 2 + math.ceil(1 + (farthest - 1) / 2)))
    assert all(a[0] >= b[0] and a[1] <= b[1] for a, b in zip(reaches, reaches[1:]))  # they only grow
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="temporal_growth"):
            tiny_config(temporal_growth=bad).validate()


def test_training_run_lowers_the_total_and_export_round_trips(tiny_scene, tmp_path):
    config = tiny_config(iterations=20, lr=1e-3)
    trainer = Stage1Trainer(tiny_scene, tmp_path, config)
    set_bad_cloud(trainer, behind_camera=False)
    before = trainer.evaluate_losses()
    trainer.train()
    after = trainer.evaluate_losses()
    assert after["total"] < before["total"]
    export_stage1(trainer)
    stage1 = trainer.stage1_dir

    for name in ("config.json", "checkpoint.pt", "export.npz", "preview.mp4", "log.csv", "metrics.json"):
        assert (stage1 / name).exists(), name
    model, loaded_config, export = load_stage1(stage1)
    assert loaded_config == trainer.config
    frames = len(trainer.data)
    assert export.points.shape == (frames, config.num_points, 3)
    assert export.coefficients.shape == (frames, config.num_basis)
    torch.testing.assert_close(export.times, trainer.data.times)
    for index in range(frames):
        ply = read_ply_points(stage1 / "points" / f"frame_{index:04d}.ply")
        np.testing.assert_array_equal(ply, export.points[index].numpy())
    with torch.no_grad():
        torch.testing.assert_close(model(export.times), export.points, rtol=1e-5, atol=1e-6)
    metrics = json.loads((stage1 / "metrics.json").read_text())
    assert metrics["iterations"] == 20 and metrics["held_out_split"] == "val"
    assert 0.0 <= metrics["iou_val"] <= 1.0 and metrics["chamfer_px_train"] > 0
    log_lines = (stage1 / "log.csv").read_text().strip().splitlines()
    assert log_lines[0].startswith("iteration,") and len(log_lines) == 1 + 20 // config.log_every


def test_ply_reader_rejects_foreign_files(tmp_path):
    points = np.random.default_rng(0).normal(size=(7, 3)).astype(np.float32)
    write_ply_points(tmp_path / "a.ply", points)
    np.testing.assert_array_equal(read_ply_points(tmp_path / "a.ply"), points)
    (tmp_path / "ascii.ply").write_text("ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nend_header\n0\n")
    with pytest.raises(ValueError, match="ascii.ply"):
        read_ply_points(tmp_path / "ascii.ply")
    data = (tmp_path / "a.ply").read_bytes()
    (tmp_path / "cut.ply").write_bytes(data[:-5])
    with pytest.raises(ValueError, match="cut.ply is truncated"):
        read_ply_points(tmp_path / "cut.ply")


@pytest.mark.parametrize("w_photometric", [0.0, 1.0])
def test_resume_after_interrupted_run_continues_from_checkpoint(w_photometric, tiny_scene, tmp_path):
    config = tiny_config(iterations=12, checkpoint_every=5, log_every=1, preview=False, w_photometric=w_photometric)

    class Killed(Exception):
        pass

    def kill_at_7(iteration, terms):
        if iteration == 7:
            raise Killed

    with pytest.raises(Killed):
        train_stage1(tiny_scene, tmp_path / "interrupted", config, callback=kill_at_7)
    state = torch.load(tmp_path / "interrupted" / "stage1" / "checkpoint.pt", weights_only=False)
    assert state["iteration"] == 5

    seen = []
    train_stage1(tiny_scene, tmp_path / "interrupted", config, callback=lambda it, terms: seen.append(it))
    assert seen == list(range(6, 13))  # continued from the checkpoint at 5, not from scratch
    train_stage1(tiny_scene, tmp_path / "straight", config)
    resumed = torch.load(tmp_path / "interrupted" / "stage1" / "checkpoint.pt", weights_only=False)
    straight = torch.load(tmp_path / "straight" / "stage1" / "checkpoint.pt", weights_only=False)
    for name, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][name], value, rtol=1e-5, atol=1e-7, msg=name)
    torch.testing.assert_close(resumed["point_colors"], straight["point_colors"], rtol=1e-5, atol=1e-7)
    # A finished run can be extended, with another learning rate, from its checkpoint.
    seen.clear()
    train_stage1(tiny_scene, tmp_path / "straight", tiny_config(iterations=14, lr=1e-3, preview=False, w_photometric=w_photometric),
                 callback=lambda it, terms: seen.append(it))
    assert seen == [13, 14]
    # A changed model config must not silently resume from an incompatible checkpoint.
    with pytest.raises(ValueError, match="different stage-1 config"):
        train_stage1(tiny_scene, tmp_path / "straight", tiny_config(iterations=12, num_basis=9, preview=False))


def test_cli_runs_with_overrides(tiny_scene, tmp_path, capsys):
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({"num_points": 120, "num_basis": 5, "width": 32, "bottleneck": 8, "num_blocks": 1}))
    code = main([
        str(tiny_scene), "-o", str(tmp_path / "out"), "--config", str(config_file),
        "--set", "iterations=3", "--set", "device=cpu", "--set", "progress=false", "--set", "preview=false",
        "--set", "window=3", "--set", "rigidity_k=4",
    ])
    assert code == 0
    saved = json.loads((tmp_path / "out" / "stage1" / "config.json").read_text())
    assert saved["num_points"] == 120 and saved["iterations"] == 3 and saved["window"] == 3
    assert main([str(tiny_scene), "-o", str(tmp_path / "bad"), "--set", "no_such_key=1"]) == 2
    assert "unknown config key 'no_such_key'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- bad input


def test_missing_masks_names_the_file(tmp_path):
    scene = write_tiny_scene(tmp_path / "rgb_only", frames=3, val_frames=1, rgb_only=True)
    with pytest.raises(ValueError, match=r"r_000\.png.*mask"):
        Stage1Trainer(scene, tmp_path / "out", tiny_config())


def test_empty_mask_names_the_file(tiny_scene, tmp_path):
    import imageio.v2 as imageio

    scene = tmp_path / "empty_mask"
    shutil.copytree(tiny_scene, scene, ignore=shutil.ignore_patterns("npg_cache*", ".npg*"))
    image = imageio.imread(scene / "train" / "r_004.png")
    image[..., 3] = 0
    imageio.imwrite(scene / "train" / "r_004.png", image)
    with pytest.raises(ValueError, match=r"empty mask.*r_004\.png"):
        Stage1Trainer(scene, tmp_path / "out", tiny_config())


def test_missing_or_mismatched_flows_give_clear_errors(tiny_scene, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"optical flow.*no_such_flows"):
        Stage1Trainer(tiny_scene, tmp_path / "a", tiny_config(flows_from=str(tmp_path / "no_such_flows")))

    short = tmp_path / "short_flows"  # 5 flow files for 12 frames
    short.mkdir()
    for index in range(5):
        np.save(short / f"{index:04d}.npy", np.zeros((64, 64, 2), dtype=np.float32))
    with pytest.raises(ValueError, match=r"short_flows.*5 flow files.*12 frames"):
        Stage1Trainer(tiny_scene, tmp_path / "b", tiny_config(flows_from=str(short)))

    import npg.data

    def one_short(path, split="train", downsample=1, **kwargs):
        return torch.zeros(10, 64, 64, 2)  # a loader or cache out of step with the 12 frames

    monkeypatch.setattr(npg.data, "load_flows", one_short)
    with pytest.raises(ValueError, match=r"frame count or size mismatch"):
        Stage1Trainer(tiny_scene, tmp_path / "c", tiny_config())


def test_missing_scene_and_bad_config(tmp_path, tiny_scene):
    with pytest.raises(FileNotFoundError, match="scene folder not found"):
        Stage1Trainer(tmp_path / "nowhere", tmp_path / "out", tiny_config())
    with pytest.raises(ValueError, match="window"):
        Stage1Trainer(tiny_scene, tmp_path / "out", tiny_config(window=1))
    with pytest.raises(FileNotFoundError, match="stage-1 folder"):
        load_stage1(tmp_path / "nothing_here")


def _sphere_cloud(count: int, center=(0.0, 0.0, 0.0)) -> torch.Tensor:
    """Fibonacci points on the unit sphere: an even sampling of the surface."""
    i = torch.arange(count, dtype=torch.float64) + 0.5
    z = 1 - 2 * i / count
    theta = math.pi * (1 + 5**0.5) * i
    r = (1 - z * z).sqrt()
    return (torch.stack([r * theta.cos(), r * theta.sin(), z], -1) + torch.tensor(center)).float()


def test_cloud_iou_is_calibrated_on_a_true_surface():
    """A cloud sampled on the true surface scores above 0.9 (its splats' gaps are closed, its outline
    is kept); the same cloud shifted by a quarter of its radius scores clearly lower."""
    from types import SimpleNamespace

    from npg.camera import Camera
    from npg.neighbors import knn
    from npg.stage1.export import cloud_iou
    from npg.stage1.splat import spacing_scales
    from npg.stage1.trainer import project

    size = 96
    w2c = torch.eye(4)
    w2c[2, 3] = 4.0  # the camera looks down +z at the unit sphere from distance 4
    camera = Camera.from_fov(w2c, 0.3, 0.3, size, size)
    v, u = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    radius_px = camera.fx / 15**0.5  # tan(asin(1/4)) = 1/sqrt(15)
    mask = ((u - camera.cx) ** 2 + (v - camera.cy) ** 2 <= radius_px**2)[None]
    config = SimpleNamespace(iou_threshold=0.5)
    intrinsics = torch.tensor([[camera.fx, camera.fy, camera.cx, camera.cy]])
    scores = []
    for center in ((0.0, 0.0, 0.0), (0.25, 0.0, 0.0)):
        points = _sphere_cloud(1500, center)[None]
        dist2, _ = knn(points[0].contiguous(), 3)
        pixels, _ = project(points, w2c[None], intrinsics)
        scores += cloud_iou(points, pixels, [camera], spacing_scales(dist2, 0.25), mask, config)
    assert scores[0] > 0.9, scores
    assert scores[1] < 0.8, scores


def test_track_error_sees_points_sliding_along_the_surface(tmp_path):
    """A unit square slides along x by 0.15 per frame. Points carried with it have no drift; points
    that stay put still lie on the surface (chamfer-to-surface near zero) but drift by the motion."""
    from types import SimpleNamespace

    from npg.stage1.export import surface_metrics, surface_sampler

    frames, shift = 3, 0.15
    square = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    vertices = torch.stack([square + torch.tensor([shift * f, 0.0, 0.0]) for f in range(frames)])
    times = torch.linspace(0, 1, frames)
    (tmp_path / "gt").mkdir()
    np.savez(tmp_path / "gt" / "mesh.npz", faces=faces.numpy().astype(np.int32))
    np.savez(tmp_path / "gt" / "train.npz", times=times.numpy(), vertices=vertices.numpy())
    inner = surface_sampler(vertices[0], faces, 400, seed=3)
    # only the middle of the square: static points there stay on the moving surface in every frame
    middle = lambda v: v[(inner(vertices[0])[:, 0] > 0.35) & (inner(vertices[0])[:, 0] < 0.65)]  # noqa: E731

    class Frames(list):  # the trainer's data: its length and .times
        pass

    data = Frames(range(frames))
    data.times = times

    def trainer_with(points_at):
        model = lambda t: points_at(int(round(float(t[0]) * (frames - 1))))[None]  # noqa: E731
        return SimpleNamespace(scene_dir=tmp_path, device=torch.device("cpu"), model=model, data=data,
                               config=SimpleNamespace(reference_frame=0))

    carried = trainer_with(lambda f: middle(inner(vertices[f])))
    static = trainer_with(lambda f: middle(inner(vertices[0])))
    drift_carried = surface_metrics(carried)["track_error"]
    drift_static = surface_metrics(static)["track_error"]
    assert drift_carried < 0.02, drift_carried
    mean_shift = shift * sum(range(frames)) / frames
    assert abs(drift_static - mean_shift) < 0.02, (drift_static, mean_shift)
    # Carried 0.1 off the surface: a track error of 0.1 in every frame, but no drift; static points drift.
    lifted = surface_metrics(trainer_with(lambda f: middle(inner(vertices[f])) + torch.tensor([0.0, 0.0, 0.1])))
    assert abs(lifted["track_error"] - 0.1) < 0.02 and lifted["track_drift"] < 1e-5, lifted
    assert abs(surface_metrics(static)["track_drift"] - mean_shift) < 1e-4
    # static points drift by 0, 0.15 and 0.3 in the three frames: the 90th percentile is the last
    assert abs(surface_metrics(static)["track_drift_p90"] - 2 * shift) < 1e-4 and lifted["track_drift_p90"] < 1e-5
    # the yardstick: how far the true sites travel, whatever the cloud does
    for metrics in (surface_metrics(static), surface_metrics(carried), lifted):
        assert abs(metrics["track_drift_static"] - mean_shift) < 1e-4, metrics
    # the share of the true motion the points make: all of it carried, none of it static
    assert abs(surface_metrics(carried)["track_motion_captured"] - 1.0) < 1e-4
    assert abs(lifted["track_motion_captured"] - 1.0) < 1e-4 and abs(surface_metrics(static)["track_motion_captured"]) < 1e-6
    half = surface_metrics(trainer_with(lambda f: middle(inner(vertices[0])) + 0.5 * (vertices[f][0] - vertices[0][0])))
    assert abs(half["track_motion_captured"] - 0.5) < 1e-4, half


def test_silhouette_point_weight_reaches_the_loss(tiny_scene, tmp_path):
    frames = torch.arange(0, 4)
    terms = {}
    for weight in (1.0, 3.0):
        trainer = Stage1Trainer(tiny_scene, tmp_path / f"w{weight:g}", tiny_config(silhouette_point_weight=weight))
        terms[weight] = float(trainer.batch_losses(frames)["silhouette"].detach())
    with torch.no_grad():  # both trainers start from the same seeded model
        pixels, _ = project(trainer.model(trainer.data.times[frames]), trainer.data.w2c[frames], trainer.data.intrinsics[frames])
    point_to_mask = sum(
        float(silhouette_chamfer(p, trainer.data.mask_pixels[i])[0]) for p, i in zip(pixels, frames.tolist())
    ) * trainer.pixel_scale**2 / len(frames)
    assert point_to_mask > 0
    assert terms[3.0] == pytest.approx(terms[1.0] + 2.0 * point_to_mask, rel=1e-4)
    with pytest.raises(ValueError, match="silhouette_point_weight"):
        tiny_config(silhouette_point_weight=0.0).validate()


def test_cloud_motion_measures_how_far_the_points_move():
    """A unit square translated by 0.3·t along x: the mean displacement from the reference frame over
    the diagonal √2; 0 for a cloud that stays put."""
    from npg.stage1.export import cloud_motion

    square = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    times = torch.linspace(0, 1, 5)
    moving = lambda t: square[None] + 0.3 * t[:, None, None] * torch.tensor([1.0, 0.0, 0.0])  # noqa: E731
    expected = 0.3 * (times - times[2]).abs().mean() / 2**0.5
    assert abs(cloud_motion(moving, times, 2, chunk=2) - expected) < 1e-6
    assert cloud_motion(lambda t: square[None].expand(len(t), -1, -1), times, 0) == 0.0
