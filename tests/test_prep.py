"""Optical flow, flow files and the cached preprocessing (npg-prep)."""
import json

import cv2
import imageio.v3 as iio
import numpy as np
import pytest
import torch

from npg.data import SceneFormatError, clear_cache, load_flows, load_scene, prepare_scene
from npg.data.flow import compute_flow, endpoint_error, flow_to_color, read_flow_file, resize_flow
from npg.data.prep import main

W, H, F = 64, 48, 5
STEP = (2.0, 1.0)  # the textured square moves by (dx, dy) pixels per frame


def texture(h, w, seed=0, sigma=2.0):
    noise = cv2.GaussianBlur(np.random.default_rng(seed).random((h, w, 3)).astype(np.float32), (0, 0), sigma)
    noise = (noise - noise.min()) / (noise.max() - noise.min())
    return (noise * 255).astype(np.uint8)


def write_moving_square(root, count=F, rgb_only=False):
    """A D-NeRF scene: a textured 24x20 square over a transparent background, moving by STEP per frame."""
    (root / "train").mkdir(parents=True, exist_ok=True)
    tex = texture(20, 24, seed=1)
    frames = []
    for i in range(count):
        img = np.zeros((H, W, 4), np.uint8)
        x0, y0 = 10 + int(STEP[0] * i), 12 + int(STEP[1] * i)
        img[y0 : y0 + 20, x0 : x0 + 24, :3] = tex
        img[y0 : y0 + 20, x0 : x0 + 24, 3] = 255
        iio.imwrite(root / "train" / f"r_{i:03d}.png", img[..., :3] if rgb_only else img)
        c2w = np.eye(4)
        c2w[2, 3] = 4.0
        frames.append({"file_path": f"./train/r_{i:03d}", "time": i / (count - 1), "transform_matrix": c2w.tolist()})
    (root / "transforms_train.json").write_text(json.dumps({"camera_angle_x": 0.8, "frames": frames}))
    return root


@pytest.fixture(autouse=True)
def _fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NPG_CACHE_DIR", str(tmp_path / "cache"))
    clear_cache()
    yield
    clear_cache()


# ------------------------------------------------------------------ optical flow
@pytest.mark.parametrize("method", ["dis", "farneback"])
@pytest.mark.parametrize("shift", [(3.0, -2.0), (2.5, 1.25), (0.4, 0.3)])
def test_flow_of_a_translated_texture(method, shift):
    """Measured (OpenCV 5.0, 128x160, σ=2 texture, 16 px border excluded): DIS ≤ 0.05 px, Farneback ≤ 0.05 px."""
    big = texture(208, 240)
    move = np.float32([[1, 0, shift[0]], [0, 1, shift[1]]])  # content moves by +shift
    shifted = cv2.warpAffine(big, move, (240, 208), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
    img0, img1 = big[40:168, 40:200], shifted[40:168, 40:200]
    flow = compute_flow(img0, img1, method)
    assert flow.shape == (128, 160, 2) and flow.dtype == np.float32
    truth = np.broadcast_to(np.float32(shift), flow.shape)
    interior = np.zeros((128, 160), bool)
    interior[16:-16, 16:-16] = True
    assert endpoint_error(flow, truth, interior) < 0.15
    assert endpoint_error(flow, -truth, interior) > 1.0  # the sign convention: where pixels go
    as_tensor = lambda img: torch.from_numpy(img).permute(2, 0, 1).float() / 255  # noqa: E731
    torch_flow = compute_flow(as_tensor(img0), as_tensor(img1), method)
    assert endpoint_error(torch_flow, truth, interior) < 0.15


def test_flow_inputs_are_checked():
    with pytest.raises(ValueError, match="differ in size"):
        compute_flow(np.zeros((8, 8), np.uint8), np.zeros((8, 9), np.uint8))
    with pytest.raises(ValueError, match="unknown flow method"):
        compute_flow(np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8), "raft")
    with pytest.raises(ValueError, match="NaN"):
        compute_flow(np.full((8, 8), np.nan), np.zeros((8, 8)))
    with pytest.raises(ValueError, match="empty mask"):
        endpoint_error(np.zeros((4, 4, 2)), np.zeros((4, 4, 2)), np.zeros((4, 4), bool))


def test_flow_to_color_and_resize():
    flow = np.zeros((4, 6, 2), np.float32)
    flow[0, 0] = (3, 0)
    flow[0, 1] = (-3, 0)
    color = flow_to_color(flow)
    assert color.shape == (4, 6, 3) and color.dtype == np.uint8
    assert color[2, 2].tolist() == [255, 255, 255]  # no motion is white
    assert color[0, 0].tolist() != color[0, 1].tolist()  # opposite directions differ in hue
    big = np.broadcast_to(np.float32([4.0, -2.0]), (8, 12, 2))
    assert np.allclose(resize_flow(big, 6, 4), [2.0, -1.0])


