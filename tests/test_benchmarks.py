"""Benchmark scripts that carry logic of their own: benchmarks/oracle.py (the true-motion stand-in for
the stage-1 network on generated scenes) and benchmarks/train_speed.py (a smoke run on a tiny scene)."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.oracle import stage1_replaced_by, true_motion  # noqa: E402
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
