"""Lazy access to the compiled CUDA extensions (npg._raster_cuda, npg._knn_cuda)."""
from functools import lru_cache
from importlib import import_module


class ExtensionUnavailable(RuntimeError):
    pass


@lru_cache(maxsize=None)
def load(name: str):
    """Import the compiled extension ``npg._<name>_cuda`` or raise a clear error saying how to build it."""
    try:
        return import_module(f"npg._{name}_cuda")
    except ImportError as err:
        raise ExtensionUnavailable(
            f"npg's CUDA extension '_{name}_cuda' is not built ({err}). CUDA tensors need it: reinstall "
            "next to a CUDA build of torch with `pip install --no-build-isolation -e .`, or pass CPU "
            "tensors to use the PyTorch reference path."
        ) from err


def available(name: str) -> bool:
    try:
        load(name)
        return True
    except ExtensionUnavailable:
        return False
