"""npg-render: render a trained run, evaluate it, and export its Gaussians.

``npg-render OUT --split test|val|train`` writes into ``OUT/render/<split>/``:

- ``renders/NNNN.png`` and ``gt/NNNN.png`` (ground truth composited on the same background),
- ``video.mp4``: render | ground truth side by side, in time order,
- ``metrics.json``: PSNR, SSIM (11×11, "valid", TiNeuVox convention) and LPIPS-VGG per image and
  their means, plus render FPS (stage-1 network + skinning + rasterization per frame, after warm-up;
  ``--fps-size 800`` also measures with the cameras scaled to 800 pixels wide),
- ``ply/frame_NNNN.ply``: the posed Gaussians of each frame as standard 3DGS PLY files,

and ``OUT/render/orbit.mp4``: a novel-view orbit around the object while time runs from 0 to 1.
Protocol: black background (``--background``), the training resolution unless ``--downsample``.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from npg.camera import Camera
from npg.io import atomic_path, atomic_write_text, write_video

SH_REST_COEFFS = 15  # 3DGS PLY files carry degree-3 SH: 45 f_rest values


# ------------------------------------------------------------------------------------------ PLY
def gaussian_ply_fields() -> list[str]:
    return (
        ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
        + [f"f_rest_{i}" for i in range(3 * SH_REST_COEFFS)]
        + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    )


def write_gaussian_ply(path, means, rotations, log_scales, opacity_logits, sh_dc, sh_rest) -> None:
    """Write Gaussians as a 3DGS PLY (binary little-endian float32), atomically.

    means [G, 3], rotations [G, 4] (w, x, y, z), log_scales [G, 3], opacity_logits [G, 1] (pre-sigmoid),
    sh_dc [G, 1, 3], sh_rest [G, M, 3] (M ≤ 15; padded with zeros to degree 3). The f_rest layout is
    3DGS's: all coefficients of red, then green, then blue.
    """
    count = means.shape[0]
    rest = torch.zeros(count, SH_REST_COEFFS, 3, dtype=torch.float32)
    rest[:, : sh_rest.shape[1]] = sh_rest.detach().float().cpu()
    columns = [
        means.detach().float().cpu(),
        torch.zeros(count, 3),
        sh_dc.detach().float().cpu().transpose(1, 2).reshape(count, 3),
        rest.transpose(1, 2).reshape(count, 3 * SH_REST_COEFFS),
        opacity_logits.detach().float().cpu().reshape(count, 1),
        log_scales.detach().float().cpu(),
        torch.nn.functional.normalize(rotations.detach().float().cpu(), dim=-1),
    ]
    data = torch.cat(columns, dim=1).numpy().astype("<f4")
    fields = gaussian_ply_fields()
    header = "ply\nformat binary_little_endian 1.0\n" f"element vertex {count}\n"
    header += "".join(f"property float {name}\n" for name in fields) + "end_header\n"
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(header.encode("ascii"))
            handle.write(np.ascontiguousarray(data).tobytes())


def read_gaussian_ply(path) -> dict:
    """Read a binary little-endian PLY of float32 vertex properties -> {name: array [G]}."""
    path = Path(path)
    with open(path, "rb") as handle:
        if handle.readline().strip() != b"ply":
            raise ValueError(f"{path} is not a PLY file")
        names, count, fmt = [], None, None
        while True:
            line = handle.readline()
            if not line:
                raise ValueError(f"{path}: PLY header has no end_header")
            words = line.decode("ascii").split()
            if words[:1] == ["format"]:
                fmt = words[1]
            elif words[:2] == ["element", "vertex"]:
                count = int(words[2])
            elif words[:1] == ["property"]:
                if words[1] not in ("float", "float32"):
                    raise ValueError(f"{path}: property {words[-1]} is {words[1]}, only float32 is read")
                names.append(words[2])
            elif words[:1] == ["end_header"]:
                break
        if fmt != "binary_little_endian" or count is None:
            raise ValueError(f"{path}: expected a binary_little_endian PLY with a vertex element")
        data = np.frombuffer(handle.read(), dtype="<f4")
    if data.size != count * len(names):
        raise ValueError(f"{path}: holds {data.size} values, expected {count} × {len(names)}")
    data = data.reshape(count, len(names))
    return {name: data[:, i] for i, name in enumerate(names)}


def export_gaussians_ply(path, gaussians, dynamic_points) -> None:
    """The Gaussians posed by ``dynamic_points`` [N, 3] as a 3DGS PLY at ``path``."""
    with torch.no_grad():
        means, rotations = gaussians.skin(dynamic_points)
        write_gaussian_ply(path, means, rotations, gaussians.log_scales, gaussians.opacity_logits, gaussians.sh_dc, gaussians.sh_rest)


# ------------------------------------------------------------------------------------------ cameras
def look_at(eye: torch.Tensor, target: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """OpenCV world-to-camera [4, 4] for a camera at ``eye`` looking at ``target`` with ``up`` above."""
    forward = torch.nn.functional.normalize(target - eye, dim=0)
    right = torch.nn.functional.normalize(torch.linalg.cross(forward, up), dim=0)
    down = torch.linalg.cross(forward, right)
    w2c = torch.eye(4, dtype=torch.float64)
    w2c[:3, :3] = torch.stack([right, down, forward])
    w2c[:3, 3] = -w2c[:3, :3] @ eye
    return w2c


def orbit_cameras(cameras: list[Camera], center: torch.Tensor, count: int) -> list[Camera]:
    """``count`` cameras on a full circle around ``center`` at the training cameras' mean distance and
    elevation, about their mean up direction, with the intrinsics of ``cameras[0]``."""
    center = center.double().cpu()
    ups = torch.stack([-c.c2w[:3, 1].double() for c in cameras])  # OpenCV y points down
    up = torch.nn.functional.normalize(ups.mean(0), dim=0)
    offsets = torch.stack([c.campos.double() for c in cameras]) - center
    radius = float(offsets.norm(dim=1).mean())
    height = float((offsets @ up).mean())
    first = offsets[0] - (offsets[0] @ up) * up
    if first.norm() < 1e-6:  # camera straight above: any horizontal direction
        first = torch.linalg.cross(up, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
        if first.norm() < 1e-6:
            first = torch.linalg.cross(up, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    axis1 = torch.nn.functional.normalize(first, dim=0)
    axis2 = torch.linalg.cross(up, axis1)
    horizontal = math.sqrt(max(radius**2 - height**2, 1e-12))
    result = []
    for k in range(count):
        angle = 2.0 * math.pi * k / count
        eye = center + horizontal * (math.cos(angle) * axis1 + math.sin(angle) * axis2) + height * up
        result.append(replace(cameras[0], w2c=look_at(eye, center, up).float()))
    return result


# ------------------------------------------------------------------------------------------ video
def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [0, 1] -> [H, W, 3] uint8."""
    return (image.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)


