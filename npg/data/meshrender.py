"""A small CPU triangle-mesh renderer for ground-truth scenes (independent of the Gaussian rasterizer).

Pipeline of :func:`render`:

1. **Rasterise** (:func:`rasterize`) every triangle at ``supersample``× the output resolution with
   a z-buffer. Pixel (x, y) is sampled at the integer coordinates (x, y) — the convention of
   ``npg.camera`` — and the supersampled grid is ``camera.scaled(s)``, so output pixel (x, y) covers
   the s×s samples ``(s·x .. s·x+s−1, s·y .. s·y+s−1)``. Coverage uses edge functions with
   coefficients that are exact negations across a shared edge, and an inclusive test, so meshes
   are watertight (a sample on a shared edge is claimed by both triangles and the z-test decides).
   The nearest fragment wins; exact depth ties go to the larger face index, so renders are
   deterministic. Barycentrics are perspective-correct, depth is camera-space z. Triangles with a
   vertex closer than ``znear`` are dropped (scenes keep the camera well outside the object).
   Faces of single-sided materials are back-face culled (glTF ``doubleSided: false``).
   The work is vectorised with numpy: triangles are grouped by bounding-box size (padded to powers
   of two per side) and each group is tested as one broadcast grid, in chunks of about a million
   candidate samples.
2. **Shade** each visible sample in linear RGB: albedo = material ``base_color`` × bilinear,
   wrapped ``texture`` lookup at the perspective-correct UV; Lambert + ambient with a directional
   light fixed in the world (``ambient + (1 − ambient)·max(0, n·l)``), so the appearance does not
   depend on the viewpoint. Normals are interpolated vertex normals on smooth faces and the
   geometric face normal on flat ones; the back side of a double-sided face is lit with the flipped
   normal.
3. **Resolve**: average the s×s samples of each output pixel: alpha = covered fraction, colour =
   mean linear colour of the covered samples (straight alpha), then sRGB-encode and round to 8 bits.

:class:`RenderOutput` also carries per-pixel ground truth at the output pixel centres — triangle id,
perspective-correct barycentrics and depth — taken from the centre sample when ``supersample`` is
odd (the centre of output pixel x is sample s·x + s//2) or from an extra 1× rasterisation when it is
even. The 3D surface point seen at a pixel is ``Σ_k bary_k · vertices[faces[face_id, k]]`` (see
:func:`surface_points`), which is how ground-truth flow follows the surface from one frame to the next.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "Material",
    "TriangleMesh",
    "Fragments",
    "RenderOutput",
    "rasterize",
    "render",
    "sample_texture",
    "surface_points",
    "linear_to_srgb",
    "DEFAULT_LIGHT_DIRECTION",
]

#: Direction *towards* the light in world space (z up): from above, slightly to the side.
DEFAULT_LIGHT_DIRECTION = (0.35, -0.45, 0.82)


@dataclass
class Material:
    """Base colour of a surface: ``base_color [4]`` linear RGBA factor times an optional linear-RGB
    ``texture [H, W, 4]`` (float, row 0 = v 0 as in glTF), with ``wrap`` modes (u, v) in
    {"repeat", "clamp", "mirror"}; ``double_sided`` faces are not back-face culled."""

    name: str
    base_color: np.ndarray
    texture: np.ndarray | None = None
    wrap: tuple[str, str] = ("repeat", "repeat")
    double_sided: bool = False

    def __post_init__(self):
        self.base_color = np.asarray(self.base_color, dtype=np.float64).reshape(-1)
        if self.base_color.shape != (4,) or not np.all(np.isfinite(self.base_color)):
            raise ValueError(f"material {self.name!r}: base_color must be 4 finite numbers")
        if self.texture is not None:
            tex = np.asarray(self.texture)
            if tex.ndim != 3 or tex.shape[2] != 4 or tex.shape[0] < 1 or tex.shape[1] < 1:
                raise ValueError(f"material {self.name!r}: texture must be [H, W, 4], got {tex.shape}")
        for mode in self.wrap:
            if mode not in ("repeat", "clamp", "mirror"):
                raise ValueError(f"material {self.name!r}: unknown wrap mode {mode!r}")


@dataclass
class TriangleMesh:
    """Static topology and appearance of a triangle soup; positions are supplied per render.

    ``faces [F, 3]`` vertex indices, ``uvs [V, 2]``, ``face_material [F]`` indices into
    ``materials``, ``face_smooth [F]``: True where vertex normals are interpolated, False for flat
    shading."""

    faces: np.ndarray
    uvs: np.ndarray
    face_material: np.ndarray
    face_smooth: np.ndarray
    materials: list[Material] = field(default_factory=list)

    def __post_init__(self):
        self.faces = np.asarray(self.faces, dtype=np.int64)
        self.uvs = np.asarray(self.uvs, dtype=np.float64)
        self.face_material = np.asarray(self.face_material, dtype=np.int64)
        self.face_smooth = np.asarray(self.face_smooth, dtype=bool)
        F = len(self.faces)
        if self.faces.ndim != 2 or self.faces.shape[1] != 3:
            raise ValueError(f"faces must be [F, 3], got {self.faces.shape}")
        if self.uvs.ndim != 2 or self.uvs.shape[1] != 2:
            raise ValueError(f"uvs must be [V, 2], got {self.uvs.shape}")
        if F and (self.faces.min() < 0 or self.faces.max() >= len(self.uvs)):
            raise ValueError(f"faces index vertices outside [0, {len(self.uvs)})")
        if self.face_material.shape != (F,) or self.face_smooth.shape != (F,):
            raise ValueError("face_material and face_smooth must have one entry per face")
        if F and (self.face_material.min() < 0 or self.face_material.max() >= len(self.materials)):
            raise ValueError("face_material refers to a missing material")

    @property
    def vertex_count(self) -> int:
        return len(self.uvs)

    @property
    def face_count(self) -> int:
        return len(self.faces)


@dataclass
class Fragments:
    """The visible surface sample of each covered pixel of a ``height``×``width`` grid, in pixel order.

    ``pixel [M]`` flat index y·width + x, ``face [M]``, ``bary [M, 3]`` perspective-correct
    barycentrics, ``depth [M]`` camera-space z (all covered pixels, M ≤ H·W)."""

    pixel: np.ndarray
    face: np.ndarray
    bary: np.ndarray
    depth: np.ndarray
    height: int
    width: int

    def images(self):
        """Dense ``(face_id [H, W] int32 (−1 = background), bary [H, W, 3] float32, depth [H, W] float32 (0 = background))``."""
        n = self.height * self.width
        face_id = np.full(n, -1, dtype=np.int32)
        bary = np.zeros((n, 3), dtype=np.float32)
        depth = np.zeros(n, dtype=np.float32)
        face_id[self.pixel] = self.face
        bary[self.pixel] = self.bary
        depth[self.pixel] = self.depth
        shape = (self.height, self.width)
        return face_id.reshape(shape), bary.reshape(shape + (3,)), depth.reshape(shape)


@dataclass
class RenderOutput:
    """``rgba [H, W, 4] uint8`` (sRGB, straight alpha) and ground truth at pixel centres:
    ``depth [H, W] float32`` (camera z, 0 = background), ``face_id [H, W] int32`` (−1 = background),
    ``bary [H, W, 3] float32`` perspective-correct barycentrics of the visible surface point."""

    rgba: np.ndarray
    depth: np.ndarray
    face_id: np.ndarray
    bary: np.ndarray


# ------------------------------------------------------------------------------------- helpers
def linear_to_srgb(c: np.ndarray) -> np.ndarray:
    """The sRGB encoding of linear values in [0, 1] (clamped)."""
    c = np.clip(np.asarray(c, dtype=np.float64), 0.0, 1.0)
    return np.where(c <= 0.0031308, 12.92 * c, 1.055 * np.power(c, 1.0 / 2.4) - 0.055)


def _wrap(index: np.ndarray, size: int, mode: str) -> np.ndarray:
    if mode == "repeat":
        return np.mod(index, size)
    if mode == "clamp":
        return np.clip(index, 0, size - 1)
    period = np.mod(index, 2 * size)  # mirror
    return np.where(period < size, period, 2 * size - 1 - period)


def sample_texture(texture: np.ndarray, uv: np.ndarray, wrap=("repeat", "repeat")) -> np.ndarray:
    """Bilinear lookup of ``texture [H, W, C]`` at ``uv [M, 2]`` (u right, v down, texel centres at
    ((i + 0.5)/W, (j + 0.5)/H)) → ``[M, C]`` float64."""
    h, w = texture.shape[:2]
    x = uv[:, 0] * w - 0.5
    y = uv[:, 1] * h - 0.5
    x0 = np.floor(x)
    y0 = np.floor(y)
    tx = (x - x0)[:, None]
    ty = (y - y0)[:, None]
    x0 = x0.astype(np.int64)
    y0 = y0.astype(np.int64)
    xa, xb = _wrap(x0, w, wrap[0]), _wrap(x0 + 1, w, wrap[0])
    ya, yb = _wrap(y0, h, wrap[1]), _wrap(y0 + 1, h, wrap[1])
    flat = texture.reshape(h * w, -1)  # gather rows of the flat texture: much faster than 2-D fancy indexing
    ya, yb = ya * w, yb * w
    top = flat[ya + xa] * (1 - tx) + flat[ya + xb] * tx
    bottom = flat[yb + xa] * (1 - tx) + flat[yb + xb] * tx
    return top * (1 - ty) + bottom * ty


def surface_points(faces: np.ndarray, vertices: np.ndarray, face_id: np.ndarray, bary: np.ndarray) -> np.ndarray:
    """The surface point ``Σ_k bary_k · vertices[faces[face_id, k]]`` for each sample: ``face_id [...]``
    (must be ≥ 0), ``bary [..., 3]`` → ``[..., 3]`` float64."""
    tri = vertices[faces[face_id]]  # [..., 3, 3]
    return np.einsum("...k,...kc->...c", bary.astype(np.float64), tri)


def _camera_arrays(camera):
    """(R [3, 3], t [3]) of the camera's world→camera transform as float64 numpy."""
    w2c = camera.w2c
    w2c = w2c.detach().cpu().double().numpy() if hasattr(w2c, "detach") else np.asarray(w2c, dtype=np.float64)
    return w2c[:3, :3], w2c[:3, 3]


