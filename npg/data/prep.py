"""Scene preprocessing: masks, forward optical flow, a flow video — cached under a manifest.

``prepare_scene(SCENE, split, downsample)`` (or ``npg-prep SCENE``) writes, for the frames of one split
in time order at one resolution, into ``<cache>/<split>_ds<downsample>/`` (another flow or mask
source than the default gets its own folder, ``<split>_ds<downsample>_<hash of the sources>``):

- ``flow/NNNNNN.npy``: forward flow from frame i to frame i + 1 [H, W, 2] (dx, dy pixels), computed by
  OpenCV (DIS at its finest preset, Farneback as fallback) on the frames composited over black, or
  imported from a folder of external flows (.npy / .pt / .flo, [H, W, 2] or [2, H, W], e.g. RAFT's,
  at full or at the downsampled resolution). Stored as float16 when every |component| ≤ 256 px
  (rounding error ≤ 1/16 px), else float32.
- ``masks/NNNNNN.png``: the object masks (alpha ≥ 128) as 0/255 PNGs, when the scene has masks.
- ``flow_vis.mp4``: each frame beside its flow (hue = direction, saturation = speed; one scale for
  the whole video).
- ``manifest.json``: content hashes of every input (metadata files, images, masks, external flows)
  and the parameters. A rerun with the same hashes and parameters skips all work; the manifest is
  written last, so an interrupted run is redone.

``<cache>`` is ``SCENE/npg_cache`` when the scene folder is writable, else ``~/.cache/npg/<scene>-<hash>``
(or ``$NPG_CACHE_DIR/<scene>-<hash>``); see :func:`npg.data.scene.cache_root`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock

from npg.data.flow import FLOW_METHODS, FLOW_SETTINGS_VERSION, compute_flow, flow_to_color, read_flow_file, resize_flow
from npg.data.scene import (
    NO_MASKS_HELP,
    SceneFormatError,
    cache_root,
    file_digest,
    load_scene,
    natural_key,
    read_spec,
)
from npg.io import atomic_path, atomic_write_text

PREP_VERSION = 1
FLOW_SUFFIXES = (".npy", ".pt", ".pth", ".flo")
FLOAT16_LIMIT = 256.0
VIDEO_FPS = 10


@dataclass
class PreparedScene:
    """Where the prepared data of one split lies. ``skipped``: the cache was already up to date."""

    cache_dir: Path
    flow_files: list[Path]
    mask_files: list[Path]
    video: Path | None
    has_masks: bool
    skipped: bool
    manifest: dict


def _outputs_exist(folder: Path, manifest: dict) -> bool:
    return all((folder / rel).is_file() for rel in manifest.get("outputs", []))


def _read_manifest(path: Path) -> dict | None:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError):
        return None


def _external_flow_files(folder: Path, image_files: list[Path]) -> list[Path]:
    """Match a folder of flows to the split's frames: by name, else by order."""
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise SceneFormatError(f"external flow folder not found: {folder}")
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in FLOW_SUFFIXES), key=natural_key)
    needed = len(image_files) - 1
    by_stem = {p.stem: p for p in files}
    if needed > 0 and all(img.stem in by_stem for img in image_files[:-1]):
        return [by_stem[img.stem] for img in image_files[:-1]]
    if len(files) == needed:
        return files
    if len(files) == needed + 1:
        warnings.warn(
            f"{folder} holds one flow per frame ({len(files)}); using the first {needed} as the forward flows "
            f"f -> f+1 and ignoring {files[-1].name}",
            stacklevel=3,
        )
        return files[:needed]
    raise SceneFormatError(
        f"{folder} holds {len(files)} flow files (.npy/.pt/.flo) but the split has {len(image_files)} frames: "
        f"expected {needed} forward flows f -> f+1, in frame order or named like the frames' images"
    )


def _cache_dir_name(split: str, downsample: int, method: str, flows_from, masks) -> str:
    """``<split>_ds<downsample>`` for the default sources (the scene's masks, DIS flow); any other flow
    or mask source gets a folder of its own, so that runs on one scene with different sources (e.g. a
    benchmark training with DIS and with external flows at once) never rebuild the cache another
    run is reading."""
    name = f"{split}_ds{int(downsample)}"
    if method == "dis" and flows_from is None and masks is None:
        return name
    sources = {
        "method": None if flows_from is not None else method,
        "flows_from": None if flows_from is None else str(Path(flows_from).expanduser().resolve()),
        "masks": None if masks is None else str(Path(masks).expanduser().resolve()),
    }
    return f"{name}_{hashlib.sha1(json.dumps(sources, sort_keys=True).encode()).hexdigest()[:8]}"


def _save_flow(path: Path, flow: np.ndarray) -> None:
    dtype = np.float16 if np.abs(flow).max(initial=0.0) <= FLOAT16_LIMIT else np.float32
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, flow.astype(dtype))


