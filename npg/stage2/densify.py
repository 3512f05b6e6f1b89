"""3DGS adaptive density control for Gaussians whose means are blends of stage-1 points.

What 3DGS does, and what changes here:

- Statistics: per Gaussian, the screen-space gradient norm ‖∂L/∂(NDC x, y)‖ of its projected centre
  (``RasterOutput.means2d.grad[:, :2]``) summed over the steps where it was visible, the visible-step
  count, and the largest screen radius. They are reset after every densification.
- Clone: average gradient ≥ threshold (2e-4 NDC) and largest scale ≤ percent_dense·extent → a copy.
  A copy has the same blend logits, so the same mean; the two drift apart as they receive different
  gradients (3DGS's clones also start at their parent's position).
- Split: average gradient ≥ threshold and larger than that → ``split_children`` (2) children whose
  scales are divided by 0.8·children and whose means 3DGS draws from the parent's Gaussian. A mean
  here is Σⱼ softmax(l)ⱼ·pⱼ and cannot be set directly, so each child's logits are fitted to its drawn
  target by a few damped Gauss-Newton steps on l (Jacobian ∂m/∂lⱼ = wⱼ(pⱼ − m), minimum-norm updates).
  Targets outside the convex hull of the 20 neighbours end on the hull's nearest reachable point: a
  child cannot leave its local volume, which is the point of anchoring. Children inherit the
  neighbour indices and anchor triangle; the parent is removed.
- Prune: opacity < min_opacity; after the first opacity reset also screen radius > max_screen_size
  pixels and largest world scale > world_size_prune·extent.
- Opacity reset: opacity ← min(opacity, 0.01) with that group's Adam moments zeroed.

Every change keeps the Adam state of every per-Gaussian parameter aligned with its rows (moments of
kept rows move with them, new rows start at zero), replaces the parameters in the optimizer's param
groups and keeps the integer buffers (``neighbor_idx``, ``anchors``) and the statistics in step.
"""
from __future__ import annotations

import torch
from torch import nn

from npg.stage2.model import INDEX_NAMES, PARAMETER_NAMES, inverse_sigmoid, quaternion_to_matrix


# ------------------------------------------------------------------------------------ optimizer rows
def _swap_parameter(model, optimizer, name: str, new_value: torch.Tensor, transform_state) -> None:
    """Replace ``model.<name>`` by a Parameter holding ``new_value``; in the optimizer, put the new
    Parameter in the old one's place and map each per-row state tensor through ``transform_state``."""
    old = getattr(model, name)
    new = nn.Parameter(new_value.detach().contiguous(), requires_grad=old.requires_grad)
    if optimizer is not None:
        for group in optimizer.param_groups:
            for i, param in enumerate(group["params"]):
                if param is old:
                    group["params"][i] = new
        state = optimizer.state.pop(old, None)
        if state:
            for key, value in state.items():
                # Adam's "step" is a 0-d tensor shared by every row; moments have one row per Gaussian
                if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == old.shape[0]:
                    state[key] = transform_state(value)
            optimizer.state[new] = state
    setattr(model, name, new)


def append_gaussians(model, optimizer, rows: dict) -> None:
    """Append M Gaussians: ``rows`` maps every name of PARAMETER_NAMES and INDEX_NAMES to M rows.
    New rows start with zero Adam moments."""
    missing = [name for name in PARAMETER_NAMES + INDEX_NAMES if name not in rows]
    if missing:
        raise ValueError(f"append_gaussians: no rows given for {missing}")
    count = rows["logits"].shape[0]
    if count == 0:
        return
    for name in PARAMETER_NAMES:
        extra = rows[name].to(getattr(model, name))
        if extra.shape[0] != count or extra.shape[1:] != getattr(model, name).shape[1:]:
            raise ValueError(f"append_gaussians: {name} rows {tuple(extra.shape)} do not fit {tuple(getattr(model, name).shape)}")
        _swap_parameter(
            model,
            optimizer,
            name,
            torch.cat([getattr(model, name).detach(), extra]),
            lambda state, extra=extra: torch.cat([state, torch.zeros_like(extra, dtype=state.dtype)]),
        )
    for name in INDEX_NAMES:
        setattr(model, name, torch.cat([getattr(model, name), rows[name].to(getattr(model, name))]))


def keep_gaussians(model, optimizer, keep: torch.Tensor) -> None:
    """Keep the Gaussians where the bool mask ``keep`` [G] is True, with their Adam moments."""
    if keep.dtype != torch.bool or keep.shape != (model.num_gaussians,):
        raise ValueError(f"keep must be a bool mask [{model.num_gaussians}], got {keep.dtype} {tuple(keep.shape)}")
    for name in PARAMETER_NAMES:
        _swap_parameter(model, optimizer, name, getattr(model, name).detach()[keep], lambda state: state[keep])
    for name in INDEX_NAMES:
        setattr(model, name, getattr(model, name)[keep])