# ------------------------------------------------------------------------------------------ rendering
def _synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class FrameRenderer:
    """Renders a trained model at any time and camera: p(t) from the stage-1 network, skinning,
    rasterization. The model is fixed while it renders.

    The activated opacities, scales and SH are computed once. On CUDA the network and the skinning
    of one time step (about 45 small kernels, bound by their launches: 1.4 of the 2.7 ms of an
    800×800 frame on an H100, by torch.profiler) are captured into a CUDA graph on first use and
    replayed for every frame; the rasterizer, whose work depends on the view, runs after it as usual.
    ``load_trained`` has tested every tensor of the model for NaN / Inf, so the per-frame checks
    (a host sync each) are skipped; a time is checked on the host.
    """

    def __init__(self, gaussians, stage1_model, use_graph: bool | None = None):
        self.gaussians = gaussians
        self.stage1_model = stage1_model
        self.device = gaussians.logits.device
        self.use_graph = self.device.type == "cuda" if use_graph is None else bool(use_graph)
        if self.use_graph and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA model, this one is on {self.device}")
        with torch.no_grad():
            self.opacities = gaussians.opacities
            self.scales = gaussians.scales
            self.shs = gaussians.shs
        self._time = torch.zeros(1, device=self.device)  # the graph's input
        self._graph = None
        self._posed = None

    @torch.no_grad()
    def _pose_at_stored_time(self):
        points = self.stage1_model(self._time, validate=False)[0]
        means, rotations = self.gaussians.skin(points, validate=False)
        return points, means, rotations

    def _capture(self) -> None:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up off the capture: Triton compiles, cuBLAS picks kernels
            for _ in range(2):
                self._pose_at_stored_time()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._posed = self._pose_at_stored_time()
        self._graph = graph

    def pose(self, time: float):
        """(stage-1 points [N, 3], Gaussian means [G, 3], rotations [G, 4]) at ``time``. With a graph
        these are its output buffers: the next call overwrites them."""
        time = float(time)
        if not math.isfinite(time):
            raise ValueError(f"time must be finite, got {time}")
        self._time.fill_(time)
        if not self.use_graph:
            return self._pose_at_stored_time()
        if self._graph is None:
            self._capture()
        self._graph.replay()
        return self._posed

    @torch.no_grad()
    def render(self, time: float, camera, background=None):
        """The model at ``time`` seen by ``camera`` -> ``npg.RasterOutput``."""
        from npg.raster import rasterize

        _, means, rotations = self.pose(time)
        return rasterize(
            means,
            self.opacities,
            camera,
            shs=self.shs,
            sh_degree=self.gaussians.active_sh_degree,
            scales=self.scales,
            rotations=rotations,
            background=background,
        )


