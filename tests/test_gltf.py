"""glTF reader: keyframe interpolation and linear blend skinning against hand-computed poses, on a tiny
asset built here, plus the real Fox (bundled) and RobotExpressive (shared data, when present)."""
import math

import numpy as np
import pygltflib
import pytest

from npg.data.gltf import GltfError, Sampler, load_gltf, quat_to_matrix, slerp

S45 = math.sin(math.pi / 4)


def _translation(x, y, z):
    m = np.eye(4)
    m[:3, 3] = (x, y, z)
    return m


class _Builder:
    """Accumulates arrays in one binary blob and makes accessors for them."""

    def __init__(self):
        self.blob = bytearray()
        self.gltf = pygltflib.GLTF2()

    def accessor(self, array, component, type_):
        array = np.ascontiguousarray(array)
        while len(self.blob) % 4:
            self.blob.append(0)
        offset = len(self.blob)
        self.blob += array.tobytes()
        self.gltf.bufferViews.append(pygltflib.BufferView(buffer=0, byteOffset=offset, byteLength=array.nbytes))
        kwargs = {}
        if type_ == "VEC3" and component == pygltflib.FLOAT:
            kwargs = {"min": array.min(0).tolist(), "max": array.max(0).tolist()}
        self.gltf.accessors.append(
            pygltflib.Accessor(
                bufferView=len(self.gltf.bufferViews) - 1,
                componentType=component,
                count=len(array),
                type=type_,
                **kwargs,
            )
        )
        return len(self.gltf.accessors) - 1

    def f32(self, array, type_):
        return self.accessor(np.asarray(array, dtype=np.float32), pygltflib.FLOAT, type_)

    def save(self, path):
        self.gltf.buffers.append(pygltflib.Buffer(byteLength=len(self.blob)))
        self.gltf.set_binary_blob(bytes(self.blob))
        self.gltf.save_binary(str(path))
        return path


@pytest.fixture(scope="module")
def tiny_asset(tmp_path_factory):
    """Root node (a matrix: +3 in z) → joint J0 → joint J1 (+1 in y) → node N2 (+1 in y, unskinned mesh);
    plus node N3 (unskinned mesh with one morph target). A skinned mesh of 3 vertices:
    v0 = (0, 2, 0) on J1, v1 = (1, 1, 0) half J0 / half J1, v2 = (0, 0, 0) on J0.

    Animation "anim": J0 translation LINEAR (0,0,0) → (2,0,0) over t ∈ [0, 2];
    J1 rotation LINEAR identity → 90° about z over t ∈ [0, 1];
    N2 scale STEP 1 → 2 at t = 1; N3 translation CUBICSPLINE keys t = 0 (value 0, out-tangent (1,0,0))
    and t = 2 (value (1,0,0), in-tangent 0); N3 morph weight LINEAR 0 → 1 over t ∈ [0, 1].
    """
    b = _Builder()
    g = b.gltf
    positions = b.f32([[0, 2, 0], [1, 1, 0], [0, 0, 0]], "VEC3")
    joints = b.accessor(np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]], dtype=np.uint8), pygltflib.UNSIGNED_BYTE, "VEC4")
    weights = b.f32([[1, 0, 0, 0], [0.5, 0.5, 0, 0], [1, 0, 0, 0]], "VEC4")
    indices = b.accessor(np.array([0, 1, 2], dtype=np.uint16), pygltflib.UNSIGNED_SHORT, "SCALAR")
    # inverse bind matrices (column-major): the joints' bind-pose world transforms include the root's +3 z
    ibm = np.stack([np.linalg.inv(_translation(0, 0, 3)), np.linalg.inv(_translation(0, 1, 3))])
    ibm_acc = b.f32(ibm.transpose(0, 2, 1).reshape(2, 16), "MAT4")
    rigid_positions = b.f32([[0, 0, 0], [1, 0, 0], [0, 1, 0]], "VEC3")
    morph_positions = b.f32([[0, 0, 1], [0, 0, 0], [0, 0, 0]], "VEC3")

    g.meshes = [
        pygltflib.Mesh(primitives=[pygltflib.Primitive(
            attributes=pygltflib.Attributes(POSITION=positions, JOINTS_0=joints, WEIGHTS_0=weights), indices=indices)]),
        pygltflib.Mesh(primitives=[pygltflib.Primitive(attributes=pygltflib.Attributes(POSITION=rigid_positions))]),
        pygltflib.Mesh(
            primitives=[pygltflib.Primitive(attributes=pygltflib.Attributes(POSITION=rigid_positions),
                                            targets=[{"POSITION": morph_positions}])],
            weights=[0.0],
        ),
    ]
    root_matrix = _translation(0, 0, 3).T.reshape(-1).tolist()  # column-major
    g.nodes = [
        pygltflib.Node(name="root", matrix=root_matrix, children=[1, 4]),  # 0
        pygltflib.Node(name="J0", children=[2]),  # 1
        pygltflib.Node(name="J1", translation=[0, 1, 0], children=[3]),  # 2
        pygltflib.Node(name="N2", translation=[0, 1, 0], mesh=1),  # 3
        pygltflib.Node(name="skinned", mesh=0, skin=0, translation=[100, 100, 100]),  # 4: transform must be ignored
        pygltflib.Node(name="N3", mesh=2),  # 5
    ]
    g.skins = [pygltflib.Skin(joints=[1, 2], inverseBindMatrices=ibm_acc)]
    g.scenes = [pygltflib.Scene(nodes=[0, 5])]
    g.scene = 0

    t01 = b.f32([0, 1], "SCALAR")
    t02 = b.f32([0, 2], "SCALAR")
    samplers = [
        pygltflib.AnimationSampler(input=t02, output=b.f32([[0, 0, 0], [2, 0, 0]], "VEC3"), interpolation="LINEAR"),
        pygltflib.AnimationSampler(input=t01, output=b.f32([[0, 0, 0, 1], [0, 0, S45, S45]], "VEC4"), interpolation="LINEAR"),
        pygltflib.AnimationSampler(input=t01, output=b.f32([[1, 1, 1], [2, 2, 2]], "VEC3"), interpolation="STEP"),
        # CUBICSPLINE output per key: in-tangent, value, out-tangent
        pygltflib.AnimationSampler(
            input=t02,
            output=b.f32([[0, 0, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0]], "VEC3"),
            interpolation="CUBICSPLINE",
        ),
        pygltflib.AnimationSampler(input=t01, output=b.f32([0, 1], "SCALAR"), interpolation="LINEAR"),
    ]
    target = pygltflib.AnimationChannelTarget
    channels = [
        pygltflib.AnimationChannel(sampler=0, target=target(node=1, path="translation")),
        pygltflib.AnimationChannel(sampler=1, target=target(node=2, path="rotation")),
        pygltflib.AnimationChannel(sampler=2, target=target(node=3, path="scale")),
        pygltflib.AnimationChannel(sampler=3, target=target(node=5, path="translation")),
        pygltflib.AnimationChannel(sampler=4, target=target(node=5, path="weights")),
    ]
    g.animations = [pygltflib.Animation(name="anim", samplers=samplers, channels=channels)]
    path = b.save(tmp_path_factory.mktemp("gltf") / "tiny.glb")
    return load_gltf(path)


