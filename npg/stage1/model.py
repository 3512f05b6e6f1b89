"""The low-rank neural deformation model of stage 1.

A cloud of N points moves as a combination of K basis shapes, X(t) = Σₖ αₖ(t)·Bₖ, with no mean
shape. The coefficients come from an MLP of the encoded time: α(t) = head(trunk(γ(τ(t)))).

Time. Datasets store a continuous time t ∈ [0, 1]; the original NPG feeds the network the frame
index as τ = (f + 1)/F for training frame f of F. We map t to τ = (t·(F − 1) + 1)/F, which gives
exactly that for t = f/(F − 1) and is defined for every t in between, so stage 2 can query test views
at any time without snapping to a training frame.

Encoding. γ(τ) = [τ, sin(2⁰τ), cos(2⁰τ), …, sin(2^{L−1}τ), cos(2^{L−1}τ)] (L = 6 or 8 for D-NeRF
scenes; the original uses L = 30 for Ub4D data, which for τ on a 1/F grid amounts to a per-frame code).
The optional learned per-frame embedding offers that directly: one vector per training frame,
interpolated linearly in t so that it, too, is defined at any time.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def time_to_tau(times: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Dataset time t ∈ [0, 1] [B] -> network time τ = (t·(F−1) + 1)/F [B]."""
    return (times * (num_frames - 1) + 1.0) / num_frames


def positional_encoding(tau: torch.Tensor, num_frequencies: int) -> torch.Tensor:
    """γ(τ) for τ [B] -> [B, 1 + 2L]: [τ, sin(2⁰τ), cos(2⁰τ), …] (no π factor, as the original)."""
    tau = tau[:, None]
    bands = [tau]
    for i in range(num_frequencies):
        scaled = tau * (2.0**i)
        bands += [torch.sin(scaled), torch.cos(scaled)]
    return torch.cat(bands, dim=-1)


def _init_linear(layer: nn.Linear, std: float) -> nn.Linear:
    nn.init.normal_(layer.weight, 0.0, std)
    nn.init.zeros_(layer.bias)
    return layer


class BottleneckBlock(nn.Module):
    """x -> LeakyReLU(x + W₃·σ(W₂·σ(W₁·x))), widths 512 -> 128 -> 128 -> 512."""

    def __init__(self, width: int, bottleneck: int, init_std: float):
        super().__init__()
        self.reduce = _init_linear(nn.Linear(width, bottleneck), init_std)
        self.middle = _init_linear(nn.Linear(bottleneck, bottleneck), init_std)
        self.expand = _init_linear(nn.Linear(bottleneck, width), init_std)

    def forward(self, x):
        h = F.leaky_relu(self.reduce(x), 0.01)
        h = F.leaky_relu(self.middle(h), 0.01)
        return F.leaky_relu(x + self.expand(h), 0.01)


