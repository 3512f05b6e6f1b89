"""Stage 1 of NPG: the low-rank neural deformation model fitted from masks and optical flow.

``train_stage1(scene_dir, out_dir, config) -> OUT/stage1`` trains and exports;
``load_stage1(stage1_dir) -> (model, config, export)`` reads the result back (see ``export.py`` for the
folder layout). Command line: ``python -m npg.stage1 SCENE -o OUT [--config f.json] [--set k=v] [--fast]``.
"""
from .export import Stage1Export, load_stage1, read_ply_points, write_ply_points
from .model import DeformationModel
from .trainer import Stage1Config, Stage1Trainer, main, train_stage1

__all__ = [
    "DeformationModel",
    "Stage1Config",
    "Stage1Export",
    "Stage1Trainer",
    "load_stage1",
    "main",
    "read_ply_points",
    "train_stage1",
    "write_ply_points",
]