def _rot_z(deg):
    a = math.radians(deg)
    return np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])


def test_tiny_asset_structure(tiny_asset):
    assert tiny_asset.vertex_count == 9  # 3 skinned + 3 + 3 rigid
    assert tiny_asset.face_count == 3
    assert tiny_asset.joint_count == 2
    assert tiny_asset.animation_names == ["anim"]
    anim = tiny_asset.animation("anim")
    assert (anim.start, anim.end) == (0.0, 2.0)


def _node_slice(asset, name):
    (inst,) = [i for i in asset.instances if asset.nodes[i.node].name == name]
    return slice(inst.start, inst.stop)


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 1.0, 1.5, 2.5])
def test_skinning_matches_hand_computed_pose(tiny_asset, t):
    # J0 translation is LINEAR over [0, 2] (held after); J1's angle is slerped over [0, 1], so it grows
    # linearly with t (at t = 0.25, nlerp would give 21.6° instead of 22.5°)
    j0 = np.array([min(t, 2.0), 0.0, 0.0])
    R = _rot_z(90.0 * min(t, 1.0))
    root = np.array([0.0, 0.0, 3.0])

    # world_J · IBM_J · v, with IBM_J the inverse of the joint's bind-pose world transform
    def on_j0(v):
        return root + j0 + (np.asarray(v, float) - root)

    def on_j1(v):
        return root + j0 + np.array([0.0, 1.0, 0.0]) + R @ (np.asarray(v, float) - np.array([0.0, 1.0, 3.0]))

    expected = np.stack([on_j1([0, 2, 0]), 0.5 * on_j0([1, 1, 0]) + 0.5 * on_j1([1, 1, 0]), on_j0([0, 0, 0])])
    # the skinned node's own transform (+100) is ignored, as the specification requires
    np.testing.assert_allclose(tiny_asset.pose("anim", t)[_node_slice(tiny_asset, "skinned")], expected, atol=1e-6)
    if t == 0.25:  # spelled out: v0 rotates by 22.5° about J1
        a = math.radians(22.5)
        np.testing.assert_allclose(expected[0], [0.25 - math.sin(a), 1 + math.cos(a), 0.0], atol=1e-12)


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.999, 1.0, 1.5, 3.0])
def test_rigid_child_mesh_follows_animated_joint_with_step_scale(tiny_asset, t):
    # N2 = root · J0 · J1 · T(0,1,0) · S(step): STEP holds 1 until t = 1, then 2
    scale = 1.0 if t < 1.0 else 2.0
    R = _rot_z(90.0 * min(t, 1.0))
    origin = np.array([min(t, 2.0), 0, 3]) + np.array([0, 1, 0]) + R @ np.array([0, 1, 0])
    local = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=float)
    expected = origin + (R @ (scale * local).T).T
    np.testing.assert_allclose(tiny_asset.pose("anim", t)[_node_slice(tiny_asset, "N2")], expected, atol=1e-6)


