"""Benchmark scripts that carry logic of their own: benchmarks/oracle.py (the true-motion stand-in for
the stage-1 network on generated scenes), benchmarks/train_speed.py (a smoke run on a tiny scene) and
benchmarks/stage2_variants.py (stage-2 settings on one shared stage-1 cloud)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.oracle import degraded, smooth_field, stage1_cloud_part, stage1_replaced_by, true_motion  # noqa: E402
from benchmarks.train_speed import RateClock, run as train_speed  # noqa: E402


def write_ground_truth(folder: Path):
    """A unit square turning about z by t radians at time t: 3 train frames, 1 val and 1 test frame."""
    square = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], dtype=np.float32)

    def at(t):
        c, s = np.cos(t), np.sin(t)
        return square @ np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]], dtype=np.float32)

    (folder / "gt").mkdir(parents=True)
    np.savez(folder / "gt" / "mesh.npz", faces=np.array([[0, 1, 2], [0, 2, 3]], dtype=np.int32))
    splits = {"train": [0.0, 0.5, 1.0], "val": [0.25], "test": [0.8]}
    for split, times in splits.items():
        np.savez(folder / "gt" / f"{split}.npz", times=np.array(times, np.float32), vertices=np.stack([at(t) for t in times]))


def test_true_motion_follows_the_mesh_at_every_known_time(tmp_path):
    write_ground_truth(tmp_path)
    motion = true_motion(tmp_path, 50)
    torch.testing.assert_close(motion.times, torch.tensor([0.0, 0.25, 0.5, 0.8, 1.0]))  # every split, sorted
    reference = motion(torch.tensor([0.0]))[0]
    assert reference.shape == (50, 3)
    assert bool((reference[:, 2] == 0).all()) and bool((reference[:, :2] >= 0).all()) and bool((reference[:, :2] <= 1).all())
    # a rotation keeps each sample's distance to the axis and turns it by the frame's angle
    for t in (0.25, 0.8, 1.0):
        c, s = np.cos(t), np.sin(t)
        rotation = torch.tensor([[c, s, 0], [-s, c, 0], [0, 0, 1]], dtype=torch.float32)
        torch.testing.assert_close(motion(torch.tensor([t]))[0], reference @ rotation, atol=1e-5, rtol=0)
    # between known times: linear interpolation
    halfway = motion(torch.tensor([0.9]))[0]
    torch.testing.assert_close(halfway, 0.5 * (motion(torch.tensor([0.8]))[0] + motion(torch.tensor([1.0]))[0]))


def test_degraded_motion_drifts_from_the_reference_time_and_keeps_a_fixed_offset(tmp_path):
    write_ground_truth(tmp_path)
    motion = true_motion(tmp_path, 400)
    train_times = [0.0, 0.5, 1.0]  # reference time 0.5; the farthest train frames are 0.5 away
    reference = motion(torch.tensor([0.5]))[0]
    diagonal = float((reference.max(0).values - reference.min(0).values).norm())
    unchanged = degraded(motion, 0.0, 0.0, train_times)
    torch.testing.assert_close(unchanged.points, motion.points)

    offset = degraded(motion, offset=0.02, train_times=train_times)
    moved = offset.points - motion.points  # [T, N, 3]
    torch.testing.assert_close(moved, moved[:1].expand_as(moved))  # the same at every time
    assert abs(float(moved[0].norm(dim=-1).mean()) / diagonal - 0.02) < 1e-5

    drift = degraded(motion, drift=0.04, train_times=train_times)
    moved = drift.points - motion.points
    norms = moved.norm(dim=-1).mean(-1) / diagonal  # per known time 0, .25, .5, .8, 1
    torch.testing.assert_close(norms, torch.tensor([0.04, 0.02, 0.0, 0.024, 0.04]), atol=1e-5, rtol=0)
    directions = moved[-1] / moved[-1].norm(dim=-1, keepdim=True)
    torch.testing.assert_close(moved[0] / moved[0].norm(dim=-1, keepdim=True), directions)  # one field, scaled
    with pytest.raises(ValueError, match="drift and offset"):
        degraded(motion, drift=-0.1)


def test_smooth_field_moves_neighbours_alike():
    generator = torch.Generator().manual_seed(0)
    points = torch.rand(2000, 3, generator=generator)
    field = smooth_field(points, torch.Generator().manual_seed(1))
    nearby = smooth_field(points + 0.01, torch.Generator().manual_seed(1))  # same field, points moved 1.7% of the box
    far = field[torch.randperm(len(points), generator=generator)]
    change = (nearby - field).norm(dim=-1).mean()
    assert change < 0.1 * (far - field).norm(dim=-1).mean()


def test_stage1_cloud_parts_split_placement_from_motion(tmp_path):
    write_ground_truth(tmp_path)
    carried = true_motion(tmp_path, 30, seed=5)  # a "stage-1 cloud" that moves exactly with the surface
    lifted = lambda t: carried(t) + torch.tensor([0.0, 0.0, 0.05])  # noqa: E731  5% off the (z = 0) square
    times = torch.tensor([0.0, 0.25, 0.5, 0.8, 1.0])
    placement = stage1_cloud_part(tmp_path, lifted, 0.5, "placement", sites=300)
    torch.testing.assert_close(placement(times), lifted(times), atol=1e-5, rtol=0)  # the turn keeps the offset
    motion = stage1_cloud_part(tmp_path, lifted, 0.5, "motion", sites=300)
    assert motion.points.shape == (5, 30, 3) and float(motion.points[..., 2].abs().max()) < 1e-5  # on the surface

    static = lambda t: carried(torch.full_like(t, 0.5))  # noqa: E731  points that never move
    moved = stage1_cloud_part(tmp_path, static, 0.5, "motion", sites=300)
    true = true_motion(tmp_path, 300)  # the same sites (seed 0) as the parts use
    # the static cloud's motion error undoes the true motion: the sites, moved by it, stay (nearly) put
    stays = (moved.points - moved.points[2:3]).norm(dim=-1).mean(1)  # displacement from the reference time
    turns = (true.points - true.points[2:3]).norm(dim=-1).mean(1)
    assert float(turns[0]) > 0.3 and float(stays[2]) == 0.0
    assert float(stays[0]) < 0.2 * float(turns[0]) and float(stays[-1]) < 0.2 * float(turns[-1])
    with pytest.raises(ValueError, match="placement"):
        stage1_cloud_part(tmp_path, lifted, 0.5, "both")


def test_stage1_replacement_is_undone(tmp_path):
    import npg.stage2.trainer as trainer

    write_ground_truth(tmp_path)
    original = trainer.load_stage1_model
    with stage1_replaced_by(true_motion(tmp_path, 20), torch.device("cpu")):
        model, times, points = trainer.load_stage1_model(tmp_path / "stage1")
        assert list(model.parameters()) == [] and points.shape == (5, 20, 3)
    assert trainer.load_stage1_model is original


def test_train_speed_times_both_stages_after_the_warm_up(tmp_path):
    from npg.data.generate import make_scene

    scene = make_scene(tmp_path / "arc", "generated_arc", "tiny", seed=0, progress=False)
    rows = train_speed(scene, tmp_path / "work", preset="cpu", stage1_iterations=6, stage2_iterations=6, warmup=2,
                       overrides=["stage1.num_points=200", "stage2.color_init_views=2"], image_size=48)
    assert [row["stage"] for row in rows] == ["stage 1", "stage 2"]
    assert all(row["iterations_timed"] == 4 and row["it_per_s"] > 0 for row in rows)
    assert rows[0]["size"] == "200 points"


def test_rate_clock_needs_a_warm_up_shorter_than_the_run():
    clock = RateClock(2, 5)
    for step in range(1, 6):
        clock(step)
    assert clock.rate() > 0 and set(clock.marks) == {2, 5}
    with pytest.raises(ValueError, match="warm-up"):
        RateClock(5, 5)


def test_stage2_variants_share_one_stage1_cloud_and_report_failures(tmp_path):
    from benchmarks.stage2_variants import parse_variant, run as run_variants
    from npg.data.generate import make_scene

    assert parse_variant("base:") == ("base", [])
    assert parse_variant("frozen:stage1_lr_init=0, seed=2") == ("frozen", ["stage1_lr_init=0", "seed=2"])
    for bad in ("no_colon", ":seed=1", "x:seed"):
        with pytest.raises(ValueError, match="variant"):
            parse_variant(bad)

    scene = make_scene(tmp_path / "scene" / "arc", "generated_arc", "tiny", seed=0, progress=False)
    variants = [("base", []), ("frozen", ["stage1_lr_init=0"]), ("typo", ["no_such_key=1"])]
    tiny = dict(preset="cpu", stage1_sets=["num_points=200", "iterations=20", "max_image_size=64", "device=cpu"],
                sets=["iterations=40", "max_image_size=64", "eval_every=20", "device=cpu"])
    rows = run_variants(str(scene), variants, tmp_path / "work", parallel=2, out=tmp_path / "rows.json", **tiny)
    assert [row["variant"] for row in rows] == ["base", "frozen", "typo"]
    assert json.loads((tmp_path / "rows.json").read_text()) == rows
    base, frozen, typo = rows
    for row in (base, frozen):
        assert "error" not in row and 5.0 < row["psnr"] < 60.0 and row["eval_curve"][-1][0] == 40
    assert "exited with" in typo["error"] and "psnr" not in typo
    # both read the same cloud: stage 1 ran once, and the frozen variant kept its network as trained
    shared = tmp_path / "work" / "stage2_variants" / "arc" / "stage1" / "checkpoint.pt"
    trained = torch.load(shared, map_location="cpu", weights_only=False)["model"]["basis"]
    kept = torch.load(tmp_path / "work" / "stage2_variants" / "arc__frozen" / "stage2" / "checkpoint.pt",
                      map_location="cpu", weights_only=False)["stage1_state"]["basis"]
    assert torch.equal(trained, kept)
    # the frozen variant's re-fitted cloud is stage 1's, so its surface numbers are stage 1's
    stage1 = json.loads((shared.parent / "metrics.json").read_text())
    assert frozen["refit_track_error_rel"] == pytest.approx(stage1["track_error_rel"], rel=1e-4)
    assert base["refit_track_error_rel"] != pytest.approx(stage1["track_error_rel"], rel=1e-6)
    late = run_variants(str(scene), [("late", [])], tmp_path / "work", deadline_min=0.0, out=tmp_path / "late.json", **tiny)
    assert "killed at the deadline" in late[0]["error"]
    with pytest.raises(ValueError, match="unique"):
        run_variants(str(scene), [("a", []), ("a", [])], tmp_path / "work")


def test_stage1_capacity_fit_approaches_the_true_motion(tmp_path):
    from benchmarks.stage1_capacity import run as capacity

    write_ground_truth(tmp_path / "square")
    small = ["width=32", "bottleneck=8", "num_blocks=1", "num_basis=4", "window=2"]
    rows = capacity(tmp_path / "square", [("short", small + ["lr=3e-3"])], points=40, iterations=5, device="cpu",
                    out=tmp_path / "a.json")
    longer = capacity(tmp_path / "square", [("long", small + ["lr=1e-2"])], points=40, iterations=400, device="cpu",
                      out=tmp_path / "b.json")
    assert rows[0]["variant"] == "short" and rows[0]["points"] == 40 and len(longer[0]["curve"]) == 5
    assert longer[0]["error_rel"] < 0.01 and rows[0]["error_rel"] > 0.1  # the square's motion is easy to fit
    assert json.loads((tmp_path / "b.json").read_text())[0]["error_rel"] == longer[0]["error_rel"]
    with pytest.raises(ValueError, match="w_flow"):
        capacity(tmp_path / "square", [("bad", ["w_flow=1"])], points=40, iterations=2, device="cpu", out=tmp_path / "c.json")