# ------------------------------------------------------------------------------------ rasterise
def rasterize(
    points_cam: np.ndarray,
    faces: np.ndarray,
    fx: float,
    fy: float,
    cx: float,
    cy: float,
    width: int,
    height: int,
    *,
    cull_back: np.ndarray | bool = False,
    znear: float = 1e-3,
    chunk: int = 1 << 20,
) -> Fragments:
    """Z-buffered coverage of triangles ``faces [F, 3]`` over camera-space vertices ``points_cam [V, 3]``
    (OpenCV axes: x right, y down, z forward) for a pinhole camera; pixel (x, y) is sampled at integer
    (x, y). ``cull_back`` (bool or ``[F]`` bool) drops faces whose counter-clockwise side looks away
    from the camera. Returns the visible :class:`Fragments`."""
    points_cam = np.asarray(points_cam, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    if points_cam.ndim != 2 or points_cam.shape[1] != 3:
        raise ValueError(f"points_cam must be [V, 3], got {points_cam.shape}")
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"faces must be [F, 3], got {faces.shape}")
    if not np.all(np.isfinite(points_cam)):
        raise ValueError("points_cam holds NaN or Inf")
    if faces.size and (faces.min() < 0 or faces.max() >= len(points_cam)):
        raise ValueError(f"faces index vertices outside [0, {len(points_cam)})")
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    n_pixels = width * height
    zbuf = np.full(n_pixels, np.inf)
    fbuf = np.full(n_pixels, -1, dtype=np.int64)
    bbuf = np.zeros((n_pixels, 3))
    if len(faces):
        _rasterize_into(points_cam, faces, fx, fy, cx, cy, width, height, cull_back, znear, chunk, zbuf, fbuf, bbuf)
    pixel = np.flatnonzero(fbuf >= 0)
    return Fragments(pixel, fbuf[pixel], bbuf[pixel], zbuf[pixel], height, width)


