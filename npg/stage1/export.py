"""Stage-1 export (what stage 2 reads) and evaluation.

Layout of ``OUT/stage1/``:

- ``config.json``: the resolved Stage1Config.
- ``checkpoint.pt``: model (``model_hparams`` + ``model`` state dict), optimiser, schedule, RNG state.
- ``points/frame_XXXX.ply``: one binary little-endian PLY per training frame in time order, a
  ``vertex`` element with float32 ``x, y, z`` (world coordinates of the scene's cameras).
- ``export.npz``: ``times`` [F] float32 (dataset time in [0, 1]), ``coefficients`` [F, K] float32,
  ``points`` [F, N, 3] float32 (the PLYs' points), ``features`` [N, 3] float32 (the splatted random
  colours), ``reference_frame`` int, ``files`` [F] str (the training images).
- ``preview.mp4``: the projected cloud (coloured by feature) over every training frame, the mask
  outline in green.
- ``metrics.json``: see :func:`evaluate`.
- ``log.csv``: iteration, elapsed_s, lr, total and the unweighted loss terms.

``load_stage1(stage1_dir) -> (model, config, export)`` gives a ``DeformationModel`` whose
``model(times [B])`` returns differentiable points [B, N, 3] at any time in [0, 1].
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from npg.config import apply_overrides
from npg.io import atomic_path, atomic_write_text, load_checkpoint, write_video

from .model import DeformationModel
from .splat import spacing_scales, splat_frames

# ------------------------------------------------------------------------------------------------ PLY


def write_ply_points(path, points) -> None:
    """Write points [N, 3] as a binary little-endian PLY (vertex x, y, z float32), atomically."""
    points = np.ascontiguousarray(np.asarray(points, dtype="<f4"))
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must be [N, 3], got {points.shape}")
    header = (
        "ply\nformat binary_little_endian 1.0\ncomment npg stage-1 point cloud\n"
        f"element vertex {len(points)}\nproperty float x\nproperty float y\nproperty float z\nend_header\n"
    )
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(header.encode("ascii"))
            handle.write(points.tobytes())


def read_ply_points(path) -> np.ndarray:
    """Read the x, y, z float32 vertices of a binary little-endian PLY -> [N, 3] float32.

    Accepts only what ``write_ply_points`` writes (plus extra float32 vertex properties after x, y, z);
    anything else raises a clear error naming the file.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        data = handle.read()
    end = data.find(b"end_header\n")
    if not data.startswith(b"ply\n") or end < 0:
        raise ValueError(f"{path} is not a PLY file")
    header = data[:end].decode("ascii", errors="replace").splitlines()
    if "format binary_little_endian 1.0" not in header:
        raise ValueError(f"{path}: only binary little-endian PLY is supported")
    count, properties, in_vertex = None, [], False
    for line in header:
        words = line.split()
        if words[:1] == ["element"]:
            in_vertex = words[1] == "vertex"
            if in_vertex:
                count = int(words[2])
        elif words[:1] == ["property"] and in_vertex:
            properties.append((words[1], words[-1]))
    if count is None or [name for _, name in properties[:3]] != ["x", "y", "z"]:
        raise ValueError(f"{path}: expected a vertex element starting with x, y, z")
    if any(kind not in ("float", "float32") for kind, _ in properties):
        raise ValueError(f"{path}: only float32 vertex properties are supported, got {properties}")
    body = data[end + len(b"end_header\n") :]
    expected = count * len(properties) * 4
    if len(body) < expected:
        raise ValueError(f"{path} is truncated: {len(body)} bytes of vertex data, expected {expected}")
    values = np.frombuffer(body[:expected], dtype="<f4").reshape(count, len(properties))
    return values[:, :3].astype(np.float32)


# --------------------------------------------------------------------------------------------- export


@dataclass
class Stage1Export:
    """The exported per-frame clouds (torch tensors on the CPU)."""

    times: torch.Tensor  # [F]
    coefficients: torch.Tensor  # [F, K]
    points: torch.Tensor  # [F, N, 3]
    features: torch.Tensor  # [N, 3]
    reference_frame: int
    files: list


