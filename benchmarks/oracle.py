"""Stage 2 driven by the true motion of a generated scene: the ceiling that stage 1 leaves stage 2.

On a scene made by ``npg-make-scene`` (``gt/`` holds the mesh's vertices at every frame of every split),
this trains stage 2 exactly as ``npg-train --stage 2`` does, except that the stage-1 network is
replaced by the true surface: N points sampled once on the mesh (area-weighted, fixed barycentric
coordinates) and moved with its vertices, linearly interpolated between the known frame times. The
test split is then rendered and scored as by ``npg-render``. Read against the same stage-2 settings
on the trained stage-1 cloud: the gap is what stage 1's geometry and tracking cost; the oracle's own
shortfall from the targets is stage 2's.

    python benchmarks/oracle.py SCENE -o OUT [--preset fast] [--points 5000] [--set stage2.KEY=VALUE ...]
        [--drift 0.01] [--offset 0.01] [--seed 0]

``--drift`` and ``--offset`` degrade the true motion by the two kinds of error a stage-1 cloud has, in
fractions of the surface's bounding-box diagonal (mean over points): a smooth displacement field that
grows linearly with the distance in time from the middle training frame (stage 1's reference frame)
and reaches ``drift`` at the farthest frame, and a fixed random offset of each point off the surface.
The row reports the degraded cloud's ``track_error_rel`` and ``track_drift_rel`` as stage 1's metrics
measure them, so stage-2 PSNR can be read against stage 1's errors.

``--cloud RUN/stage1 --cloud-part motion|placement`` instead keeps one part of a real stage-1 cloud's
error and replaces the other by the truth (``stage1_cloud_part``): where its points sit on or off
the surface at the reference frame (placement), or how they move from there (motion).

Writes ``OUT/stage2`` and ``OUT/render/<split>`` as a normal run does, and ``OUT/oracle.json``.
"""
from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch


# stage 1's metrics of the motion an oracle row uses (npg.stage1.export.deformation_surface_metrics)
CLOUD_METRICS = ("surface_chamfer_rel", "track_error_rel", "track_drift_rel", "track_drift_p90_rel",
                 "track_drift_static_rel", "track_motion_captured")


class TrueMotion(torch.nn.Module):
    """Surface samples of the true mesh at any time: forward(times [B]) -> [B, N, 3]. No parameters,
    so stage 2 must run with ``stage1_lr_init=0`` (nothing to fine-tune)."""

    def __init__(self, times: torch.Tensor, points: torch.Tensor):
        super().__init__()
        order = torch.argsort(times)
        self.register_buffer("times", times[order].float())
        self.register_buffer("points", points[order].float())

    def forward(self, times: torch.Tensor, validate: bool = True) -> torch.Tensor:
        """``validate`` is accepted for the stage-1 model's signature; the known times need no check."""
        from npg.stage2.trainer import interpolate_export

        return interpolate_export(self.times, self.points, times)


def known_frames(scene_dir) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(times [T], vertices [T, V, 3], faces [F, 3]) of every frame of every split (train, val, test)
    of a generated scene; the first train frame first, as the ground truth stores it."""
    from npg.data.generate import SPLITS, load_ground_truth

    truths = [load_ground_truth(scene_dir, split) for split in SPLITS]
    faces = torch.as_tensor(truths[0]["faces"], dtype=torch.int64)
    times = torch.cat([torch.as_tensor(t["times"], dtype=torch.float32) for t in truths])
    vertices = torch.cat([torch.as_tensor(t["vertices"], dtype=torch.float32) for t in truths])
    return times, vertices, faces


def true_motion(scene_dir, num_points: int, seed: int = 0) -> TrueMotion:
    """Points on the true surface of every frame of every split (train, val, test) of ``scene_dir``."""
    from npg.stage1.export import surface_sampler

    times, vertices, faces = known_frames(scene_dir)
    sample = surface_sampler(vertices[0], faces, num_points, seed=seed)
    return TrueMotion(times, torch.stack([sample(v) for v in vertices]))


def site_frames(vertices: torch.Tensor, triangles: torch.Tensor, barycentric: torch.Tensor):
    """Surface sites on a mesh posed by vertices [V, 3]: (positions [S, 3], orthonormal local frames
    [S, 3, 3] whose columns are the triangle's first edge, the in-plane normal to it and the face normal)."""
    corners = vertices[triangles]  # [S, 3, 3]
    positions = (corners * barycentric[..., None]).sum(1)
    edge = torch.nn.functional.normalize(corners[:, 1] - corners[:, 0], dim=-1)
    normal = torch.nn.functional.normalize(torch.linalg.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]), dim=-1)
    return positions, torch.stack([edge, torch.linalg.cross(normal, edge), normal], -1)


