"""npg: Neural Parametric Gaussians with its own GPU kernels.

Importing npg never compiles or loads a CUDA extension: the public names below are resolved on first
use, and each op loads its compiled kernel only when it is handed CUDA tensors.
"""
from importlib import import_module

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "Camera": "npg.camera",
    "rasterize": "npg.raster",
    "RasterOutput": "npg.raster",
    "knn": "npg.neighbors",
    "mean_dist2_knn3": "npg.neighbors",
    "silhouette_chamfer": "npg.chamfer",
    "skin": "npg.skinning",
    "ssim": "npg.similarity",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'npg' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
