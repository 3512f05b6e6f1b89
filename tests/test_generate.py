"""Scene generator: the tiny preset rendered into a temporary folder — D-NeRF layout, ground truth
checked geometrically against the cameras and vertices, determinism, reuse/force, the loader round
trip and OpenCV flow against the true flow."""
import filecmp
import json
import os

import imageio.v3 as iio
import numpy as np
import pytest

from npg.data import generate
from npg.data.generate import load_ground_truth, make_scene

COUNTS = {"train": 20, "val": 4, "test": 4}
SIZE = 64


@pytest.fixture(scope="module")
def tiny_scene(tmp_path_factory):
    return make_scene(tmp_path_factory.mktemp("scenes") / "arc", "generated_arc", "tiny", seed=0, progress=False)


def _transforms(scene, split):
    return json.loads((scene / f"transforms_{split}.json").read_text())


def test_layout_and_transforms(tiny_scene):
    for split, n in COUNTS.items():
        meta = _transforms(tiny_scene, split)
        assert meta["camera_angle_x"] == pytest.approx(0.6911112070083618)
        frames = meta["frames"]
        assert [f["file_path"] for f in frames] == [f"./{split}/r_{i:03d}" for i in range(n)]
        times = np.array([f["time"] for f in frames])
        assert np.all((times >= 0) & (times <= 1)) and np.all(np.diff(times) >= 0)
        for f in frames:
            c2w = np.array(f["transform_matrix"])
            assert c2w.shape == (4, 4) and np.allclose(c2w[3], [0, 0, 0, 1])
            np.testing.assert_allclose(c2w[:3, :3] @ c2w[:3, :3].T, np.eye(3), atol=1e-9)
            # OpenGL: the camera looks down its −z axis, at the object at the origin
            look = -c2w[:3, 2]
            to_origin = -c2w[:3, 3] / np.linalg.norm(c2w[:3, 3])
            np.testing.assert_allclose(look, to_origin, atol=1e-9)
            img = iio.imread(tiny_scene / (f["file_path"] + ".png"))
            assert img.shape == (SIZE, SIZE, 4) and img.dtype == np.uint8
            coverage = (img[..., 3] > 0).mean()
            assert 0.03 < coverage < 0.8, coverage
            assert img[0, 0, 3] == 0 and (img[..., 3] == 255).any()
    train = np.array([f["time"] for f in _transforms(tiny_scene, "train")["frames"]])
    np.testing.assert_allclose(train, np.linspace(0, 1, COUNTS["train"]))
    eyes = [np.array(f["transform_matrix"])[:3, 3] for f in _transforms(tiny_scene, "train")["frames"]]
    assert min(np.linalg.norm(a - b) for a, b in zip(eyes[:-1], eyes[1:])) > 0.1  # a new viewpoint every frame
    val = _transforms(tiny_scene, "val")["frames"]
    assert all(f["transform_matrix"] == val[0]["transform_matrix"] for f in val)  # one fixed camera
    np.testing.assert_allclose([f["time"] for f in val], np.linspace(0, 1, COUNTS["val"]))
    test_times = [f["time"] for f in _transforms(tiny_scene, "test")["frames"]]
    assert not set(test_times) & set(train.tolist())  # held-out times
    meta = json.loads((tiny_scene / "scene.json").read_text())
    assert meta["preset"] == "generated_arc" and meta["asset"]["name"] == "fox"
    assert meta["animation"]["name"] == "Survey" and meta["frames"] == COUNTS
    assert "PixelMannen" in (tiny_scene / "ASSET_LICENSE.md").read_text()


def _unproject(depth, K, w2c):
    ys, xs = np.nonzero(depth > 0)
    z = depth[ys, xs].astype(np.float64)
    cam = np.stack([(xs - K[0, 2]) * z / K[0, 0], (ys - K[1, 2]) * z / K[1, 1], z], 1)
    world = (cam - w2c[:3, 3]) @ w2c[:3, :3]  # R^T (x − t)
    return ys, xs, world


def _barycentric(points, tri):
    """Barycentrics of points [M,3] w.r.t. triangles [M,3,3] (least squares in the plane) and the distance to the plane."""
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    e1, e2, d = b - a, c - a, points - a
    g11, g12, g22 = (e1 * e1).sum(1), (e1 * e2).sum(1), (e2 * e2).sum(1)
    r1, r2 = (d * e1).sum(1), (d * e2).sum(1)
    det = g11 * g22 - g12 * g12
    beta = (g22 * r1 - g12 * r2) / det
    gamma = (g11 * r2 - g12 * r1) / det
    bary = np.stack([1 - beta - gamma, beta, gamma], 1)
    off_plane = np.linalg.norm(d - beta[:, None] * e1 - gamma[:, None] * e2, axis=1)
    return bary, off_plane


