"""NR-NeRF precomputed.json loader: hand-computed cameras, splits, no-mask behaviour, real sequence."""
import json

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from npg.data import SceneFormatError, clear_cache, load_scene
from npg.data.nrnerf import split_indices
from npg.data.scene import read_spec

W, H, FOCAL = 40, 30, 25.0


def c2w_gl(position):
    """OpenGL c2w [3, 4] of a camera at ``position`` with identity rotation (looking along −z)."""
    m = np.zeros((3, 4))
    m[:, :3] = np.eye(3)
    m[:, 3] = position
    return m


def write_nrnerf(root, count=12, poses=None, bds=None, n_images=None, hwf=(H, W, FOCAL)):
    (root / "images").mkdir(parents=True, exist_ok=True)
    if poses is None:
        poses = []
        for i in range(count):
            pose = np.zeros((3, 5))
            pose[:, :4] = c2w_gl([0.01 * i, 0.0, 2.0])
            pose[:, 4] = hwf
            poses.append(pose.tolist())
    if bds is None:
        bds = [[0.5 + 0.01 * i, 3.0] for i in range(count)]
    meta = {"poses": poses, "bds": bds, "render_poses": [], "i_test": 3}
    (root / "precomputed.json").write_text(json.dumps(meta))
    rng = np.random.default_rng(0)
    for i in range(count if n_images is None else n_images):
        iio.imwrite(root / "images" / f"image{i + 1:06d}.png", rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
    return root


@pytest.fixture(autouse=True)
def _fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NPG_CACHE_DIR", str(tmp_path / "cache"))
    clear_cache()
    yield
    clear_cache()


def test_splits_cameras_and_bounds(tmp_path):
    root = write_nrnerf(tmp_path)
    every = load_scene(root, "all")
    train, test = load_scene(root, "train"), load_scene(root, "test")
    assert (len(every), len(train), len(test)) == (12, 11, 1)
    assert split_indices(12, "test") == [5] and load_scene(root, "val").files == test.files
    assert every.format == "nrnerf" and (every.width, every.height) == (W, H)
    assert every.times.tolist() == pytest.approx([i / 11 for i in range(12)])
    assert test.times.tolist() == pytest.approx([5 / 11]) and test.files[0].name == "image000006.png"
    assert every.bounds.shape == (12, 2) and every.bounds[3].tolist() == pytest.approx([0.53, 3.0])
    cam = every.cameras[10]
    assert (cam.fx, cam.fy, cam.cx, cam.cy) == pytest.approx((FOCAL, FOCAL, 19.5, 14.5))
    # camera at (0.1, 0, 2) looking along −z: world (0.5, 0.3, 0) is at OpenCV camera (0.4, −0.3, 2)
    uv, z = cam.project(torch.tensor([[0.5, 0.3, 0.0]], dtype=torch.float64))
    assert uv[0].tolist() == pytest.approx([25 * 0.2 + 19.5, -25 * 0.15 + 14.5], abs=1e-5)
    assert float(z[0]) == pytest.approx(2.0)
    with pytest.raises(SceneFormatError, match="splits all, train, val, test"):
        load_scene(root, "novel")


def test_no_masks_says_what_is_possible_and_accepts_user_masks(tmp_path):
    root = write_nrnerf(tmp_path, count=3)
    scene = load_scene(root, "all")
    assert scene.alpha is None and not scene.has_masks
    with pytest.raises(SceneFormatError, match="no masks.*optical flow.*silhouette.*masks/"):
        scene.mask(0)
    (root / "masks" / "images").mkdir(parents=True)
    for i in range(3):
        m = np.zeros((H, W), np.uint8)
        m[i : 10 + i, 5:15] = 255
        iio.imwrite(root / "masks" / "images" / f"image{i + 1:06d}.png", m)
    clear_cache()
    masked = load_scene(root, "all")
    assert masked.has_masks and int(masked.mask(2).sum()) == 100 and bool(masked.mask(2)[11, 5])
    assert torch.equal(masked.rgb, scene.rgb)


def test_validation(tmp_path):
    def case(name, **kw):
        return write_nrnerf(tmp_path / name, **kw)

    with pytest.raises(SceneFormatError, match=r"precomputed.json: 'poses' must be \[F, 3, 5\]"):
        load_scene(case("shape", poses=[[[0.0] * 4] * 3]), "all")
    with pytest.raises(SceneFormatError, match="has 4 poses but .*images holds 3 images"):
        load_scene(case("count", count=4, n_images=3), "all")
    with pytest.raises(SceneFormatError, match=r"pose 0 is for 41x30 images but .*image000001.png is 40x30"):
        load_scene(case("hwf", count=2, hwf=(H, W + 1, FOCAL)), "all")
    with pytest.raises(SceneFormatError, match=r"'bds' must be \[2, 2\]"):
        load_scene(case("bds", count=2, bds=[[0.1, 1.0]]), "all")
    root = case("nan", count=2)
    meta = json.loads((root / "precomputed.json").read_text())
    meta["poses"][1][0][3] = float("nan")
    (root / "precomputed.json").write_text(json.dumps(meta))
    with pytest.raises(SceneFormatError, match="NaN or Inf"):
        load_scene(root, "all")
    root = case("json", count=2)
    (root / "precomputed.json").write_text("{\"poses\": ")
    with pytest.raises(SceneFormatError, match="precomputed.json is malformed JSON"):
        load_scene(root, "all")


def test_real_nrnerf_example_sequence(data_dir):
    root = data_dir / "scenes" / "nrnerf_example_sequence"
    native = load_scene(root, "all", format="nrnerf")
    assert len(native) == 86 and (native.width, native.height) == (512, 384) and not native.has_masks
    assert native.cameras[0].fx == pytest.approx(256.6095275878906) and native.cameras[0].cx == 255.5
    assert float(native.bounds.min()) > 0 and float(native.bounds.max()) == pytest.approx(1.0024, abs=1e-3)
    # splits and the D-NeRF-style conversion beside it (cx = 256 in nerfstudio's convention), compared
    # on their descriptions to keep the test fast (decoding is shared code, checked above)
    train, test = read_spec(root, "train", format="nrnerf"), read_spec(root, "test", format="nrnerf")
    assert len(train.image_files) + len(test.image_files) == 86 and len(test.image_files) == 9
    assert sorted(train.image_files + test.image_files) == sorted(native.files)
    for split, nat in (("train", train), ("test", test)):
        converted = read_spec(root, split)
        assert converted.format == "dnerf" and converted.image_files == nat.image_files
        assert np.allclose(converted.times, nat.times) and np.allclose(converted.bounds, nat.bounds)
        for a, b in zip(converted.cameras, nat.cameras):
            assert torch.allclose(a.w2c, b.w2c, atol=1e-6)
            assert (a.fx, a.fy, a.cx, a.cy) == pytest.approx((b.fx, b.fy, b.cx, b.cy))
    scaled = native.rescaled(10.0)
    assert torch.allclose(scaled.cameras[3].campos, native.cameras[3].campos * 10, atol=1e-5)
    assert torch.allclose(scaled.bounds, native.bounds * 10)