def export_stage1(trainer) -> dict:
    """Write the PLYs, export.npz, preview.mp4 and metrics.json of a trained ``Stage1Trainer``."""
    started = time.perf_counter()
    model, data, config, out = trainer.model, trainer.data, trainer.config, trainer.stage1_dir
    with torch.no_grad():
        coefficients = model.coefficients(data.times)
        points = model.points_from_coefficients(coefficients)
    points_np = points.cpu().numpy().astype(np.float32)

    for index, frame_points in enumerate(points_np):
        write_ply_points(out / "points" / f"frame_{index:04d}.ply", frame_points)
    with atomic_path(out / "export.npz") as tmp:
        with open(tmp, "wb") as handle:
            np.savez(
                handle,
                times=data.times.cpu().numpy().astype(np.float32),
                coefficients=coefficients.cpu().numpy().astype(np.float32),
                points=points_np,
                features=model.features.cpu().numpy().astype(np.float32),
                reference_frame=np.int64(config.reference_frame),
                files=np.array([str(f) for f in data.files]),
            )
    if config.preview:
        write_preview(out / "preview.mp4", data, points, model.features, config.preview_fps)

    metrics = evaluate(trainer)
    metrics["export_seconds"] = round(time.perf_counter() - started, 3)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def load_stage1(stage1_dir, device="cpu"):
    """-> (model: DeformationModel on ``device``, config: Stage1Config, export: Stage1Export)."""
    from .trainer import CHECKPOINT_NAME, Stage1Config

    stage1_dir = Path(stage1_dir)
    if not stage1_dir.is_dir():
        raise FileNotFoundError(f"stage-1 folder not found: {stage1_dir}")
    state = load_checkpoint(stage1_dir / CHECKPOINT_NAME, map_location="cpu")
    if not isinstance(state, dict) or state.get("format") != "npg.stage1":
        raise RuntimeError(f"{stage1_dir / CHECKPOINT_NAME} is not an npg stage-1 checkpoint")
    model = DeformationModel.from_hparams(state["model_hparams"])
    model.load_state_dict(state["model"])
    model.to(device)
    config = apply_overrides(Stage1Config(), state["config"])

    export_path = stage1_dir / "export.npz"
    if not export_path.exists():
        raise FileNotFoundError(f"{export_path} not found: the stage-1 run in {stage1_dir} has not finished its export")
    try:
        with np.load(export_path) as npz:
            export = Stage1Export(
                times=torch.from_numpy(npz["times"]),
                coefficients=torch.from_numpy(npz["coefficients"]),
                points=torch.from_numpy(npz["points"]),
                features=torch.from_numpy(npz["features"]),
                reference_frame=int(npz["reference_frame"]),
                files=[str(f) for f in npz["files"]],
            )
    except (OSError, ValueError, KeyError) as err:
        raise RuntimeError(f"{export_path} is corrupt or incomplete: {err}") from err
    if export.points.shape[1:] != (model.num_points, 3):
        raise RuntimeError(f"{export_path}: points {tuple(export.points.shape)} do not match the checkpoint's model")
    return model, config, export


# ------------------------------------------------------------------------------------------- metrics


