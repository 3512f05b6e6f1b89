"""npg.skin: the PyTorch reference against the definition, float64 gradcheck, the Triton kernels (under
TRITON_INTERPRET=1 on a CPU, compiled on a GPU) against the reference, degenerate triangles, bad input."""
import math
import os

import pytest
import torch

from npg.skinning import skin, skin_torch

CPU = torch.device("cpu")


def make_inputs(P, G, J, dtype=torch.float64, index_dtype=torch.int64, seed=0, device=CPU):
    gen = torch.Generator().manual_seed(seed)
    points = torch.randn(P, 3, generator=gen, dtype=torch.float64)
    neighbor_idx = torch.randint(0, P, (G, J), generator=gen)
    logits = 2.0 * torch.randn(G, J, generator=gen, dtype=torch.float64)
    # three distinct corners per Gaussian: random triangles are well away from degenerate
    anchors = torch.zeros(0, 3, dtype=torch.long)
    if G:
        anchors = torch.stack([torch.randperm(P, generator=gen)[:3] for _ in range(G)])
    quats = torch.randn(G, 4, generator=gen, dtype=torch.float64)
    return (points.to(device, dtype), neighbor_idx.to(device, index_dtype), logits.to(device, dtype),
            anchors.to(device, index_dtype), quats.to(device, dtype))


def quat_to_matrix(q):
    """Standard rotation matrix of unit quaternions (w, x, y, z), [G, 4] -> [G, 3, 3]."""
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], -1).reshape(*q.shape[:-1], 3, 3)


def definition(points, neighbor_idx, logits, anchors, quats):
    """means and rotation matrices straight from the definition (no Shepperd, no quaternion product)."""
    means = torch.stack([
        sum(w * points[i] for w, i in zip(torch.softmax(logits[g], 0), neighbor_idx[g])) for g in range(len(logits))
    ])
    a, b, c = points[anchors[:, 0]], points[anchors[:, 1]], points[anchors[:, 2]]
    e1 = torch.nn.functional.normalize(b - a, dim=1)
    n = torch.nn.functional.normalize(torch.linalg.cross(b - a, c - a), dim=1)
    e2 = torch.linalg.cross(n, e1)
    frame = torch.stack([e1, e2, n], dim=2)
    return means, frame @ quat_to_matrix(torch.nn.functional.normalize(quats, dim=1))


def sign_invariant_loss(means, rotations, seed=1):
    """Σ gm·means + Σ rᵀ M r: smooth in the rotation and blind to q vs −q, so implementations that
    pick opposite signs for a near-tie row still agree on every gradient."""
    gen = torch.Generator().manual_seed(seed)
    gm = torch.randn(means.shape, generator=gen, dtype=torch.float64).to(means)
    M = torch.randn(rotations.shape[0], 4, 4, generator=gen, dtype=torch.float64).to(rotations)
    return (gm * means).sum() + torch.einsum("ga,gab,gb->", rotations, M, rotations)


def aligned(rot, ref):
    return rot * torch.sign((rot * ref).sum(1, keepdim=True))


@pytest.mark.parametrize("J", [1, 5, 20, 32])
def test_reference_matches_definition(J):
    inputs = make_inputs(P=30, G=40, J=J)
    means, rotations = skin_torch(*inputs)
    ref_means, ref_R = definition(*inputs)
    torch.testing.assert_close(means, ref_means, rtol=0, atol=1e-12)
    torch.testing.assert_close(rotations.norm(dim=1), torch.ones(40, dtype=torch.float64), rtol=0, atol=1e-14)
    torch.testing.assert_close(quat_to_matrix(rotations), ref_R, rtol=0, atol=1e-12)


def test_reference_gradcheck_float64():
    points, neighbor_idx, logits, anchors, quats = make_inputs(P=9, G=6, J=4, seed=3)
    points.requires_grad_()
    logits.requires_grad_()
    quats.requires_grad_()
    assert torch.autograd.gradcheck(lambda p, l, q: skin_torch(p, neighbor_idx, l, anchors, q), (points, logits, quats))


