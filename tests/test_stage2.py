"""Stage 2: density-control bookkeeping, checkpoints and resume, PLY export, metrics, and a CPU run of
npg-train + npg-render on the tiny generated scene."""
import json
import math

import numpy as np
import pytest
import torch

from npg.camera import Camera
from npg.stage2.densify import DensityController, append_gaussians, fit_blend_logits, keep_gaussians, reset_opacity
from npg.stage2.model import INDEX_NAMES, PARAMETER_NAMES, NPGGaussians
from npg.stage2.trainer import Stage2Config, interpolate_export, make_optimizer, opacity_reset_due


# ------------------------------------------------------------------------------------------ helpers
def tagged_model(count=40, num_points=60, seed=0):
    """Gaussians whose row g carries its id g in sh_dc[:, 0, 0] (and random everything else)."""
    gen = torch.Generator().manual_seed(seed)
    sh_dc = torch.randn(count, 1, 3, generator=gen)
    sh_dc[:, 0, 0] = torch.arange(count, dtype=torch.float32)
    model = NPGGaussians(
        logits=torch.randn(count, 20, generator=gen),
        quats=torch.nn.functional.normalize(torch.randn(count, 4, generator=gen), dim=-1),
        log_scales=torch.full((count, 3), math.log(0.05)) + 0.1 * torch.randn(count, 3, generator=gen),
        opacity_logits=torch.full((count, 1), 2.0),
        sh_dc=sh_dc,
        sh_rest=torch.randn(count, 15, 3, generator=gen),
        neighbor_idx=torch.randint(0, num_points, (count, 20), generator=gen),
        anchors=torch.randint(0, num_points, (count, 3), generator=gen),
        static_points=torch.zeros(0, 3),
        num_dynamic=num_points,
    )
    points = torch.randn(num_points, 3, generator=gen)
    return model, points


def tagged_optimizer(model):
    """An Adam with real state whose moments of row g are set to g (exp_avg) and g + 0.5 (exp_avg_sq)."""
    optimizer = make_optimizer(model, Stage2Config())
    loss = sum((getattr(model, name) ** 2).sum() for name in PARAMETER_NAMES)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    for name in PARAMETER_NAMES:
        state = optimizer.state[getattr(model, name)]
        ids = torch.arange(model.num_gaussians, dtype=torch.float32).reshape(-1, *[1] * (state["exp_avg"].ndim - 1))
        state["exp_avg"].copy_(ids.expand_as(state["exp_avg"]))
        state["exp_avg_sq"].copy_((ids + 0.5).expand_as(state["exp_avg_sq"]))
    return optimizer


def row_ids(model):
    return model.sh_dc.detach()[:, 0, 0].round().long()


def assert_aligned(model, optimizer, original, new_rows_zero=()):
    """Every parameter sits in the optimizer with moments matching its rows; kept rows match the originals."""
    group_params = {group["name"]: group["params"] for group in optimizer.param_groups}
    ids = row_ids(model)
    for name in PARAMETER_NAMES:
        param = getattr(model, name)
        assert len(group_params[name]) == 1 and group_params[name][0] is param, name
        state = optimizer.state[param]
        assert state["exp_avg"].shape == param.shape and state["exp_avg_sq"].shape == param.shape, name
        flat = state["exp_avg"].reshape(len(ids), -1)
        for row, gid in enumerate(ids.tolist()):
            expected = 0.0 if row in new_rows_zero else float(gid)
            assert torch.all(flat[row] == expected), (name, row, gid)
    for name in INDEX_NAMES:
        assert getattr(model, name).shape[0] == model.num_gaussians
        assert torch.equal(getattr(model, name), original[name][ids]), name


def snapshot(model):
    return {name: getattr(model, name).detach().clone() for name in PARAMETER_NAMES + INDEX_NAMES}


# ------------------------------------------------------------------------------------------ bookkeeping
def test_keep_gaussians_keeps_rows_and_adam_moments_together():
    model, _ = tagged_model()
    optimizer = tagged_optimizer(model)
    original = snapshot(model)
    keep = torch.rand(model.num_gaussians, generator=torch.Generator().manual_seed(1)) > 0.4
    keep_gaussians(model, optimizer, keep)
    assert model.num_gaussians == int(keep.sum())
    assert torch.equal(row_ids(model), torch.nonzero(keep).flatten())
    assert_aligned(model, optimizer, original)
    for name in PARAMETER_NAMES:
        assert torch.equal(getattr(model, name).detach(), original[name][keep])


