"""Skinned, animated glTF 2.0 assets: parsed with pygltflib, evaluated with numpy.

``load_gltf(path)`` reads a ``.gltf`` (external or data-URI buffers) or ``.glb`` file into a
:class:`GltfAsset`: every mesh primitive of the default scene, instanced once per node that references
it, is merged into one triangle soup (``asset.mesh``, a :class:`npg.data.meshrender.TriangleMesh`)
whose vertex order is fixed, so vertex ``v`` of one pose is the same surface point at every time.
``asset.pose(animation, t_seconds)`` returns the world-space positions ``[V, 3]`` of that soup;
``asset.evaluate`` also returns normals.

What is evaluated (glTF 2.0 specification, "Animations" and "Skins"):

- Node hierarchy: local transform = ``matrix`` or T·R·S; world = parent world · local.
- Animation channels on ``translation``, ``rotation``, ``scale`` and ``weights`` (morph targets),
  with ``STEP``, ``LINEAR`` and ``CUBICSPLINE`` samplers. LINEAR rotations use spherical linear
  interpolation along the shorter arc (falling back to normalised lerp when the two keys are within
  ~1.8° of each other, where slerp is numerically ill-conditioned and the two agree to 1e-7).
  CUBICSPLINE evaluates the Hermite spline of the specification (in-tangent, value, out-tangent per
  key, tangents scaled by the key interval); rotations are normalised afterwards. Before the first
  key a channel holds the first value, after the last key the last value.
- Morph targets: ``POSITION``/``NORMAL`` displacements weighted by the animated (or the mesh's
  default) weights, applied before skinning. pygltflib 1.16 drops ``node.weights``; mesh weights are
  the default then.
- Linear blend skinning: joint matrix ``J_j = world(joint_j) · inverseBind_j``; a vertex moves by
  ``Σ_k w_k · J_{joint_k}`` over all ``JOINTS_n``/``WEIGHTS_n`` sets (weights renormalised to sum to
  one; a vertex with no weight follows the mesh node). As the specification requires, the mesh node's
  own transform is ignored for a skinned mesh. Normals are transformed by the cofactor
  (inverse-transpose direction) of the blended 3×3 and renormalised.
- Meshes that are not skinned move with their (possibly animated) node; instances whose rest world
  transform has a negative determinant get their winding reversed.
- Materials: ``baseColorFactor`` (linear) times ``baseColorTexture`` (decoded with imageio, converted
  from sRGB to linear), sampler wrap modes, ``doubleSided``. Primitives without ``NORMAL`` are flat
  shaded, as the specification requires. Not supported (ignored): alpha modes other than OPAQUE (drawn
  opaque), textures other than base colour, KHR_* material extensions, ``TEXCOORD_1``; primitives that
  are points or lines are skipped with a warning. Files that *require* an extension other than
  KHR_mesh_quantization or KHR_materials_* (e.g. Draco, meshopt, KHR_texture_transform) are refused
  with a clear error.
"""
from __future__ import annotations

import base64
import io
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence
from urllib.parse import unquote

import numpy as np

from npg.data.meshrender import Material, TriangleMesh

__all__ = ["GltfError", "GltfAsset", "Animation", "Sampler", "Pose", "load_gltf", "srgb_to_linear"]

_COMPONENT_DTYPES = {
    5120: np.int8,
    5121: np.uint8,
    5122: np.int16,
    5123: np.uint16,
    5125: np.uint32,
    5126: np.float32,
}
_TYPE_WIDTHS = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4, "MAT2": 4, "MAT3": 9, "MAT4": 16}
_WRAP_MODES = {33071: "clamp", 33648: "mirror", 10497: "repeat"}
_SUPPORTED_REQUIRED_EXTENSIONS = {"KHR_mesh_quantization"}  # and KHR_materials_* (colour is still right)
_TRIANGLES, _TRIANGLE_STRIP, _TRIANGLE_FAN = 4, 5, 6


class GltfError(ValueError):
    """A glTF file that cannot be read or is outside what this reader supports."""


def srgb_to_linear(c: np.ndarray) -> np.ndarray:
    """The sRGB electro-optical transfer function, elementwise on values in [0, 1] (keeps float32)."""
    c = np.asarray(c)
    if c.dtype != np.float32:
        c = c.astype(np.float64)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


# ------------------------------------------------------------------------------------------- maths
def quat_to_matrix(q: np.ndarray) -> np.ndarray:
    """Unit quaternion(s) ``[..., 4]`` in glTF order (x, y, z, w) → rotation matrices ``[..., 3, 3]``."""
    q = np.asarray(q, dtype=np.float64)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    x, y, z, w = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        -2,
    )