def test_ground_truth_is_consistent_with_cameras_and_surface(tiny_scene):
    gt = load_ground_truth(tiny_scene, "train")
    n = COUNTS["train"]
    V = 1728
    assert gt["vertices"].shape == (n, V, 3) and gt["faces"].shape == (576, 3)
    assert gt["depth"].shape == (n, SIZE, SIZE) and gt["face_id"].shape == (n, SIZE, SIZE)
    assert gt["flow"].shape == (n - 1, SIZE, SIZE, 2) and gt["flow_valid"].shape == (n - 1, SIZE, SIZE)
    np.testing.assert_array_equal(gt["times"], np.float32([f["time"] for f in _transforms(tiny_scene, "train")["frames"]]))
    # canonical size: the animated object stays inside the unit sphere and reaches it
    radius = np.linalg.norm(gt["vertices"], axis=2).max()
    assert 0.8 < radius <= 1.0 + 1e-5
    K, faces = gt["K"], gt["faces"]
    np.testing.assert_allclose(K, [[K[0, 0], 0, (SIZE - 1) / 2], [0, K[0, 0], (SIZE - 1) / 2], [0, 0, 1]])
    assert K[0, 0] == pytest.approx(SIZE / (2 * np.tan(0.6911112070083618 / 2)))
    for i, frame in enumerate(_transforms(tiny_scene, "train")["frames"]):
        c2w_cv = np.array(frame["transform_matrix"]) @ np.diag([1.0, -1, -1, 1])
        np.testing.assert_allclose(np.linalg.inv(c2w_cv), gt["w2c"][i], atol=1e-9)
    flow_pixels = foreground = 0
    for i in range(n - 1):
        depth, face_id = gt["depth"][i], gt["face_id"][i]
        np.testing.assert_array_equal(depth > 0, face_id >= 0)
        # the point seen at each pixel (from depth and camera) lies on the visible triangle
        ys, xs, world = _unproject(depth, K, gt["w2c"][i])
        tri_now = gt["vertices"][i][faces[face_id[ys, xs]]].astype(np.float64)
        bary, off_plane = _barycentric(world, tri_now)
        assert off_plane.max() < 1e-4
        assert bary.min() > -1e-3 and bary.max() < 1 + 1e-3
        # following that surface point to frame i+1 and projecting it gives the stored flow
        moved = np.einsum("mk,mkc->mc", bary, gt["vertices"][i + 1][faces[face_id[ys, xs]]].astype(np.float64))
        w2c = gt["w2c"][i + 1]
        cam = moved @ w2c[:3, :3].T + w2c[:3, 3]
        expected = np.stack([K[0, 0] * cam[:, 0] / cam[:, 2] + K[0, 2] - xs, K[1, 1] * cam[:, 1] / cam[:, 2] + K[1, 2] - ys], 1)
        np.testing.assert_allclose(gt["flow"][i][ys, xs], expected, atol=2e-3)
        assert np.all(gt["flow"][i][depth == 0] == 0)
        valid = gt["flow_valid"][i]
        assert not valid[depth == 0].any()
        flow_pixels += valid.sum()
        foreground += (depth > 0).sum()
        assert valid.sum() > 0.6 * (depth > 0).sum()  # 15° of arc per frame at 64 px: real occlusions
    assert flow_pixels > 0.85 * foreground  # measured 0.93


def test_val_and_test_ground_truth(tiny_scene):
    for split in ("val", "test"):
        gt = load_ground_truth(tiny_scene, split)
        n = COUNTS[split]
        assert gt["vertices"].shape == (n, 1728, 3) and gt["depth"].shape == (n, SIZE, SIZE)
        assert "flow" not in gt
        times = np.float32([f["time"] for f in _transforms(tiny_scene, split)["frames"]])
        np.testing.assert_array_equal(gt["times"], times)
    with pytest.raises(ValueError, match="split"):
        load_ground_truth(tiny_scene, "training")


def test_rendering_is_deterministic_reused_and_replaced_only_with_force(tiny_scene, tmp_path):
    other = make_scene(tmp_path / "b", "generated_arc", "tiny", seed=1, progress=False)
    assert _transforms(other, "train") != _transforms(tiny_scene, "train")  # the seed moves the cameras
    with pytest.raises(FileExistsError, match="force"):
        make_scene(other, "generated_arc", "tiny", seed=0, progress=False)
    make_scene(other, "generated_arc", "tiny", seed=0, force=True, progress=False)
    files = sorted(p.relative_to(tiny_scene) for p in tiny_scene.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(other) for p in other.rglob("*") if p.is_file())
    assert len(files) == sum(COUNTS.values()) + 3 + 4 + 2  # PNGs, transforms, gt/*.npz, scene.json + licence
    for rel in files:
        assert filecmp.cmp(tiny_scene / rel, other / rel, shallow=False), f"{rel} differs between two renders"
    # same request: reused without rendering
    stamp = os.stat(tiny_scene / "scene.json").st_mtime_ns
    assert make_scene(tiny_scene, "generated_arc", "tiny", seed=0, progress=False) == tiny_scene
    assert os.stat(tiny_scene / "scene.json").st_mtime_ns == stamp
    # a folder npg did not write is never replaced
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a scene"):
        make_scene(foreign, "generated_arc", "tiny", force=True, progress=False)
    assert (foreign / "notes.txt").read_text() == "mine"
    assert not list(tmp_path.glob(".*.tmp-*"))  # no temporary folders left behind