@torch.no_grad()
def render_fps(renderer: FrameRenderer, cameras, times, background, warmup: int = 3, repeats: int = 3) -> float:
    """Frames per second of the whole render (stage-1 network, skinning, rasterization) over
    ``cameras`` at ``times`` (floats), after ``warmup`` frames."""
    device = renderer.device
    frames = len(cameras)
    for i in range(min(warmup, frames)):
        renderer.render(times[i], cameras[i], background=background)
    _synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        for i in range(frames):
            renderer.render(times[i], cameras[i], background=background)
    _synchronize(device)
    return repeats * frames / (time.perf_counter() - started)


def _background(name: str, device) -> torch.Tensor:
    colours = {"black": (0.0, 0.0, 0.0), "white": (1.0, 1.0, 1.0)}
    if name not in colours:
        raise ValueError(f"background must be black or white, got {name!r}")
    return torch.tensor(colours[name], device=device)


def render_split(
    out_dir,
    split: str = "test",
    background: str = "black",
    downsample: int | None = None,
    device: str = "auto",
    lpips_weights=None,
    export_ply: bool = True,
    videos: bool = True,
    orbit_frames: int = 120,
    video_fps: int = 30,
    fps_size: int | None = None,
) -> dict:
    """Render and evaluate ``split`` of a trained run in ``out_dir``; returns the metrics dict."""
    from npg.data import load_scene
    from npg.metrics import load_lpips, psnr, ssim_eval
    from npg.stage2.trainer import load_trained, resolve_device

    out_dir = Path(out_dir)
    device = resolve_device(device)
    gaussians, stage1_model, info = load_trained(out_dir, device)
    if not info["finished"]:
        print(f"npg-render: the stage-2 run in {out_dir} is not finished (step {info['step']}); rendering its last checkpoint")
    scene_dir = Path(info["scene"])
    data = load_scene(scene_dir, split, downsample=downsample or info["downsample"])
    bg = _background(background, device)
    cameras = [camera.to(device) for camera in data.cameras]
    times = data.times.tolist()
    renderer = FrameRenderer(gaussians, stage1_model)
    target_dir = out_dir / "render" / split
    lpips_fn = load_lpips(lpips_weights, device=device)

    rows, frames = [], []
    with torch.no_grad():
        for i in range(len(data)):
            image = renderer.render(times[i], cameras[i], background=bg).color.clamp(0, 1)
            truth = data.image(i, background=bg, device=device)
            row = {"frame": i, "file": data.files[i].name, "time": times[i], "psnr": psnr(image, truth), "ssim": ssim_eval(image, truth)}
            if lpips_fn is not None:
                row["lpips"] = float(lpips_fn(image[None], truth[None])[0])
            rows.append(row)
            rendered_u8, truth_u8 = to_uint8(image), to_uint8(truth)
            _write_png(target_dir / "renders" / f"{i:04d}.png", rendered_u8)
            _write_png(target_dir / "gt" / f"{i:04d}.png", truth_u8)
            if videos:
                frames.append(np.concatenate([rendered_u8, truth_u8], axis=1))
            if export_ply:
                points = renderer.pose(times[i])[0]
                export_gaussians_ply(target_dir / "ply" / f"frame_{i:04d}.ply", gaussians, points)

        fps = render_fps(renderer, cameras, times, bg)
        metrics = {
            "scene": data.name,
            "split": split,
            "resolution": [data.width, data.height],
            "background": background,
            "frames": len(data),
            "gaussians": gaussians.num_gaussians,
            "psnr": float(np.mean([r["psnr"] for r in rows])),
            "ssim": float(np.mean([r["ssim"] for r in rows])),
            "lpips": float(np.mean([r["lpips"] for r in rows])) if lpips_fn is not None else None,
            "lpips_note": None if lpips_fn is not None else "skipped: no LPIPS VGG weights (set NPG_LPIPS_WEIGHTS)",
            "fps": fps,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "stage2_step": info["step"],
            "per_image": rows,
        }
        if fps_size:
            scaled = [camera.scaled(fps_size / camera.width) for camera in cameras]
            metrics[f"fps_{fps_size}"] = render_fps(renderer, scaled, times, bg)

        if videos:
            write_video(target_dir / "video.mp4", frames, fps=min(video_fps, max(len(frames), 1)))
            if orbit_frames > 0:
                center = renderer.pose(times[0])[0].mean(dim=0)
                orbit = orbit_cameras(cameras, center, orbit_frames)
                orbit_times = torch.linspace(0.0, 1.0, orbit_frames).tolist()
                orbit_video = [
                    to_uint8(renderer.render(t, camera.to(device), background=bg).color)
                    for t, camera in zip(orbit_times, orbit)
                ]
                write_video(out_dir / "render" / "orbit.mp4", orbit_video, fps=video_fps)

    atomic_write_text(target_dir / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def _write_png(path: Path, image: np.ndarray) -> None:
    import imageio.v2 as imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    imageio.imwrite(path, image)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="npg-render", description="Render, evaluate and export a trained npg run.")
    parser.add_argument("out", help="the run folder given to npg-train -o")
    parser.add_argument("--split", default="test", choices=["test", "val", "train"])
    parser.add_argument("--background", default="black", choices=["black", "white"])
    parser.add_argument("--downsample", type=int, default=None, help="image downsampling (default: the training one)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--lpips-weights", default=None, help="LPIPS VGG weights (file or folder); default $NPG_LPIPS_WEIGHTS")
    parser.add_argument("--no-ply", action="store_true", help="skip the per-frame 3DGS .ply export")
    parser.add_argument("--no-video", action="store_true", help="skip video.mp4 and orbit.mp4")
    parser.add_argument("--orbit-frames", type=int, default=120)
    parser.add_argument("--video-fps", type=int, default=30)
    parser.add_argument("--fps-size", type=int, default=None, help="also measure render FPS with cameras scaled to this width")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    metrics = render_split(
        args.out,
        split=args.split,
        background=args.background,
        downsample=args.downsample,
        device=args.device,
        lpips_weights=args.lpips_weights,
        export_ply=not args.no_ply,
        videos=not args.no_video,
        orbit_frames=args.orbit_frames,
        video_fps=args.video_fps,
        fps_size=args.fps_size,
    )
    summary = {k: v for k, v in metrics.items() if k != "per_image"}
    print(json.dumps(summary, indent=2))
    print(f"renders, videos and metrics written to {Path(args.out) / 'render' / args.split}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