def trs_matrix(translation, rotation, scale) -> np.ndarray:
    """4×4 matrix T·R·S from translation [3], rotation quaternion (x, y, z, w) [4] and scale [3]."""
    m = np.eye(4)
    m[:3, :3] = quat_to_matrix(rotation) * np.asarray(scale, dtype=np.float64)[None, :]
    m[:3, 3] = translation
    return m


def slerp(q0: np.ndarray, q1: np.ndarray, s: float) -> np.ndarray:
    """Spherical linear interpolation of unit quaternions along the shorter arc; returns a unit quaternion."""
    q0 = np.asarray(q0, dtype=np.float64)
    q1 = np.asarray(q1, dtype=np.float64)
    dot = float(np.dot(q0, q1))
    if dot < 0.0:  # q and −q are the same rotation: take the shorter way round
        q1, dot = -q1, -dot
    if dot > 0.9995:
        q = (1.0 - s) * q0 + s * q1
    else:
        theta = math.acos(min(dot, 1.0))
        q = (math.sin((1.0 - s) * theta) * q0 + math.sin(s * theta) * q1) / math.sin(theta)
    return q / np.linalg.norm(q)


def _cofactor3(m: np.ndarray) -> np.ndarray:
    """Cofactor matrices of ``[..., 3, 3]`` (= det·inverse-transpose, defined even when singular)."""
    c0, c1, c2 = m[..., :, 0], m[..., :, 1], m[..., :, 2]
    return np.stack([np.cross(c1, c2), np.cross(c2, c0), np.cross(c0, c1)], axis=-1)