def test_missing_asset_is_reported_clearly(monkeypatch, tmp_path):
    monkeypatch.setattr(generate, "_shared_asset_dirs", lambda: [tmp_path / "nowhere"])
    with pytest.raises(FileNotFoundError, match="robot_expressive.*missing"):
        generate.find_asset("robot_expressive")
    with pytest.raises(FileNotFoundError, match="NPG_ASSETS"):
        make_scene(tmp_path / "robot", "robot_dance_arc", "tiny", progress=False)
    assert generate.find_asset("fox").is_file()  # bundled with the package
    with pytest.raises(KeyError, match="preset"):
        make_scene(tmp_path / "x", "no_such_preset", "tiny")
    with pytest.raises(FileNotFoundError):
        load_ground_truth(tmp_path, "train")


def test_cli(tiny_scene, tmp_path, capsys):
    assert generate.main(["--list"]) == 0
    assert "robot_dance_arc" in capsys.readouterr().out
    assert generate.main([str(tiny_scene), "--size", "tiny", "--quiet"]) == 0  # reuses the scene
    assert capsys.readouterr().out.strip() == str(tiny_scene)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x").write_text("x")
    assert generate.main([str(foreign), "--size", "tiny", "--quiet"]) == 2
    assert "not a scene" in capsys.readouterr().err


def test_loads_back_through_the_scene_loader(tiny_scene):
    data = pytest.importorskip("npg.data")
    if not hasattr(data, "load_scene"):
        pytest.skip("npg.data.load_scene is not available")
    for split in ("train", "test"):
        scene = data.load_scene(tiny_scene, split)
        gt = load_ground_truth(tiny_scene, split)
        assert len(scene) == COUNTS[split] and scene.height == SIZE and scene.width == SIZE
        np.testing.assert_allclose(scene.times.numpy(), gt["times"])
        for cam, w2c in zip(scene.cameras, gt["w2c"]):
            np.testing.assert_allclose(cam.w2c.double().numpy(), w2c, atol=1e-5)
            np.testing.assert_allclose([cam.fx, cam.fy, cam.cx, cam.cy], gt["K"][[0, 1, 0, 1], [0, 1, 2, 2]], rtol=1e-6)
        for i in range(len(scene)):
            mask = scene.mask(i).numpy()
            fg = gt["face_id"][i] >= 0
            assert (mask & fg).sum() / (mask | fg).sum() > 0.9


def _flow_epe(scene_dir):
    """Mean (over frame pairs) end-point error of OpenCV DIS flow vs the true flow on valid pixels, and the
    same for a zero flow."""
    data = pytest.importorskip("npg.data")
    flow = pytest.importorskip("npg.data.flow")
    if not hasattr(flow, "compute_flow") or not hasattr(data, "load_scene"):
        pytest.skip("npg.data.flow.compute_flow / npg.data.load_scene not available")
    scene = data.load_scene(scene_dir, "train")
    gt = load_ground_truth(scene_dir, "train")
    errors, still = [], []
    for i in range(len(scene) - 1):
        a = scene.image(i, background="black").permute(1, 2, 0).numpy()
        b = scene.image(i + 1, background="black").permute(1, 2, 0).numpy()
        estimate = flow.compute_flow(a, b, method="dis")
        valid = gt["flow_valid"][i]
        errors.append(np.linalg.norm(estimate - gt["flow"][i], axis=-1)[valid].mean())
        still.append(np.linalg.norm(gt["flow"][i], axis=-1)[valid].mean())
    return float(np.mean(errors)), float(np.mean(still))


def test_opencv_flow_against_true_flow_tiny(tiny_scene):
    # tiny: 64×64, 15° of camera arc per frame. Measured: DIS 1.86 px mean EPE, zero flow 3.34 px.
    epe, zero = _flow_epe(tiny_scene)
    assert epe < 2.5 and epe < 0.75 * zero, (epe, zero)


@pytest.mark.slow
def test_opencv_flow_against_true_flow_generated_arc_small(tmp_path):
    # generated_arc, small (60 frames, 200×200, 5° of arc per frame). Measured on the CPU box:
    # DIS mean EPE 0.58 px (median over pairs 0.51, worst pair 1.31) while the true motion averages 3.3 px.
    scene = make_scene(tmp_path / "small", "generated_arc", "small", progress=False)
    epe, zero = _flow_epe(scene)
    assert epe < 0.9 and epe < 0.3 * zero, (epe, zero)