def _write_video(path: Path, frames_rgb: list[np.ndarray], flows: list[np.ndarray]) -> bool:
    """Frame beside its flow colour; one colour scale (99th percentile speed) for the whole video."""
    try:
        import imageio.v2 as imageio
    except ImportError:  # pragma: no cover - imageio is a dependency
        return False
    speeds = np.concatenate([np.linalg.norm(f.astype(np.float32), axis=-1).ravel()[::7] for f in flows])
    scale = float(np.percentile(speeds, 99)) if speeds.size else 1.0
    h, w = frames_rgb[0].shape[:2]
    pad_h, pad_w = (-h) % 16, (-2 * w) % 16
    try:
        with atomic_path(path) as tmp:
            writer = imageio.get_writer(tmp, format="FFMPEG", fps=VIDEO_FPS, codec="libx264", quality=7,
                                        macro_block_size=16, ffmpeg_log_level="error")
            try:
                for rgb, flow in zip(frames_rgb, flows):
                    frame = np.concatenate([rgb, flow_to_color(flow, max(scale, 1e-3))], axis=1)
                    writer.append_data(np.pad(frame, ((0, pad_h), (0, pad_w), (0, 0))))
            finally:
                writer.close()
    except Exception as err:  # no ffmpeg on this machine: the video is a nicety, not an input
        warnings.warn(f"could not write the flow video {path}: {err}", stacklevel=3)
        return False
    return True


def prepare_scene(
    path,
    split: str = "train",
    downsample: int = 1,
    force: bool = False,
    flows_from=None,
    *,
    masks=None,
    method: str = "dis",
    video: bool = True,
    progress: bool = True,
    format: str = "auto",
) -> PreparedScene:
    """Compute (or reuse) masks, forward flows and the flow video of one split; see the module docstring."""
    if method not in FLOW_METHODS:
        raise ValueError(f"unknown flow method {method!r}; use one of {', '.join(FLOW_METHODS)}")
    spec = read_spec(path, split, masks, format).sorted_by_time()
    out_dir = cache_root(spec.root) / _cache_dir_name(spec.split, downsample, method, flows_from, masks)
    external = None if flows_from is None else _external_flow_files(flows_from, spec.image_files)

    import cv2

    params = {
        "version": PREP_VERSION,
        "format": spec.format,
        "split": spec.split,
        "downsample": int(downsample),
        "flow": "external" if external is not None else method,
        "opencv": None if external is not None else f"{cv2.__version__}/settings-{FLOW_SETTINGS_VERSION}",
        "video": bool(video),
    }
    inputs = {str(f): file_digest(f) for f in spec.input_files() + list(external or [])}
    frames = [str(f) for f in spec.image_files]
    # Runs on one scene at once (e.g. benchmarks training several configurations in parallel) would
    # delete each other's half-written outputs: the check and the build happen under a file lock.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out_dir) + ".lock"):
        return _prepare_locked(spec, out_dir, params, inputs, frames, external, path, split, downsample, masks,
                               format, method, video, progress, force)


def _prepare_locked(spec, out_dir, params, inputs, frames, external, path, split, downsample, masks, format,
                    method, video, progress, force) -> PreparedScene:
    from tqdm import tqdm

    manifest_path = out_dir / "manifest.json"
    old = _read_manifest(manifest_path)
    if (
        not force
        and old is not None
        and old.get("params") == params
        and old.get("inputs") == inputs
        and old.get("frames") == frames
        and _outputs_exist(out_dir, old)
    ):
        return _result(out_dir, old, skipped=True)

    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)
    for stale in ("flow", "masks"):
        shutil.rmtree(out_dir / stale, ignore_errors=True)
    (out_dir / "flow_vis.mp4").unlink(missing_ok=True)

    scene = load_scene(path, split, downsample, masks=masks, format=format)
    count = len(scene)
    outputs = []

    if scene.has_masks:
        import imageio.v3 as iio

        (out_dir / "masks").mkdir()
        for i in range(count):
            rel = f"masks/{i:06d}.png"
            with atomic_path(out_dir / rel) as tmp:
                iio.imwrite(tmp, scene.mask(i).numpy().astype(np.uint8) * 255, extension=".png")
            outputs.append(rel)

    (out_dir / "flow").mkdir()
    frames_rgb = [(scene.image(i, "black").permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8) for i in range(count)]
    flows = []
    label = "import flow" if external is not None else f"flow ({method})"
    for i in tqdm(range(count - 1), desc=f"{scene.name}/{split} {label}", unit="pair", disable=not progress):
        if external is not None:
            flow = read_flow_file(external[i])
            if flow.shape[:2] == (spec.height, spec.width):
                flow = resize_flow(flow, scene.width, scene.height)
            elif flow.shape[:2] != (scene.height, scene.width):
                raise SceneFormatError(
                    f"flow file {external[i]} is {flow.shape[1]}x{flow.shape[0]}; expected the images' size "
                    f"{spec.width}x{spec.height} or the downsampled {scene.width}x{scene.height}"
                )
        else:
            flow = compute_flow(frames_rgb[i], frames_rgb[i + 1], method)
        rel = f"flow/{i:06d}.npy"
        _save_flow(out_dir / rel, flow)
        outputs.append(rel)
        flows.append(flow)

    if video and flows and _write_video(out_dir / "flow_vis.mp4", frames_rgb[:-1], flows):
        outputs.append("flow_vis.mp4")

    # median speed over the object (all pixels without masks): a quick sanity number for the log
    speeds = []
    for i, f in enumerate(flows):
        speed = np.linalg.norm(f, axis=-1)
        inside = scene.mask(i).numpy() if scene.has_masks else np.ones(speed.shape, bool)
        if inside.any():
            speeds.append(float(np.median(speed[inside])))
    manifest = {
        "params": params,
        "inputs": inputs,
        "frames": frames,
        "outputs": outputs,
        "has_masks": scene.has_masks,
        "size": [scene.width, scene.height],
        "flow_median_speed_px": round(float(np.median(speeds)), 3) if speeds else 0.0,
        "seconds": round(time.perf_counter() - started, 3),
    }
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1))
    return _result(out_dir, manifest, skipped=False)