def stage1_cloud_part(scene_dir, model, reference_time: float, part: str, sites: int = 20000, seed: int = 0) -> TrueMotion:
    """One of the two parts of a stage-1 cloud's error, the other replaced by the truth. ``model``:
    times [B] -> points [B, N, 3] (the stage-1 network); ``reference_time``: its reference frame's.
    Each point stands for the true surface site nearest to it at the reference time, and its offset
    from that site there, read in the site's local frame, is its *placement*; its *motion error* at
    time t is how far it is from that site carried by the true motion with the offset held in the
    local frame. ``part`` "placement": the points at the reference time, carried by the true motion
    (the cost of where stage 1 puts its points); "motion": as many true surface sites, each moved by
    the motion error of the point nearest to it (the cost of how they move)."""
    from npg.neighbors import knn
    from npg.stage1.export import surface_sites

    if part not in ("placement", "motion"):
        raise ValueError(f"part must be 'placement' or 'motion', got {part!r}")
    times, vertices, faces = known_frames(scene_dir)
    reference = int((times - reference_time).abs().argmin())
    triangles, barycentric = surface_sites(vertices[0], faces, sites, seed=seed)
    with torch.no_grad():
        positions, frames = site_frames(vertices[reference], triangles, barycentric)
        points = model(times[reference : reference + 1])[0]
        _, attached = knn(positions, 1, queries=points.contiguous())
        attached = attached[:, 0].long()
        placement = torch.einsum("sji,sj->si", frames[attached], points - positions[attached])
        if part == "motion":
            chosen = torch.randperm(sites, generator=torch.Generator().manual_seed(seed))[: len(points)]
            _, nearest = knn(points.contiguous(), 1, queries=positions[chosen].contiguous())
            nearest = nearest[:, 0].long()
        moved = []
        for index in range(len(times)):
            positions, frames = site_frames(vertices[index], triangles, barycentric)
            carried = positions[attached] + torch.einsum("sij,sj->si", frames[attached], placement)
            if part == "placement":
                moved.append(carried)
            else:
                error = model(times[index : index + 1])[0] - carried
                moved.append(positions[chosen] + error[nearest])
    return TrueMotion(times, torch.stack(moved))


def smooth_field(points: torch.Tensor, generator: torch.Generator, modes: int = 8) -> torch.Tensor:
    """A random smooth vector field at ``points`` [N, 3] -> [N, 3]: a sum of ``modes`` plane waves with
    1-2 periods across the points' bounding box, so that neighbouring points move alike, as the
    low-rank model's errors do."""
    extent = float((points.max(0).values - points.min(0).values).norm())
    directions = torch.nn.functional.normalize(torch.randn(modes, 3, generator=generator), dim=-1)
    frequencies = 2 * torch.pi * (1 + torch.rand(modes, 1, generator=generator)) / extent
    phases = 2 * torch.pi * torch.rand(modes, generator=generator)
    amplitudes = torch.randn(modes, 3, generator=generator)
    waves = torch.sin(points @ (directions * frequencies).T + phases)  # [N, modes]
    return waves @ amplitudes