def needs_interpreter():
    """Triton on CPU tensors runs under TRITON_INTERPRET=1 (conftest sets it when there is no GPU);
    on a GPU machine the CUDA tests below exercise the compiled kernels instead."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (set by conftest when no GPU is present)")


@pytest.fixture
def triton_interpreter():
    needs_interpreter()


triton_only = pytest.mark.usefixtures("triton_interpreter")


def run_both(inputs, backend_device=CPU, raw_grads=True):
    """Outputs and gradients of the Triton path and of the float64 reference on the same inputs."""
    points, neighbor_idx, logits, anchors, quats = (t.to(backend_device) for t in inputs)
    results = []
    for fn, cast in ((lambda *a: skin(*a, backend="triton"), None), (skin_torch, torch.float64)):
        p, l, q = (t.detach().to(cast or t.dtype).requires_grad_() for t in (points, logits, quats))
        means, rotations = fn(p, neighbor_idx, l, anchors, q)
        if raw_grads:
            gen = torch.Generator().manual_seed(7)
            gm = torch.randn(means.shape, generator=gen, dtype=torch.float64).to(means)
            gr = torch.randn(rotations.shape, generator=gen, dtype=torch.float64).to(rotations)
            loss = (gm * means).sum() + (gr * rotations).sum()
        else:
            loss = sign_invariant_loss(means, rotations)
        grads = torch.autograd.grad(loss, (p, l, q))
        results.append((means.detach(), rotations.detach()) + tuple(grads))
    return results


@triton_only
@pytest.mark.parametrize("P,G,J,index_dtype", [
    (7, 1, 1, torch.int64), (40, 67, 20, torch.int32), (100, 130, 32, torch.int64), (5, 3, 3, torch.int32)])
def test_triton_matches_reference_float64(P, G, J, index_dtype):
    kernel, ref = run_both(make_inputs(P, G, J, index_dtype=index_dtype, seed=P + G))
    for name, a, b in zip(("means", "rotations", "d_points", "d_logits", "d_quats"), kernel, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11, msg=lambda m: f"{name}: {m}")


@triton_only
@pytest.mark.parametrize("P,G,J", [(50, 200, 20), (13, 33, 7)])
def test_triton_float32_matches_float64_reference(P, G, J):
    kernel, ref = run_both(make_inputs(P, G, J, dtype=torch.float32, seed=G), raw_grads=False)
    means, rotations, d_points, d_logits, d_quats = kernel
    torch.testing.assert_close(means.double(), ref[0], rtol=0, atol=2e-6)
    torch.testing.assert_close(aligned(rotations.double(), ref[1]), ref[1], rtol=0, atol=2e-6)
    for name, a, b in (("d_points", d_points, ref[2]), ("d_logits", d_logits, ref[3]), ("d_quats", d_quats, ref[4])):
        scale = b.abs().max().item()
        assert (a.double() - b).abs().max().item() <= 2e-5 * scale, name


@triton_only
def test_triton_gradcheck_float64():
    points, neighbor_idx, logits, anchors, quats = make_inputs(P=6, G=4, J=3, seed=11)
    points.requires_grad_()
    logits.requires_grad_()
    quats.requires_grad_()
    fn = lambda p, l, q: skin(p, neighbor_idx, l, anchors, q, backend="triton")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (points, logits, quats), fast_mode=True)


def degenerate_inputs(dtype=torch.float64):
    """Rows 0-3 have degenerate anchor triangles (coincident, b = a, collinear, nearly collinear at
    1e-7 rad); row 4 is a thin but valid triangle (1e-3 rad)."""
    points = torch.tensor([
        [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [1.0, 1e-7, 0.0],   # 0-3: on the x axis
        [0.3, 0.2, 0.1], [0.3, 0.2, 0.1],                                       # 4-5: coincident
        [0.0, 1.0, 0.0], [1.0, 1.0 + 1e-3, 0.0], [2.0, 1.0, 0.0],               # 6-8: thin triangle
        [0.5, -0.5, 0.5],
    ], dtype=dtype)
    anchors = torch.tensor([[4, 5, 4], [0, 0, 1], [0, 1, 2], [0, 3, 2], [6, 7, 8]])
    neighbor_idx = torch.tensor([[9, 4, 1], [9, 0, 2], [9, 1, 3], [9, 2, 0], [9, 6, 8]])
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(5, 3, generator=gen, dtype=torch.float64).to(dtype)
    quats = torch.randn(5, 4, generator=gen, dtype=torch.float64).to(dtype)
    return points, neighbor_idx, logits, anchors, quats


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_degenerate_triangles_use_identity_frame(backend):
    if backend == "triton":
        needs_interpreter()
    points, neighbor_idx, logits, anchors, quats = degenerate_inputs()
    points.requires_grad_()
    quats.requires_grad_()
    means, rotations = skin(points, neighbor_idx, logits, anchors, quats, backend=backend)
    expected = torch.nn.functional.normalize(quats.detach(), dim=1)
    torch.testing.assert_close(rotations[:4].detach(), expected[:4], rtol=0, atol=1e-14)
    # the thin triangle is not degenerate: its frame is the real one
    _, ref_R = definition(points.detach(), neighbor_idx, logits, anchors, quats.detach())
    torch.testing.assert_close(quat_to_matrix(rotations[4:].detach()), ref_R[4:], rtol=0, atol=1e-9)
    grad_points, grad_quats = torch.autograd.grad(sign_invariant_loss(means, rotations), (points, quats))
    assert torch.isfinite(grad_points).all() and torch.isfinite(grad_quats).all()
    # points 0-5 are anchor corners of degenerate rows only (and neighbours): the frame sends them
    # nothing, so their gradient is the blend's alone
    gm = torch.randn(means.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    weights = torch.softmax(logits, 1)
    blend_only = torch.zeros_like(points)
    blend_only.index_add_(0, neighbor_idx.reshape(-1), (weights[..., None] * gm[:, None, :]).reshape(-1, 3))
    torch.testing.assert_close(grad_points[:6], blend_only[:6], rtol=0, atol=1e-12)


def test_degenerate_float32_stays_finite():
    needs_interpreter()
    points, neighbor_idx, logits, anchors, quats = degenerate_inputs(torch.float32)
    for backend in ("torch", "triton"):
        p = points.clone().requires_grad_()
        means, rotations = skin(p, neighbor_idx, logits, anchors, quats, backend=backend)
        (grad,) = torch.autograd.grad(sign_invariant_loss(means, rotations), p)
        assert torch.isfinite(grad).all(), backend
        torch.testing.assert_close(rotations[:4], torch.nn.functional.normalize(quats[:4], dim=1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_and_masked_neighbours(backend):
    if backend == "triton":
        needs_interpreter()
    points, neighbor_idx, logits, anchors, quats = make_inputs(P=5, G=0, J=20)
    means, rotations = skin(points, neighbor_idx, logits, anchors, quats, backend=backend)
    assert means.shape == (0, 3) and rotations.shape == (0, 4)
    # -inf logits drop a neighbour from the blend
    points, neighbor_idx, logits, anchors, quats = make_inputs(P=8, G=3, J=4)
    logits[:, 1:] = float("-inf")
    means, _ = skin(points, neighbor_idx, logits, anchors, quats, backend=backend)
    torch.testing.assert_close(means, points[neighbor_idx[:, 0]], rtol=0, atol=1e-14)


def replace(index, make):
    """A corruption of the input list: input `index` becomes make(inputs)."""
    def apply(inputs):
        inputs = [t.clone() for t in inputs]
        inputs[index] = make(inputs)
        return inputs
    return apply


def assign(index, position, value):
    """Input `index` with entry `position` (a function of the inputs) set to value."""
    def make(inputs):
        t = inputs[index]
        t[position(inputs)] = value
        return t
    return replace(index, make)


def used_point(inputs):
    return inputs[1][0, 0].item(), 1


BAD_INPUTS = {
    "points [P,2]": (replace(0, lambda i: i[0][:, :2]), "points must have shape"),
    "neighbor_idx 1D": (replace(1, lambda i: i[1][:, 0]), "neighbor_idx must have shape"),
    "J = 33": (replace(1, lambda i: torch.zeros(6, 33, dtype=torch.long)), "J must be in"),
    "logits shape": (replace(2, lambda i: i[2][:, :-1]), "logits must have shape"),
    "anchors shape": (replace(3, lambda i: i[3][:, :2]), "anchors must have shape"),
    "quats shape": (replace(4, lambda i: i[4][:-1]), "quats must have shape"),
    "float index": (replace(1, lambda i: i[1].double()), "neighbor_idx must be int32 or int64"),
    "int16 anchors": (replace(3, lambda i: i[3].short()), "anchors must be int32 or int64"),
    "half points": (replace(0, lambda i: i[0].half()), "points must be float32 or float64"),
    "mixed dtypes": (replace(2, lambda i: i[2].float()), "logits must have the dtype of points"),
    "device": (replace(4, lambda i: i[4].to("meta")), "one device"),
    "list": (replace(2, lambda i: i[2].tolist()), "logits must be a torch.Tensor"),
    "empty points": (replace(0, lambda i: i[0][:0]), "points is empty"),
    "index >= P": (assign(1, lambda i: (2, 3), 12), "neighbor_idx holds index 12"),
    "negative anchor": (assign(3, lambda i: (1, 0), -1), "anchors holds index -1"),
    "NaN point": (assign(0, used_point, float("nan")), "points referenced by neighbor_idx/anchors contain NaN"),
    "Inf point": (assign(0, used_point, float("inf")), "points referenced by neighbor_idx/anchors contain NaN or Inf"),
    "Inf logit": (assign(2, lambda i: (4, 0), float("inf")), r"logits contain NaN or \+Inf"),
    "all -Inf logits": (assign(2, lambda i: 4, float("-inf")), "entirely -Inf"),
    "NaN quat": (assign(4, lambda i: (0, 2), float("nan")), "quats contain NaN"),
    "zero quat": (assign(4, lambda i: 3, 0.0), "zero"),
}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_clear_error(case, backend):
    if backend == "triton":
        needs_interpreter()
    make_bad, message = BAD_INPUTS[case]
    inputs = make_bad(make_inputs(P=12, G=6, J=5))
    with pytest.raises(ValueError, match=message):
        skin(*inputs, backend=backend)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        skin(*make_inputs(P=4, G=2, J=2), backend="cuda")


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        skin(*make_inputs(P=4, G=2, J=2), backend="triton")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@triton_only
def test_without_validation_bad_rows_are_nan():
    points, neighbor_idx, logits, anchors, quats = make_inputs(P=12, G=6, J=5, dtype=torch.float32)
    neighbor_idx[2, 1] = 99
    anchors[4, 2] = -3
    quats[5] = 0.0
    means, rotations = skin(points, neighbor_idx, logits, anchors, quats, backend="triton", validate=False)
    bad = torch.tensor([False, False, True, False, True, True])
    assert torch.isfinite(means[~bad]).all() and torch.isfinite(rotations[~bad]).all()
    assert not torch.isfinite(rotations[bad]).all(dim=1).any()


@pytest.mark.gpu
@pytest.mark.parametrize("G,J", [(100_000, 20), (3001, 7)])
def test_cuda_kernels_match_reference(cuda_device, G, J):
    P = 5000
    inputs = make_inputs(P, G, J, dtype=torch.float32, seed=G, device=cuda_device)
    kernel, ref = run_both(inputs, backend_device=cuda_device, raw_grads=False)
    # float32 against float64: thin random triangles amplify rounding (the torch reference run in
    # float32 shows the same: 3.7e-6 on rotations, 3e-5 relative on d_points at G = 100k)
    torch.testing.assert_close(kernel[0].double(), ref[0], rtol=0, atol=5e-6)
    torch.testing.assert_close(aligned(kernel[1].double(), ref[1]), ref[1], rtol=0, atol=2e-5)
    for name, a, b, rtol in zip(("d_points", "d_logits", "d_quats"), kernel[2:], ref[2:], (2e-4, 2e-5, 2e-5)):
        scale = b.abs().max().item()
        assert (a.double() - b).abs().max().item() <= rtol * scale, name
    # rasterizer-ready: unit quaternions
    assert (kernel[1].norm(dim=1) - 1).abs().max().item() < 1e-6
    assert math.isfinite(kernel[0].sum().item())


@pytest.mark.gpu
def test_cuda_bad_index_is_a_clear_error(cuda_device):
    inputs = list(make_inputs(50, 1000, 20, dtype=torch.float32, device=cuda_device))
    inputs[1][500, 3] = 50
    with pytest.raises(ValueError, match="neighbor_idx holds index 50"):
        skin(*inputs)