def _result(out_dir: Path, manifest: dict, skipped: bool) -> PreparedScene:
    outputs = manifest.get("outputs", [])
    return PreparedScene(
        cache_dir=out_dir,
        flow_files=[out_dir / o for o in outputs if o.startswith("flow/")],
        mask_files=[out_dir / o for o in outputs if o.startswith("masks/")],
        video=out_dir / "flow_vis.mp4" if "flow_vis.mp4" in outputs else None,
        has_masks=bool(manifest.get("has_masks")),
        skipped=skipped,
        manifest=manifest,
    )


def load_flows(path, split: str = "train", downsample: int = 1, **kwargs) -> torch.Tensor:
    """Forward flows of a split → [F − 1, H, W, 2] float32 (dx, dy pixels), frame i → i + 1 in time order.

    Computed with OpenCV and cached on first use (see :func:`prepare_scene`, whose keyword arguments
    — masks, method, flows_from, format, progress — are accepted here).
    """
    kwargs.setdefault("progress", False)
    prepared = prepare_scene(path, split, downsample, **kwargs)
    width, height = prepared.manifest["size"]
    if not prepared.flow_files:
        return torch.zeros(0, height, width, 2)
    flows = np.empty((len(prepared.flow_files), height, width, 2), dtype=np.float32)
    for i, f in enumerate(prepared.flow_files):
        try:
            flows[i] = np.load(f, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise SceneFormatError(
                f"cached flow {f} is unreadable ({err}); rerun with force=True / npg-prep --force"
            ) from err
    return torch.from_numpy(flows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="npg-prep",
        description="Prepare a scene for npg: masks, forward optical flow and a flow video, cached in the "
        "scene folder (or ~/.cache/npg for read-only scenes) so that reruns skip the work.",
    )
    parser.add_argument(
        "scene",
        help="scene folder: D-NeRF transforms_*.json, NR-NeRF precomputed.json or Ub4D-style rgb/ + projection_matrix.npz",
    )
    parser.add_argument("--split", default="train", help="split to prepare (default: train)")
    parser.add_argument("--downsample", type=int, default=1, help="integer area-downsampling factor (2: 800->400)")
    parser.add_argument(
        "--flows-from", metavar="DIR", help="import external flows (.npy/.pt/.flo, HxWx2) instead of computing them"
    )
    parser.add_argument("--masks", metavar="DIR", help="folder of user masks, one per frame, named like the images")
    parser.add_argument("--method", choices=FLOW_METHODS, default="dis", help="OpenCV flow method (default: dis)")
    parser.add_argument("--format", choices=("auto", "dnerf", "nrnerf", "opencv"), default="auto")
    parser.add_argument("--no-video", action="store_true", help="skip the flow visualisation video")
    parser.add_argument("--force", action="store_true", help="recompute even when the cache is up to date")
    args = parser.parse_args(argv)
    if args.downsample < 1:
        parser.error("--downsample must be a positive integer")
    try:
        prepared = prepare_scene(
            args.scene, args.split, args.downsample, force=args.force, flows_from=args.flows_from,
            masks=args.masks, method=args.method, video=not args.no_video, format=args.format,
        )
    except (SceneFormatError, ValueError) as err:
        print(f"npg-prep: error: {err}", file=sys.stderr)
        return 2
    m = prepared.manifest
    state = "up to date, nothing to do" if prepared.skipped else f"done in {m.get('seconds', 0):.1f} s"
    print(f"npg-prep: {args.scene} split '{args.split}' at {m['size'][0]}x{m['size'][1]}: {state}")
    print(f"  cache:  {prepared.cache_dir}")
    print(f"  frames: {len(m['frames'])}, flows: {len(prepared.flow_files)} ({m['params']['flow']}), "
          f"median speed {m.get('flow_median_speed_px', 0):.2f} px")
    if prepared.video is not None:
        print(f"  video:  {prepared.video}")
    if prepared.has_masks:
        print(f"  masks:  {len(prepared.mask_files)} written to {prepared.cache_dir / 'masks'}")
    else:
        print(f"  masks:  none. {NO_MASKS_HELP}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
