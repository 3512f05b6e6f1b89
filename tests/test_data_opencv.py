"""Ub4D-style loader: projection-matrix decomposition, round trip, masks, novel cameras, validation."""
import imageio.v3 as iio
import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from npg.data import SceneFormatError, clear_cache, load_scene
from npg.data.opencv_cams import decompose_projection, load_novel_cameras

W, H, F = 48, 36, 5
K_TRUE = np.array([[60.0, 0.0, 23.0], [0.0, 58.0, 17.5], [0.0, 0.0, 1.0]])


def w2c_looking_at_origin(i):
    """OpenCV w2c of a camera on a circle of radius 3 around the y axis, looking at the origin."""
    angle = 0.3 * i
    centre = np.array([3 * np.sin(angle), 0.5, -3 * np.cos(angle)])
    forward = -centre / np.linalg.norm(centre)
    right = np.cross(forward, [0.0, -1.0, 0.0])  # OpenCV: y points down, so "up" is −y
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    R = np.stack([right, down, forward])  # rows: camera axes in world coordinates
    w2c = np.eye(4)
    w2c[:3, :3] = R
    w2c[:3, 3] = -R @ centre
    return w2c


def write_ub4d(root, count=F, scales=None, masks=True, novel=None):
    (root / "rgb").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    mats = {}
    for i in range(count):
        scale = 1.0 if scales is None else scales[i]
        mats[f"proj_mat_{i}"] = scale * K_TRUE @ w2c_looking_at_origin(i)[:3]
        iio.imwrite(root / "rgb" / f"{i}.png", rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
        if masks:
            (root / "mask").mkdir(exist_ok=True)
            m = np.zeros((H, W), np.uint8)
            m[10:20, 5 + i : 15 + i] = 255
            iio.imwrite(root / "mask" / f"{i}.png", m)
    np.savez(root / "projection_matrix.npz", **mats)
    if novel is not None:
        novel_mats = {f"proj_mat_{j}": K_TRUE @ w2c_looking_at_origin(j + 10)[:3] for j in range(novel)}
        np.savez(root / "novel_projection_matrix.npz", **novel_mats)
    return root


@pytest.fixture(autouse=True)
def _fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NPG_CACHE_DIR", str(tmp_path / "cache"))
    clear_cache()
    yield
    clear_cache()


@pytest.mark.parametrize("scale", [1.0, 3.7, -2.5, -1e-3])
def test_decomposition_recovers_K_R_t(scale):
    rng = np.random.default_rng(7)
    for _ in range(5):
        R = Rotation.random(random_state=rng).as_matrix()
        t = rng.normal(size=3)
        fx, fy, cx, cy = rng.uniform(50, 900), rng.uniform(50, 900), rng.uniform(10, 500), rng.uniform(10, 500)
        K = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
        P = scale * K @ np.hstack([R, t[:, None]])
        K_out, w2c = decompose_projection(P)
        assert np.allclose(K_out, K, rtol=1e-9, atol=1e-7)
        assert np.allclose(w2c[:3, :3], R, atol=1e-9) and np.allclose(w2c[:3, 3], t, atol=1e-9)
        assert np.linalg.det(w2c[:3, :3]) == pytest.approx(1.0)


def test_decomposition_errors():
    with pytest.raises(SceneFormatError, match="must be 3x4"):
        decompose_projection(np.eye(3))
    with pytest.raises(SceneFormatError, match="NaN"):
        decompose_projection(np.full((3, 4), np.nan))
    with pytest.raises(SceneFormatError, match="singular"):
        decompose_projection(np.zeros((3, 4)))


def test_round_trip_projects_like_the_matrices(tmp_path):
    root = write_ub4d(tmp_path, scales=[1.0, -2.0, 0.5, 10.0, -1.0])
    scene = load_scene(root)
    assert scene.format == "opencv" and len(scene) == F and (scene.width, scene.height) == (W, H)
    assert scene.times.tolist() == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    assert scene.has_masks and torch.equal(scene.mask(2), torch.from_numpy(iio.imread(root / "mask" / "2.png") > 0))
    points = torch.tensor([[0.0, 0.0, 0.0], [0.3, -0.2, 0.4], [-0.5, 0.1, -0.2]], dtype=torch.float64)
    for i, cam in enumerate(scene.cameras):
        assert (cam.fx, cam.fy, cam.cx, cam.cy) == pytest.approx((60.0, 58.0, 23.0, 17.5))
        P = K_TRUE @ w2c_looking_at_origin(i)[:3]
        hom = points.numpy() @ P[:, :3].T + P[:, 3]
        expected = hom[:, :2] / hom[:, 2:]
        uv, z = cam.project(points)
        assert np.allclose(uv.numpy(), expected, atol=1e-4) and bool((z > 0).all())
    half = load_scene(root, downsample=2)
    assert half.cameras[0].fx == pytest.approx(30.0) and half.cameras[0].cx == pytest.approx((23.0 + 0.5) / 2 - 0.5)


def test_splits_novel_cameras_and_no_masks(tmp_path):
    root = write_ub4d(tmp_path, masks=False, novel=1)
    scene = load_scene(root, "all")
    assert not scene.has_masks
    with pytest.raises(SceneFormatError, match="load_novel_cameras"):
        load_scene(root, "test")
    cams, times = load_novel_cameras(root)
    assert len(cams) == F and times.tolist() == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    assert torch.allclose(cams[0].w2c, cams[4].w2c)
    assert torch.allclose(cams[0].w2c, torch.tensor(w2c_looking_at_origin(10), dtype=torch.float32), atol=1e-6)
    per_frame = {f"proj_mat_{j}": K_TRUE @ w2c_looking_at_origin(j)[:3] for j in range(F)}
    np.savez(root / "novel_projection_matrix.npz", **per_frame)
    cams, _ = load_novel_cameras(root, downsample=2)
    assert cams[3].width == W // 2 and torch.allclose(cams[3].w2c, scene.cameras[3].w2c, atol=1e-6)
    np.savez(root / "novel_projection_matrix.npz", proj_mat_0=K_TRUE @ np.eye(4)[:3], proj_mat_1=K_TRUE @ np.eye(4)[:3])
    with pytest.raises(SceneFormatError, match="expected 1 or one per frame"):
        load_novel_cameras(root)


def test_validation(tmp_path):
    root = write_ub4d(tmp_path / "count")
    (root / "rgb" / "4.png").unlink()
    with pytest.raises(SceneFormatError, match="has 5 cameras but .*rgb holds 4 images"):
        load_scene(root)
    root = write_ub4d(tmp_path / "index")
    mats = dict(np.load(root / "projection_matrix.npz"))
    del mats["proj_mat_2"]
    np.savez(root / "projection_matrix.npz", **mats)
    with pytest.raises(SceneFormatError, match="proj_mat_2 is missing"):
        load_scene(root)
    root = write_ub4d(tmp_path / "corrupt")
    (root / "projection_matrix.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(SceneFormatError, match="projection_matrix.npz is unreadable or corrupt"):
        load_scene(root)
    root = write_ub4d(tmp_path / "nan")
    mats = dict(np.load(root / "projection_matrix.npz"))
    mats["proj_mat_3"] = mats["proj_mat_3"].copy()
    mats["proj_mat_3"][1, 1] = np.inf
    np.savez(root / "projection_matrix.npz", **mats)
    with pytest.raises(SceneFormatError, match="proj_mat_3 holds NaN or Inf"):
        load_scene(root)
    root = write_ub4d(tmp_path / "masks")
    (root / "mask" / "0.png").unlink()
    with pytest.raises(SceneFormatError, match="mask holds 4 masks but .*rgb holds 5 images"):
        load_scene(root)
    root = write_ub4d(tmp_path / "masksize")
    iio.imwrite(root / "mask" / "1.png", np.zeros((H + 1, W), np.uint8))
    with pytest.raises(SceneFormatError, match=r"mask .*1.png is 48x37 but its image .*1.png is 48x36"):
        load_scene(root)
