"""D-NeRF / Blender-NeRF scenes: ``transforms_<split>.json`` + images.

The JSON holds ``camera_angle_x`` (horizontal field of view, radians) and ``frames``; each frame has
``file_path`` (relative to the JSON, with or without ``.png``), a 4×4 camera-to-world
``transform_matrix`` in OpenGL/Blender camera axes (x right, y up, looking along −z) and ``time``.
Images are RGBA PNGs with straight alpha (the alpha is the object mask); RGB images load without masks
unless a mask folder is given (``SCENE/masks`` or ``masks=DIR``).

Conversion to npg's OpenCV camera (x right, y down, looking along +z):
- ``c2w_cv = c2w_gl · diag(1, −1, −1, 1)`` (flip the camera's y and z axes), ``w2c = c2w_cv⁻¹``;
- ``fx = W / (2·tan(camera_angle_x / 2))``; ``fy = fx`` unless ``fl_y`` or ``camera_angle_y`` is given
  (``fl_x`` overrides ``camera_angle_x``), as in nerfstudio/instant-ngp transforms;
- principal point at the image centre ``((W − 1)/2, (H − 1)/2)``, the convention of 3DGS and of
  ``../shared/refdata``. When ``cx``/``cy`` are given they are read in the nerfstudio/instant-ngp
  convention (continuous pixel coordinates, centre of the image at ``W/2``) and shifted by −½ into
  npg's integer-pixel-centre frame.
- ``time`` must lie in [0, 1]. When *no* frame has a time (a static Blender-NeRF scene), times are
  ``index/(F − 1)`` in file order, with a warning; when only some frames have one, it is an error.
- Optional per-frame ``near``/``far`` (or top-level ones) become ``SceneSplit.bounds``.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np

from npg.camera import Camera
from npg.data.scene import (
    IMAGE_SUFFIXES,
    SceneFormatError,
    SplitSpec,
    find_mask_files,
    user_masks_dir,
)

# OpenGL camera axes (y up, looking along −z) → OpenCV camera axes (y down, looking along +z).
GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])


def opengl_c2w_to_opencv_w2c(c2w_gl) -> np.ndarray:
    """A 4×4 OpenGL camera-to-world matrix → the 4×4 OpenCV world-to-camera matrix (float64)."""
    c2w = np.asarray(c2w_gl, dtype=np.float64) @ GL_TO_CV
    return np.linalg.inv(c2w)


def check_c2w(matrix, where: str) -> np.ndarray:
    """A camera-to-world matrix must be a finite rigid 4×4 (3×4 accepted) transform."""
    try:
        m = np.asarray(matrix, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise SceneFormatError(f"{where}: transform_matrix is not a numeric matrix ({err})") from err
    if m.shape == (3, 4):
        m = np.vstack([m, [0.0, 0.0, 0.0, 1.0]])
    if m.shape != (4, 4):
        raise SceneFormatError(f"{where}: transform_matrix must be 4x4, got shape {m.shape}")
    if not np.isfinite(m).all():
        raise SceneFormatError(f"{where}: transform_matrix holds NaN or Inf")
    if not np.allclose(m[3], [0.0, 0.0, 0.0, 1.0], atol=1e-6):
        raise SceneFormatError(f"{where}: transform_matrix's last row is {m[3].tolist()}, not [0, 0, 0, 1]")
    rot = m[:3, :3]
    if not np.allclose(rot.T @ rot, np.eye(3), atol=1e-3) or np.linalg.det(rot) <= 0:
        raise SceneFormatError(f"{where}: transform_matrix's 3x3 block is not a rotation (scaled or mirrored camera)")
    return m


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise SceneFormatError(f"scene file not found: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            meta = json.load(handle)
    except json.JSONDecodeError as err:
        raise SceneFormatError(f"{path} is malformed JSON (line {err.lineno}, column {err.colno}: {err.msg})") from err
    except (OSError, UnicodeDecodeError) as err:
        raise SceneFormatError(f"cannot read {path}: {err}") from err
    if not isinstance(meta, dict):
        raise SceneFormatError(f"{path}: expected a JSON object at the top level, got {type(meta).__name__}")
    return meta


def resolve_image(root: Path, file_path, where: str) -> Path:
    """``file_path`` relative to the scene folder; Blender files often omit the ``.png``."""
    if not isinstance(file_path, str) or not file_path:
        raise SceneFormatError(f"{where}: file_path is missing or not a string")
    base = Path(file_path)
    base = base if base.is_absolute() else root / base
    candidates = [base] if base.suffix.lower() in IMAGE_SUFFIXES else []
    candidates += [base.with_name(base.name + s) for s in IMAGE_SUFFIXES]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise SceneFormatError(f"{where}: image not found (tried {tried})")


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header."""
    import imageio.v3 as iio

    try:
        shape = iio.improps(path).shape
    except Exception as err:
        raise SceneFormatError(f"image {path} is unreadable or corrupt: {err}") from err
    if len(shape) < 2:
        raise SceneFormatError(f"image {path} has unsupported shape {shape}")
    return int(shape[1]), int(shape[0])


