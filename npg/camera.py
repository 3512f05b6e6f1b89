"""Pinhole cameras in OpenCV axes, shared by the rasterizer, the data loaders and the trainers.

Conventions (those of ``../shared/refdata/README.md``, i.e. standard 3DGS):
- ``w2c`` maps world to camera coordinates with x right, y down, z forward (OpenCV).
- Pixel (x, y) is evaluated at the integer coordinates (x, y); a camera point (X, Y, Z) projects to
  (fx·X/Z + cx, fy·Y/Z + cy). A centred principal point is cx = (W − 1)/2, cy = (H − 1)/2.
- NDC: x_ndc = (2·x_pix + 1)/W − 1, so d/d(x_ndc) = (W/2)·d/d(x_pix). The screen-space gradients the
  rasterizer reports for densification are in these NDC units.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class Camera:
    w2c: torch.Tensor  # [4, 4] world -> camera, OpenCV axes
    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int
    znear: float = 0.01
    zfar: float = 100.0

    def __post_init__(self):
        w2c = torch.as_tensor(self.w2c)
        if w2c.shape != (4, 4):
            raise ValueError(f"Camera.w2c must be [4, 4], got {tuple(w2c.shape)}")
        if not torch.isfinite(w2c).all():
            raise ValueError("Camera.w2c holds NaN or Inf")
        if self.width < 1 or self.height < 1:
            raise ValueError(f"Camera image size must be positive, got {self.width}x{self.height}")
        for name in ("fx", "fy", "cx", "cy"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"Camera.{name} is not finite")
        if self.fx <= 0 or self.fy <= 0:
            raise ValueError(f"Camera focal lengths must be positive, got fx={self.fx}, fy={self.fy}")
        object.__setattr__(self, "w2c", w2c.to(torch.float32))

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_fov(cls, w2c, tanfovx: float, tanfovy: float, width: int, height: int, **kw) -> "Camera":
        """The 3DGS camera: fx = W/(2·tanfovx), fy = H/(2·tanfovy), centred principal point."""
        return cls(
            w2c=torch.as_tensor(w2c),
            fx=width / (2.0 * tanfovx),
            fy=height / (2.0 * tanfovy),
            cx=(width - 1) / 2.0,
            cy=(height - 1) / 2.0,
            width=int(width),
            height=int(height),
            **kw,
        )

    @classmethod
    def from_K(cls, K, w2c, width: int, height: int, **kw) -> "Camera":
        """From a 3×3 OpenCV intrinsic matrix (pixel centres at integer coordinates)."""
        K = torch.as_tensor(K, dtype=torch.float64)
        return cls(
            w2c=torch.as_tensor(w2c),
            fx=float(K[0, 0]),
            fy=float(K[1, 1]),
            cx=float(K[0, 2]),
            cy=float(K[1, 2]),
            width=int(width),
            height=int(height),
            **kw,
        )

    # ----------------------------------------------------------------- derived quantities
    @property
    def tanfovx(self) -> float:
        return self.width / (2.0 * self.fx)

    @property
    def tanfovy(self) -> float:
        return self.height / (2.0 * self.fy)

    @property
    def K(self) -> torch.Tensor:
        return torch.tensor(
            [[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]], dtype=torch.float32
        )

    @property
    def campos(self) -> torch.Tensor:
        """Camera centre in world space, [3]."""
        R = self.w2c[:3, :3].double()
        t = self.w2c[:3, 3].double()
        return (-R.T @ t).to(torch.float32)

    @property
    def c2w(self) -> torch.Tensor:
        return torch.linalg.inv(self.w2c.double()).to(torch.float32)

    def projection(self) -> torch.Tensor:
        """The 3DGS projection matrix P (column-vector form) for a centred principal point."""
        P = torch.zeros(4, 4, dtype=torch.float64)
        P[0, 0] = 1.0 / self.tanfovx
        P[1, 1] = 1.0 / self.tanfovy
        P[3, 2] = 1.0
        P[2, 2] = self.zfar / (self.zfar - self.znear)
        P[2, 3] = -(self.zfar * self.znear) / (self.zfar - self.znear)
        return P

    @property
    def viewmatrix(self) -> torch.Tensor:
        """``w2c.T``: the row-vector layout diff_gaussian_rasterization takes."""
        return self.w2c.T.contiguous()

    @property
    def projmatrix(self) -> torch.Tensor:
        """``viewmatrix @ P.T`` as diff_gaussian_rasterization takes it."""
        return (self.w2c.double().T @ self.projection().T).to(torch.float32)

    # ----------------------------------------------------------------- transforms
    def to(self, device) -> "Camera":
        """This camera with ``w2c`` on ``device``; itself when it is there already (renderers call
        this every frame, and a new Camera re-validates w2c: a device sync on a GPU)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device == self.w2c.device:
            return self
        return replace(self, w2c=self.w2c.to(device))

    @functools.cached_property
    def w2c_host(self) -> torch.Tensor:
        """``w2c`` as a float64 CPU tensor, copied from the device once per Camera: the CUDA rasterizer
        passes the camera to its kernels as host numbers on every call."""
        return self.w2c.detach().to(device="cpu", dtype=torch.float64)

    def scaled(self, factor: float) -> "Camera":
        """The same camera for an image resized by ``factor`` (e.g. 0.5 for 800→400).

        Pixel centres stay at integer coordinates: x' = (x + 0.5)·factor − 0.5.
        """
        width = int(round(self.width * factor))
        height = int(round(self.height * factor))
        return replace(
            self,
            fx=self.fx * factor,
            fy=self.fy * factor,
            cx=(self.cx + 0.5) * factor - 0.5,
            cy=(self.cy + 0.5) * factor - 0.5,
            width=width,
            height=height,
        )

    def project(self, points: torch.Tensor):
        """World points [..., 3] -> (pixel coordinates [..., 2], camera-space depth z [...])."""
        w2c = self.w2c.to(points)
        cam = points @ w2c[:3, :3].T + w2c[:3, 3]
        z = cam[..., 2]
        safe_z = torch.where(z.abs() < 1e-8, torch.full_like(z, 1e-8), z)
        u = self.fx * cam[..., 0] / safe_z + self.cx
        v = self.fy * cam[..., 1] / safe_z + self.cy
        return torch.stack([u, v], dim=-1), z
