"""NR-NeRF scenes (also Ub4D's real scenes): ``precomputed.json`` + ``images/``.

``precomputed.json`` holds what nerf-pytorch's ``load_llff_data`` returns: ``poses`` [F, 3, 5] whose
columns 0–3 are a camera-to-world [R | t] in OpenGL camera axes (x right, y up, looking along −z)
and whose column 4 is ``[H, W, focal]``; ``bds`` [F, 2] per-frame near/far depths; ``render_poses``
(a novel-view path, not used here) and ``i_test``. The images are the files of ``images/`` in natural
order (frame i ↔ pose i); they are RGB, so the scene has no masks unless a mask folder is given
(``SCENE/masks`` or ``masks=DIR``).

Conversion: ``w2c = (c2w_gl · diag(1, −1, −1, 1))⁻¹``, ``fx = fy = focal``, principal point at the image
centre ((W − 1)/2, (H − 1)/2) as 3DGS uses for LLFF data (nerf-pytorch's own ray generator puts it half
a pixel off, at W/2 in integer-pixel coordinates), time = i/(F − 1), ``bounds`` = ``bds``.

Splits: NR-NeRF trains on every frame; that is ``split="all"``. ``train``/``val``/``test`` follow the
D-NeRF-style conversion shipped beside ``nrnerf_example_sequence`` so that both loaders give the
same frames: frames with ``i % 10 == 5`` are held out as test (= val), the others are train.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from npg.camera import Camera
from npg.data.dnerf import GL_TO_CV, check_c2w, image_size, read_json
from npg.data.scene import SceneFormatError, SplitSpec, find_mask_files, list_images, user_masks_dir

HOLDOUT_EVERY = 10
HOLDOUT_OFFSET = 5
SPLITS = ("all", "train", "val", "test")


def split_indices(count: int, split: str) -> list[int]:
    if split == "all":
        return list(range(count))
    held_out = [i for i in range(count) if i % HOLDOUT_EVERY == HOLDOUT_OFFSET]
    if split in ("val", "test"):
        return held_out
    if split == "train":
        return [i for i in range(count) if i % HOLDOUT_EVERY != HOLDOUT_OFFSET]
    raise SceneFormatError(f"NR-NeRF scenes have the splits {', '.join(SPLITS)}; got '{split}'")


def read_nrnerf_split(root: Path, split: str, masks_dir: Path | None = None) -> SplitSpec:
    """Describe a split of an NR-NeRF scene (see the module docstring)."""
    json_path = root / "precomputed.json"
    meta = read_json(json_path)
    for key in ("poses", "bds"):
        if key not in meta:
            raise SceneFormatError(f"{json_path}: '{key}' is missing")
    try:
        poses = np.asarray(meta["poses"], dtype=np.float64)
        bds = np.asarray(meta["bds"], dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise SceneFormatError(f"{json_path}: 'poses' or 'bds' is not a numeric array ({err})") from err
    if poses.ndim != 3 or poses.shape[1:] != (3, 5) or len(poses) == 0:
        raise SceneFormatError(f"{json_path}: 'poses' must be [F, 3, 5], got shape {poses.shape}")
    count = len(poses)
    if bds.shape != (count, 2):
        raise SceneFormatError(f"{json_path}: 'bds' must be [{count}, 2] like the poses, got shape {bds.shape}")
    if not np.isfinite(poses).all() or not np.isfinite(bds).all():
        raise SceneFormatError(f"{json_path}: 'poses' or 'bds' holds NaN or Inf")

    image_dir = root / "images"
    if not image_dir.is_dir():
        raise SceneFormatError(f"{root}: images/ folder not found next to {json_path.name}")
    files = [p.resolve() for p in list_images(image_dir)]
    if len(files) != count:
        raise SceneFormatError(f"{json_path} has {count} poses but {image_dir} holds {len(files)} images")

    width, height = image_size(files[0])
    hwf = poses[:, :, 4]
    if not (np.allclose(hwf[:, 0], height) and np.allclose(hwf[:, 1], width)):
        k = int(np.argmax(~(np.isclose(hwf[:, 0], height) & np.isclose(hwf[:, 1], width))))
        raise SceneFormatError(
            f"{json_path}: pose {k} is for {hwf[k, 1]:g}x{hwf[k, 0]:g} images but {files[0]} is {width}x{height}"
        )
    if (hwf[:, 2] <= 0).any():
        raise SceneFormatError(f"{json_path}: focal lengths must be positive")

    cameras = []
    for i in range(count):
        c2w = check_c2w(poses[i, :, :4], f"{json_path} pose {i} ({files[i].name})")
        w2c = np.linalg.inv(c2w @ GL_TO_CV)
        focal = float(hwf[i, 2])
        cameras.append(
            Camera(w2c=w2c, fx=focal, fy=focal, cx=(width - 1) / 2.0, cy=(height - 1) / 2.0, width=width, height=height)
        )
    times = np.arange(count, dtype=np.float64) / max(count - 1, 1)

    keep = split_indices(count, split)
    files = [files[i] for i in keep]
    mask_dir = user_masks_dir(root, masks_dir)
    return SplitSpec(
        name=root.name,
        root=root,
        split=split,
        format="nrnerf",
        image_files=files,
        cameras=[cameras[i] for i in keep],
        times=times[keep],
        width=width,
        height=height,
        inputs=[json_path],
        mask_files=None if mask_dir is None else find_mask_files(files, root, mask_dir),
        bounds=bds[keep],
    )
