"""D-NeRF / Blender loader: conversions against hand-computed cameras, round trips, validation, real data."""
import json
import math
import os
import warnings

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from npg.data import SceneFormatError, clear_cache, load_scene, resolve_background
from npg.data.scene import area_downsample

W, H = 64, 48
ANGLE_X = 2 * math.atan(32 / 40)  # fx = W / (2 tan(angle/2)) = 40 exactly


def look_from_plus_x():
    """OpenGL c2w of a camera at (4, 0, 0) looking at the origin with world +z up.

    Forward (−z_cam) = −x_world, so z_cam = (1, 0, 0); y_cam = up = (0, 0, 1); x_cam = y × z = (0, 1, 0).
    """
    c2w = np.eye(4)
    c2w[:3, 0] = [0, 1, 0]
    c2w[:3, 1] = [0, 0, 1]
    c2w[:3, 2] = [1, 0, 0]
    c2w[:3, 3] = [4, 0, 0]
    return c2w


def look_from_plus_z():
    c2w = np.eye(4)
    c2w[2, 3] = 4.0
    return c2w


def rgba_frame(k: int, width=W, height=H) -> np.ndarray:
    rng = np.random.default_rng(k)
    img = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    img[..., 3] = 0
    img[10:30, 12 + k : 40 + k, 3] = 255
    img[30:34, 12:40, 3] = 100  # partial coverage
    return img