def evaluate(trainer) -> dict:
    """Metrics of a trained run.

    - ``iou_val`` (and ``iou_train``): silhouette IoU between the masks of held-out frames (val split;
      test when there is no val split) and the splatted cloud: every point drawn as an isotropic
      Gaussian of radius ``iou_splat_scale`` × its RMS distance to its 3 nearest neighbours in the
      reference frame, opacity 0.99, alpha > ``iou_threshold``, closed by the projected point spacing
      (``cloud_iou``); mean over frames. ``iou_val_truth`` (generated scenes): the same metric for
      points sampled on the true surface, the ceiling for a cloud of that size.
    - ``chamfer_px_train`` / ``chamfer_px_val``: 2D chamfer between projected points and mask pixels as
      an RMS distance in pixels of the training resolution: mean over frames of
      (√point→mask + √mask→point)/2.
    - ``surface_chamfer`` (generated scenes): symmetric 3D chamfer (mean distance, both directions,
      averaged) between the points and dense samples of the true surface, mean over the training
      frames, in world units (the generated objects have a bounding sphere of radius 1), plus
      ``surface_chamfer_rel``: the same divided by the true surface's bounding-box diagonal.
    - ``track_error`` (generated scenes): how far each point drifts from the surface point it stands
      for. Each point is attached to its nearest true-surface sample in the reference frame; the
      error is the mean distance between the point and that sample, carried by the true motion,
      over all points and training frames (world units; ``track_error_rel``: over the diagonal). A
      cloud can match the surface in every frame (low chamfer) while sliding along it: stage 2's
      Gaussians, whose colours are fixed, then smear. ``track_drift`` (and ``_rel``): the same mean
      of |(point − sample) − (its offset in the reference frame)|, the sliding without the fixed
      offset from the surface that a point has in every frame.
      ``track_drift_static``: the drift of a cloud that does not move, the yardstick for the drift.
    - ``cloud_motion_rel`` (every scene): how far the points move from where they are in the reference
      frame, mean over points and training frames, over the reference cloud's bounding-box diagonal;
      near 0 for a cloud that fits one static shape to every frame.
    - ``final_losses``: every unweighted term over all training frames, and their weighted total.
    """
    from .trainer import load_split

    config, data, model = trainer.config, trainer.data, trainer.model
    metrics = {
        "scene": data.scene_name,
        "iterations": trainer.iteration,
        "train_minutes": round(trainer.train_seconds / 60.0, 3),
        "iterations_per_second": round(trainer.iteration / max(trainer.train_seconds, 1e-9), 3),
        "device": _device_name(trainer.device),
        "resolution": [data.width, data.height],
        "num_points": config.num_points,
        "num_basis": config.num_basis,
        "iou_splat_scale": config.iou_splat_scale,
    }
    from npg.neighbors import knn

    with torch.no_grad():
        reference = model(data.times[config.reference_frame : config.reference_frame + 1])[0]
        dist2, _ = knn(reference.contiguous(), 3)
        scales = spacing_scales(dist2, config.iou_splat_scale)
        metrics["cloud_motion_rel"] = cloud_motion(model, data.times, config.reference_frame)

    metrics.update({f"{k}_train": v for k, v in silhouette_metrics(model, data, scales, config).items()})
    held_out = None
    for split in ("val", "test"):
        try:
            held_out = load_split(
                trainer.scene_dir, split, data.downsample, trainer.device, with_flows=False, masks_dir=config.masks_dir
            )
            break
        except (FileNotFoundError, ValueError) as err:
            metrics.setdefault("notes", []).append(f"{split} split not used: {err}")
    if held_out is not None:
        metrics["held_out_split"] = held_out.split
        metrics.update({f"{k}_val": v for k, v in silhouette_metrics(model, held_out, scales, config).items()})
        ceiling = truth_iou(trainer, held_out, config)
        if ceiling is not None:
            metrics["iou_val_truth"] = ceiling
    metrics.update(surface_metrics(trainer))
    metrics["final_losses"] = trainer.evaluate_losses()
    return metrics


@torch.no_grad()
def cloud_motion(model, times: torch.Tensor, reference_frame: int, chunk: int = 8) -> float:
    """Mean over points and ``times`` [F] of |x(t) − x(t_ref)|, over the bounding-box diagonal of the
    reference cloud x(t_ref) (``model(times [B]) -> [B, N, 3]``)."""
    reference = model(times[reference_frame : reference_frame + 1])[0]
    diagonal = float((reference.max(0).values - reference.min(0).values).norm())
    total = sum(float((model(times[i : i + chunk]) - reference).norm(dim=-1).mean(1).sum()) for i in range(0, len(times), chunk))
    return total / len(times) / max(diagonal, 1e-12)


