"""Image-quality metrics of the evaluation protocol: PSNR, SSIM (TiNeuVox convention) and LPIPS-VGG.

- ``psnr``: −10·log10(MSE) over all pixels and channels of images in [0, 1].
- ``ssim_eval``: ``npg.ssim`` with an 11×11 Gaussian window (σ = 1.5), no padding ("valid"), the mean
  over channels and positions — the convention of TiNeuVox's evaluation code, which D-NeRF-scene
  papers report.
- ``load_lpips``: LPIPS with the VGG-16 backbone (Zhang et al. 2018, v0.1 linear layers). The weights
  cannot be downloaded here, so they come from a local path: the ``weights`` argument or the
  environment variable ``NPG_LPIPS_WEIGHTS``. Accepted: one file holding the ``lpips.LPIPS(net="vgg")``
  state dict, or a folder (or a list of files joined by ``os.pathsep``) holding torchvision's VGG-16
  weights (``features.*``) and the LPIPS linear layers (``lin0.model.1.weight`` … as in lpips's
  ``weights/v0.1/vgg.pth``). Without weights ``load_lpips`` returns ``None`` and says why. When the
  ``lpips`` package is installed and no path is given, it is tried (it finds torchvision's weights
  only if they are already cached on this machine).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

LPIPS_ENV = "NPG_LPIPS_WEIGHTS"

# VGG-16 ``features``: (index of each conv, in_channels, out_channels); ReLU after each conv and
# 2×2 max-pooling before each stage after the first.
_VGG_CONVS = [
    (0, 3, 64), (2, 64, 64),
    (5, 64, 128), (7, 128, 128),
    (10, 128, 256), (12, 256, 256), (14, 256, 256),
    (17, 256, 512), (19, 512, 512), (21, 512, 512),
    (24, 512, 512), (26, 512, 512), (28, 512, 512),
]
_STAGE_ENDS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_STAGE_CHANNELS = (64, 128, 256, 512, 512)
_POOLS = (4, 9, 16, 23)


def _check_pair(image: torch.Tensor, target: torch.Tensor) -> None:
    if image.shape != target.shape:
        raise ValueError(f"images differ in shape: {tuple(image.shape)} vs {tuple(target.shape)}")
    if image.ndim not in (3, 4) or image.shape[-3] != 3:
        raise ValueError(f"expected [3, H, W] or [B, 3, H, W] images, got {tuple(image.shape)}")
    if not (torch.isfinite(image).all() and torch.isfinite(target).all()):
        raise ValueError("images hold NaN or Inf")


def psnr(image: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR in dB of images in [0, 1] ([3, H, W] or [B, 3, H, W]); inf for identical images."""
    _check_pair(image, target)
    mse = float(((image.float() - target.float()) ** 2).mean())
    return math.inf if mse == 0.0 else -10.0 * math.log10(mse)


def ssim_eval(image: torch.Tensor, target: torch.Tensor) -> float:
    """SSIM with the 11×11 Gaussian window (σ 1.5), "valid" filtering, mean over channels and pixels."""
    from npg.similarity import ssim

    _check_pair(image, target)
    with torch.no_grad():
        return float(ssim(image.float(), target.float(), padding="valid"))


