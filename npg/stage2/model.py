"""Stage-2 model: 3D Gaussians anchored to the points of the stage-1 deformation model.

Each Gaussian g is tied to the point set P(t) = [stage-1 points p(t) (N); static cage points (S)]:

- ``neighbor_idx[g]`` [20]: its 20 nearest points of P in frame 0 (itself first),
- ``logits[g]`` [20]: learnable blend logits; mean(t) = Σⱼ softmax(logits)ⱼ · P(t)[neighbor_idxⱼ],
- ``anchors[g]`` [3]: the anchor triangle (the point, then its two nearest neighbours by distance);
  the orthonormal frame of that triangle is recomputed from the live points at every time, and the
  Gaussian's world rotation is R_frame(t) · R(quats[g]) (``npg.skin`` does both in one kernel),
- ``log_scales[g]`` [3], ``opacity_logits[g]`` [1], ``sh_dc[g]`` [1, 3], ``sh_rest[g]`` [15, 3]:
  shared over time, as in 3DGS (exp / sigmoid activations, SH degree up to 3).

Children of clone and split (``npg.stage2.densify``) inherit ``neighbor_idx`` and ``anchors``.

Initialisation (``NPGGaussians.from_points``): one Gaussian per point of frame 0. The blend logits are
−d²ⱼ/d̄², with dⱼ the frame-0 distance to neighbour j and d̄² the point's mean squared 3-NN distance, so a
Gaussian starts next to its own point (weight ≈ 0.4 on itself) while every neighbour still gets a usable
gradient; scales are √d̄² (isotropic); opacity 0.1; colours from the training views when given, else grey.

The optional static cage: S extra points on a regular grid in a box that never move, with their own
Gaussians (whose neighbours are cage points only), for scenes with static parts (e.g. the base of
D-NeRF's lego). Time is continuous: p(t) comes from the stage-1 network at any t in [0, 1].
"""
from __future__ import annotations

import torch
from torch import nn

SH_C0 = 0.28209479177387814
PARAMETER_NAMES = ("logits", "quats", "log_scales", "opacity_logits", "sh_dc", "sh_rest")
INDEX_NAMES = ("neighbor_idx", "anchors")


def rgb_to_sh(rgb: torch.Tensor) -> torch.Tensor:
    """Colour in [0, 1] -> degree-0 SH coefficient (the rasterizer adds 0.5 back)."""
    return (rgb - 0.5) / SH_C0


def inverse_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return torch.log(x / (1.0 - x))


def cage_points(box, resolution: int) -> torch.Tensor:
    """A regular ``resolution``³ grid of points filling ``box`` = [xmin, ymin, zmin, xmax, ymax, zmax] -> [r³, 3]."""
    box = [float(v) for v in box]
    if len(box) != 6:
        raise ValueError(f"static cage box must be [xmin, ymin, zmin, xmax, ymax, zmax], got {box}")
    lo, hi = torch.tensor(box[:3]), torch.tensor(box[3:])
    if not bool((hi > lo).all()):
        raise ValueError(f"static cage box must have max > min on every axis, got {box}")
    if resolution < 2:
        raise ValueError(f"static cage resolution must be >= 2, got {resolution}")
    steps = torch.linspace(0.0, 1.0, resolution)
    grid = torch.stack(torch.meshgrid(steps, steps, steps, indexing="ij"), dim=-1).reshape(-1, 3)
    return lo + grid * (hi - lo)


def _neighbours_including_self(points: torch.Tensor, k: int):
    """For each point: (dist2 [N, k], idx [N, k]) of itself and its k−1 nearest other points, ascending."""
    from npg.neighbors import knn

    n = points.shape[0]
    if n < k:
        raise ValueError(f"need at least {k} points to anchor Gaussians to {k} neighbours, got {n}")
    dist2, idx = knn(points.contiguous(), k - 1)
    self_idx = torch.arange(n, device=points.device)[:, None]
    return (
        torch.cat([torch.zeros_like(dist2[:, :1]), dist2], dim=1),
        torch.cat([self_idx, idx.to(torch.int64)], dim=1),
    )