def reset_opacity(model, optimizer, max_opacity: float = 0.01) -> None:
    """opacity ← min(opacity, max_opacity); the opacity group's Adam moments restart from zero."""
    value = inverse_sigmoid(torch.clamp_max(model.opacities.detach(), max_opacity))
    _swap_parameter(model, optimizer, "opacity_logits", value, torch.zeros_like)


# ------------------------------------------------------------------------------------ split placement
def fit_blend_logits(
    neighbor_points: torch.Tensor,
    logits: torch.Tensor,
    targets: torch.Tensor,
    iterations: int = 8,
    damping: float = 1e-4,
    max_step: float = 4.0,
) -> torch.Tensor:
    """Logits whose blend Σⱼ softmax(l)ⱼ·pⱼ approaches ``targets``, starting from ``logits``.

    neighbor_points [K, J, 3], logits [K, J], targets [K, 3] -> logits [K, J]. Damped Gauss-Newton
    with minimum-norm steps Δl = Jᵀ(J·Jᵀ + λI)⁻¹r (J = ∂m/∂l, [3, J] per row), each step's norm capped
    at ``max_step``; a step that does not reduce the residual is rejected.
    """
    logits = logits.detach().clone()
    points = neighbor_points.detach()

    def blend(l):
        weights = torch.softmax(l, dim=-1)
        return weights, torch.einsum("kj,kjc->kc", weights, points)

    weights, mean = blend(logits)
    residual = targets - mean
    eye = torch.eye(3, dtype=points.dtype, device=points.device)
    for _ in range(iterations):
        jac = weights[..., None] * (points - mean[:, None, :])  # [K, J, 3]: ∂m/∂lⱼ
        normal = jac.transpose(1, 2) @ jac  # [K, 3, 3]
        scale = normal.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1e-20)[:, None, None]
        solve = torch.linalg.solve(normal + damping * scale * eye, residual[..., None])[..., 0]
        step = torch.einsum("kjc,kc->kj", jac, solve)
        norm = step.norm(dim=-1, keepdim=True)
        step = step * torch.clamp(max_step / norm.clamp_min(1e-12), max=1.0)
        candidate = logits + step
        cand_weights, cand_mean = blend(candidate)
        cand_residual = targets - cand_mean
        better = (cand_residual.norm(dim=-1) < residual.norm(dim=-1))[:, None]
        logits = torch.where(better, candidate, logits)
        weights = torch.where(better, cand_weights, weights)
        mean = torch.where(better, cand_mean, mean)
        residual = torch.where(better, cand_residual, residual)
    return logits


