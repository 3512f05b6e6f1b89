"""One split of a dynamic scene in memory: images, optional alpha masks, cameras and times.

Every loader (D-NeRF/Blender JSON, NR-NeRF ``precomputed.json``, Ub4D-style projection matrices)
only *describes* a split as a :class:`SplitSpec` (image files, full-resolution cameras, times); this
module decodes the images once, downsamples them and keeps them compactly as uint8 tensors.

Conventions
- Cameras are :class:`npg.camera.Camera` (OpenCV axes, pixel centres at integer coordinates).
- ``rgb`` is *straight* (not premultiplied) colour; ``alpha`` is coverage. A composited image is
  ``rgb·a + bg·(1 − a)``.
- Downsampling by an integer factor ``d`` is an area (box) filter applied to premultiplied colour
  and alpha, then un-premultiplied: ``rgb' = Σ(rgb·a)/Σa``, ``a' = mean(a)``. Averaging straight
  colour instead would bleed the (arbitrary) colour of transparent pixels into the object's edges;
  this way compositing the downsampled image over any background equals downsampling the
  composited full-resolution image (up to uint8 rounding). The camera is rescaled to match
  (pixel centres stay at integer coordinates, see ``Camera.scaled``).
- Frames of every split are sorted by time (stable for equal times).
- Masks: ``mask(i) = alpha ≥ 128``, i.e. more than half covered.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from npg.camera import Camera

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MASK_THRESHOLD = 128

NO_MASKS_HELP = (
    "Without masks npg can still compute optical flow, use the camera poses and train stage 2 "
    "photometrically on the whole image (the background then becomes part of the reconstruction), "
    "but it cannot use stage 1's silhouette (chamfer) term, composite onto a chosen background, or "
    "report foreground-only metrics. Supply masks as a folder with one image per frame named like "
    "the frame (e.g. masks/images/image000001.png or masks/image000001.png; white = object): put it "
    "in the scene folder as masks/ or pass masks=DIR (npg-prep --masks DIR)."
)


class SceneFormatError(ValueError):
    """A scene folder or one of its files is missing, unreadable or inconsistent."""


# --------------------------------------------------------------------------- split description
@dataclass
class SplitSpec:
    """What a format reader knows about one split before any image is decoded.

    ``cameras`` are for the full-resolution images (``width`` × ``height``); ``times`` [F] in
    [0, 1]; ``mask_files`` (one per frame) override the images' own alpha; ``inputs`` are the
    metadata files (JSON, npz) the split was read from; ``bounds`` [F, 2] optional near/far depths.
    """

    name: str
    root: Path
    split: str
    format: str
    image_files: list[Path]
    cameras: list[Camera]
    times: np.ndarray
    width: int
    height: int
    inputs: list[Path]
    mask_files: list[Path] | None = None
    bounds: np.ndarray | None = None

    def __post_init__(self):
        count = len(self.image_files)
        if count == 0:
            raise SceneFormatError(f"{self.root}: split '{self.split}' has no frames")
        if len(self.cameras) != count or len(self.times) != count:
            raise SceneFormatError(
                f"{self.root}: split '{self.split}' has {count} images but {len(self.cameras)} cameras "
                f"and {len(self.times)} times"
            )
        if self.mask_files is not None and len(self.mask_files) != count:
            raise SceneFormatError(
                f"{self.root}: split '{self.split}' has {count} images but {len(self.mask_files)} masks"
            )
        self.times = check_times(np.asarray(self.times, dtype=np.float64), self.image_files)

    def sorted_by_time(self) -> "SplitSpec":
        order = np.argsort(self.times, kind="stable")
        pick = lambda items: None if items is None else [items[i] for i in order]  # noqa: E731
        return replace(
            self,
            image_files=pick(self.image_files),
            cameras=pick(self.cameras),
            times=self.times[order],
            mask_files=pick(self.mask_files),
            bounds=None if self.bounds is None else self.bounds[order],
        )

    def input_files(self) -> list[Path]:
        return list(self.inputs) + list(self.image_files) + list(self.mask_files or [])


def check_times(times: np.ndarray, files) -> np.ndarray:
    """Times must be finite and in [0, 1] (1e-6 slack, then clipped); errors name the frame."""
    for t, f in zip(times, files):
        if not np.isfinite(t) or t < -1e-6 or t > 1 + 1e-6:
            raise SceneFormatError(f"time {t!r} of frame {f} is outside [0, 1]")
    return np.clip(times, 0.0, 1.0)


# --------------------------------------------------------------------------- the loaded split
@dataclass(eq=False)
class SceneSplit:
    """One split of a scene, decoded. Treat the tensors as read-only: loads are cached and shared.

    rgb [F, H, W, 3] uint8 (straight colour), alpha [F, H, W] uint8 or None (no masks known),
    cameras: F cameras for this resolution, times [F] float32 in [0, 1] (ascending), files: the F
    image files, bounds [F, 2] float32 near/far depths when the format gives them.
    """

    name: str
    root: Path
    split: str
    format: str
    rgb: torch.Tensor
    alpha: torch.Tensor | None
    cameras: list[Camera]
    times: torch.Tensor
    files: list[Path]
    downsample: int = 1
    bounds: torch.Tensor | None = None
    mask_files: list[Path] | None = field(default=None, repr=False)

    @property
    def height(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[2])

    @property
    def has_masks(self) -> bool:
        return self.alpha is not None

    def __len__(self) -> int:
        return int(self.rgb.shape[0])

    def __repr__(self) -> str:
        masks = "alpha masks" if self.has_masks else "no masks"
        return (
            f"SceneSplit({self.name!r}, split={self.split!r}, format={self.format!r}, {len(self)} frames, "
            f"{self.width}x{self.height}, downsample={self.downsample}, {masks})"
        )

    def _index(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"frame {i} out of range for {n} frames of {self.name}/{self.split}")
        return i % n

    def image(self, i: int, background="black", device=None, generator=None) -> torch.Tensor:
        """Frame i composited over ``background`` → [3, H, W] float32 in [0, 1].

        background: "black", "white", "random" (one uniform colour per call), "noise" (uniform per
        pixel), (r, g, b) in [0, 1], or a tensor [3] / [3, H, W]. To render with the same colour,
        draw it once with :func:`resolve_background` and pass the tensor to both. Without masks
        the image is returned as it is (opaque).
        """
        i = self._index(i)
        rgb = self.rgb[i].to(device).permute(2, 0, 1).float().div_(255.0)
        if self.alpha is None:
            return rgb.contiguous()
        a = self.alpha[i].to(device).float().div_(255.0)
        bg = resolve_background(background, generator=generator, device=rgb.device, size=(self.height, self.width))
        if bg.dim() == 1:
            bg = bg[:, None, None]
        return rgb * a + bg * (1.0 - a)

    def images(self, background="black", device=None, generator=None) -> torch.Tensor:
        """All frames composited over one background → [F, 3, H, W] float32."""
        return torch.stack([self.image(i, background, device, generator) for i in range(len(self))])

    def alpha_map(self, i: int, device=None) -> torch.Tensor:
        """Coverage of frame i → [1, H, W] float32 in [0, 1]."""
        self._require_masks()
        return self.alpha[self._index(i)].to(device).float().div_(255.0)[None]

    def mask(self, i: int, device=None) -> torch.Tensor:
        """Object mask of frame i → [H, W] bool (alpha ≥ 128)."""
        self._require_masks()
        return self.alpha[self._index(i)].to(device) >= MASK_THRESHOLD

    def masks(self, device=None) -> torch.Tensor:
        """All masks → [F, H, W] bool."""
        self._require_masks()
        return self.alpha.to(device) >= MASK_THRESHOLD

    def _require_masks(self):
        if self.alpha is None:
            raise SceneFormatError(
                f"scene {self.name} (split {self.split}) has no masks: its images have no alpha channel "
                f"and no mask folder was found. {NO_MASKS_HELP}"
            )

    def rescaled(self, factor: float) -> "SceneSplit":
        """The same split in a world scaled by ``factor`` (camera centres and depth bounds × factor).

        Useful for scenes whose depths are far below the rasterizer's near cull (z ≤ 0.2), e.g.
        NR-NeRF's example sequence with depths in [0.002, 1].
        """
        if not (np.isfinite(factor) and factor > 0):
            raise ValueError(f"world scale factor must be positive and finite, got {factor}")
        cameras = []
        for cam in self.cameras:
            w2c = cam.w2c.clone()
            w2c[:3, 3] *= factor
            cameras.append(replace(cam, w2c=w2c))
        bounds = None if self.bounds is None else self.bounds * factor
        return replace(self, cameras=cameras, bounds=bounds)


def resolve_background(background, *, generator=None, device=None, size=None) -> torch.Tensor:
    """A background spec → float32 tensor [3] (or [3, H, W] for "noise" / a per-pixel tensor)."""
    if isinstance(background, str):
        key = background.lower()
        if key == "black":
            return torch.zeros(3, device=device)
        if key == "white":
            return torch.ones(3, device=device)
        if key == "random":
            return torch.rand(3, generator=generator).to(device)
        if key == "noise":
            if size is None:
                raise ValueError("background 'noise' needs the image size")
            return torch.rand(3, *size, generator=generator).to(device)
        raise ValueError(f"unknown background {background!r}; use black, white, random, noise, (r, g, b) or a tensor")
    bg = torch.as_tensor(background, dtype=torch.float32, device=device)
    per_pixel = bg.dim() == 3 and bg.shape[0] == 3 and (size is None or tuple(bg.shape[1:]) == tuple(size))
    if bg.shape != (3,) and not per_pixel:
        raise ValueError(f"background must be [3] or [3, H, W] matching the image, got shape {tuple(bg.shape)}")
    if not torch.isfinite(bg).all() or bg.min() < 0 or bg.max() > 1:
        raise ValueError("background colour values must be finite and in [0, 1]")
    return bg


# --------------------------------------------------------------------------- image files
def natural_key(path) -> list:
    """Sort key comparing digit runs as numbers: frame2 < frame10."""
    return [int(s) if s.isdigit() else s.lower() for s in re.split(r"(\d+)", str(path))]


def list_images(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()), key=natural_key)


def read_image(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """An image file → (rgb [H, W, 3] uint8, alpha [H, W] uint8 or None)."""
    import imageio.v3 as iio

    path = Path(path)
    if not path.is_file():
        raise SceneFormatError(f"image not found: {path}")
    try:
        img = np.asarray(iio.imread(path))
    except Exception as err:
        raise SceneFormatError(f"image {path} is unreadable or corrupt: {err}") from err
    img = to_uint8(img, path)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 2, 3, 4) or img.shape[0] == 0 or img.shape[1] == 0:
        raise SceneFormatError(f"image {path} has unsupported shape {img.shape}")
    channels = img.shape[2]
    if channels in (1, 2):
        rgb = np.repeat(img[:, :, :1], 3, axis=2)
    else:
        rgb = img[:, :, :3]
    alpha = img[:, :, -1] if channels in (2, 4) else None
    return np.ascontiguousarray(rgb), None if alpha is None else np.ascontiguousarray(alpha)


def read_mask(path: Path) -> np.ndarray:
    """A mask image → coverage [H, W] uint8 (0 = background, 255 = object).

    Colour masks use their first channel; 0/1-valued masks are stretched to 0/255; the alpha
    channel of an RGBA mask is ignored unless the colour channels are all zero (then it is the mask).
    """
    import imageio.v3 as iio

    path = Path(path)
    if not path.is_file():
        raise SceneFormatError(f"mask not found: {path}")
    try:
        m = np.asarray(iio.imread(path))
    except Exception as err:
        raise SceneFormatError(f"mask {path} is unreadable or corrupt: {err}") from err
    if m.dtype == bool:
        m = m.astype(np.uint8) * 255
    m = to_uint8(m, path)
    if m.ndim == 3:
        if m.shape[2] in (2, 4) and not m[:, :, :-1].any():
            m = m[:, :, -1]
        else:
            m = m[:, :, 0]
    if m.ndim != 2:
        raise SceneFormatError(f"mask {path} has unsupported shape {m.shape}")
    if m.max() == 1:
        m = m * np.uint8(255)
    return np.ascontiguousarray(m)


def to_uint8(img: np.ndarray, path) -> np.ndarray:
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        return ((img.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if img.dtype.kind == "f":
        if not np.isfinite(img).all():
            raise SceneFormatError(f"image {path} holds NaN or Inf")
        return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
    if img.dtype == bool:
        return img.astype(np.uint8) * 255
    raise SceneFormatError(f"image {path} has unsupported pixel type {img.dtype}")


def find_mask_files(image_files: list[Path], root: Path, masks_dir: Path) -> list[Path]:
    """One mask per image in ``masks_dir``: ``<relative path>.<ext>`` first, then ``<name>.<ext>``."""
    masks_dir = Path(masks_dir)
    if not masks_dir.is_dir():
        raise SceneFormatError(f"mask folder not found: {masks_dir}")
    found = []
    for image in image_files:
        try:
            rel = image.relative_to(root).with_suffix("")
        except ValueError:
            rel = Path(image.stem)
        candidates = [masks_dir / rel.parent / (rel.name + s) for s in (".png", ".jpg", ".jpeg")]
        candidates += [masks_dir / (image.stem + s) for s in (".png", ".jpg", ".jpeg")]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            tried = ", ".join(str(c.relative_to(masks_dir)) for c in dict.fromkeys(candidates))
            raise SceneFormatError(f"mask folder {masks_dir} has no mask for image {image} (tried {tried})")
        found.append(hit)
    return found


# --------------------------------------------------------------------------- resampling
def area_downsample(rgb: np.ndarray, alpha: np.ndarray | None, factor: int):
    """Box-filter an image by an integer factor (premultiplied when alpha is given).

    rgb [H, W, 3] uint8, alpha [H, W] uint8 or None → the same at (H // factor, W // factor).
    When H or W is not a multiple of ``factor``, OpenCV's area filter spreads the remainder evenly.
    """
    import cv2

    if factor == 1:
        return rgb, alpha
    height, width = rgb.shape[0] // factor, rgb.shape[1] // factor
    if height < 1 or width < 1:
        raise SceneFormatError(f"downsample factor {factor} is too large for a {rgb.shape[1]}x{rgb.shape[0]} image")

    def shrink(x):
        return cv2.resize(x, (width, height), interpolation=cv2.INTER_AREA)

    if alpha is None:
        out = shrink(rgb.astype(np.float32))
        return np.clip(np.round(out), 0, 255).astype(np.uint8), None
    a = alpha.astype(np.float32) / 255.0
    premultiplied = shrink(rgb.astype(np.float32) * a[:, :, None])
    a_small = shrink(a)
    plain = shrink(rgb.astype(np.float32))
    covered = a_small > 1e-6
    colour = np.where(covered[:, :, None], premultiplied / np.maximum(a_small, 1e-6)[:, :, None], plain)
    rgb_small = np.clip(np.round(colour), 0, 255).astype(np.uint8)
    alpha_small = np.clip(np.round(a_small * 255.0), 0, 255).astype(np.uint8)
    return rgb_small, alpha_small


def resize_camera(cam: Camera, width: int, height: int) -> Camera:
    """The camera for the same view resampled to width × height (pixel centres at integers)."""
    if width == cam.width and height == cam.height:
        return cam
    sx, sy = width / cam.width, height / cam.height
    return replace(
        cam,
        fx=cam.fx * sx,
        fy=cam.fy * sy,
        cx=(cam.cx + 0.5) * sx - 0.5,
        cy=(cam.cy + 0.5) * sy - 0.5,
        width=int(width),
        height=int(height),
    )


# --------------------------------------------------------------------------- hashing / cache folders
_DIGESTS: dict = {}
_DIGEST_LOCK = threading.Lock()


def file_digest(path: Path) -> str:
    """blake2b of a file's bytes, memoised per process on (path, size, mtime)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _DIGEST_LOCK:
        cached = _DIGESTS.get(key)
    if cached is not None:
        return cached
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    with _DIGEST_LOCK:
        _DIGESTS[key] = digest
    return digest


def cache_root(scene_root: Path) -> Path:
    """Where npg caches derived data of a scene.

    ``$NPG_CACHE_DIR/<name>-<hash>`` when that variable is set, else ``SCENE/npg_cache`` when the scene
    folder is writable, else ``~/.cache/npg/<name>-<hash>`` (read-only datasets); ``<hash>`` is of the
    scene's absolute path so that two scenes with the same name do not collide. A folder whose
    permission bits forbid writing counts as read-only even for root, who could write it anyway.
    """
    scene_root = Path(scene_root).resolve()
    tag = f"{scene_root.name}-{hashlib.blake2b(str(scene_root).encode(), digest_size=4).hexdigest()}"
    env = os.environ.get("NPG_CACHE_DIR")
    if env:
        return Path(env).expanduser() / tag
    try:
        writable = bool(scene_root.stat().st_mode & 0o222) and os.access(scene_root, os.W_OK)
    except OSError:
        writable = False
    if writable:
        return scene_root / "npg_cache"
    return Path.home() / ".cache" / "npg" / tag


# --------------------------------------------------------------------------- decoding a split
def build_split(spec: SplitSpec, downsample: int = 1) -> SceneSplit:
    """Decode the images of ``spec`` (sorted by time), downsample them and check them."""
    spec = spec.sorted_by_time()
    count = len(spec.image_files)
    out_h, out_w = spec.height // downsample, spec.width // downsample
    if out_h < 1 or out_w < 1:
        raise SceneFormatError(f"downsample factor {downsample} is too large for {spec.width}x{spec.height} images")
    rgb_all = np.empty((count, out_h, out_w, 3), dtype=np.uint8)
    alpha_all = None
    alpha_state = None  # True: every image has alpha; False: none has
    for k, path in enumerate(spec.image_files):
        rgb, alpha = read_image(path)
        if rgb.shape[:2] != (spec.height, spec.width):
            raise SceneFormatError(
                f"image {path} is {rgb.shape[1]}x{rgb.shape[0]} but the split '{spec.split}' of {spec.root} "
                f"expects {spec.width}x{spec.height}"
            )
        if spec.mask_files is not None:
            alpha = read_mask(spec.mask_files[k])
            if alpha.shape != (spec.height, spec.width):
                raise SceneFormatError(
                    f"mask {spec.mask_files[k]} is {alpha.shape[1]}x{alpha.shape[0]} but its image {path} is "
                    f"{spec.width}x{spec.height}"
                )
        else:
            has = alpha is not None
            if alpha_state is None:
                alpha_state = has
            elif has != alpha_state:
                raise SceneFormatError(
                    f"image {path} {'has' if has else 'has no'} alpha channel, unlike the split's first image "
                    f"{spec.image_files[0]}: mixed RGB and RGBA images in one split"
                )
        rgb, alpha = area_downsample(rgb, alpha, downsample)
        rgb_all[k] = rgb
        if alpha is not None:
            if alpha_all is None:
                alpha_all = np.empty((count, out_h, out_w), dtype=np.uint8)
            alpha_all[k] = alpha
    if alpha_all is not None and spec.mask_files is None and (alpha_all == 255).all():
        warnings.warn(
            f"{spec.root} ({spec.split}): every image is fully opaque; treating the split as having no masks",
            stacklevel=3,
        )
        alpha_all = None
    cameras = [resize_camera(cam, out_w, out_h) for cam in spec.cameras]
    return SceneSplit(
        name=spec.name,
        root=spec.root,
        split=spec.split,
        format=spec.format,
        rgb=torch.from_numpy(rgb_all),
        alpha=None if alpha_all is None else torch.from_numpy(alpha_all),
        cameras=cameras,
        times=torch.from_numpy(spec.times.astype(np.float32)),
        files=list(spec.image_files),
        downsample=downsample,
        bounds=None if spec.bounds is None else torch.from_numpy(np.asarray(spec.bounds, dtype=np.float32)),
        mask_files=spec.mask_files,
    )


# --------------------------------------------------------------------------- format detection
FORMATS = ("dnerf", "nrnerf", "opencv")


def detect_format(root: Path, split: str) -> str:
    """dnerf when ``transforms_<split>.json`` exists, else nrnerf (``precomputed.json``), else opencv
    (``projection_matrix.npz``)."""
    if (root / f"transforms_{split}.json").is_file():
        return "dnerf"
    if (root / "precomputed.json").is_file():
        return "nrnerf"
    if (root / "projection_matrix.npz").is_file():
        return "opencv"
    available = sorted(p.name[len("transforms_"):-len(".json")] for p in root.glob("transforms_*.json"))
    if available:
        raise SceneFormatError(f"{root} has no transforms_{split}.json; its splits are: {', '.join(available)}")
    raise SceneFormatError(
        f"{root} is not a scene folder: found none of transforms_{split}.json (D-NeRF), precomputed.json "
        f"(NR-NeRF) or projection_matrix.npz (Ub4D-style OpenCV cameras)"
    )


def read_spec(path, split: str = "train", masks=None, format: str = "auto") -> SplitSpec:
    """Describe a split of the scene at ``path`` (a folder, or one of its metadata files)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise SceneFormatError(f"scene not found: {path}")
    root = path
    if path.is_file():
        root = path.parent
        if format == "auto":
            if path.name == "precomputed.json":
                format = "nrnerf"
            elif path.name == "projection_matrix.npz":
                format = "opencv"
            elif path.name.startswith("transforms_") and path.suffix == ".json":
                format = "dnerf"
                split = path.name[len("transforms_"):-len(".json")]
            else:
                raise SceneFormatError(f"{path} is not a scene metadata file")
    root = root.resolve()
    if format == "auto":
        format = detect_format(root, split)
    masks_dir = Path(masks).expanduser().resolve() if masks is not None else None
    if format == "dnerf":
        from npg.data.dnerf import read_dnerf_split

        return read_dnerf_split(root, split, masks_dir)
    if format == "nrnerf":
        from npg.data.nrnerf import read_nrnerf_split

        return read_nrnerf_split(root, split, masks_dir)
    if format == "opencv":
        from npg.data.opencv_cams import read_opencv_split

        return read_opencv_split(root, split, masks_dir)
    raise ValueError(f"unknown scene format {format!r}; use auto or one of {', '.join(FORMATS)}")


def user_masks_dir(root: Path, masks_dir: Path | None) -> Path | None:
    """The explicit mask folder, else ``SCENE/masks`` when it exists."""
    if masks_dir is not None:
        return masks_dir
    default = root / "masks"
    return default if default.is_dir() else None


# --------------------------------------------------------------------------- public entry point
_LRU: "OrderedDict[tuple, SceneSplit]" = OrderedDict()
_LRU_SIZE = 4
_LRU_LOCK = threading.Lock()


def clear_cache() -> None:
    """Forget every split loaded in this process."""
    with _LRU_LOCK:
        _LRU.clear()


def _stat_signature(files) -> tuple:
    sig = []
    for f in files:
        try:
            st = os.stat(f)
        except OSError as err:
            raise SceneFormatError(f"cannot read {f}: {err.strerror}") from err
        sig.append((str(f), st.st_size, st.st_mtime_ns))
    return tuple(sig)


def load_scene(
    path, split: str = "train", downsample: int = 1, *, masks=None, format: str = "auto", cache: str = "memory"
) -> SceneSplit:
    """Load one split of a scene → :class:`SceneSplit` (frames sorted by time).

    path: a scene folder in D-NeRF/Blender (``transforms_<split>.json``), NR-NeRF (``precomputed.json``
    + ``images/``) or Ub4D-style OpenCV (``rgb/``, ``mask/``, ``projection_matrix.npz``) layout.
    downsample: integer area-filter factor (2 for the usual 800→400 D-NeRF protocol).
    masks: a folder of user masks (else ``SCENE/masks`` if present; else the images' alpha).
    cache: "memory" keeps the last few loads in this process (keyed on the files' size and mtime),
    "disk" also keeps a ``.npz`` of the decoded images in the scene's cache folder (guarded by the
    input files' content hashes), "none" always decodes.
    """
    if isinstance(downsample, bool) or not isinstance(downsample, (int, np.integer)) or downsample < 1:
        raise ValueError(f"downsample must be a positive integer, got {downsample!r}")
    if cache not in ("memory", "disk", "none"):
        raise ValueError(f"cache must be 'memory', 'disk' or 'none', got {cache!r}")
    downsample = int(downsample)
    spec = read_spec(path, split, masks, format)
    key = (str(spec.root), spec.format, spec.split, downsample, _stat_signature(spec.input_files()))
    if cache != "none":
        with _LRU_LOCK:
            hit = _LRU.get(key)
            if hit is not None:
                _LRU.move_to_end(key)
                return hit
    if cache == "disk":
        scene = _load_disk_cached(spec, downsample)
    else:
        scene = build_split(spec, downsample)
    if cache != "none":
        with _LRU_LOCK:
            _LRU[key] = scene
            while len(_LRU) > _LRU_SIZE:
                _LRU.popitem(last=False)
    return scene


def _load_disk_cached(spec: SplitSpec, downsample: int) -> SceneSplit:
    from npg.io import atomic_path

    ordered = spec.sorted_by_time()
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps([spec.format, spec.split, downsample, 1]).encode())
    for f in ordered.input_files():
        digest.update(str(f).encode())
        digest.update(file_digest(f).encode())
    key = digest.hexdigest()
    target = cache_root(spec.root) / f"images_{spec.split}_ds{downsample}.npz"
    if target.is_file():
        try:
            with np.load(target) as data:
                if str(data["key"]) == key:
                    rgb = data["rgb"]
                    alpha = data["alpha"] if "alpha" in data.files else None
                    cameras = [resize_camera(c, rgb.shape[2], rgb.shape[1]) for c in ordered.cameras]
                    return SceneSplit(
                        name=spec.name, root=spec.root, split=spec.split, format=spec.format,
                        rgb=torch.from_numpy(rgb), alpha=None if alpha is None else torch.from_numpy(alpha),
                        cameras=cameras, times=torch.from_numpy(ordered.times.astype(np.float32)),
                        files=list(ordered.image_files), downsample=downsample,
                        bounds=None if ordered.bounds is None else torch.from_numpy(ordered.bounds.astype(np.float32)),
                        mask_files=ordered.mask_files,
                    )
        except Exception as err:  # a stale or truncated cache is rebuilt, never trusted
            warnings.warn(f"ignoring unreadable image cache {target}: {err}", stacklevel=3)
    scene = build_split(spec, downsample)
    arrays = {"key": np.array(key), "rgb": scene.rgb.numpy()}
    if scene.alpha is not None:
        arrays["alpha"] = scene.alpha.numpy()
    try:
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, **arrays)
    except OSError as err:
        warnings.warn(f"could not write image cache {target}: {err}", stacklevel=3)
    return scene