class DeformationModel(nn.Module):
    """X(t) = Σₖ αₖ(t)·Bₖ for N points and K basis shapes; ``model(times [B]) -> points [B, N, 3]``.

    Parameters: the MLP and the basis B [K, N, 3] (and the per-frame embedding when enabled). The
    per-point features [N, C] are fixed random colours splatted by the flow loss (a buffer).
    """

    def __init__(
        self,
        num_points: int = 5000,
        num_basis: int = 47,
        num_frames: int = 50,
        num_frequencies: int = 6,
        width: int = 512,
        bottleneck: int = 128,
        num_blocks: int = 6,
        frame_embedding_dim: int = 0,
        feature_channels: int = 3,
        init_std: float = 0.01,
        seed: int = 0,
    ):
        super().__init__()
        if num_points < 1 or num_basis < 1:
            raise ValueError(f"need num_points >= 1 and num_basis >= 1, got {num_points} and {num_basis}")
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        self.hparams = dict(
            num_points=num_points,
            num_basis=num_basis,
            num_frames=num_frames,
            num_frequencies=num_frequencies,
            width=width,
            bottleneck=bottleneck,
            num_blocks=num_blocks,
            frame_embedding_dim=frame_embedding_dim,
            feature_channels=feature_channels,
            init_std=init_std,
            seed=seed,
        )
        self.num_points = num_points
        self.num_basis = num_basis
        self.num_frames = num_frames
        self.num_frequencies = num_frequencies
        self.frame_embedding_dim = frame_embedding_dim

        # The basis and the features come from their own generator so a given seed gives the same
        # initial model whatever else has drawn from the global RNG.
        generator = torch.Generator().manual_seed(seed)
        basis = torch.randn(num_basis, num_points, 3, generator=generator)
        self.basis = nn.Parameter(F.normalize(basis, dim=0))  # unit norm over K per point coordinate
        self.register_buffer("features", torch.rand(num_points, feature_channels, generator=generator))

        if frame_embedding_dim > 0:
            codes = torch.randn(num_frames, frame_embedding_dim, generator=generator) * init_std
            self.frame_embedding = nn.Parameter(codes)
        else:
            self.register_parameter("frame_embedding", None)

        in_dim = 1 + 2 * num_frequencies + frame_embedding_dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            self.stem = _init_linear(nn.Linear(in_dim, width), init_std)
            self.blocks = nn.Sequential(*[BottleneckBlock(width, bottleneck, init_std) for _ in range(num_blocks)])
            self.head = _init_linear(nn.Linear(width, num_basis), init_std)

    def _frame_code(self, times: torch.Tensor) -> torch.Tensor:
        """Per-frame embedding interpolated linearly at continuous times [B] -> [B, D]."""
        position = times.clamp(0.0, 1.0) * (self.num_frames - 1)
        lower = position.floor().long().clamp(max=self.num_frames - 1)
        upper = (lower + 1).clamp(max=self.num_frames - 1)
        weight = (position - lower.to(position.dtype))[:, None]
        return self.frame_embedding[lower] * (1.0 - weight) + self.frame_embedding[upper] * weight

    def encode(self, times: torch.Tensor) -> torch.Tensor:
        """Network input for dataset times [B] -> [B, 1 + 2L (+ D)]."""
        encoded = positional_encoding(time_to_tau(times, self.num_frames), self.num_frequencies)
        if self.frame_embedding is not None:
            encoded = torch.cat([encoded, self._frame_code(times)], dim=-1)
        return encoded

    def coefficients(self, times: torch.Tensor, validate: bool = True) -> torch.Tensor:
        """α(t) for dataset times [B] in [0, 1] -> [B, K]. ``validate=False`` skips the finiteness test
        of ``times`` (a host sync for device tensors; a caller that checked them, or a CUDA graph)."""
        times = self._check_times(times, check_finite=validate)
        h = F.leaky_relu(self.stem(self.encode(times)), 0.01)
        return self.head(self.blocks(h))

    def points_from_coefficients(self, coefficients: torch.Tensor) -> torch.Tensor:
        """[B, K] -> [B, N, 3]."""
        return torch.einsum("bk,knc->bnc", coefficients, self.basis)

    def forward(self, times: torch.Tensor, validate: bool = True) -> torch.Tensor:
        """Dataset times [B] (float in [0, 1]) -> points [B, N, 3]; differentiable. ``validate``: as
        for ``coefficients``."""
        return self.points_from_coefficients(self.coefficients(times, validate=validate))

    def _check_times(self, times, check_finite: bool = True) -> torch.Tensor:
        times = torch.as_tensor(times, dtype=self.basis.dtype, device=self.basis.device)
        if times.dim() == 0:
            times = times[None]
        if times.dim() != 1:
            raise ValueError(f"times must be a 1-D tensor [B], got shape {tuple(times.shape)}")
        if check_finite and not torch.isfinite(times).all():
            raise ValueError("times hold NaN or Inf")
        return times

    @classmethod
    def from_hparams(cls, hparams: dict) -> "DeformationModel":
        return cls(**hparams)

