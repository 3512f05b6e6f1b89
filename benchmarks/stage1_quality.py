"""Stage-1 quality benchmark: train the deformation model on each scene and report how well the cloud
tracks the silhouettes.

Per scene (all from ``OUT/stage1/metrics.json``, see ``npg.stage1.export.evaluate``):
``iou_val`` (silhouette IoU of the splatted cloud on held-out frames: val split, else test),
``chamfer_px`` (2D chamfer of the projected points to the training masks, RMS pixels at the training
resolution), ``surface_chamfer`` (generated scenes: 3D chamfer to the true surface, world units, the
object's bounding sphere has radius 1), ``minutes`` (training wall-clock), ``device``.

Scenes: ``generated_arc`` and ``generated_static`` (rendered by ``npg.data.generate``, size "full":
150 frames at 400×400) and every real scene in ``../shared/data/scenes``. A scene stage 1 cannot use
(e.g. no masks) gets a row with an ``error``.

    python benchmarks/stage1_quality.py [--scenes generated_arc,dnerf_lego_tiny] [--work DIR]
        [--fast] [--set iterations=15000 --set num_points=5000 ...] [--out benchmarks/results/stage1_quality.json]

Target (issue 4): IoU >= 0.9 on held-out frames within 10 minutes of H100 time per scene.
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

RESULTS = HERE / "results" / "stage1_quality.json"
SHARED_SCENES = Path(os.environ.get("NPG_SHARED", REPO.parent / "shared")) / "data" / "scenes"
GENERATED = ("generated_arc", "generated_static")
COLUMNS = ["scene", "iou_val", "chamfer_px", "surface_chamfer", "minutes", "device", "iterations", "resolution", "error"]


def available_scenes() -> list[str]:
    real = sorted(p.name for p in SHARED_SCENES.iterdir() if p.is_dir()) if SHARED_SCENES.is_dir() else []
    return list(GENERATED) + real


def scene_folder(name: str, work: Path) -> Path:
    if name in GENERATED:
        from npg.data.generate import make_scene

        return Path(make_scene(work / "scenes" / name, preset=name, size="full"))
    path = Path(name) if Path(name).is_dir() else SHARED_SCENES / name
    if not path.is_dir():
        raise FileNotFoundError(f"scene {name!r} not found (neither a folder nor in {SHARED_SCENES})")
    return path


def run_scene(name: str, work: Path, fast: bool, overrides: list[str]) -> dict:
    from npg.config import load_config
    from npg.stage1 import Stage1Config, train_stage1

    config = load_config(Stage1Config.fast if fast else Stage1Config, None, overrides)
    started = time.perf_counter()
    stage1 = train_stage1(scene_folder(name, work), work / Path(name).name, config)
    metrics = json.loads((stage1 / "metrics.json").read_text())
    return {
        "scene": Path(name).name,
        "iou_val": metrics.get("iou_val"),
        "chamfer_px": metrics.get("chamfer_px_train"),
        "surface_chamfer": metrics.get("surface_chamfer"),
        "minutes": metrics["train_minutes"],
        "device": metrics["device"],
        "iterations": metrics["iterations"],
        "resolution": "x".join(str(v) for v in metrics["resolution"]),
        "chamfer_px_val": metrics.get("chamfer_px_val"),
        "iou_train": metrics.get("iou_train"),
        "surface_chamfer_rel": metrics.get("surface_chamfer_rel"),
        "total_minutes": round((time.perf_counter() - started) / 60.0, 3),
        "fast": fast,
        "overrides": overrides,
    }


def run(scenes: list[str] | None = None, work: Path | None = None, fast: bool = False, overrides: list[str] | None = None) -> list[dict]:
    work = Path(work or REPO / "outputs" / "stage1_quality")
    rows = []
    for name in scenes or available_scenes():
        try:
            row = run_scene(name, work, fast, list(overrides or []))
        except Exception as err:  # one scene failing (e.g. no masks) must not lose the others' rows
            if not isinstance(err, (ValueError, FileNotFoundError)):  # bad input explains itself
                traceback.print_exc()
            row = {"scene": Path(name).name, "device": device_name(), "error": f"{type(err).__name__}: {err}"}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", help="comma-separated scene names or folders (default: generated + shared scenes)")
    parser.add_argument("--work", type=Path, help="output folder (default: outputs/stage1_quality)")
    parser.add_argument("--fast", action="store_true", help="use Stage1Config.fast() as the base config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    scenes = args.scenes.split(",") if args.scenes else None
    rows = run(scenes, args.work, args.fast, args.overrides)
    write_json(rows, str(args.out))
    print(format_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
