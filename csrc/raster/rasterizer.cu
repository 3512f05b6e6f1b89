// Host side of the CUDA rasterizer: checks the inputs, allocates every buffer through torch's caching
// allocator and runs the kernels of kernels.cuh on the current stream.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <climits>

#include "kernels.cuh"
#include "rasterizer.h"

namespace npg {
namespace raster {
namespace {

void check_float_cuda(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "npg CUDA rasterizer: ", name, " must be float32, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.is_cuda() && t.device() == device, "npg CUDA rasterizer: ", name, " is on ", t.device(),
                    " but means3d is on ", device);
  TORCH_CHECK_VALUE(t.is_contiguous(), "npg CUDA rasterizer: ", name, " must be contiguous");
}

// shape: -1 matches any size.
void check_shape(const at::Tensor& t, const char* name, std::initializer_list<int64_t> shape, const char* layout) {
  bool ok = t.dim() == static_cast<int64_t>(shape.size());
  int d = 0;
  for (int64_t s : shape) {
    if (ok && s >= 0 && t.size(d) != s) ok = false;
    ++d;
  }
  TORCH_CHECK_VALUE(ok, "npg CUDA rasterizer: ", name, " must have shape ", layout, ", got ", t.sizes());
}

const float* optional_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<float>() : nullptr;
}

bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

GaussianInputs make_inputs(const at::Tensor& means3d, const at::Tensor& opacities,
                           const std::optional<at::Tensor>& shs, const std::optional<at::Tensor>& colors,
                           const std::optional<at::Tensor>& scales, const std::optional<at::Tensor>& rotations,
                           const std::optional<at::Tensor>& cov3d, const at::Tensor& background, int64_t sh_degree,
                           double scale_modifier) {
  const at::Device device = means3d.device();
  TORCH_CHECK_VALUE(means3d.is_cuda(), "npg CUDA rasterizer: means3d must be a CUDA tensor, got ", device);
  check_float_cuda(means3d, "means3d", device);
  check_shape(means3d, "means3d", {-1, 3}, "[N, 3]");
  const int64_t n = means3d.size(0);
  TORCH_CHECK_VALUE(n < INT_MAX, "npg CUDA rasterizer: ", n, " Gaussians is more than one render takes (2^31 - 1)");
  check_float_cuda(opacities, "opacities", device);
  TORCH_CHECK_VALUE(opacities.numel() == n && (opacities.dim() == 1 || (opacities.dim() == 2 && opacities.size(1) == 1)),
                    "npg CUDA rasterizer: opacities must have shape [N] or [N, 1] with N = ", n, ", got ",
                    opacities.sizes());
  TORCH_CHECK_VALUE(given(shs) != given(colors), "npg CUDA rasterizer: pass exactly one of shs or colors");
  TORCH_CHECK_VALUE(given(cov3d) != (given(scales) || given(rotations)),
                    "npg CUDA rasterizer: pass scales and rotations, or cov3d");
  TORCH_CHECK_VALUE(sh_degree >= 0 && sh_degree <= 3, "npg CUDA rasterizer: sh_degree must be in 0..3, got ",
                    sh_degree);
  TORCH_CHECK_VALUE(std::isfinite(scale_modifier) && scale_modifier > 0,
                    "npg CUDA rasterizer: scale_modifier must be positive and finite, got ", scale_modifier);
  GaussianInputs in = {};
  in.num_gaussians = static_cast<int>(n);
  in.means3d = means3d.data_ptr<float>();
  in.opacities = opacities.data_ptr<float>();
  in.sh_degree = static_cast<int>(sh_degree);
  in.scale_modifier = static_cast<float>(scale_modifier);
  if (given(shs)) {
    check_float_cuda(*shs, "shs", device);
    check_shape(*shs, "shs", {n, -1, 3}, "[N, M, 3]");
    TORCH_CHECK_VALUE(shs->size(1) >= (sh_degree + 1) * (sh_degree + 1), "npg CUDA rasterizer: shs holds ",
                      shs->size(1), " coefficients per Gaussian but sh_degree ", sh_degree, " needs ",
                      (sh_degree + 1) * (sh_degree + 1));
    in.shs = optional_ptr(shs);
    in.sh_stride = static_cast<int>(shs->size(1));
  } else {
    check_float_cuda(*colors, "colors", device);
    check_shape(*colors, "colors", {n, 3}, "[N, 3]");
    in.colors = optional_ptr(colors);
  }
  if (given(cov3d)) {
    check_float_cuda(*cov3d, "cov3d", device);
    check_shape(*cov3d, "cov3d", {n, 6}, "[N, 6]");
    in.cov3d = optional_ptr(cov3d);
  } else {
    TORCH_CHECK_VALUE(given(scales) && given(rotations), "npg CUDA rasterizer: pass scales and rotations together");
    check_float_cuda(*scales, "scales", device);
    check_shape(*scales, "scales", {n, 3}, "[N, 3]");
    check_float_cuda(*rotations, "rotations", device);
    check_shape(*rotations, "rotations", {n, 4}, "[N, 4]");
    in.scales = optional_ptr(scales);
    in.rotations = optional_ptr(rotations);
  }
  check_float_cuda(background, "background", device);
  check_shape(background, "background", {3}, "[3]");
  in.background = background.data_ptr<float>();
  return in;
}

CameraParams make_camera(const std::vector<double>& c) {
  const int64_t count = static_cast<int64_t>(c.size());
  TORCH_CHECK_VALUE(count == kCameraNumbers, "npg CUDA rasterizer: camera must hold 27 numbers, got ", count);
  for (double v : c) TORCH_CHECK_VALUE(std::isfinite(v), "npg CUDA rasterizer: camera holds NaN or Inf");
  CameraParams cam = {};
  for (int r = 0; r < 3; ++r) {
    for (int k = 0; k < 3; ++k) cam.R.m[r][k] = static_cast<float>(c[4 * r + k]);
  }
  cam.t = {static_cast<float>(c[3]), static_cast<float>(c[7]), static_cast<float>(c[11])};
  cam.campos = {static_cast<float>(c[16]), static_cast<float>(c[17]), static_cast<float>(c[18])};
  cam.fx = static_cast<float>(c[19]);
  cam.fy = static_cast<float>(c[20]);
  cam.cx = static_cast<float>(c[21]);
  cam.cy = static_cast<float>(c[22]);
  cam.lim_x = static_cast<float>(c[23]);
  cam.lim_y = static_cast<float>(c[24]);
  const double width = c[25], height = c[26];
  TORCH_CHECK_VALUE(width >= 1 && height >= 1 && width == std::floor(width) && height == std::floor(height),
                    "npg CUDA rasterizer: image size must be positive integers, got ", width, "x", height);
  // Tile ids pack into 16 bits per axis (tile_rects) and pixel ids into int32.
  TORCH_CHECK_VALUE(width <= 65535.0 * kTileSize && height <= 65535.0 * kTileSize && width * height < INT_MAX,
                    "npg CUDA rasterizer: image size ", width, "x", height, " is too large");
  cam.width = static_cast<int>(width);
  cam.height = static_cast<int>(height);
  cam.tiles_x = (cam.width + kTileSize - 1) / kTileSize;
  cam.tiles_y = (cam.height + kTileSize - 1) / kTileSize;
  return cam;
}

int bit_length(unsigned int v) {
  int bits = 0;
  while (v) {
    ++bits;
    v >>= 1;
  }
  return bits;
}

at::Tensor cub_temp(size_t bytes, const at::TensorOptions& options) {
  return at::empty({static_cast<int64_t>(bytes > 0 ? bytes : 1)}, options.dtype(at::kByte));
}

}  // namespace

