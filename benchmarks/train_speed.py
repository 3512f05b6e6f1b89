"""Training speed: iterations per second of stage 1 and stage 2 on one scene, timed after warm-up.

Both stages run with a preset's settings (``fast`` by default, at the quality protocol's 400 pixels)
for a short run; the rate is measured between the end of the warm-up and the last step, with the
device synchronised at both marks. Stage 2 starts from the stage-1 run just timed (its export is
written first, untimed). Use it to compare code changes on one machine in one call: the trainers are
bound by host time, so rates from different hosts do not compare.

    python benchmarks/train_speed.py [SCENE] [--preset fast] [--stage1-iterations 200]
                                     [--stage2-iterations 600] [--warmup 50] [--out FILE] [--set KEY=VALUE ...]

SCENE defaults to ``generated_arc`` rendered at full size into ``--work``. Rows: {bench, stage, scene,
resolution, size, iterations_timed, it_per_s, device}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import device_name, format_table  # noqa: E402


class RateClock:
    """Seconds between step ``start`` and step ``stop`` (device synchronised at both)."""

    def __init__(self, start: int, stop: int):
        if not 0 < start < stop:
            raise ValueError(f"need 0 < warm-up ({start}) < iterations ({stop})")
        self.start, self.stop, self.marks = start, stop, {}

    def __call__(self, step: int, *_):
        if step in (self.start, self.stop):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks[step] = time.perf_counter()

    def rate(self) -> float:
        return (self.stop - self.start) / (self.marks[self.stop] - self.marks[self.start])


def run(scene=None, work="benchmarks/work", preset="fast", stage1_iterations=200, stage2_iterations=600, warmup=50,
        overrides=(), image_size=400) -> list[dict]:
    from npg.stage1 import Stage1Trainer
    from npg.stage1.export import export_stage1
    from npg.stage2.trainer import train_stage2
    from npg.train import stage_configs

    work = Path(work)
    if scene is None:
        from npg.data.generate import make_scene

        scene = make_scene(work / "scenes" / "generated_arc", preset="generated_arc", size="full", progress=False)
    scene = Path(scene)
    settings = [f"stage1.max_image_size={image_size}", f"stage2.max_image_size={image_size}", "progress=false",
                "stage1.resume=false", "stage2.resume=false", "stage1.preview=false",
                f"stage1.iterations={stage1_iterations}", f"stage2.iterations={stage2_iterations}",
                f"stage1.checkpoint_every={stage1_iterations}", f"stage2.checkpoint_every={stage2_iterations}"]
    stage1_config, stage2_config = stage_configs(preset, overrides=settings + list(overrides))
    out = work / "train_speed" / scene.name
    rows = []

    trainer = Stage1Trainer(scene, out, stage1_config)
    clock = RateClock(warmup, stage1_iterations)
    trainer.train(callback=clock)
    rows.append(_row("stage 1", scene, trainer.data.width, trainer.data.height, f"{stage1_config.num_points} points",
                     stage1_iterations - warmup, clock.rate()))
    export_stage1(trainer)

    clock = RateClock(warmup, stage2_iterations)
    stage2_dir = train_stage2(scene, out, stage2_config, on_step=clock)
    metrics = json.loads((stage2_dir / "metrics.json").read_text())
    width, height = metrics["resolution"]
    rows.append(_row("stage 2", scene, width, height, f"{metrics['gaussians']} Gaussians at the end",
                     stage2_iterations - warmup, clock.rate()))
    return rows


def _row(stage, scene, width, height, size, timed, rate) -> dict:
    return {"bench": "train_speed", "stage": stage, "scene": Path(scene).name, "resolution": f"{width}x{height}",
            "size": size, "iterations_timed": timed, "it_per_s": round(rate, 2), "device": device_name()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("scene", nargs="?", default=None)
    parser.add_argument("--work", default="benchmarks/work")
    parser.add_argument("--preset", default="fast", choices=["default", "fast", "cpu"])
    parser.add_argument("--stage1-iterations", type=int, default=200)
    parser.add_argument("--stage2-iterations", type=int, default=600)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--image-size", type=int, default=400)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="stage1.KEY=VALUE")
    parser.add_argument("--out", default=None, help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    rows = run(args.scene, args.work, args.preset, args.stage1_iterations, args.stage2_iterations, args.warmup,
               args.overrides, args.image_size)
    print(format_table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
