"""Crash-safe file writes: write to a temporary file in the same folder, fsync, then rename."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)


def atomic_torch_save(obj, path) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path, map_location="cpu"):
    """torch.load with a clear error for a missing or corrupt checkpoint."""
    import torch

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise RuntimeError(f"checkpoint {path} is corrupt or not an npg checkpoint: {err}") from err


def write_video(path, frames, fps: int = 30) -> bool:
    """H.264 MP4 of uint8 [H, W, 3] frames (padded to even sizes, as yuv420p needs), written atomically.

    Videos are previews, never results: without imageio's FFMPEG plugin (``pip install imageio-ffmpeg``)
    this warns, writes nothing and returns False instead of failing the run that produced them.
    """
    import warnings

    import imageio.v2 as imageio
    import numpy as np

    try:
        with atomic_path(path) as tmp:
            with imageio.get_writer(tmp, fps=fps, codec="libx264", quality=8, macro_block_size=1,
                                    format="FFMPEG") as writer:
                for frame in frames:
                    h, w = frame.shape[:2]
                    writer.append_data(np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge"))
    except ImportError as err:
        warnings.warn(f"video {path} not written: {err}", stacklevel=2)
        return False
    return True
