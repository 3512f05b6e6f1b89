"""Lazy access to the compiled CUDA extensions (npg._raster_cuda, npg._knn_cuda), and the backend
choice of the ops whose fast path is a Triton kernel (npg.skin, npg.ssim)."""
import os
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


def triton_backend(op: str, tensor, backend: str) -> str:
    """"triton" or "torch" for ``backend`` ("auto": Triton for CUDA tensors, the torch reference on the
    CPU). Triton on CPU tensors needs the interpreter (TRITON_INTERPRET=1 set before triton's import)."""
    if backend == "auto":
        return "triton" if tensor.is_cuda else "torch"
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "triton" and not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"{op}: backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is "
                         "first imported to run the kernels on the CPU")
    return backend