def test_append_gaussians_gives_new_rows_zero_moments():
    model, _ = tagged_model()
    optimizer = tagged_optimizer(model)
    original = snapshot(model)
    parents = torch.tensor([3, 7, 7, 30])
    append_gaussians(model, optimizer, {name: original[name][parents] for name in PARAMETER_NAMES + INDEX_NAMES})
    count = len(original["logits"])
    assert model.num_gaussians == count + 4
    assert_aligned(model, optimizer, original, new_rows_zero=set(range(count, count + 4)))
    # the optimizer still steps every row
    (sum((getattr(model, name) ** 2).sum() for name in PARAMETER_NAMES)).backward()
    optimizer.step()


def test_densify_clones_small_and_splits_large_gaussians():
    model, points = tagged_model(count=40)
    optimizer = tagged_optimizer(model)
    original = snapshot(model)
    controller = DensityController(model.num_gaussians, "cpu", extent=1.0, percent_dense=0.1)
    with torch.no_grad():
        model.log_scales[20:] = math.log(0.3)  # rows 20.. are "large": they split
    original["log_scales"] = model.log_scales.detach().clone()
    hot = torch.tensor([2, 5, 11, 21, 22, 35])
    grad = torch.zeros(model.num_gaussians, 3)
    grad[hot, 0] = 1e-3
    radii = torch.ones(model.num_gaussians, dtype=torch.int32)
    controller.accumulate(grad, radii)
    controller.accumulate(grad, radii)
    counts = controller.densify_and_prune(model, optimizer, points, torch.Generator().manual_seed(0))
    assert counts == {"cloned": 3, "split": 3, "pruned": 0, "gaussians": 40 + 3 + 3}

    ids = row_ids(model)
    # split parents are gone, each appears as two children; clones appear twice (original + copy)
    for gid in (21, 22, 35):
        assert int((ids == gid).sum()) == 2
    for gid in (2, 5, 11):
        assert int((ids == gid).sum()) == 2
    new_rows = set(range(40 - 3, model.num_gaussians))  # 37 survivors, then the 3 clones and 6 children
    assert_aligned(model, optimizer, original, new_rows_zero=new_rows)
    # clones are exact copies; children keep the parent's neighbours/anchors with smaller scales and moved means
    for row in range(37, 40):
        gid = int(ids[row])
        for name in PARAMETER_NAMES:
            assert torch.equal(getattr(model, name).detach()[row], original[name][gid])
    from npg.skinning import skin

    with torch.no_grad():
        means, _ = model.skin(points)
        parent_means, _ = skin(points, original["neighbor_idx"], original["logits"], original["anchors"], original["quats"])
    for row in range(40, model.num_gaussians):
        gid = int(ids[row])
        assert torch.allclose(model.scales.detach()[row], original["log_scales"][gid].exp() / 1.6)
        assert not torch.equal(model.logits.detach()[row], original["logits"][gid])
        assert not torch.allclose(means[row], parent_means[gid])
    assert controller.grad_accum.shape == (model.num_gaussians,) and float(controller.grad_accum.sum()) == 0.0


def test_densify_prunes_transparent_and_oversized_gaussians():
    model, points = tagged_model(count=30)
    optimizer = tagged_optimizer(model)
    original = snapshot(model)
    controller = DensityController(model.num_gaussians, "cpu", extent=1.0, max_screen_size=20)
    with torch.no_grad():
        model.opacity_logits[[1, 4]] = -8.0  # below min_opacity 0.005
        model.log_scales[7] = math.log(0.5)  # > 0.1 × extent in world
    controller.accumulate(torch.zeros(30, 3), torch.where(torch.arange(30) == 9, 50, 3).int())  # 9: 50 px on screen
    controller.densify_and_prune(model, optimizer, points, prune_large=False)
    assert set(range(30)) - set(row_ids(model).tolist()) == {1, 4}
    controller.accumulate(torch.zeros(28, 3), torch.where(row_ids(model) == 9, 50, 3).int())
    controller.densify_and_prune(model, optimizer, points, prune_large=True)
    assert set(range(30)) - set(row_ids(model).tolist()) == {1, 4, 7, 9}
    assert_aligned(model, optimizer, original)


def test_reset_opacity_caps_opacity_and_restarts_its_moments():
    model, _ = tagged_model()
    optimizer = tagged_optimizer(model)
    before = {name: optimizer.state[getattr(model, name)]["exp_avg"].clone() for name in PARAMETER_NAMES}
    reset_opacity(model, optimizer)
    assert float(model.opacities.detach().max()) <= 0.01 + 1e-6
    assert float(optimizer.state[model.opacity_logits]["exp_avg"].abs().sum()) == 0.0
    for name in PARAMETER_NAMES:
        if name != "opacity_logits":
            assert torch.equal(optimizer.state[getattr(model, name)]["exp_avg"], before[name])