@torch.no_grad()
def silhouette_metrics(model, data, scales, config, chunk: int = 8) -> dict:
    """{'iou': mean IoU, 'chamfer_px': mean RMS chamfer} of the cloud against ``data``'s masks."""
    from npg.chamfer import silhouette_chamfer

    from .trainer import project

    ious, chamfers = [], []
    for start in range(0, len(data), chunk):
        frames = torch.arange(start, min(start + chunk, len(data)), device=data.times.device)
        points = model(data.times[frames])
        pixels, _ = project(points, data.w2c[frames], data.intrinsics[frames])
        ious += cloud_iou(points, pixels, [data.cameras[i] for i in frames.tolist()], scales, data.masks[frames], config)
        for frame_pixels, index in zip(pixels, frames.tolist()):
            point_to_mask, mask_to_point = silhouette_chamfer(frame_pixels, data.mask_pixels[index])
            chamfers.append(0.5 * (math.sqrt(float(point_to_mask)) + math.sqrt(float(mask_to_point))))
    return {"iou": float(np.mean(ious)), "chamfer_px": float(np.mean(chamfers))}


def cloud_iou(points, pixels, cameras, scales, masks, config, closing_scale: float = 2.0) -> list[float]:
    """Per-frame IoU of a cloud's silhouette with the masks.

    points [B, N, 3], their projections pixels [B, N, 2], one camera per frame, world splat radii
    scales [N], masks [B, H, W] bool. The silhouette: every point splatted as a small isotropic
    Gaussian (alpha > ``config.iou_threshold``), then a morphological closing whose radius is
    ``closing_scale`` × the median RMS distance in pixels between a projected point and its 3 nearest
    projected neighbours. A cloud samples a surface, so its splats leave gaps that grow with the pixel
    spacing of the points, and splats large enough to close them overshoot the outline: the closing
    fills the gaps without moving the outline. Calibration on generated_arc (points sampled on the
    true surface, every 4th val frame): 0.92 with 2000 points at 200 px and 0.95 with 5000 at 400 px,
    against 0.78 and 0.74 without the closing; closing_scale 1.0 gives 0.88 and 0.82, 2.5 the same as
    2.0 (a plateau).
    """
    import cv2

    from npg.neighbors import knn

    _, alpha = splat_frames(points, torch.ones(points.shape[1], 3, device=points.device), cameras, scales, opacity=0.99)
    covered = (alpha[:, 0] > config.iou_threshold).cpu().numpy().astype(np.uint8)
    ious = []
    for frame, frame_pixels in enumerate(pixels):
        dist2, _ = knn(frame_pixels.contiguous(), min(3, frame_pixels.shape[0] - 1))
        radius = max(1, int(round(closing_scale * float(dist2.mean(1).sqrt().median()))))
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        closed = torch.from_numpy(cv2.morphologyEx(covered[frame], cv2.MORPH_CLOSE, kernel)).bool()
        mask = masks[frame].cpu()
        ious.append(float((closed & mask).sum()) / max(float((closed | mask).sum()), 1.0))
    return ious


def surface_metrics(trainer, samples_per_frame: int = 20000) -> dict:
    """3D chamfer to the true surface on generated scenes (``npg.data.generate.load_ground_truth``:
    per-frame mesh ``vertices`` [F, V, 3] and ``faces``); {} for scenes without ground truth.

    The true surface is sampled with ``samples_per_frame`` points, area-weighted over the triangles
    (the same triangles and barycentric coordinates in every frame, so the samples move with it).
    """
    return deformation_surface_metrics(trainer.model, trainer.scene_dir, trainer.data.times,
                                       trainer.config.reference_frame, trainer.device, samples_per_frame)


