"""Stage 1's deformation model fitted directly to the true motion of a generated scene: no images, an
L2 fit of the model's points to true surface samples tracked through the training frames, with
stage 1's optimiser and schedule. What it reaches in a number of iterations is the floor that the
model and the schedule leave stage 1's track error (which also pays for fitting from 2D cues).

    python benchmarks/stage1_capacity.py SCENE [--points 1000] [--iterations 1500]
        [--variant NAME:lr=3e-3,num_basis=16 ...] [--out benchmarks/results/stage1_capacity.json]

``--variant`` takes Stage1Config keys of the model and the schedule (num_basis, num_frequencies,
frame_embedding_dim, width, bottleneck, num_blocks, init_std, seed, lr, lr_final_fraction,
warmup_iterations, window); without one, the default config. Each step draws ``window`` + 1 random
training frames. Rows: {variant, overrides, points, iterations, error_rel, error_ends_rel, curve,
minutes, device}; errors are mean point distances to the truth over the training frames (ends: the
first and last 5), in fractions of the bounding-box diagonal at the middle frame, as stage 1's
``track_error_rel``.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import device_name, format_table, write_json  # noqa: E402
from benchmarks.stage2_variants import parse_variant  # noqa: E402

RESULTS = HERE / "results" / "stage1_capacity.json"
COLUMNS = ["variant", "points", "iterations", "error_rel", "error_ends_rel", "minutes"]
MODEL_KEYS = ("num_basis", "num_frequencies", "frame_embedding_dim", "width", "bottleneck", "num_blocks", "init_std", "seed")


def true_trajectories(scene_dir, num_points: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train times [F] sorted, true surface samples [F, N, 3]) of a generated scene."""
    from benchmarks.oracle import true_motion
    from npg.data.generate import load_ground_truth

    times = torch.sort(torch.as_tensor(load_ground_truth(scene_dir, "train")["times"], dtype=torch.float32)).values
    return times, true_motion(scene_dir, num_points)(times)


def fit(times: torch.Tensor, truth: torch.Tensor, config, iterations: int, device, evaluations: int = 5) -> dict:
    """Fit a DeformationModel built from ``config`` (a resolved Stage1Config) to ``truth`` [F, N, 3]."""
    from npg.stage1.model import DeformationModel
    from npg.stage1.trainer import lr_factor

    frames, num_points = truth.shape[:2]
    times, truth = times.to(device), truth.to(device)
    middle = truth[frames // 2]
    diagonal = float((middle.max(0).values - middle.min(0).values).norm())
    model = DeformationModel(num_points=num_points, num_frames=frames, **{k: getattr(config, k) for k in MODEL_KEYS}).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, iterations, config.warmup_iterations, config.lr_final_fraction)
    )
    generator = torch.Generator().manual_seed(config.seed)
    batch = min(frames, config.window + 1)

    def errors() -> tuple[float, float]:
        with torch.no_grad():
            per_frame = (model(times) - truth).norm(dim=-1).mean(1) / diagonal
        ends = torch.cat([per_frame[:5], per_frame[-5:]]) if frames > 10 else per_frame
        return float(per_frame.mean()), float(ends.mean())

    curve, started = [], time.perf_counter()
    marks = {round(iterations * (i + 1) / evaluations) for i in range(evaluations)}
    for step in range(1, iterations + 1):
        chosen = torch.randperm(frames, generator=generator)[:batch].to(device)
        loss = (model(times[chosen]) - truth[chosen]).square().sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step in marks:
            curve.append([step, round(errors()[0], 5)])
    error, ends = errors()
    return {"error_rel": round(error, 5), "error_ends_rel": round(ends, 5), "curve": curve,
            "minutes": round((time.perf_counter() - started) / 60.0, 3)}


def run(scene_dir, variants, points: int = 1000, iterations: int = 1500, device: str = "auto", out=RESULTS) -> list[dict]:
    from npg.config import apply_overrides
    from npg.stage1.trainer import Stage1Config, pick_device, resolve_config

    device = pick_device(device)
    times, truth = true_trajectories(scene_dir, points)
    rows = []
    for name, overrides in variants or [("default", [])]:
        unknown = [item for item in overrides if item.split("=")[0] not in MODEL_KEYS + ("lr", "lr_final_fraction", "warmup_iterations", "window")]
        if unknown:
            raise ValueError(f"variant {name!r}: {unknown[0]!r} is not a model or schedule key of Stage1Config")
        config = apply_overrides(Stage1Config(num_points=points, iterations=iterations), overrides)
        config = resolve_config(config, Path(scene_dir).name, len(times))
        row = {"scene": Path(scene_dir).name, "variant": name, "overrides": overrides, "points": points,
               "iterations": iterations, **fit(times, truth, config, iterations, device), "device": device_name()}
        rows.append(row)
        write_json(rows, str(out))
    print(format_table(rows, COLUMNS))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("scene", help="a generated scene folder (with gt/)")
    parser.add_argument("--points", type=int, default=1000)
    parser.add_argument("--iterations", type=int, default=1500)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    run(args.scene, [parse_variant(v) for v in args.variant], args.points, args.iterations, args.device, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