def test_opacity_resets_follow_3dgs_but_never_end_a_run():
    def resets(**fields):
        config = Stage2Config(**fields)
        return [step for step in range(1, config.iterations + 1) if opacity_reset_due(step, config)]

    assert resets() == [3000, 6000, 9000, 12000, 15000]  # 3DGS's schedule: every 3000 steps up to 15k
    assert resets(iterations=10_000, densify_until_iter=6000) == [3000, 6000]
    assert resets(iterations=8000, densify_until_iter=6000) == [3000]  # 6000 would leave 2000 steps
    assert resets(iterations=6000, densify_until_iter=6000) == [3000]


def test_densified_state_restores_into_a_fresh_optimizer():
    model, points = tagged_model()
    optimizer = tagged_optimizer(model)
    controller = DensityController(model.num_gaussians, "cpu", extent=1.0, percent_dense=0.05)
    controller.accumulate(torch.full((model.num_gaussians, 3), 1e-3), torch.ones(model.num_gaussians, dtype=torch.int32))
    controller.densify_and_prune(model, optimizer, points, torch.Generator().manual_seed(0))
    restored = NPGGaussians.from_state(model.state())
    fresh = make_optimizer(restored, Stage2Config())
    fresh.load_state_dict(optimizer.state_dict())
    for name in PARAMETER_NAMES:
        assert torch.equal(getattr(restored, name), getattr(model, name))
        assert torch.equal(fresh.state[getattr(restored, name)]["exp_avg"], optimizer.state[getattr(model, name)]["exp_avg"])


def test_fit_blend_logits_reaches_reachable_targets_and_stays_in_the_hull():
    gen = torch.Generator().manual_seed(0)
    points = torch.randn(64, 20, 3, generator=gen)
    logits = torch.randn(64, 20, generator=gen)
    weights = torch.softmax(3 * torch.randn(64, 20, generator=gen), dim=-1)
    inside = torch.einsum("kj,kjc->kc", weights, points)
    fitted = fit_blend_logits(points, logits, inside, iterations=30)
    reached = torch.einsum("kj,kjc->kc", torch.softmax(fitted, -1), points)
    start = torch.einsum("kj,kjc->kc", torch.softmax(logits, -1), points)
    assert float((reached - inside).norm(dim=-1).median()) < 0.05 * float((start - inside).norm(dim=-1).median())
    outside = start + 100.0 * torch.randn(64, 3, generator=gen)
    fitted = fit_blend_logits(points, logits, outside)
    reached = torch.einsum("kj,kjc->kc", torch.softmax(fitted, -1), points)
    assert torch.all((reached - outside).norm(dim=-1) <= (start - outside).norm(dim=-1) + 1e-5)
    assert torch.isfinite(fitted).all()


def test_accumulate_rejects_mismatched_statistics():
    controller = DensityController(10, "cpu", extent=1.0)
    with pytest.raises(ValueError, match="10 Gaussians"):
        controller.accumulate(torch.zeros(12, 3), torch.zeros(12, dtype=torch.int32))


# ------------------------------------------------------------------------------------------ model
def test_initial_gaussians_sit_on_their_points():
    gen = torch.Generator().manual_seed(0)
    points = torch.randn(300, 3, generator=gen)
    cage = torch.rand(27, 3, generator=gen) + 5.0
    model = NPGGaussians.from_points(points, static_points=cage)
    assert model.num_gaussians == 327 and model.num_points == 327
    assert torch.equal(model.neighbor_idx[:, 0], torch.arange(327))
    assert torch.equal(model.anchors, model.neighbor_idx[:, :3])
    assert int(model.neighbor_idx[300:].min()) >= 300 and int(model.neighbor_idx[:300].max()) < 300
    assert torch.allclose(model.opacities, torch.full((327, 1), 0.1))
    from npg.neighbors import mean_dist2_knn3

    spacing = mean_dist2_knn3(points).sqrt()
    means, rotations = model.skin(points)
    assert torch.all((means[:300] - points).norm(dim=-1) < spacing * 1.5)
    assert torch.allclose(rotations.norm(dim=-1), torch.ones(327), atol=1e-5)
    with pytest.raises(ValueError, match="stage-1 points"):
        model.skin(points[:10])


def test_interpolate_export_is_exact_at_frames_and_linear_between():
    times = torch.tensor([0.0, 0.5, 1.0])
    points = torch.arange(3 * 4 * 3, dtype=torch.float32).reshape(3, 4, 3)
    assert torch.equal(interpolate_export(times, points, times), points)
    mid = interpolate_export(times, points, torch.tensor([0.25]))
    assert torch.allclose(mid[0], 0.5 * (points[0] + points[1]))