def deformation_surface_metrics(model, scene_dir, times, reference_frame: int, device,
                                samples_per_frame: int = 20000) -> dict:
    """``surface_metrics`` for any deformation model (``model(times [B]) -> [B, N, 3]``) at the
    training-frame ``times`` [F] of ``scene_dir``, each point tracked from the true surface point
    nearest to it in frame ``reference_frame``; {} for scenes without ground truth. ``track_drift_p90``:
    the 90th percentile of the drift over points and frames, since a few lost points can carry most
    of it (a CPU arc run: median 0.27% of the diagonal, the worst tenth of the points 55% of the total).
    ``track_drift_static``: the drift of a cloud that does not move (how far the true sites travel
    from the reference frame), the yardstick for ``track_drift``: a model that fits no motion at all
    scores track_drift = track_drift_static. ``track_motion_captured``: the share of the true motion the
    points make, Σ⟨x(t) − x(t_ref), s(t) − s(t_ref)⟩ / Σ|s(t) − s(t_ref)|² over points and frames
    (s: the site each point stands for): 1 when they move with the truth, 0 when they stay put or move
    across it."""
    from npg.neighbors import knn

    try:
        from npg.data.generate import load_ground_truth

        truth = load_ground_truth(scene_dir, "train")
    except (ImportError, FileNotFoundError):
        return {}
    vertices = torch.as_tensor(truth["vertices"], dtype=torch.float32)
    faces = torch.as_tensor(truth["faces"], dtype=torch.int64)
    if len(vertices) != len(times):
        return {"notes": [f"ground truth has {len(vertices)} train frames, the scene {len(times)}: surface chamfer skipped"]}
    sample = surface_sampler(vertices[0], faces, samples_per_frame)

    distances, diagonals, track, drift, drift_values, static = [], [], [], [], [], []
    with torch.no_grad():
        surface = sample(vertices[reference_frame]).to(device).contiguous()
        reference_points = model(times[reference_frame : reference_frame + 1])[0].contiguous()
        _, attached = knn(surface, 1, queries=reference_points)  # the true surface point each point stands for
        attached = attached[:, 0].long()
        reference_sites = surface[attached]
        reference_offset = reference_points - reference_sites
        motion_dot, motion_norm = 0.0, 0.0
        for index in range(len(times)):
            surface = sample(vertices[index]).to(device).contiguous()
            points = model(times[index : index + 1])[0].contiguous()
            to_surface, _ = knn(surface, 1, queries=points)
            to_points, _ = knn(points, 1, queries=surface)
            distances.append(0.5 * (to_surface.sqrt().mean() + to_points.sqrt().mean()).item())
            diagonals.append(float((surface.max(0).values - surface.min(0).values).norm()))
            offset = points - surface[attached]
            track.append(float(offset.norm(dim=-1).mean()))
            drifts = (offset - reference_offset).norm(dim=-1)
            drift.append(float(drifts.mean()))
            drift_values.append(drifts.cpu())
            true_motion = surface[attached] - reference_sites
            static.append(float(true_motion.norm(dim=-1).mean()))
            motion_dot += float(((points - reference_points) * true_motion).sum())
            motion_norm += float(true_motion.square().sum())
    chamfer, diagonal = float(np.mean(distances)), float(np.mean(diagonals))
    drift_p90 = float(np.quantile(torch.cat(drift_values).numpy(), 0.9))
    return {
        "surface_chamfer": chamfer,
        "surface_chamfer_rel": chamfer / diagonal,
        "track_error": float(np.mean(track)),
        "track_error_rel": float(np.mean(track)) / diagonal,
        "track_drift": float(np.mean(drift)),
        "track_drift_rel": float(np.mean(drift)) / diagonal,
        "track_drift_p90": drift_p90,
        "track_drift_p90_rel": drift_p90 / diagonal,
        "track_drift_static": float(np.mean(static)),
        "track_drift_static_rel": float(np.mean(static)) / diagonal,
        "track_motion_captured": motion_dot / motion_norm if motion_norm > 0 else float("nan"),
    }


def surface_sites(vertices0: torch.Tensor, faces: torch.Tensor, count: int, seed: int = 0):
    """Area-weighted sample sites on a triangle mesh, drawn on vertices0 [V, 3]: (the vertex indices of
    each site's triangle [count, 3], its barycentric coordinates [count, 3])."""
    generator = torch.Generator().manual_seed(seed)
    corners = vertices0[faces]  # [T, 3, 3]
    areas = torch.linalg.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]).norm(dim=-1)
    triangles = faces[torch.multinomial(areas, count, replacement=True, generator=generator)]
    u, v = torch.rand(2, count, generator=generator)
    flip = u + v > 1
    u, v = torch.where(flip, 1 - u, u), torch.where(flip, 1 - v, v)
    return triangles, torch.stack([1 - u - v, u, v], -1)


