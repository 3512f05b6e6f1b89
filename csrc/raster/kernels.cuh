// Launchers of the rasterizer's kernels (raw pointers, one CUDA stream). The torch-facing host code
// in rasterizer.cu allocates every buffer and calls these in order:
//   forward:  preprocess -> depth sort -> scan of tile counts -> duplicate -> tile sort -> ranges -> render
//   backward: render backward (per-splat gradients) -> preprocess backward (per-input gradients)
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "blend.cuh"
#include "config.h"
#include "math.cuh"

namespace npg {
namespace raster {

struct CameraParams {
  Mat3<float> R;          // w2c rotation (row-major)
  Vec3<float> t;          // w2c translation
  Vec3<float> campos;     // camera centre in world space
  float fx, fy, cx, cy;   // pinhole intrinsics, pixel centres at integer coordinates
  float lim_x, lim_y;     // 1.3·tan(half fov x / y): the clamp of x/z, y/z in the EWA Jacobian
  int width, height;      // image size in pixels
  int tiles_x, tiles_y;   // tile grid, ceil(size / 16)
};

// The per-Gaussian inputs. Exactly one of shs / colors and one of (scales, rotations) / cov3d is set.
struct GaussianInputs {
  int num_gaussians;        // N
  const float* means3d;     // [N, 3]
  const float* opacities;   // [N]
  const float* shs;         // [N, sh_stride, 3] or nullptr
  int sh_stride;            // M >= (sh_degree + 1)²
  int sh_degree;            // 0..3
  const float* colors;      // [N, 3] or nullptr
  const float* scales;      // [N, 3] or nullptr
  const float* rotations;   // [N, 4] (w, x, y, z) or nullptr
  const float* cov3d;       // [N, 6] (xx, xy, xz, yy, yz, zz) or nullptr
  const float* background;  // [3]
  float scale_modifier;
};

struct PreprocessOutputs {
  int* radii;                 // [N] screen radius in pixels, 0 = not rendered
  float4* splats;             // [N, kSplatFloat4s] see blend.cuh
  uint2* tile_rects;          // [N] tiles [x0, x1) × [y0, y1) to test, packed (x0 | x1 << 16, y0 | y1 << 16)
  unsigned int* depth_keys;   // [N] float bits of view-space z; 0xFFFFFFFF when not rendered
  int* depth_order;           // [N] 0..N−1 (the values of the depth sort)
  int* tiles_touched;         // [N] number of tiles listing the Gaussian
  unsigned int* bad_input;    // [1] BadInput flags, raised on non-finite inputs
};

struct InputGrads {
  float* means3d;    // [N, 3]
  float* means2d;    // [N, 3] ∂L/∂(NDC x, y), column 2 zero
  float* opacities;  // [N]
  float* shs;        // [N, sh_stride, 3] or nullptr
  float* colors;     // [N, 3] or nullptr
  float* scales;     // [N, 3] or nullptr
  float* rotations;  // [N, 4] or nullptr
  float* cov3d;      // [N, 6] or nullptr
};

void launch_preprocess_forward(const GaussianInputs& in, const CameraParams& cam, const PreprocessOutputs& out,
                               cudaStream_t stream);

void launch_preprocess_backward(const GaussianInputs& in, const CameraParams& cam,
                                const int* radii,         // [N]
                                const float* splat_grads, // [N, kGradsPerSplat]
                                const InputGrads& grads, cudaStream_t stream);

// counts[i] = number of tiles listing Gaussian order[i] (0 when culled: radii 0), as int64 for the scan
// in depth order; the same count is stored per Gaussian in tiles_touched.
void launch_count_tiles(int n, const int* order,        // [N] Gaussian ids front to back
                        const int* radii,               // [N]
                        const float4* splats,           // [N, kSplatFloat4s]
                        const uint2* tile_rects,        // [N]
                        int* tiles_touched,             // [N]
                        int64_t* counts,                // [N]
                        cudaStream_t stream);

// Writes the (tile, Gaussian) pairs of every Gaussian, Gaussians taken front to back: the tile ids to
// keys, the Gaussian ids to values, at [offsets[i] − tiles_touched, offsets[i]) for the i-th.
void launch_duplicate(int n, const int* order,          // [N] Gaussian ids front to back
                      const int64_t* offsets,           // [N] inclusive scan of the counts in that order
                      const int* tiles_touched,         // [N]
                      const float4* splats,             // [N, kSplatFloat4s]
                      const uint2* tile_rects,          // [N]
                      int tiles_x, unsigned int sentinel_tile,
                      unsigned int* keys,               // [M] tile ids
                      int* values,                      // [M] Gaussian ids
                      cudaStream_t stream);

// ranges[tile] = [start, end) of the tile's pairs in the sorted keys; ranges must be zeroed before.
void launch_tile_ranges(int num_pairs, const unsigned int* sorted_keys,  // [M]
                        unsigned int num_tiles,
                        int2* ranges,                                     // [num_tiles]
                        cudaStream_t stream);

// cub radix sorts; temp storage is allocated by the caller (query with temp == nullptr).
cudaError_t sort_pairs_u32(void* temp, size_t& temp_bytes, const unsigned int* keys_in, unsigned int* keys_out,
                           const int* values_in, int* values_out, int n, int end_bit, cudaStream_t stream);
cudaError_t inclusive_sum_i64(void* temp, size_t& temp_bytes, const int64_t* in, int64_t* out, int n,
                              cudaStream_t stream);

void launch_render_forward(const CameraParams& cam,
                           const int2* ranges,        // [tiles]
                           const int* point_list,     // [M]
                           const float4* splats,      // [N, kSplatFloat4s]
                           const float* background,   // [3]
                           float* out_color,          // [3, H, W]
                           float* out_depth,          // [H, W]
                           float* out_alpha,          // [H, W]
                           float* final_T,            // [H, W]
                           int* n_contrib,            // [H, W]
                           cudaStream_t stream);

void launch_render_backward(const CameraParams& cam,
                            const int2* ranges,        // [tiles]
                            const int* point_list,     // [M]
                            const float4* splats,      // [N, kSplatFloat4s]
                            const float* out_color,    // [3, H, W]
                            const float* out_depth,    // [H, W]
                            const float* final_T,      // [H, W]
                            const int* n_contrib,      // [H, W]
                            const float* grad_color,   // [3, H, W]
                            const float* grad_depth,   // [H, W]
                            const float* grad_alpha,   // [H, W]
                            float* splat_grads,        // [N, kGradsPerSplat], zeroed before
                            cudaStream_t stream);

}  // namespace raster
}  // namespace npg