class NPGGaussians(nn.Module):
    """Gaussians anchored to the stage-1 points (plus an optional static cage); see the module docstring.

    Per-Gaussian tensors are listed in ``PARAMETER_NAMES`` (learnable) and ``INDEX_NAMES`` (int32
    buffers: the skinning kernels read 23 indices per Gaussian every step, and int32 halves those
    bytes; on an H100 the 1M-Gaussian forward took 0.184 ms against 0.195 ms with int64). Densification replaces them wholesale, so a saved model is restored with
    ``NPGGaussians.from_state`` (which takes the shapes from the state), not ``load_state_dict``.
    """

    def __init__(
        self,
        logits,
        quats,
        log_scales,
        opacity_logits,
        sh_dc,
        sh_rest,
        neighbor_idx,
        anchors,
        static_points,
        num_dynamic: int,
        max_sh_degree: int = 3,
        active_sh_degree: int = 0,
    ):
        super().__init__()
        self.logits = nn.Parameter(logits)
        self.quats = nn.Parameter(quats)
        self.log_scales = nn.Parameter(log_scales)
        self.opacity_logits = nn.Parameter(opacity_logits)
        self.sh_dc = nn.Parameter(sh_dc)
        self.sh_rest = nn.Parameter(sh_rest)
        self.register_buffer("neighbor_idx", neighbor_idx.to(torch.int32))
        self.register_buffer("anchors", anchors.to(torch.int32))
        self.register_buffer("static_points", static_points.to(torch.float32).reshape(-1, 3))
        self.num_dynamic = int(num_dynamic)
        self.max_sh_degree = int(max_sh_degree)
        self.active_sh_degree = int(active_sh_degree)
        self._check()

    # ---------------------------------------------------------------------------------- building
    @classmethod
    def from_points(
        cls,
        points0: torch.Tensor,
        static_points: torch.Tensor | None = None,
        colors: torch.Tensor | None = None,
        static_colors: torch.Tensor | None = None,
        sh_degree: int = 3,
        num_neighbors: int = 20,
        init_opacity: float = 0.1,
    ) -> "NPGGaussians":
        """One Gaussian per point of frame 0 ``points0`` [N, 3] (and per static cage point [S, 3]).

        ``colors`` [N, 3] / ``static_colors`` [S, 3] in [0, 1] set the initial DC colour (grey if None).
        """
        from npg.neighbors import mean_dist2_knn3

        points0 = torch.as_tensor(points0, dtype=torch.float32)
        if points0.ndim != 2 or points0.shape[1] != 3:
            raise ValueError(f"stage-1 points must be [N, 3], got {tuple(points0.shape)}")
        if not torch.isfinite(points0).all():
            raise ValueError("stage-1 points hold NaN or Inf")
        if not 0.0 < init_opacity < 1.0:
            raise ValueError(f"init_opacity must be in (0, 1), got {init_opacity}")
        device = points0.device
        static_points = (
            torch.zeros(0, 3, device=device) if static_points is None else torch.as_tensor(static_points).to(device)
        )
        num_dynamic = points0.shape[0]

        groups = [(points0, 0, colors)]
        if static_points.shape[0] > 0:
            groups.append((static_points.float(), num_dynamic, static_colors))
        dist2_all, idx_all, colour_all, spread_all = [], [], [], []
        for points, offset, group_colors in groups:
            dist2, idx = _neighbours_including_self(points, num_neighbors)
            # mean squared distance to the 3 nearest other points (distCUDA2 semantics), floored as 3DGS
            spread = mean_dist2_knn3(points.contiguous()).clamp_min(1e-7)
            dist2_all.append(dist2)
            idx_all.append(idx + offset)
            spread_all.append(spread)
            if group_colors is None:
                group_colors = torch.full((points.shape[0], 3), 0.5, device=device)
            colour_all.append(torch.as_tensor(group_colors, dtype=torch.float32, device=device))
        dist2 = torch.cat(dist2_all)
        neighbor_idx = torch.cat(idx_all)
        spread = torch.cat(spread_all)
        colours = torch.cat(colour_all).clamp(0.0, 1.0)

        count = neighbor_idx.shape[0]
        logits = -dist2 / spread[:, None]
        anchors = neighbor_idx[:, :3].clone()  # the point itself, then its two nearest neighbours
        quats = torch.zeros(count, 4, device=device)
        quats[:, 0] = 1.0
        log_scales = torch.log(torch.sqrt(spread))[:, None].repeat(1, 3)
        opacity_logits = inverse_sigmoid(torch.full((count, 1), float(init_opacity), device=device))
        num_coeffs = (sh_degree + 1) ** 2
        sh_dc = rgb_to_sh(colours)[:, None, :]
        sh_rest = torch.zeros(count, num_coeffs - 1, 3, device=device)
        return cls(
            logits,
            quats,
            log_scales,
            opacity_logits,
            sh_dc,
            sh_rest,
            neighbor_idx,
            anchors,
            static_points,
            num_dynamic,
            max_sh_degree=sh_degree,
        )

    def _check(self):
        count = self.logits.shape[0]
        for name in PARAMETER_NAMES + INDEX_NAMES:
            if getattr(self, name).shape[0] != count:
                raise ValueError(f"NPGGaussians.{name} has {getattr(self, name).shape[0]} rows, expected {count}")
        if self.neighbor_idx.shape != self.logits.shape:
            raise ValueError(f"neighbor_idx {tuple(self.neighbor_idx.shape)} and logits {tuple(self.logits.shape)} differ")
        if self.anchors.shape[1:] != (3,) or self.quats.shape[1:] != (4,) or self.log_scales.shape[1:] != (3,):
            raise ValueError("NPGGaussians: anchors must be [G, 3], quats [G, 4], log_scales [G, 3]")
        if self.sh_rest.shape[1] != (self.max_sh_degree + 1) ** 2 - 1:
            raise ValueError(f"sh_rest has {self.sh_rest.shape[1]} coefficients, expected {(self.max_sh_degree + 1) ** 2 - 1}")
        total = self.num_points
        if count and (int(self.neighbor_idx.min()) < 0 or int(self.neighbor_idx.max()) >= total):
            raise ValueError(f"neighbor_idx holds indices outside [0, {total})")

    # ---------------------------------------------------------------------------------- sizes
    @property
    def num_gaussians(self) -> int:
        return self.logits.shape[0]

    @property
    def num_points(self) -> int:
        """Points the Gaussians blend: stage-1 points then static cage points."""
        return self.num_dynamic + self.static_points.shape[0]

    # ---------------------------------------------------------------------------------- activations
    @property
    def scales(self) -> torch.Tensor:
        return torch.exp(self.log_scales)

    @property
    def opacities(self) -> torch.Tensor:
        return torch.sigmoid(self.opacity_logits)

    @property
    def shs(self) -> torch.Tensor:
        return torch.cat([self.sh_dc, self.sh_rest], dim=1)

    def one_up_sh_degree(self) -> None:
        self.active_sh_degree = min(self.active_sh_degree + 1, self.max_sh_degree)

    def all_points(self, dynamic_points: torch.Tensor) -> torch.Tensor:
        """Stage-1 points at some time [N, 3] -> every point the Gaussians blend [N + S, 3]."""
        if dynamic_points.ndim != 2 or dynamic_points.shape != (self.num_dynamic, 3):
            raise ValueError(f"expected stage-1 points [{self.num_dynamic}, 3], got {tuple(dynamic_points.shape)}")
        if self.static_points.shape[0] == 0:
            return dynamic_points
        return torch.cat([dynamic_points, self.static_points.to(dynamic_points)], dim=0)

    def skin(self, dynamic_points: torch.Tensor, validate: bool = True):
        """Live stage-1 points [N, 3] -> (means [G, 3], unit rotations [G, 4] (w, x, y, z)).

        ``validate=False`` skips ``npg.skin``'s finiteness check (a device sync); bad values then
        surface as a non-finite loss, which the trainer checks."""
        from npg.skinning import skin

        points = self.all_points(dynamic_points)
        return skin(points, self.neighbor_idx, self.logits, self.anchors, self.quats, validate=validate)

    def render(self, dynamic_points, camera, background=None, means2d=None, scale_modifier: float = 1.0, validate: bool = True):
        """Rasterize the Gaussians posed by ``dynamic_points`` [N, 3] -> ``npg.RasterOutput``."""
        from npg.raster import rasterize

        means, rotations = self.skin(dynamic_points, validate=validate)
        return rasterize(
            means,
            self.opacities,
            camera,
            shs=self.shs,
            sh_degree=self.active_sh_degree,
            scales=self.scales,
            rotations=rotations,
            background=background,
            means2d=means2d,
            scale_modifier=scale_modifier,
        )

    # ---------------------------------------------------------------------------------- saving
    def state(self) -> dict:
        """Everything needed to rebuild the model (CPU tensors)."""
        tensors = {name: getattr(self, name).detach().cpu() for name in PARAMETER_NAMES + INDEX_NAMES}
        tensors["static_points"] = self.static_points.cpu()
        return {
            "tensors": tensors,
            "num_dynamic": self.num_dynamic,
            "max_sh_degree": self.max_sh_degree,
            "active_sh_degree": self.active_sh_degree,
        }

    @classmethod
    def from_state(cls, state: dict, device="cpu") -> "NPGGaussians":
        try:
            tensors = {k: v.to(device) for k, v in state["tensors"].items()}
            return cls(
                *(tensors[name] for name in PARAMETER_NAMES + INDEX_NAMES),
                tensors["static_points"],
                state["num_dynamic"],
                max_sh_degree=state["max_sh_degree"],
                active_sh_degree=state["active_sh_degree"],
            )
        except (KeyError, TypeError, AttributeError) as err:
            raise RuntimeError(f"not an npg stage-2 Gaussian state (missing or bad entry {err})") from err


