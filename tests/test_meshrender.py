"""CPU mesh renderer: coverage, depth, colour, culling, occlusion, textures, supersampling, determinism —
checked against hand-computed expectations (analytic projections, the sRGB formula)."""
import math

import numpy as np
import pytest
import torch

from npg.camera import Camera
from npg.data.meshrender import Material, TriangleMesh, rasterize, render, sample_texture

W = H = 64
F = 100.0
C = (W - 1) / 2.0


def _camera(w2c=None, size=W):
    w2c = torch.eye(4) if w2c is None else torch.as_tensor(w2c, dtype=torch.float32)
    return Camera(w2c=w2c, fx=F, fy=F, cx=(size - 1) / 2, cy=(size - 1) / 2, width=size, height=size)


def _unproject(px, py, z):
    """Camera at the origin looking down +z: the point at depth z seen at pixel (px, py)."""
    return [(px - C) * z / F, (py - C) * z / F, z]


def _srgb8(linear):
    linear = np.asarray(linear, dtype=np.float64)
    srgb = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    return np.round(255 * srgb).astype(np.uint8)


def _mesh(positions, faces, color=(0.5, 0.25, 1.0), double_sided=False, uvs=None, texture=None, smooth=False):
    faces = np.asarray(faces)
    return TriangleMesh(
        faces=faces,
        uvs=np.zeros((len(positions), 2)) if uvs is None else uvs,
        face_material=np.zeros(len(faces), dtype=np.int64),
        face_smooth=np.full(len(faces), smooth),
        materials=[Material("m", [*color, 1.0], texture=texture, double_sided=double_sided)],
    )


# Fronto-parallel triangle at depth 2 whose corners project to pixels (10, 10), (50, 10), (10, 50).
# Counter-clockwise seen from the camera (y is down in the image): (10,10) → (10,50) → (50,10).
TRI = np.array([_unproject(10, 10, 2.0), _unproject(10, 50, 2.0), _unproject(50, 10, 2.0)])
TRI_FACES = [[0, 1, 2]]
TOWARDS_CAMERA = (0.0, 0.0, -1.0)


def test_single_triangle_coverage_depth_and_colour():
    out = render(_mesh(TRI, TRI_FACES), TRI, _camera(), supersample=1, light_direction=TOWARDS_CAMERA, ambient=0.0)
    ys, xs = np.mgrid[0:H, 0:W]
    inside = (xs >= 10) & (ys >= 10) & (xs + ys <= 60)  # edges inclusive
    np.testing.assert_array_equal(out.face_id >= 0, inside)
    np.testing.assert_array_equal(out.rgba[..., 3], np.where(inside, 255, 0))
    np.testing.assert_allclose(out.depth[inside], 2.0, rtol=1e-6)
    assert np.all(out.depth[~inside] == 0)
    # normal faces the light exactly: colour = albedo, sRGB-encoded
    np.testing.assert_array_equal(out.rgba[inside][:, :3], np.broadcast_to(_srgb8([0.5, 0.25, 1.0]), (inside.sum(), 3)))
    # barycentrics reproduce the pixel position
    pts = np.einsum("hwk,kc->hwc", out.bary.astype(np.float64), TRI)[inside]
    np.testing.assert_allclose(pts[:, 0] * F / pts[:, 2] + C, xs[inside], atol=1e-4)
    np.testing.assert_allclose(pts[:, 1] * F / pts[:, 2] + C, ys[inside], atol=1e-4)


def test_lambert_and_ambient():
    light = np.array([0.0, 0.6, -0.8])  # n·l = 0.8 with n = (0, 0, −1)
    out = render(_mesh(TRI, TRI_FACES), TRI, _camera(), supersample=1, light_direction=light, ambient=0.25)
    albedo = np.array([0.5, 0.25, 1.0])
    np.testing.assert_array_equal(out.rgba[20, 20, :3], _srgb8(albedo * (0.25 + 0.75 * 0.8)))
    away = render(_mesh(TRI, TRI_FACES), TRI, _camera(), supersample=1, light_direction=(0, 0, 1), ambient=0.25)
    np.testing.assert_array_equal(away.rgba[20, 20, :3], _srgb8(albedo * 0.25))


def test_tilted_triangle_depth_is_perspective_correct():
    # plane z = 2 + 0.05·x_cam: at pixel (px, py) the ray (px−C, py−C, F)/F·z meets it at
    # z = 2 / (1 − 0.05·(px − C)/F)
    corners = []
    for px, py in [(5, 5), (5, 60), (60, 5)]:
        z = 2.0 / (1 - 0.05 * (px - C) / F)
        corners.append(_unproject(px, py, z))
    corners = np.array(corners)
    out = render(_mesh(corners, TRI_FACES), corners, _camera(), supersample=1)
    ys, xs = np.nonzero(out.face_id >= 0)
    expected = 2.0 / (1 - 0.05 * (xs - C) / F)
    np.testing.assert_allclose(out.depth[ys, xs], expected, rtol=1e-6)
    assert ys.size > 1000