# ------------------------------------------------------------------------------------------ PLY / metrics
def test_gaussian_ply_round_trip_has_the_3dgs_layout(tmp_path):
    from npg.render import gaussian_ply_fields, read_gaussian_ply, write_gaussian_ply

    gen = torch.Generator().manual_seed(0)
    count = 17
    means, log_scales = torch.randn(count, 3, generator=gen), torch.randn(count, 3, generator=gen)
    rotations = torch.nn.functional.normalize(torch.randn(count, 4, generator=gen), dim=-1)
    opacity, sh_dc, sh_rest = torch.randn(count, 1, generator=gen), torch.randn(count, 1, 3, generator=gen), torch.randn(count, 15, 3, generator=gen)
    path = tmp_path / "g.ply"
    write_gaussian_ply(path, means, rotations, log_scales, opacity, sh_dc, sh_rest)
    data = read_gaussian_ply(path)
    assert list(data) == gaussian_ply_fields() and len(data) == 62
    stacked = lambda prefix, n: np.stack([data[f"{prefix}{i}"] for i in range(n)], axis=1)  # noqa: E731
    assert np.allclose(np.stack([data["x"], data["y"], data["z"]], 1), means.numpy())
    assert np.allclose(stacked("rot_", 4), rotations.numpy(), atol=1e-6)
    assert np.allclose(stacked("scale_", 3), log_scales.numpy())
    assert np.allclose(data["opacity"], opacity[:, 0].numpy())
    assert np.allclose(stacked("f_dc_", 3), sh_dc[:, 0].numpy())
    # 3DGS order: f_rest_0..14 are red's 15 coefficients, then green, then blue
    assert np.allclose(stacked("f_rest_", 45), sh_rest.transpose(1, 2).reshape(count, 45).numpy())
    assert np.all(data["nx"] == 0)
    header = path.read_bytes().split(b"end_header\n")[0].decode()
    assert "format binary_little_endian 1.0" in header and f"element vertex {count}" in header


def test_psnr_and_ssim_conventions():
    from npg.metrics import psnr, ssim_eval

    a = torch.zeros(3, 32, 32)
    assert psnr(a, a + 0.1) == pytest.approx(20.0, abs=1e-4)  # MSE 0.01
    assert psnr(a, a) == math.inf
    b = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert ssim_eval(b, b) == pytest.approx(1.0, abs=1e-5)
    assert ssim_eval(b, b.flip(-1)) < 0.5
    with pytest.raises(ValueError, match="shape"):
        psnr(a, a[:, :16])


def _random_lpips_state(gen):
    from npg.metrics import LPIPSVGG

    model = LPIPSVGG()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.rand(param.shape, generator=gen) * 0.05)
    return model


def test_lpips_loads_both_weight_layouts(tmp_path, monkeypatch):
    from npg.metrics import load_lpips

    model = _random_lpips_state(torch.Generator().manual_seed(0))
    convs = {f"features.{k.split('.')[1]}.{k.split('.')[2]}": v for k, v in model.state_dict().items() if k.startswith("convs.")}
    lins = {f"lin{k.split('.')[1]}.model.1.weight": v for k, v in model.state_dict().items() if k.startswith("lins.")}
    slices = {0: 1, 2: 1, 5: 2, 7: 2, 10: 3, 12: 3, 14: 3, 17: 4, 19: 4, 21: 4, 24: 5, 26: 5, 28: 5}
    lpips_layout = {f"net.slice{slices[int(k.split('.')[1])]}.{k.split('.')[1]}.{k.split('.')[2]}": v for k, v in convs.items()}
    lpips_layout.update(lins)
    torch.save(lpips_layout, tmp_path / "lpips_vgg.pth")
    folder = tmp_path / "split"
    folder.mkdir()
    torch.save(convs, folder / "vgg16.pth")
    torch.save(lins, folder / "vgg.pth")

    gen = torch.Generator().manual_seed(1)
    a, b = torch.rand(2, 3, 48, 48, generator=gen), torch.rand(2, 3, 48, 48, generator=gen)
    one = load_lpips(tmp_path / "lpips_vgg.pth")
    monkeypatch.setenv("NPG_LPIPS_WEIGHTS", str(folder))
    two = load_lpips()
    d1, d2 = one(a, b), two(a, b)
    assert d1.shape == (2,) and torch.all(d1 > 0) and torch.allclose(d1, d2)
    assert torch.allclose(one(a, a), torch.zeros(2), atol=1e-6)
    torch.save(convs, tmp_path / "only_vgg.pth")
    with pytest.raises(RuntimeError, match="lack 5 tensors"):
        load_lpips(tmp_path / "only_vgg.pth")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_lpips(tmp_path / "missing.pth")


