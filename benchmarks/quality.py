"""End-to-end quality benchmark: train both stages and evaluate on each scene.

Protocol (issue 5): 400×400 images (scenes smaller than that at their own size), black background,
the test split (lego: val), PSNR / SSIM (11×11, valid) / LPIPS-VGG (when ``NPG_LPIPS_WEIGHTS`` is set),
wall-clock minutes of both stages, final Gaussian count, render FPS with the cameras scaled to 800
pixels wide. Scenes: ``generated_arc`` and ``generated_static`` (rendered by ``npg.data.generate`` at
400×400, "full" size) and every real scene in ``../shared/data/scenes``. A scene that cannot be
trained (e.g. no masks for stage 1) gets a row with an ``error`` field instead of numbers.

    python benchmarks/quality.py [--scenes generated_arc,dnerf_lego_tiny] [--preset default|fast|cpu]
                                 [--work DIR] [--set stage2.iterations=20000 ...]

Rows go to ``benchmarks/results/quality.json``: {scene, split, resolution, psnr, ssim, lpips,
stage1_min, stage2_min, gaussians, fps_800, device} (+ preset, eval curve, error). Training writes a
test-PSNR curve every ``stage2.eval_every`` steps into ``WORK/<scene>/stage2/log.csv``: the evidence for
choosing iteration counts.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import device_name, format_table, write_json  # noqa: E402

RESULTS = HERE / "results" / "quality.json"
SHARED_SCENES = Path(os.environ.get("NPG_SHARED", REPO.parent / "shared")) / "data" / "scenes"
GENERATED = ("generated_arc", "generated_static")
EVAL_SPLIT = {"dnerf_lego_tiny": "val"}  # lego is evaluated on val, as in D-NeRF-scene papers
PROTOCOL_SIZE = 400
FPS_SIZE = 800
COLUMNS = ["scene", "split", "resolution", "psnr", "ssim", "lpips", "stage1_min", "stage2_min", "gaussians", "fps_800", "device"]


def available_scenes() -> list[str]:
    real = sorted(p.name for p in SHARED_SCENES.iterdir() if p.is_dir()) if SHARED_SCENES.is_dir() else []
    return list(GENERATED) + real


def scene_folder(name: str, work: Path) -> Path:
    if name in GENERATED:
        from npg.data.generate import make_scene

        return Path(make_scene(work / "scenes" / name, preset=name, size="full", progress=False))
    path = SHARED_SCENES / name
    if not path.is_dir():
        raise FileNotFoundError(f"scene {name!r} not found in {SHARED_SCENES}")
    return path


def run_scene(name: str, work: Path, preset: str, overrides: list[str]) -> dict:
    from npg.render import render_split
    from npg.train import main as train_main

    split = EVAL_SPLIT.get(name, "test")
    row = {"scene": name, "split": split, "preset": preset, "overrides": list(overrides)}
    scene = scene_folder(name, work)
    out = work / "runs" / name
    settings = [
        f"stage1.max_image_size={PROTOCOL_SIZE}",
        f"stage2.max_image_size={PROTOCOL_SIZE}",
        f"stage2.eval_split={split}",
        "stage2.eval_every=5000",
        "progress=false",
    ] + list(overrides)
    argv = [str(scene), "-o", str(out), "--preset", preset]
    for item in settings:
        argv += ["--set", item]
    started = time.perf_counter()
    train_main(argv)
    row["train_wall_min"] = round((time.perf_counter() - started) / 60.0, 3)
    stage1 = json.loads((out / "stage1" / "metrics.json").read_text())
    stage2 = json.loads((out / "stage2" / "metrics.json").read_text())
    metrics = render_split(out, split=split, export_ply=False, videos=False, fps_size=FPS_SIZE)
    width, height = metrics["resolution"]
    row.update(
        resolution=f"{width}x{height}",
        psnr=round(metrics["psnr"], 3),
        ssim=round(metrics["ssim"], 4),
        lpips=None if metrics["lpips"] is None else round(metrics["lpips"], 4),
        stage1_min=stage1.get("train_minutes"),
        stage2_min=stage2.get("minutes"),
        gaussians=metrics["gaussians"],
        fps_800=round(metrics[f"fps_{FPS_SIZE}"], 1),
        fps_eval=round(metrics["fps"], 1),
        device=metrics["device"],
        eval_curve=eval_curve(out / "stage2" / "log.csv"),
        train_psnr=stage2.get("train_psnr"),
        stage1_iou_val=stage1.get("iou_val"),
        stage1_iou_val_truth=stage1.get("iou_val_truth"),
        stage1_chamfer_px_val=stage1.get("chamfer_px_val"),
        stage1_surface_chamfer_rel=stage1.get("surface_chamfer_rel"),
        stage1_track_error_rel=stage1.get("track_error_rel"),
    )
    return row


def eval_curve(log_path: Path) -> list:
    """[[step, eval PSNR], ...] from a stage-2 log.csv ([] when there is none yet)."""
    import csv

    if not Path(log_path).exists():
        return []
    with open(log_path, newline="") as handle:
        return [[int(r["step"]), float(r["eval_psnr"])] for r in csv.DictReader(handle) if r.get("eval_psnr")]


def run(scenes: list[str] | None = None, work: str | os.PathLike | None = None, preset: str = "default", overrides=(),
        out: str | os.PathLike = RESULTS) -> list[dict]:
    """Train and evaluate each scene; returns one row per scene (and writes them to ``out``)."""
    work = Path(work or os.environ.get("NPG_BENCH_WORK", REPO / "benchmarks" / "work"))
    rows = []
    for name in scenes or available_scenes():
        try:
            row = run_scene(name, work, preset, list(overrides))
        except Exception as err:  # keep the other scenes' numbers; say what failed
            traceback.print_exc()
            row = {"scene": name, "split": EVAL_SPLIT.get(name, "test"), "preset": preset, "device": device_name(),
                   "error": f"{type(err).__name__}: {err}".splitlines()[0][:300]}
        rows.append(row)
        write_json(rows, str(out))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", default=None, help=f"comma-separated (default: {', '.join(available_scenes())})")
    parser.add_argument("--preset", default="default", choices=["default", "fast", "cpu"])
    parser.add_argument("--work", default=None, help="folder for generated scenes and runs (default benchmarks/work)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default=str(RESULTS), help=f"rows go here (default {RESULTS.relative_to(REPO)})")
    args = parser.parse_args(argv)
    rows = run(args.scenes.split(",") if args.scenes else None, args.work, args.preset, args.overrides, args.out)
    print(format_table(rows, COLUMNS + ["error"]))
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