def test_flow_files(tmp_path):
    flow = np.random.default_rng(0).normal(size=(5, 7, 2)).astype(np.float32)
    np.save(tmp_path / "a.npy", flow)
    torch.save(torch.from_numpy(flow).permute(2, 0, 1).contiguous(), tmp_path / "b.pt")  # RAFT's [2, H, W]
    with open(tmp_path / "c.flo", "wb") as handle:
        np.float32(202021.25).tofile(handle)
        np.int32([7, 5]).tofile(handle)
        flow.tofile(handle)
    for name in ("a.npy", "b.pt", "c.flo"):
        assert np.array_equal(read_flow_file(tmp_path / name), flow)
    np.save(tmp_path / "bad.npy", np.zeros((5, 7, 3)))
    with pytest.raises(ValueError, match=r"bad.npy holds shape \(5, 7, 3\)"):
        read_flow_file(tmp_path / "bad.npy")
    np.save(tmp_path / "nan.npy", np.full((5, 7, 2), np.nan))
    with pytest.raises(ValueError, match="nan.npy holds NaN"):
        read_flow_file(tmp_path / "nan.npy")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.pt is unreadable"):
        read_flow_file(tmp_path / "junk.pt")


# ------------------------------------------------------------------ preprocessing + cache
def test_prepare_scene_caches_and_reruns_on_change(tmp_path):
    root = write_moving_square(tmp_path / "scene")
    first = prepare_scene(root, progress=False)
    assert not first.skipped and first.has_masks
    assert len(first.flow_files) == F - 1 and len(first.mask_files) == F
    assert first.cache_dir.parent.parent == tmp_path / "cache" and first.cache_dir.name == "train_ds1"
    assert first.video is not None and first.video.stat().st_size > 0
    frames = iio.imread(first.video)
    assert frames.shape[0] == F - 1 and frames.shape[2] >= 2 * W
    mask0 = iio.imread(first.mask_files[0])
    assert mask0.shape == (H, W) and mask0.max() == 255 and int((mask0 > 0).sum()) == 24 * 20
    manifest = json.loads((first.cache_dir / "manifest.json").read_text())
    assert len(manifest["inputs"]) == F + 1 and manifest["params"]["downsample"] == 1

    flows = load_flows(root)
    assert flows.shape == (F - 1, H, W, 2) and flows.dtype == torch.float32
    inner = np.zeros((H, W), bool)
    inner[16:28, 14:30] = True  # inside the square in frame 0
    assert endpoint_error(flows[0], np.broadcast_to(np.float32(STEP), (H, W, 2)), inner) < 0.25

    mtime = (first.cache_dir / "manifest.json").stat().st_mtime_ns
    again = prepare_scene(root, progress=False)
    assert again.skipped and (again.cache_dir / "manifest.json").stat().st_mtime_ns == mtime

    img = iio.imread(root / "train" / "r_002.png")
    img[0, 0] = [9, 9, 9, 255]
    iio.imwrite(root / "train" / "r_002.png", img)
    changed = prepare_scene(root, progress=False)
    assert not changed.skipped and changed.manifest["inputs"] != manifest["inputs"]
    assert prepare_scene(root, progress=False).skipped
    assert not prepare_scene(root, progress=False, force=True).skipped
    assert not prepare_scene(root, progress=False, method="farneback").skipped
    half = prepare_scene(root, downsample=2, progress=False, video=False)
    assert not half.skipped and half.cache_dir.name == "train_ds2" and half.video is None
    assert load_flows(root, downsample=2).shape == (F - 1, H // 2, W // 2, 2)

    # an interrupted run (no manifest, or a missing output) is redone
    (half.cache_dir / "manifest.json").unlink()
    assert not prepare_scene(root, downsample=2, progress=False, video=False).skipped
    half.flow_files[1].unlink()
    assert not prepare_scene(root, downsample=2, progress=False, video=False).skipped


def test_concurrent_runs_share_one_preparation(tmp_path):
    """Three processes preparing one scene at once (as parallel training runs do) all succeed: one
    builds the cache, the others wait and reuse it instead of deleting it under its feet."""
    import os
    import subprocess
    import sys

    root = write_moving_square(tmp_path / "scene", count=8)
    code = ("import sys; from npg.data import prepare_scene; "
            "r = prepare_scene(sys.argv[1], progress=False, video=False); print('skipped' if r.skipped else 'built')")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = [subprocess.Popen([sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env) for _ in range(3)]
    results = [run.communicate(timeout=120) for run in runs]
    for run, (out, err) in zip(runs, results):
        assert run.returncode == 0, err
    assert sorted(out.strip() for out, _ in results) == ["built", "skipped", "skipped"]
    assert load_flows(root).shape == (7, H, W, 2)


def test_cache_goes_into_a_writable_scene_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("NPG_CACHE_DIR")
    root = write_moving_square(tmp_path / "scene", count=2)
    prepared = prepare_scene(root, progress=False, video=False)
    assert prepared.cache_dir == (root / "npg_cache" / "train_ds1").resolve()


def test_external_flows_are_imported(tmp_path):
    root = write_moving_square(tmp_path / "scene")
    ext = tmp_path / "raft"
    ext.mkdir()
    rng = np.random.default_rng(3)
    full = [rng.normal(size=(H, W, 2)).astype(np.float32) * 5 for _ in range(F - 1)]
    for i, f in enumerate(full):  # named like the frames: matched by name, any format
        if i % 2:
            torch.save(torch.from_numpy(f), ext / f"r_{i:03d}.pt")
        else:
            np.save(ext / f"r_{i:03d}.npy", f)
    flows = load_flows(root, flows_from=ext)
    assert torch.allclose(flows, torch.from_numpy(np.stack(full)), atol=5 * 2.0**-7)  # float16 storage
    half = load_flows(root, downsample=2, flows_from=ext)
    assert torch.allclose(half[1], torch.from_numpy(resize_flow(full[1], W // 2, H // 2)), atol=2.0**-6)
    assert prepare_scene(root, flows_from=ext, progress=False).skipped
    np.save(ext / "r_000.npy", full[0] + 1)
    assert not prepare_scene(root, flows_from=ext, progress=False).skipped

    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for i in range(2):
        np.save(wrong / f"flow{i}.npy", full[i])
    with pytest.raises(SceneFormatError, match="holds 2 flow files .* has 5 frames"):
        prepare_scene(root, flows_from=wrong, progress=False)
    for i in range(2, 4):
        np.save(wrong / f"flow{i}.npy", np.zeros((H + 1, W, 2), np.float32))
    with pytest.raises(SceneFormatError, match=r"flow2.npy is 64x49; expected"):
        prepare_scene(root, flows_from=wrong, progress=False)


def test_flow_sources_keep_separate_caches(tmp_path):
    """DIS and external flows of one scene live in different folders: preparing one never deletes the
    other (two runs of a benchmark with different sources would otherwise rebuild the cache the other
    is reading)."""
    root = write_moving_square(tmp_path / "scene")
    ext = tmp_path / "raft"
    ext.mkdir()
    zeros = np.zeros((H, W, 2), np.float32)
    for i in range(F - 1):
        np.save(ext / f"r_{i:03d}.npy", zeros - 7.5)  # against the square's motion: not what DIS finds
    dis = prepare_scene(root, progress=False)
    external = prepare_scene(root, flows_from=ext, progress=False)
    assert dis.cache_dir.name == "train_ds1" and external.cache_dir.name.startswith("train_ds1_")
    assert prepare_scene(root, progress=False).skipped and prepare_scene(root, flows_from=ext, progress=False).skipped
    assert bool((load_flows(root, flows_from=ext) == -7.5).all())
    assert not bool((load_flows(root) == -7.5).any())


def test_cli(tmp_path, capsys):
    root = write_moving_square(tmp_path / "scene", count=3, rgb_only=True)
    assert main([str(root), "--no-video"]) == 0
    out = capsys.readouterr().out
    assert "done in" in out and "flows: 2 (dis)" in out and "masks:  none" in out and "silhouette" in out
    assert main([str(root), "--no-video"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main([str(tmp_path / "missing")]) == 2
    assert "scene not found" in capsys.readouterr().err


def test_read_only_scene_is_cached_in_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("NPG_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    root = write_moving_square(tmp_path / "scene", count=2)
    for folder in (root / "train", root):
        folder.chmod(0o555)  # read-only by its permission bits, which root would otherwise ignore
    try:
        prepared = prepare_scene(root, progress=False, video=False)
    finally:
        for folder in (root, root / "train"):
            folder.chmod(0o755)
    assert prepared.cache_dir.is_relative_to(tmp_path / "home" / ".cache" / "npg")
    assert not (root / "npg_cache").exists()


def test_real_scene_flow(data_dir, tmp_path, monkeypatch):
    root = data_dir / "scenes" / "dnerf_lego_tiny"
    read_only = not root.stat().st_mode & 0o222
    if read_only:  # the shared data as shipped: the cache must go to the home folder
        monkeypatch.delenv("NPG_CACHE_DIR")
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
    flows = load_flows(root, "val")  # the fixed val camera: the motion is the lego's own
    scene = load_scene(root, "val")
    assert flows.shape == (len(scene) - 1, 100, 100, 2) and torch.isfinite(flows).all()
    assert any(tmp_path.rglob("manifest.json"))
    if read_only:
        assert not (root / "npg_cache").exists()


def test_flow_on_rendered_scene_against_ground_truth(tmp_path):
    """DIS flow vs the renderer's true flow on the tiny generated_arc (20 frames, 64x64).

    Measured (OpenCV 5.0): mean EPE 1.41 px over valid pixels, true motion 2.9 px on average
    (the zero flow scores 2.87); on the 200x200 'small' render 0.54 px.
    """
    generate = pytest.importorskip("npg.data.generate")
    scene = generate.make_scene(tmp_path / "arc", preset="generated_arc", size="tiny", progress=False)
    truth = generate.load_ground_truth(scene, "train")
    flows = load_flows(scene).numpy()
    valid = truth["flow_valid"]
    assert flows.shape == truth["flow"].shape
    epe = endpoint_error(flows, truth["flow"], valid)
    zero = endpoint_error(np.zeros_like(flows), truth["flow"], valid)
    assert epe < 1.8 and epe < 0.6 * zero
