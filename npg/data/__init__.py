"""Scenes for npg: loaders (D-NeRF/Blender, NR-NeRF, Ub4D-style OpenCV cameras), preprocessing
(masks, optical flow, cached) and the scene generator for animated glTF assets.

    scene = load_scene("scenes/dnerf_lego_tiny", "train", downsample=1)
    img = scene.image(0, background="white")        # [3, H, W] float32
    flows = load_flows("scenes/dnerf_lego_tiny")    # [F-1, H, W, 2] float32, cached
"""
from importlib import import_module

from npg.data.prep import PreparedScene, load_flows, prepare_scene
from npg.data.scene import SceneFormatError, SceneSplit, clear_cache, load_scene, resolve_background

# defined by npg.data.generate, imported on first use (it pulls in the glTF reader and mesh renderer)
_LAZY = {"make_scene": "npg.data.generate", "load_ground_truth": "npg.data.generate"}

__all__ = [
    "PreparedScene",
    "SceneFormatError",
    "SceneSplit",
    "clear_cache",
    "load_flows",
    "load_scene",
    "prepare_scene",
    "resolve_background",
    *_LAZY,
]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'npg.data' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