def test_lpips_absent_is_skipped_with_a_message(monkeypatch, capsys):
    import sys

    from npg.metrics import load_lpips

    monkeypatch.delenv("NPG_LPIPS_WEIGHTS", raising=False)
    monkeypatch.setitem(sys.modules, "lpips", None)  # makes `import lpips` fail
    assert load_lpips() is None
    assert "LPIPS skipped" in capsys.readouterr().out


def test_orbit_cameras_look_at_the_centre():
    from npg.render import orbit_cameras

    w2c = torch.eye(4)
    w2c[2, 3] = 4.0
    base = Camera.from_fov(w2c, 0.4, 0.4, 64, 48)
    center = torch.tensor([0.2, -0.1, 0.3])
    orbit = orbit_cameras([base], center, 6)
    for camera in orbit:
        pixel, depth = camera.project(center[None])
        assert torch.allclose(pixel[0], torch.tensor([base.cx, base.cy]), atol=1e-3) and float(depth) > 0
    distances = torch.stack([c.campos for c in orbit]) - center
    assert torch.allclose(distances.norm(dim=1), (base.campos - center).norm().expand(6), atol=1e-4)


def test_train_config_routing():
    from npg.train import stage_configs

    stage1, stage2 = stage_configs("cpu", overrides=["stage2.w_reg=0.5", "device=cpu", "stage1.iterations=7"])
    assert stage2.w_reg == 0.5 and stage1.iterations == 7 and stage1.device == stage2.device == "cpu"
    with pytest.raises(ValueError, match="unknown config key 'nope'"):
        stage_configs("cpu", overrides=["nope=1"])


# ------------------------------------------------------------------------------------------ end to end
TINY_STAGE1 = ["stage1.num_points=300", "stage1.iterations=40", "stage1.max_image_size=64", "stage1.checkpoint_every=20"]
TINY_STAGE2 = [
    "stage2.iterations=300",
    "stage2.max_image_size=64",
    "stage2.densify_from_iter=50",
    "stage2.densify_until_iter=250",
    "stage2.densification_interval=50",
    "stage2.sh_increase_every=100",
    "stage2.checkpoint_every=100",
    "stage2.log_every=50",
]


@pytest.fixture(scope="module")
def tiny_scene(tmp_path_factory):
    from npg.data.generate import make_scene

    return make_scene(tmp_path_factory.mktemp("stage2_scene") / "arc", "generated_arc", "tiny", seed=0, progress=False)


@pytest.fixture(scope="module")
def trained_run(tiny_scene, tmp_path_factory):
    from npg.render import main as render_main
    from npg.train import main as train_main

    out = tmp_path_factory.mktemp("stage2_run")
    sets = [arg for item in TINY_STAGE1 + TINY_STAGE2 + ["device=cpu", "progress=false"] for arg in ("--set", item)]
    assert train_main([str(tiny_scene), "-o", str(out), "--preset", "cpu", *sets]) == 0
    assert render_main([str(out), "--split", "test", "--orbit-frames", "6"]) == 0
    return out


def tiny_stage2_config(**changes):
    from npg.stage2.trainer import preset_config

    overrides = [item.removeprefix("stage2.") for item in TINY_STAGE2] + ["device=cpu", "progress=false"]
    overrides += [f"{key}={value}" for key, value in changes.items()]
    return preset_config("cpu", overrides)


def test_end_to_end_writes_everything_and_beats_the_mean_image(trained_run, tiny_scene):
    from npg.data import load_scene
    from npg.metrics import psnr
    from npg.render import read_gaussian_ply

    for name in ("checkpoint.pt", "export.npz", "metrics.json"):
        assert (trained_run / "stage1" / name).is_file(), name
    for name in ("checkpoint.pt", "config.json", "log.csv", "metrics.json", "run.json"):
        assert (trained_run / "stage2" / name).is_file(), name
    render_dir = trained_run / "render" / "test"
    metrics = json.loads((render_dir / "metrics.json").read_text())
    frames = metrics["frames"]
    assert frames == 4 and len(metrics["per_image"]) == frames
    assert len(list((render_dir / "renders").glob("*.png"))) == frames == len(list((render_dir / "gt").glob("*.png")))
    assert (render_dir / "video.mp4").stat().st_size > 0 and (trained_run / "render" / "orbit.mp4").stat().st_size > 0
    assert metrics["fps"] > 0 and 0 < metrics["ssim"] <= 1

    plys = sorted((render_dir / "ply").glob("frame_*.ply"))
    assert len(plys) == frames
    gaussians = read_gaussian_ply(plys[0])
    assert len(gaussians["x"]) == metrics["gaussians"] and all(np.isfinite(v).all() for v in gaussians.values())

    # the trivial baseline: the mean training image (black background) shown for every test view
    train = load_scene(tiny_scene, "train")
    test = load_scene(tiny_scene, "test")
    mean_image = train.images("black").mean(dim=0)
    baseline = float(np.mean([psnr(mean_image, test.image(i, "black")) for i in range(len(test))]))
    assert metrics["psnr"] > baseline + 1.0, (metrics["psnr"], baseline)


