// Torch-facing entry points of the CUDA rasterizer (bound to Python in bindings.cpp as
// npg._raster_cuda.forward / backward; called by npg/raster/cuda.py).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace npg {
namespace raster {

// camera: 27 numbers, w2c row-major (16), campos (3), fx, fy, cx, cy, lim_x, lim_y, width, height.
constexpr int kCameraNumbers = 27;

// Returns color [3, H, W], depth [1, H, W], alpha [1, H, W], radii [N] int32 and, for the backward,
// splats [N, 12], point_list [M] int32, tile_ranges [tiles, 2] int32, final_T [H, W], n_contrib [H, W]
// int32; or, when the inputs hold NaN / Inf or the pairs overflow int32, a single CPU int64 tensor
// [bad-input flags (bit i: input i of means3d, opacities, shs, colors, scales, rotations, cov3d,
// background), number of pairs]. Inputs: float32, contiguous, on one CUDA device; exactly one of shs [N, M, 3] / colors [N, 3]
// and one of scales [N, 3] + rotations [N, 4] / cov3d [N, 6]; opacities [N] or [N, 1]; background [3].
std::vector<at::Tensor> rasterize_forward(const at::Tensor& means3d, const at::Tensor& opacities,
                                          const std::optional<at::Tensor>& shs,
                                          const std::optional<at::Tensor>& colors,
                                          const std::optional<at::Tensor>& scales,
                                          const std::optional<at::Tensor>& rotations,
                                          const std::optional<at::Tensor>& cov3d, const at::Tensor& background,
                                          const std::vector<double>& camera, int64_t sh_degree,
                                          double scale_modifier);

// Returns the gradients of means3d [N, 3], means2d [N, 3] (NDC), opacities [N], shs (or an empty
// tensor), colors, scales, rotations, cov3d (each an empty tensor when that input was not given).
std::vector<at::Tensor> rasterize_backward(
    const at::Tensor& grad_color, const at::Tensor& grad_depth, const at::Tensor& grad_alpha,
    const at::Tensor& out_color, const at::Tensor& out_depth, const at::Tensor& final_T,
    const at::Tensor& n_contrib, const at::Tensor& point_list, const at::Tensor& tile_ranges,
    const at::Tensor& splats, const at::Tensor& radii, const at::Tensor& means3d, const at::Tensor& opacities,
    const std::optional<at::Tensor>& shs, const std::optional<at::Tensor>& colors,
    const std::optional<at::Tensor>& scales, const std::optional<at::Tensor>& rotations,
    const std::optional<at::Tensor>& cov3d, const at::Tensor& background, const std::vector<double>& camera,
    int64_t sh_degree, double scale_modifier);

}  // namespace raster
}  // namespace npg