# ------------------------------------------------------------------------------------ controller
class DensityController:
    """Accumulates the densification statistics and applies clone / split / prune / opacity reset.

    ``extent`` is the scene extent (``npg.stage2.model.scene_extent``): percent_dense and the world-size
    prune are fractions of it, as in 3DGS.
    """

    def __init__(
        self,
        num_gaussians: int,
        device,
        extent: float,
        grad_threshold: float = 2e-4,
        percent_dense: float = 0.01,
        min_opacity: float = 0.005,
        max_screen_size: float = 20.0,
        world_size_prune: float = 0.1,
        split_children: int = 2,
        max_gaussians: int = 2_000_000,
    ):
        if extent <= 0:
            raise ValueError(f"scene extent must be positive, got {extent}")
        if split_children < 2:
            raise ValueError(f"split_children must be >= 2, got {split_children}")
        self.extent = float(extent)
        self.grad_threshold = grad_threshold
        self.percent_dense = percent_dense
        self.min_opacity = min_opacity
        self.max_screen_size = max_screen_size
        self.world_size_prune = world_size_prune
        self.split_children = split_children
        self.max_gaussians = max_gaussians
        self._reset_stats(num_gaussians, device)

    def _reset_stats(self, count: int, device) -> None:
        self.grad_accum = torch.zeros(count, device=device)
        self.denom = torch.zeros(count, device=device)
        self.max_radii = torch.zeros(count, device=device)

    def state(self) -> dict:
        return {"grad_accum": self.grad_accum.cpu(), "denom": self.denom.cpu(), "max_radii": self.max_radii.cpu()}

    def load_state(self, state: dict, device) -> None:
        self.grad_accum = state["grad_accum"].to(device)
        self.denom = state["denom"].to(device)
        self.max_radii = state["max_radii"].to(device)

    def accumulate(self, means2d_grad: torch.Tensor, radii: torch.Tensor) -> None:
        """Add one step's statistics: means2d_grad [G, 3] (NDC; only x, y used), radii [G] (0 = not visible)."""
        if means2d_grad.shape[0] != self.grad_accum.shape[0] or radii.shape[0] != self.grad_accum.shape[0]:
            raise ValueError(
                f"densification statistics hold {self.grad_accum.shape[0]} Gaussians, got gradients for "
                f"{means2d_grad.shape[0]} and radii for {radii.shape[0]}"
            )
        visible = radii > 0
        self.grad_accum += torch.where(visible, means2d_grad[:, :2].norm(dim=-1), 0.0)
        self.denom += visible
        self.max_radii = torch.where(visible, torch.maximum(self.max_radii, radii.to(self.max_radii)), self.max_radii)

    def densify_and_prune(self, model, optimizer, dynamic_points, generator=None, prune_large: bool = False) -> dict:
        """Clone and split where the average screen gradient is high, then prune; resets the statistics.

        dynamic_points [N, 3]: the stage-1 points of the current step (places the split children).
        Returns counts {"cloned", "split", "pruned", "gaussians"}.
        """
        count = model.num_gaussians
        grads = torch.nan_to_num(self.grad_accum / self.denom, nan=0.0, posinf=0.0)
        max_scale = model.scales.detach().max(dim=1).values
        large = max_scale > self.percent_dense * self.extent
        selected = grads >= self.grad_threshold
        selected = self._limit_growth(selected, grads, large, count)
        clone_idx = torch.nonzero(selected & ~large).flatten()
        split_idx = torch.nonzero(selected & large).flatten()

        new_rows = [self._clone_rows(model, clone_idx), self._split_rows(model, split_idx, dynamic_points, generator)]
        rows = {name: torch.cat([r[name] for r in new_rows]) for name in PARAMETER_NAMES + INDEX_NAMES}
        added = rows["logits"].shape[0]
        append_gaussians(model, optimizer, rows)

        prune = torch.zeros(model.num_gaussians, dtype=torch.bool, device=grads.device)
        prune[split_idx] = True
        prune |= model.opacities.detach()[:, 0] < self.min_opacity
        if prune_large:
            padded_radii = torch.cat([self.max_radii, torch.zeros(added, device=grads.device)])
            prune |= padded_radii > self.max_screen_size
            prune |= model.scales.detach().max(dim=1).values > self.world_size_prune * self.extent
        if bool(prune.all()):
            # never prune down to nothing: keep the most opaque Gaussian so training can recover
            prune[torch.argmax(model.opacities.detach()[:, 0])] = False
        keep_gaussians(model, optimizer, ~prune)
        self._reset_stats(model.num_gaussians, grads.device)
        return {
            "cloned": int(clone_idx.numel()),
            "split": int(split_idx.numel()),
            "pruned": int(prune.sum()) - int(split_idx.numel()),
            "gaussians": model.num_gaussians,
        }

    def _limit_growth(self, selected, grads, large, count):
        """Keep the highest-gradient candidates so the count stays within ``max_gaussians``."""
        growth = torch.where(large, self.split_children - 1, 1) * selected
        budget = self.max_gaussians - count
        if int(growth.sum()) <= budget:
            return selected
        order = torch.argsort(torch.where(selected, grads, -1.0), descending=True)
        fits = torch.cumsum(growth[order], 0) <= max(budget, 0)
        limited = torch.zeros_like(selected)
        limited[order[fits]] = True
        return limited & selected

    @staticmethod
    def _clone_rows(model, idx) -> dict:
        return {name: getattr(model, name).detach()[idx] for name in PARAMETER_NAMES + INDEX_NAMES}

    def _split_rows(self, model, idx, dynamic_points, generator) -> dict:
        from npg.skinning import skin

        children = self.split_children
        rows = {name: getattr(model, name).detach()[idx].repeat_interleave(children, dim=0) for name in PARAMETER_NAMES + INDEX_NAMES}
        if idx.numel() == 0:
            return rows
        points = model.all_points(dynamic_points.detach())
        with torch.no_grad():
            means, rotations = skin(points, model.neighbor_idx[idx], model.logits[idx], model.anchors[idx], model.quats[idx])
            stds = model.scales[idx].repeat_interleave(children, dim=0)
            noise = torch.randn(stds.shape, generator=generator, device="cpu" if generator is None else generator.device)
            offsets = (quaternion_to_matrix(rotations).repeat_interleave(children, dim=0) @ (noise.to(stds) * stds)[..., None])[..., 0]
            targets = means.repeat_interleave(children, dim=0) + offsets
            rows["logits"] = fit_blend_logits(points[rows["neighbor_idx"]], rows["logits"], targets)
            rows["log_scales"] = torch.log(stds / (0.8 * children))
        return rows