std::vector<at::Tensor> rasterize_forward(const at::Tensor& means3d, const at::Tensor& opacities,
                                          const std::optional<at::Tensor>& shs,
                                          const std::optional<at::Tensor>& colors,
                                          const std::optional<at::Tensor>& scales,
                                          const std::optional<at::Tensor>& rotations,
                                          const std::optional<at::Tensor>& cov3d, const at::Tensor& background,
                                          const std::vector<double>& camera, int64_t sh_degree,
                                          double scale_modifier) {
  const CameraParams cam = make_camera(camera);
  const GaussianInputs in =
      make_inputs(means3d, opacities, shs, colors, scales, rotations, cov3d, background, sh_degree, scale_modifier);
  const c10::cuda::CUDAGuard guard(means3d.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int n = in.num_gaussians;
  const auto f32 = means3d.options();
  const auto i32 = f32.dtype(at::kInt);
  const auto i64 = f32.dtype(at::kLong);

  at::Tensor radii = at::empty({n}, i32);
  at::Tensor splats = at::empty({n, 4 * kSplatFloat4s}, f32);
  at::Tensor tile_rects = at::empty({n, 2}, i32);
  at::Tensor depth_keys = at::empty({n}, i32);
  at::Tensor depth_order = at::empty({n}, i32);
  at::Tensor tiles_touched = at::empty({n}, i32);
  // offsets[0..N) is the inclusive scan of the tile counts in depth order; offsets[N] holds the
  // bad-input flags, so that one copy brings both to the host.
  at::Tensor offsets = at::empty({n + 1}, i64);
  int64_t* offsets_ptr = offsets.data_ptr<int64_t>();
  C10_CUDA_CHECK(cudaMemsetAsync(offsets_ptr + n, 0, sizeof(int64_t), stream));

  PreprocessOutputs pre = {};
  pre.radii = radii.data_ptr<int>();
  pre.splats = reinterpret_cast<float4*>(splats.data_ptr<float>());
  pre.tile_rects = reinterpret_cast<uint2*>(tile_rects.data_ptr<int>());
  pre.depth_keys = reinterpret_cast<unsigned int*>(depth_keys.data_ptr<int>());
  pre.depth_order = depth_order.data_ptr<int>();
  pre.tiles_touched = tiles_touched.data_ptr<int>();
  pre.bad_input = reinterpret_cast<unsigned int*>(offsets_ptr + n);
  launch_preprocess_forward(in, cam, pre, stream);

  at::Tensor sorted_order;
  if (n > 0) {
    at::Tensor sorted_keys = at::empty({n}, i32);
    sorted_order = at::empty({n}, i32);
    size_t bytes = 0;
    C10_CUDA_CHECK(sort_pairs_u32(nullptr, bytes, pre.depth_keys, nullptr, nullptr, nullptr, n, 32, stream));
    at::Tensor temp = cub_temp(bytes, f32);
    C10_CUDA_CHECK(sort_pairs_u32(temp.data_ptr(), bytes, pre.depth_keys,
                                  reinterpret_cast<unsigned int*>(sorted_keys.data_ptr<int>()), pre.depth_order,
                                  sorted_order.data_ptr<int>(), n, 32, stream));
    at::Tensor counts = at::empty({n}, i64);
    launch_count_tiles(n, sorted_order.data_ptr<int>(), pre.radii, pre.splats, pre.tile_rects, pre.tiles_touched,
                       counts.data_ptr<int64_t>(), stream);
    bytes = 0;
    C10_CUDA_CHECK(inclusive_sum_i64(nullptr, bytes, counts.data_ptr<int64_t>(), offsets_ptr, n, stream));
    temp = cub_temp(bytes, f32);
    C10_CUDA_CHECK(inclusive_sum_i64(temp.data_ptr(), bytes, counts.data_ptr<int64_t>(), offsets_ptr, n, stream));
  }

  // The one host synchronisation: the number of (tile, Gaussian) pairs and the input flags.
  int64_t host[2] = {0, 0};
  if (n > 0) {
    C10_CUDA_CHECK(cudaMemcpyAsync(host, offsets_ptr + n - 1, 2 * sizeof(int64_t), cudaMemcpyDeviceToHost, stream));
  } else {
    C10_CUDA_CHECK(cudaMemcpyAsync(host + 1, offsets_ptr, sizeof(int64_t), cudaMemcpyDeviceToHost, stream));
  }
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  const int64_t num_pairs = host[0];
  const int64_t flags = host[1];
  // Data-dependent failures are reported as a status, not thrown: the caller (npg/raster/cuda.py)
  // turns it into an error naming the inputs. Throwing C++ exceptions through the extension crashed
  // the process on the H100 machine's toolchain.
  if (flags != 0 || num_pairs > INT_MAX) {
    return {at::tensor({flags, num_pairs}, at::TensorOptions().dtype(at::kLong))};
  }

  const unsigned int num_tiles = static_cast<unsigned int>(cam.tiles_x) * static_cast<unsigned int>(cam.tiles_y);
  at::Tensor tile_ranges = at::zeros({static_cast<int64_t>(num_tiles), 2}, i32);
  at::Tensor point_list;
  if (num_pairs > 0) {
    const int m = static_cast<int>(num_pairs);
    at::Tensor keys = at::empty({m}, i32);
    at::Tensor values = at::empty({m}, i32);
    launch_duplicate(n, sorted_order.data_ptr<int>(), offsets_ptr, pre.tiles_touched, pre.splats, pre.tile_rects,
                     cam.tiles_x, num_tiles, reinterpret_cast<unsigned int*>(keys.data_ptr<int>()),
                     values.data_ptr<int>(), stream);
    at::Tensor sorted_keys = at::empty({m}, i32);
    point_list = at::empty({m}, i32);
    const int end_bit = bit_length(num_tiles);  // the sentinel id num_tiles must fit too
    size_t bytes = 0;
    C10_CUDA_CHECK(sort_pairs_u32(nullptr, bytes, nullptr, nullptr, nullptr, nullptr, m, end_bit, stream));
    at::Tensor temp = cub_temp(bytes, f32);
    C10_CUDA_CHECK(sort_pairs_u32(temp.data_ptr(), bytes, reinterpret_cast<unsigned int*>(keys.data_ptr<int>()),
                                  reinterpret_cast<unsigned int*>(sorted_keys.data_ptr<int>()),
                                  values.data_ptr<int>(), point_list.data_ptr<int>(), m, end_bit, stream));
    launch_tile_ranges(m, reinterpret_cast<unsigned int*>(sorted_keys.data_ptr<int>()), num_tiles,
                       reinterpret_cast<int2*>(tile_ranges.data_ptr<int>()), stream);
  } else {
    point_list = at::empty({0}, i32);
  }

  at::Tensor color = at::empty({3, cam.height, cam.width}, f32);
  at::Tensor depth = at::empty({1, cam.height, cam.width}, f32);
  at::Tensor alpha = at::empty({1, cam.height, cam.width}, f32);
  at::Tensor final_T = at::empty({cam.height, cam.width}, f32);
  at::Tensor n_contrib = at::empty({cam.height, cam.width}, i32);
  launch_render_forward(cam, reinterpret_cast<const int2*>(tile_ranges.data_ptr<int>()), point_list.data_ptr<int>(),
                        pre.splats, in.background, color.data_ptr<float>(), depth.data_ptr<float>(),
                        alpha.data_ptr<float>(), final_T.data_ptr<float>(), n_contrib.data_ptr<int>(), stream);
  return {color, depth, alpha, radii, splats, point_list, tile_ranges, final_T, n_contrib};
}

std::vector<at::Tensor> rasterize_backward(
    const at::Tensor& grad_color, const at::Tensor& grad_depth, const at::Tensor& grad_alpha,
    const at::Tensor& out_color, const at::Tensor& out_depth, const at::Tensor& final_T,
    const at::Tensor& n_contrib, const at::Tensor& point_list, const at::Tensor& tile_ranges,
    const at::Tensor& splats, const at::Tensor& radii, const at::Tensor& means3d, const at::Tensor& opacities,
    const std::optional<at::Tensor>& shs, const std::optional<at::Tensor>& colors,
    const std::optional<at::Tensor>& scales, const std::optional<at::Tensor>& rotations,
    const std::optional<at::Tensor>& cov3d, const at::Tensor& background, const std::vector<double>& camera,
    int64_t sh_degree, double scale_modifier) {
  const CameraParams cam = make_camera(camera);
  const GaussianInputs in =
      make_inputs(means3d, opacities, shs, colors, scales, rotations, cov3d, background, sh_degree, scale_modifier);
  const c10::cuda::CUDAGuard guard(means3d.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Device device = means3d.device();
  const int n = in.num_gaussians;
  const int64_t h = cam.height, w = cam.width;
  check_float_cuda(grad_color, "grad_color", device);
  check_shape(grad_color, "grad_color", {3, h, w}, "[3, H, W]");
  check_float_cuda(grad_depth, "grad_depth", device);
  check_shape(grad_depth, "grad_depth", {1, h, w}, "[1, H, W]");
  check_float_cuda(grad_alpha, "grad_alpha", device);
  check_shape(grad_alpha, "grad_alpha", {1, h, w}, "[1, H, W]");
  check_shape(out_color, "out_color", {3, h, w}, "[3, H, W]");
  check_shape(out_depth, "out_depth", {1, h, w}, "[1, H, W]");
  check_shape(final_T, "final_T", {h, w}, "[H, W]");
  check_shape(n_contrib, "n_contrib", {h, w}, "[H, W]");
  check_shape(splats, "splats", {n, 4 * kSplatFloat4s}, "[N, 12]");
  check_shape(radii, "radii", {n}, "[N]");
  check_shape(tile_ranges, "tile_ranges", {static_cast<int64_t>(cam.tiles_x) * cam.tiles_y, 2}, "[tiles, 2]");

  const auto f32 = means3d.options();
  auto grad_like = [&](const std::optional<at::Tensor>& t) {
    return given(t) ? at::empty_like(*t, at::MemoryFormat::Contiguous) : at::empty({0}, f32);
  };
  at::Tensor d_means3d = at::empty({n, 3}, f32);
  at::Tensor d_means2d = at::empty({n, 3}, f32);
  at::Tensor d_opacities = at::empty({n}, f32);
  at::Tensor d_shs = grad_like(shs), d_colors = grad_like(colors), d_scales = grad_like(scales),
             d_rotations = grad_like(rotations), d_cov3d = grad_like(cov3d);
  if (n == 0) return {d_means3d, d_means2d, d_opacities, d_shs, d_colors, d_scales, d_rotations, d_cov3d};

  at::Tensor splat_grads = at::zeros({n, kGradsPerSplat}, f32);
  launch_render_backward(cam, reinterpret_cast<const int2*>(tile_ranges.data_ptr<int>()), point_list.data_ptr<int>(),
                         reinterpret_cast<const float4*>(splats.data_ptr<float>()), out_color.data_ptr<float>(),
                         out_depth.data_ptr<float>(), final_T.data_ptr<float>(), n_contrib.data_ptr<int>(),
                         grad_color.data_ptr<float>(), grad_depth.data_ptr<float>(), grad_alpha.data_ptr<float>(),
                         splat_grads.data_ptr<float>(), stream);
  InputGrads grads = {};
  grads.means3d = d_means3d.data_ptr<float>();
  grads.means2d = d_means2d.data_ptr<float>();
  grads.opacities = d_opacities.data_ptr<float>();
  grads.shs = given(shs) ? d_shs.data_ptr<float>() : nullptr;
  grads.colors = given(colors) ? d_colors.data_ptr<float>() : nullptr;
  grads.scales = given(scales) ? d_scales.data_ptr<float>() : nullptr;
  grads.rotations = given(rotations) ? d_rotations.data_ptr<float>() : nullptr;
  grads.cov3d = given(cov3d) ? d_cov3d.data_ptr<float>() : nullptr;
  launch_preprocess_backward(in, cam, radii.data_ptr<int>(), splat_grads.data_ptr<float>(), grads, stream);
  return {d_means3d, d_means2d, d_opacities, d_shs, d_colors, d_scales, d_rotations, d_cov3d};
}

}  // namespace raster
}  // namespace npg
