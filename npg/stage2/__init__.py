"""Stage 2 of NPG: 3D Gaussians anchored to the stage-1 points, trained photometrically.

``train_stage2(scene_dir, out_dir, config) -> OUT/stage2`` trains (resuming from its checkpoint);
``load_trained(out_dir) -> (gaussians, stage-1 model, info)`` reads a run back for rendering.
Modules: ``model`` (NPGGaussians), ``densify`` (3DGS density control with aligned Adam state),
``trainer`` (Stage2Config, presets, the loop, checkpoints).
"""
from .densify import DensityController
from .model import NPGGaussians
from .trainer import PRESETS, Stage2Config, load_trained, preset_config, read_stage2_checkpoint, train_stage2

__all__ = [
    "DensityController",
    "NPGGaussians",
    "PRESETS",
    "Stage2Config",
    "load_trained",
    "preset_config",
    "read_stage2_checkpoint",
    "train_stage2",
]