@pytest.mark.parametrize("t", [0.0, 0.5, 1.0, 2.0])
def test_cubic_spline_translation_and_morph_weights(tiny_asset, t):
    # Hermite with dt = 2, out-tangent (1,0,0) at key 0, value (1,0,0) at key 1, zero in-tangent
    s = t / 2.0
    x = (s**3 - 2 * s**2 + s) * 2.0 * 1.0 + (-2 * s**3 + 3 * s**2) * 1.0
    weight = min(t, 1.0)
    local = np.array([[0, 0, weight], [1, 0, 0], [0, 1, 0]], dtype=float)
    expected = local + np.array([x, 0, 0])
    np.testing.assert_allclose(tiny_asset.pose("anim", t)[_node_slice(tiny_asset, "N3")], expected, atol=1e-6)
    assert x == pytest.approx({0.0: 0.0, 0.5: 0.4375, 1.0: 0.75, 2.0: 1.0}[t])


def test_rest_pose_is_bind_pose(tiny_asset):
    pose = tiny_asset.pose(None)
    np.testing.assert_allclose(pose[_node_slice(tiny_asset, "skinned")], [[0, 2, 0], [1, 1, 0], [0, 0, 0]], atol=1e-12)


def test_sampler_interpolations():
    times = [1.0, 2.0, 4.0]
    values = [[0.0], [10.0], [30.0]]
    linear = Sampler(times, values, "LINEAR")
    step = Sampler(times, values, "STEP")
    assert linear.evaluate(0.0)[0] == 0.0 and linear.evaluate(9.0)[0] == 30.0  # held outside the keys
    assert linear.evaluate(1.5)[0] == pytest.approx(5.0)
    assert linear.evaluate(3.0)[0] == pytest.approx(20.0)
    assert step.evaluate(1.99)[0] == 0.0 and step.evaluate(2.0)[0] == 10.0 and step.evaluate(3.9)[0] == 10.0
    # cubic with value-consistent tangents reproduces a straight line: slope 10/s everywhere
    cubic = Sampler([0.0, 1.0], [[[10.0], [0.0], [10.0]], [[10.0], [10.0], [10.0]]], "CUBICSPLINE")
    for t in (0.1, 0.5, 0.77):
        assert cubic.evaluate(t)[0] == pytest.approx(10.0 * t)
    with pytest.raises(GltfError):
        Sampler([0.0, 1.0], [[1.0], [2.0]], "BEZIER")
    with pytest.raises(GltfError):
        Sampler([1.0, 0.0], [[1.0], [2.0]], "LINEAR")


def test_slerp_constant_speed_and_shorter_arc():
    q0 = np.array([0.0, 0.0, 0.0, 1.0])
    q1 = np.array([0.0, 0.0, math.sin(math.radians(60)), math.cos(math.radians(60))])  # 120° about z
    for s in (0.1, 0.25, 0.6):
        q = slerp(q0, q1, s)
        np.testing.assert_allclose(quat_to_matrix(q), _rot_z(120 * s), atol=1e-12)
    # −q1 is the same rotation: slerp must take the same (shorter) path
    np.testing.assert_allclose(quat_to_matrix(slerp(q0, -q1, 0.25)), _rot_z(30), atol=1e-12)


def test_bad_files_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_gltf(tmp_path / "missing.glb")
    corrupt = tmp_path / "corrupt.glb"
    corrupt.write_bytes(b"glTF\x02\x00\x00\x00garbage")
    with pytest.raises(GltfError):
        load_gltf(corrupt)