class LPIPSVGG(nn.Module):
    """LPIPS distance with the VGG-16 backbone: ``model(a, b)`` for [B, 3, H, W] in [0, 1] -> [B].

    d(a, b) = Σₗ mean_{h,w} wₗ · (f̂ₗ(a) − f̂ₗ(b))², f̂ₗ the channel-normalised relu{1_2, 2_2, 3_3,
    4_3, 5_3} features of the input scaled to [−1, 1] and shifted/scaled by LPIPS's ImageNet
    statistics, wₗ the learned non-negative 1×1 linear layers.
    """

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleDict({str(i): nn.Conv2d(cin, cout, 3, padding=1) for i, cin, cout in _VGG_CONVS})
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _STAGE_CHANNELS)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])
        self.requires_grad_(False)
        self.eval()

    def features(self, x: torch.Tensor) -> list:
        x = ((2.0 * x - 1.0) - self.shift) / self.scale
        outputs = []
        for index in range(_STAGE_ENDS[-1] + 1):
            if str(index) in self.convs:
                x = F.relu(self.convs[str(index)](x))
            elif index in _POOLS:
                x = F.max_pool2d(x, 2, 2)
            if index in _STAGE_ENDS:
                outputs.append(x)
        return outputs

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        total = 0.0
        for lin, fa, fb in zip(self.lins, self.features(a), self.features(b)):
            fa = fa / (fa.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            fb = fb / (fb.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((fa - fb) ** 2).mean(dim=(2, 3))
        return total[:, 0]

    def load_weights(self, state: dict, source: str) -> None:
        """Load a merged state dict in the lpips or torchvision+lpips layouts (see module docstring)."""
        mapped = {}
        for key, value in state.items():
            key = key.removeprefix("module.")
            parts = key.split(".")
            if len(parts) == 4 and parts[0] == "net" and parts[1].startswith("slice"):  # net.slice2.5.weight
                mapped[f"convs.{parts[2]}.{parts[3]}"] = value
            elif len(parts) == 3 and parts[0] == "features":  # features.5.weight
                mapped[f"convs.{parts[1]}.{parts[2]}"] = value
            elif parts[0].startswith("lin") and parts[0][3:].isdigit() and parts[-1] == "weight":  # lin0.model.1.weight
                mapped[f"lins.{parts[0][3:]}.weight"] = value
        expected = {k for k in self.state_dict() if k not in ("shift", "scale")}
        missing = sorted(expected - set(mapped))
        if missing:
            raise RuntimeError(
                f"LPIPS weights from {source} lack {len(missing)} tensors (e.g. {', '.join(missing[:4])}); "
                f"need VGG-16 features and the LPIPS linear layers (see npg.metrics)"
            )
        for key in expected:
            if mapped[key].shape != self.state_dict()[key].shape:
                raise RuntimeError(f"LPIPS weights from {source}: {key} has shape {tuple(mapped[key].shape)}, expected {tuple(self.state_dict()[key].shape)}")
        self.load_state_dict({k: mapped[k] for k in expected}, strict=False)


def _weight_files(spec: str) -> list[Path]:
    files = []
    for part in spec.split(os.pathsep):
        path = Path(part).expanduser()
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix in (".pth", ".pt", ".bin"))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"LPIPS weights not found: {path}")
    if not files:
        raise FileNotFoundError(f"no .pth/.pt weight files in {spec}")
    return files


def load_lpips(weights: str | os.PathLike | None = None, device="cpu", verbose: bool = True):
    """An LPIPS-VGG callable ``f(image [B,3,H,W], target) -> [B]`` (images in [0, 1]), or None.

    ``weights``: a path (see module docstring); None reads ``$NPG_LPIPS_WEIGHTS``. None is returned,
    with a message, when no weights are available; unreadable or incomplete weights are an error.
    """
    spec = os.fspath(weights) if weights is not None else os.environ.get(LPIPS_ENV)
    if spec:
        state = {}
        for path in _weight_files(spec):
            try:
                loaded = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # torch raises several types for foreign or truncated files
                raise RuntimeError(f"cannot read LPIPS weights {path}: {err}") from err
            if isinstance(loaded, dict) and "state_dict" in loaded:
                loaded = loaded["state_dict"]
            if not isinstance(loaded, dict):
                raise RuntimeError(f"LPIPS weights {path} do not hold a state dict")
            state.update(loaded)
        model = LPIPSVGG()
        model.load_weights(state, spec)
        return model.to(device)
    try:
        import lpips  # noqa: F401
    except ImportError:
        if verbose:
            print(
                f"LPIPS skipped: no VGG weights (set {LPIPS_ENV} to the lpips VGG state dict, or to a folder "
                f"holding torchvision's vgg16 weights and lpips's v0.1 vgg.pth)"
            )
        return None
    try:
        model = lpips.LPIPS(net="vgg", verbose=False).to(device).eval()
    except Exception as err:  # no cached torchvision weights and no network
        if verbose:
            print(f"LPIPS skipped: the lpips package could not load its VGG weights ({err}); set {LPIPS_ENV}")
        return None
    return lambda a, b: model(a, b, normalize=True).reshape(-1)
