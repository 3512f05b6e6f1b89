"""Rasterizer benchmark: npg's CUDA rasterizer side by side with gsplat 1.5.3, same scenes, same run.

The five scenes of the timing table in ``../shared/refdata/README.md``: the real garden Gaussians of
``refdata/raster/garden_v0.npz`` (138 766, SH 1) at 648×420 and, with the same camera, 1296×840; and
random scenes of 100k and 1M Gaussians with SH 3 at 800×800 and 1M at 1920×1080. For each, the median
(CUDA events, after warm-up) of a forward render and of a forward + backward (an upstream gradient on
the colour), and the peak GPU memory of the forward + backward above the inputs.

gsplat runs through its public ``gsplat.rasterization`` with the same means, unit quaternions,
scales, opacities, SH coefficients, camera (viewmats = w2c, Ks) and near plane 0.2, packed=False.

Usage (GPU machine): ``python -m benchmarks.rasterizer [--out benchmarks/results/rasterizer.json]
[--no-gsplat] [--profile]``. Rows: {scene, impl: "npg" | "gsplat", fwd_ms, fwdbwd_ms, peak_mem_mb, device}.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import cuda_median_ms, device_name, format_table, peak_memory_mb, write_json

SCENES = ["garden_648x420", "garden_1296x840", "random_100k_800x800", "random_1M_800x800", "random_1M_1920x1080"]

# The reference CUDA rasterizer's H100 figures from ../shared/refdata/README.md (ms): fwd, fwd+bwd.
REFERENCE_MS = {
    "garden_648x420": (0.61, 4.70),
    "garden_1296x840": (0.88, 14.6),
    "random_100k_800x800": (0.72, 4.41),
    "random_1M_800x800": (1.86, 8.23),
    "random_1M_1920x1080": (2.72, 21.3),
}


@dataclass
class Scene:
    name: str
    means: torch.Tensor  # [N, 3]
    quats: torch.Tensor  # [N, 4] unit (w, x, y, z)
    scales: torch.Tensor  # [N, 3]
    opacities: torch.Tensor  # [N]
    shs: torch.Tensor  # [N, K, 3]
    sh_degree: int
    camera: object  # npg.Camera
    background: torch.Tensor  # [3]


def shared_dir() -> Path:
    return Path(os.environ.get("NPG_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))


def garden_scene(name: str, size_factor: int) -> Scene:
    from npg.camera import Camera

    path = shared_dir() / "refdata" / "raster" / "garden_v0.npz"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found (set NPG_SHARED to the folder holding refdata/)")
    z = np.load(path)
    t = lambda key: torch.from_numpy(np.ascontiguousarray(z[key])).float().cuda()
    camera = Camera.from_fov(
        torch.from_numpy(z["cam__w2c"]), float(z["cam__tanfovx"]), float(z["cam__tanfovy"]),
        int(z["cam__width"]) * size_factor, int(z["cam__height"]) * size_factor,
    )
    quats = t("in__rotations")
    return Scene(name, t("in__means3D"), quats / quats.norm(dim=1, keepdim=True), t("in__scales"),
                 t("in__opacities").reshape(-1), t("in__shs"), int(z["cam__sh_degree"]), camera, t("cam__bg"))


def random_scene(name: str, n: int, width: int, height: int, seed: int = 0) -> Scene:
    """n Gaussians in a 2×2×2 box 3 units in front of a 53° camera: 1–8 px footprints, SH 3."""
    from npg.camera import Camera

    g = torch.Generator(device="cuda").manual_seed(seed)
    means = torch.rand(n, 3, device="cuda", generator=g) * 2 - 1
    means[:, 2] += 3.0
    quats = torch.randn(n, 4, device="cuda", generator=g)
    quats = quats / quats.norm(dim=1, keepdim=True)
    scales = torch.exp(torch.rand(n, 3, device="cuda", generator=g) * 2.0 - 5.5)
    opacities = torch.rand(n, device="cuda", generator=g) * 0.9 + 0.05
    shs = torch.randn(n, 16, 3, device="cuda", generator=g) * 0.3
    camera = Camera.from_fov(torch.eye(4), 0.5, 0.5 * height / width, width, height)
    return Scene(name, means, quats, scales, opacities, shs, 3, camera, torch.zeros(3, device="cuda"))


def make_scene(name: str) -> Scene:
    return {
        "garden_648x420": lambda: garden_scene(name, 1),
        "garden_1296x840": lambda: garden_scene(name, 2),
        "random_100k_800x800": lambda: random_scene(name, 100_000, 800, 800),
        "random_1M_800x800": lambda: random_scene(name, 1_000_000, 800, 800),
        "random_1M_1920x1080": lambda: random_scene(name, 1_000_000, 1920, 1080),
    }[name]()


def _leaves(scene: Scene) -> dict:
    return {k: getattr(scene, k).detach().clone().requires_grad_(True)
            for k in ("means", "quats", "scales", "opacities", "shs")}


def npg_render_fn(scene: Scene):
    """(forward, forward + backward) closures of npg.rasterize on the scene."""
    import npg

    p = _leaves(scene)
    cam = scene.camera
    upstream = torch.randn(3, cam.height, cam.width, device="cuda")

    def forward():
        return npg.rasterize(p["means"], p["opacities"], cam, shs=p["shs"], sh_degree=scene.sh_degree,
                             scales=p["scales"], rotations=p["quats"], background=scene.background).color

    def forward_backward():
        for v in p.values():
            v.grad = None
        forward().backward(upstream)

    return forward, forward_backward


def gsplat_render_fn(scene: Scene):
    from gsplat import rasterization

    p = _leaves(scene)
    cam = scene.camera
    viewmats = cam.w2c.cuda()[None]
    Ks = cam.K.cuda()[None]
    upstream = torch.randn(1, cam.height, cam.width, 3, device="cuda")

    def forward():
        colors, _, _ = rasterization(
            p["means"], p["quats"], p["scales"], p["opacities"], p["shs"], viewmats, Ks, cam.width, cam.height,
            near_plane=0.2, sh_degree=scene.sh_degree, packed=False, backgrounds=scene.background[None],
        )
        return colors

    def forward_backward():
        for v in p.values():
            v.grad = None
        forward().backward(upstream)

    return forward, forward_backward


def measure(scene: Scene, impl: str, warmup: int = 10, iters: int = 30) -> dict:
    forward, forward_backward = (npg_render_fn if impl == "npg" else gsplat_render_fn)(scene)
    fwd = cuda_median_ms(forward, warmup=warmup, iters=iters)
    fwdbwd = cuda_median_ms(forward_backward, warmup=warmup, iters=iters)
    peak = peak_memory_mb(forward_backward)
    return {"scene": scene.name, "impl": impl, "fwd_ms": round(fwd, 4), "fwdbwd_ms": round(fwdbwd, 4),
            "peak_mem_mb": round(peak, 1), "device": device_name()}


def npg_overheads(scene: Scene) -> dict:
    """Where npg's forward time goes besides the kernels: the Python-side input validation alone
    (check_inputs, whose NaN/Inf scan costs a synchronisation) and the bare extension call."""
    from npg._ext import load
    from npg.raster.checks import check_inputs
    from npg.raster.cuda import camera_numbers

    cam = scene.camera
    args = dict(shs=scene.shs, sh_degree=scene.sh_degree, scales=scene.scales, rotations=scene.quats,
                background=scene.background)
    validate = lambda: check_inputs(scene.means, scene.opacities, cam, dtypes=(torch.float32,), **args)
    ext, numbers = load("raster"), camera_numbers(cam)
    bare = lambda: ext.forward(scene.means, scene.opacities, scene.shs, None, scene.scales, scene.quats, None,
                               scene.background, numbers, scene.sh_degree, 1.0)
    return {"scene": scene.name, "check_inputs_ms": round(cuda_median_ms(validate), 4),
            "extension_fwd_ms": round(cuda_median_ms(bare), 4)}


def profile_npg(scene: Scene) -> str:
    """Kernel time table of one npg forward + backward (after warm-up)."""
    _, forward_backward = npg_render_fn(scene)
    for _ in range(3):
        forward_backward()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        forward_backward()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60)


def run(scenes=SCENES, with_gsplat: bool = True, profile: bool = False) -> list[dict]:
    rows, overheads = [], []
    for name in scenes:
        scene = make_scene(name)
        rows.append(measure(scene, "npg"))
        if profile:
            print(f"--- npg kernels, {name}, one forward + backward\n{profile_npg(scene)}", flush=True)
            overheads.append(npg_overheads(scene))
        if with_gsplat:
            rows.append(measure(scene, "gsplat"))
        print(format_table(rows[-2 if with_gsplat else -1:]), flush=True)
        del scene
        torch.cuda.empty_cache()
    if overheads:
        print("npg forward overheads (the API forward = check_inputs + extension + autograd bookkeeping)")
        print(format_table(overheads), flush=True)
    return rows


def summary(rows: list[dict]) -> str:
    """Per scene: npg's times, and npg / gsplat and npg / reference-rasterizer ratios (< 1: npg faster)."""
    by = {(r["scene"], r["impl"]): r for r in rows}
    lines = []
    for name in dict.fromkeys(r["scene"] for r in rows):
        ours = by[(name, "npg")]
        line = {"scene": name, "npg_fwd_ms": ours["fwd_ms"], "npg_fwdbwd_ms": ours["fwdbwd_ms"]}
        other = by.get((name, "gsplat"))
        if other:
            line["fwd_vs_gsplat"] = round(ours["fwd_ms"] / other["fwd_ms"], 3)
            line["fwdbwd_vs_gsplat"] = round(ours["fwdbwd_ms"] / other["fwdbwd_ms"], 3)
        ref_fwd, ref_fwdbwd = REFERENCE_MS[name]
        line["fwd_vs_ref_table"] = round(ours["fwd_ms"] / ref_fwd, 3)
        line["fwdbwd_vs_ref_table"] = round(ours["fwdbwd_ms"] / ref_fwdbwd, 3)
        lines.append(line)
    return format_table(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/rasterizer.json")
    parser.add_argument("--no-gsplat", action="store_true", help="time npg alone")
    parser.add_argument("--profile", action="store_true", help="print npg's kernel times per scene")
    parser.add_argument("--scenes", nargs="*", default=SCENES, choices=SCENES)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the rasterizer benchmark needs a CUDA GPU")
    rows = run(args.scenes, with_gsplat=not args.no_gsplat, profile=args.profile)
    write_json(rows, args.out)
    print(format_table(rows))
    print(summary(rows))


if __name__ == "__main__":
    main()