def _normalise_rows(v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.where(norm > 0, norm, 1.0)


# ------------------------------------------------------------------------------------- animation
@dataclass
class Sampler:
    """One animation sampler: key ``times [K]`` and ``values [K, C]`` (``[K, 3, C]`` for CUBICSPLINE:
    in-tangent, value, out-tangent), evaluated by :meth:`evaluate`."""

    times: np.ndarray
    values: np.ndarray
    interpolation: str = "LINEAR"
    is_rotation: bool = False

    def __post_init__(self):
        self.times = np.asarray(self.times, dtype=np.float64).reshape(-1)
        self.values = np.asarray(self.values, dtype=np.float64)
        if self.interpolation not in ("LINEAR", "STEP", "CUBICSPLINE"):
            raise GltfError(f"unknown animation interpolation {self.interpolation!r}")
        if len(self.times) == 0:
            raise GltfError("animation sampler has no keys")
        if not np.all(np.isfinite(self.times)) or np.any(np.diff(self.times) < 0):
            raise GltfError("animation sampler key times must be finite and non-decreasing")
        expected = (len(self.times), 3) if self.interpolation == "CUBICSPLINE" else (len(self.times),)
        if self.values.shape[: len(expected)] != expected or self.values.ndim != len(expected) + 1:
            raise GltfError(
                f"animation sampler values have shape {self.values.shape}, expected {expected + ('C',)}"
            )

    def evaluate(self, t: float) -> np.ndarray:
        """The channel value ``[C]`` at time ``t`` (seconds)."""
        times = self.times
        keys = self.values[:, 1] if self.interpolation == "CUBICSPLINE" else self.values
        if len(times) == 1 or t <= times[0]:
            return self._finish(keys[0])
        if t >= times[-1]:
            return self._finish(keys[-1])
        k = int(np.searchsorted(times, t, side="right")) - 1  # times[k] <= t < times[k+1]
        dt = times[k + 1] - times[k]
        s = (t - times[k]) / dt if dt > 0 else 0.0
        if self.interpolation == "STEP":
            return self._finish(keys[k])
        if self.interpolation == "LINEAR":
            if self.is_rotation:
                return slerp(keys[k], keys[k + 1], s)
            return (1.0 - s) * keys[k] + s * keys[k + 1]
        # CUBICSPLINE: Hermite basis with tangents b_k (out of key k) and a_{k+1} (into key k+1)
        s2, s3 = s * s, s * s * s
        out_tangent = self.values[k, 2]
        in_tangent = self.values[k + 1, 0]
        value = (
            (2 * s3 - 3 * s2 + 1) * keys[k]
            + (s3 - 2 * s2 + s) * dt * out_tangent
            + (-2 * s3 + 3 * s2) * keys[k + 1]
            + (s3 - s2) * dt * in_tangent
        )
        return self._finish(value)

    def _finish(self, value: np.ndarray) -> np.ndarray:
        value = np.array(value, dtype=np.float64)
        if self.is_rotation:
            value = value / np.linalg.norm(value)
        return value


@dataclass
class Channel:
    node: int
    path: str  # "translation" | "rotation" | "scale" | "weights"
    sampler: Sampler


@dataclass
class Animation:
    """A named animation; ``start``/``end`` span all its channels' key times (seconds)."""

    name: str
    channels: list[Channel]

    @property
    def start(self) -> float:
        return float(min(c.sampler.times[0] for c in self.channels)) if self.channels else 0.0

    @property
    def end(self) -> float:
        return float(max(c.sampler.times[-1] for c in self.channels)) if self.channels else 0.0

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass
class Pose:
    """World-space geometry at one time: ``positions [V, 3]`` and ``normals [V, 3]`` (unit length for
    smooth-shaded vertices, zero for vertices of flat-shaded primitives), both float64."""

    positions: np.ndarray
    normals: np.ndarray


# ---------------------------------------------------------------------------------- the asset
@dataclass
class _Instance:
    """One mesh primitive placed by one node, as a slice of the merged vertex arrays."""

    node: int
    skin: int | None
    start: int
    stop: int
    positions: np.ndarray  # [n, 3] in mesh space
    normals: np.ndarray | None  # [n, 3]
    morph_positions: np.ndarray | None  # [T, n, 3]
    morph_normals: np.ndarray | None  # [T, n, 3]
    joints: np.ndarray | None  # [n, S] int
    weights: np.ndarray | None  # [n, S] float (rows sum to 1, or 0 for unweighted vertices)
    default_morph_weights: np.ndarray | None  # [T]


@dataclass
class _Node:
    name: str
    parent: int | None
    children: list[int]
    matrix: np.ndarray | None  # [4, 4] when given as a matrix (then not animatable)
    translation: np.ndarray
    rotation: np.ndarray
    scale: np.ndarray
    morph_weights: np.ndarray | None


@dataclass
class _Skin:
    joints: np.ndarray  # [J] node indices
    inverse_bind: np.ndarray  # [J, 4, 4]


@dataclass
class GltfAsset:
    """A loaded asset: the merged triangle mesh, its node hierarchy, skins and animations."""

    path: Path | None
    mesh: TriangleMesh
    nodes: list[_Node]
    skins: list[_Skin]
    animations: list[Animation]
    instances: list[_Instance] = field(repr=False)
    node_order: np.ndarray = field(repr=False)  # parents before children

    # ------------------------------------------------------------------------ summary
    @property
    def vertex_count(self) -> int:
        return self.mesh.vertex_count

    @property
    def face_count(self) -> int:
        return self.mesh.face_count

    @property
    def joint_count(self) -> int:
        """Joints over all skins, each node counted once."""
        if not self.skins:
            return 0
        return int(np.unique(np.concatenate([s.joints for s in self.skins])).size)

    @property
    def animation_names(self) -> list[str]:
        return [a.name for a in self.animations]

    def animation(self, which: str | int | Animation | None) -> Animation | None:
        """An animation by name or index (``None`` → no animation: the rest pose)."""
        if which is None or isinstance(which, Animation):
            return which
        if isinstance(which, (int, np.integer)):
            if not 0 <= which < len(self.animations):
                raise KeyError(f"animation index {which} out of range: the asset has {len(self.animations)}")
            return self.animations[which]
        for animation in self.animations:
            if animation.name == which:
                return animation
        raise KeyError(f"no animation named {which!r} in {self.path}; it has {self.animation_names}")

    # ------------------------------------------------------------------------ evaluation
    def node_state(self, animation=None, t: float = 0.0):
        """World matrices of all nodes ``[N, 4, 4]`` and per-node morph weights at time ``t`` seconds."""
        animation = self.animation(animation)
        if not math.isfinite(t):
            raise ValueError(f"pose time must be finite, got {t}")
        translation = {i: n.translation for i, n in enumerate(self.nodes)}
        rotation = {i: n.rotation for i, n in enumerate(self.nodes)}
        scale = {i: n.scale for i, n in enumerate(self.nodes)}
        morph = {i: n.morph_weights for i, n in enumerate(self.nodes)}
        animated = set()
        if animation is not None:
            for channel in animation.channels:
                value = channel.sampler.evaluate(t)
                {"translation": translation, "rotation": rotation, "scale": scale, "weights": morph}[
                    channel.path
                ][channel.node] = value
                animated.add(channel.node)
        world = np.empty((len(self.nodes), 4, 4))
        for i in self.node_order:
            node = self.nodes[i]
            if node.matrix is not None and i not in animated:
                local = node.matrix
            else:
                local = trs_matrix(translation[i], rotation[i], scale[i])
            world[i] = local if node.parent is None else world[node.parent] @ local
        return world, morph

    def evaluate(self, animation=None, t: float = 0.0) -> Pose:
        """World-space positions and normals of every vertex at time ``t`` (seconds) of ``animation``."""
        world, morph = self.node_state(animation, t)
        positions = np.empty((self.vertex_count, 3))
        normals = np.zeros((self.vertex_count, 3))
        for inst in self.instances:
            p = inst.positions
            n = inst.normals
            weights = morph.get(inst.node)
            if weights is None:
                weights = inst.default_morph_weights
            if inst.morph_positions is not None and weights is not None:
                w = np.asarray(weights, dtype=np.float64).reshape(-1)
                if w.size != len(inst.morph_positions):
                    raise GltfError(
                        f"node {inst.node} has {w.size} morph weights but its mesh {len(inst.morph_positions)} targets"
                    )
                p = p + np.tensordot(w, inst.morph_positions, axes=1)
                if n is not None and inst.morph_normals is not None:
                    n = n + np.tensordot(w, inst.morph_normals, axes=1)
            if inst.skin is None:
                m = np.broadcast_to(world[inst.node], (len(p), 4, 4))
            else:
                skin = self.skins[inst.skin]
                joint_matrices = world[skin.joints] @ skin.inverse_bind  # [J, 4, 4]
                m = np.einsum("vk,vkij->vij", inst.weights, joint_matrices[inst.joints])
                unweighted = inst.weights.sum(axis=1) == 0
                if unweighted.any():
                    m = m.copy()
                    m[unweighted] = world[inst.node]
            positions[inst.start : inst.stop] = np.einsum("vij,vj->vi", m[:, :3, :3], p) + m[:, :3, 3]
            if n is not None:
                linear = m[:, :3, :3]
                cof = _cofactor3(linear) * np.sign(np.linalg.det(linear))[:, None, None]
                normals[inst.start : inst.stop] = _normalise_rows(np.einsum("vij,vj->vi", cof, n))
        return Pose(positions, normals)

    def pose(self, animation=None, t: float = 0.0) -> np.ndarray:
        """World-space vertex positions ``[V, 3]`` (float64) at time ``t`` seconds of ``animation``."""
        return self.evaluate(animation, t).positions

    def bounds(self, animation=None, samples: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned box ``(lo [3], hi [3])`` holding every vertex over ``samples`` evenly spaced times."""
        animation = self.animation(animation)
        times = [0.0] if animation is None else np.linspace(animation.start, animation.end, samples)
        lo, hi = np.full(3, np.inf), np.full(3, -np.inf)
        for t in times:
            p = self.pose(animation, float(t))
            lo, hi = np.minimum(lo, p.min(0)), np.maximum(hi, p.max(0))
        return lo, hi


# ------------------------------------------------------------------------------------- reading
class _Reader:
    """Accessor, buffer and image decoding for one pygltflib document."""

    def __init__(self, gltf, base_dir: Path | None, name: str):
        self.gltf = gltf
        self.base_dir = base_dir
        self.name = name
        self._buffers: dict[int, bytes] = {}

    def buffer(self, index: int) -> bytes:
        if index not in self._buffers:
            buf = self.gltf.buffers[index]
            if buf.uri is None:
                blob = self.gltf.binary_blob()
                if blob is None:
                    raise GltfError(f"{self.name}: buffer {index} has no uri and the file has no binary chunk")
                data = bytes(blob)
            else:
                data = self._uri_bytes(buf.uri, f"buffer {index}")
            if buf.byteLength is not None and len(data) < buf.byteLength:
                raise GltfError(
                    f"{self.name}: buffer {index} holds {len(data)} bytes, its byteLength says {buf.byteLength} "
                    "(truncated file?)"
                )
            self._buffers[index] = data
        return self._buffers[index]

    def _uri_bytes(self, uri: str, what: str) -> bytes:
        if uri.startswith("data:"):
            header, _, payload = uri.partition(",")
            if not header.endswith(";base64"):
                raise GltfError(f"{self.name}: {what} has a data URI that is not base64")
            return base64.b64decode(payload)
        if self.base_dir is None:
            raise GltfError(f"{self.name}: {what} refers to external file {uri!r} but no folder is known")
        path = self.base_dir / unquote(uri)
        if not path.is_file():
            raise GltfError(f"{self.name}: {what} refers to {path}, which does not exist")
        return path.read_bytes()

    def buffer_view_bytes(self, index: int) -> tuple[bytes, int, int | None]:
        view = self.gltf.bufferViews[index]
        data = self.buffer(view.buffer)
        start = view.byteOffset or 0
        end = start + view.byteLength
        if end > len(data):
            raise GltfError(f"{self.name}: bufferView {index} runs past the end of buffer {view.buffer}")
        return data, start, view.byteStride

    def accessor(self, index: int) -> np.ndarray:
        """Decode accessor ``index`` to a float64 (or integer, for index/joint data) array ``[count, width]``."""
        if index is None or not 0 <= index < len(self.gltf.accessors):
            raise GltfError(f"{self.name}: accessor {index} does not exist")
        acc = self.gltf.accessors[index]
        dtype = _COMPONENT_DTYPES.get(acc.componentType)
        width = _TYPE_WIDTHS.get(acc.type)
        if dtype is None or width is None:
            raise GltfError(f"{self.name}: accessor {index} has unknown type {acc.type}/{acc.componentType}")
        dtype = np.dtype(dtype).newbyteorder("<")
        count = acc.count
        if acc.bufferView is None:
            out = np.zeros((count, width), dtype=dtype)
        else:
            data, start, stride = self.buffer_view_bytes(acc.bufferView)
            start += acc.byteOffset or 0
            columns, rows = self._matrix_layout(acc.type, dtype.itemsize, width)
            element = columns * rows * dtype.itemsize
            stride = stride or element
            needed = start + (count - 1) * stride + element if count else start
            if needed > len(data):
                raise GltfError(f"{self.name}: accessor {index} runs past the end of its buffer")
            raw = np.ndarray(
                shape=(count, element // dtype.itemsize), dtype=dtype, buffer=data, offset=start, strides=(stride, dtype.itemsize)
            )
            if columns * rows != width:  # byte/short matrices pad each column to 4 bytes
                raw = raw.reshape(count, columns, rows)[:, :, : int(round(width ** 0.5))].reshape(count, width)
            out = np.array(raw)
        if acc.sparse is not None:
            out = np.array(out)
            sp = acc.sparse
            idx_dtype = np.dtype(_COMPONENT_DTYPES[sp.indices.componentType]).newbyteorder("<")
            data, start, _ = self.buffer_view_bytes(sp.indices.bufferView)
            idx = np.frombuffer(data, idx_dtype, sp.count, start + (sp.indices.byteOffset or 0))
            data, start, _ = self.buffer_view_bytes(sp.values.bufferView)
            vals = np.frombuffer(data, dtype, sp.count * width, start + (sp.values.byteOffset or 0))
            if idx.size and idx.max() >= count:
                raise GltfError(f"{self.name}: sparse accessor {index} indexes past its count")
            out[idx.astype(np.int64)] = vals.reshape(sp.count, width)
        if acc.normalized and dtype.kind in "iu":
            info = np.iinfo(dtype)
            out = out.astype(np.float64) / info.max
            if dtype.kind == "i":
                out = np.maximum(out, -1.0)
        elif dtype.kind == "f":
            out = out.astype(np.float64)
        return out

    @staticmethod
    def _matrix_layout(type_: str, itemsize: int, width: int) -> tuple[int, int]:
        """(columns, padded rows) of one element; column padding to 4 bytes applies to MAT2/MAT3 of bytes/shorts."""
        if type_ in ("MAT2", "MAT3"):
            n = 2 if type_ == "MAT2" else 3
            rows = n
            while rows * itemsize % 4:
                rows += 1
            return n, rows
        return 1, width

    def image(self, index: int) -> np.ndarray:
        """Decode image ``index`` to float32 RGBA ``[H, W, 4]`` in [0, 1] (sRGB-encoded values)."""
        import imageio.v3 as iio

        img = self.gltf.images[index]
        if img.bufferView is not None:
            data, start, _ = self.buffer_view_bytes(img.bufferView)
            view = self.gltf.bufferViews[img.bufferView]
            raw = data[start : start + view.byteLength]
        elif img.uri is not None:
            raw = self._uri_bytes(img.uri, f"image {index}")
        else:
            raise GltfError(f"{self.name}: image {index} has neither a bufferView nor a uri")
        try:
            pixels = np.asarray(iio.imread(io.BytesIO(raw)))
        except Exception as err:  # imageio raises plugin-specific errors for undecodable data
            raise GltfError(f"{self.name}: image {index} ({img.mimeType or img.uri}) cannot be decoded: {err}") from err
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        scale = float(np.iinfo(pixels.dtype).max) if pixels.dtype.kind in "iu" else 1.0
        pixels = pixels.astype(np.float32) / np.float32(scale)
        channels = pixels.shape[2]
        if channels in (1, 2):
            rgb = np.repeat(pixels[:, :, :1], 3, axis=2)
            alpha = pixels[:, :, 1:2] if channels == 2 else np.ones_like(pixels[:, :, :1])
        else:
            rgb = pixels[:, :, :3]
            alpha = pixels[:, :, 3:4] if channels == 4 else np.ones_like(pixels[:, :, :1])
        return np.concatenate([rgb, alpha], axis=2)


def _triangles(mode: int, indices: np.ndarray) -> np.ndarray:
    if mode == _TRIANGLES:
        if len(indices) % 3:
            raise GltfError(f"a TRIANGLES primitive has {len(indices)} indices, not a multiple of 3")
        return indices.reshape(-1, 3)
    n = len(indices) - 2
    if n <= 0:
        return np.zeros((0, 3), dtype=np.int64)
    i = np.arange(n)
    if mode == _TRIANGLE_STRIP:  # every other triangle reversed to keep the winding consistent
        even = i % 2 == 0
        a = np.where(even, indices[i], indices[i + 1])
        b = np.where(even, indices[i + 1], indices[i])
        return np.stack([a, b, indices[i + 2]], axis=1)
    return np.stack([np.full(n, indices[0]), indices[i + 1], indices[i + 2]], axis=1)  # fan


def _material(reader: _Reader, index: int | None, texture_cache: dict) -> Material:
    if index is None:  # the specification's default material
        return Material(name="default", base_color=np.ones(4))
    mat = reader.gltf.materials[index]
    pbr = mat.pbrMetallicRoughness
    factor = np.asarray(pbr.baseColorFactor if pbr and pbr.baseColorFactor else [1, 1, 1, 1], dtype=np.float64)
    texture, wrap = None, ("repeat", "repeat")
    tex_info = pbr.baseColorTexture if pbr else None
    if tex_info is not None and tex_info.index is not None:
        tex = reader.gltf.textures[tex_info.index]
        if tex.source is None:
            warnings.warn(f"{reader.name}: texture {tex_info.index} has no image source; using the colour factor")
        else:
            if tex.source not in texture_cache:
                srgb = reader.image(tex.source)
                linear = srgb.copy()
                linear[..., :3] = srgb_to_linear(srgb[..., :3])
                texture_cache[tex.source] = linear
            texture = texture_cache[tex.source]
            if tex.sampler is not None:
                s = reader.gltf.samplers[tex.sampler]
                wrap = (_WRAP_MODES.get(s.wrapS or 10497, "repeat"), _WRAP_MODES.get(s.wrapT or 10497, "repeat"))
        if (tex_info.texCoord or 0) != 0:
            warnings.warn(f"{reader.name}: material {mat.name!r} uses TEXCOORD_{tex_info.texCoord}; TEXCOORD_0 is used")
    return Material(
        name=mat.name or f"material_{index}",
        base_color=factor,
        texture=texture,
        wrap=wrap,
        double_sided=bool(mat.doubleSided),
    )


def _attribute_sets(attributes, prefix: str) -> list[int]:
    out, k = [], 0
    while getattr(attributes, f"{prefix}_{k}", None) is not None:
        out.append(getattr(attributes, f"{prefix}_{k}"))
        k += 1
    return out


def load_gltf(path: str | os.PathLike, gltf=None) -> GltfAsset:
    """Read a ``.gltf``/``.glb`` file (or an already parsed ``pygltflib.GLTF2`` with ``path`` its location)."""
    import pygltflib

    path = Path(path)
    name = str(path)
    if gltf is None:
        if not path.is_file():
            raise FileNotFoundError(f"glTF asset not found: {path}")
        try:
            gltf = pygltflib.GLTF2().load(str(path))
        except Exception as err:  # pygltflib raises assorted errors for corrupt JSON/GLB
            raise GltfError(f"{name} is not a readable glTF 2.0 file: {err}") from err
        if gltf is None:
            raise GltfError(f"{name} is not a readable glTF 2.0 file")
    unsupported = set(gltf.extensionsRequired or []) - _SUPPORTED_REQUIRED_EXTENSIONS
    unsupported = {e for e in unsupported if not e.startswith("KHR_materials_")}
    if unsupported:
        raise GltfError(f"{name} requires glTF extensions this reader does not support: {sorted(unsupported)}")
    reader = _Reader(gltf, path.parent, name)

    nodes = _read_nodes(gltf, name)
    node_order = _topological_order(nodes, name)
    scene_nodes = _scene_nodes(gltf, nodes)
    skins = []
    for s_index, skin in enumerate(gltf.skins or []):
        joints = np.asarray(skin.joints, dtype=np.int64)
        if joints.size == 0 or joints.min() < 0 or joints.max() >= len(nodes):
            raise GltfError(f"{name}: skin {s_index} has joints outside the node list")
        if skin.inverseBindMatrices is None:
            ibm = np.broadcast_to(np.eye(4), (len(joints), 4, 4)).copy()
        else:
            ibm = reader.accessor(skin.inverseBindMatrices).reshape(-1, 4, 4).transpose(0, 2, 1)  # column-major
            if len(ibm) != len(joints):
                raise GltfError(f"{name}: skin {s_index} has {len(joints)} joints but {len(ibm)} inverse bind matrices")
        skins.append(_Skin(joints, ibm))

    # rest-pose world transforms decide the winding of mirrored, unskinned instances
    rest_world = np.empty((len(nodes), 4, 4))
    for i in node_order:
        n = nodes[i]
        local = n.matrix if n.matrix is not None else trs_matrix(n.translation, n.rotation, n.scale)
        rest_world[i] = local if n.parent is None else rest_world[n.parent] @ local

    materials: list[Material] = []
    material_slot: dict = {}
    texture_cache: dict = {}
    instances, faces, uvs, face_material, face_smooth = [], [], [], [], []
    offset = 0
    for node_index in scene_nodes:
        gnode = gltf.nodes[node_index]
        if gnode.mesh is None:
            continue
        mesh = gltf.meshes[gnode.mesh]
        skin_index = gnode.skin
        if skin_index is not None and not 0 <= skin_index < len(skins):
            raise GltfError(f"{name}: node {node_index} refers to missing skin {skin_index}")
        for p_index, prim in enumerate(mesh.primitives):
            mode = _TRIANGLES if prim.mode is None else prim.mode
            if mode not in (_TRIANGLES, _TRIANGLE_STRIP, _TRIANGLE_FAN):
                warnings.warn(f"{name}: mesh {gnode.mesh} primitive {p_index} is points/lines (mode {mode}); skipped")
                continue
            attrs = prim.attributes
            if attrs.POSITION is None:
                raise GltfError(f"{name}: mesh {gnode.mesh} primitive {p_index} has no POSITION")
            positions = reader.accessor(attrs.POSITION).astype(np.float64)
            count = len(positions)
            normals = reader.accessor(attrs.NORMAL).astype(np.float64) if attrs.NORMAL is not None else None
            uv = reader.accessor(attrs.TEXCOORD_0).astype(np.float64) if attrs.TEXCOORD_0 is not None else np.zeros((count, 2))
            indices = reader.accessor(prim.indices).reshape(-1).astype(np.int64) if prim.indices is not None else np.arange(count)
            if indices.size and (indices.min() < 0 or indices.max() >= count):
                raise GltfError(f"{name}: mesh {gnode.mesh} primitive {p_index} has indices beyond its {count} vertices")
            tris = _triangles(mode, indices)
            joints = weights = None
            if skin_index is not None:
                joint_sets = _attribute_sets(attrs, "JOINTS")
                weight_sets = _attribute_sets(attrs, "WEIGHTS")
                if not joint_sets or len(joint_sets) != len(weight_sets):
                    raise GltfError(f"{name}: skinned mesh {gnode.mesh} primitive {p_index} lacks matching JOINTS_n/WEIGHTS_n")
                joints = np.concatenate([reader.accessor(a) for a in joint_sets], axis=1).astype(np.int64)
                weights = np.concatenate([reader.accessor(a) for a in weight_sets], axis=1).astype(np.float64)
                n_joints = len(skins[skin_index].joints)
                if joints.max(initial=0) >= n_joints:
                    raise GltfError(f"{name}: mesh {gnode.mesh} uses joint {joints.max()} but skin {skin_index} has {n_joints}")
                total = weights.sum(axis=1, keepdims=True)
                weights = np.where(total > 0, weights / np.where(total > 0, total, 1.0), 0.0)
            morph_p = morph_n = None
            if prim.targets:
                morph_p = np.stack(
                    [reader.accessor(t["POSITION"]) if t.get("POSITION") is not None else np.zeros((count, 3)) for t in prim.targets]
                )
                if normals is not None:
                    morph_n = np.stack(
                        [reader.accessor(t["NORMAL"]) if t.get("NORMAL") is not None else np.zeros((count, 3)) for t in prim.targets]
                    )
            default_weights = None
            node_weights = getattr(gnode, "weights", None)
            if node_weights is not None:
                default_weights = np.asarray(node_weights, dtype=np.float64)
            elif mesh.weights is not None:
                default_weights = np.asarray(mesh.weights, dtype=np.float64)
            if skin_index is None and np.linalg.det(rest_world[node_index][:3, :3]) < 0:
                tris = tris[:, ::-1]
            key = prim.material
            if key not in material_slot:
                material_slot[key] = len(materials)
                materials.append(_material(reader, key, texture_cache))
            instances.append(
                _Instance(
                    node=node_index,
                    skin=skin_index,
                    start=offset,
                    stop=offset + count,
                    positions=positions,
                    normals=normals,
                    morph_positions=morph_p,
                    morph_normals=morph_n,
                    joints=joints,
                    weights=weights,
                    default_morph_weights=default_weights,
                )
            )
            faces.append(tris + offset)
            uvs.append(uv)
            face_material.append(np.full(len(tris), material_slot[key], dtype=np.int32))
            face_smooth.append(np.full(len(tris), normals is not None))
            offset += count
    if not instances:
        raise GltfError(f"{name} has no triangle meshes in its scene")
    mesh = TriangleMesh(
        faces=np.concatenate(faces).astype(np.int64),
        uvs=np.concatenate(uvs),
        face_material=np.concatenate(face_material),
        face_smooth=np.concatenate(face_smooth),
        materials=materials,
    )
    animations = _read_animations(gltf, reader, nodes, name)
    return GltfAsset(path, mesh, nodes, skins, animations, instances, node_order)


def _read_nodes(gltf, name: str) -> list[_Node]:
    nodes = []
    for i, n in enumerate(gltf.nodes or []):
        matrix = None
        if n.matrix is not None:
            matrix = np.asarray(n.matrix, dtype=np.float64).reshape(4, 4).T  # column-major in the file
        nodes.append(
            _Node(
                name=n.name or f"node_{i}",
                parent=None,
                children=list(n.children or []),
                matrix=matrix,
                translation=np.asarray(n.translation if n.translation is not None else [0, 0, 0], dtype=np.float64),
                rotation=np.asarray(n.rotation if n.rotation is not None else [0, 0, 0, 1], dtype=np.float64),
                scale=np.asarray(n.scale if n.scale is not None else [1, 1, 1], dtype=np.float64),
                morph_weights=None,
            )
        )
    for i, node in enumerate(nodes):
        for c in node.children:
            if not 0 <= c < len(nodes):
                raise GltfError(f"{name}: node {i} has missing child {c}")
            if nodes[c].parent is not None:
                raise GltfError(f"{name}: node {c} has two parents ({nodes[c].parent} and {i})")
            nodes[c].parent = i
    return nodes


def _topological_order(nodes: list[_Node], name: str) -> np.ndarray:
    order, seen = [], set()
    for root in (i for i, n in enumerate(nodes) if n.parent is None):
        stack = [root]
        while stack:
            i = stack.pop()
            order.append(i)
            seen.add(i)
            stack.extend(reversed(nodes[i].children))
    if len(order) != len(nodes):
        raise GltfError(f"{name}: the node hierarchy has a cycle")
    return np.asarray(order, dtype=np.int64)


def _scene_nodes(gltf, nodes: list[_Node]) -> list[int]:
    """Nodes of the default scene (all root nodes when the file has no scene), parents first."""
    if gltf.scenes:
        scene = gltf.scenes[gltf.scene if gltf.scene is not None else 0]
        roots = list(scene.nodes or [])
    else:
        roots = [i for i, n in enumerate(nodes) if n.parent is None]
    out, stack = [], list(reversed(roots))
    while stack:
        i = stack.pop()
        out.append(i)
        stack.extend(reversed(nodes[i].children))
    return out


def _read_animations(gltf, reader: _Reader, nodes: Sequence[_Node], name: str) -> list[Animation]:
    animations = []
    for a_index, anim in enumerate(gltf.animations or []):
        channels = []
        for channel in anim.channels:
            target = channel.target
            if target.node is None:
                continue  # targets only an extension (e.g. KHR_animation_pointer)
            if not 0 <= target.node < len(nodes):
                raise GltfError(f"{name}: animation {a_index} targets missing node {target.node}")
            if target.path not in ("translation", "rotation", "scale", "weights"):
                raise GltfError(f"{name}: animation {a_index} has unknown target path {target.path!r}")
            s = anim.samplers[channel.sampler]
            interpolation = s.interpolation or "LINEAR"
            times = reader.accessor(s.input).reshape(-1)
            values = reader.accessor(s.output)
            per_key = 3 if interpolation == "CUBICSPLINE" else 1
            total = values.size
            if total % (len(times) * per_key):
                raise GltfError(
                    f"{name}: animation {a_index} sampler {channel.sampler} has {total} output values for {len(times)} keys"
                )
            width = total // (len(times) * per_key)
            shape = (len(times), 3, width) if per_key == 3 else (len(times), width)
            sampler = Sampler(times, values.reshape(shape), interpolation, is_rotation=target.path == "rotation")
            channels.append(Channel(target.node, target.path, sampler))
        animations.append(Animation(anim.name or f"animation_{a_index}", channels))
    return animations