def degraded(motion: TrueMotion, drift: float = 0.0, offset: float = 0.0, train_times=None, seed: int = 0) -> TrueMotion:
    """``motion`` with a drift and a fixed offset, each a fraction of the bounding-box diagonal of the
    points at the reference time (the middle of ``train_times``, default all of ``motion.times``):
    points(t) + drift·D·|t − t_ref| / max|t − t_ref| · field + offset·D · per-point random directions,
    both fields scaled to a mean norm of 1."""
    if drift < 0 or offset < 0:
        raise ValueError(f"drift and offset must be >= 0, got {drift} and {offset}")
    generator = torch.Generator().manual_seed(seed)
    train_times = motion.times if train_times is None else torch.sort(torch.as_tensor(train_times, dtype=torch.float32)).values
    reference_time = train_times[len(train_times) // 2]
    reference = motion(reference_time[None])[0]
    diagonal = float((reference.max(0).values - reference.min(0).values).norm())
    field = smooth_field(reference, generator)
    field = field / field.norm(dim=-1).mean()
    scatter = torch.randn(reference.shape, generator=generator)
    scatter = scatter / scatter.norm(dim=-1).mean()
    distance = (motion.times - reference_time).abs()
    ramp = distance / (train_times - reference_time).abs().max().clamp_min(1e-12)
    points = motion.points + diagonal * (drift * ramp[:, None, None] * field + offset * scatter)
    return TrueMotion(motion.times, points)


@contextmanager
def stage1_replaced_by(motion: TrueMotion, device):
    """Within the block, stage 2 (training and ``npg-render``) reads ``motion`` as its stage-1 model."""
    import npg.stage2.trainer as trainer

    original = trainer.load_stage1_model

    def load(stage1_dir, device_=device):
        model = TrueMotion(motion.times, motion.points).to(device_)
        return model, model.times, model.points

    trainer.load_stage1_model = load
    try:
        yield
    finally:
        trainer.load_stage1_model = original


def run(scene_dir, out_dir, preset: str | None = "fast", num_points: int = 5000, overrides=(), split: str = "test",
        max_image_size: int = 400, drift: float = 0.0, offset: float = 0.0, seed: int = 0,
        cloud=None, cloud_part: str = "motion") -> dict:
    from npg.render import render_split
    from npg.stage2.trainer import preset_config, resolve_device, train_stage2

    out_dir = Path(out_dir)
    from npg.config import apply_overrides

    config = preset_config(preset, {"max_image_size": max_image_size, "stage1_lr_init": 0.0, "progress": False})
    config = apply_overrides(config, [item.removeprefix("stage2.") for item in overrides])
    device = resolve_device(config.device)
    if cloud is not None and (drift or offset):
        raise ValueError("a stage-1 cloud's part and a synthetic drift or offset are alternatives: give one")
    from npg.data.generate import load_ground_truth
    from npg.stage1.export import deformation_surface_metrics

    train_times = torch.sort(torch.as_tensor(load_ground_truth(scene_dir, "train")["times"], dtype=torch.float32)).values
    reference_frame = len(train_times) // 2
    if cloud is not None:
        from npg.stage2.trainer import load_stage1_model

        model, _, _ = load_stage1_model(Path(cloud), torch.device("cpu"))
        reference_frame = json.loads((Path(cloud) / "config.json").read_text())["reference_frame"]
        motion = stage1_cloud_part(scene_dir, model, float(train_times[reference_frame]), cloud_part, seed=seed)
        num_points = motion.points.shape[1]
        described = f"true surface with the {cloud_part} of the stage-1 cloud {cloud}"
    else:
        motion = degraded(true_motion(scene_dir, num_points, seed=seed), drift, offset, train_times, seed=seed)
        described = f"true surface, drift {drift}, offset {offset}" if drift or offset else "true surface"
    measured = {}
    if drift or offset or cloud is not None:
        metrics = deformation_surface_metrics(motion, scene_dir, train_times, reference_frame, torch.device("cpu"))
        measured = {key: round(metrics[key], 5) for key in CLOUD_METRICS}
    (out_dir / "stage1").mkdir(parents=True, exist_ok=True)
    with stage1_replaced_by(motion, device):
        started = time.perf_counter()
        stage2_dir = train_stage2(scene_dir, out_dir, config)
        minutes = (time.perf_counter() - started) / 60.0
        metrics = render_split(out_dir, split=split, export_ply=False, videos=False)
    stage2 = json.loads((stage2_dir / "metrics.json").read_text())
    row = {
        "scene": Path(scene_dir).name,
        "motion": described,
        "points": num_points,
        **measured,
        "split": split,
        "psnr": round(metrics["psnr"], 3),
        "ssim": round(metrics["ssim"], 4),
        "train_psnr": stage2.get("train_psnr"),
        "gaussians": metrics["gaussians"],
        "stage2_min": round(minutes, 3),
        "iterations": config.iterations,
        "device": metrics["device"],
    }
    (out_dir / "oracle.json").write_text(json.dumps(row, indent=2))
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("scene")
    parser.add_argument("-o", "--out", required=True)
    parser.add_argument("--preset", default="fast", choices=["default", "fast", "cpu"])
    parser.add_argument("--points", type=int, default=5000)
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-image-size", type=int, default=400)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="stage2.KEY=VALUE")
    parser.add_argument("--drift", type=float, default=0.0, help="drift at the farthest frame, fraction of the diagonal")
    parser.add_argument("--offset", type=float, default=0.0, help="fixed offset off the surface, fraction of the diagonal")
    parser.add_argument("--seed", type=int, default=0, help="surface samples and degradation fields")
    parser.add_argument("--cloud", help="a stage-1 output folder (OUT/stage1) of this scene: use one part of its error")
    parser.add_argument("--cloud-part", default="motion", choices=["motion", "placement"])
    args = parser.parse_args(argv)
    preset = None if args.preset == "default" else args.preset
    row = run(args.scene, args.out, preset, args.points, args.overrides, args.split, args.max_image_size,
              args.drift, args.offset, args.seed, args.cloud, args.cloud_part)
    print(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