def test_strip_normalised_uvs_and_sparse_morph_target(tmp_path):
    """A TRIANGLE_STRIP quad with uint8-normalised UVs and a sparse morph target (no bufferView)."""
    b = _Builder()
    g = b.gltf
    positions = b.f32([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]], "VEC3")
    uvs = b.accessor(np.array([[0, 0], [255, 0], [0, 255], [255, 51]], dtype=np.uint8), pygltflib.UNSIGNED_BYTE, "VEC2")
    g.accessors[uvs].normalized = True
    indices = b.accessor(np.array([0, 1, 2, 3], dtype=np.uint16), pygltflib.UNSIGNED_SHORT, "SCALAR")
    sparse_index = b.accessor(np.array([3], dtype=np.uint16), pygltflib.UNSIGNED_SHORT, "SCALAR")
    sparse_value = b.f32([[0, 0, 2]], "VEC3")
    g.accessors.append(
        pygltflib.Accessor(
            componentType=pygltflib.FLOAT,
            count=4,
            type="VEC3",
            sparse=pygltflib.Sparse(
                count=1,
                indices=pygltflib.AccessorSparseIndices(
                    bufferView=g.accessors[sparse_index].bufferView, componentType=pygltflib.UNSIGNED_SHORT
                ),
                values=pygltflib.AccessorSparseValues(bufferView=g.accessors[sparse_value].bufferView),
            ),
        )
    )
    target = len(g.accessors) - 1
    g.meshes = [
        pygltflib.Mesh(
            primitives=[pygltflib.Primitive(
                attributes=pygltflib.Attributes(POSITION=positions, TEXCOORD_0=uvs), indices=indices, mode=5,
                targets=[{"POSITION": target}])],
            weights=[0.25],
        )
    ]
    g.nodes = [pygltflib.Node(mesh=0)]
    g.scenes = [pygltflib.Scene(nodes=[0])]
    asset = load_gltf(b.save(tmp_path / "strip.glb"))
    np.testing.assert_array_equal(asset.mesh.faces, [[0, 1, 2], [2, 1, 3]])  # strip: every other one flipped
    np.testing.assert_allclose(asset.mesh.uvs, [[0, 0], [1, 0], [0, 1], [1, 0.2]])
    np.testing.assert_allclose(asset.pose(None), [[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0.5]])
    assert asset.animation_names == []
    evaluated = asset.evaluate(None)
    assert np.all(evaluated.normals == 0) and not asset.mesh.face_smooth.any()  # no NORMAL: flat shading


# ----------------------------------------------------------------------------------- real assets
@pytest.fixture(scope="module")
def fox():
    from npg.data.generate import find_asset

    return load_gltf(find_asset("fox"))


def test_bundled_fox(fox):
    assert fox.vertex_count == 1728
    assert fox.face_count == 576
    assert fox.joint_count == 24 and len(fox.skins) == 1
    assert fox.animation_names == ["Survey", "Walk", "Run"]
    assert fox.animation("Survey").duration == pytest.approx(3.4167, abs=1e-3)
    assert fox.mesh.materials[0].texture.shape == (1024, 1024, 4)
    a, b = fox.pose("Survey", 0.5), fox.pose("Survey", 2.0)
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
    size = np.ptp(a, axis=0).max()
    assert np.abs(a - b).max() > 0.05 * size  # the animation moves the fox
    # the skeleton is rigidly animated: edge lengths of the mesh change little compared with the motion
    e = fox.mesh.faces[:, :2]
    stretch = np.abs(np.linalg.norm(a[e[:, 0]] - a[e[:, 1]], axis=1) - np.linalg.norm(b[e[:, 0]] - b[e[:, 1]], axis=1))
    assert np.median(stretch) < 0.02 * size


def test_fox_gltf_and_glb_agree(fox, data_dir):
    path = data_dir / "assets" / "fox" / "glTF" / "Fox.gltf"
    if not path.exists():
        pytest.skip(f"{path} not present")
    separate = load_gltf(path)  # external .bin and Texture.png
    for t in (0.0, 0.37, 1.0):
        np.testing.assert_array_equal(separate.pose("Run", t), fox.pose("Run", t))
    np.testing.assert_array_equal(separate.mesh.materials[0].texture, fox.mesh.materials[0].texture)


def test_robot_expressive(data_dir):
    path = data_dir / "assets" / "robot_expressive" / "RobotExpressive.glb"
    if not path.exists():
        pytest.skip(f"{path} not present")
    robot = load_gltf(path)
    assert len(robot.skins) == 4
    assert len(robot.instances) == 19  # 19 meshes, one primitive each, one node each
    assert len(robot.animation_names) == 14 and "Dance" in robot.animation_names
    assert len(robot.mesh.materials) == 3 and all(m.texture is None for m in robot.mesh.materials)
    a, b = robot.pose("Dance", 0.3), robot.pose("Dance", 1.3)
    assert np.all(np.isfinite(a))
    moved = np.linalg.norm(a - b, axis=1)
    # unskinned meshes on animated nodes move too (e.g. the legs, instances without a skin)
    rigid = [i for i in robot.instances if i.skin is None]
    assert rigid and max(moved[i.start : i.stop].max() for i in rigid) > 0.05
    skinned = [i for i in robot.instances if i.skin is not None]
    assert max(moved[i.start : i.stop].max() for i in skinned) > 0.05
    pose = robot.evaluate("Dance", 0.3)
    norms = np.linalg.norm(pose.normals, axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-6)  # every robot primitive has normals