def _rasterize_into(points_cam, faces, fx, fy, cx, cy, width, height, cull_back, znear, chunk, zbuf, fbuf, bbuf):
    z = points_cam[:, 2]
    safe_z = np.where(z > znear, z, 1.0)
    u = fx * points_cam[:, 0] / safe_z + cx
    v = fy * points_cam[:, 1] / safe_z + cy
    zf = z[faces]  # [F, 3]
    keep = np.all(zf > znear, axis=1)
    if np.any(cull_back):
        p0, p1, p2 = (points_cam[faces[:, k]] for k in range(3))
        facing_away = np.einsum("fc,fc->f", np.cross(p1 - p0, p2 - p0), p0) >= 0
        keep &= ~(facing_away & np.broadcast_to(np.asarray(cull_back, dtype=bool), keep.shape))
    x = u[faces]
    y = v[faces]
    # Edge i is opposite vertex i, from vertex j = i+1 to k = i+2: e_i(p) = A·px + B·py + C, which is
    # exactly negated for the same edge traversed the other way (no cracks between triangles).
    j, k = [1, 2, 0], [2, 0, 1]
    A = y[:, j] - y[:, k]
    B = x[:, k] - x[:, j]
    C = x[:, j] * y[:, k] - x[:, k] * y[:, j]
    area2 = A[:, 0] * x[:, 0] + B[:, 0] * y[:, 0] + C[:, 0]
    keep &= np.abs(area2) > 1e-12
    orient = np.where(area2 < 0, -1.0, 1.0)[:, None]
    A, B, C = A * orient, B * orient, C * orient
    area2 = np.abs(area2)
    with np.errstate(invalid="ignore"):
        xmin = np.maximum(np.ceil(x.min(1)), 0)
        xmax = np.minimum(np.floor(x.max(1)), width - 1)
        ymin = np.maximum(np.ceil(y.min(1)), 0)
        ymax = np.minimum(np.floor(y.max(1)), height - 1)
    keep &= (xmin <= xmax) & (ymin <= ymax)
    tri = np.flatnonzero(keep)
    if tri.size == 0:
        return
    # Group triangles by their bounding box padded to powers of two per side: each group is then one
    # broadcast grid [n, gh, gw] (no per-sample gathers); padding samples fail the bbox test below.
    log_w = np.ceil(np.log2(xmax[tri] - xmin[tri] + 1)).astype(np.int64)
    log_h = np.ceil(np.log2(ymax[tri] - ymin[tri] + 1)).astype(np.int64)
    group_key = log_w * 64 + log_h
    order = np.argsort(group_key, kind="stable")
    tri, group_key = tri[order], group_key[order]
    bounds = np.flatnonzero(np.diff(group_key)) + 1
    zmin = np.full(zbuf.shape, np.inf)  # per-chunk scratch, reset after each chunk where touched
    fmax = np.full(fbuf.shape, -1, dtype=np.int64)
    for group in np.split(tri, bounds):
        gw = 1 << int(np.ceil(np.log2(xmax[group[0]] - xmin[group[0]] + 1)))
        gh = 1 << int(np.ceil(np.log2(ymax[group[0]] - ymin[group[0]] + 1)))
        step = max(1, chunk // (gw * gh))
        for begin in range(0, len(group), step):
            sel = group[begin : begin + step]
            xs = xmin[sel][:, None, None] + np.arange(gw, dtype=np.float64)[None, None, :]  # [n, 1, gw]
            ys = ymin[sel][:, None, None] + np.arange(gh, dtype=np.float64)[None, :, None]  # [n, gh, 1]
            e = [A[sel, i][:, None, None] * xs + B[sel, i][:, None, None] * ys + C[sel, i][:, None, None] for i in range(3)]
            inside = (e[0] >= 0) & (e[1] >= 0) & (e[2] >= 0)
            inside &= (xs <= xmax[sel][:, None, None]) & (ys <= ymax[sel][:, None, None])
            owner, yy, xx = np.nonzero(inside)
            face = sel[owner]
            b = np.stack([ei[inside] for ei in e], axis=1) / area2[face][:, None]
            w = b / zf[face]  # perspective correction: 1/z is affine in screen space
            inv_depth = w.sum(1)
            depth = 1.0 / inv_depth
            bary = w / inv_depth[:, None]
            pixel = (ymin[face].astype(np.int64) + yy) * width + xmin[face].astype(np.int64) + xx
            # nearest fragment per pixel within the chunk; ties → larger face index
            np.minimum.at(zmin, pixel, depth)
            nearest = depth == zmin[pixel]
            np.maximum.at(fmax, pixel[nearest], face[nearest])
            win = np.flatnonzero(nearest & (face == fmax[pixel]))
            zmin[pixel] = np.inf
            fmax[pixel] = -1
            pixel, depth, face, bary = pixel[win], depth[win], face[win], bary[win]
            better = (depth < zbuf[pixel]) | ((depth == zbuf[pixel]) & (face > fbuf[pixel]))
            pixel = pixel[better]
            zbuf[pixel] = depth[better]
            fbuf[pixel] = face[better]
            bbuf[pixel] = bary[better]


# ------------------------------------------------------------------------------------- shading
def _face_normals(positions: np.ndarray, faces: np.ndarray) -> np.ndarray:
    p0, p1, p2 = (positions[faces[:, k]] for k in range(3))
    n = np.cross(p1 - p0, p2 - p0)
    norm = np.linalg.norm(n, axis=1, keepdims=True)
    return n / np.where(norm > 0, norm, 1.0)


def _shade(mesh: TriangleMesh, positions, normals, frags: Fragments, campos, light, ambient) -> np.ndarray:
    """Linear RGB ``[M, 3]`` of the fragments."""
    face = frags.face
    bary = frags.bary
    tri = mesh.faces[face]  # [M, 3]
    point = np.einsum("mk,mkc->mc", bary, positions[tri])
    geometric = _face_normals(positions, mesh.faces)[face]
    normal = geometric.copy()
    smooth = mesh.face_smooth[face]
    if normals is not None and smooth.any():
        interp = np.einsum("mk,mkc->mc", bary[smooth], normals[tri[smooth]])
        length = np.linalg.norm(interp, axis=1, keepdims=True)
        ok = length[:, 0] > 1e-12
        interp[ok] /= length[ok]
        interp[~ok] = geometric[smooth][~ok]
        normal[smooth] = interp
    back = np.einsum("mc,mc->m", geometric, campos[None, :] - point) < 0
    normal[back] = -normal[back]
    lambert = np.clip(normal @ light, 0.0, None)[:, None]
    albedo = np.empty((len(face), 3))
    material = mesh.face_material[face]
    uv = np.einsum("mk,mkc->mc", bary, mesh.uvs[tri]) if any(m.texture is not None for m in mesh.materials) else None
    for index in np.unique(material):
        sel = material == index
        mat = mesh.materials[index]
        colour = np.broadcast_to(mat.base_color[:3], (int(sel.sum()), 3))
        if mat.texture is not None:
            colour = colour * sample_texture(mat.texture, uv[sel], mat.wrap)[:, :3]
        albedo[sel] = colour
    return albedo * (ambient + (1.0 - ambient) * lambert)


def render(
    mesh: TriangleMesh,
    positions: np.ndarray,
    camera,
    *,
    normals: np.ndarray | None = None,
    supersample: int = 3,
    light_direction=DEFAULT_LIGHT_DIRECTION,
    ambient: float = 0.35,
    znear: float = 1e-3,
) -> RenderOutput:
    """Render ``mesh`` with world-space vertex ``positions [V, 3]`` (and optional unit ``normals [V, 3]``
    for smooth faces) through ``camera`` (an ``npg.camera.Camera``, OpenCV axes). See the module
    docstring for the method; returns RGBA at the camera's resolution plus per-pixel ground truth."""
    positions = np.asarray(positions, dtype=np.float64)
    if positions.shape != (mesh.vertex_count, 3):
        raise ValueError(f"positions must be [{mesh.vertex_count}, 3], got {positions.shape}")
    if not np.all(np.isfinite(positions)):
        raise ValueError("positions hold NaN or Inf")
    if normals is not None:
        normals = np.asarray(normals, dtype=np.float64)
        if normals.shape != positions.shape:
            raise ValueError(f"normals must be {positions.shape}, got {normals.shape}")
    s = int(supersample)
    if s < 1 or s != supersample:
        raise ValueError(f"supersample must be a positive integer, got {supersample}")
    if not 0.0 <= ambient <= 1.0:
        raise ValueError(f"ambient must be in [0, 1], got {ambient}")
    light = np.asarray(light_direction, dtype=np.float64)
    light = light / np.linalg.norm(light)
    R, t = _camera_arrays(camera)
    points_cam = positions @ R.T + t
    campos = -R.T @ t
    cull = np.array([not m.double_sided for m in mesh.materials], dtype=bool)[mesh.face_material]
    H, W = camera.height, camera.width
    fine = camera.scaled(s) if s > 1 else camera
    frags = rasterize(
        points_cam, mesh.faces, fine.fx, fine.fy, fine.cx, fine.cy, W * s, H * s, cull_back=cull, znear=znear
    )
    colour = _shade(mesh, positions, normals, frags, campos, light, ambient)

    # resolve s×s samples per pixel: coverage → alpha, mean colour of covered samples (straight alpha)
    sx = frags.pixel % (W * s)
    sy = frags.pixel // (W * s)
    target = (sy // s) * W + sx // s
    count = np.bincount(target, minlength=H * W).astype(np.float64)
    rgb_sum = np.stack([np.bincount(target, weights=colour[:, c], minlength=H * W) for c in range(3)], axis=1)
    alpha = (count / (s * s)).reshape(H, W)
    straight = (rgb_sum / np.maximum(count, 1.0)[:, None]).reshape(H, W, 3)
    rgba = np.concatenate([linear_to_srgb(straight), alpha[..., None]], axis=-1)
    rgba = np.round(rgba * 255.0).astype(np.uint8)

    if s % 2 == 1:
        centre = (sx % s == s // 2) & (sy % s == s // 2)
        centre_frags = Fragments(
            (sy[centre] // s) * W + sx[centre] // s, frags.face[centre], frags.bary[centre], frags.depth[centre], H, W
        )
    else:
        centre_frags = rasterize(
            points_cam, mesh.faces, camera.fx, camera.fy, camera.cx, camera.cy, W, H, cull_back=cull, znear=znear
        )
    face_id, bary, depth = centre_frags.images()
    return RenderOutput(rgba=rgba, depth=depth, face_id=face_id, bary=bary)