def surface_sampler(vertices0: torch.Tensor, faces: torch.Tensor, count: int, seed: int = 0):
    """Area-weighted samples of a deforming triangle mesh that move with it: ``surface_sites`` drawn
    once on vertices0 [V, 3]; returns ``sample(vertices [V, 3]) -> [count, 3]``."""
    triangles, barycentric = surface_sites(vertices0, faces, count, seed)
    return lambda vertices: (vertices[triangles] * barycentric[..., None]).sum(1)


@torch.no_grad()
def truth_iou(trainer, held_out, config) -> float | None:
    """The IoU metric on the true surface of a generated scene: as many points as the cloud, sampled on
    the held-out frames' true meshes and splatted the same way. The best a cloud of that size can get,
    so the ceiling to read ``iou_val`` against. None for scenes without ground truth."""
    from npg.neighbors import knn

    from .trainer import project

    try:
        from npg.data.generate import load_ground_truth

        truth = load_ground_truth(trainer.scene_dir, held_out.split)
    except (ImportError, FileNotFoundError):
        return None
    vertices = torch.as_tensor(truth["vertices"], dtype=torch.float32)
    if len(vertices) != len(held_out):
        return None
    sample = surface_sampler(vertices[0], torch.as_tensor(truth["faces"], dtype=torch.int64), config.num_points)
    device = held_out.times.device
    points = torch.stack([sample(v) for v in vertices]).to(device)
    dist2, _ = knn(points[0].contiguous(), 3)
    scales = spacing_scales(dist2, config.iou_splat_scale)
    ious = []
    for start in range(0, len(held_out), 8):
        frames = torch.arange(start, min(start + 8, len(held_out)), device=device)
        pixels, _ = project(points[frames], held_out.w2c[frames], held_out.intrinsics[frames])
        ious += cloud_iou(points[frames], pixels, [held_out.cameras[i] for i in frames.tolist()], scales,
                          held_out.masks[frames], config)
    return float(np.mean(ious))


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


# --------------------------------------------------------------------------------------------- preview


def write_preview(path, data, points: torch.Tensor, features: torch.Tensor, fps: int = 10) -> None:
    """MP4 of the projected cloud over the training frames (imageio), mask outline in green."""
    import cv2

    from .trainer import project

    with torch.no_grad():
        pixels, depth = project(points, data.w2c, data.intrinsics)
    pixels, depth = pixels.cpu().numpy(), depth.cpu().numpy()
    colors = (np.clip(features.cpu().numpy(), 0, 1) * 255).astype(np.uint8)
    height, width = data.height, data.width
    scale = max(1, math.ceil(512 / max(height, width)))
    out_h, out_w = height * scale + (height * scale) % 2, width * scale + (width * scale) % 2
    frames = []
    for index in range(len(data)):
        image = np.zeros((out_h, out_w, 3), dtype=np.uint8)
        image[: height * scale, : width * scale] = np.repeat(np.repeat(data.rgb[index], scale, 0), scale, 1)
        mask = data.masks[index].cpu().numpy().astype(np.uint8)
        mask = cv2.resize(mask, (width * scale, height * scale), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(image, contours, -1, (0, 255, 0), 1)
        # far points first so near ones stay visible
        order = np.argsort(-depth[index])
        xy = np.round((pixels[index, order] + 0.5) * scale - 0.5).astype(np.int64)
        inside = (depth[index, order] > 0) & (xy[:, 0] >= 0) & (xy[:, 0] < out_w) & (xy[:, 1] >= 0) & (xy[:, 1] < out_h)
        for dx in (0, 1):
            for dy in (0, 1):
                x = np.clip(xy[inside, 0] + dx, 0, out_w - 1)
                y = np.clip(xy[inside, 1] + dy, 0, out_h - 1)
                image[y, x] = colors[order][inside]
        frames.append(image)
    write_video(path, frames, fps=fps)


__all__ = ["Stage1Export", "export_stage1", "load_stage1", "read_ply_points", "write_ply_points", "evaluate"]