def test_back_faces_are_culled_unless_double_sided():
    flipped = [[0, 2, 1]]
    assert (render(_mesh(TRI, flipped), TRI, _camera(), supersample=1).face_id >= 0).sum() == 0
    both = render(_mesh(TRI, flipped, double_sided=True), TRI, _camera(), supersample=1, light_direction=TOWARDS_CAMERA, ambient=0.0)
    assert (both.face_id >= 0).sum() == 861  # the front-facing coverage: Σ_{x=10}^{50} (51 − x)
    # the back side is lit with the flipped normal: full Lambert towards the camera
    np.testing.assert_array_equal(both.rgba[20, 20, :3], _srgb8([0.5, 0.25, 1.0]))


def test_nearer_triangle_wins_regardless_of_order():
    near = TRI.copy()
    far = np.array([_unproject(5, 5, 4.0), _unproject(5, 60, 4.0), _unproject(60, 5, 4.0)])
    positions = np.concatenate([near, far])
    for faces, near_id in (([[0, 1, 2], [3, 4, 5]], 0), ([[3, 4, 5], [0, 1, 2]], 1)):
        out = render(_mesh(positions, faces), positions, _camera(), supersample=1)
        assert out.face_id[20, 20] == near_id and out.depth[20, 20] == pytest.approx(2.0)
        assert out.face_id[5, 58] == 1 - near_id and out.depth[5, 58] == pytest.approx(4.0)


def _cube():
    v = np.array([[x, y, z] for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)], dtype=float)
    faces = []
    # each side as two triangles, counter-clockwise seen from outside
    for axis in range(3):
        for sign in (-1, 1):
            quad = [i for i in range(8) if np.sign(v[i, axis]) == sign]
            centre = np.zeros(3)
            centre[axis] = sign
            a, b, c, d = sorted(quad, key=lambda i: math.atan2(*_in_plane(v[i], axis)))
            tri1, tri2 = [a, b, c], [a, c, d]
            for tri in (tri1, tri2):
                n = np.cross(v[tri[1]] - v[tri[0]], v[tri[2]] - v[tri[0]])
                faces.append(tri if n @ centre > 0 else tri[::-1])
    return v, np.array(faces)


def _in_plane(p, axis):
    others = [k for k in range(3) if k != axis]
    return p[others[1]], p[others[0]]


def _look_at(eye):
    eye = np.asarray(eye, float)
    f = -eye / np.linalg.norm(eye)
    r = np.cross(f, [0, 0, 1.0])
    r /= np.linalg.norm(r)
    d = np.cross(f, r)
    w2c = np.eye(4)
    w2c[:3, :3] = np.stack([r, d, f])
    w2c[:3, 3] = -w2c[:3, :3] @ eye
    return w2c


def test_cube_is_watertight_and_matches_projected_hull():
    v, faces = _cube()
    w2c = _look_at([3.0, -2.2, 1.7])
    cam = _camera(w2c)
    out = render(_mesh(v, faces), v, cam, supersample=1)
    # projected convex hull of the 8 corners (the silhouette of a convex solid)
    pc = v @ w2c[:3, :3].T + w2c[:3, 3]
    p2 = np.stack([F * pc[:, 0] / pc[:, 2] + C, F * pc[:, 1] / pc[:, 2] + C], 1)
    from scipy.spatial import ConvexHull

    hull = ConvexHull(p2)
    ys, xs = np.mgrid[0:H, 0:W]
    pts = np.stack([xs.ravel(), ys.ravel()], 1).astype(float)
    dist = pts @ hull.equations[:, :2].T + hull.equations[:, 2]  # ≤ 0 inside every hull edge
    inside = (dist.max(1) < -1e-6).reshape(H, W)
    outside = (dist.max(1) > 1e-6).reshape(H, W)
    covered = out.face_id >= 0
    assert covered[inside].all()  # no cracks between the 12 triangles
    assert not covered[outside].any()
    # only the three sides facing the camera are visible (the others are back-face culled)
    normals = np.cross(v[faces[:, 1]] - v[faces[:, 0]], v[faces[:, 2]] - v[faces[:, 0]])
    facing = (normals * (np.array([3.0, -2.2, 1.7]) - v[faces[:, 0]])).sum(1) > 0
    assert set(np.unique(out.face_id[covered])) == set(np.flatnonzero(facing))
    # depth is the distance along the optical axis to the cube's surface: ≥ nearest corner depth
    assert out.depth[covered].min() >= pc[:, 2].min() - 1e-6
    assert out.depth[covered].max() <= pc[:, 2].max() + 1e-6


