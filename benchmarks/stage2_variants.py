"""Stage-2 settings compared on one shared stage-1 cloud: train stage 1 once, then stage 2 once per
variant (several at a time, as separate processes), and report each variant's held-out quality.

Sharing the cloud takes stage 1's own seed-to-seed spread out of the comparison, which otherwise is
as large as the effects of most stage-2 settings.

    python benchmarks/stage2_variants.py --scene generated_arc --preset fast \\
        --variant base: --variant basis_only:stage1_network_lr_scale=0 --variant seed1:seed=1 \\
        [--stage1-set iterations=2500] [--set iterations=8000] [--parallel 4] [--deadline-min 8] \\
        [--work DIR] [--out benchmarks/results/stage2_variants.json]

``--variant NAME:K=V,K=V`` takes stage-2 config keys; ``--set`` applies to every variant. The scene is
a generated scene name, a folder of ``../shared/data/scenes`` or a path; it is evaluated on its
protocol split (lego: val) at up to 400 px. Rows: {variant, overrides, split, psnr, ssim, train_psnr,
gaussians, stage2_min, eval_curve, device}, + refit_* on generated scenes (the re-fitted stage-1 cloud
against the true surface), + error for a variant that failed or ran past the deadline (with the eval
curve it reached), all in one JSON file.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import device_name, format_table, write_json  # noqa: E402
from benchmarks.quality import EVAL_SPLIT, PROTOCOL_SIZE, eval_curve, scene_folder  # noqa: E402

RESULTS = HERE / "results" / "stage2_variants.json"
COLUMNS = ["variant", "split", "psnr", "ssim", "train_psnr", "gaussians", "stage2_min", "error"]


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'name:k=v,k=v' -> (name, ['k=v', 'k=v']); 'name:' has no overrides."""
    name, sep, settings = text.partition(":")
    if not sep or not name.strip():
        raise ValueError(f"variant {text!r} is not of the form NAME:KEY=VALUE,KEY=VALUE (or NAME:)")
    items = [item.strip() for item in settings.split(",") if item.strip()]
    bad = [item for item in items if "=" not in item]
    if bad:
        raise ValueError(f"variant {name!r}: {bad[0]!r} is not KEY=VALUE")
    return name.strip(), items


def _train_argv(scene: Path, out: Path, stage: int, preset: str, settings: list[str]) -> list[str]:
    argv = [sys.executable, "-m", "npg.train", str(scene), "-o", str(out), "--stage", str(stage), "--preset", preset]
    for item in settings:
        argv += ["--set", item]
    return argv


def run(scene_name: str, variants: list[tuple[str, list[str]]], work, preset: str = "fast", stage1_sets=(), sets=(),
        parallel: int = 4, deadline_min: float | None = None, out=RESULTS) -> list[dict]:
    """Stage 1 once on ``scene_name``, then stage 2 per variant; rows are written to ``out`` and returned."""
    from npg.render import render_split

    if not variants:
        raise ValueError("give at least one --variant")
    names = [name for name, _ in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"variant names must be unique, got {names}")
    work = Path(work)
    scene = scene_folder(scene_name, work) if not Path(scene_name).is_dir() else Path(scene_name)
    split = EVAL_SPLIT.get(scene.name, "test")
    shared = work / "stage2_variants" / scene.name
    stage1_settings = [f"stage1.max_image_size={PROTOCOL_SIZE}", "progress=false"] + [f"stage1.{s}" for s in stage1_sets]
    subprocess.run(_train_argv(scene, shared, 1, preset, stage1_settings), check=True)

    started = time.perf_counter()
    deadline = None if deadline_min is None else started + 60.0 * deadline_min
    common = [f"stage2.max_image_size={PROTOCOL_SIZE}", f"stage2.eval_split={split}", "progress=false"]
    pending = list(variants)
    running: dict[str, tuple[subprocess.Popen, float, Path]] = {}
    finished: dict[str, tuple[int | None, float]] = {}
    while pending or running:
        while pending and len(running) < max(1, parallel):
            name, overrides = pending.pop(0)
            run_dir = shared.parent / f"{scene.name}__{name}"
            shutil.rmtree(run_dir, ignore_errors=True)
            shutil.copytree(shared / "stage1", run_dir / "stage1")
            settings = common + [f"stage2.{s}" for s in list(sets) + overrides]
            with open(run_dir / "train.log", "w") as log:  # the child keeps its own handle
                process = subprocess.Popen(_train_argv(scene, run_dir, 2, preset, settings), stdout=log, stderr=subprocess.STDOUT)
            running[name] = (process, time.perf_counter(), run_dir)
        time.sleep(0.5)
        for name, (process, began, run_dir) in list(running.items()):
            if deadline is not None and time.perf_counter() > deadline and process.poll() is None:
                process.kill()
                process.wait()
                finished[name] = (None, (time.perf_counter() - began) / 60.0)
                del running[name]
            elif process.poll() is not None:
                finished[name] = (process.returncode, (time.perf_counter() - began) / 60.0)
                del running[name]

    rows = []
    for name, overrides in variants:
        code, minutes = finished[name]
        run_dir = shared.parent / f"{scene.name}__{name}"
        row = {"scene": scene.name, "variant": name, "overrides": list(sets) + overrides, "split": split, "preset": preset,
               "stage2_min": round(minutes, 3), "eval_curve": eval_curve(run_dir / "stage2" / "log.csv"), "device": device_name()}
        if code != 0:
            reason = "killed at the deadline" if code is None else f"npg-train exited with {code}"
            row["error"] = f"{reason}; see {run_dir / 'train.log'}"
        else:
            metrics = render_split(run_dir, split=split, export_ply=False, videos=False)
            stage2 = json.loads((run_dir / "stage2" / "metrics.json").read_text())
            row.update(psnr=round(metrics["psnr"], 3), ssim=round(metrics["ssim"], 4), train_psnr=stage2.get("train_psnr"),
                       gaussians=metrics["gaussians"], device=metrics["device"])
            row.update({key: value for key, value in stage2.items() if key.startswith("refit_")})
        rows.append(row)
        write_json(rows, str(out))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scene", required=True, help="generated scene name, shared scene name or scene folder")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...", required=True)
    parser.add_argument("--preset", default="fast", choices=["default", "fast", "cpu"])
    parser.add_argument("--stage1-set", action="append", default=[], metavar="KEY=VALUE", help="stage-1 config override")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="stage-2 override for every variant")
    parser.add_argument("--parallel", type=int, default=4, help="stage-2 runs at a time")
    parser.add_argument("--deadline-min", type=float, default=None, help="kill stage-2 runs still going this many minutes after stage 2 began")
    parser.add_argument("--work", default=str(HERE / "work"))
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    variants = [parse_variant(text) for text in args.variant]
    rows = run(args.scene, variants, args.work, args.preset, args.stage1_set, args.sets, args.parallel, args.deadline_min, args.out)
    print(format_table(rows, COLUMNS))
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