def test_stage2_reports_the_refit_cloud_against_the_true_surface(trained_run, tiny_scene, tmp_path):
    import shutil

    from npg.stage2.trainer import train_stage2

    stage1 = json.loads((trained_run / "stage1" / "metrics.json").read_text())
    refit = json.loads((trained_run / "stage2" / "metrics.json").read_text())
    assert np.isfinite(refit["refit_track_error_rel"]) and refit["refit_surface_chamfer_rel"] > 0
    assert refit["refit_track_error_rel"] != pytest.approx(stage1["track_error_rel"], rel=1e-6)  # the re-fit moved it

    # with the stage-1 network frozen, the re-fitted cloud is stage 1's own: the same numbers
    frozen = tmp_path / "frozen"
    shutil.copytree(trained_run / "stage1", frozen / "stage1")
    train_stage2(tiny_scene, frozen, tiny_stage2_config(iterations=3, stage1_basis_lr_scale=0, stage1_network_lr_scale=0))
    measured = json.loads((frozen / "stage2" / "metrics.json").read_text())
    for key in ("surface_chamfer", "surface_chamfer_rel", "track_error", "track_error_rel"):
        assert measured[f"refit_{key}"] == pytest.approx(stage1[key], rel=1e-4), key


class SimulatedKill(Exception):
    pass