def test_supersampled_edge_coverage_and_centre_samples():
    # A rectangle whose left edge is the vertical line x = 20 (pixel coordinates): with 2×2 samples
    # at x ± 0.25, pixel 20 is half covered; 3×3 samples at x − 1/3, x, x + 1/3 → 2/3 covered.
    rect = np.array([_unproject(20, 5, 2.0), _unproject(20, 60, 2.0), _unproject(60.3, 60, 2.0), _unproject(60.3, 5, 2.0)])
    faces = [[0, 1, 2], [0, 2, 3]]
    for s, alpha in ((2, 0.5), (3, 6 / 9)):
        out = render(_mesh(rect, faces), rect, _camera(), supersample=s)
        assert abs(int(out.rgba[30, 20, 3]) - 255 * alpha) <= 0.5 + 1e-9
        assert out.rgba[30, 21, 3] == 255 and out.rgba[30, 19, 3] == 0
        # straight alpha: the partially covered pixel keeps the full surface colour
        np.testing.assert_array_equal(out.rgba[30, 20, :3], out.rgba[30, 30, :3])
    # ground-truth buffers are sampled at pixel centres, whatever the supersampling
    ref = render(_mesh(rect, faces), rect, _camera(), supersample=1)
    for s in (2, 3):
        out = render(_mesh(rect, faces), rect, _camera(), supersample=s)
        np.testing.assert_array_equal(out.face_id, ref.face_id)
        np.testing.assert_allclose(out.depth, ref.depth, rtol=1e-6)


def test_texture_lookup_is_perspective_correct():
    # a quad at depth 2 .. 6 (tilted) textured with a 2×1 texture: left texel red, right texel green;
    # the u = 0.5 boundary must sit where the 3-D midpoint of the quad projects, not at the image middle
    tex = np.zeros((1, 2, 4), dtype=np.float32)
    tex[0, 0] = (1, 0, 0, 1)
    tex[0, 1] = (0, 1, 0, 1)
    x_left, x_right, z_left, z_right = -1.0, 1.0, 2.0, 6.0
    quad = np.array([[x_left, -0.5, z_left], [x_left, 0.5, z_left], [x_right, 0.5, z_right], [x_right, -0.5, z_right]])
    uvs = np.array([[0.0, 0.5], [0.0, 0.5], [1.0, 0.5], [1.0, 0.5]])
    mesh = TriangleMesh(
        faces=np.array([[0, 1, 2], [0, 2, 3]]),
        uvs=uvs,
        face_material=np.zeros(2, dtype=np.int64),
        face_smooth=np.zeros(2, dtype=bool),
        materials=[Material("t", [1, 1, 1, 1], texture=tex, wrap=("clamp", "clamp"), double_sided=True)],
    )
    out = render(mesh, quad, _camera(), supersample=1, light_direction=TOWARDS_CAMERA, ambient=1.0)
    mid = np.array([0.0, 0.0, 4.0])
    mid_px = F * mid[0] / mid[2] + C  # u = 0.5 projects here (≈ 31.5), not at the midpoint in screen x
    row = out.rgba[int(C)]
    covered = np.flatnonzero(row[:, 3] > 0)
    red_to_green = covered[(row[covered, 0] <= row[covered, 1])][0]
    assert abs(red_to_green - mid_px) <= 1.0
    left_px = F * x_left / z_left + C
    right_px = F * x_right / z_right + C
    assert abs(mid_px - (left_px + right_px) / 2) > 5  # the affine guess would be clearly wrong


def test_sample_texture_wrap_modes():
    tex = np.arange(4, dtype=np.float64).reshape(1, 4, 1)  # texels 0, 1, 2, 3 at u = 1/8, 3/8, 5/8, 7/8
    u = np.array([[1 / 8 + 1.0, 0.5], [-1 / 8, 0.5], [3 / 8, 0.5]])
    np.testing.assert_allclose(sample_texture(tex, u, ("repeat", "clamp"))[:, 0], [0, 3, 1])
    np.testing.assert_allclose(sample_texture(tex, u, ("clamp", "clamp"))[:, 0], [3, 0, 1])
    np.testing.assert_allclose(sample_texture(tex, u, ("mirror", "clamp"))[:, 0], [3, 0, 1])
    np.testing.assert_allclose(sample_texture(tex, np.array([[0.25, 0.5]]), ("clamp", "clamp"))[:, 0], [0.5])


def test_render_is_deterministic_and_validates_input():
    v, faces = _cube()
    cam = _camera(_look_at([2.0, 2.5, 1.2]))
    a = render(_mesh(v, faces), v, cam, supersample=3)
    b = render(_mesh(v, faces), v, cam, supersample=3)
    for x, y in zip((a.rgba, a.depth, a.face_id, a.bary), (b.rgba, b.depth, b.face_id, b.bary)):
        assert x.tobytes() == y.tobytes()
    bad = v.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        render(_mesh(v, faces), bad, cam)
    with pytest.raises(ValueError, match="positions"):
        render(_mesh(v, faces), v[:5], cam)
    with pytest.raises(ValueError, match="supersample"):
        render(_mesh(v, faces), v, cam, supersample=0)
    with pytest.raises(ValueError, match="faces"):
        rasterize(v, np.array([[0, 1, 9]]), F, F, C, C, W, H)


def test_triangle_behind_camera_is_dropped():
    behind = TRI * np.array([1, 1, -1])
    out = render(_mesh(behind, TRI_FACES, double_sided=True), behind, _camera(), supersample=1)
    assert (out.face_id >= 0).sum() == 0