def colors_from_views(points: torch.Tensor, cameras, images: torch.Tensor, masks: torch.Tensor | None = None):
    """Average colour of each point over the views where it projects inside the image (and mask).

    points [F, N, 3] (the cloud at each view's time), cameras: F Cameras, images [F, 3, H, W] in [0, 1],
    masks [F, H, W] bool or None -> colours [N, 3] (grey where a point is never seen).
    """
    from torch.nn import functional as F

    total = torch.zeros(points.shape[1], 3, device=points.device)
    count = torch.zeros(points.shape[1], 1, device=points.device)
    for f, camera in enumerate(cameras):
        camera = camera.to(points.device)
        pixels, depth = camera.project(points[f])
        width, height = camera.width, camera.height
        grid = torch.stack([(2 * pixels[:, 0] + 1) / width - 1, (2 * pixels[:, 1] + 1) / height - 1], dim=-1)
        inside = (depth > 0) & (grid.abs() <= 1).all(dim=-1)
        sampled = F.grid_sample(images[f : f + 1], grid[None, :, None, :], mode="bilinear", align_corners=False)
        sampled = sampled[0, :, :, 0].T  # [N, 3]
        if masks is not None:
            mask = F.grid_sample(masks[f : f + 1, None].float(), grid[None, :, None, :], mode="nearest", align_corners=False)
            inside &= mask[0, 0, :, 0] > 0.5
        total += sampled * inside[:, None]
        count += inside[:, None].float()
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, 0.5))


def quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """Unit quaternions [..., 4] (w, x, y, z) -> rotation matrices [..., 3, 3]."""
    q = torch.nn.functional.normalize(q, dim=-1)
    w, x, y, z = q.unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(q.shape[:-1] + (3, 3))


def scene_extent(cameras, center: torch.Tensor) -> float:
    """1.1 × the largest camera distance from the object centre (3DGS's ``cameras_extent`` for a camera ring).

    3DGS measures from the cameras' own centroid; for a monocular arc or a nearly static camera that
    centroid says nothing about the scene's size, the object centre does.
    """
    centers = torch.stack([camera.campos for camera in cameras]).double()
    return float(1.1 * (centers - center.double().cpu()).norm(dim=-1).max())


__all__ = [
    "NPGGaussians",
    "PARAMETER_NAMES",
    "INDEX_NAMES",
    "cage_points",
    "colors_from_views",
    "quaternion_to_matrix",
    "rgb_to_sh",
    "inverse_sigmoid",
    "scene_extent",
]