@pytest.fixture
def one_cpu_thread():
    # Multi-threaded CPU scatter-adds sum in varying order; the bitwise-resume check needs one order.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_resume_after_a_kill_continues_from_the_checkpoint(trained_run, tiny_scene, tmp_path, one_cpu_thread):
    import shutil

    from npg.stage2.trainer import read_stage2_checkpoint, train_stage2

    config = tiny_stage2_config(iterations=14, checkpoint_every=5, densify_from_iter=3, densification_interval=4,
                                densify_until_iter=12, sh_increase_every=4, log_every=2)
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    for out in (reference, resumed):
        shutil.copytree(trained_run / "stage1", out / "stage1")
    train_stage2(tiny_scene, reference, config)

    def kill_at_8(step):
        if step == 8:
            raise SimulatedKill

    with pytest.raises(SimulatedKill):
        train_stage2(tiny_scene, resumed, config, on_step=kill_at_8)
    checkpoint = read_stage2_checkpoint(resumed / "stage2" / "checkpoint.pt")
    assert checkpoint["step"] == 5 and not checkpoint["finished"]
    steps = []
    train_stage2(tiny_scene, resumed, config, on_step=steps.append)
    assert steps == list(range(6, 15))

    final, expected = (read_stage2_checkpoint(out / "stage2" / "checkpoint.pt") for out in (resumed, reference))
    assert final["finished"] and final["step"] == 14
    for name, tensor in expected["gaussians"]["tensors"].items():
        torch.testing.assert_close(final["gaussians"]["tensors"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    for name, tensor in expected["stage1_state"].items():
        torch.testing.assert_close(final["stage1_state"][name], tensor, rtol=1e-4, atol=1e-6, msg=name)
    logged = [int(line.split(",")[0]) for line in (resumed / "stage2" / "log.csv").read_text().splitlines()[1:]]
    assert logged == list(range(2, 15, 2))


def test_corrupt_or_missing_checkpoints_are_clear_errors(trained_run, tiny_scene, tmp_path):
    import shutil

    from npg.render import main as render_main
    from npg.stage2.trainer import train_stage2

    config = tiny_stage2_config(iterations=2)
    out = tmp_path / "run"
    shutil.copytree(trained_run / "stage1", out / "stage1")
    (out / "stage2").mkdir()
    checkpoint = out / "stage2" / "checkpoint.pt"
    checkpoint.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="corrupt"):
        train_stage2(tiny_scene, out, config)
    with pytest.raises(RuntimeError, match="corrupt"):
        render_main([str(out)])
    torch.save({"format": "something else"}, checkpoint)
    with pytest.raises(RuntimeError, match="not an npg stage-2 checkpoint"):
        train_stage2(tiny_scene, out, config)
    with pytest.raises(FileNotFoundError, match="stage-2 checkpoint not found"):
        render_main([str(tmp_path / "nothing")])
    with pytest.raises(FileNotFoundError, match="stage-1 output not found"):
        train_stage2(tiny_scene, tmp_path / "no_stage1", config)


def test_a_checkpoint_holding_nan_is_refused_by_name_before_rendering(trained_run, tmp_path):
    import shutil

    from npg.render import main as render_main

    for tensor_path, expected in ((("gaussians", "tensors", "sh_dc"), "gaussians.sh_dc"),
                                  (("stage1_state", "basis"), "stage1.basis")):
        out = tmp_path / expected
        shutil.copytree(trained_run / "stage1", out / "stage1")
        (out / "stage2").mkdir()
        checkpoint = torch.load(trained_run / "stage2" / "checkpoint.pt", weights_only=False)
        holder = checkpoint
        for key in tensor_path[:-1]:
            holder = holder[key]
        holder[tensor_path[-1]] = holder[tensor_path[-1]].clone()
        holder[tensor_path[-1]].view(-1)[3] = float("nan")
        torch.save(checkpoint, out / "stage2" / "checkpoint.pt")
        with pytest.raises(RuntimeError, match=rf"NaN or Inf in {expected}\b"):
            render_main([str(out), "--no-video", "--no-ply"])


# ------------------------------------------------------------------------------------------ FrameRenderer
def small_model(device):
    """A random stage-1 network (200 points) and Gaussians anchored to its cloud at t = 0, on ``device``."""
    from npg.stage1.model import DeformationModel

    torch.manual_seed(0)
    network = DeformationModel(num_points=200, num_basis=6, num_frames=8, width=64, bottleneck=16, num_blocks=2,
                               init_std=0.2, seed=3).to(device).eval()
    with torch.no_grad():
        points0 = network(torch.zeros(1, device=device))[0]
        gaussians = NPGGaussians.from_points(points0, sh_degree=1, init_opacity=0.6).to(device)
        gaussians.sh_rest.normal_(0.0, 0.2)
        gaussians.quats.normal_()
    gaussians.active_sh_degree = 1
    w2c = torch.eye(4)
    w2c[2, 3] = 4.0
    cameras = [Camera.from_fov(w2c, 0.45, 0.4, 48, 40).to(device), Camera.from_fov(w2c, 0.5, 0.5, 33, 31).to(device)]
    return network, gaussians, cameras


def test_frame_renderer_matches_the_model_render_and_checks_its_time():
    from npg.render import FrameRenderer

    network, gaussians, cameras = small_model("cpu")
    renderer = FrameRenderer(gaussians, network)
    for time, camera in zip((0.1, 0.7, 0.1), cameras + cameras[:1]):
        expected = gaussians.render(network(torch.tensor([time]))[0], camera)
        got = renderer.render(time, camera)
        assert expected.color.abs().max() > 0.05  # the object is in view
        torch.testing.assert_close(got.color, expected.color)
        torch.testing.assert_close(got.alpha, expected.alpha)
    with pytest.raises(ValueError, match="time must be finite"):
        renderer.render(float("nan"), cameras[0])
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA model"):
        FrameRenderer(gaussians, network, use_graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_frame_renderer_graph_replays_what_eager_rendering_gives():
    from npg.render import FrameRenderer

    network, gaussians, cameras = small_model("cuda")
    graph, eager = FrameRenderer(gaussians, network), FrameRenderer(gaussians, network, use_graph=False)
    assert graph.use_graph and not eager.use_graph
    for time, camera in zip((0.0, 0.55, 0.9, 0.55), cameras * 2):
        for got, expected in zip(graph.pose(time), eager.pose(time)):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(graph.render(time, camera).color, eager.render(time, camera).color, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------- stage-1 fine-tuning
@pytest.mark.parametrize("basis_scale, network_scale", [(1.0, 1.0), (2.0, 0.0), (0.0, 0.5), (0.0, 0.0)])
def test_stage1_fine_tuning_groups_move_only_the_parts_given_a_rate(basis_scale, network_scale):
    from types import SimpleNamespace

    from npg.stage2.trainer import make_stage1_optimizer, update_learning_rates

    network, _, _ = small_model("cpu")
    config = tiny_stage2_config(stage1_lr_init=1e-2, stage1_lr_final=1e-4,
                                stage1_basis_lr_scale=basis_scale, stage1_network_lr_scale=network_scale)
    optimizer = make_stage1_optimizer(network, config, "cpu")
    if basis_scale == network_scale == 0:
        assert optimizer is None
        assert not any(p.requires_grad for p in network.parameters())
        return
    update_learning_rates(SimpleNamespace(param_groups=[]), optimizer, config.iterations, config)
    expected = {name: pytest.approx(1e-4 * scale) for name, scale in (("basis", basis_scale), ("network", network_scale)) if scale > 0}
    assert {group["name"]: group["lr"] for group in optimizer.param_groups} == expected
    update_learning_rates(SimpleNamespace(param_groups=[]), optimizer, 0, config)
    before = {name: p.detach().clone() for name, p in network.named_parameters()}
    network(torch.tensor([0.3, 0.7])).square().sum().backward()
    optimizer.step()
    for name, param in network.named_parameters():
        scale = basis_scale if name == "basis" else network_scale
        assert param.requires_grad == (scale > 0), name
        assert torch.equal(param.detach(), before[name]) == (scale == 0), name


def test_stage1_fine_tuning_rates_must_not_be_negative():
    with pytest.raises(ValueError, match="stage1_network_lr_scale must be >= 0"):
        tiny_stage2_config(stage1_network_lr_scale=-1.0).validate()


# ---------------------------------------------------------------------------------- rigidity in the re-fit
def refit_rigidity(run_dir):
    """Stage 1's rigidity loss of the re-fitted network over every training time, against its cloud at
    the stage-1 reference time, over neighbours found by brute force in the stage-1 export."""
    from npg.stage1 import load_stage1
    from npg.stage1.losses import rigidity_loss
    from npg.stage2.trainer import read_stage2_checkpoint

    network, _, export = load_stage1(run_dir / "stage1")
    network.load_state_dict(read_stage2_checkpoint(run_dir / "stage2" / "checkpoint.pt")["stage1_state"])
    frame = export.reference_frame
    reference0 = export.points[frame].float()
    order = torch.cdist(reference0, reference0).argsort(dim=1)
    neighbor_idx = order[:, 1:11]  # k = 10, the point itself excluded
    with torch.no_grad():
        clouds = network(export.times.float())
        return float(rigidity_loss(clouds, clouds[frame], neighbor_idx))


def test_rigidity_term_is_the_stage1_loss_at_the_reference_time(trained_run):
    from npg.stage1 import load_stage1
    from npg.stage1.losses import rigidity_loss
    from npg.stage2.trainer import RigidityTerm

    _, _, export = load_stage1(trained_run / "stage1")
    times, clouds = export.times.float(), export.points.float()
    term = RigidityTerm(trained_run / "stage1", times, clouds, k=7)
    frame = export.reference_frame
    assert float(term.time) == float(times[frame])
    reference = clouds[frame]
    expected_idx = torch.cdist(reference, reference).argsort(dim=1)[:, 1:8]
    assert torch.equal(term.neighbor_idx.sort(dim=1).values, expected_idx.sort(dim=1).values)
    moved = clouds[0] + 0.01 * torch.randn_like(clouds[0])
    expected = rigidity_loss(moved[None], reference, expected_idx)
    torch.testing.assert_close(term(moved, reference), expected, rtol=1e-5, atol=0.0)
    assert float(term(reference, reference)) == 0.0


def test_stage2_rigidity_keeps_the_refit_shape(trained_run, tiny_scene, tmp_path):
    import csv
    import shutil

    from npg.stage2.trainer import train_stage2

    runs = {}
    for name, weight in (("free", 0.0), ("rigid", 1e4)):
        out = tmp_path / name
        shutil.copytree(trained_run / "stage1", out / "stage1")
        config = tiny_stage2_config(iterations=30, log_every=10, w_rigidity=weight)
        train_stage2(tiny_scene, out, config)
        with open(out / "stage2" / "log.csv", newline="") as handle:
            logged = [row["rigidity"] for row in csv.DictReader(handle)]
        runs[name] = (refit_rigidity(out), logged)
    assert runs["free"][1] == ["", "", ""]  # not computed when off
    assert len(runs["rigid"][1]) == 3 and all(float(value) > 0.0 for value in runs["rigid"][1])
    # 30 free steps at the default rates: about 60x the rigid run's rigidity loss
    assert math.isfinite(runs["free"][0]) and 0.0 < runs["rigid"][0] < 0.1 * runs["free"][0], runs


def test_stage2_rigidity_without_a_stage1_export_is_a_clear_error(trained_run, tiny_scene, tmp_path):
    import shutil

    from npg.stage2.trainer import train_stage2

    out = tmp_path / "run"
    shutil.copytree(trained_run / "stage1", out / "stage1")
    (out / "stage1" / "export.npz").unlink()
    with pytest.raises(FileNotFoundError, match="export.npz not found"):
        train_stage2(tiny_scene, out, tiny_stage2_config(iterations=2, w_rigidity=1.0))
    with pytest.raises(ValueError, match="w_rigidity must be >= 0"):
        tiny_stage2_config(w_rigidity=-1.0).validate()
