"""Ub4D-style scenes with OpenCV projection matrices (the layout the original NPG code reads).

Layout: ``rgb/`` (frames, .png or .jpg, natural order), optional ``mask/`` (one mask per frame, same
order; white = object), ``projection_matrix.npz`` with ``proj_mat_<i>`` = K·[R | t] (3×4, OpenCV axes:
x right, y down, looking along +z; pixel centres at integer coordinates) for frame i, and optionally
``novel_projection_matrix.npz`` with cameras for novel-view renders (no images).

Each matrix is decomposed into K, R, t by an RQ decomposition of its left 3×3 block. A projection
matrix is only defined up to scale, so the signs are fixed: the matrix is negated when its 3×3 block
has a negative determinant (points in front of the camera then have positive depth), and K's diagonal
is made positive, which leaves R a proper rotation. Skew is dropped (with a warning when it is not
negligible), since npg's camera has none.

Time is i/(F − 1). Splits: the monocular video is the only split with images, so ``train`` and ``all``
are every frame; there is no held-out test split. Novel cameras are read with
:func:`load_novel_cameras`.
"""
from __future__ import annotations

import re
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from npg.camera import Camera
from npg.data.dnerf import image_size
from npg.data.scene import SceneFormatError, SplitSpec, find_mask_files, list_images, resize_camera

_KEY = re.compile(r"^proj_mat_(\d+)$")


def rq3(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RQ decomposition of a 3×3 matrix: ``matrix = upper @ orthogonal``."""
    flipped = matrix[::-1]
    q, u = np.linalg.qr(flipped.T)
    return u.T[::-1, ::-1], q.T[::-1]


def decompose_projection(P, where: str = "projection matrix") -> tuple[np.ndarray, np.ndarray]:
    """P = s·K·[R | t] (3×4) → (K [3, 3] with K[2, 2] = 1 and positive focal lengths, w2c [4, 4])."""
    P = np.asarray(P, dtype=np.float64)
    if P.shape != (3, 4):
        raise SceneFormatError(f"{where} must be 3x4, got shape {P.shape}")
    if not np.isfinite(P).all():
        raise SceneFormatError(f"{where} holds NaN or Inf")
    M, p4 = P[:, :3].copy(), P[:, 3].copy()
    det = np.linalg.det(M)
    if abs(det) <= 1e-12 * max(np.abs(M).max(), 1e-300) ** 3:
        raise SceneFormatError(f"{where} has a singular 3x3 block (not a pinhole camera)")
    if det < 0:
        M, p4 = -M, -p4
    K, R = rq3(M)
    signs = np.sign(np.diag(K))
    K = K * signs[None, :]
    R = signs[:, None] * R
    t = np.linalg.solve(K, p4)
    K = K / K[2, 2]
    if abs(K[0, 1]) > 1e-3 * K[0, 0]:
        warnings.warn(f"{where}: dropping intrinsic skew {K[0, 1]:.4g} (npg cameras have none)", stacklevel=3)
    w2c = np.eye(4)
    w2c[:3, :3] = R
    w2c[:3, 3] = t
    return K, w2c


def read_projection_matrices(path: Path) -> list[np.ndarray]:
    """``proj_mat_0 … proj_mat_<n-1>`` of an npz file, in index order."""
    if not path.is_file():
        raise SceneFormatError(f"camera file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            found = {int(m.group(1)): key for key in data.files if (m := _KEY.match(key))}
            if not found:
                raise SceneFormatError(f"{path} holds no proj_mat_<i> arrays (keys: {', '.join(data.files) or 'none'})")
            missing = sorted(set(range(max(found) + 1)) - set(found))
            if missing:
                raise SceneFormatError(f"{path}: proj_mat_{missing[0]} is missing (indices must run 0..{max(found)})")
            return [np.asarray(data[found[i]]) for i in range(len(found))]
    except SceneFormatError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise SceneFormatError(f"{path} is unreadable or corrupt: {err}") from err


def cameras_from_matrices(matrices, width: int, height: int, path: Path) -> list[Camera]:
    cameras = []
    for i, P in enumerate(matrices):
        K, w2c = decompose_projection(P, f"{path} proj_mat_{i}")
        cameras.append(Camera.from_K(K, w2c, width, height))
    return cameras


def read_opencv_split(root: Path, split: str, masks_dir: Path | None = None) -> SplitSpec:
    """Describe the frames of a Ub4D-style scene (see the module docstring)."""
    if split not in ("train", "all"):
        raise SceneFormatError(
            f"{root}: Ub4D-style scenes have one split with images ('train' = 'all'); got '{split}'. "
            f"Novel-view cameras (no images) come from npg.data.opencv_cams.load_novel_cameras"
        )
    rgb_dir = root / "rgb"
    if not rgb_dir.is_dir():
        raise SceneFormatError(f"{root}: rgb/ folder not found")
    files = [p.resolve() for p in list_images(rgb_dir)]
    if not files:
        raise SceneFormatError(f"{rgb_dir} holds no .png/.jpg images")
    cam_path = root / "projection_matrix.npz"
    matrices = read_projection_matrices(cam_path)
    if len(matrices) != len(files):
        raise SceneFormatError(f"{cam_path} has {len(matrices)} cameras but {rgb_dir} holds {len(files)} images")
    width, height = image_size(files[0])
    cameras = cameras_from_matrices(matrices, width, height, cam_path)

    mask_files = None
    if masks_dir is not None:
        mask_files = find_mask_files(files, root, masks_dir)
    elif (root / "mask").is_dir():
        mask_files = [p.resolve() for p in list_images(root / "mask")]
        if len(mask_files) != len(files):
            raise SceneFormatError(
                f"{root / 'mask'} holds {len(mask_files)} masks but {rgb_dir} holds {len(files)} images"
            )
    elif (root / "masks").is_dir():
        mask_files = find_mask_files(files, root, root / "masks")

    count = len(files)
    return SplitSpec(
        name=root.name,
        root=root,
        split=split,
        format="opencv",
        image_files=files,
        cameras=cameras,
        times=np.arange(count, dtype=np.float64) / max(count - 1, 1),
        width=width,
        height=height,
        inputs=[cam_path],
        mask_files=mask_files,
    )


def load_novel_cameras(path, downsample: int = 1) -> tuple[list[Camera], torch.Tensor]:
    """Cameras of ``novel_projection_matrix.npz`` and the times to render them at.

    One matrix: a fixed camera watching every frame time. F matrices (F = number of frames): camera i
    at frame i's time. Returns (cameras, times [F] float32) for images downsampled by ``downsample``.
    """
    root = Path(path).expanduser().resolve()
    files = list_images(root / "rgb") if (root / "rgb").is_dir() else []
    if not files:
        raise SceneFormatError(f"{root}: rgb/ folder with images not found")
    cam_path = root / "novel_projection_matrix.npz"
    width, height = image_size(files[0])
    cameras = cameras_from_matrices(read_projection_matrices(cam_path), width, height, cam_path)
    count = len(files)
    if len(cameras) == 1:
        cameras = cameras * count
    elif len(cameras) != count:
        raise SceneFormatError(f"{cam_path} has {len(cameras)} cameras; expected 1 or one per frame ({count})")
    times = torch.arange(count, dtype=torch.float32) / max(count - 1, 1)
    size = (width // downsample, height // downsample)
    return [resize_camera(c, *size) for c in cameras], times