def write_scene(root, frames, split="train", meta_extra=None, rgb_only=False):
    """frames: list of (name, c2w, time or None). Writes transforms_<split>.json and the PNGs; odd
    frames' file_path ends in .png, even ones omit it (both occur in Blender-NeRF files)."""
    (root / split).mkdir(parents=True, exist_ok=True)
    entries = []
    for k, (name, c2w, t) in enumerate(frames):
        file_path = f"./{split}/{name}" + (".png" if k % 2 else "")
        entry = {"file_path": file_path, "transform_matrix": np.asarray(c2w).tolist()}
        if t is not None:
            entry["time"] = t
        entries.append(entry)
        img = rgba_frame(k)
        iio.imwrite(root / split / f"{name}.png", img[..., :3] if rgb_only else img)
    meta = {"camera_angle_x": ANGLE_X, "frames": entries}
    meta.update(meta_extra or {})
    (root / f"transforms_{split}.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(autouse=True)
def _fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NPG_CACHE_DIR", str(tmp_path / "cache"))
    clear_cache()
    yield
    clear_cache()


# ------------------------------------------------------------------ conversion, by hand
def test_hand_computed_cameras(tmp_path):
    frames = [("a", look_from_plus_z(), 0.0), ("b", look_from_plus_x(), 1.0)]
    scene = load_scene(write_scene(tmp_path, frames))
    cam_z, cam_x = scene.cameras
    assert (cam_z.fx, cam_z.fy, cam_z.cx, cam_z.cy) == pytest.approx((40.0, 40.0, 31.5, 23.5))
    assert cam_z.width == W and cam_z.height == H
    # camera at (0,0,4): world (1, 0.5, 0) is at camera (1, -0.5, 4) in OpenCV axes -> u = 40/4 + 31.5, v = -20/4 + 23.5
    uv, z = cam_z.project(torch.tensor([[1.0, 0.5, 0.0]]))
    assert uv[0].tolist() == pytest.approx([41.5, 18.5], abs=1e-5) and float(z[0]) == pytest.approx(4.0)
    # camera at (4,0,0), z up: world (0, -2, -1) is at camera (-2, 1, 4) -> u = -80/4 + 31.5, v = 40/4 + 23.5
    uv, z = cam_x.project(torch.tensor([[0.0, -2.0, -1.0]]))
    assert uv[0].tolist() == pytest.approx([11.5, 33.5], abs=1e-5) and float(z[0]) == pytest.approx(4.0)
    assert cam_x.campos.tolist() == pytest.approx([4.0, 0.0, 0.0], abs=1e-6)
    assert torch.linalg.det(cam_x.w2c[:3, :3]).item() == pytest.approx(1.0, abs=1e-6)


def test_explicit_intrinsics_use_nerfstudio_pixel_convention(tmp_path):
    extra = {"fl_x": 50.0, "camera_angle_y": 2 * math.atan(24 / 30), "cx": 33.0, "cy": 20.0, "w": W, "h": H}
    scene = load_scene(write_scene(tmp_path, [("a", look_from_plus_z(), 0.5)], meta_extra=extra))
    cam = scene.cameras[0]
    assert (cam.fx, cam.fy, cam.cx, cam.cy) == pytest.approx((50.0, 30.0, 32.5, 19.5))


# ------------------------------------------------------------------ round trip
def test_round_trip_sorted_by_time_and_compositing(tmp_path):
    times = [0.75, 0.0, 0.5, 1.0, 0.25]
    frames = [(f"r_{k:03d}", look_from_plus_z(), t) for k, t in enumerate(times)]
    scene = load_scene(write_scene(tmp_path, frames))
    order = np.argsort(times)
    assert len(scene) == 5 and (scene.height, scene.width) == (H, W)
    assert scene.times.dtype == torch.float32 and scene.times.tolist() == sorted(times)
    assert [p.name for p in scene.files] == [f"r_{k:03d}.png" for k in order]
    for i, k in enumerate(order):
        img = rgba_frame(int(k))
        assert torch.equal(scene.rgb[i], torch.from_numpy(img[..., :3]))
        assert torch.equal(scene.alpha[i], torch.from_numpy(img[..., 3]))
    img = rgba_frame(int(order[2])).astype(np.float32) / 255
    expected = img[..., :3] * img[..., 3:] + (1 - img[..., 3:])
    got = scene.image(2, "white")
    assert got.shape == (3, H, W) and got.dtype == torch.float32
    assert torch.allclose(got, torch.from_numpy(expected).permute(2, 0, 1), atol=1e-6)
    assert torch.allclose(scene.image(2, (1, 1, 1)), got) and torch.allclose(scene.image(2, torch.ones(3)), got)
    black = scene.image(2)
    assert torch.allclose(black, torch.from_numpy(img[..., :3] * img[..., 3:]).permute(2, 0, 1), atol=1e-6)
    mask = scene.mask(2)
    assert mask.dtype == torch.bool and torch.equal(mask, torch.from_numpy(rgba_frame(int(order[2]))[..., 3] >= 128))
    assert scene.masks().shape == (5, H, W) and scene.images("white").shape == (5, 3, H, W)
    # alternating / random backgrounds: per call, reproducible with a generator
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(scene.image(0, "random", generator=g1), scene.image(0, "random", generator=g2))
    noise = scene.image(0, "noise", generator=g1)
    assert noise.shape == (3, H, W)


def test_backgrounds_and_errors():
    assert resolve_background("white").tolist() == [1, 1, 1]
    assert resolve_background((0.2, 0.4, 0.6)).tolist() == pytest.approx([0.2, 0.4, 0.6])
    with pytest.raises(ValueError, match="unknown background"):
        resolve_background("purple")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        resolve_background((0, 0, 255))
    with pytest.raises(ValueError, match="shape"):
        resolve_background(torch.zeros(4))


def test_rgb_images_have_no_masks_unless_a_mask_folder_is_given(tmp_path):
    frames = [("a", look_from_plus_z(), 0.0), ("b", look_from_plus_z(), 1.0)]
    scene = load_scene(write_scene(tmp_path, frames, rgb_only=True))
    assert scene.alpha is None and not scene.has_masks
    assert torch.equal(scene.image(0, "white"), scene.image(0, "black"))  # opaque
    with pytest.raises(SceneFormatError, match="no masks.*silhouette"):
        scene.mask(0)
    user = tmp_path / "user_masks"
    (user / "train").mkdir(parents=True)
    m = np.zeros((H, W), np.uint8)
    m[5:20, 5:20] = 255
    iio.imwrite(user / "train" / "a.png", m)
    iio.imwrite(user / "b.png", (m > 0).astype(np.uint8))  # 0/1 masks by bare name
    clear_cache()
    scene = load_scene(tmp_path, masks=user)
    assert scene.has_masks and torch.equal(scene.mask(0), torch.from_numpy(m > 0))
    assert torch.equal(scene.mask(1), scene.mask(0))
    (user / "b.png").unlink()
    with pytest.raises(SceneFormatError, match="no mask for image .*b.png"):
        load_scene(tmp_path, masks=user)


def test_area_downsample_is_premultiplied(tmp_path):
    frames = [("a", look_from_plus_z(), 0.0), ("b", look_from_plus_x(), 1.0)]
    write_scene(tmp_path, frames)
    full = load_scene(tmp_path, downsample=1)
    half = load_scene(tmp_path, downsample=2)
    assert (half.height, half.width) == (H // 2, W // 2)
    for cam_full, cam_half in zip(full.cameras, half.cameras):
        ref = cam_full.scaled(0.5)
        assert (cam_half.fx, cam_half.fy, cam_half.cx, cam_half.cy) == pytest.approx((ref.fx, ref.fy, ref.cx, ref.cy))
        assert (cam_half.width, cam_half.height) == (ref.width, ref.height)
    # compositing after downsampling == downsampling the composite (up to two uint8 roundings)
    for bg in ("black", "white", (0.3, 0.9, 0.1)):
        for i in range(2):
            composite = full.image(i, bg)
            box = composite.reshape(3, H // 2, 2, W // 2, 2).mean(dim=(2, 4))
            assert (half.image(i, bg) - box).abs().max() < 1.5 / 255
    # straight-colour averaging would be wrong: transparent pixels' colour must not bleed in
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0] = 200
    alpha = np.zeros((2, 2), np.uint8)
    alpha[0, 0] = 255
    small_rgb, small_a = area_downsample(rgb, alpha, 2)
    assert small_rgb[0, 0].tolist() == [200, 200, 200] and small_a[0, 0] == 64
    # an opaque image is a plain box mean
    img = np.random.default_rng(0).integers(0, 256, (8, 6, 3), dtype=np.uint8)
    small, none = area_downsample(img, None, 2)
    assert none is None and np.abs(small.astype(float) - img.reshape(4, 2, 3, 2, 3).mean(axis=(1, 3))).max() <= 0.5


def test_odd_size_downsample_and_bad_factor(tmp_path):
    write_scene(tmp_path, [("a", look_from_plus_z(), 0.0)])
    third = load_scene(tmp_path, downsample=3)
    assert (third.width, third.height) == (21, 16)
    cam = third.cameras[0]
    assert cam.fx == pytest.approx(40 * 21 / 64) and cam.cx == pytest.approx(32 * 21 / 64 - 0.5)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="downsample"):
            load_scene(tmp_path, downsample=bad)


def test_missing_time_everywhere_uses_index_with_a_warning(tmp_path):
    write_scene(tmp_path, [(f"r{k}", look_from_plus_z(), None) for k in range(3)])
    with pytest.warns(UserWarning, match="no frame has a 'time'"):
        scene = load_scene(tmp_path)
    assert scene.times.tolist() == [0.0, 0.5, 1.0]


# ------------------------------------------------------------------ validation
def test_validation_errors_name_the_file(tmp_path):
    ok = [("a", look_from_plus_z(), 0.0), ("b", look_from_plus_z(), 1.0)]

    def case(name):
        root = tmp_path / name
        root.mkdir()
        return root

    root = write_scene(case("missing"), ok)
    (root / "train" / "b.png").unlink()
    with pytest.raises(SceneFormatError, match=r"frame 1 \('./train/b.png'\): image not found"):
        load_scene(root)

    root = write_scene(case("corrupt"), ok)
    (root / "train" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(SceneFormatError, match=r"b.png is unreadable or corrupt"):
        load_scene(root)

    root = write_scene(case("size"), ok)
    iio.imwrite(root / "train" / "b.png", rgba_frame(1, width=W + 2))
    with pytest.raises(SceneFormatError, match=r"b.png is 66x48 but .* expects 64x48"):
        load_scene(root)

    root = write_scene(case("time"), [("a", look_from_plus_z(), 0.0), ("b", look_from_plus_z(), 1.5)])
    with pytest.raises(SceneFormatError, match=r"frame 1 .*time 1.5 is outside \[0, 1\]"):
        load_scene(root)

    root = write_scene(case("partial_time"), [("a", look_from_plus_z(), 0.0), ("b", look_from_plus_z(), None)])
    with pytest.raises(SceneFormatError, match=r"frame 1 .*'time' is missing"):
        load_scene(root)

    bad = look_from_plus_z()
    bad[0, 3] = np.nan
    root = write_scene(case("nan"), [("a", look_from_plus_z(), 0.0), ("b", bad, 1.0)])
    assert "NaN" in (root / "transforms_train.json").read_text()
    with pytest.raises(SceneFormatError, match=r"transforms_train.json frame 1 .*NaN or Inf"):
        load_scene(root)

    scaled = look_from_plus_z()
    scaled[:3, :3] *= 2
    root = write_scene(case("scaled"), [("a", scaled, 0.0)])
    with pytest.raises(SceneFormatError, match="not a rotation"):
        load_scene(root)

    root = write_scene(case("json"), ok)
    (root / "transforms_train.json").write_text('{"camera_angle_x": 0.7, "frames": [')
    with pytest.raises(SceneFormatError, match=r"transforms_train.json is malformed JSON \(line 1"):
        load_scene(root)

    root = write_scene(case("nofov"), ok)
    meta = json.loads((root / "transforms_train.json").read_text())
    del meta["camera_angle_x"]
    (root / "transforms_train.json").write_text(json.dumps(meta))
    with pytest.raises(SceneFormatError, match="camera_angle_x"):
        load_scene(root)

    root = write_scene(case("mixed"), ok)
    iio.imwrite(root / "train" / "b.png", rgba_frame(1)[..., :3])
    with pytest.raises(SceneFormatError, match="b.png has no alpha channel"):
        load_scene(root)

    with pytest.raises(SceneFormatError, match="splits are: train"):
        load_scene(root, "test")
    with pytest.raises(SceneFormatError, match="scene not found"):
        load_scene(tmp_path / "nowhere")
    with pytest.raises(SceneFormatError, match="not a scene folder"):
        load_scene(case("empty"))


def test_memory_cache_reloads_changed_files(tmp_path):
    write_scene(tmp_path, [("a", look_from_plus_z(), 0.0), ("b", look_from_plus_z(), 1.0)])
    first = load_scene(tmp_path)
    assert load_scene(tmp_path) is first
    assert load_scene(tmp_path, cache="none") is not first
    img = rgba_frame(7)
    iio.imwrite(tmp_path / "train" / "b.png", img)
    os.utime(tmp_path / "train" / "b.png", ns=(1, 1))  # a new mtime even on coarse-clock file systems
    second = load_scene(tmp_path)
    assert second is not first and torch.equal(second.rgb[1], torch.from_numpy(img[..., :3]))


def test_disk_cache_round_trip(tmp_path):
    write_scene(tmp_path, [("a", look_from_plus_z(), 0.0), ("b", look_from_plus_x(), 1.0)])
    built = load_scene(tmp_path, downsample=2, cache="disk")
    caches = list((tmp_path / "cache").rglob("images_train_ds2.npz"))
    assert len(caches) == 1
    clear_cache()
    cached = load_scene(tmp_path, downsample=2, cache="disk")
    assert cached is not built and torch.equal(cached.rgb, built.rgb) and torch.equal(cached.alpha, built.alpha)
    assert all(torch.equal(a.w2c, b.w2c) and a.fx == b.fx for a, b in zip(cached.cameras, built.cameras))
    caches[0].write_bytes(b"truncated")
    clear_cache()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rebuilt = load_scene(tmp_path, downsample=2, cache="disk")
    assert torch.equal(rebuilt.rgb, built.rgb) and any("unreadable image cache" in str(w.message) for w in caught)


# ------------------------------------------------------------------ the real D-NeRF lego (100x100)
def test_real_dnerf_lego_tiny(data_dir):
    root = data_dir / "scenes" / "dnerf_lego_tiny"
    counts = {"train": 50, "val": 11, "test": 20}
    for split, count in counts.items():
        scene = load_scene(root, split)
        assert len(scene) == count and (scene.width, scene.height) == (100, 100) and scene.has_masks
        assert scene.times[0] == 0 and scene.times[-1] == 1 and bool((scene.times[1:] >= scene.times[:-1]).all())
        cam = scene.cameras[0]
        assert cam.fx == pytest.approx(100 / (2 * math.tan(0.6911112070083618 / 2))) and cam.cx == 49.5
        for i in range(0, count, 5):
            cam = scene.cameras[i]
            # the lego sits at the world origin: its silhouette's centroid is near the origin's projection
            ys, xs = torch.nonzero(scene.mask(i), as_tuple=True)
            origin, _ = cam.project(torch.zeros(1, 3))
            assert abs(xs.float().mean() - origin[0, 0]) < 12 and abs(ys.float().mean() - origin[0, 1]) < 12
            # world +z is up in Blender: a point above the origin appears higher in the image (smaller v)
            above, _ = cam.project(torch.tensor([[0.0, 0.0, 1.0]]))
            assert above[0, 1] < origin[0, 1]
    half = load_scene(root, "train", downsample=2)
    assert (half.width, half.height) == (50, 50) and half.cameras[0].cx == 24.5
