"""npg-train: stage 1 (the low-rank deformation model) then stage 2 (the Gaussians) on one scene.

    npg-train [SCENE] -o OUT [--stage 1|2|all] [--config F] [--set KEY=VALUE ...] [--fast | --preset P]

Without SCENE, the embedded default scene (the bundled Fox, ``generated_arc``, small) is rendered into
``OUT/scene`` and trained on. Outputs: ``OUT/stage1/`` and ``OUT/stage2/`` (see ``npg.stage1`` and
``npg.stage2.trainer``); a rerun resumes each stage from its checkpoint. Then ``npg-render OUT``.

Configuration: a JSON file ``{"stage1": {...}, "stage2": {...}}`` (top-level keys apply to every stage
that has the field), then ``--set`` overrides: ``stage1.iterations=2000``, ``stage2.w_reg=0.5``, or
unprefixed ``device=cpu`` (every stage with that field). Presets: "default" (full quality, for a GPU),
"fast" (minutes on a GPU) and "cpu" (small images and short schedules: minutes on a CPU). Without a
GPU the "cpu" preset is the default.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from npg.config import apply_overrides

# Stage 1's "cpu" preset (its "fast" preset is Stage1Config.fast(); stage 2's presets: npg.stage2.trainer.PRESETS)
STAGE1_CPU = dict(num_points=1000, max_image_size=100, window=4, iterations=200, checkpoint_every=50, log_every=10)


def stage_configs(preset: str, config_file=None, overrides=None):
    """(Stage1Config, Stage2Config) from a preset, a JSON file and ``--set`` overrides."""
    from npg.stage1 import Stage1Config
    from npg.stage2.trainer import preset_config

    if preset not in ("default", "fast", "cpu"):
        raise ValueError(f"unknown preset {preset!r}; choose default, fast or cpu")
    stage1 = Stage1Config.fast() if preset == "fast" else Stage1Config()
    if preset == "cpu":
        stage1 = apply_overrides(stage1, STAGE1_CPU)
    stage2 = preset_config(None if preset == "default" else preset)
    configs = {"stage1": stage1, "stage2": stage2}

    sections = {"stage1": {}, "stage2": {}}
    if config_file is not None:
        data = _read_json(config_file)
        for key, value in data.items():
            if key in sections:
                if not isinstance(value, dict):
                    raise ValueError(f"{config_file}: '{key}' must be an object of config fields")
                sections[key].update(value)
            else:
                _route(key, value, configs, sections, f"config file {config_file}")
    for stage in sections:
        configs[stage] = apply_overrides(configs[stage], sections[stage])

    cli = {"stage1": [], "stage2": []}
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        stage, dot, field = key.strip().partition(".")
        if dot and stage in cli:
            cli[stage].append(f"{field}={value}")
        else:
            targets = [s for s, c in configs.items() if key.strip() in _fields(c)]
            if not targets:
                raise ValueError(_unknown_key_message(key.strip(), configs))
            for target in targets:
                cli[target].append(f"{key.strip()}={value}")
    for stage in cli:
        configs[stage] = apply_overrides(configs[stage], cli[stage])
    return configs["stage1"], configs["stage2"]


def _fields(config) -> set:
    return {f.name for f in dataclasses.fields(config)}


def _unknown_key_message(key, configs) -> str:
    known = ", ".join(f"{stage}: {', '.join(sorted(_fields(c)))}" for stage, c in configs.items())
    return f"unknown config key {key!r} (prefix with stage1. or stage2.); known keys — {known}"


def _route(key, value, configs, sections, where):
    targets = [s for s, c in configs.items() if key in _fields(c)]
    if not targets:
        raise ValueError(f"{where}: " + _unknown_key_message(key, configs))
    for target in targets:
        sections[target][key] = value


def _read_json(path) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"config file {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a JSON object")
    return data


def default_scene(out_dir: Path) -> Path:
    """Render the embedded default scene into OUT/scene (once) and return its folder."""
    scene_dir = out_dir / "scene"
    if not (scene_dir / "transforms_train.json").exists():
        from npg.data.generate import make_scene

        print(f"npg-train: no scene given; rendering the embedded default scene (Fox, generated_arc, small) into {scene_dir}")
        make_scene(scene_dir, preset="generated_arc", size="small")
    return scene_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="npg-train",
        description="Train Neural Parametric Gaussians: stage 1 (deformation model) then stage 2 (Gaussians).",
    )
    parser.add_argument("scene", nargs="?", help="scene folder (D-NeRF layout or any npg.data format); omitted: the embedded Fox scene")
    parser.add_argument("-o", "--out", required=True, help="output folder (stage1/, stage2/, and scene/ for the default scene)")
    parser.add_argument("--stage", choices=["1", "2", "all"], default="all", help="which stage(s) to run")
    parser.add_argument("--config", help='JSON file: {"stage1": {...}, "stage2": {...}}')
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field (repeatable): stage1.KEY=V, stage2.KEY=V, or KEY=V for every stage that has KEY")
    parser.add_argument("--fast", action="store_true", help="same as --preset fast")
    parser.add_argument("--preset", choices=["default", "fast", "cpu"], default=None,
                        help="default: full quality (GPU); fast: a quick GPU run; cpu: minutes on a CPU (the default without a GPU)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out_dir = Path(args.out)
    preset = args.preset or ("fast" if args.fast else None)
    if preset is None:
        preset = "default" if torch.cuda.is_available() else "cpu"
        if preset == "cpu":
            print("npg-train: no GPU found; using the 'cpu' preset (small images, short schedules). "
                  "Pass --preset default for full quality.")
    stage1_config, stage2_config = stage_configs(preset, args.config, args.overrides)
    scene_dir = Path(args.scene) if args.scene else default_scene(out_dir)
    if not scene_dir.exists():
        raise FileNotFoundError(f"scene folder not found: {scene_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)

    if args.stage in ("1", "all"):
        from npg.stage1 import train_stage1

        stage1_dir = train_stage1(scene_dir, out_dir, stage1_config)
        print(f"npg-train: stage 1 done: {stage1_dir}")
    if args.stage in ("2", "all"):
        from npg.stage2.trainer import train_stage2

        stage2_dir = train_stage2(scene_dir, out_dir, stage2_config)
        metrics = json.loads((stage2_dir / "metrics.json").read_text()) if (stage2_dir / "metrics.json").exists() else {}
        print(f"npg-train: stage 2 done: {stage2_dir} {json.dumps(metrics)}")
        print(f"next: npg-render {out_dir} --split test")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