def _number(meta: dict, key: str, where: str) -> float | None:
    value = meta.get(key)
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError) as err:
        raise SceneFormatError(f"{where}: '{key}' is not a number: {value!r}") from err
    if not math.isfinite(value):
        raise SceneFormatError(f"{where}: '{key}' is not finite")
    return value


def dnerf_intrinsics(meta: dict, width: int, height: int, where: str) -> tuple[float, float, float, float]:
    """(fx, fy, cx, cy) in npg's pixel frame from a transforms JSON's top level."""
    fx = _number(meta, "fl_x", where)
    if fx is None:
        angle_x = _number(meta, "camera_angle_x", where)
        if angle_x is None:
            raise SceneFormatError(f"{where}: needs camera_angle_x (or fl_x)")
        if not 0 < angle_x < math.pi:
            raise SceneFormatError(f"{where}: camera_angle_x={angle_x} is not in (0, pi)")
        fx = width / (2.0 * math.tan(angle_x / 2.0))
    fy = _number(meta, "fl_y", where)
    if fy is None:
        angle_y = _number(meta, "camera_angle_y", where)
        if angle_y is not None:
            if not 0 < angle_y < math.pi:
                raise SceneFormatError(f"{where}: camera_angle_y={angle_y} is not in (0, pi)")
            fy = height / (2.0 * math.tan(angle_y / 2.0))
        else:
            fy = fx
    if fx <= 0 or fy <= 0:
        raise SceneFormatError(f"{where}: focal lengths must be positive, got fx={fx}, fy={fy}")
    cx = _number(meta, "cx", where)
    cy = _number(meta, "cy", where)
    cx = (width - 1) / 2.0 if cx is None else cx - 0.5
    cy = (height - 1) / 2.0 if cy is None else cy - 0.5
    return fx, fy, cx, cy


def read_dnerf_split(root: Path, split: str, masks_dir: Path | None = None) -> SplitSpec:
    """Describe ``root/transforms_<split>.json`` (see the module docstring for the conventions)."""
    json_path = root / f"transforms_{split}.json"
    meta = read_json(json_path)
    frames = meta.get("frames")
    if not isinstance(frames, list) or not frames:
        raise SceneFormatError(f"{json_path}: 'frames' is missing or empty")

    files, c2ws, times, nears, fars = [], [], [], [], []
    for k, frame in enumerate(frames):
        where = f"{json_path} frame {k}"
        if not isinstance(frame, dict):
            raise SceneFormatError(f"{where}: expected an object, got {type(frame).__name__}")
        where = f"{json_path} frame {k} ({frame.get('file_path')!r})"
        files.append(resolve_image(root, frame.get("file_path"), where))
        if "transform_matrix" not in frame:
            raise SceneFormatError(f"{where}: transform_matrix is missing")
        c2ws.append(check_c2w(frame["transform_matrix"], where))
        times.append(_number(frame, "time", where))
        nears.append(_number(frame, "near", where))
        fars.append(_number(frame, "far", where))

    count = len(frames)
    if all(t is None for t in times):
        warnings.warn(
            f"{json_path}: no frame has a 'time'; using index/(F-1) in file order (a static scene?)",
            stacklevel=3,
        )
        times = [k / (count - 1) if count > 1 else 0.0 for k in range(count)]
    elif any(t is None for t in times):
        k = next(k for k, t in enumerate(times) if t is None)
        raise SceneFormatError(
            f"{json_path} frame {k} ({frames[k].get('file_path')!r}): 'time' is missing while other frames have one"
        )
    for k, t in enumerate(times):
        if not 0.0 - 1e-6 <= t <= 1.0 + 1e-6:
            where = f"{json_path} frame {k} ({frames[k].get('file_path')!r})"
            raise SceneFormatError(f"{where}: time {t} is outside [0, 1]")

    width, height = image_size(files[0])
    meta_w, meta_h = _number(meta, "w", str(json_path)), _number(meta, "h", str(json_path))
    if (meta_w is not None and int(meta_w) != width) or (meta_h is not None and int(meta_h) != height):
        raise SceneFormatError(
            f"{json_path}: w x h = {meta_w} x {meta_h} but image {files[0]} is {width}x{height}"
        )
    fx, fy, cx, cy = dnerf_intrinsics(meta, width, height, str(json_path))
    cameras = [
        Camera(w2c=opengl_c2w_to_opencv_w2c(c2w), fx=fx, fy=fy, cx=cx, cy=cy, width=width, height=height)
        for c2w in c2ws
    ]

    bounds = None
    if all(n is not None for n in nears) and all(f is not None for f in fars):
        bounds = np.stack([nears, fars], axis=1)
    else:
        near, far = _number(meta, "near", str(json_path)), _number(meta, "far", str(json_path))
        if near is not None and far is not None:
            bounds = np.tile([near, far], (count, 1))

    mask_dir = user_masks_dir(root, masks_dir)
    return SplitSpec(
        name=root.name,
        root=root,
        split=split,
        format="dnerf",
        image_files=files,
        cameras=cameras,
        times=np.asarray(times, dtype=np.float64),
        width=width,
        height=height,
        inputs=[json_path],
        mask_files=None if mask_dir is None else find_mask_files(files, root, mask_dir),
        bounds=bounds,
    )
